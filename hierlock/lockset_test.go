package hierlock

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"
)

func newSet(t testing.TB, names ...string) *LockSet {
	t.Helper()
	s, err := NewLockSet("node", names, nil)
	must(t, err)
	return s
}

func member(t testing.TB, s *LockSet, name string) *SharedLock {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	lk := s.locks[name]
	if lk == nil {
		t.Fatalf("no member %q", name)
	}
	return lk
}

func TestLockSetAcquireReturnsNaturalOrder(t *testing.T) {
	s := newSet(t, "node10", "node2", "node1")
	got, err := s.Acquire(bg, "a", Request{Names: []string{"node10", "node1", "node2", "node1"}})
	must(t, err)
	want := []string{"node1", "node2", "node10"}
	if !slices.Equal(got, want) || !slices.Equal(s.Owned("a"), want) {
		t.Fatalf("acquired %v, owned %v; want %v", got, s.Owned("a"), want)
	}
	if !slices.Equal(s.Names(), want) {
		t.Fatalf("Names = %v", s.Names())
	}
	must(t, s.Release("a"))
	if s.IsOwned("a") {
		t.Fatal("still owned after Release")
	}
}

// Members are taken in natural order: with node10 held elsewhere, an acquire
// of {node10, node2, node1} holds node1 and node2 while it waits for node10
// (in plain string order it would wait holding node1 only).
func TestLockSetAcquiresInNaturalOrder(t *testing.T) {
	s := newSet(t, "node1", "node2", "node10")
	_, err := s.Acquire(bg, "b", Request{Names: []string{"node10"}})
	must(t, err)
	w := async(func() error {
		_, err := s.Acquire(bg, "a", Request{Names: []string{"node10", "node2", "node1"}})
		return err
	})
	waitQueued(t, member(t, s, "node10"), "a")
	for _, n := range []string{"node1", "node2"} {
		if _, ok := member(t, s, n).Holds("a"); !ok {
			t.Fatalf("%s not taken before node10", n)
		}
	}
	must(t, s.Release("b"))
	must(t, result(t, w))
}

func TestLockSetAllOrNothing(t *testing.T) {
	s := newSet(t, "a", "b", "c")
	_, err := s.Acquire(bg, "holder", Request{Names: []string{"c"}})
	must(t, err)
	for _, tc := range []struct {
		name string
		req  Request
		ctx  context.Context
		kind Kind
	}{
		{"timeout", Request{Names: []string{"a", "b", "c"}}, timeoutCtx(20 * time.Millisecond), ErrTimeout},
		{"try", Request{Names: []string{"a", "b", "c"}}, timeoutCtx(0), ErrTimeout},
		{"missing", Request{Names: []string{"a", "b", "zz"}}, bg, ErrNotFound},
		{"all-timeout", Request{All: true}, timeoutCtx(20 * time.Millisecond), ErrTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.Acquire(tc.ctx, "x", tc.req)
			wantKind(t, err, tc.kind)
			if got != nil || s.IsOwned("x") || s.Holdings("x") != nil {
				t.Fatalf("partial result %v, holdings %v", got, s.Holdings("x"))
			}
			for _, n := range []string{"a", "b"} {
				if info := member(t, s, n).Info(); info.State != StateNone {
					t.Fatalf("%s left %v", n, info.State)
				}
			}
			if info := s.set.Info(); info.State != StateNone {
				t.Fatalf("set-level lock left %v", info.State)
			}
		})
	}
}

func TestLockSetOneAcquirePerSet(t *testing.T) {
	s := newSet(t, "a", "b")
	_, err := s.Acquire(bg, "x", Request{Names: []string{"a"}})
	must(t, err)
	_, err = s.Acquire(bg, "x", Request{Names: []string{"b"}})
	wantKind(t, err, ErrDoubleAcquire)
	if slices.Contains(s.Owned("x"), "b") {
		t.Fatal("second acquire took b")
	}
}

