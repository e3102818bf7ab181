package etcdlock

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/internal/syncbuf"
	"github.com/vmlock/vmlock/lockmgr"
)

// restartRig is a daemon's run ("old") whose traffic to etcd goes through a
// proxy, so that a request it sent can be held back while the next run
// ("next", same host name and state directory) re-attaches to its session:
// the request of a daemon killed with it still on its way.
type restartRig struct {
	raw      *clientv3.Client
	proxy    *etcdtest.Proxy
	old      *Driver
	oldLogs  *syncbuf.Buffer
	oldFence chan string
	cfg      Config // next's
}

func newRestartRig(t *testing.T) *restartRig {
	t.Helper()
	c := fastCluster(t)
	r := &restartRig{raw: rawClient(t, c.Endpoints()), proxy: etcdtest.NewProxy(t, c.Endpoints()[0]), oldLogs: &syncbuf.Buffer{}, oldFence: make(chan string, 1)}
	stateDir := t.TempDir()
	cfg := hostConfig([]string{r.proxy.URL()}, "host-a")
	// Long enough that the held-back request is not given up on, and
	// that no renewal is due while it is held.
	cfg.StateDir, cfg.OpTimeout, cfg.TTL = stateDir, 20*time.Second, 30*time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(r.oldLogs, nil))
	cfg.OnFence = func(reason string) {
		select {
		case r.oldFence <- reason:
		default:
		}
	}
	r.old = newDriver(t, cfg)
	r.cfg = hostConfig(c.Endpoints(), "host-a")
	r.cfg.StateDir = stateDir
	return r
}

// onItsWay waits until the proxy holds back traffic of the old run: its
// request, or (rarely) a ping of its connection sent just before it. Either
// way the request reaches etcd only after the proxy is unblocked, which the
// tests do once the next run has re-attached. (No renewal is due: the first
// comes a third of the TTL after the start.)
func (r *restartRig) onItsWay(t *testing.T) {
	t.Helper()
	eventually(t, 10*time.Second, "the old run's request to reach the proxy", func() bool { return r.proxy.Held() > 0 })
}

// holders returns the holder keys of disk in etcd.
func (r *restartRig) holders(t *testing.T, disk string) []string {
	t.Helper()
	return keysUnder(t, r.raw, r.old.ks.base("disk:"+disk))
}

