package hierlock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"sort"
	"testing"
	"time"
)

var bg = context.Background()

func TestSharedLockSequenceAndOwnership(t *testing.T) {
	var l SharedLock // the zero value is usable
	for _, mode := range []Mode{Shared, Exclusive, Shared} {
		if _, ok := l.Holds("a"); ok {
			t.Fatal("owned before acquire")
		}
		must(t, l.Acquire(bg, "a", mode, 0))
		if m, ok := l.Holds("a"); !ok || m != mode {
			t.Fatalf("Holds = %v, %v; want %v, true", m, ok, mode)
		}
		if _, ok := l.Holds("b"); ok {
			t.Fatal("another owner owns it")
		}
		must(t, l.Release("a"))
	}
	if info := l.Info(); info.State != StateNone || info.Owners != nil || info.Pending != nil {
		t.Fatalf("released lock info = %+v", info)
	}
}

func TestSharedLockDoubleAcquire(t *testing.T) {
	for _, tc := range []struct{ first, second Mode }{
		{Shared, Exclusive}, {Exclusive, Shared}, {Shared, Shared}, {Exclusive, Exclusive},
	} {
		t.Run(fmt.Sprintf("%v-%v", tc.first, tc.second), func(t *testing.T) {
			l := NewSharedLock("l", nil)
			must(t, l.Acquire(bg, "a", tc.first, 0))
			wantKind(t, l.Acquire(bg, "a", tc.second, 0), ErrDoubleAcquire)
			wantKind(t, l.TryAcquire("a", tc.second, 0), ErrDoubleAcquire)
			if m, _ := l.Holds("a"); m != tc.first {
				t.Fatalf("mode changed to %v", m)
			}
		})
	}
	t.Run("while-waiting", func(t *testing.T) {
		l := NewSharedLock("l", nil)
		must(t, l.Acquire(bg, "x", Exclusive, 0))
		ctx, cancel := context.WithCancel(bg)
		defer cancel()
		w := async(func() error { return l.Acquire(ctx, "a", Shared, 0) })
		waitQueued(t, l, "a")
		wantKind(t, l.Acquire(bg, "a", Exclusive, 0), ErrDoubleAcquire)
		cancel()
		wantKind(t, result(t, w), ErrCanceled)
	})
}

func TestSharedLockMisuseIsErrorNotPanic(t *testing.T) {
	l := NewSharedLock("l", nil)
	for name, tc := range map[string]struct {
		err  error
		kind Kind
	}{
		"release-not-owned":   {l.Release("a"), ErrNotOwned},
		"downgrade-not-owned": {l.Downgrade("a"), ErrNotOwned},
		"empty-owner":         {l.Acquire(bg, "", Exclusive, 0), ErrInvalid},
		"bad-mode":            {l.Acquire(bg, "a", Mode(7), 0), ErrInvalid},
		"release-empty-owner": {l.Release(""), ErrInvalid},
	} {
		if !errors.Is(tc.err, tc.kind) {
			t.Errorf("%s: got %v, want %v", name, tc.err, tc.kind)
		}
	}
	var e *Error
	if err := l.Release("a"); !errors.As(err, &e) || e.Lock != "l" || e.Owner != "a" {
		t.Fatalf("error %#v does not name lock and owner", err)
	}
}

// Ganeti's testSharersCanCoexist, testExclusiveBlocks{Exclusive,Sharer,Delete},
// testSharerBlocks{Exclusive,Delete}.
func TestSharedLockBlocking(t *testing.T) {
	type op func(l *SharedLock) error
	acquire := func(m Mode) op {
		return func(l *SharedLock) error {
			if err := l.Acquire(bg, "b", m, 0); err != nil {
				return err
			}
			return l.Release("b")
		}
	}
	del := func(l *SharedLock) error { return l.Delete(bg, "b", 0) }
	for _, tc := range []struct {
		name   string
		held   Mode
		op     op
		blocks bool
	}{
		{"sharers-coexist", Shared, acquire(Shared), false},
		{"exclusive-blocks-exclusive", Exclusive, acquire(Exclusive), true},
		{"exclusive-blocks-sharer", Exclusive, acquire(Shared), true},
		{"exclusive-blocks-delete", Exclusive, del, true},
		{"sharer-blocks-exclusive", Shared, acquire(Exclusive), true},
		{"sharer-blocks-delete", Shared, del, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := NewSharedLock("l", nil)
			must(t, l.Acquire(bg, "a", tc.held, 0))
			w := async(func() error { return tc.op(l) })
			if tc.blocks {
				waitQueued(t, l, "b")
				notReturned(t, w, "blocked op")
				must(t, l.Release("a"))
				must(t, result(t, w))
			} else {
				must(t, result(t, w))
				must(t, l.Release("a"))
			}
			must(t, l.checkInvariants())
		})
	}
}

