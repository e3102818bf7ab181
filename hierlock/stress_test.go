package hierlock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// conflictTracker mirrors who holds what, to check after every grant that no
// two owners hold one lock in conflicting modes. An owner's entry is added
// after its locks are granted and removed (or weakened) before they are
// released (or downgraded), so the tracker never claims more than is really
// held: any conflict it sees is real.
type conflictTracker struct {
	mu   sync.Mutex
	held map[Owner]map[string]Mode
	errs []string
}

func (c *conflictTracker) granted(owner Owner, hs []Holding) {
	c.mu.Lock()
	defer c.mu.Unlock()
	mine := map[string]Mode{}
	for _, h := range hs {
		mine[h.Lock] = h.Mode
		for other, theirs := range c.held {
			if other == owner {
				continue
			}
			if m, ok := theirs[h.Lock]; ok && (m == Exclusive || h.Mode == Exclusive) {
				c.errs = append(c.errs, fmt.Sprintf("%s: %s holds %v while %s holds %v", h.Lock, owner, h.Mode, other, m))
			}
		}
	}
	c.held[owner] = mine
}

func (c *conflictTracker) set(owner Owner, hs map[string]Mode) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held[owner] = hs
}

func (m *Manager) checkInvariants() error {
	m.init()
	var errs []error
	for _, ls := range m.sets {
		errs = append(errs, ls.set.checkInvariants())
		ls.mu.Lock()
		locks := make([]*SharedLock, 0, len(ls.locks))
		for _, lk := range ls.locks {
			locks = append(locks, lk)
		}
		ls.mu.Unlock()
		for _, lk := range locks {
			errs = append(errs, lk.checkInvariants())
		}
	}
	return errors.Join(errs...)
}

// TestStress runs many owners doing random things at random levels (sets,
// all, opportunistic, both modes, priorities, timeouts, downgrades, partial
// releases, adds and removes that fail waiters) and checks after every grant
// that no two owners hold conflicting modes, the lock invariants as it goes,
// and that everything finishes (a watchdog fails the test with a goroutine
// dump if it hangs: a deadlock).
func TestStress(t *testing.T) {
	goroutines, ops := 16, 600
	if testing.Short() {
		goroutines, ops = 6, 60
	}
	lv := DefaultLevels()
	counts := []int{0, 6, 3, 8, 8, 3}
	for l := 1; l < len(lv); l++ {
		for i := range counts[l] {
			lv[l].Members = append(lv[l].Members, fmt.Sprintf("%s%d", lv[l].Name, i+1))
		}
	}
	m, err := NewManager(Config{Levels: lv})
	must(t, err)
	tr := &conflictTracker{held: map[Owner]map[string]Mode{}}
	var unexpected sync.Map // unexpected errors, by text
	var stats sync.Map      // counters, by event
	count := func(ev string) {
		v, _ := stats.LoadOrStore(ev, new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	}

	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(g), 42))
			owner := Owner(fmt.Sprintf("g%d", g))
			ctx := func() (context.Context, context.CancelFunc) {
				switch rnd.IntN(6) {
				case 0:
					return context.WithCancel(bg) // no deadline: waits as long as it takes
				case 1:
					return context.WithTimeout(bg, 0)
				case 2:
					return context.WithTimeout(bg, time.Millisecond)
				case 3:
					return context.WithTimeout(bg, 5*time.Millisecond)
				default:
					return context.WithTimeout(bg, time.Duration(rnd.IntN(30))*time.Millisecond)
				}
			}
			expect := func(err error, ok ...Kind) {
				if err == nil {
					return
				}
				for _, k := range ok {
					if errors.Is(err, k) {
						count(k.String())
						return
					}
				}
				unexpected.Store(err.Error(), true)
			}
			mode := func(pShared float64) Mode {
				if rnd.Float64() < pShared {
					return Shared
				}
				return Exclusive
			}
			for op := range ops {
				c, cancel := ctx()
				_, err := m.Acquire(c, owner, LevelCluster, Request{Names: []string{BGL}, Mode: mode(0.93), Priority: rnd.IntN(5) - 2})
				cancel()
				if err != nil {
					expect(err, ErrTimeout)
					continue
				}
				count("bgl granted")
				tr.granted(owner, m.Holdings(owner))
				for l := Level(1); l < Level(len(lv)); l++ {
					names, _ := m.Names(l)
					upperFree := true // nothing held at l or above yet: we go up
					switch r := rnd.Float64(); {
					case r < 0.06 && upperFree:
						name := fmt.Sprintf("%s-g%d-%d", lv[l].Name, g, op)
						c, cancel := ctx()
						acquired := rnd.IntN(2) == 0
						err := m.Add(c, owner, l, []string{name}, acquired, mode(0.5))
						cancel()
						expect(err, ErrTimeout)
						if err == nil {
							count("added")
						}
						if err == nil && acquired {
							tr.granted(owner, m.Holdings(owner))
						}
						if acquired {
							continue // holds this level now
						}
					case r < 0.12 && upperFree && len(names) > 3:
						c, cancel := ctx()
						removed, err := m.Remove(c, owner, l, []string{names[rnd.IntN(len(names))]})
						cancel()
						expect(err, ErrTimeout)
						if len(removed) > 0 {
							count("removed")
						}
					}
					if rnd.Float64() < 0.45 {
						continue
					}
					req := Request{Mode: mode(0.5), Priority: rnd.IntN(5) - 2}
					switch r := rnd.Float64(); {
					case r < 0.15:
						req.All = true
					case r < 0.3:
						req.Opportunistic = true
						req.All = rnd.IntN(3) == 0
					}
					if !req.All {
						for _, n := range names {
							if rnd.IntN(3) == 0 {
								req.Names = append(req.Names, n)
							}
						}
						switch rnd.IntN(10) {
						case 0:
							req.Names = append(req.Names, "gone")
						case 1, 2:
							// Created on first use; gone again once unused.
							req.Names = append(req.Names, fmt.Sprintf("tmp%d", rnd.IntN(3)))
							req.Create = true
						}
					}
					c, cancel := ctx()
					_, err := m.Acquire(c, owner, l, req)
					cancel()
					if err != nil {
						expect(err, ErrTimeout, ErrNotFound)
						continue
					}
					count(fmt.Sprintf("level granted (all=%v opportunistic=%v)", req.All, req.Opportunistic))
					if req.Create {
						count("granted with create")
					}
					tr.granted(owner, m.Holdings(owner))
					if rnd.IntN(8) == 0 && m.IsOwned(owner, l) {
						after := map[string]Mode{}
						for _, h := range m.Holdings(owner) {
							if h.Level == l {
								h.Mode = Shared
							}
							after[h.Lock] = h.Mode
						}
						tr.set(owner, after)
						expect(m.Downgrade(owner, l))
						count("downgraded")
					}
				}
				// Release a lower level early sometimes (allowed), then everything.
				if l := Level(1 + rnd.IntN(len(lv)-1)); rnd.IntN(4) == 0 && m.IsOwned(owner, l) {
					rest := map[string]Mode{}
					for _, h := range m.Holdings(owner) {
						if h.Level != l {
							rest[h.Lock] = h.Mode
						}
					}
					tr.set(owner, rest)
					expect(m.Release(owner, l))
				}
				if rnd.IntN(10) == 0 {
					if err := m.checkInvariants(); err != nil {
						unexpected.Store("invariant: "+err.Error(), true)
					}
					for _, ls := range m.sets {
						if err := ls.checkImplicit(); err != nil {
							unexpected.Store("invariant: "+err.Error(), true)
						}
					}
				}
				tr.set(owner, nil)
				expect(m.ReleaseAll(owner))
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(90 * time.Second):
		t.Fatalf("stress test hung (deadlock?)\n%s", stacks())
	}
	stats.Range(func(k, v any) bool {
		t.Logf("%s: %d", k, v.(*atomic.Int64).Load())
		return true
	})
	unexpected.Range(func(k, _ any) bool {
		t.Errorf("unexpected: %v", k)
		return true
	})
	for _, e := range tr.errs {
		t.Errorf("conflict: %s", e)
	}
	must(t, m.checkInvariants())
	for _, ls := range m.sets {
		must(t, ls.checkImplicit())
		if _, implicit := ls.contents(); implicit != 0 {
			t.Errorf("%s: %d implicit members left, unused", ls.name, implicit)
		}
	}
	for _, r := range m.Snapshot() {
		if r.State != StateNone || r.Pending != nil {
			t.Errorf("lock left behind: %+v", r)
		}
	}
	// The run must have exercised what it claims to.
	for _, ev := range []string{"bgl granted", "added", "granted with create", "removed", "downgraded", "timeout", ErrNotFound.String(),
		"level granted (all=true opportunistic=false)", "level granted (all=false opportunistic=true)"} {
		if v, ok := stats.Load(ev); !ok || v.(*atomic.Int64).Load() == 0 {
			t.Errorf("no %q event in the stress run", ev)
		}
	}
}

