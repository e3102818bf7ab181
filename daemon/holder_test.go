package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// holderEnv makes this test binary a lock-holder process (TestMain), as
// `vmlockd lock-holder` is.
const holderEnv = "VMLOCK_DAEMON_TEST_LOCKHOLDER"

// probeEnv makes this test binary an OFD lock probe of the file it names
// (TestMain): it exits 0 if a write lock on the file's first byte can be
// taken, probeLocked if not.
const (
	probeEnv    = "VMLOCK_DAEMON_TEST_PROBE"
	probeLocked = 10
)

func TestMain(m *testing.M) {
	if path := os.Getenv(probeEnv); path != "" {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		lk := unix.Flock_t{Type: unix.F_WRLCK, Len: 1}
		switch err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); {
		case err == nil:
			os.Exit(0)
		case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES):
			os.Exit(probeLocked)
		default:
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if dir := os.Getenv(holderEnv); dir != "" {
		if err := lockholder.Serve(context.Background(), dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// holderGuard bounds calls that must not hang; no timing assertion.
const holderGuard = 30 * time.Second

func withinGuard[T any](t *testing.T, what string, f func() T) T {
	t.Helper()
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	select {
	case v := <-ch:
		return v
	case <-time.After(holderGuard):
		t.Fatalf("%s has not returned after %s: it hangs", what, holderGuard)
		panic("unreachable")
	}
}

func (d *Daemon) holderPID() int {
	d.recordMu.RLock()
	defer d.recordMu.RUnlock()
	return d.holder.PID()
}

// realHolders starts lock-holder processes for a daemon, as vmlockd's
// HolderCommand does (a session of their own), and kills them when the
// test ends.
type realHolders struct {
	mu     sync.Mutex
	procs  []*exec.Cmd
	exited []chan struct{}
}

func (r *realHolders) start(state string) func() error {
	return func() error {
		cmd := lockholder.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), holderEnv+"="+state)
		if err := cmd.Start(); err != nil {
			return err
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		r.mu.Lock()
		r.procs, r.exited = append(r.procs, cmd), append(r.exited, done)
		r.mu.Unlock()
		return nil
	}
}

// byPID returns the started holder with pid, and its exit.
func (r *realHolders) byPID(pid int) (*exec.Cmd, chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, c := range r.procs {
		if c.Process.Pid == pid {
			return c, r.exited[i]
		}
	}
	return nil, nil
}

func (r *realHolders) killAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, c := range r.procs {
		c.Process.Signal(syscall.SIGKILL)
		<-r.exited[i]
	}
}

// holderRig runs daemons, one after the other, on one state directory
// with real lock-holder processes, and is another host's view of the same
// disks.
type holderRig struct {
	t        *testing.T
	dir      string
	state    string
	holders  *realHolders
	leaseCfg lockspace.Config
	other    *lockspace.Driver // another host's driver
}

func newHolderRig(t *testing.T) *holderRig {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	r := &holderRig{t: t, dir: dir, state: state, holders: &realHolders{},
		leaseCfg: lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces")}}
	t.Cleanup(r.holders.killAll) // after the daemons have stopped
	other, err := lockspace.New(r.leaseCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	r.other = other
	return r
}

// start runs a daemon whose calls time out after 2 s. stop stops it as an
// exit does: its own lock descriptors close, the lock-holder keeps the
// locks.
func (r *holderRig) start() (d *Daemon, c *api.Client, stop func()) {
	return r.startWith(Config{})
}

// startWith is start with cfg's Logger, Metrics and openProcess.
func (r *holderRig) startWith(cfg Config) (d *Daemon, c *api.Client, stop func()) {
	t := r.t
	drv, err := lockspace.New(r.leaseCfg)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err = New(ctx, Config{Driver: drv, Socket: filepath.Join(r.dir, "s.sock"), StateDir: r.state,
		Logger: cfg.Logger, Metrics: cfg.Metrics, openProcess: cfg.openProcess,
		HolderCommand:  r.holders.start(r.state),
		RequestTimeout: 2 * time.Second}, nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	ran := make(chan struct{})
	go func() { d.Run(ctx); close(ran) }()
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cancel()
			<-ran
			d.lockF.Close()
			// The lease files close too, as with the process: only the
			// lock-holder's copies keep the locks.
			for _, h := range d.mgr.Holdings() {
				for _, l := range h.Leases {
					if fl, ok := l.(lockmgr.FileLease); ok && fl.File() != nil {
						fl.File().Close()
					}
				}
			}
			drv.Close()
		}
	}
	t.Cleanup(stop)
	c, err = api.Dial(context.Background(), filepath.Join(r.dir, "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return d, c, stop
}

// replaceHolder kills d's lock-holder (SIGKILL), waits for its exit, and
// has d replace it, as d's once-a-second check does; the test fails unless
// another one took over.
func (r *holderRig) replaceHolder(d *Daemon) {
	r.t.Helper()
	pid := d.holderPID()
	holder, exited := r.holders.byPID(pid)
	if holder == nil {
		r.t.Fatalf("the daemon's lock-holder (pid %d) is not one it started", pid)
	}
	holder.Process.Signal(syscall.SIGKILL)
	<-exited
	d.ensureHolder()
	if d.holderPID() == pid {
		r.t.Fatal("the killed lock-holder was not replaced")
	}
}

// lockedForOthers reports whether another process (a probe started for
// it) finds path locked: what any program would see.
func (r *holderRig) lockedForOthers(path string) bool {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), probeEnv+"="+path)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return false
	case errors.As(err, &ee) && ee.ExitCode() == probeLocked:
		return true
	}
	r.t.Fatalf("probing %s: %v: %s", path, err, out)
	return false
}

// takeable reports whether another host could lock disk in mode m now.
func (r *holderRig) takeable(disk string, m lockmgr.Mode) bool {
	ls, err := r.other.Acquire(context.Background(), []lockmgr.Request{{Resource: lockmgr.DiskResource(disk, m)}})
	if err != nil {
		if !errors.Is(err, lockmgr.ErrBusy) {
			r.t.Fatal(err)
		}
		return false
	}
	r.other.Release(context.Background(), ls)
	return true
}

// A lock-holder that stops reading (SIGSTOP) does not hang vmlockd: the
// grant whose record it does not take fails at the call's deadline with a
// timeout naming the holder's pid, and is undone (the lock is free for
// others, the table does not list it); the stopped holder is killed and
// replaced, and later grants work and are kept by the new holder, as are
// the earlier ones.
func TestAGrantAStoppedLockHolderDoesNotTakeIsUndoneAndTheHolderReplaced(t *testing.T) {
	rig := newHolderRig(t)
	d, c, stop := rig.start()
	dir := rig.dir
	takeable := func(disk string) bool { return rig.takeable(disk, lockmgr.Exclusive) }
	holders := rig.holders

	owner := sleeper(t)
	holderPID := d.holderPID()
	holder, holderExited := holders.byPID(holderPID)
	if holder == nil {
		t.Fatalf("the daemon's lock-holder (pid %d) is not one it started", holderPID)
	}
	if err := holder.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// Before the daemon stops, should the test fail with it stopped.
	t.Cleanup(func() { holder.Process.Signal(syscall.SIGKILL) })
	// Grants until one finds the stopped holder's socket buffer full.
	disk := func(i int) string { return filepath.Join(dir, fmt.Sprintf("disk%d.img", i)) }
	object := func(i int) lockmgr.Object {
		return lockmgr.Object{UUID: fmt.Sprintf("44444444-0000-4000-8000-%012d", i), PID: owner}
	}
	acquire := func(i int) error {
		os.WriteFile(disk(i), nil, 0o600)
		return withinGuard(t, "an acquire with a stopped lock-holder", func() error {
			_, err := c.Acquire(context.Background(), object(i), []lockmgr.Resource{lockmgr.DiskResource(disk(i), lockmgr.Exclusive)}, "")
			return err
		})
	}
	failed := -1
	for i := range 10000 {
		if err := acquire(i); err != nil {
			if !errors.Is(err, lockmgr.ErrTimeout) {
				t.Fatalf("acquire %d with a stopped lock-holder = %v, want a timeout", i, err)
			}
			if want := fmt.Sprintf("lock-holder (pid %d) did not answer within the deadline", holderPID); !strings.Contains(err.Error(), want) {
				t.Fatalf("the timeout %q does not say %q", err, want)
			}
			failed = i
			break
		}
	}
	if failed < 1 {
		t.Fatalf("no grant failed (or the first did) with a stopped lock-holder: %d", failed)
	}

	// Undone: not in the table, free for others.
	if _, err := c.Inquire(context.Background(), object(failed).UUID); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("inquire of the object whose grant failed = %v, want not registered", err)
	}
	locks, err := c.Locks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range locks {
		if l.Resource.Name == disk(failed) {
			t.Fatalf("the lock table lists the undone grant: %+v", l)
		}
	}
	if !takeable(disk(failed)) {
		t.Fatal("the disk of the undone grant cannot be taken by another host")
	}
	if takeable(disk(0)) {
		t.Fatal("an earlier grant's disk could be taken by another host")
	}

	// The stopped holder was killed; a new one serves.
	select {
	case <-holderExited:
	case <-time.After(holderGuard):
		t.Fatal("the stopped lock-holder was not killed")
	}
	holder.Process.Signal(syscall.SIGCONT) // too late: it is gone
	if d.holderPID() == holderPID {
		t.Fatal("the daemon still uses the stopped lock-holder")
	}
	if err := acquire(failed); err != nil {
		t.Fatalf("acquire after the lock-holder was replaced: %v", err)
	}

	// The new holder keeps every grant across a stop of vmlockd: the
	// earlier ones and the later one.
	stop()
	for _, i := range []int{0, failed - 1, failed} {
		if takeable(disk(i)) {
			t.Fatalf("grant %d was not kept by the new lock-holder across a stop of vmlockd", i)
		}
	}
}

