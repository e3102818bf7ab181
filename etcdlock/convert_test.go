package etcdlock

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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

// lostReplies is a clientv3.KV that loses etcd's answers to the next
// transactions, one fault from its script per transaction committed:
// applyLost commits the transaction and loses the answer; late holds the
// request back (a proposal still on its way) and sends it only when the
// test closes release, putting etcd's answer on sent; dropped loses the
// request. Further transactions pass, unless cut is set: then they are
// dropped too (etcd out of reach).
type lostReplies struct {
	clientv3.KV
	mu      sync.Mutex
	script  []fault
	cut     atomic.Bool
	release chan struct{}
	sent    chan lateAnswer
}

type lateAnswer struct {
	resp *clientv3.TxnResponse
	err  error
}

type fault int

const (
	applyLost fault = iota
	late
	dropped
)

func loseReplies(d *Driver, script ...fault) *lostReplies {
	d.mu.Lock() // orders the swap before the sweeper's next look
	defer d.mu.Unlock()
	k := &lostReplies{KV: d.cli.KV, script: script, release: make(chan struct{}), sent: make(chan lateAnswer, 1)}
	d.cli.KV = k
	return k
}

// wantLateRefused waits for etcd's answer to the late request and fails
// the test unless etcd refused it.
func (k *lostReplies) wantLateRefused(t *testing.T) {
	t.Helper()
	a := <-k.sent
	if a.err != nil {
		t.Fatalf("the late request: %v", a.err)
	}
	if a.resp.Succeeded {
		t.Fatal("the late request was applied after the driver reported it had no effect")
	}
}

func (k *lostReplies) Txn(ctx context.Context) clientv3.Txn { return &lossyTxn{k: k, ctx: ctx} }

type lossyTxn struct {
	k            *lostReplies
	ctx          context.Context
	cmps         []clientv3.Cmp
	thens, elses []clientv3.Op
}

func (t *lossyTxn) If(cs ...clientv3.Cmp) clientv3.Txn   { t.cmps = append(t.cmps, cs...); return t }
func (t *lossyTxn) Then(ops ...clientv3.Op) clientv3.Txn { t.thens = append(t.thens, ops...); return t }
func (t *lossyTxn) Else(ops ...clientv3.Op) clientv3.Txn { t.elses = append(t.elses, ops...); return t }

func (t *lossyTxn) commit(ctx context.Context) (*clientv3.TxnResponse, error) {
	return t.k.KV.Txn(ctx).If(t.cmps...).Then(t.thens...).Else(t.elses...).Commit()
}

func (t *lossyTxn) Commit() (*clientv3.TxnResponse, error) {
	t.k.mu.Lock()
	f := dropped
	switch {
	case len(t.k.script) > 0:
		f = t.k.script[0]
		t.k.script = t.k.script[1:]
	case !t.k.cut.Load():
		t.k.mu.Unlock()
		return t.commit(t.ctx)
	}
	t.k.mu.Unlock()
	switch f {
	case applyLost:
		if _, err := t.commit(t.ctx); err != nil {
			return nil, err
		}
	case late:
		go func() {
			<-t.k.release
			resp, err := t.commit(context.Background())
			t.k.sent <- lateAnswer{resp, err}
		}()
	}
	return nil, status.Error(codes.Unavailable, "the connection broke before etcd answered")
}

// A downgrade whose request is still on its way to etcd when the driver
// gives up waiting for the answer is settled before Convert returns: the
// lease stays exclusive in etcd as the caller is told, and the request,
// when it arrives, changes nothing. Another host can therefore never join
// a disk whose holder believes it holds it exclusively.
func TestConvertWithALateRequestNeverAppliesAfterReportingUnchanged(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/late.qcow2"

	ls := mustAcquire(t, a, req(disk, lockmgr.Exclusive, uuidA))
	k := loseReplies(a, late)
	_, err := a.Convert(ctx, ls[0], lockmgr.Shared)
	if lockmgr.CodeOf(err) != lockmgr.CodeTimeout || errors.Is(err, ErrFenced) {
		t.Fatalf("convert with a lost answer: %v, want a timeout saying the lease is unchanged", err)
	}
	if !a.Holds(ls[0]) || ls[0].Resource().Mode != lockmgr.Exclusive {
		t.Fatalf("after the failed downgrade the lease is %v (held %v), want exclusive", ls[0].Resource(), a.Holds(ls[0]))
	}
	close(k.release)
	k.wantLateRefused(t)
	_, err = b.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Shared, uuidB)})
	wantBusy(t, err, disk, "host-a", uuidA, lockmgr.Exclusive)

	// The lease converts and releases as usual afterwards.
	down, err := a.Convert(ctx, ls[0], lockmgr.Shared)
	if err != nil {
		t.Fatalf("downgrade after the settled one: %v", err)
	}
	mustAcquire(t, b, req(disk, lockmgr.Shared, uuidB))
	mustRelease(t, a, down)
}