// TestStressSharedLock hammers one SharedLock directly: random modes,
// priorities, timeouts, cancellations, downgrades; after every grant the
// holder set must be consistent.
func TestStressSharedLock(t *testing.T) {
	goroutines, ops := 16, 400
	if testing.Short() {
		goroutines, ops = 8, 100
	}
	l := NewSharedLock("hot", nil)
	var mu sync.Mutex
	holders := map[Owner]Mode{}
	var conflicts []string
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(g), 7))
			o := Owner(fmt.Sprint("g", g))
			for range ops {
				mode := Mode(rnd.IntN(2))
				c, cancel := context.WithTimeout(bg, time.Duration(rnd.IntN(4))*time.Millisecond)
				if rnd.IntN(4) == 0 {
					cancel()
					c, cancel = context.WithCancel(bg)
				}
				err := l.Acquire(c, o, mode, rnd.IntN(7)-3)
				cancel()
				if err != nil {
					if !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrCanceled) {
						mu.Lock()
						conflicts = append(conflicts, "unexpected "+err.Error())
						mu.Unlock()
					}
					continue
				}
				mu.Lock()
				for other, m := range holders {
					if m == Exclusive || mode == Exclusive {
						conflicts = append(conflicts, fmt.Sprintf("%s %v with %s %v", o, mode, other, m))
					}
				}
				holders[o] = mode
				mu.Unlock()
				if mode == Exclusive && rnd.IntN(3) == 0 {
					mu.Lock()
					holders[o] = Shared
					mu.Unlock()
					if err := l.Downgrade(o); err != nil {
						t.Error(err)
					}
				}
				if err := l.checkInvariants(); err != nil {
					t.Error(err)
				}
				mu.Lock()
				delete(holders, o)
				mu.Unlock()
				if err := l.Release(o); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatalf("stress test hung (deadlock?)\n%s", stacks())
	}
	for _, c := range conflicts {
		t.Error(c)
	}
	if info := l.Info(); info.State != StateNone || info.Pending != nil {
		t.Fatalf("lock left %+v", info)
	}
}
