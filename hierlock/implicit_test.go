package hierlock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func create(names ...string) Request { return Request{Names: names, Create: true} }

// contents returns what the set stores, whatever is or is not visible
// through Names: every linked member and every implicit entry.
func (s *LockSet) contents() (linked []string, implicit int) {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	for n := range s.locks {
		linked = append(linked, n)
	}
	slices.SortFunc(linked, CompareNatural)
	return linked, len(s.implicit)
}

// checkImplicit verifies the set's bookkeeping of implicit members: each is
// linked under its name, its pins are not negative, and sorted lists the
// linked names.
func (s *LockSet) checkImplicit() error {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	linked := map[*SharedLock]bool{}
	for _, lk := range s.locks {
		linked[lk] = true
	}
	for lk, pins := range s.implicit {
		if !linked[lk] {
			return fmt.Errorf("%s: implicit member not linked", lk.name)
		}
		if pins < 0 {
			return fmt.Errorf("%s: %d pins", lk.name, pins)
		}
	}
	if !slices.Equal(s.sorted, sortedKeys(s.locks)) {
		return fmt.Errorf("%s: sorted %v, members %v", s.name, s.sorted, sortedKeys(s.locks))
	}
	return nil
}

// A client that locks one name per job leaves nothing behind: after many
// distinct names were created, held and released, the set stores none of
// them.
func TestLockSetImplicitNamesAreGoneOnceReleased(t *testing.T) {
	s := newSet(t)
	for i := range 1000 {
		name := fmt.Sprintf("job%d", i)
		owner := Owner(fmt.Sprint("o", i%7))
		got, err := s.Acquire(bg, owner, Request{Names: []string{name}, Mode: Mode(i % 2), Create: true})
		must(t, err)
		if !slices.Equal(got, []string{name}) || !slices.Contains(s.Names(), name) {
			t.Fatalf("acquired %v, names %v; want %s there", got, s.Names(), name)
		}
		must(t, s.Release(owner))
	}
	if linked, implicit := s.contents(); len(linked) != 0 || implicit != 0 {
		t.Fatalf("set stores %d names (%v…) and %d implicit entries after every name was released", len(linked), linked[:min(len(linked), 5)], implicit)
	}
	if rows := s.AppendInfo(nil); len(rows) != 1 {
		t.Fatalf("monitor shows %v, want the set-level lock only", rows)
	}
}

// An implicit name goes away by every path that leaves it unused: a partial
// release, an all-or-nothing acquire that fails, an opportunistic acquire
// that skips it, and a waiter that gives up.
func TestLockSetImplicitNamesAreGoneByEveryPath(t *testing.T) {
	s := newSet(t, "busy")
	_, err := s.Acquire(bg, "holder", Request{Names: []string{"busy"}})
	must(t, err)

	_, err = s.Acquire(bg, "a", create("x", "y"))
	must(t, err)
	must(t, s.ReleaseNames("a", []string{"x"}))
	if !slices.Equal(s.Names(), []string{"busy", "y"}) {
		t.Fatalf("after releasing x: %v", s.Names())
	}
	must(t, s.Release("a"))

	// x is created, then the acquire times out on busy and gives x up.
	_, err = s.Acquire(timeoutCtx(20*time.Millisecond), "b", create("x", "busy"))
	wantKind(t, err, ErrTimeout)

	// Opportunistic: x created, taken, busy skipped; then x released.
	got, err := s.Acquire(bg, "c", Request{Names: []string{"x", "busy"}, Opportunistic: true, Create: true})
	must(t, err)
	if !slices.Equal(got, []string{"x"}) {
		t.Fatalf("opportunistic got %v", got)
	}
	// A waiter for x gives up while c holds it; c releases.
	_, err = s.Acquire(timeoutCtx(20*time.Millisecond), "d", create("x"))
	wantKind(t, err, ErrTimeout)
	if !slices.Contains(s.Names(), "x") {
		t.Fatal("x went away while held")
	}
	must(t, s.Release("c"))

	if linked, implicit := s.contents(); !slices.Equal(linked, []string{"busy"}) || implicit != 0 {
		t.Fatalf("set stores %v and %d implicit entries, want [busy] only", linked, implicit)
	}
}