// A change of mode whose record a stopped lock-holder (SIGSTOP) does not
// take fails at the call's deadline with a timeout naming the holder's
// pid, and is undone: the table, the disk's lock and the record the new
// lock-holder keeps (what a restarted vmlockd takes back) all show the old
// mode.
func TestAChangeOfModeAStoppedLockHolderDoesNotTakeIsUndone(t *testing.T) {
	rig := newHolderRig(t)
	d, c, stop := rig.start()
	disk := filepath.Join(rig.dir, "base.img")
	os.WriteFile(disk, nil, 0o600)
	obj := lockmgr.Object{UUID: "55555555-0000-4000-8000-000000000001", PID: sleeper(t)}
	if _, err := c.Acquire(context.Background(), obj, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
	holderPID := d.holderPID()
	holder, holderExited := rig.holders.byPID(holderPID)
	if holder == nil {
		t.Fatalf("the daemon's lock-holder (pid %d) is not one it started", holderPID)
	}
	if err := holder.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Signal(syscall.SIGKILL) })

	// Downgrades and upgrades, as a block job's base image goes, until one
	// finds the stopped holder's socket buffer full.
	mode, failed := lockmgr.Exclusive, false
	for range 10000 {
		to := lockmgr.Shared
		if mode == lockmgr.Shared {
			to = lockmgr.Exclusive
		}
		err := withinGuard(t, "a change of mode with a stopped lock-holder", func() error {
			ctx, cancel := context.WithTimeout(context.Background(), d.cfg.RequestTimeout)
			defer cancel()
			return d.mgr.ChangeMode(ctx, obj.UUID, lockmgr.DiskResource(disk, to))
		})
		if err == nil {
			mode = to
			continue
		}
		if !errors.Is(err, lockmgr.ErrTimeout) {
			t.Fatalf("change to %s with a stopped lock-holder = %v, want a timeout", to, err)
		}
		for _, want := range []string{
			fmt.Sprintf("lock-holder (pid %d) did not answer within the deadline", holderPID),
			"held " + mode.Adverb() + " as before",
		} {
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("the timeout %q does not say %q", err, want)
			}
		}
		failed = true
		break
	}
	if !failed {
		t.Fatal("no change of mode failed with a stopped lock-holder")
	}

	// Undone: the table and the disk's lock are in the old mode.
	heldIn := func(c *api.Client) (lockmgr.Mode, bool) {
		locks, err := c.Locks(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range locks {
			for _, h := range l.Holders {
				if l.Resource.Name == disk && h.UUID == obj.UUID {
					return h.Mode, true
				}
			}
		}
		return 0, false
	}
	if m, ok := heldIn(c); !ok || m != mode {
		t.Fatalf("after the undone change the table shows %v (%v), want %v", m, ok, mode)
	}
	checkLock := func(when string) {
		t.Helper()
		if rig.takeable(disk, lockmgr.Exclusive) || rig.takeable(disk, lockmgr.Shared) != (mode == lockmgr.Shared) {
			t.Fatalf("%s another host can take the disk exclusively %v, shared %v; it is held %s",
				when, rig.takeable(disk, lockmgr.Exclusive), rig.takeable(disk, lockmgr.Shared), mode.Adverb())
		}
	}
	checkLock("after the undone change")
	select {
	case <-holderExited:
	case <-time.After(holderGuard):
		t.Fatal("the stopped lock-holder was not killed")
	}

	// The new holder's record is of the old mode: it keeps the lock
	// across a stop of vmlockd, and a new vmlockd takes it back so.
	stop()
	checkLock("with vmlockd stopped,")
	_, c2, _ := rig.start()
	if m, ok := heldIn(c2); !ok || m != mode {
		t.Fatalf("a restarted vmlockd shows the disk held %v (%v), want %v", m, ok, mode)
	}
	checkLock("after the restart")
}
