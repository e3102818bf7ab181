package lockmgr

import (
	"context"
	"errors"
	"testing"
)

// convDriver is a memDriver that converts leases in place, as the
// lockspace driver does with its OFD locks.
type convDriver struct{ *memDriver }

func (d convDriver) Convert(_ context.Context, l Lease, m Mode) (Lease, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ml := l.(*memLease)
	k := ml.r.Key()
	if m == Exclusive {
		if d.shared[k] > 1 {
			return nil, &BusyError{Resource: ml.r}
		}
		d.shared[k]--
		d.excl[k] = true
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
	if got := obs.last[uuidA]; got != [2]int{1, 0} {
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
