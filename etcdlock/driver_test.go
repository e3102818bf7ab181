package etcdlock

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/lockmgr"
)

var _ lockmgr.Driver = (*Driver)(nil)
var _ lockmgr.Adopter = (*Driver)(nil)

func TestOneDiskTwoHosts(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	if a.Name() != "etcd" {
		t.Fatalf("Name() = %q", a.Name())
	}

	la := mustAcquire(t, a, req("/img/x.qcow2", lockmgr.Exclusive, uuidA))
	_, err := b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/x.qcow2", lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, "/img/x.qcow2", "host-a", uuidA, lockmgr.Exclusive)
	if !errors.Is(err, lockmgr.ErrBusy) || !strings.Contains(err.Error(), "host host-a") {
		t.Fatalf("busy error does not read as one naming host-a: %v", err)
	}
	_, err = b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/x.qcow2", lockmgr.Shared, uuidB)})
	wantBusy(t, err, "/img/x.qcow2", "host-a", uuidA, lockmgr.Exclusive)
	// Two drivers on one host name would be two vmlockds claiming one host.
	cfg := hostConfig(c.Endpoints(), "host-a")
	if d, err := New(ctxT(t, 5*time.Second), cfg); err == nil || lockmgr.CodeOf(err) != lockmgr.CodeBusy {
		if d != nil {
			d.Close()
		}
		t.Fatalf("second driver for host-a: err %v, want busy", err)
	}

	mustRelease(t, a, la...)
	lb := mustAcquire(t, b, req("/img/x.qcow2", lockmgr.Exclusive, uuidB))
	if lb[0].Token() <= la[0].Token() {
		t.Fatalf("token did not increase: %d then %d", la[0].Token(), lb[0].Token())
	}
	err = a.Release(ctxT(t, 5*time.Second), la)
	if lockmgr.CodeOf(err) != lockmgr.CodeNotHeld {
		t.Fatalf("second release: %v, want not held", err)
	}
}

func TestAllOrNothing(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	raw := rawClient(t, c.Endpoints())

	mustAcquire(t, b, req("/img/2", lockmgr.Exclusive, uuidB))
	_, err := a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{
		req("/img/1", lockmgr.Exclusive, uuidA), req("/img/2", lockmgr.Exclusive, uuidA), req("/img/3", lockmgr.Shared, uuidA)})
	wantBusy(t, err, "/img/2", "host-b", uuidB, lockmgr.Exclusive)
	for _, p := range []string{"/img/1", "/img/3"} {
		resp, err := raw.Get(ctxT(t, 5*time.Second), a.ks.base("disk:"+p), clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		if resp.Count != 0 {
			t.Fatalf("%s: %d holder keys left after a failed grant", p, resp.Count)
		}
	}
	if a.Status().Held != 0 {
		t.Fatalf("driver a counts %d leases after a failed grant", a.Status().Held)
	}
	// And another host can take them exclusively.
	mustAcquire(t, b, req("/img/1", lockmgr.Exclusive, uuidB), req("/img/3", lockmgr.Exclusive, uuidB))
}

func TestSharedAndExclusive(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	cc := newDriver(t, hostConfig(c.Endpoints(), "host-c"))

	la := mustAcquire(t, a, req("/img/s", lockmgr.Shared, uuidA))
	lb := mustAcquire(t, b, req("/img/s", lockmgr.Shared, uuidB))
	// One host may share a disk twice (two objects, or a migration to itself).
	la2 := mustAcquire(t, a, req("/img/s", lockmgr.Shared, uuidC))
	_, err := cc.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/s", lockmgr.Exclusive, uuidC)})
	be, ok := err.(*lockmgr.BusyError)
	if !ok || be.Holder.Mode != lockmgr.Shared || (be.Holder.Host != "host-a" && be.Holder.Host != "host-b") {
		t.Fatalf("exclusive over shared: %v, want busy naming a shared holder", err)
	}
	mustRelease(t, a, la[0], la2[0])
	mustRelease(t, b, lb...)
	lc := mustAcquire(t, cc, req("/img/s", lockmgr.Exclusive, uuidC))
	_, err = a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/s", lockmgr.Shared, uuidA)})
	wantBusy(t, err, "/img/s", "host-c", uuidC, lockmgr.Exclusive)
	mustRelease(t, cc, lc...)
}

