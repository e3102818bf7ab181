package lockmgr

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// convDriver is a memDriver that converts leases in place, as the
// lockspace driver does with its OFD locks.
type convDriver struct{ *memDriver }

func (d convDriver) Convert(_ context.Context, l Lease, m Mode) (Lease, error) {
	if d.convHang != nil {
		<-d.convHang
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.converts++
	ml := l.(*memLease)
	k := ml.r.Key()
	if m == Exclusive {
		if d.shared[k] > 1 {
			return nil, &BusyError{Resource: ml.r}
		}
		d.shared[k]--
		d.excl[k] = true
		d.tokens[k]++ // an upgrade is a new grant
		ml.tok = d.tokens[k]
	} else {
		delete(d.excl, k)
		d.shared[k]++
	}
	ml.r.Mode = m
	return ml, nil
}

// modeOf returns the mode in which the Manager's monitor shows uuid
// holding the disk path, and false if it does not hold it.
func modeOf(m *Manager, uuid, path string) (Mode, bool) {
	for _, l := range m.Locks() {
		if l.Resource.Name != path {
			continue
		}
		for _, h := range l.Holders {
			if h.UUID == uuid {
				return h.Mode, true
			}
		}
	}
	return 0, false
}

func TestChangeModeConvertsInPlace(t *testing.T) {
	ctx := context.Background()
	d := convDriver{newMemDriver()}
	obs := &recordingObserver{}
	m := NewManager(d, Options{Observer: obs})
	other := NewManager(d, Options{}) // another daemon on the same locks
	register(t, m, uuidA, "vm", DiskResource("/img/base", Shared))
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive)); err != nil {
		t.Fatal(err)
	}
	if mode, ok := modeOf(m, uuidA, "/img/base"); !ok || mode != Exclusive {
		t.Fatalf("after the upgrade the monitor shows %v %v, want exclusive", mode, ok)
	}
	ls, _, _ := m.Held(uuidA)
	if len(ls) != 1 || ls[0].Resource().Mode != Exclusive {
		t.Fatalf("held leases %v, want one exclusive lease", ls)
	}
	// Nobody else gets it, in this Manager or through the driver.
	register(t, m, uuidB, "b", DiskResource("/img/base", Shared))
	if err := m.Acquire(ctx, uuidB, ""); !errors.Is(err, ErrBusy) {
		t.Fatalf("shared acquire by another object during exclusive hold: %v, want busy", err)
	}
	register(t, other, uuidB, "b", DiskResource("/img/base", Shared))
	if err := other.Acquire(ctx, uuidB, ""); !errors.Is(err, ErrBusy) {
		t.Fatalf("shared acquire through another Manager: %v, want busy", err)
	}
	// Back to shared: now a sharer gets in.
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Shared)); err != nil {
		t.Fatal(err)
	}
	if err := other.Acquire(ctx, uuidB, ""); err != nil {
		t.Fatalf("shared acquire after the downgrade: %v", err)
	}
	// With a second sharer, the upgrade is refused and nothing changes.
	err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive))
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("upgrade with another sharer: %v, want busy", err)
	}
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Shared {
		t.Fatalf("after a refused upgrade the mode is %v, want shared", mode)
	}
	if got := obs.counts[uuidA]; got != [2]int{1, 0} {
		t.Fatalf("observer says a holds %v, want 1 lease", got)
	}
}

func TestChangeModeRefusesConflictsInTheTable(t *testing.T) {
	ctx := context.Background()
	d := convDriver{newMemDriver()}
	m := NewManager(d, Options{})
	register(t, m, uuidA, "a", DiskResource("/img/base", Shared))
	register(t, m, uuidB, "b", DiskResource("/img/base", Shared))
	for _, u := range []string{uuidA, uuidB} {
		if err := m.Acquire(ctx, u, ""); err != nil {
			t.Fatal(err)
		}
	}
	err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive))
	var be *BusyError
	if !errors.As(err, &be) || be.Holder.UUID != uuidB || be.Holder.Mode != Shared {
		t.Fatalf("upgrade while b shares: %v, want busy naming b", err)
	}
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Shared {
		t.Fatalf("mode after the refusal: %v", mode)
	}
}

func TestChangeModeWithoutConverter(t *testing.T) {
	ctx := context.Background()
	d := newMemDriver() // its leases exclude each other, like OFD locks
	m := NewManager(d, Options{})
	register(t, m, uuidA, "a", DiskResource("/img/base", Shared), DiskResource("/img/ro", ReadOnly))
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	// Acquire-new-then-release-old meets our own lease: refused, unchanged.
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive)); !errors.Is(err, ErrBusy) {
		t.Fatalf("upgrade without a converter: %v, want busy", err)
	}
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Shared || !d.held("disk:/img/base") {
		t.Fatalf("after the refusal: mode %v, driver holds %v", mode, d.held("disk:/img/base"))
	}
	// To read-only: the lease goes, the use stays recorded.
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", ReadOnly)); err != nil {
		t.Fatal(err)
	}
	if mode, ok := modeOf(m, uuidA, "/img/base"); !ok || mode != ReadOnly || d.held("disk:/img/base") {
		t.Fatalf("after the change to read-only: mode %v %v, driver holds %v", mode, ok, d.held("disk:/img/base"))
	}
	// From read-only: a lease is acquired; its token is the new grant's.
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/ro", Exclusive)); err != nil {
		t.Fatal(err)
	}
	ls, ro, _ := m.Held(uuidA)
	if len(ls) != 1 || ls[0].Resource().Name != "/img/ro" || ls[0].Token() != d.token("disk:/img/ro") || len(ro) != 1 {
		t.Fatalf("held %v, read-only %v", ls, ro)
	}
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/none", Shared)); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("change of a resource not held: %v, want not held", err)
	}
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/ro", Exclusive)); err != nil {
		t.Fatalf("change to the same mode: %v, want a no-op", err)
	}
}

