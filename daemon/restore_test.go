package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

// gauge is the value of the daemon's gauge name.
func gauge(t *testing.T, m *Metrics, name string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no %s metric", name)
	return 0
}

// keptMetric is the daemon's vmlock_kept_objects gauge.
func keptMetric(t *testing.T, m *Metrics) float64 {
	t.Helper()
	return gauge(t, m, "vmlock_kept_objects")
}

// unadoptedMetric is the daemon's vmlock_unadopted_leases gauge.
func unadoptedMetric(t *testing.T, m *Metrics) float64 {
	t.Helper()
	return gauge(t, m, "vmlock_unadopted_leases")
}

// holderKeys are the keys the daemon's lock-holder keeps now.
func holderKeys(t *testing.T, d *Daemon) []string {
	t.Helper()
	d.recordMu.RLock()
	entries, err := d.holder.List(context.Background())
	d.recordMu.RUnlock()
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for i := range entries {
		keys = append(keys, entries[i].Key)
		entries[i].Close()
	}
	return keys
}

// rewriteRecord changes the lock-holder's record under key (vmlockd
// stopped), keeping its descriptors.
func rewriteRecord(t *testing.T, state, key string, change func(map[string]any)) {
	t.Helper()
	ctx := context.Background()
	h, entries, err := lockholder.Open(ctx, state, func() error { return errors.New("no lock-holder serves the state directory") })
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	found := false
	for i := range entries {
		e := &entries[i]
		if e.Key == key {
			found = true
			var rec map[string]any
			if err := json.Unmarshal(e.Meta, &rec); err != nil {
				t.Fatal(err)
			}
			change(rec)
			b, _ := json.Marshal(rec)
			// Our copies of the descriptors hold the locks meanwhile.
			if err := h.PutOwned(ctx, key, b, e.Owner, e.Files); err != nil {
				t.Fatal(err)
			}
		}
		e.Close()
	}
	if !found {
		t.Fatalf("the lock-holder keeps no record %s", key)
	}
}

// acquireOne registers o holding disk exclusively.
func acquireOne(t *testing.T, c *api.Client, o lockmgr.Object, disk string) {
	t.Helper()
	if _, err := c.Acquire(context.Background(), o, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
}

// mustBeBusyFor checks that another object's acquire of disk is refused as
// busy, naming holder.
func mustBeBusyFor(t *testing.T, c *api.Client, disk string, holder lockmgr.Object) {
	t.Helper()
	other := lockmgr.Object{UUID: "88888888-0000-4000-8000-0000000000ff", PID: sleeper(t)}
	_, err := c.Acquire(context.Background(), other, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, "")
	if !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("another object's acquire of %s = %v, want busy", disk, err)
	}
	for _, want := range []string{holder.UUID, fmt.Sprintf("pid %d", holder.PID)} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("the busy error %q does not name the holder (%s)", err, want)
		}
	}
}

func newImage(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// A lock-holder record that vmlockd cannot read (here chunk 0 of an
// object whose owner runs, with a migration role a newer vmlockd might
// write) is left in the lock-holder as it is, at every start: the disk it
// locks stays locked for every other process, another object's acquire of
// it is busy naming its holder, the error log names the record, the object
// and its pid, and a metric counts it. The other objects are taken back.
func TestARecordVmlockdCannotReadKeepsItsLocksAndTheOthersAreTakenBack(t *testing.T) {
	rig := newHolderRig(t)
	_, c, stop := rig.start()
	kept := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000001", Name: "web1", PID: sleeper(t)}
	good := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000002", Name: "web2", PID: sleeper(t)}
	keptDisk, goodDisk := newImage(t, rig.dir, "kept.img"), newImage(t, rig.dir, "good.img")
	acquireOne(t, c, kept, keptDisk)
	acquireOne(t, c, good, goodDisk)
	stop()
	rewriteRecord(t, rig.state, recordKey(kept.UUID, 0), func(rec map[string]any) {
		rec["migration"] = map[string]any{"role": "relay", "peer": "h2"}
	})

	for start := range 2 {
		var logs syncbuf.Buffer
		m := NewMetrics()
		d, c, stop := rig.startWith(Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m})
		if !rig.lockedForOthers(keptDisk) || rig.takeable(keptDisk, lockmgr.Shared) {
			t.Fatalf("start %d: the disk of the unreadable record is free", start)
		}
		mustBeBusyFor(t, c, keptDisk, kept)
		if st, err := c.Inquire(context.Background(), good.UUID); err != nil || !strings.Contains(st, filepath.Base(goodDisk)) {
			t.Fatalf("start %d: the readable object holds %q, %v; want %s", start, st, err, goodDisk)
		}
		if rig.takeable(goodDisk, lockmgr.Shared) {
			t.Fatalf("start %d: the readable object's disk is free", start)
		}
		locks, err := c.Locks(context.Background())
		if err != nil || len(locks) != 1 || locks[0].Resource.Name != goodDisk {
			t.Fatalf("start %d: the lock table lists %+v, %v; want %s only", start, locks, err, goodDisk)
		}
		l := logs.String()
		for _, want := range []string{"level=ERROR", recordKey(kept.UUID, 0), "uuid=" + kept.UUID, fmt.Sprintf("pid=%d", kept.PID), `migration role \"relay\"`} {
			if !strings.Contains(l, want) {
				t.Fatalf("start %d: the log does not say %q:\n%s", start, want, l)
			}
		}
		if n := keptMetric(t, m); n != 1 {
			t.Fatalf("start %d: vmlock_kept_objects = %v, want 1", start, n)
		}
		if keys := holderKeys(t, d); !slices.Contains(keys, recordKey(kept.UUID, 0)) {
			t.Fatalf("start %d: the lock-holder no longer keeps the unreadable record: %v", start, keys)
		}
		stop()
	}
}