// The two tests Ganeti skipped (testWaitingExclusiveBlocksSharer,
// testWaitingSharerBlocksExclusive), implemented.
func TestWaitingExclusiveBlocksSharer(t *testing.T) {
	l := NewSharedLock("l", nil)
	var rec recorder
	must(t, l.Acquire(bg, "holder", Shared, 0))
	x := async(func() error { return acquireRecordRelease(l, "x", Exclusive, &rec, "EXC") })
	waitQueued(t, l, "x")
	s := async(func() error { return acquireRecordRelease(l, "s", Shared, &rec, "SHR") })
	// The lock is only shared, but an exclusive waits: the sharer queues too.
	waitQueued(t, l, "s")
	notReturned(t, s, "sharer behind a waiting exclusive")
	must(t, l.Release("holder"))
	must(t, result(t, x))
	must(t, result(t, s))
	if got := rec.list(); !slices.Equal(got, []string{"EXC", "SHR"}) {
		t.Fatalf("grant order %v, want [EXC SHR]", got)
	}
}

func TestWaitingSharerBlocksExclusive(t *testing.T) {
	l := NewSharedLock("l", nil)
	var rec recorder
	must(t, l.Acquire(bg, "holder", Exclusive, 0))
	s := async(func() error { return acquireRecordRelease(l, "s", Shared, &rec, "SHR") })
	waitQueued(t, l, "s")
	x := async(func() error { return acquireRecordRelease(l, "x", Exclusive, &rec, "EXC") })
	waitQueued(t, l, "x")
	must(t, l.Release("holder"))
	must(t, result(t, s))
	must(t, result(t, x))
	if got := rec.list(); !slices.Equal(got, []string{"SHR", "EXC"}) {
		t.Fatalf("grant order %v, want [SHR EXC]", got)
	}
}

func acquireRecordRelease(l *SharedLock, o Owner, m Mode, rec *recorder, label string) error {
	if err := l.Acquire(bg, o, m, 0); err != nil {
		return err
	}
	rec.add(label)
	return l.Release(o)
}

func TestSharedLockDelete(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Delete(bg, "a", 0))
	wantKind(t, l.Acquire(bg, "b", Exclusive, 0), ErrDeleted)
	wantKind(t, l.Acquire(bg, "b", Shared, 0), ErrDeleted)
	wantKind(t, l.TryAcquire("b", Shared, 0), ErrDeleted)
	wantKind(t, l.Delete(bg, "b", 0), ErrDeleted)
	if info := l.Info(); info.State != StateDeleted || info.Owners != nil {
		t.Fatalf("deleted lock info = %+v", info)
	}
	// Deleting a lock one holds exclusively needs no wait.
	l2 := NewSharedLock("l2", nil)
	must(t, l2.Acquire(bg, "a", Exclusive, 0))
	must(t, l2.Delete(timeoutCtx(0), "a", 0))
	wantKind(t, l2.Release("a"), ErrNotOwned)
}

func TestSharedLockDeleteTimeoutLeavesLockAlone(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Acquire(bg, "holder", Exclusive, 0))
	err := l.Delete(timeoutCtx(20*time.Millisecond), "d", 0)
	wantKind(t, err, ErrTimeout)
	if l.IsDeleted() {
		t.Fatal("timed-out delete deleted the lock")
	}
	if m, ok := l.Holds("holder"); !ok || m != Exclusive {
		t.Fatal("timed-out delete disturbed the holder")
	}
	must(t, l.Release("holder"))
	must(t, l.Delete(bg, "d", 0))
	wantKind(t, l.Acquire(bg, "x", Exclusive, 0), ErrDeleted)
}