// An implicit name stays while anyone holds it or waits for it, and the
// waiter gets the same lock the holder released.
func TestLockSetImplicitNameStaysWhileWaitedFor(t *testing.T) {
	s := newSet(t)
	_, err := s.Acquire(bg, "a", create("x"))
	must(t, err)
	x := member(t, s, "x")
	w := async(func() error {
		_, err := s.Acquire(bg, "b", create("x"))
		return err
	})
	waitQueued(t, x, "b")
	must(t, s.Release("a"))
	must(t, result(t, w))
	if member(t, s, "x") != x {
		t.Fatal("x was replaced while waited for")
	}
	if _, ok := x.Holds("b"); !ok {
		t.Fatal("the waiter does not hold x")
	}
	must(t, s.Release("b"))
	if slices.Contains(s.Names(), "x") {
		t.Fatal("x stayed after its last holder released it")
	}
}

// An acquire that has looked up an implicit name but not yet queued for it
// (it waits for an earlier name) keeps the name: the holder releasing it
// meanwhile does not remove it under the acquire, which gets it.
func TestLockSetImplicitNameStaysForAnAcquireAboutToTakeIt(t *testing.T) {
	s := newSet(t, "a")
	_, err := s.Acquire(bg, "holder-a", Request{Names: []string{"a"}})
	must(t, err)
	_, err = s.Acquire(bg, "holder-x", create("x"))
	must(t, err)
	w := async(func() error {
		_, err := s.Acquire(bg, "w", create("a", "x"))
		return err
	})
	waitQueued(t, member(t, s, "a"), "w")
	must(t, s.Release("holder-x")) // x unused but for w's acquire in progress
	if !slices.Contains(s.Names(), "x") {
		t.Fatal("x removed under an acquire that is about to take it")
	}
	must(t, s.Release("holder-a"))
	must(t, result(t, w))
	if got := s.Owned("w"); !slices.Equal(got, []string{"a", "x"}) {
		t.Fatalf("w owns %v, want [a x]", got)
	}
	must(t, s.Release("w"))
	if !slices.Equal(s.Names(), []string{"a"}) {
		t.Fatalf("names %v, want [a]", s.Names())
	}
}

// Explicit names (initial, or added) stay after use, as in Ganeti; Add of a
// name that exists implicitly makes it explicit.
func TestLockSetExplicitNamesStay(t *testing.T) {
	s := newSet(t, "initial")
	must(t, s.Add(bg, "adder", []string{"added"}, false, Exclusive))
	_, err := s.Acquire(bg, "a", create("initial", "added", "implicit"))
	must(t, err)
	must(t, s.Add(bg, "adder", []string{"implicit"}, false, Exclusive)) // in use by a: made explicit
	wantKind(t, s.Add(bg, "adder", []string{"implicit"}, false, Exclusive), ErrExists)
	must(t, s.Release("a"))
	_, err = s.Acquire(bg, "b", create("initial", "added", "implicit"))
	must(t, err)
	must(t, s.Release("b"))
	if want := []string{"added", "implicit", "initial"}; !slices.Equal(s.Names(), want) {
		t.Fatalf("names %v, want %v", s.Names(), want)
	}
	if _, implicit := s.contents(); implicit != 0 {
		t.Fatalf("%d implicit entries left", implicit)
	}
}

// Add of an implicit name in use, acquired, is a duplicate: nothing changes.
func TestLockSetAddAcquiredOfAnImplicitNameInUseFails(t *testing.T) {
	s := newSet(t)
	_, err := s.Acquire(bg, "a", create("x"))
	must(t, err)
	wantKind(t, s.Add(bg, "adder", []string{"y", "x"}, true, Exclusive), ErrExists)
	if s.IsOwned("adder") || !slices.Equal(s.Names(), []string{"x"}) {
		t.Fatalf("failed add changed the set: names %v, adder owns %v", s.Names(), s.Owned("adder"))
	}
	must(t, s.Release("a"))
	if names := s.Names(); len(names) != 0 {
		t.Fatalf("names %v after release: x stayed implicit", names)
	}
}

