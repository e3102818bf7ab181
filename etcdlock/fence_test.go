package etcdlock

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/lockmgr"
)

// The fenced session's lease is revoked only once OnFence has returned:
// revoking it while OnFence still kills the holders would let another host
// take a disk whose holder still runs, before the lease could expire.
func TestNoRevokeBeforeOnFenceReturns(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	p := etcdtest.NewProxy(t, strings.TrimPrefix(c.Endpoints()[0], "http://"))

	entered := make(chan struct{})
	release := make(chan struct{})
	var once, unblock sync.Once
	var returned atomic.Bool
	cfgA := hostConfig([]string{p.URL()}, "host-a")
	cfgA.TTL, cfgA.FenceMargin, cfgA.OpTimeout = 6*time.Second, 3*time.Second, 500*time.Millisecond
	cfgA.OnFence = func(string) {
		once.Do(func() { close(entered) })
		<-release // the holders take long to die
		returned.Store(true)
	}
	a := newDriver(t, cfgA)
	t.Cleanup(func() { unblock.Do(func() { close(release) }) }) // before a.Close
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))

	mustAcquire(t, a, req("/img/k", lockmgr.Exclusive, uuidA))
	p.SetBlocked(true)
	select {
	case <-entered:
	case <-time.After(15 * time.Second):
		t.Fatal("host-a was never fenced")
	}
	last := a.Status().LastRenewal
	p.SetBlocked(false)
	// Until the lease could have expired on its own, the disk is host-a's.
	for end := last.Add(cfgA.TTL - time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		_, err := b.Acquire(ctxT(t, time.Second), []lockmgr.Request{req("/img/k", lockmgr.Exclusive, uuidB)})
		if err == nil && !returned.Load() {
			t.Fatalf("host-b was granted the disk %s after host-a's last confirmed renewal, while host-a's OnFence was still killing its holders",
				time.Since(last).Round(time.Millisecond))
		}
	}
	unblock.Do(func() { close(release) })
	eventually(t, 20*time.Second, "a new session", func() bool { return !a.Fenced() })
}

// A conversion whose reply comes after the fence deadline, in a session
// that a renewal then keeps alive, leaves the lease held in etcd: a failed
// conversion must leave the lease as it was, a successful one in its new
// mode, and never the daemon holding a lease that etcd no longer has.
func TestLateConversionKeepsTheLease(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfgA := hostConfig(c.Endpoints(), "host-a")
	cfgA.TTL = 6 * time.Second
	a := newDriver(t, cfgA)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))

	ls := mustAcquire(t, a, req("/img/lc", lockmgr.Exclusive, uuidA))
	// Just after a renewal, as if the conversion's reply came after the
	// deadline; the next renewal moves the deadline on.
	n := a.Status().Renewals
	eventually(t, 10*time.Second, "a renewal", func() bool { return a.Status().Renewals > n })
	a.mu.Lock()
	a.deadline = time.Now().Add(-time.Millisecond)
	a.mu.Unlock()
	held := ls[0]
	if l, err := a.Convert(ctxT(t, 5*time.Second), ls[0], lockmgr.Shared); err == nil {
		held = l
	} else {
		t.Logf("late conversion: %v", err)
	}
	eventually(t, 10*time.Second, "two more renewals", func() bool { return a.Status().Renewals > n+2 })
	if a.Fenced() || !a.Holds(held) {
		t.Fatalf("fenced %v, holds %v: the session was kept alive by renewals", a.Fenced(), a.Holds(held))
	}
	_, err := b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/lc", lockmgr.Exclusive, uuidB)})
	if err == nil {
		t.Fatalf("host-b was granted exclusively a disk that host-a still holds (as %v)", held.Resource().Mode)
	}
	wantBusy(t, err, "/img/lc", "host-a", uuidA, held.Resource().Mode)
}

// revokeAndLinger is a clientv3.Lease whose Revoke, once the lease is
// revoked, lingers until fenced is closed or wait passes: long enough for
// the session's next renewal to fall due and meet the revoked lease.
type revokeAndLinger struct {
	clientv3.Lease
	fenced <-chan struct{}
	wait   time.Duration
}

func (l *revokeAndLinger) Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error) {
	resp, err := l.Lease.Revoke(ctx, id)
	select {
	case <-l.fenced:
	case <-time.After(l.wait):
	}
	return resp, err
}