// No resource's keys fall under another's prefix, however its name is
// spelt.
func TestKeysDoNotOverlap(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	mustAcquire(t, a, req("/img/p", lockmgr.Exclusive, uuidA))
	mustAcquire(t, b, req("/img/p/e", lockmgr.Exclusive, uuidB), req("/img/p/s/host-a.1", lockmgr.Exclusive, uuidB),
		req("/img/p%2Fe", lockmgr.Exclusive, uuidB))
	mustAcquire(t, b, lockmgr.Request{Resource: lockmgr.LeaseResource("img", "p", lockmgr.Exclusive), Holder: lockmgr.Holder{UUID: uuidB}})
}

func TestTokensStrictlyIncrease(t *testing.T) {
	c := fastCluster(t)
	hosts := []*Driver{newDriver(t, hostConfig(c.Endpoints(), "host-a")), newDriver(t, hostConfig(c.Endpoints(), "host-b"))}
	last := map[string]uint64{}
	for i := range 12 {
		d := hosts[i%2]
		mode := lockmgr.Exclusive
		if i%3 == 0 {
			mode = lockmgr.Shared
		}
		ls := mustAcquire(t, d, req("/img/t1", mode, uuidA), req("/img/t2", lockmgr.Exclusive, uuidA))
		if ls[0].Token() != ls[1].Token() {
			t.Fatalf("one grant, two tokens: %d %d", ls[0].Token(), ls[1].Token())
		}
		for _, l := range ls {
			if l.Token() <= last[l.Resource().Name] {
				t.Fatalf("round %d: %s token %d not above %d", i, l.Resource().Name, l.Token(), last[l.Resource().Name])
			}
			last[l.Resource().Name] = l.Token()
		}
		// Unrelated writes in between must not matter.
		mustRelease(t, d, mustAcquire(t, d, req(fmt.Sprintf("/img/other%d", i), lockmgr.Exclusive, uuidB))...)
		mustRelease(t, d, ls...)
	}
}

func TestStaleStateRefused(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	raw := rawClient(t, c.Endpoints())

	t1 := mustAcquire(t, a, req("/img/m", lockmgr.Exclusive, uuidA))
	mustRelease(t, a, t1...)
	t2 := mustAcquire(t, b, req("/img/m", lockmgr.Exclusive, uuidB))
	mustRelease(t, b, t2...)

	tokKey := a.ks.token("disk:/img/m")
	before, err := raw.Get(ctxT(t, 5*time.Second), tokKey)
	if err != nil {
		t.Fatal(err)
	}
	r := req("/img/m", lockmgr.Exclusive, uuidA)
	r.Expect = t1[0].Token()
	other := req("/img/n", lockmgr.Exclusive, uuidA)
	_, err = a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{other, r})
	var se *lockmgr.StaleStateError
	if !errors.As(err, &se) || se.Want != t1[0].Token() || se.Current != t2[0].Token() || !errors.Is(err, lockmgr.ErrStaleState) {
		t.Fatalf("acquire with an old token: %v, want stale state %d → %d", err, t1[0].Token(), t2[0].Token())
	}
	after, err := raw.Get(ctxT(t, 5*time.Second), "", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if after.Header.Revision != before.Header.Revision {
		t.Fatalf("a refused grant changed etcd: revision %d → %d", before.Header.Revision, after.Header.Revision)
	}

	// The current token hands over: exclusive handover after the source released.
	r.Expect = t2[0].Token()
	t3 := mustAcquire(t, a, r)

	// While the source still holds it exclusively, the destination is busy.
	rb := req("/img/m", lockmgr.Exclusive, uuidB)
	rb.Expect = t3[0].Token()
	_, err = b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{rb})
	wantBusy(t, err, "/img/m", "host-a", uuidA, lockmgr.Exclusive)

	// Shared-write handover: the source keeps the disk shared while the
	// destination takes it with the source's token.
	src := mustAcquire(t, a, req("/img/sw", lockmgr.Shared, uuidC))
	dst := req("/img/sw", lockmgr.Shared, uuidC)
	dst.Expect = src[0].Token()
	got := mustAcquire(t, b, dst)
	if got[0].Token() <= src[0].Token() {
		t.Fatalf("handover token %d not above %d", got[0].Token(), src[0].Token())
	}
	// The source's state string is now stale for anyone else.
	_, err = a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{dst})
	if lockmgr.CodeOf(err) != lockmgr.CodeStaleState {
		t.Fatalf("reusing a handed-over token: %v, want stale state", err)
	}
}