// Creating a name is adding it: it waits for an All holder, which never
// sees a name appear under it. All takes the implicit names that exist.
func TestLockSetCreateWaitsForAllHolder(t *testing.T) {
	s := newSet(t, "a")
	_, err := s.Acquire(bg, "user", create("x"))
	must(t, err)
	all := async(func() error {
		_, err := s.Acquire(bg, "all", Request{All: true, Mode: Shared})
		return err
	})
	waitQueued(t, member(t, s, "x"), "all")
	must(t, s.Release("user"))
	must(t, result(t, all))
	if got := s.Owned("all"); !slices.Equal(got, []string{"a", "x"}) {
		t.Fatalf("all owns %v, want [a x]", got)
	}
	c := async(func() error {
		_, err := s.Acquire(bg, "creator", create("new"))
		return err
	})
	waitQueued(t, &s.set, "creator")
	notReturned(t, c, "create under an all holder")
	if slices.Contains(s.Names(), "new") {
		t.Fatal("new appeared under the all holder")
	}
	must(t, s.Release("all"))
	must(t, result(t, c))
	if !slices.Equal(s.Names(), []string{"a", "new"}) {
		t.Fatalf("names %v, want [a new] (x unused, new held)", s.Names())
	}
}

// Remove of an implicit name fails its waiters (ErrNotFound), as for any
// member; a later acquire with Create makes it again.
func TestLockSetRemoveOfAnImplicitName(t *testing.T) {
	s := newSet(t)
	_, err := s.Acquire(bg, "holder", create("x"))
	must(t, err)
	w := async(func() error {
		_, err := s.Acquire(bg, "w", create("x"))
		return err
	})
	waitQueued(t, member(t, s, "x"), "w")
	removed, err := s.Remove(bg, "holder", []string{"x"})
	must(t, err)
	if !slices.Equal(removed, []string{"x"}) {
		t.Fatalf("removed %v", removed)
	}
	wantKind(t, result(t, w), ErrNotFound)
	if linked, implicit := s.contents(); len(linked) != 0 || implicit != 0 {
		t.Fatalf("set stores %v and %d implicit entries after the remove", linked, implicit)
	}
	_, err = s.Acquire(bg, "w", create("x"))
	must(t, err)
	must(t, s.Release("w"))
}

func TestLockSetCreateInvalid(t *testing.T) {
	s := newSet(t)
	wantKind(t, func() error { _, err := s.Acquire(bg, "a", Request{All: true, Create: true}); return err }(), ErrInvalid)
	wantKind(t, func() error { _, err := s.Acquire(bg, "a", create("x", SetLockName)); return err }(), ErrInvalid)
	if linked, _ := s.contents(); len(linked) != 0 {
		t.Fatalf("invalid requests created %v", linked)
	}
}

// Create is adding: refused at the cluster level, which is not modifiable.
func TestManagerCreateOnlyAtModifiableLevels(t *testing.T) {
	m, err := NewManager(Config{})
	must(t, err)
	_, err = m.Acquire(bg, "o", LevelCluster, Request{Names: []string{"other"}, Create: true})
	var ov *OrderViolationError
	if !errors.As(err, &ov) || ov.Rule != RuleNotModifiable {
		t.Fatalf("create at the cluster level: %v, want a not-modifiable order violation", err)
	}
	if names, _ := m.Names(LevelCluster); !slices.Equal(names, []string{BGL}) {
		t.Fatalf("cluster level %v", names)
	}
}

