package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// restartable runs daemons one after the other on one state directory,
// with a lock-holder that outlives each of them, as vmlockd's does.
type restartable struct {
	tb    testing.TB
	dir   string
	state string
	// wrap, if set, wraps the lockspace driver of the next start.
	wrap func(*lockspace.Driver) lockmgr.Driver
	// d is the daemon of the last start.
	d *Daemon
}

func newRestartable(tb testing.TB) *restartable {
	tb.Helper()
	dir := tb.TempDir()
	r := &restartable{tb: tb, dir: dir, state: filepath.Join(dir, "state")}
	os.MkdirAll(r.state, 0o700)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { lockholder.Serve(ctx, r.state); close(done) }()
	tb.Cleanup(func() { cancel(); <-done })
	return r
}

// start runs a daemon and returns a client of it and a function that stops
// it gracefully (its driver's descriptors closed, as by an exit).
func (r *restartable) start(cfg Config) (*api.Client, func()) {
	r.tb.Helper()
	drv, err := lockspace.New(lockspace.Config{StateDir: r.state, LeaseDir: filepath.Join(r.state, "lockspaces")})
	if err != nil {
		r.tb.Fatal(err)
	}
	cfg.Driver = drv
	if r.wrap != nil {
		cfg.Driver, r.wrap = r.wrap(drv), nil
	}
	cfg.Socket, cfg.StateDir = filepath.Join(r.dir, "s.sock"), r.state
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	cfg.HolderCommand = func() error { return nil }
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, cfg, nil)
	if err != nil {
		cancel()
		r.tb.Fatal(err)
	}
	r.d = d
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	c, err := api.Dial(context.Background(), cfg.Socket)
	if err != nil {
		r.tb.Fatal(err)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		c.Close()
		cancel()
		<-done
		d.lockF.Close()
		drv.Close()
	}
	r.tb.Cleanup(stop)
	return c, stop
}

// A Daemon whose Run has returned no longer watches its owners, as if its
// process had exited: an owner that exits afterwards must be released by
// the next daemon on the state directory, which took its locks back, never
// by this one (its late release could unlock what the next one holds).
func TestADaemonWhoseRunReturnedNoLongerWatchesOwners(t *testing.T) {
	r := newRestartable(t)
	c, stop := r.start(Config{})
	disk := filepath.Join(r.dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	if _, err := c.Acquire(context.Background(), lockmgr.Object{UUID: "77777777-0000-4000-8000-000000000009", PID: sleeper(t)},
		[]lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
	d := r.d
	stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.procs) != 1 {
		t.Fatalf("the daemon watched %d processes; want the owner", len(d.procs))
	}
	for pid, pr := range d.procs {
		select {
		case <-pr.p.done:
		default:
			t.Fatalf("after Run returned, the daemon still watches owner %d", pid)
		}
		if pr.p.dead {
			t.Fatalf("owner %d, still running, was taken for exited", pid)
		}
	}
}

// After a restart, a process that owns two objects is watched once, and
// revoking the locks of either object kills it and frees them all. (The
// order in which a restart takes objects back is random: several rounds.)
func TestRevokeAfterRestartOfAProcessOwningTwoObjects(t *testing.T) {
	for round := range 8 {
		victim := round % 2
		r := newRestartable(t)
		c, stop := r.start(Config{KillGrace: time.Second})
		pid := sleeper(t)
		ctx := context.Background()
		var disks []string
		for i, u := range []string{"77777777-0000-4000-8000-000000000001", "77777777-0000-4000-8000-000000000002"} {
			disk := filepath.Join(r.dir, string(rune('a'+i))+".img")
			os.WriteFile(disk, nil, 0o600)
			disks = append(disks, disk)
			if _, err := c.Acquire(ctx, lockmgr.Object{UUID: u, PID: pid}, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
				t.Fatal(err)
			}
		}
		stop()
		c, _ = r.start(Config{KillGrace: time.Second})
		if locks, err := c.Locks(ctx); err != nil || len(locks) != 2 {
			t.Fatalf("after the restart: locks %+v, %v; want both held", locks, err)
		}
		pids, err := c.Revoke(ctx, lockmgr.DiskResource(disks[victim], lockmgr.Exclusive), time.Second)
		if err != nil || len(pids) != 1 || pids[0] != pid {
			t.Fatalf("revoke %s after the restart: %v, %v; want pid %d killed", disks[victim], pids, err, pid)
		}
		// The revoked disk is free when Revoke answers; the process's other
		// object is released by its exit, which the daemon sees next.
		if locks, err := c.Locks(ctx); err != nil || slices.ContainsFunc(locks, func(l api.Lock) bool { return l.Resource.Name == disks[victim] }) {
			t.Fatalf("after the revocation: locks %+v, %v; want %s free", locks, err, disks[victim])
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
			locks, err := c.Locks(ctx)
			if err == nil && len(locks) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("10 s after the revocation: locks %+v, %v; want none", locks, err)
			}
		}
	}
}

