package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
	"github.com/vmlock/vmlock/virtlockd"
)

// lvEnv is a daemon with the libvirt drop-in, which a test can stop and
// start again on the same state directory (the lock-holder lives on while it holds locks).
type lvEnv struct {
	t                          *testing.T
	dir, state, socket, lvSock string
	d                          *Daemon
	cancel                     context.CancelFunc
	done                       chan error
	startHolder                func() error
	holders                    sync.WaitGroup
	// libvirt, if set, adjusts the libvirt configuration of the next start.
	libvirt func(*LibvirtConfig)
}

func newLVEnv(t *testing.T) *lvEnv {
	t.Helper()
	dir := t.TempDir()
	e := &lvEnv{t: t, dir: dir, state: filepath.Join(dir, "state"), socket: filepath.Join(dir, "api.sock"),
		lvSock: filepath.Join(dir, "virtlockd-sock")}
	os.MkdirAll(e.state, 0o700)
	hctx, hcancel := context.WithCancel(context.Background())
	// The lock-holder, in-process: it exits when its daemon is gone and it
	// holds nothing; the next daemon starts another.
	e.startHolder = func() error {
		e.holders.Add(1)
		go func() { defer e.holders.Done(); lockholder.Serve(hctx, e.state) }()
		return nil
	}
	t.Cleanup(func() { e.stop(); hcancel(); e.holders.Wait() })
	return e
}

// start creates and runs a daemon; ln, if set, is an inherited libvirt
// listener.
func (e *lvEnv) start(ln *net.UnixListener) {
	e.t.Helper()
	drv, err := lockspace.New(lockspace.Config{StateDir: e.state, LeaseDir: filepath.Join(e.state, "lockspaces")})
	if err != nil {
		e.t.Fatal(err)
	}
	lc := &LibvirtConfig{Socket: e.lvSock, Listener: ln}
	if e.libvirt != nil {
		e.libvirt(lc)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, Config{
		Socket: e.socket, StateDir: e.state, Driver: drv, HolderCommand: e.startHolder,
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
		Libvirt: lc,
	}, nil)
	if err != nil {
		cancel()
		e.t.Fatal(err)
	}
	e.d, e.cancel, e.done = d, cancel, make(chan error, 1)
	go func() { e.done <- d.Run(ctx) }()
}

// stop stops the running daemon (gracefully: every lock stays held by
// the lock-holder, as after a crash) and returns Run's error.
func (e *lvEnv) stop() error {
	if e.d == nil {
		return nil
	}
	e.cancel()
	err := <-e.done
	e.d.lockF.Close()
	e.d = nil
	return err
}

