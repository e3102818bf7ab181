package lockmgr

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
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

// modes returns whether the driver holds key exclusively, and how many
// shared leases of it it holds.
func (d *memDriver) modes(key string) (bool, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.excl[key], d.shared[key]
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

// lastObserver keeps what each object was last said to hold, fails every
// call while fail is set, and calls during (if set) before it answers.
type lastObserver struct {
	mu     sync.Mutex
	fail   error
	during func(ctx context.Context)
	leases map[string][]Lease
	ro     map[string][]Resource
}

func (o *lastObserver) Changed(ctx context.Context, ob Object, ls []Lease, ro []Resource) error {
	o.mu.Lock()
	if o.leases == nil {
		o.leases, o.ro = map[string][]Lease{}, map[string][]Resource{}
	}
	o.leases[ob.UUID], o.ro[ob.UUID] = ls, ro
	fail, during := o.fail, o.during
	o.mu.Unlock()
	if during != nil {
		during(ctx)
	}
	return fail
}

func (o *lastObserver) failWith(err error, during func(context.Context)) {
	o.mu.Lock()
	o.fail, o.during = err, during
	o.mu.Unlock()
}

// told returns the mode of the one resource uuid was last said to hold,
// and its token (0 for a read-only use).
func (o *lastObserver) told(t *testing.T, uuid string) (Mode, uint64) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	ls, ro := o.leases[uuid], o.ro[uuid]
	switch {
	case len(ls) == 1 && len(ro) == 0:
		return ls[0].Resource().Mode, ls[0].Token()
	case len(ls) == 0 && len(ro) == 1:
		return ReadOnly, 0
	}
	t.Fatalf("the observer was last told that %s holds leases %v and read-only %v, want one resource", uuid, ls, ro)
	return 0, 0
}

// tallyDriver is a NopDriver that counts its live leases by mode: leases
// of one holder do not exclude each other, so ChangeMode acquires the new
// one before it releases the old.
type tallyDriver struct {
	NopDriver
	mu   sync.Mutex
	live map[Mode]int
}

func (d *tallyDriver) Acquire(ctx context.Context, reqs []Request) ([]Lease, error) {
	d.mu.Lock()
	for _, q := range reqs {
		d.live[q.Resource.Mode]++
	}
	d.mu.Unlock()
	return d.NopDriver.Acquire(ctx, reqs)
}

func (d *tallyDriver) Release(_ context.Context, ls []Lease) error {
	d.mu.Lock()
	for _, l := range ls {
		d.live[l.Resource().Mode]--
	}
	d.mu.Unlock()
	return nil
}

func (d *tallyDriver) leases() map[Mode]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[Mode]int{}
	for m, n := range d.live {
		if n != 0 {
			out[m] = n
		}
	}
	return out
}

