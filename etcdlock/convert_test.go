package etcdlock

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

var _ lockmgr.Converter = (*Driver)(nil)

// The migration handover on etcd: the source downgrades to shared (same
// token), the destination joins with the source's token, the source leaves,
// the destination upgrades (a new token); at no revision is the disk
// unheld.
func TestConvertForHandover(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	src := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	dst := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	third := newDriver(t, hostConfig(c.Endpoints(), "host-c"))
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/mig.qcow2"

	ls := mustAcquire(t, src, req(disk, lockmgr.Exclusive, uuidA))
	tok := ls[0].Token()
	down, err := src.Convert(ctx, ls[0], lockmgr.Shared)
	if err != nil {
		t.Fatal(err)
	}
	if down.Token() != tok || down.Resource().Mode != lockmgr.Shared {
		t.Fatalf("downgraded lease: %v token %d, want shared with token %d", down.Resource(), down.Token(), tok)
	}
	// Nobody can take it exclusively; the destination joins with the token.
	_, err = third.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidC)})
	wantBusy(t, err, disk, "host-a", uuidA, lockmgr.Shared)
	in := req(disk, lockmgr.Shared, uuidA)
	in.Expect = tok
	ld := mustAcquire(t, dst, in)
	// The source cannot take it back exclusively while the destination shares it.
	_, err = src.Convert(ctx, down, lockmgr.Exclusive)
	wantBusy(t, err, disk, "host-b", uuidA, lockmgr.Shared)
	if down.Resource().Mode != lockmgr.Shared {
		t.Fatalf("refused upgrade changed the lease to %v", down.Resource().Mode)
	}
	mustRelease(t, src, down)
	joined := ld[0].Token()
	up, err := dst.Convert(ctx, ld[0], lockmgr.Exclusive)
	if err != nil {
		t.Fatal(err)
	}
	if up.Token() <= joined || up.Resource().Mode != lockmgr.Exclusive {
		t.Fatalf("upgraded lease %v token %d, want exclusive with a token above %d", up.Resource(), up.Token(), joined)
	}
	_, err = third.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Shared, uuidC)})
	wantBusy(t, err, disk, "host-b", uuidA, lockmgr.Exclusive)
	// A converted lease releases like any other, and a second release or
	// conversion of it is refused.
	mustRelease(t, dst, up)
	if _, err := dst.Convert(ctx, up, lockmgr.Shared); !errors.Is(err, lockmgr.ErrNotHeld) {
		t.Fatalf("convert after release: %v, want not held", err)
	}
	lc := mustAcquire(t, third, req(disk, lockmgr.Exclusive, uuidC))
	if lc[0].Token() <= up.Token() {
		t.Fatalf("token after the handover %d, not above %d", lc[0].Token(), up.Token())
	}
}

// An upgrade is a new exclusive grant: its token is greater than every
// token granted for the resource before, a sharer's since the lease's own
// grant included, and it is the resource's current token, against which
// a state string's is checked. This is the cancelled handover: the
// destination joins and leaves, the source takes the disk back and hands
// it over again.
func TestUpgradeTakesANewToken(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	src := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	dst := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/cancelled.qcow2"

	ls := mustAcquire(t, src, req(disk, lockmgr.Exclusive, uuidA))
	t1 := ls[0].Token()
	down, err := src.Convert(ctx, ls[0], lockmgr.Shared)
	if err != nil {
		t.Fatal(err)
	}
	join := func(tok uint64) ([]lockmgr.Lease, error) {
		in := req(disk, lockmgr.Shared, uuidA)
		in.Expect = tok
		return dst.Acquire(ctx, []lockmgr.Request{in})
	}
	ld, err := join(t1)
	if err != nil {
		t.Fatal(err)
	}
	t2 := ld[0].Token()
	mustRelease(t, dst, ld...)
	up, err := src.Convert(ctx, down, lockmgr.Exclusive)
	if err != nil {
		t.Fatal(err)
	}
	t3 := up.Token()
	if t3 <= t2 {
		t.Fatalf("upgrade after a sharer was granted token %d: token %d, want greater", t2, t3)
	}
	if down, err = src.Convert(ctx, up, lockmgr.Shared); err != nil {
		t.Fatal(err)
	}
	if down.Token() != t3 {
		t.Fatalf("downgrade changed the token from %d to %d", t3, down.Token())
	}
	var stale *lockmgr.StaleStateError
	if _, err := join(t1); !errors.As(err, &stale) || stale.Current != t3 {
		t.Fatalf("join with the token before the upgrade: %v, want stale state with current token %d", err, t3)
	}
	if ld, err = join(t3); err != nil {
		t.Fatalf("join with the upgraded token: %v", err)
	}
	mustRelease(t, dst, ld...)
	mustRelease(t, src, down)
}

// A converted lease is taken back after a restart by its original token,
// in its new mode.
func TestConvertedLeaseReattaches(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.StateDir = t.TempDir()
	a := newDriver(t, cfg)
	ls := mustAcquire(t, a, req("/img/r1", lockmgr.Exclusive, uuidA))
	if _, err := a.Convert(ctxT(t, 5*time.Second), ls[0], lockmgr.Shared); err != nil {
		t.Fatal(err)
	}
	a.Close()
	a2 := newDriver(t, cfg)
	r := lockmgr.DiskResource("/img/r1", lockmgr.Shared)
	l, err := a2.Adopt(r, ls[0].Token(), nil)
	if err != nil {
		t.Fatalf("adopt the converted lease by its token: %v (recovered %+v)", err, a2.Recovered())
	}
	up, err := a2.Convert(ctxT(t, 5*time.Second), l, lockmgr.Exclusive)
	if err != nil || up.Resource().Mode != lockmgr.Exclusive {
		t.Fatalf("upgrade after re-attach: %v", err)
	}
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	_, err = b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req("/img/r1", lockmgr.Shared, uuidB)})
	wantBusy(t, err, "/img/r1", "host-a", uuidA, lockmgr.Exclusive)
}

// OnDeadline hears the deadline before the session is usable, then once
// per confirmed renewal, each later than the one before.
func TestOnDeadlineAnnouncesEachRenewal(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	var mu sync.Mutex
	var got []time.Time
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.TTL = 3 * time.Second
	cfg.OnDeadline = func(dl time.Time) {
		mu.Lock()
		got = append(got, dl)
		mu.Unlock()
	}
	a := newDriver(t, cfg)
	mu.Lock()
	n := len(got)
	mu.Unlock()
	if n != 1 {
		t.Fatalf("New returned after %d deadline announcements, want 1", n)
	}
	eventually(t, 10*time.Second, "3 announcements", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) >= 3
	})
	mu.Lock()
	defer mu.Unlock()
	for i := 1; i < len(got); i++ {
		if !got[i].After(got[i-1]) {
			t.Fatalf("deadline %d (%v) is not after deadline %d (%v)", i, got[i], i-1, got[i-1])
		}
	}
	if st := a.Status(); !st.FenceDeadline.Equal(got[len(got)-1]) && st.FenceDeadline.Before(got[len(got)-1]) {
		t.Fatalf("status deadline %v is before the last announced %v", st.FenceDeadline, got[len(got)-1])
	}
}
