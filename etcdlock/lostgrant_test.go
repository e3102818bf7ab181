package etcdlock

import (
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/lockmgr"
)

// holderKeys lists the holder keys in etcd (every host's).
func holderKeys(t *testing.T, raw *clientv3.Client) []string {
	t.Helper()
	return keysUnder(t, raw, DefaultPrefix+"res/")
}

// keysUnder lists the keys in etcd that start with prefix.
func keysUnder(t *testing.T, raw *clientv3.Client, prefix string) []string {
	t.Helper()
	resp, err := raw.Get(ctxT(t, 5*time.Second), prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	return keys
}

// wantLostGrantError checks that err is the timeout of a grant whose
// answer was lost, not a fence.
func wantLostGrantError(t *testing.T, err error) {
	t.Helper()
	if lockmgr.CodeOf(err) != lockmgr.CodeTimeout || errors.Is(err, ErrFenced) {
		t.Fatalf("acquire with a lost answer: %v, want a timeout", err)
	}
}

// A grant that etcd applied but whose answer was lost fails and leaves
// nothing behind: the disks are free at once, for another host and for
// this one.
func TestAcquireWhoseAnswerIsLostAfterItAppliedLeavesNothing(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	raw := rawClient(t, c.Endpoints())
	ctx := ctxT(t, 20*time.Second)

	loseReplies(a, applyLost)
	_, err := a.Acquire(ctx, []lockmgr.Request{req("/img/lost-e", lockmgr.Exclusive, uuidA), req("/img/lost-s", lockmgr.Shared, uuidA)})
	wantLostGrantError(t, err)
	if keys := holderKeys(t, raw); len(keys) != 0 {
		t.Fatalf("after the failed grant etcd holds %v, want no holder key", keys)
	}
	lb := mustAcquire(t, b, req("/img/lost-e", lockmgr.Exclusive, uuidB), req("/img/lost-s", lockmgr.Exclusive, uuidB))
	mustRelease(t, b, lb...)
	la := mustAcquire(t, a, req("/img/lost-e", lockmgr.Exclusive, uuidA), req("/img/lost-s", lockmgr.Exclusive, uuidA))
	mustRelease(t, a, la...)
}

// A grant request still on its way to etcd when the driver gives up on
// its answer can never be applied after Acquire has failed.
func TestAcquireWithALateRequestNeverAppliesAfterFailing(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	raw := rawClient(t, c.Endpoints())
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/late-grant"

	k := loseReplies(a, late)
	_, err := a.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidA)})
	wantLostGrantError(t, err)
	close(k.release)
	k.wantLateRefused(t)
	if keys := holderKeys(t, raw); len(keys) != 0 {
		t.Fatalf("after the late grant request etcd holds %v, want no holder key", keys)
	}
	mustAcquire(t, b, req(disk, lockmgr.Exclusive, uuidB))
}

// When etcd cannot be reached to withdraw a grant whose answer was lost,
// the grant is withdrawn once etcd is back.
func TestAcquireLostWhileEtcdIsOutOfReachIsWithdrawnLater(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.OpTimeout = time.Second
	a := newDriver(t, cfg)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 30*time.Second)
	const disk = "/img/unreachable"

	k := loseReplies(a, applyLost)
	k.cut.Store(true)
	_, err := a.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidA)})
	wantLostGrantError(t, err)
	_, err = b.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, disk, "host-a", uuidA, lockmgr.Exclusive)
	k.cut.Store(false)
	if _, err := b.AcquireWait(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidB)}, nil); err != nil {
		t.Fatalf("host-b waiting for the withdrawn grant: %v", err)
	}
}

// Withdrawing a lost grant deletes only what that attempt wrote: a later
// grant of the same disk to the same host survives it.
func TestWithdrawingALostGrantKeepsALaterGrant(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.OpTimeout = time.Second
	a := newDriver(t, cfg)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 30*time.Second)
	const disk = "/img/regranted"

	k := loseReplies(a, dropped)
	k.cut.Store(true)
	_, err := a.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidA)})
	wantLostGrantError(t, err)
	a.mu.Lock()
	pending := len(a.voids)
	a.mu.Unlock()
	if pending != 1 {
		t.Fatalf("%d lost grants to withdraw later, want 1", pending)
	}
	k.cut.Store(false)
	la := mustAcquire(t, a, req(disk, lockmgr.Exclusive, uuidC))
	a.runSweep()
	a.mu.Lock()
	left := len(a.voids)
	a.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d lost grants still to withdraw after a cleanup with etcd in reach", left)
	}
	if !a.Holds(la[0]) {
		t.Fatal("the later grant is no longer held")
	}
	_, err = b.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, disk, "host-a", uuidC, lockmgr.Exclusive)
}

// A release whose request is lost fails, is done in the background all the
// same, and is not to be repeated by the caller (a second release is
// refused as not held).
func TestReleaseWhoseRequestIsLostIsDoneInTheBackground(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 30*time.Second)
	const disk = "/img/lost-release"

	la := mustAcquire(t, a, req(disk, lockmgr.Exclusive, uuidA))
	loseReplies(a, dropped)
	if err := a.Release(ctx, la); lockmgr.CodeOf(err) != lockmgr.CodeTimeout {
		t.Fatalf("release with a lost request: %v, want a timeout", err)
	}
	if err := a.Release(ctx, la); lockmgr.CodeOf(err) != lockmgr.CodeNotHeld {
		t.Fatalf("second release: %v, want not held", err)
	}
	if _, err := b.AcquireWait(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidB)}, nil); err != nil {
		t.Fatalf("host-b waiting for the release: %v", err)
	}
}
