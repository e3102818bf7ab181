package etcdlock

import (
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/lockmgr"
)

// handoverSource makes host "host-a" hold disk shared for a handover (as
// migrate prepare leaves it) and returns the token its state string carries.
func handoverSource(t *testing.T, a *Driver, disk string) uint64 {
	t.Helper()
	ls := mustAcquire(t, a, req(disk, lockmgr.Exclusive, uuidA))
	if _, err := a.Convert(ctxT(t, 5*time.Second), ls[0], lockmgr.Shared); err != nil {
		t.Fatalf("downgrade for the handover: %v", err)
	}
	return ls[0].Token()
}

// stateReq is the destination's request for disk with the source's token.
func stateReq(disk, uuid string, tok uint64) lockmgr.Request {
	r := req(disk, lockmgr.Shared, uuid)
	r.Expect = tok
	return r
}

// tokenRevision returns the ModRevision of a disk's token key.
func tokenRevision(t *testing.T, raw *clientv3.Client, d *Driver, disk string) int64 {
	t.Helper()
	resp, err := raw.Get(ctxT(t, 5*time.Second), d.ks.token(lockmgr.DiskResource(disk, lockmgr.Shared).Key()))
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("token key of %s: %v (%d keys)", disk, err, len(resp.Kvs))
	}
	return resp.Kvs[0].ModRevision
}

// wantStale checks that err is a stale-state error.
func wantStale(t *testing.T, err error, what string) {
	t.Helper()
	if lockmgr.CodeOf(err) != lockmgr.CodeStaleState {
		t.Fatalf("%s: %v, want stale state", what, err)
	}
}

// A destination whose grant with the source's state was applied by etcd
// but whose answer was lost gets the disk when it asks again with the same
// state, however many answers were lost: each lost grant was withdrawn, so
// nobody took the disk, and the granted token is above every revision the
// lost grants left.
func TestAcquireWithStateRetriedAfterItsAnswerWasLostSucceeds(t *testing.T) {
	t.Parallel()
	for _, lost := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d lost", lost), func(t *testing.T) {
			t.Parallel()
			c := fastCluster(t)
			a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
			b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
			raw := rawClient(t, c.Endpoints())
			ctx := ctxT(t, 20*time.Second)
			const disk = "/img/handover-lost.qcow2"

			tok := handoverSource(t, a, disk)
			for range lost {
				loseReplies(b, applyLost)
				_, err := b.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidA, tok)})
				wantLostGrantError(t, err)
			}
			left := tokenRevision(t, raw, b, disk)

			got, err := b.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidA, tok)})
			if err != nil {
				t.Fatalf("the same acquire again: %v, want it granted", err)
			}
			if got[0].Token() <= uint64(left) {
				t.Fatalf("retried grant's token %d is not above %d, the token key's revision after the lost grants", got[0].Token(), left)
			}
			if keys := holderKeys(t, raw); len(keys) != 2 {
				t.Fatalf("etcd holds %v, want the source's and the destination's one holder key each", keys)
			}
			// The state is used up: nobody else gets the disk with it.
			_, err = a.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidC, tok)})
			wantStale(t, err, "another object with the handed-over state")
		})
	}
}

// A grant withdrawn after its answer was lost counts as the asker's own
// only: another host, or another object on the same host, with the same
// state still finds it stale.
func TestAcquireWithStateAfterSomeoneElsesLostGrantIsStale(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	e := newDriver(t, hostConfig(c.Endpoints(), "host-c"))
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/handover-other.qcow2"

	tok := handoverSource(t, a, disk)
	loseReplies(b, applyLost)
	_, err := b.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidA, tok)})
	wantLostGrantError(t, err)

	_, err = e.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidA, tok)})
	wantStale(t, err, "another host with the state")
	_, err = b.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidC, tok)})
	wantStale(t, err, "another object on the same host with the state")
}

// A lost grant that could not be withdrawn at once (etcd out of reach) is
// withdrawn when the same acquire is asked again, which then succeeds.
func TestAcquireWithStateRetriedBeforeTheLostGrantWasWithdrawnSucceeds(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	cfg := hostConfig(c.Endpoints(), "host-b")
	cfg.OpTimeout = time.Second
	b := newDriver(t, cfg)
	raw := rawClient(t, c.Endpoints())
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/handover-unreachable.qcow2"

	tok := handoverSource(t, a, disk)
	k := loseReplies(b, applyLost)
	k.cut.Store(true)
	_, err := b.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidA, tok)})
	wantLostGrantError(t, err)
	k.cut.Store(false)

	if _, err := b.Acquire(ctx, []lockmgr.Request{stateReq(disk, uuidA, tok)}); err != nil {
		t.Fatalf("the same acquire once etcd is back: %v, want it granted", err)
	}
	if keys := holderKeys(t, raw); len(keys) != 2 {
		t.Fatalf("etcd holds %v, want the source's and the destination's one holder key each", keys)
	}
}