// An owner whose liveness vmlockd cannot tell at its start (pidfd_open
// fails with EMFILE, every try) keeps its locks: they stay held by the
// lock-holder, the object is not released (nor taken back), and the log
// says why. Once the owner has exited, the next start releases them.
func TestAnOwnerWhoseLivenessCannotBeToldKeepsItsLocks(t *testing.T) {
	rig := newHolderRig(t)
	_, c, stop := rig.start()
	cmd := sleeperCmd(t)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000003", PID: cmd.Process.Pid}
	disk := newImage(t, rig.dir, "a.img")
	acquireOne(t, c, o, disk)
	stop()

	var tries atomic.Int32
	failing := func(pid int, start uint64) (*process, error) {
		tries.Add(1)
		return nil, fmt.Errorf("pidfd_open(%d): %w", pid, unix.EMFILE)
	}
	var logs syncbuf.Buffer
	m := NewMetrics()
	d, c, stop := rig.startWith(Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m, openProcess: failing})
	if !rig.lockedForOthers(disk) {
		t.Fatal("the disk of an owner whose liveness is unknown was freed")
	}
	mustBeBusyFor(t, c, disk, o)
	if tries.Load() < 2 {
		t.Fatalf("pinning the owner was tried %d times, want it retried", tries.Load())
	}
	if _, err := c.Inquire(context.Background(), o.UUID); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("inquire of the kept object = %v, want not registered (vmlockd does not watch it)", err)
	}
	for _, want := range []string{"uuid=" + o.UUID, fmt.Sprintf("pid=%d", o.PID), "cannot tell whether its owner still runs", "too many open files"} {
		if !strings.Contains(logs.String(), want) {
			t.Fatalf("the log does not say %q:\n%s", want, logs.String())
		}
	}
	if n := keptMetric(t, m); n != 1 {
		t.Fatalf("vmlock_kept_objects = %v, want 1", n)
	}
	if keys := holderKeys(t, d); !slices.Contains(keys, recordKey(o.UUID, 0)) {
		t.Fatalf("the lock-holder no longer keeps the object's record: %v", keys)
	}
	wantUntracked(t, c, api.Untracked{UUID: o.UUID, PID: o.PID, Keys: []string{recordKey(o.UUID, 0)},
		Resources: []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}}, "cannot tell whether its owner still runs")
	stop()

	cmd.Process.Kill()
	cmd.Wait()
	_, c, _ = rig.start()
	if rig.lockedForOthers(disk) {
		t.Fatal("the disk of an owner that exited is still locked after the next start")
	}
	if mon, err := c.Monitor(context.Background()); err != nil || len(mon.Locks) != 0 || len(mon.Untracked) != 0 {
		t.Fatalf("after the owner exited the lock monitor shows %+v and %+v, %v", mon.Locks, mon.Untracked, err)
	}
}

// A failure to pin an owner at start that passes (EAGAIN once) is retried:
// the object is taken back as usual.
func TestATransientFailureToPinAnOwnerIsRetried(t *testing.T) {
	rig := newHolderRig(t)
	_, c, stop := rig.start()
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000004", PID: sleeper(t)}
	disk := newImage(t, rig.dir, "a.img")
	acquireOne(t, c, o, disk)
	stop()

	var failed atomic.Bool
	once := func(pid int, start uint64) (*process, error) {
		if !failed.Swap(true) {
			return nil, fmt.Errorf("pidfd_open(%d): %w", pid, unix.EAGAIN)
		}
		return openProcess(pid, start)
	}
	m := NewMetrics()
	_, c, _ = rig.startWith(Config{Metrics: m, openProcess: once})
	if st, err := c.Inquire(context.Background(), o.UUID); err != nil || !strings.Contains(st, filepath.Base(disk)) {
		t.Fatalf("after a passing failure the object holds %q, %v; want %s", st, err, disk)
	}
	if n := keptMetric(t, m); n != 0 {
		t.Fatalf("vmlock_kept_objects = %v, want 0", n)
	}
}

