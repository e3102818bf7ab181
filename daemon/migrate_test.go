package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/etcdlock"
	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// The destination reads a handover state: the marker names it, every
// resource listed exclusive is taken shared pending an upgrade, and the
// state handed to the Manager no longer has the marker.
func TestHandoverStateOnTheDestination(t *testing.T) {
	d := &Daemon{cfg: Config{Host: "dst"}}
	st := lockmgr.State{
		{Resource: lockmgr.DiskResource("/img/a", lockmgr.Exclusive), Token: 7},
		{Resource: lockmgr.DiskResource("/img/b", lockmgr.Shared), Token: 9},
		{Resource: lockmgr.DiskResource("/img/c", lockmgr.ReadOnly)},
	}
	plain := st.String()
	rs, out, mig, err := d.handoverIn(nil, plain)
	if err != nil || mig != nil || out != plain || rs != nil {
		t.Fatalf("a plain state: %v %q %+v %v, want it unchanged", rs, out, mig, err)
	}

	marked := append(st, lockmgr.StateEntry{Resource: lockmgr.Resource{Type: migrationType, Name: "dst", Mode: lockmgr.ReadOnly}})
	rs, out, mig, err = d.handoverIn(nil, marked.String())
	if err != nil {
		t.Fatal(err)
	}
	if out != plain || strings.Contains(out, string(migrationType)) {
		t.Fatalf("state for the Manager %q, want %q", out, plain)
	}
	want := []lockmgr.Mode{lockmgr.Shared, lockmgr.Shared, lockmgr.ReadOnly}
	if len(rs) != 3 {
		t.Fatalf("resources from the state: %v", rs)
	}
	for i, r := range rs {
		if r.Mode != want[i] {
			t.Fatalf("resource %s taken %v, want %v", r, r.Mode, want[i])
		}
	}
	if mig == nil || mig.Role != roleTarget || len(mig.Pending) != 1 || mig.Pending[0].Name != "/img/a" || mig.Pending[0].Mode != lockmgr.Exclusive {
		t.Fatalf("mark %+v, want a target with /img/a pending exclusive", mig)
	}

	// Resources given by the caller decide the modes; those the state does
	// not list are taken as asked.
	rs, _, mig, err = d.handoverIn([]lockmgr.Resource{lockmgr.DiskResource("/img/a", lockmgr.Exclusive), lockmgr.DiskResource("/img/new", lockmgr.Exclusive)}, marked.String())
	if err != nil || rs[0].Mode != lockmgr.Shared || rs[1].Mode != lockmgr.Exclusive || len(mig.Pending) != 1 {
		t.Fatalf("given resources: %v %+v %v", rs, mig, err)
	}

	other := append(st, lockmgr.StateEntry{Resource: lockmgr.Resource{Type: migrationType, Name: "elsewhere", Mode: lockmgr.ReadOnly}})
	if _, _, _, err := d.handoverIn(nil, other.String()); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), `"elsewhere"`) {
		t.Fatalf("a state for another host: %v, want invalid argument naming it", err)
	}
}

func TestRestoredMigrationMarks(t *testing.T) {
	nothingPending := &migration{Role: roleTarget}
	if restoredMigration(nothingPending) != nothingPending {
		t.Fatal("a target's mark with nothing pending was dropped")
	}
	pending := &migration{Role: roleTarget, Pending: []lockmgr.Resource{lockmgr.DiskResource("/a", lockmgr.Exclusive)}}
	src := &migration{Role: roleSource, Peer: "dst"}
	if restoredMigration(pending) != pending || restoredMigration(src) != src || restoredMigration(nil) != nil {
		t.Fatal("an unfinished handover's mark was dropped")
	}
}