// Many owners acquire and release a few implicit names at once, in both
// modes, with timeouts, while those names keep going away and coming back:
// no acquire fails except by its own timeout, no two owners ever hold one
// name in conflicting modes, and in the end the set stores nothing.
func TestLockSetImplicitNamesUnderContention(t *testing.T) {
	goroutines, ops := 16, 400
	if testing.Short() {
		goroutines, ops = 8, 100
	}
	s := newSet(t)
	var mu sync.Mutex
	held := map[string]map[Owner]Mode{}
	var problems []string
	var granted atomic.Int64
	report := func(p string) { mu.Lock(); problems = append(problems, p); mu.Unlock() }
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(g), 3))
			o := Owner(fmt.Sprint("g", g))
			for range ops {
				var names []string
				for _, n := range []string{"hot", "warm", "cold"} {
					if rnd.IntN(2) == 0 {
						names = append(names, n)
					}
				}
				if len(names) == 0 {
					names = []string{"hot"}
				}
				mode := Mode(rnd.IntN(2))
				ctx, cancel := context.WithTimeout(bg, time.Duration(rnd.IntN(3))*time.Millisecond)
				if rnd.IntN(3) == 0 {
					cancel()
					ctx, cancel = context.WithCancel(bg) // waits as long as it takes
				}
				got, err := s.Acquire(ctx, o, Request{Names: names, Mode: mode, Create: true, Opportunistic: rnd.IntN(8) == 0})
				cancel()
				if err != nil {
					if !errors.Is(err, ErrTimeout) {
						report(fmt.Sprintf("%s acquiring %v: %v", o, names, err))
					}
					continue
				}
				granted.Add(1)
				mu.Lock()
				for _, n := range got {
					for other, m := range held[n] {
						if m == Exclusive || mode == Exclusive {
							problems = append(problems, fmt.Sprintf("%s: %s %v with %s %v", n, o, mode, other, m))
						}
					}
					if held[n] == nil {
						held[n] = map[Owner]Mode{}
					}
					held[n][o] = mode
				}
				mu.Unlock()
				if err := s.checkImplicit(); err != nil {
					report(err.Error())
				}
				mu.Lock()
				for _, n := range got {
					delete(held[n], o)
				}
				mu.Unlock()
				if len(got) > 0 {
					if rnd.IntN(2) == 0 && len(got) > 1 {
						if err := s.ReleaseNames(o, got[:1]); err != nil {
							report(err.Error())
						}
					}
					if err := s.Release(o); err != nil {
						report(err.Error())
					}
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(90 * time.Second):
		t.Fatalf("contention test hung (deadlock?)\n%s", stacks())
	}
	for _, p := range problems {
		t.Error(p)
	}
	if granted.Load() == 0 {
		t.Fatal("nothing was ever granted")
	}
	must(t, s.checkImplicit())
	if linked, implicit := s.contents(); len(linked) != 0 || implicit != 0 {
		t.Fatalf("set stores %v and %d implicit entries after every owner released", linked, implicit)
	}
}

// A Remove of an implicit member deletes the lock, then unlinks it. An
// acquire with Create in between finds the name deleted and links a new
// lock under it: the deleted one leaves the implicit members there and
// then, and the acquires that had pinned it (they fail with ErrDeleted)
// leave the new one alone when they unpin.
func TestAnImplicitMemberReplacedBeforeItsRemoveEndsIsNoLongerImplicit(t *testing.T) {
	s := newSet(t)
	_, err := s.Acquire(bg, "a", create("x"))
	must(t, err)
	s.mu.Lock()
	old := s.locks["x"]
	s.implicit[old]++ // an acquire that looked "x" up and has not acquired it yet
	s.mu.Unlock()
	must(t, s.Release("a"))
	must(t, old.Delete(bg, "r", 0)) // Remove's first step; its clean-up has not run

	got, err := s.Acquire(bg, "b", create("x"))
	must(t, err)
	if !slices.Equal(got, []string{"x"}) || s.locks["x"] == old {
		t.Fatalf("acquired %v; want x, on a new lock", got)
	}
	if err := s.checkImplicit(); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.unpinLocked([]string{"x"}, []*SharedLock{old}) // the pinned acquire gives up
	s.mu.Unlock()
	if m, held := s.locks["x"].Holds("b"); !held || m != Exclusive {
		t.Fatalf("b holds x: %v %v after the old lock was unpinned, want exclusive", m, held)
	}
	must(t, s.Release("b"))
	if linked, implicit := s.contents(); len(linked) != 0 || implicit != 0 {
		t.Fatalf("set stores %v and %d implicit entries after x was released", linked, implicit)
	}
}