// An object with many long read-only paths (recorded, never locked) keeps
// them through a restart: its lock-holder record is split into chunks that
// each fit the holder's limit, read-only resources included.
func TestManyLongReadOnlyPathsAreKeptThroughARestart(t *testing.T) {
	r := newRestartable(t)
	c, stop := r.start(Config{})
	dir := r.dir
	for len(dir) < 3800 {
		dir = filepath.Join(dir, strings.Repeat("d", 200))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var rs []lockmgr.Resource
	for i := range 40 {
		p := filepath.Join(dir, fmt.Sprintf("%0100d.iso", i))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		rs = append(rs, lockmgr.DiskResource(p, lockmgr.ReadOnly))
	}
	ctx := context.Background()
	o := lockmgr.Object{UUID: "77777777-0000-4000-8000-00000000000a", PID: sleeper(t)}
	if _, err := c.Acquire(ctx, o, rs, ""); err != nil {
		t.Fatalf("acquiring %d long read-only paths: %v", len(rs), err)
	}
	stop()
	c, _ = r.start(Config{})
	locks, err := c.Locks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range locks {
		if l.Resource.Mode == lockmgr.ReadOnly && len(l.Holders) == 1 && l.Holders[0].UUID == o.UUID {
			n++
		}
	}
	if n != len(rs) {
		t.Fatalf("after the restart %d of %d read-only paths are shown", n, len(rs))
	}
}

// A crash of vmlockd in the middle of rewriting an object's record of
// several chunks can leave a lease in two of them: the lower chunk it moved
// to (written) and the one it left (not rewritten yet). The restarted
// vmlockd takes it back once: its state lists it once, and one unplug
// frees it.
func TestALeaseThatACrashLeftInTwoChunksIsTakenBackOnce(t *testing.T) {
	ctx := context.Background()
	r := newRestartable(t)
	c, stop := r.start(Config{})
	const u = "77777777-0000-4000-8000-00000000000b"
	moved, kept := filepath.Join(r.dir, "moved.img"), filepath.Join(r.dir, "kept.img")
	for _, p := range []string{moved, kept} {
		os.WriteFile(p, nil, 0o600)
	}
	rs := []lockmgr.Resource{lockmgr.DiskResource(moved, lockmgr.Exclusive), lockmgr.DiskResource(kept, lockmgr.Exclusive)}
	if _, err := c.Acquire(ctx, lockmgr.Object{UUID: u, PID: sleeper(t)}, rs, ""); err != nil {
		t.Fatal(err)
	}
	stop()
	// What the crash left: chunk 1, from before, still lists the lease
	// that chunk 0 lists now.
	h, entries, err := lockholder.Open(ctx, r.state, func() error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Key != recordKey(u, 0) {
			continue
		}
		var rec objectRecord
		if err := json.Unmarshal(e.Meta, &rec); err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(rec.Leases, func(l leaseRecord) bool { return l.Resource.Name == moved })
		f := e.Files[rec.Leases[i].File]
		rec.Leases = []leaseRecord{rec.Leases[i]}
		rec.Leases[0].File = 0
		b, _ := json.Marshal(rec)
		if err := h.Put(ctx, recordKey(u, 1), b, []*os.File{f}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range entries {
		entries[i].Close()
	}
	h.Close()

	c, _ = r.start(Config{})
	st, err := c.Inquire(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(st, filepath.Base(moved)); n != 1 {
		t.Fatalf("after the restart the object's state %q lists %s %d times, want once", st, moved, n)
	}
	if _, err := c.Release(ctx, u, lockmgr.DiskResource(moved, lockmgr.Exclusive)); err != nil {
		t.Fatal(err)
	}
	if st, err := c.Inquire(ctx, u); err != nil || strings.Contains(st, filepath.Base(moved)) {
		t.Fatalf("after unplugging %s the object holds %q, %v", moved, st, err)
	}
	f, err := os.OpenFile(moved, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatalf("%s is still locked after its unplug: %v", moved, err)
	}
}