// Shutdown stops renewing the session before it revokes the lease: a
// renewal after the revocation would find the lease gone and fence, killing
// every holder of a host that is only giving its locks up. The locks are
// free for other hosts at once, and the session is forgotten.
func TestShutdownRevokesWithoutFencing(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	fenced := make(chan struct{})
	var once sync.Once
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.StateDir = t.TempDir()
	cfg.TTL, cfg.FenceMargin = 3*time.Second, time.Second // a renewal every second
	cfg.OnFence = func(string) { once.Do(func() { close(fenced) }) }
	a := newDriver(t, cfg)
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	mustAcquire(t, a, req("/img/s", lockmgr.Exclusive, uuidA))

	a.mu.Lock() // orders the swap before the renewal loop's next call
	a.cli.Lease = &revokeAndLinger{Lease: a.cli.Lease, fenced: fenced, wait: 2 * time.Second}
	a.mu.Unlock()
	if err := a.Shutdown(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-fenced:
		t.Fatal("Shutdown fenced the host")
	default:
	}
	mustAcquire(t, b, req("/img/s", lockmgr.Exclusive, uuidB))
	if _, err := os.Stat(filepath.Join(cfg.StateDir, stateFileName)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("session file after Shutdown: %v, want it removed", err)
	}
	if err := a.Shutdown(ctxT(t, time.Second)); err != nil {
		t.Fatalf("a second Shutdown: %v", err)
	}
}

// slowGets is a clientv3.KV whose Get takes delay (or until its context
// ends): etcd that answers, slowly.
type slowGets struct {
	clientv3.KV
	delay time.Duration
}

func (s *slowGets) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	select {
	case <-time.After(s.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.KV.Get(ctx, key, opts...)
}

// The cleanup of grants left behind by unconfirmed replies is best effort
// and must never hold up the renewals of the session: a slow etcd with many
// keys to look at would otherwise stop the renewals for longer than the
// fence margin, and the host would kill every holder although its lease
// could be renewed all along.
func TestCleanupDoesNotHoldUpRenewals(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	var fenced atomic.Bool
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.TTL, cfg.FenceMargin = 3*time.Second, time.Second // a renewal every second, a fence 2 s after the last
	cfg.OnFence = func(string) { fenced.Store(true) }
	a := newDriver(t, cfg)

	// As if the replies of 20 grants had been lost, with an etcd that takes
	// 700 ms to answer a read: looking at them all takes 14 s.
	a.mu.Lock()
	for i := range 20 {
		a.sweep[a.ks.excl(lockmgr.DiskResource("/img/lost"+string(rune('a'+i)), lockmgr.Exclusive).Key())] = 0
	}
	a.cli.KV = &slowGets{KV: a.cli.KV, delay: 700 * time.Millisecond}
	n := a.renewals
	a.mu.Unlock()
	eventually(t, 20*time.Second, "6 renewals or a fence", func() bool { return fenced.Load() || a.Status().Renewals >= n+6 })
	if fenced.Load() || a.Fenced() {
		t.Fatalf("the host fenced itself while etcd renewed its lease (%d renewals)", a.Status().Renewals-n)
	}
}

// An OnDeadline that blocks (vmlockd's holds up while its lock-holder is
// being replaced) holds up no renewal: the session is renewed and not
// fenced however long the call takes, and once it returns, the newest
// deadline is announced next.
func TestASlowOnDeadlineHoldsUpNoRenewal(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.TTL, cfg.FenceMargin = 3*time.Second, time.Second // a renewal every second, fence 2 s after one
	var blocking atomic.Bool
	unblock := make(chan struct{})
	var mu sync.Mutex
	var last time.Time
	cfg.OnDeadline = func(dl time.Time) {
		if blocking.Load() {
			<-unblock
		}
		mu.Lock()
		last = dl
		mu.Unlock()
	}
	fenced := make(chan string, 1)
	cfg.OnFence = func(reason string) { fenced <- reason }
	a := newDriver(t, cfg)
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(unblock) }) }) // before a.Close
	la := mustAcquire(t, a, req("/img/slow-deadline", lockmgr.Exclusive, uuidA))

	blocking.Store(true)
	n := a.Status().Renewals
	eventually(t, 30*time.Second, "renewals for longer than the TTL while OnDeadline blocks", func() bool {
		select {
		case reason := <-fenced:
			t.Fatalf("host-a fenced itself while OnDeadline blocked: %s", reason)
		default:
		}
		return a.Status().Renewals >= n+5
	})
	blocking.Store(false)
	once.Do(func() { close(unblock) })
	if !a.Holds(la[0]) {
		t.Fatal("host-a no longer holds its disk")
	}
	eventually(t, 10*time.Second, "the newest deadline announced", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return last.Equal(a.Status().FenceDeadline)
	})
}