func TestLockSetInvalidRequests(t *testing.T) {
	s := newSet(t, "a")
	for name, req := range map[string]Request{
		"names-with-all": {All: true, Names: []string{"a"}},
		"bad-mode":       {Names: []string{"a"}, Mode: 9},
		"empty-name":     {Names: []string{""}},
		"reserved-name":  {Names: []string{SetLockName}},
	} {
		if _, err := s.Acquire(bg, "x", req); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	if _, err := s.Acquire(bg, "", Request{Names: []string{"a"}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty owner: %v", err)
	}
	if _, err := NewLockSet("x", []string{""}, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("NewLockSet with empty name: %v", err)
	}
}

// An "all" acquisition holds the set-level lock, which blocks add until it
// is released: no name appears behind the holder's back.
func TestLockSetAllBlocksAdd(t *testing.T) {
	for _, mode := range []Mode{Shared, Exclusive} {
		t.Run(mode.String(), func(t *testing.T) {
			s := newSet(t, "a", "b")
			got, err := s.Acquire(bg, "all", Request{All: true, Mode: mode})
			must(t, err)
			if !slices.Equal(got, []string{"a", "b"}) || !s.OwnsAll("all") {
				t.Fatalf("all got %v, OwnsAll %v", got, s.OwnsAll("all"))
			}
			wantKind(t, s.Add(timeoutCtx(20*time.Millisecond), "adder", []string{"c"}, false, Exclusive), ErrTimeout)
			add := async(func() error { return s.Add(bg, "adder", []string{"c"}, false, Exclusive) })
			waitQueued(t, &s.set, "adder")
			notReturned(t, add, "add under an all holder")
			if slices.Contains(s.Names(), "c") {
				t.Fatal("c appeared under the all holder")
			}
			must(t, s.Release("all"))
			must(t, result(t, add))
			if !slices.Equal(s.Names(), []string{"a", "b", "c"}) {
				t.Fatalf("names after add: %v", s.Names())
			}
		})
	}
}

// An "all" acquisition skips members removed while it waits.
func TestLockSetAllSkipsRemoved(t *testing.T) {
	s := newSet(t, "a", "b", "c")
	_, err := s.Acquire(bg, "holder", Request{Names: []string{"b"}})
	must(t, err)
	rm := async(func() error {
		_, err := s.Remove(bg, "remover", []string{"b"})
		return err
	})
	waitQueued(t, member(t, s, "b"), "remover")
	var got []string
	all := async(func() (err error) {
		got, err = s.Acquire(bg, "all", Request{All: true})
		return err
	})
	waitQueued(t, member(t, s, "b"), "all")
	must(t, s.Release("holder"))
	must(t, result(t, rm))
	must(t, result(t, all))
	if !slices.Equal(got, []string{"a", "c"}) {
		t.Fatalf("all acquired %v, want [a c]", got)
	}
}

// Exact waiters of a removed lock fail with ErrNotFound and keep nothing.
func TestLockSetRemoveFailsWaiters(t *testing.T) {
	s := newSet(t, "a", "b")
	_, err := s.Acquire(bg, "holder", Request{Names: []string{"b"}})
	must(t, err)
	w := async(func() error {
		_, err := s.Acquire(bg, "w", Request{Names: []string{"a", "b"}})
		return err
	})
	waitQueued(t, member(t, s, "b"), "w")
	removed, err := s.Remove(bg, "holder", []string{"b"})
	must(t, err)
	if !slices.Equal(removed, []string{"b"}) {
		t.Fatalf("removed %v", removed)
	}
	wantKind(t, result(t, w), ErrNotFound)
	if s.IsOwned("w") || s.IsOwned("holder") {
		t.Fatal("ownership left after remove")
	}
	if info := member(t, s, "a").Info(); info.State != StateNone {
		t.Fatalf("a left %v by the failed waiter", info.State)
	}
	if !slices.Equal(s.Names(), []string{"a"}) {
		t.Fatalf("names %v", s.Names())
	}
}

// Ganeti's opportunistic mode: busy and missing members are skipped.
func TestLockSetOpportunistic(t *testing.T) {
	s := newSet(t, "n1", "n2", "n3", "n4")
	_, err := s.Acquire(bg, "holder", Request{Names: []string{"n2", "n4"}})
	must(t, err)
	for _, tc := range []struct {
		name string
		req  Request
		ctx  context.Context
		want []string
	}{
		{"names", Request{Names: []string{"n1", "n2", "n3", "missing"}, Opportunistic: true}, bg, []string{"n1", "n3"}},
		{"names-deadline-ignored", Request{Names: []string{"n1", "n2"}, Opportunistic: true}, timeoutCtx(time.Hour), []string{"n1"}},
		{"none-free", Request{Names: []string{"n2", "n4"}, Opportunistic: true}, bg, []string{}},
		{"all", Request{All: true, Opportunistic: true}, bg, []string{"n1", "n3"}},
		{"all-shared", Request{All: true, Opportunistic: true, Mode: Shared}, bg, []string{"n1", "n3"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.Acquire(tc.ctx, "o", tc.req)
			must(t, err)
			if !slices.Equal(got, tc.want) || !slices.Equal(s.Owned("o"), tc.want) {
				t.Fatalf("got %v, owned %v; want %v", got, s.Owned("o"), tc.want)
			}
			if tc.req.All != s.OwnsAll("o") {
				t.Fatalf("OwnsAll = %v", s.OwnsAll("o"))
			}
			if s.IsOwned("o") {
				must(t, s.Release("o"))
			}
		})
	}
	// With All, the deadline applies to the set-level lock.
	_, err = s.Acquire(bg, "setholder", Request{All: true, Opportunistic: true})
	must(t, err)
	_, err = s.Acquire(timeoutCtx(20*time.Millisecond), "o", Request{All: true, Opportunistic: true})
	wantKind(t, err, ErrTimeout)
}

func TestLockSetAddRules(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup Request // what "o" holds first (nil Names and !All: nothing)
		names []string
		kind  Kind
	}{
		{"holds-nothing", Request{}, []string{"new"}, 0},
		{"holds-all-exclusive", Request{All: true}, []string{"new"}, 0},
		{"holds-part", Request{Names: []string{"a"}}, []string{"new"}, ErrOwnership},
		{"holds-all-shared", Request{All: true, Mode: Shared}, []string{"new"}, ErrOwnership},
		{"duplicate", Request{}, []string{"new", "b"}, ErrExists},
		{"invalid", Request{}, []string{""}, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSet(t, "a", "b")
			_, err := s.Acquire(bg, "o", tc.setup)
			must(t, err)
			err = s.Add(bg, "o", tc.names, false, Exclusive)
			if tc.kind == 0 {
				must(t, err)
			} else {
				wantKind(t, err, tc.kind)
			}
			if has := slices.Contains(s.Names(), "new"); has != (tc.kind == 0) {
				t.Fatalf("new member present = %v", has)
			}
		})
	}
}