// migrationHosts starts two daemons, "src" and "dst", whose lockspace
// drivers share an indirect disk lease directory: two hosts sharing an NFS
// lockspace.
func migrationHosts(t *testing.T) (src, dst *api.Client, disk string) {
	shared := t.TempDir()
	start := func(host string) *api.Client {
		state := filepath.Join(t.TempDir(), "state")
		drv, err := lockspace.New(lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces"), DiskLeaseDir: filepath.Join(shared, "disks")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { drv.Close() })
		c, _ := startInProcess(t, Config{Driver: drv, Host: host})
		return c
	}
	return start("src"), start("dst"), filepath.Join(shared, "vm.img")
}

// tokenIn returns the token a state string gives disk.
func tokenIn(t *testing.T, state, disk string) uint64 {
	t.Helper()
	st, err := lockmgr.ParseState(state)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range st {
		if e.Resource.Name == disk {
			return e.Token
		}
	}
	t.Fatalf("state %q does not list %s", state, disk)
	return 0
}

// A cancelled handover can be tried again: the source takes its disk back
// with a token above the one the destination was granted meanwhile, so the
// next handover state is current and the destination's acquire succeeds.
func TestMigrationCanBeRetriedAfterACancel(t *testing.T) {
	ctx := context.Background()
	src, dst, disk := migrationHosts(t)
	const u = "44444444-0000-4000-8000-000000000001"
	rs := []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}
	if _, err := src.Acquire(ctx, lockmgr.Object{UUID: u, Name: "vm", PID: sleeper(t)}, rs, ""); err != nil {
		t.Fatal(err)
	}
	dstVM := lockmgr.Object{UUID: u, Name: "vm", PID: sleeper(t)}
	for round := range 2 {
		state, err := src.MigratePrepare(ctx, u, "dst")
		if err != nil {
			t.Fatalf("round %d: prepare: %v", round, err)
		}
		got, err := dst.Acquire(ctx, dstVM, nil, state)
		if err != nil {
			t.Fatalf("round %d: destination acquire with the handover state: %v", round, err)
		}
		joined := tokenIn(t, got, disk)
		if r, err := dst.MigrateComplete(ctx, u, true); err != nil || !r.Released {
			t.Fatalf("round %d: cancel on the destination: %+v, %v", round, r, err)
		}
		r, err := src.MigrateComplete(ctx, u, true)
		if err != nil || r.Released {
			t.Fatalf("round %d: cancel on the source: %+v, %v", round, r, err)
		}
		if tok := tokenIn(t, r.State, disk); tok <= joined {
			t.Fatalf("round %d: the source holds the disk again with token %d, not above the destination's %d", round, tok, joined)
		}
	}
}

// failingDowngrades is a lockspace driver whose downgrades fail after the
// first: a `migrate prepare` that fails half-way.
type failingDowngrades struct {
	*lockspace.Driver
	n atomic.Int32
}

func (f *failingDowngrades) Convert(ctx context.Context, l lockmgr.Lease, m lockmgr.Mode) (lockmgr.Lease, error) {
	if m == lockmgr.Shared && f.n.Add(1) > 1 {
		return nil, lockmgr.Errorf(lockmgr.CodeInternal, "injected failure")
	}
	return f.Driver.Convert(ctx, l, m)
}

