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

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// holderEnv makes this test binary a lock-holder process (TestMain), as
// `vmlockd lock-holder` is.
const holderEnv = "VMLOCK_DAEMON_TEST_LOCKHOLDER"

func TestMain(m *testing.M) {
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

// A lock-holder that stops reading (SIGSTOP) does not hang vmlockd: the
// grant whose record it does not take fails at the call's deadline with a
// timeout naming the holder's pid, and is undone (the lock is free for
// others, the table does not list it); the stopped holder is killed and
// replaced, and later grants work and are kept by the new holder, as are
// the earlier ones.
func TestAGrantAStoppedLockHolderDoesNotTakeIsUndoneAndTheHolderReplaced(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	holders := &realHolders{}
	t.Cleanup(holders.killAll) // after the daemon has stopped
	leaseCfg := lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces")}
	drv, err := lockspace.New(leaseCfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, Config{Driver: drv, Socket: filepath.Join(dir, "s.sock"), StateDir: state,
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		HolderCommand:  holders.start(state),
		RequestTimeout: 2 * time.Second}, nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	ran := make(chan struct{})
	go func() { d.Run(ctx); close(ran) }()
	stopped := false
	stop := func() { // as an exit: the daemon's own lock descriptors close
		if !stopped {
			stopped = true
			cancel()
			<-ran
			d.lockF.Close()
			drv.Close()
		}
	}
	t.Cleanup(stop)
	c, err := api.Dial(context.Background(), filepath.Join(dir, "s.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// Another host's view of the same disks: a driver of its own.
	other, err := lockspace.New(leaseCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	takeable := func(disk string) bool {
		ls, err := other.Acquire(context.Background(), []lockmgr.Request{{Resource: lockmgr.DiskResource(disk, lockmgr.Exclusive)}})
		if err != nil {
			if !errors.Is(err, lockmgr.ErrBusy) {
				t.Fatal(err)
			}
			return false
		}
		other.Release(context.Background(), ls)
		return true
	}

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