// A change of mode the observer cannot record (the daemon's lock-holder
// did not take it in time) is undone, whichever way the driver changed
// it: the call fails with the observer's error, the driver holds the
// resource in the old mode, the table shows the old mode with the
// driver's current token, and the observer was last told of the old mode.
func TestAChangeOfModeTheObserverCannotRecordIsUndone(t *testing.T) {
	const disk = "/img/base"
	key := DiskResource(disk, Exclusive).Key()
	type driverState func(t *testing.T)
	for _, c := range []struct {
		name     string
		from, to Mode
		driver   func() (Driver, driverState)
	}{
		{"converted upgrade", Shared, Exclusive, func() (Driver, driverState) {
			md := newMemDriver()
			return convDriver{md}, func(t *testing.T) {
				if excl, shared := md.modes(key); excl || shared != 1 {
					t.Fatalf("the driver holds exclusive=%v shared=%d, want one shared lease", excl, shared)
				}
			}
		}},
		{"converted downgrade", Exclusive, Shared, func() (Driver, driverState) {
			md := newMemDriver()
			return convDriver{md}, func(t *testing.T) {
				if excl, shared := md.modes(key); !excl || shared != 0 {
					t.Fatalf("the driver holds exclusive=%v shared=%d, want one exclusive lease", excl, shared)
				}
			}
		}},
		{"new lease without a converter", Shared, Exclusive, func() (Driver, driverState) {
			td := &tallyDriver{live: map[Mode]int{}}
			return td, func(t *testing.T) {
				if got := td.leases(); len(got) != 1 || got[Shared] != 1 {
					t.Fatalf("the driver's live leases by mode: %v, want the one shared lease", got)
				}
			}
		}},
		{"to read-only", Exclusive, ReadOnly, func() (Driver, driverState) {
			md := newMemDriver()
			return md, func(t *testing.T) {
				if excl, _ := md.modes(key); !excl {
					t.Fatal("the driver no longer holds the exclusive lease")
				}
			}
		}},
		{"from read-only", ReadOnly, Exclusive, func() (Driver, driverState) {
			md := newMemDriver()
			return md, func(t *testing.T) {
				if md.held(key) {
					t.Fatal("the driver still holds the lease of the undone change")
				}
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			d, driverIsAsBefore := c.driver()
			obs := &lastObserver{}
			m := NewManager(d, Options{Observer: obs})
			register(t, m, uuidA, "a", DiskResource(disk, c.from))
			if err := m.Acquire(ctx, uuidA, ""); err != nil {
				t.Fatal(err)
			}
			notRecorded := errors.New("not recorded")
			obs.failWith(notRecorded, nil)
			err := m.ChangeMode(ctx, uuidA, DiskResource(disk, c.to))
			if !errors.Is(err, notRecorded) {
				t.Fatalf("ChangeMode to %s with a failing observer = %v, want its error", c.to, err)
			}
			if want := "held " + c.from.Adverb() + " as before"; !strings.Contains(err.Error(), want) {
				t.Fatalf("the error %q does not say %q", err, want)
			}
			if mode, ok := modeOf(m, uuidA, disk); !ok || mode != c.from {
				t.Fatalf("the monitor shows a holding %s in %v (%v), want %v", disk, mode, ok, c.from)
			}
			driverIsAsBefore(t)
			ls, ro, _ := m.Held(uuidA)
			var tok uint64
			switch {
			case c.from == ReadOnly && len(ls) == 0 && len(ro) == 1:
			case c.from != ReadOnly && len(ls) == 1 && len(ro) == 0 && ls[0].Resource().Mode == c.from:
				tok = ls[0].Token()
			default:
				t.Fatalf("a holds leases %v and read-only %v, want %s in mode %v", ls, ro, disk, c.from)
			}
			st, _ := m.Inquire(uuidA)
			if want := fmt.Sprintf(":%s:%d:", c.from, tok); !strings.Contains(st, want) {
				t.Fatalf("state %q, want the old mode with the lease's token (%s)", st, want)
			}
			if mode, told := obs.told(t, uuidA); mode != c.from || told != tok {
				t.Fatalf("the observer was last told of %v token %d, want %v token %d", mode, told, c.from, tok)
			}
			// The object is as before: the change can be made later.
			obs.failWith(nil, nil)
			if err := m.ChangeMode(ctx, uuidA, DiskResource(disk, c.to)); err != nil {
				t.Fatalf("ChangeMode once the observer records again: %v", err)
			}
		})
	}
}

// A change that cannot be converted back after the observer failed to
// record it (another host took a shared lease meanwhile) fails with the
// observer's error saying it is held in the new mode, which the table and
// the observer show: the old mode is never claimed when it is not held.
func TestAChangeOfModeThatCannotBeConvertedBackSaysWhatIsHeld(t *testing.T) {
	ctx := context.Background()
	d := convDriver{newMemDriver()}
	obs := &lastObserver{}
	m := NewManager(d, Options{Observer: obs})
	other := NewManager(d, Options{}) // another host on the same locks
	register(t, m, uuidA, "a", DiskResource("/img/base", Exclusive))
	register(t, other, uuidB, "b")
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	notRecorded := errors.New("not recorded")
	var once sync.Once
	obs.failWith(notRecorded, func(ctx context.Context) {
		once.Do(func() {
			if err := other.AcquireResource(ctx, uuidB, DiskResource("/img/base", Shared)); err != nil {
				t.Errorf("another host's shared acquire after the downgrade: %v", err)
			}
		})
	})
	err := m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Shared))
	if !errors.Is(err, notRecorded) {
		t.Fatalf("ChangeMode = %v, want the observer's error", err)
	}
	if want := "held shared now"; !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "as before") {
		t.Fatalf("the error %q does not say %q (only)", err, want)
	}
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Shared {
		t.Fatalf("the monitor shows a holding it %v, want shared", mode)
	}
	if mode, _ := obs.told(t, uuidA); mode != Shared {
		t.Fatalf("the observer was last told of %v, want shared", mode)
	}
}