func TestInvalidRequests(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	var many []lockmgr.Request
	long := "/img/" + strings.Repeat("long-", 700)
	for i := range 64 {
		many = append(many, req(fmt.Sprintf("%s%d", long, i), lockmgr.Exclusive, uuidA))
	}
	if _, err := a.Acquire(ctxT(t, 5*time.Second), many); lockmgr.CodeOf(err) != lockmgr.CodeInvalidArgument {
		t.Fatalf("64 resources: %v, want invalid argument", err)
	}
	ls := mustAcquire(t, a, many[:63]...)
	mustRelease(t, a, ls...)
	if _, err := a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{many[0], many[0]}); lockmgr.CodeOf(err) != lockmgr.CodeInvalidArgument {
		t.Fatalf("duplicate: %v, want invalid argument", err)
	}
	if _, err := a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/ro", lockmgr.ReadOnly, uuidA)}); lockmgr.CodeOf(err) != lockmgr.CodeInvalidArgument {
		t.Fatalf("read-only: %v, want invalid argument", err)
	}
	if _, err := New(ctxT(t, 5*time.Second), Config{Endpoints: c.Endpoints()}); lockmgr.CodeOf(err) != lockmgr.CodeInvalidArgument {
		t.Fatalf("no host: %v, want invalid argument", err)
	}
	if _, err := New(ctxT(t, 5*time.Second), Config{Endpoints: c.Endpoints(), Host: "h", TTL: 4 * time.Second, FenceMargin: 3 * time.Second}); lockmgr.CodeOf(err) != lockmgr.CodeInvalidArgument {
		t.Fatalf("margin too large: %v, want invalid argument", err)
	}
}

func TestWaiterWokenByRelease(t *testing.T) {
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))

	la := mustAcquire(t, a, req("/img/w", lockmgr.Exclusive, uuidA))
	waiting := make(chan *lockmgr.BusyError, 1)
	type result struct {
		ls  []lockmgr.Lease
		err error
	}
	done := make(chan result, 1)
	go func() {
		ls, err := b.AcquireWait(ctxT(t, 20*time.Second), []lockmgr.Request{req("/img/w", lockmgr.Exclusive, uuidB)},
			func(be *lockmgr.BusyError) { waiting <- be })
		done <- result{ls, err}
	}()
	be := <-waiting
	if be.Holder.Host != "host-a" {
		t.Fatalf("waiter told of holder %+v", be.Holder)
	}
	// Give the waiter's watch time to be in place, so that it (and not the
	// re-check) is what wakes it; either way it must not poll.
	time.Sleep(100 * time.Millisecond)
	attempts := b.Status().Attempts
	mustRelease(t, a, la...)
	r := <-done
	if r.err != nil {
		t.Fatalf("waiter: %v", r.err)
	}
	if r.ls[0].Token() <= la[0].Token() {
		t.Fatalf("waiter's token %d not above %d", r.ls[0].Token(), la[0].Token())
	}
	if n := b.Status().Attempts; attempts != 1 || n != 2 {
		t.Fatalf("waiter sent %d grant transactions before the release and %d in all, want 1 and 2 (woken by the watch, no polling)", attempts, n)
	}
	// A waiter gives up with a timeout error when its context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := a.AcquireWait(ctx, []lockmgr.Request{req("/img/w", lockmgr.Exclusive, uuidA)}, nil)
	if lockmgr.CodeOf(err) != lockmgr.CodeTimeout {
		t.Fatalf("waiting past the deadline: %v, want timeout", err)
	}
}