// gateDriver is a NopDriver whose exclusive grants wait at a gate, so that
// a test can act while one is in flight.
type gateDriver struct {
	NopDriver
	entered chan struct{}
	gate    chan struct{}
}

func (d gateDriver) Acquire(ctx context.Context, reqs []Request) ([]Lease, error) {
	if reqs[0].Resource.Mode == Exclusive {
		d.entered <- struct{}{}
		<-d.gate
	}
	return d.NopDriver.Acquire(ctx, reqs)
}

func TestChangeModeReservesTheKey(t *testing.T) {
	// The NopDriver locks nothing: only the Manager's reservation of the key
	// keeps a sharer out while an upgrade to exclusive is being granted.
	for _, from := range []Mode{Shared, ReadOnly} {
		t.Run(from.String(), func(t *testing.T) {
			ctx := context.Background()
			d := gateDriver{entered: make(chan struct{}), gate: make(chan struct{})}
			m := NewManager(d, Options{})
			register(t, m, uuidA, "a", DiskResource("/img/base", from))
			if err := m.Acquire(ctx, uuidA, ""); err != nil {
				t.Fatal(err)
			}
			register(t, m, uuidB, "b")
			done := make(chan error, 1)
			go func() { done <- m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive)) }()
			<-d.entered
			err := m.AcquireResource(ctx, uuidB, DiskResource("/img/base", Shared))
			var be *BusyError
			if !errors.As(err, &be) || be.Holder.UUID != uuidA || be.Holder.Mode != Exclusive {
				t.Errorf("shared acquire during an upgrade to exclusive: %v, want busy naming a", err)
			}
			close(d.gate)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			for _, l := range m.Locks() {
				if len(l.Holders) != 1 {
					t.Fatalf("after the upgrade %s has holders %+v, want a alone", l.Resource, l.Holders)
				}
			}
		})
	}
}

func TestChangeModeBusyDoesNotNameTheCaller(t *testing.T) {
	ctx := context.Background()
	d := convDriver{newMemDriver()}
	m := NewManager(d, Options{})
	other := NewManager(d, Options{}) // the sharer is unknown to m's table
	register(t, m, uuidA, "a", DiskResource("/img/base", Shared))
	register(t, other, uuidB, "b", DiskResource("/img/base", Shared))
	for _, c := range []struct {
		m    *Manager
		uuid string
	}{{m, uuidA}, {other, uuidB}} {
		if err := c.m.Acquire(ctx, c.uuid, ""); err != nil {
			t.Fatal(err)
		}
	}
	err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive))
	var be *BusyError
	if !errors.As(err, &be) {
		t.Fatalf("upgrade while another Manager's object shares: %v, want busy", err)
	}
	if be.Holder.UUID == uuidA {
		t.Fatalf("busy error %q names the caller itself as the holder", err)
	}
}

func TestChangeModeTimeoutUndoesALateConversion(t *testing.T) {
	md := newMemDriver()
	md.convHang = make(chan struct{})
	d := convDriver{md}
	obs := &recordingObserver{}
	m := NewManager(d, Options{Observer: obs})
	register(t, m, uuidA, "a", DiskResource("/img/base", Shared))
	if err := m.Acquire(context.Background(), uuidA, ""); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Exclusive)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("upgrade on a hung driver = %v, want timeout", err)
	}
	close(md.convHang) // the late conversion must be undone
	deadline := time.Now().Add(5 * time.Second)
	for {
		md.mu.Lock()
		n, excl, shared := md.converts, md.excl["disk:/img/base"], md.shared["disk:/img/base"]
		md.mu.Unlock()
		if n >= 2 {
			if excl || shared != 1 {
				t.Fatalf("after the undo the driver holds exclusive=%v shared=%d, want one shared lease", excl, shared)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the late conversion of a timed-out ChangeMode was not undone")
		}
		time.Sleep(time.Millisecond)
	}
	ls, _, _ := m.Held(uuidA)
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Shared || len(ls) != 1 || ls[0].Resource().Mode != Shared {
		t.Fatalf("after the timeout the table says %v and the lease %v, want shared", mode, ls)
	}
	// The upgrade undone keeps its token, and the state shows that one: a
	// handover with it is not refused as stale.
	for {
		st, err := m.Inquire(uuidA)
		if err != nil {
			t.Fatal(err)
		}
		want := md.token("disk:/img/base")
		if strings.Contains(st, fmt.Sprintf(":%d:", want)) {
			if obs.last(uuidA) != want {
				t.Fatalf("the observer was last told of token %d, want %d", obs.last(uuidA), want)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("state after the undone upgrade = %q, want the current token %d", st, want)
		}
		time.Sleep(time.Millisecond)
	}
}