func TestSharedLockNoDeleteIfSharer(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Acquire(bg, "a", Shared, 0))
	wantKind(t, l.Delete(bg, "a", 0), ErrOwnership)
	if l.IsDeleted() {
		t.Fatal("deleted by a sharer")
	}
}

// Ganeti's testDeletePendingSharersExclusiveDelete and
// testDeletePendingDeleteExclusiveSharers: every waiter fails with ErrDeleted.
func TestSharedLockDeleteFailsAllWaiters(t *testing.T) {
	for _, order := range [][]string{
		{"shared", "shared", "exclusive", "delete"},
		{"delete", "exclusive", "shared", "shared"},
	} {
		t.Run(fmt.Sprint(order), func(t *testing.T) {
			l := NewSharedLock("l", nil)
			must(t, l.Acquire(bg, "holder", Exclusive, 0))
			var waiters []<-chan error
			for i, what := range order {
				o := Owner(fmt.Sprintf("w%d", i))
				waiters = append(waiters, async(func() error {
					switch what {
					case "shared":
						return l.Acquire(bg, o, Shared, 0)
					case "exclusive":
						return l.Acquire(bg, o, Exclusive, 0)
					}
					return l.Delete(bg, o, 0)
				}))
				waitQueued(t, l, o)
			}
			must(t, l.Delete(bg, "holder", 0))
			for i, w := range waiters {
				if err := result(t, w); !errors.Is(err, ErrDeleted) {
					t.Errorf("waiter %d (%s): %v, want ErrDeleted", i, order[i], err)
				}
			}
			must(t, l.checkInvariants())
		})
	}
}

// Ganeti's testAcquireExpiringTimeout: timeouts from 0 to 20 ms all fail
// while the lock is held, and leave no trace in the queue.
func TestSharedLockTimeoutsFailWhileHeld(t *testing.T) {
	for _, mode := range []Mode{Shared, Exclusive} {
		t.Run(mode.String(), func(t *testing.T) {
			l := NewSharedLock("l", nil)
			must(t, l.Acquire(bg, "holder", Exclusive, 0))
			var ws []<-chan error
			for i := range 11 {
				d := time.Duration(i) * 2 * time.Millisecond
				ws = append(ws, async(func() error {
					return l.Acquire(timeoutCtx(d), Owner(fmt.Sprint("w", i)), mode, 0)
				}))
			}
			for i, w := range ws {
				err := result(t, w)
				if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("timeout %d ms: %v, want ErrTimeout", 2*i, err)
				}
			}
			if info := l.Info(); info.State != StateExclusive || len(info.Pending) != 0 {
				t.Fatalf("after timeouts: %+v", info)
			}
			must(t, l.checkInvariants())
			must(t, l.Release("holder"))
		})
	}
}

// Ganeti's testExclusiveAcquireTimeout: a long timeout succeeds once the
// holder releases.
func TestSharedLockTimedAcquireSucceeds(t *testing.T) {
	for _, mode := range []Mode{Shared, Exclusive} {
		l := NewSharedLock("l", nil)
		must(t, l.Acquire(bg, "a", Exclusive, 0))
		w := async(func() error { return l.Acquire(timeoutCtx(time.Minute), "b", mode, 0) })
		waitQueued(t, l, "b")
		must(t, l.Release("a"))
		must(t, result(t, w))
		if m, ok := l.Holds("b"); !ok || m != mode {
			t.Fatalf("b holds %v %v", m, ok)
		}
	}
}