// The lock-holder record keeps no migration mark the object no longer
// has: not after a `migrate prepare` that failed and was rolled back, and
// not after the source kept the object by a cancel. A daemon restarted
// from the record must not take the object for one being migrated away,
// whose `migrate complete` would release a running VM's locks.
func TestNoStaleMigrationMarkAfterRestart(t *testing.T) {
	ctx := context.Background()
	for _, how := range []string{"failed prepare", "cancel"} {
		t.Run(how, func(t *testing.T) {
			r := newRestartable(t)
			if how == "failed prepare" {
				r.wrap = func(d *lockspace.Driver) lockmgr.Driver { return &failingDowngrades{Driver: d} }
			}
			c, stop := r.start(Config{Host: "src"})
			const u = "55555555-0000-4000-8000-000000000001"
			var rs []lockmgr.Resource
			for _, n := range []string{"a.img", "b.img"} {
				disk := filepath.Join(r.dir, n)
				os.WriteFile(disk, nil, 0o600)
				rs = append(rs, lockmgr.DiskResource(disk, lockmgr.Exclusive))
			}
			if _, err := c.Acquire(ctx, lockmgr.Object{UUID: u, PID: sleeper(t)}, rs, ""); err != nil {
				t.Fatal(err)
			}
			_, err := c.MigratePrepare(ctx, u, "dst")
			if how == "failed prepare" {
				if err == nil {
					t.Fatal("prepare succeeded with a failing downgrade")
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if res, err := c.MigrateComplete(ctx, u, true); err != nil || res.Released {
					t.Fatalf("cancel on the source: %+v, %v; want the object kept", res, err)
				}
			}
			stop()
			c, _ = r.start(Config{Host: "src"})
			if res, err := c.MigrateComplete(ctx, u, false); !errors.Is(err, lockmgr.ErrNotRegistered) {
				t.Fatalf("migrate complete after the restart: %+v, %v; want not registered (no migration)", res, err)
			}
			locks, err := c.Locks(ctx)
			if err != nil || len(locks) != 2 {
				t.Fatalf("after the restart: locks %+v, %v; want both disks held", locks, err)
			}
			for _, l := range locks {
				if len(l.Holders) != 1 || l.Holders[0].Mode != lockmgr.Exclusive {
					t.Fatalf("lock %+v after the restart, want held exclusively", l)
				}
			}
		})
	}
}

// A handover state names one destination: a state with a second marker is
// refused, rather than taking that marker for a resource to lock.
func TestHandoverStateWithTwoMarkersRefused(t *testing.T) {
	d := &Daemon{cfg: Config{Host: "dst"}}
	st := lockmgr.State{
		{Resource: lockmgr.DiskResource("/img/a", lockmgr.Exclusive), Token: 7},
		{Resource: lockmgr.Resource{Type: migrationType, Name: "dst", Mode: lockmgr.ReadOnly}},
		{Resource: lockmgr.Resource{Type: migrationType, Name: "elsewhere", Mode: lockmgr.Exclusive}},
	}
	rs, _, _, err := d.handoverIn(nil, st.String())
	if !errors.Is(err, lockmgr.ErrInvalidArgument) {
		t.Fatalf("a state with two migration markers: resources %v, error %v; want invalid argument", rs, err)
	}
}

// upgradeCounter is an etcd driver that counts the upgrades asked of it
// and says when the first one was refused as busy.
type upgradeCounter struct {
	*etcdlock.Driver
	upgrades atomic.Int32
	busy     chan struct{} // closed at the first busy upgrade
	once     sync.Once
}

func (u *upgradeCounter) Convert(ctx context.Context, l lockmgr.Lease, m lockmgr.Mode) (lockmgr.Lease, error) {
	if m != lockmgr.Exclusive {
		return u.Driver.Convert(ctx, l, m)
	}
	u.upgrades.Add(1)
	nl, err := u.Driver.Convert(ctx, l, m)
	if errors.Is(err, lockmgr.ErrBusy) {
		u.once.Do(func() { close(u.busy) })
	}
	return nl, err
}

// etcdHandover starts two daemons, "src" and "dst", on one embedded etcd,
// and hands an object with one disk from src to dst up to the point where
// both hold it shared. It returns the clients, the destination's driver
// and the object's uuid.
func etcdHandover(t *testing.T, dstCfg Config) (src, dst *api.Client, dstDrv *upgradeCounter, uuid string) {
	ctx := context.Background()
	dir := t.TempDir()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cl, err := etcdtest.Start(cctx, etcdtest.Options{Dir: filepath.Join(dir, "etcd"), Members: 1, TickMs: 10, ElectionMs: 100, NoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	driver := func(host string) *etcdlock.Driver {
		drv, err := etcdlock.New(cctx, etcdlock.Config{Endpoints: cl.Endpoints(), Host: host, OpTimeout: 3 * time.Second, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { drv.Close() })
		return drv
	}
	src, _ = startInProcess(t, Config{Driver: driver("src"), Host: "src"})
	dstDrv = &upgradeCounter{Driver: driver("dst"), busy: make(chan struct{})}
	dstCfg.Driver, dstCfg.Host = dstDrv, "dst"
	dst, _ = startInProcess(t, dstCfg)

	uuid = "66666666-0000-4000-8000-000000000001"
	disk := filepath.Join(dir, "vm.img")
	os.WriteFile(disk, nil, 0o600)
	if _, err := src.Acquire(ctx, lockmgr.Object{UUID: uuid, Name: "vm", PID: sleeper(t)}, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
	state, err := src.MigratePrepare(ctx, uuid, "dst")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dst.Acquire(ctx, lockmgr.Object{UUID: uuid, Name: "vm", PID: sleeper(t)}, nil, state); err != nil {
		t.Fatal(err)
	}
	return src, dst, dstDrv, uuid
}

// `migrate complete` on the destination, started before the source has
// released, sleeps on an etcd watch until the source's hold is gone and
// then takes the disk exclusively: one refused upgrade, then one granted,
// however long the source takes.
func TestMigrateCompleteWakesWhenTheSourceReleases(t *testing.T) {
	ctx := context.Background()
	src, dst, drv, u := etcdHandover(t, Config{})
	done := make(chan error, 1)
	go func() {
		_, err := dst.MigrateComplete(ctx, u, false)
		done <- err
	}()
	<-drv.busy
	// The source takes its time: long enough for a poller to try again
	// several times (after 5, 10, 20, 40 ms, ...).
	time.Sleep(300 * time.Millisecond)
	if r, err := src.MigrateComplete(ctx, u, false); err != nil || !r.Released {
		t.Fatalf("complete on the source: %+v, %v", r, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("complete on the destination: %v", err)
	}
	if n := drv.upgrades.Load(); n != 2 {
		t.Fatalf("the destination tried %d upgrades, want 2: the refused one and, once the source released, the granted one", n)
	}
	locks, err := dst.Locks(ctx)
	if err != nil || len(locks) != 1 || len(locks[0].Holders) != 1 || locks[0].Holders[0].Mode != lockmgr.Exclusive {
		t.Fatalf("the destination's locks after completing: %+v, %v; want the disk held exclusively", locks, err)
	}
}

// `migrate complete` gives up when its request's time is up and names who
// still holds the disk; the handover stays pending and completes once the
// source has released.
func TestMigrateCompleteGivesUpWithItsRequest(t *testing.T) {
	ctx := context.Background()
	src, dst, _, u := etcdHandover(t, Config{RequestTimeout: 2 * time.Second})
	_, err := dst.MigrateComplete(ctx, u, false)
	var be *lockmgr.BusyError
	if !errors.As(err, &be) || be.Holder.Host != "src" {
		t.Fatalf("complete while the source holds the disk: %v; want busy, naming the source", err)
	}
	if r, err := src.MigrateComplete(ctx, u, false); err != nil || !r.Released {
		t.Fatalf("complete on the source: %+v, %v", r, err)
	}
	if r, err := dst.MigrateComplete(ctx, u, false); err != nil || r.Released {
		t.Fatalf("complete on the destination again: %+v, %v; want the object kept", r, err)
	}
}

// joinOnDowngrade is a lockspace driver whose second downgrade fails, and
// which lets another host (third) take the first downgraded disk shared
// just before: a `migrate prepare` that fails half-way and cannot take that
// disk back exclusively, since someone else now shares it.
type joinOnDowngrade struct {
	*lockspace.Driver
	t      *testing.T
	third  *lockspace.Driver
	mu     sync.Mutex
	n      int
	first  lockmgr.Resource
	joined []lockmgr.Lease // the third party's lease
}

func (j *joinOnDowngrade) Convert(ctx context.Context, l lockmgr.Lease, m lockmgr.Mode) (lockmgr.Lease, error) {
	if m == lockmgr.Shared {
		j.mu.Lock()
		defer j.mu.Unlock()
		j.n++
		switch j.n {
		case 1:
			j.first = l.Resource()
		case 2:
			r := j.first
			r.Mode = lockmgr.Shared
			ls, err := j.third.Acquire(ctx, []lockmgr.Request{{Resource: r, Holder: lockmgr.Holder{Name: "third", Host: "h3", Mode: lockmgr.Shared}}})
			if err != nil {
				j.t.Errorf("the third party's shared grant of %s: %v", r, err)
			}
			j.joined = ls
			return nil, lockmgr.Errorf(lockmgr.CodeInternal, "injected failure")
		}
	}
	return j.Driver.Convert(ctx, l, m)
}

// failedPrepare starts a daemon whose `migrate prepare` of an object with
// two disks fails at the second downgrade, after a third party joined the
// first disk shared; the third party then leaves. It returns the client,
// the object's uuid, the first disk and the prepare's error.
func failedPrepare(t *testing.T) (c *api.Client, uuid, first string, err error) {
	ctx := context.Background()
	dir := t.TempDir()
	shared := filepath.Join(dir, "disks")
	open := func(host string) *lockspace.Driver {
		state := filepath.Join(dir, host)
		drv, err := lockspace.New(lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces"), DiskLeaseDir: shared})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { drv.Close() })
		return drv
	}
	j := &joinOnDowngrade{Driver: open("src"), t: t, third: open("h3")}
	c, _ = startInProcess(t, Config{Driver: j, Host: "src"})
	uuid = "77777777-0000-4000-8000-000000000001"
	var rs []lockmgr.Resource
	for _, n := range []string{"a.img", "b.img"} {
		disk := filepath.Join(dir, n)
		os.WriteFile(disk, nil, 0o600)
		rs = append(rs, lockmgr.DiskResource(disk, lockmgr.Exclusive))
	}
	if _, err := c.Acquire(ctx, lockmgr.Object{UUID: uuid, Name: "vm", PID: sleeper(t)}, rs, ""); err != nil {
		t.Fatal(err)
	}
	_, err = c.MigratePrepare(ctx, uuid, "dst")
	if err == nil {
		t.Fatal("prepare succeeded with a failing downgrade")
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.third.Release(ctx, j.joined); err != nil {
		t.Fatal(err)
	}
	return c, uuid, j.first.Name, err
}

// A `migrate prepare` that fails and cannot take a disk back exclusively
// (a third party shared it meanwhile) says so, and `migrate complete
// --cancel` takes it back once the third party has gone: the VM holds all
// its disks exclusively again without a restart.
func TestAFailedPrepareThatCannotTakeADiskBackIsRepairedByCancel(t *testing.T) {
	ctx := context.Background()
	c, u, first, perr := failedPrepare(t)
	if r, err := c.MigrateComplete(ctx, u, true); err != nil || r.Released {
		t.Fatalf("migrate complete --cancel after the failed prepare: %+v, %v; want the object kept", r, err)
	}
	locks, err := c.Locks(ctx)
	if err != nil || len(locks) != 2 {
		t.Fatalf("locks %+v, %v; want both disks held", locks, err)
	}
	for _, l := range locks {
		if len(l.Holders) != 1 || l.Holders[0].Mode != lockmgr.Exclusive {
			t.Fatalf("lock %+v after the cancel, want held exclusively", l)
		}
	}
	if !strings.Contains(perr.Error(), first) || !strings.Contains(perr.Error(), "--cancel") {
		t.Fatalf("the failed prepare's error %q does not name %s as held shared, nor the way back", perr, first)
	}
}

// After a `migrate prepare` that failed and could not take a disk back
// exclusively, a new prepare hands that disk over as exclusive, so that
// the destination takes it back exclusively when the handover completes.
func TestAPrepareAfterOneThatCouldNotTakeADiskBackHandsItOverExclusive(t *testing.T) {
	ctx := context.Background()
	c, u, first, _ := failedPrepare(t)
	state, err := c.MigratePrepare(ctx, u, "dst")
	if err != nil {
		t.Fatalf("prepare again: %v", err)
	}
	st, err := lockmgr.ParseState(state)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range st {
		if e.Resource.Type != lockmgr.TypeDisk {
			continue
		}
		n++
		if e.Resource.Mode != lockmgr.Exclusive {
			t.Fatalf("the handover state %q lists %s %s, want every disk exclusive (%s was left shared by the failed prepare)", state, e.Resource.Name, e.Resource.Mode, first)
		}
	}
	if n != 2 {
		t.Fatalf("the handover state %q lists %d disks, want 2", state, n)
	}
}

// An upgrade of `migrate complete` that fails puts its disk back into the
// mark, and into the lock-holder's record too: here the record of the
// upgrade is not taken (the lock-holder stopped answering, and its
// replacement was given the mark without the disk while the upgrade was
// tried), the upgrade is undone, and vmlockd then stops. The restarted
// vmlockd still knows the disk is to be taken back: a cancel takes it
// back exclusively, instead of leaving it shared for good.
func TestAFailedUpgradeOfMigrateCompleteStaysPendingInTheRecord(t *testing.T) {
	rig := newHolderRig(t)
	drv, err := lockspace.New(rig.leaseCfg)
	if err != nil {
		t.Fatal(err)
	}
	// No Run: nothing but the calls below writes to the lock-holder, or
	// replaces it.
	d, err := New(context.Background(), Config{Driver: drv, Socket: filepath.Join(rig.dir, "s.sock"), StateDir: rig.state,
		Host: "src", Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), HolderCommand: rig.holders.start(rig.state),
		RequestTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(rig.dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	const u = "55555555-0000-4000-8000-0000000000aa"
	root := caller{}
	ctx := context.Background()
	if _, err := d.acquire(ctx, root, &vmlockpb.AcquireRequest{Object: api.ObjectToPB(lockmgr.Object{UUID: u, PID: sleeper(t)}),
		Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(disk, lockmgr.Exclusive))}}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.migratePrepare(ctx, root, u, "dst"); err != nil {
		t.Fatal(err)
	}

	// The lock-holder stops reading; writes to it fill its socket buffer
	// until one is given up: the next record is not taken.
	holder, _ := rig.holders.byPID(d.holderPID())
	if holder == nil {
		t.Fatal("the daemon's lock-holder is not one the test started")
	}
	holder.Process.Signal(syscall.SIGSTOP)
	t.Cleanup(func() { holder.Process.Signal(syscall.SIGKILL) })
	filler := make([]byte, 60<<10)
	for {
		fctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
		err := d.holder.Put(fctx, "filler", filler, nil)
		cancel()
		if err != nil {
			break
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	_, err = d.migrateComplete(cctx, root, u, true)
	cancel()
	if !errors.Is(err, lockmgr.ErrTimeout) {
		t.Fatalf("cancel whose record is not taken: %v, want a timeout", err)
	}
	if !rig.takeable(disk, lockmgr.Shared) {
		t.Fatal("the undone upgrade left the disk exclusive")
	}
	// vmlockd stops (its replacement lock-holder keeps the records).
	stopped, stop := context.WithCancel(ctx)
	stop()
	d.Run(stopped)
	d.lockF.Close()
	drv.Close()

	_, c, _ := rig.start()
	if _, err := c.MigrateComplete(ctx, u, true); err != nil {
		t.Fatalf("cancel after the restart: %v", err)
	}
	if rig.takeable(disk, lockmgr.Shared) {
		t.Fatal("after a cancel on the restarted vmlockd the disk is still held shared")
	}
}

// A prepare of an object that holds nothing exclusively (a shared disk, a
// read-only one) downgrades nothing, yet it marks the object as migrating
// away: the mark survives a restart of vmlockd like any other, so that the
// source's `migrate complete` still releases it afterwards.
func TestAPrepareThatDowngradesNothingKeepsItsMarkThroughARestart(t *testing.T) {
	ctx := context.Background()
	r := newRestartable(t)
	c, stop := r.start(Config{Host: "src"})
	const u = "55555555-0000-4000-8000-000000000002"
	var rs []lockmgr.Resource
	for n, m := range map[string]lockmgr.Mode{"shared.img": lockmgr.Shared, "ro.img": lockmgr.ReadOnly} {
		disk := filepath.Join(r.dir, n)
		os.WriteFile(disk, nil, 0o600)
		rs = append(rs, lockmgr.DiskResource(disk, m))
	}
	if _, err := c.Acquire(ctx, lockmgr.Object{UUID: u, PID: sleeper(t)}, rs, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := c.MigratePrepare(ctx, u, "dst"); err != nil {
		t.Fatal(err)
	}
	stop()
	c, _ = r.start(Config{Host: "src"})
	res, err := c.MigrateComplete(ctx, u, false)
	if err != nil || !res.Released {
		t.Fatalf("migrate complete on the source after the restart: %+v, %v; want the object released", res, err)
	}
	if locks, err := c.Locks(ctx); err != nil || len(locks) != 0 {
		t.Fatalf("after the source completed: locks %+v, %v; want none", locks, err)
	}
}

// A disk unplugged during a handover leaves it: hotplugged again (here
// shared), it is a new use that the handover does not cover, and a cancel
// (or complete, on the destination) leaves it in the mode it was asked
// for, whether vmlockd ran on or was restarted in between.
func TestADiskUnpluggedDuringAHandoverIsNotTakenBackByIt(t *testing.T) {
	ctx := context.Background()
	for _, restart := range []bool{false, true} {
		t.Run(fmt.Sprintf("restart=%v", restart), func(t *testing.T) {
			r := newRestartable(t)
			c, stop := r.start(Config{Host: "src"})
			const u = "55555555-0000-4000-8000-000000000003"
			again, kept := filepath.Join(r.dir, "again.img"), filepath.Join(r.dir, "kept.img")
			for _, p := range []string{again, kept} {
				os.WriteFile(p, nil, 0o600)
			}
			o := lockmgr.Object{UUID: u, PID: sleeper(t)}
			rs := []lockmgr.Resource{lockmgr.DiskResource(again, lockmgr.Exclusive), lockmgr.DiskResource(kept, lockmgr.Exclusive)}
			if _, err := c.Acquire(ctx, o, rs, ""); err != nil {
				t.Fatal(err)
			}
			if _, err := c.MigratePrepare(ctx, u, "dst"); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Release(ctx, u, lockmgr.DiskResource(again, lockmgr.Shared)); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Acquire(ctx, o, []lockmgr.Resource{lockmgr.DiskResource(again, lockmgr.Shared)}, ""); err != nil {
				t.Fatal(err)
			}
			if restart {
				stop()
				c, _ = r.start(Config{Host: "src"})
			}
			res, err := c.MigrateComplete(ctx, u, true)
			if err != nil {
				t.Fatal(err)
			}
			st, err := lockmgr.ParseState(res.State)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range st {
				want := map[string]lockmgr.Mode{again: lockmgr.Shared, kept: lockmgr.Exclusive}[e.Resource.Name]
				if e.Resource.Mode != want {
					t.Errorf("after the cancel %s is held %s, want %s", e.Resource.Name, e.Resource.Mode, want)
				}
			}
		})
	}
}

// markChecker is a lockspace driver that looks, before each downgrade, at
// the object's lock-holder record: what a vmlockd killed right after the
// downgrade would restart from.
type markChecker struct {
	*lockspace.Driver
	r       *restartable
	uuid    string
	checked []bool // per downgrade: the record had a source mark
}

func (m *markChecker) Convert(ctx context.Context, l lockmgr.Lease, mode lockmgr.Mode) (lockmgr.Lease, error) {
	if mode == lockmgr.Shared {
		entries, err := m.r.d.holder.List(ctx)
		if err != nil {
			return nil, err
		}
		marked := false
		for _, e := range entries {
			var rec objectRecord
			if strings.HasPrefix(e.Key, "O/"+m.uuid+"/") && json.Unmarshal(e.Meta, &rec) == nil {
				marked = marked || rec.Migration != nil && rec.Migration.Role == roleSource
			}
			e.Close()
		}
		m.checked = append(m.checked, marked)
	}
	return m.Driver.Convert(ctx, l, mode)
}

// A `migrate prepare` records its mark before it downgrades anything: a
// vmlockd killed after a downgrade and before its record restarts with
// the mark, so that a cancel takes the disk back exclusively (with the
// etcd driver a downgrade made in etcd is taken back as made: shared).
func TestAPrepareRecordsItsMarkBeforeTheFirstDowngrade(t *testing.T) {
	ctx := context.Background()
	r := newRestartable(t)
	const u = "55555555-0000-4000-8000-000000000002"
	mc := &markChecker{r: r, uuid: u}
	r.wrap = func(d *lockspace.Driver) lockmgr.Driver { mc.Driver = d; return mc }
	c, _ := r.start(Config{Host: "src"})
	disk := filepath.Join(r.dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	if _, err := c.Acquire(ctx, lockmgr.Object{UUID: u, PID: sleeper(t)}, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := c.MigratePrepare(ctx, u, "dst"); err != nil {
		t.Fatal(err)
	}
	if len(mc.checked) != 1 || !mc.checked[0] {
		t.Fatalf("downgrades %d, the record had the mark before each: %v; want one, with the mark", len(mc.checked), mc.checked)
	}
}

// A destination whose handover has nothing to take exclusively (the
// source held its disks shared or read-only) is still the target after a
// restart of its vmlockd: a cancel releases it, as it did before.
func TestATargetWithNothingPendingCanBeCancelledAfterARestart(t *testing.T) {
	ctx := context.Background()
	r := newRestartable(t)
	c, stop := r.start(Config{Host: "dst"})
	const u = "55555555-0000-4000-8000-000000000003"
	disk := filepath.Join(r.dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	st := lockmgr.State{
		{Resource: lockmgr.DiskResource(disk, lockmgr.ReadOnly)},
		{Resource: lockmgr.Resource{Type: migrationType, Name: "dst", Mode: lockmgr.ReadOnly}},
	}
	if _, err := c.Acquire(ctx, lockmgr.Object{UUID: u, PID: sleeper(t)}, nil, st.String()); err != nil {
		t.Fatal(err)
	}
	stop()
	c, _ = r.start(Config{Host: "dst"})
	res, err := c.MigrateComplete(ctx, u, true)
	if err != nil || !res.Released {
		t.Fatalf("cancel on the destination after its restart: %+v, %v; want it released", res, err)
	}
	if _, err := c.Inquire(ctx, u); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("after the cancel: %v, want not registered", err)
	}
}