func TestLockSetAddAcquired(t *testing.T) {
	for _, mode := range []Mode{Shared, Exclusive} {
		s := newSet(t, "a")
		must(t, s.Add(bg, "o", []string{"n2", "n10"}, true, mode))
		want := []Holding{{Lock: "node/n2", Name: "n2", Mode: mode}, {Lock: "node/n10", Name: "n10", Mode: mode}}
		if got := s.Holdings("o"); !reflect.DeepEqual(got, want) {
			t.Fatalf("holdings %+v, want %+v", got, want)
		}
		if s.OwnsAll("o") {
			t.Fatal("add left the set-level lock held")
		}
		err := s.set.TryAcquire("x", Exclusive, 0)
		must(t, err)
		must(t, s.set.Release("x"))
		// The new locks are real: another owner contends with them.
		_, err = s.Acquire(timeoutCtx(0), "other", Request{Names: []string{"n2"}})
		wantKind(t, err, ErrTimeout)
		must(t, s.Release("o"))
	}
}

func TestLockSetRemoveRules(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   Request
		remove  []string
		removed []string
		kind    Kind
	}{
		{"holds-nothing", Request{}, []string{"a", "missing"}, []string{"a"}, 0},
		{"holds-superset", Request{Names: []string{"a", "b"}}, []string{"a"}, []string{"a"}, 0},
		{"holds-subset", Request{Names: []string{"a"}}, []string{"a", "b"}, nil, ErrOwnership},
		{"holds-shared", Request{Names: []string{"a"}, Mode: Shared}, []string{"a"}, nil, ErrOwnership},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSet(t, "a", "b", "c")
			_, err := s.Acquire(bg, "o", tc.setup)
			must(t, err)
			removed, err := s.Remove(bg, "o", tc.remove)
			if tc.kind == 0 {
				must(t, err)
			} else {
				wantKind(t, err, tc.kind)
			}
			if !slices.Equal(removed, tc.removed) {
				t.Fatalf("removed %v, want %v", removed, tc.removed)
			}
			for _, n := range tc.removed {
				if slices.Contains(s.Names(), n) || slices.Contains(s.Owned("o"), n) {
					t.Fatalf("%s still there", n)
				}
			}
			if tc.kind != 0 && len(s.Names()) != 3 {
				t.Fatalf("failed remove changed names: %v", s.Names())
			}
		})
	}
}