func TestSharedLockTryLock(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.TryAcquire("a", Shared, 0))
	must(t, l.TryAcquire("b", Shared, 0))
	wantKind(t, l.TryAcquire("c", Exclusive, 0), ErrTimeout)
	// A deadline under MinTimeout, or a done context, is a try-lock: it does
	// not queue.
	for _, ctx := range []context.Context{timeoutCtx(0), timeoutCtx(MinTimeout / 2), canceled()} {
		err := l.Acquire(ctx, "c", Exclusive, 0)
		if !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrCanceled) {
			t.Fatalf("try-lock on busy lock: %v", err)
		}
		if len(l.Info().Pending) != 0 {
			t.Fatal("try-lock queued")
		}
	}
	// On a free lock a done context still acquires.
	l2 := NewSharedLock("l2", nil)
	must(t, l2.Acquire(canceled(), "a", Exclusive, 0))
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(bg)
	cancel()
	return ctx
}

func TestSharedLockCancel(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Acquire(bg, "a", Exclusive, 0))
	ctx, cancel := context.WithCancelCause(bg)
	cause := errors.New("client went away")
	w := async(func() error { return l.Acquire(ctx, "b", Shared, 0) })
	waitQueued(t, l, "b")
	cancel(cause)
	err := result(t, w)
	if !errors.Is(err, ErrCanceled) || !errors.Is(err, cause) {
		t.Fatalf("got %v, want ErrCanceled with cause", err)
	}
	if queued(l, "b") {
		t.Fatal("canceled waiter still queued")
	}
	must(t, l.checkInvariants())
}

// A waiter that gives up at the head lets the next entry in at once, without
// waiting for a release (Ganeti forgets to).
func TestSharedLockHeadGivingUpLetsNextIn(t *testing.T) {
	clk := newFakeClock(time.Unix(1000, 0))
	l := NewSharedLock("l", clk)
	must(t, l.Acquire(bg, "holder", Shared, 0))
	ctx, cancel := context.WithDeadline(bg, clk.Now().Add(time.Second))
	defer cancel()
	x := async(func() error { return l.Acquire(ctx, "x", Exclusive, 0) })
	waitQueued(t, l, "x")
	s := async(func() error { return l.Acquire(bg, "s", Shared, 0) })
	waitQueued(t, l, "s")
	eventually(t, "x armed its timer", func() bool { return clk.created() >= 1 })
	clk.advance(time.Second)
	clk.fireAll()
	wantKind(t, result(t, x), ErrTimeout)
	// The holder never released: only x's giving up can have let s in.
	must(t, result(t, s))
	if m, ok := l.Holds("s"); !ok || m != Shared {
		t.Fatal("s not granted")
	}
	must(t, l.checkInvariants())
}

// A request whose priority puts it at the head is granted at once when it
// fits; one of the same or lower priority queues behind the waiter.
func TestSharedLockPriorityAtHead(t *testing.T) {
	for _, tc := range []struct {
		prio    int
		granted bool
	}{{-5, true}, {0, false}, {5, false}} {
		t.Run(fmt.Sprint(tc.prio), func(t *testing.T) {
			l := NewSharedLock("l", nil)
			must(t, l.Acquire(bg, "holder", Shared, 0))
			ctx, cancel := context.WithCancel(bg)
			defer cancel()
			x := async(func() error { return l.Acquire(ctx, "x", Exclusive, 0) })
			waitQueued(t, l, "x")
			err := l.TryAcquire("s", Shared, tc.prio)
			if (err == nil) != tc.granted {
				t.Fatalf("TryAcquire at priority %d: %v, want granted=%v", tc.prio, err, tc.granted)
			}
			cancel()
			wantKind(t, result(t, x), ErrCanceled)
		})
	}
}

func TestSharedLockDowngrade(t *testing.T) {
	l := NewSharedLock("l", nil)
	wantKind(t, l.Downgrade("a"), ErrNotOwned)
	must(t, l.Acquire(bg, "a", Shared, 0))
	must(t, l.Downgrade("a")) // no-op
	if m, _ := l.Holds("a"); m != Shared {
		t.Fatal("shared downgrade changed mode")
	}
	must(t, l.Release("a"))
	must(t, l.Acquire(bg, "a", Exclusive, 0))
	must(t, l.Downgrade("a"))
	if m, _ := l.Holds("a"); m != Shared {
		t.Fatal("downgrade did not make it shared")
	}
	must(t, l.TryAcquire("b", Shared, 0)) // sharers can join now
}

