package lockmgr_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// countingObserver counts the records it is asked to write and keeps the
// last one's leases.
type countingObserver struct {
	mu     sync.Mutex
	calls  int
	leases []lockmgr.Lease
}

func (c *countingObserver) Changed(_ context.Context, _ lockmgr.Object, ls []lockmgr.Lease, _ []lockmgr.Resource) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	c.leases = ls
	return nil
}

func (c *countingObserver) state() (calls int, leases []lockmgr.Lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls, c.leases
}

// images creates n empty image files next to img and returns them as
// exclusive disk resources.
func images(t *testing.T, img string, n int) []lockmgr.Resource {
	t.Helper()
	var rs []lockmgr.Resource
	for i := range n {
		p := filepath.Join(filepath.Dir(img), fmt.Sprintf("hot%02d.img", i))
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		rs = append(rs, lockmgr.DiskResource(p, lockmgr.Exclusive))
	}
	return rs
}

// A hotplug of a list is one grant: the observer (the daemon's lock-holder)
// is told once, of everything the object holds after it, and every disk of
// the list is locked.
func TestAHotplugOfAListIsOneRecord(t *testing.T) {
	obs := &countingObserver{}
	m, _, img := lockspaceManager(t, obs, lockmgr.Exclusive)
	before, _ := obs.state()
	rs := images(t, img, 20)
	if err := m.AcquireResource(context.Background(), vmUUID, rs...); err != nil {
		t.Fatal(err)
	}
	calls, leases := obs.state()
	if calls-before != 1 {
		t.Fatalf("a hotplug of %d disks wrote %d records, want 1", len(rs), calls-before)
	}
	if len(leases) != len(rs)+1 {
		t.Fatalf("the record lists %d leases, want %d", len(leases), len(rs)+1)
	}
	for _, r := range rs {
		if !locked(t, r.Name) {
			t.Fatalf("%s is not locked after the hotplug", r.Name)
		}
	}
}

// A hotplug whose driver grant fails part-way (a disk in the middle of the
// list is locked by another program) leaves the object exactly as before:
// no disk of the list is locked, the table and the record show what it
// held before, and the error names the disk that failed. The same list is
// granted once that disk is free.
func TestAHotplugThatFailsPartWayLeavesNothingOfTheList(t *testing.T) {
	obs := &countingObserver{}
	m, _, img := lockspaceManager(t, obs, lockmgr.Exclusive)
	callsBefore, _ := obs.state()
	stateBefore, _ := m.Inquire(vmUUID)
	rs := images(t, img, 20)
	busy := rs[10].Name
	fd, err := unix.Open(busy, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	l := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &l); err != nil {
		t.Fatal(err)
	}

	err = m.AcquireResource(context.Background(), vmUUID, rs...)
	var be *lockmgr.BusyError
	if !errors.As(err, &be) || be.Resource.Name != busy {
		t.Fatalf("hotplug with %s busy: %v, want a busy error naming it", busy, err)
	}
	for _, r := range rs {
		if r.Name != busy && locked(t, r.Name) {
			t.Fatalf("%s is still locked after the failed hotplug", r.Name)
		}
	}
	if st, _ := m.Inquire(vmUUID); st != stateBefore {
		t.Fatalf("after the failed hotplug the object holds %q, want %q", st, stateBefore)
	}
	if n := m.HeldCount(); n != 1 {
		t.Fatalf("the table lists %d held resources, want the 1 held before", n)
	}
	if calls, leases := obs.state(); calls != callsBefore && len(leases) != 1 {
		t.Fatalf("the record lists %d leases after the failed hotplug, want the 1 held before", len(leases))
	}

	unix.Close(fd) // the other program lets go
	if err := m.AcquireResource(context.Background(), vmUUID, rs...); err != nil {
		t.Fatalf("the same hotplug once the disk is free: %v", err)
	}
}

// A list that names one disk twice, or one the object already uses, is
// refused as a whole before anything is locked.
func TestAHotplugNamingADiskTwiceChangesNothing(t *testing.T) {
	obs := &countingObserver{}
	m, _, img := lockspaceManager(t, obs, lockmgr.Exclusive)
	callsBefore, _ := obs.state()
	rs := images(t, img, 3)
	for _, list := range [][]lockmgr.Resource{
		{rs[0], rs[1], rs[0]},
		{rs[0], lockmgr.DiskResource(img, lockmgr.Exclusive)},
	} {
		if err := m.AcquireResource(context.Background(), vmUUID, list...); !errors.Is(err, lockmgr.ErrInvalidArgument) {
			t.Fatalf("hotplug of %v: %v, want invalid argument", list, err)
		}
		for _, r := range rs {
			if locked(t, r.Name) {
				t.Fatalf("%s is locked after a refused hotplug", r.Name)
			}
		}
	}
	if calls, _ := obs.state(); calls != callsBefore {
		t.Fatalf("refused hotplugs wrote %d records", calls-callsBefore)
	}
	if err := m.AcquireResource(context.Background(), vmUUID, rs...); err != nil {
		t.Fatalf("the list without the repetition: %v", err)
	}
}

// An unplug of a list is one release: the observer is told once, and every
// disk of the list is unlocked; a list with a disk the object does not
// hold releases nothing and names that disk.
func TestAnUnplugOfAListIsOneRecord(t *testing.T) {
	obs := &countingObserver{}
	m, _, img := lockspaceManager(t, obs, lockmgr.Exclusive)
	rs := images(t, img, 20)
	ctx := context.Background()
	if err := m.AcquireResource(ctx, vmUUID, rs[:19]...); err != nil {
		t.Fatal(err)
	}
	before, _ := m.Inquire(vmUUID)
	if _, err := m.Unplug(ctx, vmUUID, rs...); !errors.Is(err, lockmgr.ErrNotHeld) || !strings.Contains(err.Error(), rs[19].Name) {
		t.Fatalf("unplug of a list with %s, not held: %v, want not held naming it", rs[19].Name, err)
	}
	if st, _ := m.Inquire(vmUUID); st != before {
		t.Fatalf("after the refused unplug the object holds %q, want %q", st, before)
	}
	calls, _ := obs.state()
	if _, err := m.Unplug(ctx, vmUUID, rs[:19]...); err != nil {
		t.Fatal(err)
	}
	after, leases := obs.state()
	if after-calls != 1 || len(leases) != 1 {
		t.Fatalf("an unplug of 19 disks wrote %d records, the last with %d leases; want 1 record with the 1 lease kept", after-calls, len(leases))
	}
	for _, r := range rs {
		if locked(t, r.Name) {
			t.Fatalf("%s is still locked after the unplug", r.Name)
		}
	}
	if !locked(t, img) {
		t.Fatal("the disk not named in the unplug was released")
	}
}
