// Package e2e holds the end-to-end tests: the real vmlockd and vmlock
// binaries, real processes, real signals and real OFD locks.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
)

// bins holds the binaries built once for all tests, in a directory every
// user can read (the permission test runs vmlock as nobody).
var bins struct{ dir, vmlockd, vmlock string }

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vmlock-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755)
	bins.dir = dir
	bins.vmlockd = filepath.Join(dir, "vmlockd")
	bins.vmlock = filepath.Join(dir, "vmlock")
	for _, b := range [][2]string{{bins.vmlockd, "../cmd/vmlockd"}, {bins.vmlock, "../cmd/vmlock"}} {
		out, err := exec.Command("go", "build", "-o", b[0], b[1]).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", b[1], err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// daemon is one vmlockd under test.
type daemon struct {
	t        *testing.T
	dir      string // world-traversable: holds the socket
	socket   string
	stateDir string
	args     []string
	cmd      *exec.Cmd
	log      *bytes.Buffer
}

// startDaemon starts vmlockd on a fresh socket and state directory.
func startDaemon(t *testing.T, extra ...string) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmlock-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	d := &daemon{t: t, dir: dir, socket: filepath.Join(dir, "vmlockd.sock"), stateDir: filepath.Join(dir, "state")}
	d.args = append([]string{"--socket", d.socket, "--state-dir", d.stateDir, "--log-level", "debug"}, extra...)
	t.Cleanup(func() {
		d.stop()
		d.killHolder()
		if t.Failed() {
			t.Logf("vmlockd log:\n%s", d.log)
		}
		os.RemoveAll(dir)
	})
	d.start()
	return d
}

func (d *daemon) start() {
	d.t.Helper()
	if d.log == nil {
		d.log = &bytes.Buffer{}
	}
	d.cmd = exec.Command(bins.vmlockd, d.args...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.waitReady()
}

func (d *daemon) waitReady() {
	d.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := api.Dial(ctx, d.socket)
		if err == nil {
			_, err = c.Status(ctx)
			c.Close()
		}
		cancel()
		if err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.t.Fatalf("vmlockd did not become ready; log:\n%s", d.log)
}

// kill9 kills the daemon with SIGKILL (its lock-holder lives on).
func (d *daemon) kill9() {
	d.cmd.Process.Kill()
	d.cmd.Wait()
}

func (d *daemon) stop() {
	if d.cmd == nil || d.cmd.ProcessState != nil {
		return
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-done
	}
}

// killHolder ends the lock-holder of this daemon's state directory with
// SIGKILL and waits until it is dead (its socket closed).
func (d *daemon) killHolder() {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if !bytes.Contains(b, []byte("lock-holder")) || !bytes.Contains(b, []byte(d.stateDir)) {
			continue
		}
		syscall.Kill(pid, syscall.SIGKILL)
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			st, err := os.ReadFile("/proc/" + e.Name() + "/stat")
			if err != nil || bytes.Contains(st, []byte(") Z ")) {
				break // gone, or a zombie: its descriptors are closed
			}
		}
	}
}

func (d *daemon) client() *api.Client {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := api.Dial(ctx, d.socket)
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { c.Close() })
	return c
}

// result is what one vmlock invocation did.
type result struct {
	code           int
	stdout, stderr string
}

// vmlock runs the CLI to completion.
func (d *daemon) vmlock(args ...string) result {
	d.t.Helper()
	return d.vmlockAs(nil, args...)
}

func (d *daemon) vmlockAs(cred *syscall.Credential, args ...string) result {
	d.t.Helper()
	r := runVmlock(d.socket, cred, args...)
	if r.code == -1 {
		d.t.Fatalf("vmlock %v: %s", args, r.stderr)
	}
	return r
}

// runVmlock runs the CLI against socket, as cred if not nil; a failure to
// run it at all is exit code -1. It never calls t.Fatal, so it may run off
// the test's goroutine.
func runVmlock(socket string, cred *syscall.Credential, args ...string) result {
	cmd := exec.Command(bins.vmlock, append([]string{"--socket", socket}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		r.code, r.stderr = -1, err.Error()
	}
	return r
}

// startRun starts `vmlock run ... -- sleep 300` in the background and waits
// until its lock is listed; it returns the process (which becomes sleep).
func (d *daemon) startRun(name string, resources ...string) *exec.Cmd {
	d.t.Helper()
	args := append([]string{"--socket", d.socket, "run", "--name", name}, resources...)
	args = append(args, "--", "sleep", "300")
	cmd := exec.Command(bins.vmlock, args...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Holding means vmlock got its answer and became the command: the
	// monitor can list a grant a moment before the client is answered.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid))
		if strings.TrimSpace(string(comm)) == "sleep" {
			for _, l := range d.locks() {
				for _, h := range l.Holders {
					if h.PID == cmd.Process.Pid {
						return cmd
					}
				}
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	d.t.Fatalf("vmlock run %s never held its locks; stderr: %s", name, errb.String())
	return nil
}

func (d *daemon) locks() []api.Lock {
	d.t.Helper()
	r := d.vmlock("locks", "-o", "json")
	if r.code != 0 {
		d.t.Fatalf("vmlock locks: exit %d: %s", r.code, r.stderr)
	}
	var m struct {
		Resources []api.Lock `json:"resources"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		d.t.Fatalf("vmlock locks -o json: %v\n%s", err, r.stdout)
	}
	return m.Resources
}

// waitFree waits until nothing holds path in the daemon's table and a raw
// OFD probe gets the lock, and returns how long that took.
func (d *daemon) waitFree(path string, limit time.Duration) time.Duration {
	d.t.Helper()
	t0 := time.Now()
	for time.Since(t0) < limit {
		held := false
		for _, l := range d.locks() {
			if l.Resource.Name == path {
				held = true
			}
		}
		if !held && probeFree(d.t, path) {
			return time.Since(t0)
		}
		time.Sleep(5 * time.Millisecond)
	}
	d.t.Fatalf("%s still locked after %v", path, limit)
	return 0
}

// probeFree reports whether an OFD write lock on byte 0 of path can be
// taken right now (and releases it at once). It is what any other process,
// vmlockd-managed or not, would see.
func probeFree(t *testing.T, path string) bool {
	t.Helper()
	return probe(t, path, unix.F_WRLCK)
}

// probe reports whether an OFD lock of type typ (F_RDLCK, F_WRLCK) on byte
// 0 of path can be taken now, as any other process would try it.
func probe(t *testing.T, path string, typ int16) bool {
	t.Helper()
	flag := os.O_RDWR
	if typ == unix.F_RDLCK {
		flag = os.O_RDONLY // a read lock needs only read access
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: 0, Len: 1}
	err = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if err == nil {
		return true
	}
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
		return false
	}
	t.Fatalf("probe %s: %v", path, err)
	return false
}

// image makes a disk image file in a fresh directory.
func image(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	real, _ := filepath.EvalSymlinks(p)
	return real
}

func mustContain(t *testing.T, what, s string, subs ...string) {
	t.Helper()
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			t.Fatalf("%s %q does not contain %q", what, s, sub)
		}
	}
}