// Ganeti's testDowngradeJumpsAheadOfExclusive, with its monitor checks.
func TestSharedLockDowngradeJumpsAheadOfExclusive(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Acquire(bg, "x1", Exclusive, 0))
	x2 := async(func() error { return l.Acquire(bg, "x2", Exclusive, 0) })
	waitQueued(t, l, "x2")
	var shared []<-chan error
	var sharers []Owner
	for i := range 5 {
		o := Owner(fmt.Sprint("s", i))
		sharers = append(sharers, o)
		shared = append(shared, async(func() error { return l.Acquire(bg, o, Shared, 0) }))
		waitQueued(t, l, o)
	}
	want := LockInfo{Name: "l", State: StateExclusive, Owners: []Owner{"x1"}, Pending: []PendingInfo{
		{Mode: Exclusive, Owners: []Owner{"x2"}},
		{Mode: Shared, Owners: sharers},
	}}
	if got := l.Info(); !reflect.DeepEqual(got, want) {
		t.Fatalf("before downgrade:\n got %+v\nwant %+v", got, want)
	}
	for _, w := range shared {
		notReturned(t, w, "sharer before downgrade")
	}
	must(t, l.Downgrade("x1"))
	for _, w := range shared {
		must(t, result(t, w))
	}
	want = LockInfo{Name: "l", State: StateShared, Owners: append([]Owner{"s0", "s1", "s2", "s3", "s4"}, "x1"),
		Pending: []PendingInfo{{Mode: Exclusive, Owners: []Owner{"x2"}}}}
	if got := l.Info(); !reflect.DeepEqual(got, want) {
		t.Fatalf("after downgrade:\n got %+v\nwant %+v", got, want)
	}
	notReturned(t, x2, "second exclusive")
	for _, o := range append(sharers, "x1") {
		must(t, l.Release(o))
	}
	must(t, result(t, x2))
	must(t, l.Release("x2"))
	if got := l.Info(); !reflect.DeepEqual(got, LockInfo{Name: "l"}) {
		t.Fatalf("at the end: %+v", got)
	}
}

// Ganeti's testSharedSkipExclusiveAcquires: sharers of one priority that
// arrive while its shared entry waits join it, passing exclusives.
func TestSharedLockSharersSkipExclusives(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Acquire(bg, "holder", Exclusive, 0))
	var rec recorder
	type req struct {
		mode  Mode
		label string
	}
	var reqs []req
	add := func(n int, m Mode, label string) {
		for i := range n {
			if m == Exclusive {
				reqs = append(reqs, req{m, fmt.Sprintf("%s.%d", label, i)})
			} else {
				reqs = append(reqs, req{m, label})
			}
		}
	}
	add(5, Shared, "shared 1")
	add(3, Exclusive, "exclusive 1")
	add(7, Shared, "shared 2")
	add(9, Shared, "shared 3")
	add(2, Shared, "shared 4")
	add(3, Exclusive, "exclusive 2")
	var ws []<-chan error
	for i, r := range reqs {
		o := Owner(fmt.Sprint("o", i))
		ws = append(ws, async(func() error { return acquireRecordRelease(l, o, r.mode, &rec, r.label) }))
		waitQueued(t, l, o)
	}
	if n := len(l.Info().Pending); n != 7 {
		t.Fatalf("%d queue entries, want 7 (6 exclusive + 1 shared)", n)
	}
	must(t, l.Release("holder"))
	for _, w := range ws {
		must(t, result(t, w))
	}
	got := rec.list()
	for i, label := range got[:23] {
		if label[:6] != "shared" {
			t.Fatalf("grant %d is %q, want all 23 sharers first: %v", i, label, got)
		}
	}
	wantTail := []string{"exclusive 1.0", "exclusive 1.1", "exclusive 1.2", "exclusive 2.0", "exclusive 2.1", "exclusive 2.2"}
	if !slices.Equal(got[23:], wantTail) {
		t.Fatalf("exclusives granted %v, want %v", got[23:], wantTail)
	}
}

