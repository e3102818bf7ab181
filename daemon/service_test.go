package daemon

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// An unplug that names one resource twice (here once through a symlink) is
// refused as a whole: nothing is released.
func TestReleaseOfAResourceNamedTwiceChangesNothing(t *testing.T) {
	c, dir := startInProcess(t)
	pid := sleeper(t)
	ctx := context.Background()
	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	os.WriteFile(a, nil, 0o600)
	os.WriteFile(b, nil, 0o600)
	link := filepath.Join(dir, "link.img")
	if err := os.Symlink(a, link); err != nil {
		t.Fatal(err)
	}
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000001", PID: pid}
	before, err := c.Acquire(ctx, o, []lockmgr.Resource{lockmgr.DiskResource(a, lockmgr.Exclusive), lockmgr.DiskResource(b, lockmgr.Exclusive)}, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, twice := range [][]lockmgr.Resource{
		{lockmgr.DiskResource(a, lockmgr.Exclusive), lockmgr.DiskResource(a, lockmgr.Exclusive)},
		{lockmgr.DiskResource(a, lockmgr.Exclusive), lockmgr.DiskResource(link, lockmgr.Exclusive)},
	} {
		if _, err := c.Release(ctx, o.UUID, twice...); !errors.Is(err, lockmgr.ErrInvalidArgument) {
			t.Fatalf("release of %v: %v, want invalid argument", twice, err)
		}
		if after, err := c.Inquire(ctx, o.UUID); err != nil || after != before {
			t.Fatalf("after the refused release: %q, %v; want %q", after, err, before)
		}
	}
}

// A kill command that hangs has the grace period, not a grace period of its
// own before the grace period: SIGKILL follows the grace period counted from
// the revocation, and the call's deadline (grace + request timeout) is
// enough for the holder to die.
func TestRevokeWithAHangingKillCommand(t *testing.T) {
	grace := 2 * time.Second
	c, dir := startInProcess(t, Config{KillCommand: []string{"sleep", "30"}, KillGrace: grace, RequestTimeout: time.Second})
	pid := sleeper(t)
	ctx := context.Background()
	disk := filepath.Join(dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	r := lockmgr.DiskResource(disk, lockmgr.Exclusive)
	if _, err := c.Acquire(ctx, lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000002", PID: pid}, []lockmgr.Resource{r}, ""); err != nil {
		t.Fatal(err)
	}
	if pids, err := c.Revoke(ctx, r, 0); err != nil || len(pids) != 1 || pids[0] != pid {
		t.Fatalf("revoke: %v, %v; want pid %d killed", pids, err, pid)
	}
	if locks, err := c.Locks(ctx); err != nil || len(locks) != 0 {
		t.Fatalf("after the revocation: %+v, %v; want nothing held", locks, err)
	}
}

// Holders that ignore SIGTERM are killed together, within one grace
// period: one after another, four would outlast the call's deadline
// (grace + request timeout).
func TestRevokeKillsEverySharerAtOnce(t *testing.T) {
	c, dir := startInProcess(t, Config{KillCommand: []string{"sleep", "30"}, KillGrace: 2 * time.Second, RequestTimeout: 3 * time.Second})
	ctx := context.Background()
	disk := filepath.Join(dir, "a.img")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r := lockmgr.DiskResource(disk, lockmgr.Shared)
	want := map[int]bool{}
	for i := range 4 {
		pid := sleeper(t)
		want[pid] = true
		o := lockmgr.Object{UUID: fmt.Sprintf("88888888-0000-4000-8000-00000000001%d", i), PID: pid}
		if _, err := c.Acquire(ctx, o, []lockmgr.Resource{r}, ""); err != nil {
			t.Fatal(err)
		}
	}
	pids, err := c.Revoke(ctx, r, 0)
	if err != nil {
		t.Fatalf("revoke: %v (killed %v)", err, pids)
	}
	for _, p := range pids {
		delete(want, p)
	}
	if len(pids) != 4 || len(want) != 0 {
		t.Fatalf("killed %v; want all four sharers", pids)
	}
	if locks, err := c.Locks(ctx); err != nil || len(locks) != 0 {
		t.Fatalf("after the revocation: %+v, %v; want nothing held", locks, err)
	}
}

// An object is in the lock table a moment before its owner is recorded.
// In that moment another uid may not release it (which would make the
// registering call fail); root may, and an unknown object is reported as
// not registered, not as forbidden.
func TestAnObjectWithoutItsOwnerYetIsNotAnybodys(t *testing.T) {
	d, _, _ := serveInProcess(t)
	pid := sleeper(t)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000002", PID: pid}
	if err := d.mgr.Register(o); err != nil { // as acquireNew does, before own
		t.Fatal(err)
	}
	s := &service{d: d}
	as := func(uid int) context.Context {
		return context.WithValue(context.Background(), callerKey{}, caller{uid: uid, pid: os.Getpid()})
	}
	if _, err := s.Release(as(4242), &vmlockpb.ReleaseRequest{Uuid: o.UUID}); !errors.Is(err, lockmgr.ErrPermission) {
		t.Fatalf("release by uid 4242 of an object without an owner yet: %v, want permission denied", err)
	}
	if _, err := d.mgr.Object(o.UUID); err != nil {
		t.Fatalf("the refused release changed the table: %v", err)
	}
	const unknown = "88888888-0000-4000-8000-000000000003"
	if _, err := s.Release(as(4242), &vmlockpb.ReleaseRequest{Uuid: unknown}); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("release by uid 4242 of an unknown object: %v, want not registered", err)
	}
	if _, err := s.Release(as(0), &vmlockpb.ReleaseRequest{Uuid: o.UUID}); err != nil {
		t.Fatalf("release by root: %v", err)
	}
	if _, err := d.mgr.Object(o.UUID); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("after root's release: %v, want not registered", err)
	}
}