// A host that dies (its driver stops renewing without revoking) loses its
// locks after the TTL, and another host that waits gets them.
func TestCrashedHostExpires(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	stateA := t.TempDir()
	cfgA := hostConfig(c.Endpoints(), "host-a")
	cfgA.TTL, cfgA.StateDir = 2*time.Second, stateA
	a := newDriver(t, cfgA)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))

	la := mustAcquire(t, a, req("/img/c", lockmgr.Exclusive, uuidA))
	a.Close() // crash: no more renewals, nothing revoked
	var named lockmgr.Holder
	lb, err := b.AcquireWait(ctxT(t, 20*time.Second), []lockmgr.Request{req("/img/c", lockmgr.Exclusive, uuidB)},
		func(be *lockmgr.BusyError) { named = be.Holder })
	if err != nil {
		t.Fatalf("takeover: %v", err)
	}
	if named.Host != "host-a" || lb[0].Token() <= la[0].Token() {
		t.Fatalf("takeover from %+v with token %d after %d", named, lb[0].Token(), la[0].Token())
	}
	// The restarted daemon finds its session expired and its lock gone.
	a2 := newDriver(t, cfgA)
	if a2.Status().Reattached {
		t.Fatal("re-attached to an expired session")
	}
	if _, err := a2.Adopt(la[0].Resource(), la[0].Token(), nil); lockmgr.CodeOf(err) != lockmgr.CodeNotHeld {
		t.Fatalf("adopt after expiry: %v, want not held", err)
	}
}