// Ganeti's testMixedAcquireTimeout.
func TestSharedLockMixedAcquireTimeout(t *testing.T) {
	l := NewSharedLock("l", nil)
	var rec recorder
	for i := range 3 {
		must(t, l.Acquire(bg, Owner(fmt.Sprint("s", i)), Shared, 0))
		rec.add("shared")
	}
	wantKind(t, l.Acquire(timeoutCtx(20*time.Millisecond), "try", Exclusive, 0), ErrTimeout)
	x := async(func() error {
		if err := l.Acquire(bg, "x", Exclusive, 0); err != nil {
			return err
		}
		rec.add("exclusive")
		return nil
	})
	waitQueued(t, l, "x")
	wantKind(t, l.Acquire(timeoutCtx(20*time.Millisecond), "try", Exclusive, 0), ErrTimeout)
	for i := range 3 {
		must(t, l.Release(Owner(fmt.Sprint("s", i))))
	}
	must(t, result(t, x))
	if n := len(l.Info().Pending); n != 0 {
		t.Fatalf("%d pending", n)
	}
	wantKind(t, l.Acquire(timeoutCtx(20*time.Millisecond), "try", Exclusive, 0), ErrTimeout)
	var ws []<-chan error
	for i := range 10 {
		o := Owner(fmt.Sprint("t", i))
		ws = append(ws, async(func() error { return acquireRecordRelease(l, o, Shared, &rec, "shared2") }))
		waitQueued(t, l, o)
	}
	must(t, l.Release("x"))
	for _, w := range ws {
		must(t, result(t, w))
	}
	want := slices.Concat([]string{"shared", "shared", "shared", "exclusive"}, slices.Repeat([]string{"shared2"}, 10))
	if got := rec.list(); !slices.Equal(got, want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	if n := len(l.Info().Pending); n != 0 {
		t.Fatalf("%d pending at the end", n)
	}
}

// Ganeti's testPriority: requests with random priorities and modes are
// queued in priority order, sharers of one priority merged, and granted in
// that order. Runs of shared entries at the head are granted together (a
// deliberate difference from Ganeti), so grants are compared run by run.
func TestSharedLockPriority(t *testing.T) {
	l := NewSharedLock("l", nil)
	must(t, l.Acquire(bg, "holder", Exclusive, 0))
	type ent struct {
		mode   Mode
		owners []Owner
	}
	perPrio := map[int][]*ent{}
	openShared := map[int]*ent{}
	var rec recorder
	var ws []<-chan error
	n := 0
	for _, seed := range []uint64{4979, 9523, 14902, 32440} {
		rnd := rand.New(rand.NewPCG(seed, 0))
		for range 30 {
			prio := rnd.IntN(50) - 20
			modes := []Mode{Exclusive, Shared}
			rnd.Shuffle(2, func(i, j int) { modes[i], modes[j] = modes[j], modes[i] })
			for _, m := range modes {
				o := Owner(fmt.Sprintf("%d/%v/%d", n, m, prio))
				n++
				if e := openShared[prio]; m == Shared && e != nil {
					e.owners = append(e.owners, o)
				} else {
					e := &ent{m, []Owner{o}}
					perPrio[prio] = append(perPrio[prio], e)
					if m == Shared {
						openShared[prio] = e
					}
				}
				ws = append(ws, async(func() error {
					if err := l.Acquire(bg, o, m, prio); err != nil {
						return err
					}
					rec.add(string(o))
					return l.Release(o)
				}))
				waitQueued(t, l, o)
			}
		}
	}
	var want []PendingInfo
	var order []*ent
	prios := make([]int, 0, len(perPrio))
	for p := range perPrio {
		prios = append(prios, p)
	}
	sort.Ints(prios)
	for _, p := range prios {
		for _, e := range perPrio[p] {
			owners := slices.Clone(e.owners)
			sortOwners(owners)
			want = append(want, PendingInfo{Mode: e.mode, Priority: p, Owners: owners})
			order = append(order, e)
		}
	}
	info := l.Info()
	if info.State != StateExclusive || !reflect.DeepEqual(info.Pending, want) {
		t.Fatalf("queue:\n got %+v\nwant %+v", info.Pending, want)
	}
	must(t, l.checkInvariants())
	must(t, l.Release("holder"))
	for _, w := range ws {
		must(t, result(t, w))
	}
	// Expected grant runs: each exclusive alone, consecutive shared entries together.
	got := rec.list()
	i := 0
	for j := 0; j < len(order); {
		var run []string
		k := j
		if order[j].mode == Exclusive {
			run = []string{string(order[j].owners[0])}
			k++
		} else {
			for ; k < len(order) && order[k].mode == Shared; k++ {
				for _, o := range order[k].owners {
					run = append(run, string(o))
				}
			}
		}
		gotRun := slices.Clone(got[i : i+len(run)])
		slices.Sort(gotRun)
		slices.Sort(run)
		if !slices.Equal(gotRun, run) {
			t.Fatalf("grants %d..%d = %v, want %v", i, i+len(run), got[i:i+len(run)], run)
		}
		i += len(run)
		j = k
	}
	if i != len(got) {
		t.Fatalf("%d grants, want %d", len(got), i)
	}
	if len(l.Info().Pending) != 0 {
		t.Fatal("queue not empty at the end")
	}
}

// Ganeti's testAcquireTimeoutWithSpuriousNotifications: a timed acquire is
// woken many times before its deadline (its timer fires early while the
// clock moves only a little) and never fails; it gets the lock when it is
// released.
func TestSharedLockSpuriousWakeupsNeverFailTimedAcquire(t *testing.T) {
	epoch := time.Unix(4000, 0)
	clk := newFakeClock(epoch)
	l := NewSharedLock("l", clk)
	must(t, l.Acquire(bg, "holder", Exclusive, 0))
	const timeout = 60 * time.Second
	// The context's deadline is long past in real time: only the lock's
	// clock may decide that it has been reached.
	ctx, cancel := context.WithDeadline(bg, epoch.Add(timeout))
	defer cancel()
	w := async(func() error { return l.Acquire(ctx, "w", Exclusive, 0) })
	waitQueued(t, l, "w")
	rnd := rand.New(rand.NewPCG(15086, 0))
	count := 0
	eventually(t, "waiter armed a timer", func() bool { return clk.created() >= 1 })
	for clk.Now().Before(epoch.Add(timeout * 8 / 10)) {
		made := clk.created()
		if rnd.Float64() < 0.3 {
			clk.advance(time.Duration(rnd.Float64() * float64(time.Second)))
		}
		clk.fireAll()
		count++
		// The waiter re-arms for the rest of its deadline instead of failing.
		eventually(t, "waiter re-armed after a spurious wake-up", func() bool { return clk.created() > made })
		notReturned(t, w, "timed acquire before its deadline")
	}
	if count < 100 {
		t.Fatalf("only %d spurious wake-ups", count)
	}
	must(t, l.Release("holder"))
	must(t, result(t, w))
	if m, ok := l.Holds("w"); !ok || m != Exclusive {
		t.Fatal("waiter does not hold the lock")
	}
}

// A timed acquire fails exactly when the clock reaches the deadline, not a
// nanosecond before.
func TestSharedLockTimedAcquireFailsOnlyAtDeadline(t *testing.T) {
	clk := newFakeClock(time.Unix(4000, 0))
	l := NewSharedLock("l", clk)
	must(t, l.Acquire(bg, "holder", Exclusive, 0))
	ctx, cancel := context.WithDeadline(bg, clk.Now().Add(time.Second))
	defer cancel()
	w := async(func() error { return l.Acquire(ctx, "w", Shared, 0) })
	waitQueued(t, l, "w")
	eventually(t, "timer armed", func() bool { return clk.created() >= 1 })
	clk.advance(time.Second - time.Nanosecond)
	made := clk.created()
	clk.fireAll()
	eventually(t, "re-armed", func() bool { return clk.created() > made })
	notReturned(t, w, "acquire 1ns before its deadline")
	clk.advance(time.Nanosecond)
	clk.fireAll()
	wantKind(t, result(t, w), ErrTimeout)
	if queued(l, "w") {
		t.Fatal("timed-out waiter still queued")
	}
}