// An object whose records vmlockd kept cannot be registered again (its
// first record would replace the kept one, freeing its locks under a VM
// that may run): busy, naming the kept record. Killing the lock-holder
// while vmlockd runs is how an operator frees them once the VM is known to
// be gone: vmlockd replaces it with every lock of its table, the kept
// record's locks are free, and the object can be registered again.
func TestAKeptObjectCannotBeRegisteredAgainUntilTheLockHolderIsReplaced(t *testing.T) {
	rig := newHolderRig(t)
	_, c, stop := rig.start()
	kept := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000005", PID: sleeper(t)}
	good := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000006", PID: sleeper(t)}
	keptDisk, goodDisk, newDisk := newImage(t, rig.dir, "kept.img"), newImage(t, rig.dir, "good.img"), newImage(t, rig.dir, "new.img")
	acquireOne(t, c, kept, keptDisk)
	acquireOne(t, c, good, goodDisk)
	stop()
	rewriteRecord(t, rig.state, recordKey(kept.UUID, 0), func(rec map[string]any) { rec["uid"] = -7 })

	m := NewMetrics()
	d, c, _ := rig.startWith(Config{Metrics: m})
	_, err := c.Acquire(context.Background(), kept, []lockmgr.Resource{lockmgr.DiskResource(newDisk, lockmgr.Exclusive)}, "")
	if !errors.Is(err, lockmgr.ErrBusy) || !strings.Contains(err.Error(), recordKey(kept.UUID, 0)) {
		t.Fatalf("registering the kept object again = %v, want busy naming its record", err)
	}
	if !rig.lockedForOthers(keptDisk) || !rig.takeable(newDisk, lockmgr.Exclusive) {
		t.Fatal("the refused registration changed what is locked")
	}

	rig.replaceHolder(d)
	if rig.lockedForOthers(keptDisk) {
		t.Fatal("the kept record's disk is still locked after the lock-holder was replaced")
	}
	if n := keptMetric(t, m); n != 0 {
		t.Fatalf("vmlock_kept_objects = %v after the lock-holder was replaced, want 0", n)
	}
	acquireOne(t, c, kept, newDisk)
	if keys := holderKeys(t, d); !slices.Contains(keys, recordKey(good.UUID, 0)) {
		t.Fatalf("the new lock-holder does not keep the restored object's record: %v", keys)
	}
	if rig.takeable(goodDisk, lockmgr.Shared) {
		t.Fatal("the restored object's disk was freed with the lock-holder")
	}
}

// sleeperCmd is sleeper's process, for a test that ends it itself.
func sleeperCmd(t *testing.T) *exec.Cmd {
	t.Helper()
	c := exec.Command("sleep", "300")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c
}

// A process whose start time cannot be read (/proc unreadable) is not
// taken for gone while its pidfd says it runs; one that exited is.
func TestAnOwnerWhoseStartTimeCannotBeReadIsGoneOnlyIfItExited(t *testing.T) {
	unreadable := func(int) (uint64, error) { return 0, &os.PathError{Op: "open", Path: "/proc/N/stat", Err: unix.EACCES} }
	pin := func(pid int) *os.File {
		fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		return os.NewFile(uintptr(fd), "pidfd")
	}
	live := sleeperCmd(t).Process.Pid
	if _, err := pinned(pin(live), live, 1, unreadable); err == nil || errors.Is(err, errGone) || !errors.Is(err, unix.EACCES) {
		t.Fatalf("pinning a running process whose start time cannot be read = %v, want the read's error", err)
	}
	cmd := sleeperCmd(t)
	f := pin(cmd.Process.Pid)
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := pinned(f, cmd.Process.Pid, 1, unreadable); !errors.Is(err, errGone) {
		t.Fatalf("pinning an exited process whose start time cannot be read = %v, want gone", err)
	}
}