// A daemon that restarts within the TTL keeps every lock.
func TestReattachKeepsLocks(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfgA := hostConfig(c.Endpoints(), "host-a")
	cfgA.TTL, cfgA.StateDir = 3*time.Second, t.TempDir()
	a := newDriver(t, cfgA)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))

	lx := mustAcquire(t, a, req("/img/rx", lockmgr.Exclusive, uuidA), req("/img/ry", lockmgr.Shared, uuidA))
	lz := mustAcquire(t, a, req("/img/rz", lockmgr.Exclusive, uuidC))
	lease := a.Status().LeaseID
	a.Close()

	a2 := newDriver(t, cfgA)
	st := a2.Status()
	if !st.Reattached || st.LeaseID != lease || st.Recovered != 3 {
		t.Fatalf("restart: %+v, want re-attached to lease %x with 3 locks", st, lease)
	}
	// Outlive the old run's last renewal by more than the TTL.
	start := st.Renewals
	eventually(t, 15*time.Second, "4 renewals", func() bool { return a2.Status().Renewals >= start+4 })
	_, err := b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/rx", lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, "/img/rx", "host-a", uuidA, lockmgr.Exclusive)

	var adopted []lockmgr.Lease
	for _, l := range lx {
		n, err := a2.Adopt(l.Resource(), l.Token(), nil)
		if err != nil {
			t.Fatalf("adopt %s: %v", l.Resource(), err)
		}
		adopted = append(adopted, n)
	}
	if _, err := a2.Adopt(lx[0].Resource(), lx[0].Token()+1, nil); lockmgr.CodeOf(err) != lockmgr.CodeNotHeld {
		t.Fatalf("adopt with a wrong token: %v, want not held", err)
	}
	// The unadopted lock is dropped on request.
	if err := a2.DropUnadopted(ctxT(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	mustAcquire(t, b, req(lz[0].Resource().Name, lockmgr.Exclusive, uuidB))
	_, err = b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/ry", lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, "/img/ry", "host-a", uuidA, lockmgr.Shared)
	mustRelease(t, a2, adopted...)
	mustAcquire(t, b, req("/img/rx", lockmgr.Exclusive, uuidB), req("/img/ry", lockmgr.Exclusive, uuidB))
	if a2.Fenced() {
		t.Fatal("re-attached driver fenced")
	}
}

// A host cut off from etcd fences itself before its lease can expire, so
// before another host is granted its disk; once it can reach etcd again it
// starts a new session.
func TestSelfFencingBeforeTakeover(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	p := etcdtest.NewProxy(t, strings.TrimPrefix(c.Endpoints()[0], "http://"))
	raw := rawClient(t, c.Endpoints())

	var mu sync.Mutex
	var fencedAt time.Time
	var reason string
	cfgA := hostConfig([]string{p.URL()}, "host-a")
	cfgA.TTL, cfgA.FenceMargin, cfgA.OpTimeout = 3*time.Second, time.Second, time.Second
	cfgA.OnFence = func(r string) {
		mu.Lock()
		defer mu.Unlock()
		if fencedAt.IsZero() {
			fencedAt, reason = time.Now(), r
		}
	}
	a := newDriver(t, cfgA)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))

	la := mustAcquire(t, a, req("/img/f", lockmgr.Exclusive, uuidA))
	if !a.Holds(la[0]) {
		t.Fatal("driver does not hold a fresh grant")
	}
	// The earliest anyone can see the lease expire: its key's DELETE.
	key := a.ks.excl("disk:/img/f")
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	wch := raw.Watch(wctx, key, clientv3.WithFilterPut(), clientv3.WithRev(int64(la[0].Token())+1))
	deletedAt := make(chan time.Time, 1)
	go func() {
		for wr := range wch {
			if len(wr.Events) > 0 {
				deletedAt <- time.Now()
				return
			}
		}
	}()

	p.SetBlocked(true)
	// A lost etcd is a timeout within the caller's deadline.
	_, err := a.Acquire(ctxT(t, 300*time.Millisecond), []lockmgr.Request{req("/img/g", lockmgr.Exclusive, uuidA)})
	if lockmgr.CodeOf(err) != lockmgr.CodeTimeout {
		t.Fatalf("acquire while cut off: %v, want timeout", err)
	}
	lb, err := b.AcquireWait(ctxT(t, 20*time.Second), []lockmgr.Request{req("/img/f", lockmgr.Exclusive, uuidB)}, nil)
	grantedAt := time.Now()
	if err != nil {
		t.Fatalf("takeover: %v", err)
	}
	delAt := <-deletedAt
	mu.Lock()
	f, why := fencedAt, reason
	mu.Unlock()
	if f.IsZero() {
		t.Fatal("the cut-off host was never fenced, yet another host got its disk")
	}
	if !f.Before(delAt) || !f.Before(grantedAt) {
		t.Fatalf("fenced at %v, but the lease expired (seen at %v) / the disk was granted (%v) first",
			f.Format("15:04:05.000"), delAt.Format("15:04:05.000"), grantedAt.Format("15:04:05.000"))
	}
	t.Logf("fenced %s before the expiry was seen, %s before the grant (%s)", delAt.Sub(f), grantedAt.Sub(f), why)
	if lb[0].Token() <= la[0].Token() {
		t.Fatal("takeover token did not increase")
	}
	if !a.Fenced() {
		t.Fatal("driver does not report its session lost")
	}
	if _, err := a.Acquire(ctxT(t, 2*time.Second), []lockmgr.Request{req("/img/g", lockmgr.Exclusive, uuidA)}); !errors.Is(err, ErrFenced) || lockmgr.CodeOf(err) != lockmgr.CodeTimeout {
		t.Fatalf("acquire while fenced: %v, want ErrFenced (timeout class)", err)
	}
	if a.Holds(la[0]) {
		t.Fatal("driver still claims a lease lost by fencing")
	}
	if err := a.Release(ctxT(t, 2*time.Second), la); err != nil {
		t.Fatalf("release of a lease lost by fencing: %v", err)
	}

	p.SetBlocked(false)
	eventually(t, 20*time.Second, "a new session", func() bool { return !a.Fenced() })
	mustAcquire(t, a, req("/img/g", lockmgr.Exclusive, uuidA))
	_, err = a.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/f", lockmgr.Exclusive, uuidA)})
	wantBusy(t, err, "/img/f", "host-b", uuidB, lockmgr.Exclusive)
}