func TestLockSetRemoveTimesOut(t *testing.T) {
	s := newSet(t, "a", "b")
	_, err := s.Acquire(bg, "holder", Request{Names: []string{"b"}})
	must(t, err)
	removed, err := s.Remove(timeoutCtx(20*time.Millisecond), "o", []string{"a", "b"})
	wantKind(t, err, ErrTimeout)
	if !slices.Equal(removed, []string{"a"}) || !slices.Equal(s.Names(), []string{"b"}) {
		t.Fatalf("removed %v, names %v", removed, s.Names())
	}
}

func TestLockSetReleaseNames(t *testing.T) {
	s := newSet(t, "a", "b", "c")
	_, err := s.Acquire(bg, "o", Request{All: true})
	must(t, err)
	wantKind(t, s.ReleaseNames("o", []string{"a", "zz"}), ErrNotOwned)
	if len(s.Owned("o")) != 3 || !s.OwnsAll("o") {
		t.Fatal("failed ReleaseNames released something")
	}
	must(t, s.ReleaseNames("o", nil)) // Ganeti's release([]): the set-level lock only
	if s.OwnsAll("o") || len(s.Owned("o")) != 3 {
		t.Fatalf("after release([]): OwnsAll %v, owned %v", s.OwnsAll("o"), s.Owned("o"))
	}
	must(t, s.ReleaseNames("o", []string{"b"}))
	if !slices.Equal(s.Owned("o"), []string{"a", "c"}) {
		t.Fatalf("owned %v", s.Owned("o"))
	}
	must(t, s.ReleaseNames("o", []string{"a", "c"}))
	if s.IsOwned("o") {
		t.Fatal("still owned")
	}
	wantKind(t, s.Release("o"), ErrNotOwned)
}

func TestLockSetDowngrade(t *testing.T) {
	s := newSet(t, "a", "b")
	wantKind(t, s.Downgrade("o"), ErrNotOwned)
	_, err := s.Acquire(bg, "o", Request{All: true})
	must(t, err)
	wantKind(t, s.DowngradeNames("o", []string{"zz"}), ErrNotOwned)
	must(t, s.DowngradeNames("o", []string{"a"}))
	modes := func() map[string]Mode {
		m := map[string]Mode{}
		for _, h := range s.Holdings("o") {
			m[h.Name] = h.Mode
		}
		return m
	}
	if got := modes(); got["a"] != Shared || got["b"] != Exclusive || got[SetLockName] != Exclusive {
		t.Fatalf("after downgrading a: %v", got)
	}
	must(t, s.DowngradeNames("o", []string{"b"}))
	if got := modes(); got["a"] != Shared || got["b"] != Shared || got[SetLockName] != Shared {
		t.Fatalf("after downgrading b: %v", got)
	}
	// Now others can share the whole set.
	_, err = s.Acquire(timeoutCtx(0), "p", Request{All: true, Mode: Shared})
	must(t, err)
}

func TestLockSetZeroValue(t *testing.T) {
	var s LockSet
	must(t, s.Add(bg, "o", []string{"x"}, false, Exclusive))
	got, err := s.Acquire(bg, "o", Request{All: true})
	must(t, err)
	if !slices.Equal(got, []string{"x"}) {
		t.Fatalf("got %v", got)
	}
	rows := s.AppendInfo(nil)
	if len(rows) != 2 || rows[0].Name != SetLockName || rows[1].Name != "x" {
		t.Fatalf("rows %+v", rows)
	}
}

func TestLockSetInfo(t *testing.T) {
	s := newSet(t, "n10", "n2", "n1")
	_, err := s.Acquire(bg, "o", Request{Names: []string{"n2"}, Mode: Shared})
	must(t, err)
	var names []string
	for _, r := range s.AppendInfo(nil) {
		names = append(names, r.Name)
	}
	want := []string{"node/[lockset]", "node/n1", "node/n2", "node/n10"}
	if !slices.Equal(names, want) {
		t.Fatalf("rows %v, want %v", names, want)
	}
}
