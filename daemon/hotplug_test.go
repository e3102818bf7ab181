package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// grantCounter is the lockspace driver, keeping the size of each grant
// and of each release it is asked for.
type grantCounter struct {
	*lockspace.Driver
	mu       sync.Mutex
	grants   []int
	releases []int
}

func (g *grantCounter) Release(ctx context.Context, ls []lockmgr.Lease) error {
	g.mu.Lock()
	g.releases = append(g.releases, len(ls))
	g.mu.Unlock()
	return g.Driver.Release(ctx, ls)
}

func (g *grantCounter) Acquire(ctx context.Context, reqs []lockmgr.Request) ([]lockmgr.Lease, error) {
	g.mu.Lock()
	g.grants = append(g.grants, len(reqs))
	g.mu.Unlock()
	return g.Driver.Acquire(ctx, reqs)
}

func (g *grantCounter) since(n int) []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]int(nil), g.grants[n:]...)
}

// longDisks creates n image files with paths of about 4,000 bytes.
func longDisks(t *testing.T, dir, prefix string, n int) []lockmgr.Resource {
	t.Helper()
	for len(dir) < 3800 {
		dir = filepath.Join(dir, strings.Repeat("d", 200))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var rs []lockmgr.Resource
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("%s%0100d.img", prefix, i))
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		rs = append(rs, lockmgr.DiskResource(p, lockmgr.Exclusive))
	}
	return rs
}

// A hotplug of a list to a running object is one grant: the driver is
// asked once for the whole list, not once per resource (each of which
// also rewrote the object's whole lock-holder record).
func TestAHotplugOfALongListIsOneGrant(t *testing.T) {
	r := newRestartable(t)
	g := &grantCounter{}
	r.wrap = func(d *lockspace.Driver) lockmgr.Driver { g.Driver = d; return g }
	c, _ := r.start(Config{})
	ctx := context.Background()
	o := lockmgr.Object{UUID: "99999999-0000-4000-8000-000000000001", Name: "a", PID: sleeper(t)}
	if _, err := c.Acquire(ctx, o, longDisks(t, r.dir, "first", 1), ""); err != nil {
		t.Fatal(err)
	}
	n := len(g.since(0))
	list := longDisks(t, r.dir, "hot", 40)
	if _, err := c.Acquire(ctx, o, list, ""); err != nil {
		t.Fatalf("hotplug of %d disks: %v", len(list), err)
	}
	if got := g.since(n); len(got) != 1 || got[0] != len(list) {
		t.Fatalf("a hotplug of %d disks asked the driver for grants of %v, want one of %d", len(list), got, len(list))
	}
	for _, d := range list {
		if ofdFree(t, d.Name) {
			t.Fatalf("%s...%s is not locked after the hotplug", d.Name[:30], d.Name[len(d.Name)-20:])
		}
	}
}

// A hotplug of a long list with one disk busy (held by another VM) takes
// nothing of the list: the error names the busy disk and its holder, no
// disk of the list is locked, and the object is as before, in the lock
// table and in its lock-holder record (which a restart restores).
func TestAHotplugWithOneBusyDiskTakesNothingOfTheList(t *testing.T) {
	r := newRestartable(t)
	c, stop := r.start(Config{})
	ctx := context.Background()
	a := lockmgr.Object{UUID: "99999999-0000-4000-8000-000000000002", Name: "a", PID: sleeper(t)}
	before, err := c.Acquire(ctx, a, longDisks(t, r.dir, "first", 2), "")
	if err != nil {
		t.Fatal(err)
	}
	list := longDisks(t, r.dir, "hot", 40)
	busy := list[25]
	b := lockmgr.Object{UUID: "99999999-0000-4000-8000-000000000003", Name: "b", PID: sleeper(t)}
	if _, err := c.Acquire(ctx, b, []lockmgr.Resource{busy}, ""); err != nil {
		t.Fatal(err)
	}

	_, err = c.Acquire(ctx, a, list, "")
	var be *lockmgr.BusyError
	if !errors.As(err, &be) || be.Resource.Name != busy.Name || be.Holder.Name != "b" {
		t.Fatalf("hotplug with one disk busy: %v, want a busy error naming it and vm b", err)
	}
	for _, d := range list {
		if d != busy && !ofdFree(t, d.Name) {
			t.Fatalf("%s...%s is locked after the failed hotplug", d.Name[:30], d.Name[len(d.Name)-20:])
		}
	}
	if st, err := c.Inquire(ctx, a.UUID); err != nil || st != before {
		t.Fatalf("after the failed hotplug a holds %q (%v), want %q", st, err, before)
	}
	stop()
	c, _ = r.start(Config{})
	if st, err := c.Inquire(ctx, a.UUID); err != nil || st != before {
		t.Fatalf("after a restart a holds %q (%v), want %q", st, err, before)
	}
}

// An unplug of a list is one release: the driver is asked once for the
// whole list, not once per resource (each of which also rewrote the
// object's whole lock-holder record), and every disk of it is free after.
func TestAnUnplugOfALongListIsOneRelease(t *testing.T) {
	r := newRestartable(t)
	g := &grantCounter{}
	r.wrap = func(d *lockspace.Driver) lockmgr.Driver { g.Driver = d; return g }
	c, _ := r.start(Config{})
	ctx := context.Background()
	o := lockmgr.Object{UUID: "99999999-0000-4000-8000-000000000004", Name: "a", PID: sleeper(t)}
	kept := longDisks(t, r.dir, "kept", 1)
	list := longDisks(t, r.dir, "hot", 40)
	if _, err := c.Acquire(ctx, o, append(kept, list...), ""); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	n := len(g.releases)
	g.mu.Unlock()
	if _, err := c.Release(ctx, o.UUID, list...); err != nil {
		t.Fatalf("unplug of %d disks: %v", len(list), err)
	}
	g.mu.Lock()
	got := append([]int(nil), g.releases[n:]...)
	g.mu.Unlock()
	if len(got) != 1 || got[0] != len(list) {
		t.Fatalf("an unplug of %d disks asked the driver for releases of %v, want one of %d", len(list), got, len(list))
	}
	for _, d := range list {
		if !ofdFree(t, d.Name) {
			t.Fatalf("%s...%s is still locked after the unplug", d.Name[:30], d.Name[len(d.Name)-20:])
		}
	}
	if ofdFree(t, kept[0].Name) {
		t.Fatal("the disk not named in the unplug was released")
	}
}