func (e *lvEnv) api() *api.Client {
	e.t.Helper()
	c, err := api.Dial(context.Background(), e.socket)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

// register dials the libvirt socket and registers a domain owned by pid.
func (e *lvEnv) register(name string, uuidLast byte, pid int) *virtlockd.Client {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := virtlockd.Dial(ctx, e.lvSock)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	o := virtlockd.Owner{Name: name, ID: 1, PID: uint32(pid)}
	o.UUID[0], o.UUID[15] = 0x11, uuidLast
	if err := c.Register(ctx, o, 0); err != nil {
		e.t.Fatal(err)
	}
	return c
}

// holders returns the holders of the resource named name, from the
// native API's lock monitor.
func holders(t *testing.T, c *api.Client, name string) []lockmgr.Holder {
	t.Helper()
	locks, err := c.Locks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range locks {
		if l.Resource.Name == name || strings.HasSuffix(l.Resource.Name, "/"+name) {
			return l.Holders
		}
	}
	return nil
}

func waitUnheld(t *testing.T, c *api.Client, name string) {
	t.Helper()
	for t0 := time.Now(); time.Since(t0) < 10*time.Second; time.Sleep(5 * time.Millisecond) {
		if len(holders(t, c, name)) == 0 {
			return
		}
	}
	t.Fatalf("%s is still held", name)
}

// ownerProcess starts a process to own locks; kill ends it (and reaps it).
func ownerProcess(t *testing.T) (pid int, kill func()) {
	t.Helper()
	c := exec.Command("sleep", "300")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	kill = func() {
		if c.ProcessState == nil {
			c.Process.Kill()
			c.Wait()
		}
	}
	t.Cleanup(kill)
	return c.Process.Pid, kill
}

func wantBusy(t *testing.T, err error, subs ...string) {
	t.Helper()
	var re *virtlockd.RemoteError
	if !errors.As(err, &re) || re.Code != virtlockd.CodeResourceBusy || re.Domain != virtlockd.DomainLockspace {
		t.Fatalf("got %v, want RESOURCE_BUSY (87) in domain LOCKSPACE (51)", err)
	}
	for _, s := range subs {
		if !strings.Contains(re.Error(), s) {
			t.Fatalf("busy message %q does not name %q", re.Error(), s)
		}
	}
}

func TestLibvirtDomainIsAnOwnerPinnedByPid(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	ac := e.api()
	disk := filepath.Join(e.dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	pid, kill := ownerProcess(t)
	ctx := context.Background()

	c := e.register("dom-a", 1, pid)
	if err := c.AcquireResource(ctx, "", disk, 0); err != nil {
		t.Fatal(err)
	}
	hs := holders(t, ac, disk)
	if len(hs) != 1 || hs[0].Name != "dom-a" || hs[0].PID != pid || hs[0].UUID != "11000000-0000-0000-0000-000000000001" {
		t.Fatalf("holders of %s = %+v, want dom-a with pid %d", disk, hs, pid)
	}
	// The owner is the daemon's: pinned, and recorded for a crash.
	e.d.mu.Lock()
	ow := e.d.owners[hs[0].UUID]
	e.d.mu.Unlock()
	if ow == nil || ow.proc.pid != pid || ow.uid != os.Geteuid() {
		t.Fatalf("daemon owner record = %+v, want pid %d uid %d", ow, pid, os.Geteuid())
	}

	other := e.register("dom-b", 2, sleeper(t))
	wantBusy(t, other.AcquireResource(ctx, "", disk, 0), `"dom-a"`, "pid "+strconv.Itoa(pid))
	// The endpoint's calls are counted by procedure and result.
	m := e.d.cfg.Metrics
	for _, c := range []struct {
		proc, result string
		want         float64
	}{
		{"REGISTER", "ok", 2}, {"ACQUIRE_RESOURCE", "ok", 1}, {"ACQUIRE_RESOURCE", "busy", 1}, {"RELEASE_RESOURCE", "ok", 0},
	} {
		if got := testutil.ToFloat64(m.libvirt.WithLabelValues(c.proc, c.result)); got != c.want {
			t.Errorf("vmlock_libvirt_calls_total{%s,%s} = %v, want %v", c.proc, c.result, got, c.want)
		}
	}
	if got := testutil.ToFloat64(m.busy); got != 1 {
		t.Errorf("busy refusals = %v, want 1 (the libvirt one)", got)
	}
	if got := latencyCount(t, m, "libvirt.ACQUIRE_RESOURCE"); got != 2 {
		t.Errorf("vmlock_request_duration_seconds{method=libvirt.ACQUIRE_RESOURCE} counts %d calls, want 2", got)
	}

	// The connection's peer is not the owner: closing it releases nothing,
	// but the owner's exit does, through the daemon's pid tracking.
	c.Close()
	time.Sleep(50 * time.Millisecond)
	if len(holders(t, ac, disk)) != 1 {
		t.Fatal("closing a connection whose peer is not the owner released the lock")
	}
	kill()
	waitUnheld(t, ac, disk)
	if err := other.AcquireResource(ctx, "", disk, 0); err != nil {
		t.Fatalf("acquire after the owner exited: %v", err)
	}
}

func TestLibvirtLocksAndLockspacesSurviveARestart(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	ctx := context.Background()
	lsDir := filepath.Join(e.dir, "leases")
	pid, kill := ownerProcess(t)
	c := e.register("dom-a", 1, pid)
	if err := c.CreateLockspace(ctx, lsDir); err != nil {
		t.Fatal(err)
	}
	lease := strings.Repeat("ab", 32)
	if err := c.AcquireResource(ctx, lsDir, lease, virtlockd.AcquireAutoCreate); err != nil {
		t.Fatal(err)
	}
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}

	e.start(nil)
	ac := e.api()
	if got := e.d.lv.srv.Lockspaces(); len(got) != 2 || got[1] != lsDir {
		t.Fatalf("lockspaces after restart = %q, want the default and %s", got, lsDir)
	}
	if hs := holders(t, ac, lease); len(hs) != 1 || hs[0].PID != pid || hs[0].Name != "dom-a" {
		t.Fatalf("holders after restart = %+v, want dom-a (pid %d)", hs, pid)
	}
	other := e.register("dom-b", 2, sleeper(t))
	wantBusy(t, other.AcquireResource(ctx, lsDir, lease, virtlockd.AcquireAutoCreate), `"dom-a"`)
	// QEMU's connection died with the old daemon: only pid tracking frees it.
	kill()
	waitUnheld(t, ac, lease)
	if err := other.AcquireResource(ctx, lsDir, lease, virtlockd.AcquireAutoCreate); err != nil {
		t.Fatalf("acquire after the owner exited: %v", err)
	}
}

// Lease files that the endpoint auto-created before a restart of vmlockd
// go with their last holder after it, however that goes: its QEMU exited
// while vmlockd was down, libvirt releases the lease, or its QEMU exits
// after the restart (which only the daemon's pid tracking sees: QEMU's
// connection died with the old daemon).
func TestLibvirtLeaseFilesGoWithTheirLastHolderAfterARestart(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	ctx := context.Background()
	lsDir := filepath.Join(e.dir, "leases")
	type dom struct {
		name  string
		pid   int
		kill  func()
		lease string
	}
	var doms []*dom
	for i, name := range []string{"dom-gone", "dom-releases", "dom-exits"} {
		pid, kill := ownerProcess(t)
		d := &dom{name: name, pid: pid, kill: kill, lease: strings.Repeat(fmt.Sprintf("%02x", i+1), 32)}
		doms = append(doms, d)
		c := e.register(name, byte(i+1), pid)
		if err := c.CreateLockspace(ctx, lsDir); err != nil {
			t.Fatal(err)
		}
		if err := c.AcquireResource(ctx, lsDir, d.lease, virtlockd.AcquireAutoCreate); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(lsDir, d.lease)); err != nil {
			t.Fatalf("auto-created lease file: %v", err)
		}
	}
	gone, releases, exits := doms[0], doms[1], doms[2]
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	gone.kill()

	e.start(nil)
	wantNoFile := func(d *dom) {
		t.Helper()
		for t0 := time.Now(); time.Since(t0) < 10*time.Second; time.Sleep(5 * time.Millisecond) {
			if _, err := os.Stat(filepath.Join(lsDir, d.lease)); errors.Is(err, os.ErrNotExist) {
				return
			}
		}
		t.Fatalf("the lease file of %s is still there after its last holder went", d.name)
	}
	wantNoFile(gone)
	if _, err := os.Stat(filepath.Join(lsDir, exits.lease)); err != nil {
		t.Fatalf("a held lease file was removed: %v", err)
	}
	c := e.register(releases.name, 2, releases.pid)
	if err := c.ReleaseResource(ctx, lsDir, releases.lease, 0); err != nil {
		t.Fatal(err)
	}
	wantNoFile(releases)
	exits.kill()
	wantNoFile(exits)
	// The record of a lease file goes after the file (it is how a restart
	// finds a file left to remove), so it may still be on its way out.
	var ents []os.DirEntry
	var err error
	for t0 := time.Now(); time.Since(t0) < 10*time.Second; time.Sleep(5 * time.Millisecond) {
		if ents, err = os.ReadDir(filepath.Join(e.state, LibvirtGrantsDir)); err != nil || len(ents) == 0 {
			break
		}
	}
	if err != nil || len(ents) != 0 {
		t.Fatalf("grant records left: %v %v", ents, err)
	}
}