// A conversion that etcd applied but whose answer was lost succeeds: the
// lease is in its new mode, with the token the conversion gave it.
func TestConvertWhoseAnswerIsLostAfterItAppliedSucceeds(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/applied.qcow2"

	ls := mustAcquire(t, a, req(disk, lockmgr.Exclusive, uuidA))
	tok := ls[0].Token()
	loseReplies(a, applyLost)
	down, err := a.Convert(ctx, ls[0], lockmgr.Shared)
	if err != nil {
		t.Fatalf("downgrade applied, answer lost: %v", err)
	}
	if down.Resource().Mode != lockmgr.Shared || down.Token() != tok {
		t.Fatalf("downgraded lease %v token %d, want shared with token %d", down.Resource(), down.Token(), tok)
	}
	in := req(disk, lockmgr.Shared, uuidB)
	in.Expect = tok
	ld := mustAcquire(t, b, in)
	mustRelease(t, b, ld...)

	loseReplies(a, applyLost)
	up, err := a.Convert(ctx, down, lockmgr.Exclusive)
	if err != nil {
		t.Fatalf("upgrade applied, answer lost: %v", err)
	}
	if up.Resource().Mode != lockmgr.Exclusive || up.Token() <= ld[0].Token() {
		t.Fatalf("upgraded lease %v token %d, want exclusive with a token above %d", up.Resource(), up.Token(), ld[0].Token())
	}
	in.Expect = up.Token()
	_, err = b.Acquire(ctx, []lockmgr.Request{in})
	wantBusy(t, err, disk, "host-a", uuidA, lockmgr.Exclusive)
	mustRelease(t, a, up)
	mustAcquire(t, b, in) // the upgrade's token is the resource's current one
}

// When the answer to the settling transaction is lost too, Convert tries it
// again and still reaches a sure outcome: the late conversion is refused
// when it arrives, and the lease stays usable.
func TestConvertSettlesWhenTheSettlingAnswerIsLostToo(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	a := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	ctx := ctxT(t, 20*time.Second)
	const disk = "/img/twice.qcow2"

	ls := mustAcquire(t, a, req(disk, lockmgr.Shared, uuidA))
	k := loseReplies(a, late, applyLost)
	if _, err := a.Convert(ctx, ls[0], lockmgr.Exclusive); lockmgr.CodeOf(err) != lockmgr.CodeTimeout || errors.Is(err, ErrFenced) {
		t.Fatalf("convert with lost answers: %v, want a timeout saying the lease is unchanged", err)
	}
	close(k.release)
	k.wantLateRefused(t)
	ld := mustAcquire(t, b, req(disk, lockmgr.Shared, uuidB)) // still shared
	mustRelease(t, b, ld...)
	up, err := a.Convert(ctx, ls[0], lockmgr.Exclusive)
	if err != nil {
		t.Fatalf("upgrade after the settled one: %v", err)
	}
	_, err = b.Acquire(ctx, []lockmgr.Request{req(disk, lockmgr.Shared, uuidB)})
	wantBusy(t, err, disk, "host-a", uuidA, lockmgr.Exclusive)
	mustRelease(t, a, up)
}

// A converted lease is taken back after a restart in the mode etcd has,
// whatever vmlockd's record says: vmlockd records a conversion only after
// etcd made it, so a restart may find the record of the grant as it was
// before. Adopted by the token the record kept (a lost upgrade's: the
// shared grant's it replaced), it has the mode and token of etcd's grant,
// holds it against another host, and converts again.
func TestAConvertedLeaseIsAdoptedAsEtcdHasIt(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	for i, tc := range []struct {
		name     string
		from, to lockmgr.Mode // the conversion etcd made
		recorded lockmgr.Mode // the mode of vmlockd's record
	}{
		{"downgrade recorded", lockmgr.Exclusive, lockmgr.Shared, lockmgr.Shared},
		{"downgrade whose record was lost", lockmgr.Exclusive, lockmgr.Shared, lockmgr.Exclusive},
		{"upgrade whose record was lost", lockmgr.Shared, lockmgr.Exclusive, lockmgr.Shared},
	} {
		t.Run(tc.name, func(t *testing.T) {
			disk, host := fmt.Sprintf("/img/r%d", i), fmt.Sprintf("host-a%d", i)
			cfg := hostConfig(c.Endpoints(), host)
			cfg.StateDir = t.TempDir()
			a := newDriver(t, cfg)
			ls := mustAcquire(t, a, req(disk, tc.from, uuidA))
			conv, err := a.Convert(ctxT(t, 5*time.Second), ls[0], tc.to)
			if err != nil {
				t.Fatal(err)
			}
			a.Close()
			a2 := newDriver(t, cfg)
			l, err := a2.Adopt(lockmgr.DiskResource(disk, tc.recorded), ls[0].Token(), nil)
			if err != nil {
				t.Fatalf("adopt as recorded (%s, token %d): %v (recovered %+v)", tc.recorded, ls[0].Token(), err, a2.Recovered())
			}
			if l.Resource().Mode != tc.to || l.Token() != conv.Token() {
				t.Fatalf("adopted %s with token %d, want %s with token %d", l.Resource(), l.Token(), tc.to, conv.Token())
			}
			if err := a2.DropUnadopted(ctxT(t, 5*time.Second)); err != nil {
				t.Fatal(err)
			}
			b := newDriver(t, hostConfig(c.Endpoints(), fmt.Sprintf("host-b%d", i)))
			_, err = b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidB)})
			wantBusy(t, err, disk, host, uuidA, tc.to)
			back, err := a2.Convert(ctxT(t, 5*time.Second), l, tc.from)
			if err != nil || back.Resource().Mode != tc.from {
				t.Fatalf("convert back to %s after the adoption: %v", tc.from, err)
			}
		})
	}
}
