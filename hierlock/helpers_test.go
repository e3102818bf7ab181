package hierlock

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// eventually polls cond until it holds; it fails the test after a generous
// bound (a hang, not a timing assertion).
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never happened: %s\n%s", what, stacks())
		}
		time.Sleep(200 * time.Microsecond)
	}
}

func stacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// queued reports whether owner waits in l's queue.
func queued(l *SharedLock, owner Owner) bool {
	for _, p := range l.Info().Pending {
		if slices.Contains(p.Owners, owner) {
			return true
		}
	}
	return false
}

func waitQueued(t testing.TB, l *SharedLock, owners ...Owner) {
	t.Helper()
	for _, o := range owners {
		eventually(t, fmt.Sprintf("%s queued on %s", o, l.Name()), func() bool { return queued(l, o) })
	}
}

// async runs f in a goroutine and returns the channel of its result.
func async(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

// result waits for an async result (bounded, see eventually).
func result(t testing.TB, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("call never returned\n%s", stacks())
		return nil
	}
}

// notReturned asserts that an async call is still blocked.
func notReturned(t testing.TB, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s returned (%v) but should still wait", what, err)
	default:
	}
}

func timeoutCtx(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	_ = cancel // released by the timer; keeps tests short
	return ctx
}

func wantKind(t testing.TB, err error, k Kind) {
	t.Helper()
	if !errors.Is(err, k) {
		t.Fatalf("got error %v, want %v", err, k)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// recorder collects labels in the order goroutines report them.
type recorder struct {
	mu  sync.Mutex
	got []string
}

func (r *recorder) add(s string) {
	r.mu.Lock()
	r.got = append(r.got, s)
	r.mu.Unlock()
}

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// fakeClock is a Clock whose time moves only when the test says so, and
// whose timers fire only when the test fires them (early, if it likes).
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
	made   int // timers created so far
}

type fakeTimer struct {
	c       chan time.Time
	due     time.Time
	stopped bool
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }
func (t *fakeTimer) Stop() bool {
	was := !t.stopped
	t.stopped = true
	return was
}

func newFakeClock(now time.Time) *fakeClock { return &fakeClock{now: now} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: make(chan time.Time, 1), due: c.now.Add(d)}
	c.timers = append(c.timers, t)
	c.made++
	return t
}

func (c *fakeClock) created() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.made
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// fireAll fires every timer at once, due or not (spurious wake-ups).
func (c *fakeClock) fireAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.timers {
		select {
		case t.c <- c.now:
		default:
		}
	}
	c.timers = nil
}

// checkInvariants verifies the SharedLock invariants of the package comment.
func (l *SharedLock) checkInvariants() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.exc != "" && len(l.shr) > 0 {
		return fmt.Errorf("%s: exclusive %q and shared %v at once", l.name, l.exc, l.shr)
	}
	if l.deleted && (l.exc != "" || len(l.shr) > 0 || len(l.queue) > 0) {
		return fmt.Errorf("%s: deleted but held or queued", l.name)
	}
	if len(l.queue) > 0 && l.compatibleLocked(l.queue[0].entries[0].mode) {
		return fmt.Errorf("%s: head entry fits the holders but waits (lost wake-up)", l.name)
	}
	n := 0
	for i, q := range l.queue {
		if len(q.entries) == 0 {
			return fmt.Errorf("%s: empty priority queue", l.name)
		}
		if i > 0 && l.queue[i-1].prio >= q.prio {
			return fmt.Errorf("%s: priorities out of order", l.name)
		}
		shared := 0
		for _, e := range q.entries {
			if e.mode == Shared {
				shared++
				if q.shared != e {
					return fmt.Errorf("%s: shared entry not the open one", l.name)
				}
			}
			if e.mode == Exclusive && len(e.owners) != 1 {
				return fmt.Errorf("%s: exclusive entry with %d owners", l.name, len(e.owners))
			}
			for _, o := range e.owners {
				if l.waiting[o] != e {
					return fmt.Errorf("%s: %q queued but not indexed", l.name, o)
				}
				if _, held := l.holdsLocked(o); held {
					return fmt.Errorf("%s: %q both holds and waits", l.name, o)
				}
				n++
			}
		}
		if shared > 1 {
			return fmt.Errorf("%s: %d shared entries at priority %d", l.name, shared, q.prio)
		}
	}
	if n != len(l.waiting) {
		return fmt.Errorf("%s: %d queued owners, %d indexed", l.name, n, len(l.waiting))
	}
	return nil
}