func TestLibvirtSocketIsKeptAcrossAReload(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	e.d.Reload()
	if err := <-e.done; !errors.Is(err, ErrReload) {
		t.Fatalf("Run = %v, want ErrReload", err)
	}
	f := e.d.InheritedLibvirtListener()
	if f == nil {
		t.Fatal("no libvirt listener kept for the reload")
	}
	e.d.lockF.Close()
	if lf, _, err := e.d.InheritedFiles(); err == nil {
		lf.Close()
	}
	e.d = nil
	// A client that connects between the two images waits in the backlog.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := virtlockd.Dial(ctx, e.lvSock)
	if err != nil {
		t.Fatalf("dial during the reload: %v", err)
	}
	defer c.Close()
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	e.start(l.(*net.UnixListener))
	if err := c.CreateLockspace(ctx, filepath.Join(e.dir, "ls")); err != nil {
		t.Fatalf("call queued across the reload: %v", err)
	}
}

func TestLibvirtRefusesALiveSocket(t *testing.T) {
	e := newLVEnv(t)
	ln, err := net.Listen("unix", e.lvSock) // a running virtlockd
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	drv := lockmgr.NopDriver{}
	_, err = New(context.Background(), Config{
		Socket: e.socket, StateDir: e.state, Driver: drv, HolderCommand: e.startHolder,
		Logger: slog.New(slog.DiscardHandler), Libvirt: &LibvirtConfig{Socket: e.lvSock},
	}, nil)
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("New with a live libvirt socket = %v, want an in-use error", err)
	}
	// The failed start released the state directory.
	f, err := LockStateDir(e.state)
	if err != nil {
		t.Fatalf("state directory still locked after a failed start: %v", err)
	}
	f.Close()
}

