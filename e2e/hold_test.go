package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

type hierRow struct {
	Name    string   `json:"name"`
	Mode    string   `json:"mode"`
	Owners  []string `json:"owners"`
	Pending []struct {
		Mode   string   `json:"mode"`
		Owners []string `json:"owners"`
	} `json:"pending"`
}

func (d *daemon) hierLocks() map[string]hierRow {
	d.t.Helper()
	r := d.vmlock("locks", "-o", "json")
	if r.code != 0 {
		d.t.Fatalf("vmlock locks: %d %s", r.code, r.stderr)
	}
	var m struct {
		Hierarchical []hierRow `json:"hierarchical"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		d.t.Fatal(err)
	}
	out := map[string]hierRow{}
	for _, row := range m.Hierarchical {
		out[row.Name] = row
	}
	return out
}

// startHold starts `vmlock hold SPECS -- sleep 300` and waits until the
// monitor shows it holding want.
func (d *daemon) startHold(want string, specs ...string) *exec.Cmd {
	d.t.Helper()
	args := append([]string{"--socket", d.socket, "hold"}, specs...)
	cmd := exec.Command(bins.vmlock, append(args, "--", "sleep", "300")...)
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	d.waitHier(func(m map[string]hierRow) bool { return len(m[want].Owners) > 0 }, "a holder of "+want)
	return cmd
}

func (d *daemon) waitHier(ok func(map[string]hierRow) bool, what string) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if ok(d.hierLocks()) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.t.Fatalf("the monitor never showed %s: %+v", what, d.hierLocks())
}

func TestHoldProcessesInOppositeOrdersNeverDeadlock(t *testing.T) {
	d := startDaemon(t)
	specs := [][]string{
		{"instance/a", "instance/b", "node/n1"},
		{"node/n1", "instance/b", "instance/a"},
		{"instance/b:shared", "node/n1:shared"},
		{"instance/a", "node/n2", "node/n1"},
	}
	var wg sync.WaitGroup
	errs := make(chan string, 64)
	for round := range 4 {
		for i, s := range specs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				args := append([]string{"--socket", d.socket, "hold", "--timeout", "60s"}, s...)
				out, err := exec.Command(bins.vmlock, append(args, "--", "sh", "-c", "sleep 0.02")...).CombinedOutput()
				if err != nil {
					errs <- fmt.Sprintf("round %d holder %d: %v: %s", round, i, err, out)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	for name, row := range d.hierLocks() {
		if len(row.Owners) > 0 || len(row.Pending) > 0 {
			t.Errorf("%s still has owners %v or waiters after every holder exited", name, row.Owners)
		}
	}
}

func TestHoldReleasesWhenTheHolderIsKilledAndShowsWaiters(t *testing.T) {
	d := startDaemon(t)
	first := d.startHold("instance/web1", "instance/web1")
	// A second holder queues behind the first and shows up as a waiter.
	second := exec.Command(bins.vmlock, "--socket", d.socket, "hold", "instance/web1", "--", "true")
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	d.waitHier(func(m map[string]hierRow) bool {
		return len(m["instance/web1"].Pending) == 1 && m["instance/web1"].Pending[0].Mode == "exclusive"
	}, "the second holder waiting on instance/web1")
	// SIGKILL of the holding CLI (not of its command) frees the lock.
	t0 := time.Now()
	first.Process.Kill()
	first.Wait()
	if err := second.Wait(); err != nil {
		t.Fatalf("the waiter did not get the lock after the holder was killed: %v", err)
	}
	t.Logf("the waiter ran %v after the holder was killed", time.Since(t0))
	d.waitHier(func(m map[string]hierRow) bool { return len(m["instance/web1"].Owners) == 0 }, "instance/web1 free")
}

func TestHoldExitStatuses(t *testing.T) {
	d := startDaemon(t)
	d.startHold("node/n1", "node/n1")
	cases := []struct {
		name string
		args []string
		code int
	}{
		{"the command's own status", []string{"instance/x", "--", "sh", "-c", "exit 4"}, 4},
		{"timeout on a held lock", []string{"--timeout", "200ms", "node/n1", "--", "true"}, int(lockmgr.CodeTimeout)},
		{"shared on a held exclusive times out", []string{"--timeout", "100ms", "node/n1:shared", "--", "true"}, int(lockmgr.CodeTimeout)},
		{"unknown level", []string{"rack/r1", "--", "true"}, int(lockmgr.CodeInvalidArgument)},
		{"mixed modes in one level", []string{"node/a", "node/b:shared", "--", "true"}, int(lockmgr.CodeInvalidArgument)},
		{"no command", []string{"node/a"}, int(lockmgr.CodeInvalidArgument)},
		{"bad spec", []string{"nolevel", "--", "true"}, int(lockmgr.CodeInvalidArgument)},
		{"whole level while another holds a member", []string{"--timeout", "100ms", "node/*", "--", "true"}, int(lockmgr.CodeTimeout)},
		{"other names of a level are free", []string{"node/n2", "instance/*", "--", "true"}, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := d.vmlock(append([]string{"hold"}, c.args...)...)
			if r.code != c.code {
				t.Fatalf("vmlock hold %v: exit %d (%s), want %d", c.args, r.code, strings.TrimSpace(r.stderr), c.code)
			}
		})
	}
}

// --timeout keeps its meaning at the edges: under a millisecond it is a
// try-lock (Ganeti's rule), so it fails at once on a held lock instead of
// waiting without end; a negative timeout is a usage error, not a wait.
func TestHoldTimeoutEdges(t *testing.T) {
	d := startDaemon(t)
	d.startHold("node/n1", "node/n1")
	cases := []struct {
		timeout string
		code    int
	}{
		{"500us", int(lockmgr.CodeTimeout)},
		{"1ns", int(lockmgr.CodeTimeout)},
		{"-1s", int(lockmgr.CodeInvalidArgument)},
	}
	for _, c := range cases {
		t.Run(c.timeout, func(t *testing.T) {
			// A watchdog, not a timing check: the bug is a wait without end.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bins.vmlock, "--socket", d.socket, "hold", "--timeout", c.timeout, "node/n1", "--", "true")
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("vmlock hold --timeout %s still waited for the held node/n1 after 30 s", c.timeout)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != c.code {
				t.Fatalf("vmlock hold --timeout %s: %v (%s), want exit %d", c.timeout, err, strings.TrimSpace(string(out)), c.code)
			}
		})
	}
}

// Killing vmlock hold, even with SIGKILL, kills its command with it: the
// session's locks are released at once, and the command must not go on
// running without them while the next holder runs.
// holdWithPid starts `vmlock hold instance/web1 -- sleep` with its stderr in
// errOut, and returns it with the pid of its command, once the monitor
// shows it holding the lock.
func (d *daemon) holdWithPid(errOut io.Writer) (hold *exec.Cmd, pid int) {
	t := d.t
	t.Helper()
	pidFile := filepath.Join(d.dir, "command.pid")
	os.Remove(pidFile)
	hold = exec.Command(bins.vmlock, "--socket", d.socket, "hold", "instance/web1", "--",
		"sh", "-c", "echo $$ > "+pidFile+".tmp && mv "+pidFile+".tmp "+pidFile+" && exec sleep 300")
	hold.Stderr = errOut
	if err := hold.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hold.Process.Kill(); hold.Wait() })
	for deadline := time.Now().Add(10 * time.Second); pid == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the command never started")
		}
		b, _ := os.ReadFile(pidFile)
		pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	d.waitHier(func(m map[string]hierRow) bool { return len(m["instance/web1"].Owners) > 0 }, "the holder of instance/web1")
	return hold, pid
}

// waitGone waits for pid to exit.
func waitGone(t *testing.T, pid int, why string) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); alive(pid); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the command (pid %d) still runs %s", pid, why)
		}
	}
}

func TestHoldKilledTakesItsCommandWithIt(t *testing.T) {
	d := startDaemon(t)
	hold, pid := d.holdWithPid(nil)
	hold.Process.Kill()
	hold.Wait()
	d.waitHier(func(m map[string]hierRow) bool { return len(m["instance/web1"].Owners) == 0 }, "instance/web1 free")
	waitGone(t, pid, "after its holder was killed, without the locks it was run under")
}

// Hierarchical locks live in vmlockd's memory: a reload releases them. The
// command run under them must not go on as if it held them: hold stops it
// and says why, with the not-held status.
func TestHoldStopsItsCommandWhenVmlockdReleasesTheLocks(t *testing.T) {
	d := startDaemon(t)
	var stderr bytes.Buffer
	hold, pid := d.holdWithPid(&stderr)
	if r := d.vmlock("daemon", "reload"); r.code != 0 {
		t.Fatalf("reload: %+v", r)
	}
	exited := make(chan error, 1)
	go func() { exited <- hold.Wait() }()
	var err error
	select {
	case err = <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("hold and its command still run after the reload released their locks")
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != int(lockmgr.CodeNotHeld) {
		t.Fatalf("hold after the reload: %v, want exit status %d (not held); stderr %q", err, lockmgr.CodeNotHeld, stderr.String())
	}
	mustContain(t, "hold's stderr", stderr.String(), "session", "stopping sh")
	waitGone(t, pid, "after the reload released its locks")
}

// alive reports whether pid is a process that has not exited.
func alive(pid int) bool {
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	return err == nil && !bytes.Contains(st, []byte(") Z "))
}

// Names created on first use leave `vmlock locks` once nobody holds or
// waits for them: a management application that locks one name per job
// does not make the list (and vmlockd) grow.
func TestLocksNoLongerShowsReleasedNames(t *testing.T) {
	d := startDaemon(t)
	d.startHold("instance/running", "instance/running")
	for i := range 5 {
		if r := d.vmlock("hold", fmt.Sprintf("instance/job%d", i), "node/n1:shared", "--", "true"); r.code != 0 {
			t.Fatalf("vmlock hold instance/job%d: exit %d (%s)", i, r.code, strings.TrimSpace(r.stderr))
		}
	}
	// vmlockd releases a session's locks when its stream ends, which may
	// be just after hold exits.
	d.waitHier(func(m map[string]hierRow) bool {
		for name := range m {
			if strings.HasPrefix(name, "instance/job") || name == "node/n1" {
				return false
			}
		}
		return true
	}, "no instance/job* and no node/n1 once their holders exited")
	if m := d.hierLocks(); len(m["instance/running"].Owners) != 1 {
		t.Errorf("vmlock locks shows instance/running as %+v, want it held", m["instance/running"])
	}
}