// Killing the etcd leader of a 3-member cluster loses no lock and causes no
// false fencing with the default TTL.
func TestLeaderKilled(t *testing.T) {
	t.Parallel()
	c := startCluster(t, etcdtest.Options{Members: 3})
	var fenced sync.Map
	cfg := func(h string) Config {
		cfg := hostConfig(c.Endpoints(), h)
		cfg.OnFence = func(r string) { fenced.Store(h, r) }
		return cfg
	}
	a := newDriver(t, cfg("host-a"))
	b := newDriver(t, cfg("host-b"))
	la := mustAcquire(t, a, req("/img/l1", lockmgr.Exclusive, uuidA), req("/img/l2", lockmgr.Shared, uuidA))

	lead, err := c.WaitLeader(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	c.Stop(lead)
	// Wait for two renewals sent after the kill, by each host.
	for _, d := range []*Driver{a, b} {
		eventually(t, 30*time.Second, d.cfg.Host+" renewing after the leader died", func() bool {
			return d.Status().LastRenewal.After(killed.Add(d.cfg.TTL / 3))
		})
	}
	fenced.Range(func(k, v any) bool {
		t.Errorf("%v fenced itself after a leader failover: %v", k, v)
		return true
	})
	if a.Fenced() || b.Fenced() {
		t.Fatal("a driver reports a lost session")
	}
	_, err = b.Acquire(ctxT(t, 10*time.Second), []lockmgr.Request{req("/img/l1", lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, "/img/l1", "host-a", uuidA, lockmgr.Exclusive)
	_, err = b.Acquire(ctxT(t, 10*time.Second), []lockmgr.Request{req("/img/l2", lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, "/img/l2", "host-a", uuidA, lockmgr.Shared)
	// The locks are still a's: releasing finds every key where it was.
	if err := a.Release(ctxT(t, 10*time.Second), la); err != nil {
		t.Fatalf("release after failover: %v", err)
	}
	mustAcquire(t, b, req("/img/l1", lockmgr.Exclusive, uuidB))
}

// WaitAlone returns once every other holder of the resource is gone, one
// that joined during the wait included, and not before; it ends with its
// context.
func TestWaitAloneReturnsOnceTheOtherHoldersAreGone(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	const disk = "/img/alone"

	la := mustAcquire(t, a, req(disk, lockmgr.Shared, uuidA))
	if err := a.WaitAlone(ctxT(t, 5*time.Second), la[0]); err != nil {
		t.Fatalf("wait with no other holder: %v", err)
	}
	first := mustAcquire(t, b, req(disk, lockmgr.Shared, uuidB))
	var lastGone atomic.Bool
	done := make(chan error, 1)
	go func() {
		err := a.WaitAlone(ctxT(t, 20*time.Second), la[0])
		if err == nil && !lastGone.Load() {
			err = errors.New("returned while another holder was left")
		}
		done <- err
	}()
	joined := mustAcquire(t, b, req(disk, lockmgr.Shared, uuidC))
	mustRelease(t, b, first...)
	time.Sleep(100 * time.Millisecond) // time for a wrong return to show
	lastGone.Store(true)
	mustRelease(t, b, joined...)
	if err := <-done; err != nil {
		t.Fatalf("wait: %v", err)
	}

	mustAcquire(t, b, req(disk, lockmgr.Shared, uuidB))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := a.WaitAlone(ctx, la[0]); lockmgr.CodeOf(err) != lockmgr.CodeTimeout {
		t.Fatalf("waiting past the deadline: %v, want timeout", err)
	}
}