// When an owner exits, only the objects it owned are released: an object
// released meanwhile and registered again by another process keeps its
// locks, and its owner record.
func TestExitReleasesOnlyWhatTheProcessOwned(t *testing.T) {
	d, sock, _ := serveInProcess(t)
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	disk := filepath.Join(filepath.Dir(sock), "a.img")
	os.WriteFile(disk, nil, 0o600)
	old, now := sleeper(t), sleeper(t)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000004", Name: "vm", PID: now}
	if _, err := c.Acquire(ctx, o, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, ""); err != nil {
		t.Fatal(err)
	}
	// The exit of the uuid's earlier owner, noticed late.
	p := &process{pid: old, done: make(chan struct{}), dead: true}
	close(p.done)
	d.onExit(&processRefs{p: p, uuids: map[string]bool{o.UUID: true}})
	if st, err := c.Inquire(ctx, o.UUID); err != nil || !strings.Contains(st, "exclusive") {
		t.Fatalf("after the late exit of the earlier owner: %q, %v; want the disk still held", st, err)
	}
	d.mu.Lock()
	ow := d.owners[o.UUID]
	d.mu.Unlock()
	if ow == nil || ow.obj.PID != now {
		t.Fatalf("owner record after the late exit: %+v, want pid %d's", ow, now)
	}
}

// A relative disk path is refused: vmlockd's working directory is not the
// client's, so it cannot know which file the client meant.
func TestRelativeDiskPathIsRefused(t *testing.T) {
	c, _ := startInProcess(t)
	pid := sleeper(t)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000002", PID: pid}
	_, err := c.Acquire(context.Background(), o, []lockmgr.Resource{lockmgr.DiskResource("disk.img", lockmgr.Exclusive)}, "")
	if !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "must be absolute") {
		t.Fatalf("acquire of a relative path: %v, want invalid argument saying it must be absolute", err)
	}
	if _, err := c.Inquire(context.Background(), o.UUID); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("the refused acquire registered the object: %v", err)
	}
}

// Release and revoke refuse a relative disk path as acquire does: vmlockd
// resolved it against its own working directory, so that a revoke of
// "a.img" killed the holder of the a.img that happened to be there.
func TestReleaseAndRevokeRefuseARelativeDiskPath(t *testing.T) {
	c, dir := startInProcess(t)
	t.Chdir(dir) // vmlockd's working directory, since it runs in this process
	pid := sleeper(t)
	ctx := context.Background()
	disk := filepath.Join(dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000003", PID: pid}
	before, err := c.Acquire(ctx, o, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, "")
	if err != nil {
		t.Fatal(err)
	}
	rel := lockmgr.DiskResource("a.img", lockmgr.Exclusive)
	if _, err := c.Revoke(ctx, rel, time.Second); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "must be absolute") {
		t.Fatalf("revoke of a relative path: %v, want invalid argument saying it must be absolute", err)
	}
	if _, err := c.Release(ctx, o.UUID, rel); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "must be absolute") {
		t.Fatalf("release of a relative path: %v, want invalid argument saying it must be absolute", err)
	}
	if after, err := c.Inquire(ctx, o.UUID); err != nil || after != before {
		t.Fatalf("after the refused calls: %q, %v; want %q", after, err, before)
	}
}

// A revocation's grace period is 0 (vmlockd's kill_grace) up to
// api.MaxGrace: a negative one, or one so long that it would overflow the
// deadlines it sets, is an invalid argument that kills nobody.
func TestRevokeRefusesAGraceOutOfRange(t *testing.T) {
	c, dir := startInProcess(t)
	pid := sleeper(t)
	ctx := context.Background()
	disk := filepath.Join(dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	o := lockmgr.Object{UUID: "88888888-0000-4000-8000-000000000004", PID: pid}
	r := lockmgr.DiskResource(disk, lockmgr.Exclusive)
	before, err := c.Acquire(ctx, o, []lockmgr.Resource{r}, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, grace := range []time.Duration{-time.Second, api.MaxGrace + time.Millisecond, time.Duration(math.MaxInt64)} {
		if _, err := c.Revoke(ctx, r, grace); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "grace") {
			t.Fatalf("revoke with grace %v: %v; want an invalid argument naming the grace", grace, err)
		}
	}
	if err := unix.Kill(pid, 0); err != nil {
		t.Fatalf("the holder is gone after refused revocations: %v", err)
	}
	if after, err := c.Inquire(ctx, o.UUID); err != nil || after != before {
		t.Fatalf("after the refused revocations: %q, %v; want %q", after, err, before)
	}
}