// oldFenced checks that the old run, which could not have known its
// session was taken over, fenced itself on its refused request, and that
// it left the session it lost to the next run alone: it did not revoke it.
func (r *restartRig) oldFenced(t *testing.T, next *Driver) {
	t.Helper()
	select {
	case reason := <-r.oldFence:
		if !strings.Contains(reason, "taken over") {
			t.Fatalf("old run fenced with reason %q, want it to say its session was taken over", reason)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the old run did not fence itself after its request was refused")
	}
	eventually(t, 10*time.Second, "the old run to give up starting a new session", func() bool {
		return strings.Contains(r.oldLogs.String(), "cannot start a new etcd session yet")
	})
	ttl, err := r.raw.TimeToLive(ctxT(t, 5*time.Second), clientv3.LeaseID(next.Status().LeaseID))
	if err != nil || ttl.TTL <= 0 {
		t.Fatalf("the next run's session after the old run fenced: TTL %v, %v; want it alive", ttl, err)
	}
}

// A grant that a daemon sent just before it was killed, and that etcd
// applies only after the restarted daemon re-attached to the session and
// read its locks, is refused. Granted, it would be a lock that the
// restarted daemon does not know: held for nobody until the session ends,
// and refused to every other host all that time.
func TestAGrantAppliedAfterTheNextRunReattachedIsRefused(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	r.proxy.SetBlocked(true)
	res := make(chan error, 1)
	go func() {
		_, err := r.old.Acquire(context.Background(), []lockmgr.Request{req("/img/late", lockmgr.Exclusive, uuidA)})
		res <- err
	}()
	r.onItsWay(t)

	next := newDriver(t, r.cfg)
	if !next.Status().Reattached {
		t.Fatalf("the next run did not re-attach: %+v", next.Status())
	}
	r.proxy.SetBlocked(false)
	if err := <-res; !errors.Is(err, ErrFenced) {
		t.Fatalf("the old run's grant, applied after the next run re-attached: %v, want it refused (fenced)", err)
	}
	if keys := r.holders(t, "/img/late"); len(keys) != 0 {
		t.Fatalf("holder keys of /img/late after the refused grant: %q, want none", keys)
	}
	if g := next.Recovered(); len(g) != 0 {
		t.Fatalf("the next run recovered %+v, want nothing", g)
	}
	b := newDriver(t, hostConfig(r.cfg.Endpoints, "host-b"))
	mustRelease(t, b, mustAcquire(t, b, req("/img/late", lockmgr.Exclusive, uuidB))...)
	r.oldFenced(t, next)
}

// A conversion that a daemon sent just before it was killed, and that etcd
// applies only after the restarted daemon re-attached and adopted the
// lock, is refused: applied, it would move the lock to a key the restarted
// daemon does not know, and the lease it adopted would point at nothing.
func TestAConversionAppliedAfterTheNextRunReattachedIsRefused(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	l := mustAcquire(t, r.old, req("/img/conv", lockmgr.Exclusive, uuidA))[0]
	before := r.holders(t, "/img/conv")
	r.proxy.SetBlocked(true)
	res := make(chan error, 1)
	go func() {
		_, err := r.old.Convert(context.Background(), l, lockmgr.Shared)
		res <- err
	}()
	r.onItsWay(t)

	next := newDriver(t, r.cfg)
	nl, err := next.Adopt(l.Resource(), l.Token(), nil)
	if err != nil {
		t.Fatalf("the next run adopts the exclusive grant: %v", err)
	}
	r.proxy.SetBlocked(false)
	if err := <-res; !errors.Is(err, ErrFenced) {
		t.Fatalf("the old run's conversion, applied after the next run re-attached: %v, want it refused (fenced)", err)
	}
	if after := r.holders(t, "/img/conv"); len(after) != 1 || after[0] != before[0] {
		t.Fatalf("holder keys of /img/conv after the refused conversion: %q, want %q as adopted", after, before)
	}
	if !next.Holds(nl) || nl.Resource().Mode != lockmgr.Exclusive {
		t.Fatalf("the adopted lease after the refused conversion: held %v, %v; want held exclusively", next.Holds(nl), nl.Resource())
	}
	r.oldFenced(t, next)
	if _, err := next.Convert(ctxT(t, 5*time.Second), nl, lockmgr.Shared); err != nil {
		t.Fatalf("the next run converts its adopted lease: %v", err)
	}
}

// A release that a daemon sent just before it was killed, and that etcd
// applies only after the restarted daemon re-attached and adopted the
// lock, is refused: the restarted daemon holds the lock until it releases
// it itself, and no other host is granted it meanwhile.
func TestAReleaseAppliedAfterTheNextRunReattachedIsRefused(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	l := mustAcquire(t, r.old, req("/img/rel", lockmgr.Exclusive, uuidA))[0]
	r.proxy.SetBlocked(true)
	res := make(chan error, 1)
	go func() { res <- r.old.Release(context.Background(), []lockmgr.Lease{l}) }()
	r.onItsWay(t)

	next := newDriver(t, r.cfg)
	nl, err := next.Adopt(l.Resource(), l.Token(), nil)
	if err != nil {
		t.Fatalf("the next run adopts the grant: %v", err)
	}
	r.proxy.SetBlocked(false)
	if err := <-res; err != nil {
		t.Fatalf("the old run's release, refused as taken over: %v, want nil (lost with its session)", err)
	}
	if keys := r.holders(t, "/img/rel"); len(keys) != 1 || !next.Holds(nl) {
		t.Fatalf("holder keys of /img/rel after the refused release: %q, next run holds it: %v; want it held by the next run", keys, next.Holds(nl))
	}
	b := newDriver(t, hostConfig(r.cfg.Endpoints, "host-b"))
	_, err = b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/rel", lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, "/img/rel", "host-a", uuidA, lockmgr.Exclusive)
	r.oldFenced(t, next)
	mustRelease(t, next, nl)
	mustRelease(t, b, mustAcquire(t, b, req("/img/rel", lockmgr.Exclusive, uuidB))...)
}

// A run that started to re-attach and died with its claim of the host
// name on its way (or whose start timed out) does not take the session
// from the run that re-attached after it when etcd applies that claim
// late: a claim rewrites the host key only if it is as the claimant read
// it. The later run grants on, and nobody fences.
func TestALateClaimOfTheHostNameFromAnAbortedRestartChangesNothing(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	l := mustAcquire(t, r.old, req("/img/kept", lockmgr.Exclusive, uuidA))[0]
	id := clientv3.LeaseID(r.old.Status().LeaseID)
	// The aborted run read the host key, then sent its claim.
	seen, err := r.raw.Get(ctxT(t, 5*time.Second), r.old.ks.host("host-a"))
	if err != nil || len(seen.Kvs) != 1 {
		t.Fatalf("host key: %v %v", seen, err)
	}
	late := r.old.hostClaim(id, seen.Kvs[0].ModRevision)

	fenced := make(chan string, 1)
	r.cfg.OnFence = func(reason string) {
		select {
		case fenced <- reason:
		default:
		}
	}
	next := newDriver(t, r.cfg)
	nl, err := next.Adopt(l.Resource(), l.Token(), nil)
	if err != nil {
		t.Fatalf("the next run adopts the grant: %v", err)
	}
	resp, err := r.raw.Do(ctxT(t, 5*time.Second), late)
	if err != nil || resp.Txn().Succeeded {
		t.Fatalf("the aborted run's late claim: succeeded %v, %v; want it refused", err == nil && resp.Txn().Succeeded, err)
	}
	ls := mustAcquire(t, next, req("/img/new", lockmgr.Exclusive, uuidB))
	if _, err := next.Convert(ctxT(t, 5*time.Second), nl, lockmgr.Shared); err != nil {
		t.Fatalf("the next run converts its adopted lease after the late claim: %v", err)
	}
	mustRelease(t, next, append(ls, nl)...)
	select {
	case reason := <-fenced:
		t.Fatalf("the next run fenced itself: %s", reason)
	default:
	}
}

// A lock under the re-attached session that the re-attach did not list
// (etcd's leader answers the listing from its own view, which a leader
// elected just then may not have brought up to date) is deleted once the
// daemon has adopted what it knows: DropUnadopted lists the session again.
func TestDropUnadoptedDeletesALockTheReattachListingMissed(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	l := mustAcquire(t, r.old, req("/img/known", lockmgr.Exclusive, uuidA))[0]
	id := clientv3.LeaseID(r.old.Status().LeaseID)
	next := newDriver(t, r.cfg)
	nl, err := next.Adopt(l.Resource(), l.Token(), nil)
	if err != nil {
		t.Fatal(err)
	}
	// A grant the listing did not show: written on the lease behind the
	// driver's back, after the re-attach.
	missed := next.ks.excl("disk:/img/missed")
	if _, err := r.raw.Put(ctxT(t, 5*time.Second), missed, `{"resource":{"type":"disk","name":"/img/missed","mode":"exclusive"},"holder":{"uuid":"`+uuidC+`"}}`, clientv3.WithLease(id)); err != nil {
		t.Fatal(err)
	}
	// A record it cannot read (a newer daemon's, say) is not its to delete.
	unreadable := next.ks.excl("disk:/img/unreadable")
	if _, err := r.raw.Put(ctxT(t, 5*time.Second), unreadable, "\x00not json", clientv3.WithLease(id)); err != nil {
		t.Fatal(err)
	}
	if err := next.DropUnadopted(ctxT(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the missed lock to be deleted", func() bool { return len(r.holders(t, "/img/missed")) == 0 })
	if keys := r.holders(t, "/img/unreadable"); len(keys) != 1 {
		t.Fatalf("the unreadable record after DropUnadopted: %q, want it left alone", keys)
	}
	if keys := r.holders(t, "/img/known"); len(keys) != 1 || !next.Holds(nl) {
		t.Fatalf("the adopted lock after DropUnadopted: keys %q, held %v", keys, next.Holds(nl))
	}
}