// An observer that has not recorded a change when the call's context ends
// (the daemon's lock-holder does not read) fails it: ChangeMode returns a
// timeout, with the change undone, rather than success after its deadline.
func TestAChangeOfModeNotRecordedByTheDeadlineFailsUndone(t *testing.T) {
	d := convDriver{newMemDriver()}
	var stuck bool
	// Like the lock-holder's client, once stuck: it waits until ctx ends.
	obs := func(ctx context.Context, ob Object, ls []Lease, ro []Resource) error {
		if !stuck || ctx.Done() == nil {
			return nil // the undo's record (no deadline) is written
		}
		<-ctx.Done()
		return &Error{Code: CodeTimeout, Msg: "not recorded in time", Err: ctx.Err()}
	}
	m := NewManager(d, Options{Observer: observerFunc(obs)})
	register(t, m, uuidA, "a", DiskResource("/img/base", Exclusive))
	if err := m.Acquire(context.Background(), uuidA, ""); err != nil {
		t.Fatal(err)
	}
	stuck = true
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Shared)) }()
	var err error
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("ChangeMode has not returned 30 s after its deadline")
	}
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("ChangeMode not recorded by its deadline = %v, want a timeout", err)
	}
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Exclusive {
		t.Fatalf("after the failed downgrade the table says %v, want exclusive", mode)
	}
	if excl, shared := d.modes("disk:/img/base"); !excl || shared != 0 {
		t.Fatalf("after the failed downgrade the driver holds exclusive=%v shared=%d, want one exclusive lease", excl, shared)
	}
}

type observerFunc func(ctx context.Context, o Object, ls []Lease, ro []Resource) error

func (f observerFunc) Changed(ctx context.Context, o Object, ls []Lease, ro []Resource) error {
	return f(ctx, o, ls, ro)
}

// lateJoinDriver is a convDriver whose downgrades wait for gate (after
// saying so on started) and, once done, let another host join the resource
// shared before they return: the conversion back of a late downgrade then
// meets that sharer.
type lateJoinDriver struct {
	convDriver
	started, gate chan struct{}
}

func (d lateJoinDriver) Convert(ctx context.Context, l Lease, m Mode) (Lease, error) {
	if m != Shared {
		return d.convDriver.Convert(ctx, l, m)
	}
	d.started <- struct{}{}
	<-d.gate
	nl, err := d.convDriver.Convert(ctx, l, m)
	r := l.Resource()
	r.Mode = Shared
	if _, jerr := d.memDriver.Acquire(context.Background(), []Request{{Resource: r}}); jerr != nil {
		panic(jerr)
	}
	return nl, err
}

// A downgrade that completes after its ChangeMode timed out and cannot be
// converted back (another host joined the resource shared meanwhile) stays
// shared, and the table and the observer say so: the object must not be
// shown exclusive while someone else shares the resource.
func TestALateDowngradeThatCannotBeConvertedBackIsShownShared(t *testing.T) {
	d := lateJoinDriver{convDriver{newMemDriver()}, make(chan struct{}), make(chan struct{})}
	told := make(chan struct{}, 16)
	obs := &lastObserver{}
	m := NewManager(d, Options{Observer: observerFunc(func(ctx context.Context, o Object, ls []Lease, ro []Resource) error {
		err := obs.Changed(ctx, o, ls, ro)
		told <- struct{}{}
		return err
	})})
	register(t, m, uuidA, "a", DiskResource("/img/base", Exclusive))
	if err := m.Acquire(context.Background(), uuidA, ""); err != nil {
		t.Fatal(err)
	}
	<-told
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.ChangeMode(ctx, uuidA, DiskResource("/img/base", Shared)) }()
	<-d.started
	cancel()
	if err := <-done; !errors.Is(err, ErrTimeout) {
		t.Fatalf("a downgrade whose context ended in the driver = %v, want a timeout", err)
	}
	close(d.gate) // the downgrade completes; another host joins
	select {
	case <-told:
	case <-time.After(30 * time.Second):
		t.Fatal("the observer was never told what became of the late downgrade")
	}
	if excl, shared := d.modes("disk:/img/base"); excl || shared != 2 {
		t.Fatalf("the driver holds exclusive=%v shared=%d, want a's lease and the other host's, shared", excl, shared)
	}
	if mode, _ := modeOf(m, uuidA, "/img/base"); mode != Shared {
		t.Fatalf("the table shows a holding the disk %v, want shared, as the driver holds it", mode)
	}
	if mode, _ := obs.told(t, uuidA); mode != Shared {
		t.Fatalf("the observer was last told that a holds the disk %v, want shared", mode)
	}
}