// A lease that cannot be taken back at a start (its image was moved away
// while vmlockd was down and another file put at its path, so the path no
// longer names the file the lock is on) from an owner that still runs keeps its lock: through the
// object's next record write (which used to drop the descriptor), through
// the next start, until the owner exits. The error log and a metric say
// so; the object's other leases are taken back as usual.
func TestALeaseThatCannotBeTakenBackFromARunningOwnerStaysLockedUntilTheOwnerExits(t *testing.T) {
	rig := newHolderRig(t)
	_, c, stop := rig.start()
	cmd := sleeperCmd(t)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000009", Name: "web9", PID: cmd.Process.Pid}
	a, b := newImage(t, rig.dir, "a.img"), newImage(t, rig.dir, "b.img")
	if _, err := c.Acquire(context.Background(), o, []lockmgr.Resource{
		lockmgr.DiskResource(a, lockmgr.Exclusive), lockmgr.DiskResource(b, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
	stop()
	moved := filepath.Join(rig.dir, "a-moved.img")
	if err := os.Rename(a, moved); err != nil {
		t.Fatal(err)
	}
	newImage(t, rig.dir, "a.img") // another file at the path

	var logs syncbuf.Buffer
	m := NewMetrics()
	d, c, stop := rig.startWith(Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), Metrics: m})
	for _, want := range []string{"stays locked until its owner exits", "uuid=" + o.UUID, a, "no longer the one at"} {
		if !strings.Contains(logs.String(), want) {
			t.Fatalf("the log does not say %q:\n%s", want, logs.String())
		}
	}
	if n := unadoptedMetric(t, m); n != 1 {
		t.Fatalf("vmlock_unadopted_leases = %v, want 1", n)
	}
	if keys := holderKeys(t, d); !slices.Contains(keys, unadoptedKey(o.UUID, 0)) {
		t.Fatalf("the lock-holder keeps %v, want the entry %s too", keys, unadoptedKey(o.UUID, 0))
	}
	mustBeBusyFor(t, c, b, o) // taken back
	wantUntracked(t, c, api.Untracked{UUID: o.UUID, PID: o.PID, UntilOwnerExits: true,
		Resources: []lockmgr.Resource{lockmgr.DiskResource(a, lockmgr.Exclusive)}}, "no longer the one at")
	// A record write of the object (a disk more) leaves the lock alone.
	acquireOne(t, c, o, newImage(t, rig.dir, "c.img"))
	if !rig.lockedForOthers(moved) {
		t.Fatal("the image under the running owner was freed by the object's next record")
	}
	stop()

	// The next start finds the entry and keeps it; a lock-holder that
	// replaces a lost one gets it too, and keeps the lock once vmlockd
	// has stopped.
	m = NewMetrics()
	d, _, stop = rig.startWith(Config{Metrics: m})
	if n := unadoptedMetric(t, m); n != 1 {
		t.Fatalf("after another start vmlock_unadopted_leases = %v, want 1", n)
	}
	if !rig.lockedForOthers(moved) {
		t.Fatal("the image under the running owner was freed by another start")
	}
	rig.replaceHolder(d)
	if keys := holderKeys(t, d); !slices.Contains(keys, unadoptedKey(o.UUID, 0)) {
		t.Fatalf("the lock-holder that replaced the lost one keeps %v, want %s too", keys, unadoptedKey(o.UUID, 0))
	}
	stop()
	if !rig.lockedForOthers(moved) {
		t.Fatal("the image under the running owner was freed with the lost lock-holder")
	}

	m = NewMetrics()
	var last syncbuf.Buffer
	d, c, _ = rig.startWith(Config{Logger: slog.New(slog.NewTextHandler(&last, nil)), Metrics: m})

	cmd.Process.Kill()
	cmd.Wait()
	for deadline := time.Now().Add(10 * time.Second); rig.lockedForOthers(moved); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the image is still locked after its owner exited; the last start logged:\n%s", last.String())
		}
	}
	for _, k := range holderKeys(t, d) {
		if strings.HasPrefix(k, "O/"+o.UUID+"/") {
			t.Fatalf("the lock-holder still keeps %s of the gone owner", k)
		}
	}
	if n := unadoptedMetric(t, m); n != 0 {
		t.Fatalf("vmlock_unadopted_leases = %v after the owner exited, want 0", n)
	}
	if mon, err := c.Monitor(context.Background()); err != nil || len(mon.Untracked) != 0 {
		t.Fatalf("after the owner exited the lock monitor shows %+v as held, not managed (%v)", mon.Untracked, err)
	}
}

// wantUntracked checks that the lock monitor shows want (its Problem
// containing problem) as its one holding held but not managed.
func wantUntracked(t *testing.T, c *api.Client, want api.Untracked, problem string) {
	t.Helper()
	mon, err := c.Monitor(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(mon.Untracked) != 1 {
		t.Fatalf("the lock monitor shows %+v as held, not managed; want %+v", mon.Untracked, want)
	}
	got := mon.Untracked[0]
	if !strings.Contains(got.Problem, problem) {
		t.Fatalf("held, not managed: problem %q, want it to say %q", got.Problem, problem)
	}
	got.Problem = ""
	if got.UUID != want.UUID || got.PID != want.PID || got.UntilOwnerExits != want.UntilOwnerExits ||
		!slices.Equal(got.Resources, want.Resources) || !slices.Equal(got.Keys, want.Keys) {
		t.Fatalf("held, not managed: %+v, want %+v", got, want)
	}
}