// ofdFree reports whether an OFD write lock on byte 0 of path can be taken
// now, as by any other program (the lockspace driver's lock conflicts with
// it whichever process holds that): it takes the lock and lets it go.
func ofdFree(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Start: 0, Len: 1}
	err = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES) {
		t.Fatal(err)
	}
	return err == nil
}

// libvirt releases a disk by the path it acquired it by. A domain that
// acquired its disk through a symlink can still release it by that path
// after a restart of vmlockd and a retargeting of the link: the image it
// locked is freed (on disk too), the link's new target is left alone.
func TestLibvirtReleaseByASymlinkRetargetedAfterARestart(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	ctx := context.Background()
	oldImg, newImg := filepath.Join(e.dir, "old.img"), filepath.Join(e.dir, "new.img")
	for _, p := range []string{oldImg, newImg} {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(e.dir, "disk.img")
	if err := os.Symlink(oldImg, link); err != nil {
		t.Fatal(err)
	}
	pid, _ := ownerProcess(t)
	if err := e.register("dom-a", 1, pid).AcquireResource(ctx, "", link, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}

	e.start(nil)
	if err := os.Symlink(newImg, link+".new"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(link+".new", link); err != nil {
		t.Fatal(err)
	}
	if err := e.register("dom-a", 1, pid).ReleaseResource(ctx, "", link, 0); err != nil {
		t.Fatalf("release by the path acquired by, after the restart: %v", err)
	}
	ac := e.api()
	if hs := holders(t, ac, oldImg); len(hs) != 0 {
		t.Fatalf("the image dom-a acquired is still held by %+v", hs)
	}
	if !ofdFree(t, oldImg) {
		t.Fatal("the image dom-a acquired is still locked on disk")
	}
	other := e.register("dom-b", 2, sleeper(t))
	if err := other.AcquireResource(ctx, "", newImg, 0); err != nil {
		t.Fatalf("the link's new target: %v", err)
	}
	if ents, err := os.ReadDir(filepath.Join(e.state, LibvirtGrantsDir)); err != nil || len(ents) != 0 {
		t.Fatalf("grant records left: %v %v", ents, err)
	}
}

// The locks of domains whose QEMU exited while vmlockd was down are free
// once the restarted vmlockd serves again, on disk too, and nothing is left
// of them in the grant store (a disk acquired through a symlink has a
// record there).
func TestLibvirtDomainsThatExitedWhileVmlockdWasDownAreReleasedAtItsStart(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	ctx := context.Background()
	img, linked := filepath.Join(e.dir, "a.img"), filepath.Join(e.dir, "b.img")
	for _, p := range []string{img, linked} {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(e.dir, "b-link.img")
	if err := os.Symlink(linked, link); err != nil {
		t.Fatal(err)
	}
	pidA, killA := ownerProcess(t)
	if err := e.register("dom-a", 1, pidA).AcquireResource(ctx, "", img, 0); err != nil {
		t.Fatal(err)
	}
	pidB, killB := ownerProcess(t)
	if err := e.register("dom-b", 2, pidB).AcquireResource(ctx, "", link, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	killA()
	killB()

	e.start(nil)
	ac := e.api()
	for _, p := range []string{img, linked} {
		if hs := holders(t, ac, p); len(hs) != 0 {
			t.Fatalf("%s is still held by %+v", p, hs)
		}
		if !ofdFree(t, p) {
			t.Fatalf("%s is still locked on disk", p)
		}
	}
	if ents, err := os.ReadDir(filepath.Join(e.state, LibvirtGrantsDir)); (err != nil && !errors.Is(err, os.ErrNotExist)) || len(ents) != 0 {
		t.Fatalf("grant records left: %v %v", ents, err)
	}
}

// A restored domain whose QEMU exits after the restarted vmlockd took its
// locks back but before the libvirt endpoint was up loses, with its locks,
// what the endpoint recorded of its grants: the lease file that goes with
// its last holder and the grant records in the state directory. The lease
// and the disk it acquired through a symlink are free.
func TestLibvirtDomainThatExitsBeforeTheEndpointIsUpLeavesNoGrantRecords(t *testing.T) {
	e := newLVEnv(t)
	e.start(nil)
	ctx := context.Background()
	lsDir := filepath.Join(e.dir, "leases")
	img, link := filepath.Join(e.dir, "a.img"), filepath.Join(e.dir, "a-link.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(img, link); err != nil {
		t.Fatal(err)
	}
	pid, kill := ownerProcess(t)
	c := e.register("dom-a", 1, pid)
	if err := c.CreateLockspace(ctx, lsDir); err != nil {
		t.Fatal(err)
	}
	lease := strings.Repeat("ab", 32)
	if err := c.AcquireResource(ctx, lsDir, lease, virtlockd.AcquireAutoCreate); err != nil {
		t.Fatal(err)
	}
	if err := c.AcquireResource(ctx, "", link, 0); err != nil {
		t.Fatal(err)
	}
	grants := filepath.Join(e.state, LibvirtGrantsDir)
	if ents, err := os.ReadDir(grants); err != nil || len(ents) != 2 {
		t.Fatalf("grant records before the restart: %v %v, want the lease's and the link's", ents, err)
	}
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}

	// QEMU exits once the endpoint has loaded its records, and the daemon
	// has released its locks before the endpoint is published.
	const uuid = "11000000-0000-0000-0000-000000000001"
	exited := make(chan struct{})
	var once sync.Once
	e.libvirt = func(lc *LibvirtConfig) {
		lc.created = func() {
			kill()
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Error("the daemon did not handle the exit of dom-a's QEMU")
			}
		}
		lc.forgotten = func(u string) {
			if u == uuid {
				once.Do(func() { close(exited) })
			}
		}
	}
	e.start(nil)
	if _, err := os.Stat(filepath.Join(lsDir, lease)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the auto-created lease file of the exited domain: %v, want it removed", err)
	}
	if ents, err := os.ReadDir(grants); err != nil || len(ents) != 0 {
		t.Errorf("grant records left: %v %v", ents, err)
	}
	if !ofdFree(t, img) {
		t.Error("the disk of the exited domain is still locked on disk")
	}
	other := e.register("dom-b", 2, sleeper(t))
	if err := other.AcquireResource(ctx, lsDir, lease, virtlockd.AcquireAutoCreate); err != nil {
		t.Errorf("acquiring the exited domain's lease: %v", err)
	}
	if err := other.AcquireResource(ctx, "", link, 0); err != nil {
		t.Errorf("acquiring the exited domain's disk: %v", err)
	}
}

// latencyCount returns how many calls the latency histogram of method holds.
func latencyCount(t *testing.T, m *Metrics, method string) uint64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "vmlock_request_duration_seconds" {
			continue
		}
		for _, s := range mf.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetName() == "method" && l.GetValue() == method {
					return s.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return 0
}
