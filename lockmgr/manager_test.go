package lockmgr

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memDriver is an in-memory driver for testing the Manager's logic: it
// enforces modes across Managers that share it, keeps tokens, and can be
// made to hang.
type memDriver struct {
	mu     sync.Mutex
	excl   map[string]bool
	shared map[string]int
	tokens map[string]uint64
	hang   chan struct{} // if not nil, Acquire blocks until it is closed
	// releasing, if not nil, is signalled when Release starts, and Release
	// then blocks until finish is closed.
	releasing chan struct{}
	finish    chan struct{}
	// convHang, if not nil, makes convDriver.Convert block until it is
	// closed; converts counts conversions.
	convHang chan struct{}
	converts int
	// releaseErr, if not nil, is returned by Release (which releases all
	// the same).
	releaseErr error
}

func newMemDriver() *memDriver {
	return &memDriver{excl: map[string]bool{}, shared: map[string]int{}, tokens: map[string]uint64{}}
}

type memLease struct {
	r   Resource
	tok uint64
}

func (l *memLease) Resource() Resource { return l.r }
func (l *memLease) Token() uint64      { return l.tok }

func (d *memDriver) Name() string { return "mem" }
func (d *memDriver) Close() error { return nil }

func (d *memDriver) Acquire(ctx context.Context, reqs []Request) ([]Lease, error) {
	if d.hang != nil {
		<-d.hang
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []Lease
	for _, q := range reqs {
		k := q.Resource.Key()
		busy := d.excl[k] || q.Resource.Mode == Exclusive && d.shared[k] > 0
		var err error
		switch {
		case busy:
			err = &BusyError{Resource: q.Resource}
		case q.Expect != 0 && q.Expect != d.tokens[k]:
			err = &StaleStateError{Resource: q.Resource, Want: q.Expect, Current: d.tokens[k]}
		}
		if err != nil {
			d.releaseLocked(out)
			return nil, err
		}
		if q.Resource.Mode == Exclusive {
			d.excl[k] = true
		} else {
			d.shared[k]++
		}
		d.tokens[k]++
		out = append(out, &memLease{q.Resource, d.tokens[k]})
	}
	return out, nil
}

func (d *memDriver) releaseLocked(ls []Lease) {
	for _, l := range ls {
		k := l.Resource().Key()
		if l.Resource().Mode == Exclusive {
			delete(d.excl, k)
		} else {
			d.shared[k]--
		}
	}
}

func (d *memDriver) Release(_ context.Context, ls []Lease) error {
	if d.releasing != nil {
		d.releasing <- struct{}{}
		<-d.finish
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.releaseLocked(ls)
	return d.releaseErr
}

func (d *memDriver) token(k string) uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.tokens[k]
}

func (d *memDriver) held(k string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.excl[k] || d.shared[k] > 0
}

const (
	uuidA = "aaaaaaaa-0000-0000-0000-000000000001"
	uuidB = "bbbbbbbb-0000-0000-0000-000000000002"
)

func register(t *testing.T, m *Manager, uuid, name string, rs ...Resource) {
	t.Helper()
	if err := m.Register(Object{UUID: uuid, Name: name, PID: 100, Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if err := m.AddResource(uuid, r); err != nil {
			t.Fatal(err)
		}
	}
}

func TestAcquireAllOrNothing(t *testing.T) {
	d := newMemDriver()
	m := NewManager(d, Options{})
	register(t, m, uuidB, "other", DiskResource("/img/c", Exclusive))
	if err := m.Acquire(context.Background(), uuidB, ""); err != nil {
		t.Fatal(err)
	}
	register(t, m, uuidA, "web1", DiskResource("/img/a", Exclusive), DiskResource("/img/b", Exclusive), DiskResource("/img/c", Exclusive))
	err := m.Acquire(context.Background(), uuidA, "")
	var be *BusyError
	if !errors.As(err, &be) {
		t.Fatalf("Acquire = %v, want busy", err)
	}
	if be.Resource.Name != "/img/c" || be.Holder.UUID != uuidB || be.Holder.Name != "other" {
		t.Fatalf("busy error names %v held by %+v, want /img/c held by %s", be.Resource, be.Holder, uuidB)
	}
	for _, p := range []string{"/img/a", "/img/b"} {
		if d.held("disk:" + p) {
			t.Errorf("%s still held after a failed all-or-nothing acquire", p)
		}
	}
	if st, _ := m.Inquire(uuidA); st != "v1:" {
		t.Errorf("Inquire after failure = %q, want nothing held", st)
	}
}

func TestModesBetweenObjects(t *testing.T) {
	cases := []struct {
		first, second Mode
		busy          bool
	}{
		{Exclusive, Exclusive, true},
		{Exclusive, Shared, true},
		{Shared, Exclusive, true},
		{Shared, Shared, false},
		{ReadOnly, Exclusive, false},
		{Exclusive, ReadOnly, false},
	}
	for _, c := range cases {
		t.Run(c.first.String()+"/"+c.second.String(), func(t *testing.T) {
			m := NewManager(newMemDriver(), Options{})
			register(t, m, uuidA, "a", DiskResource("/img/x", c.first))
			register(t, m, uuidB, "b", DiskResource("/img/x", c.second))
			if err := m.Acquire(context.Background(), uuidA, ""); err != nil {
				t.Fatal(err)
			}
			err := m.Acquire(context.Background(), uuidB, "")
			if got := errors.Is(err, ErrBusy); got != c.busy {
				t.Fatalf("second acquire = %v, want busy=%v", err, c.busy)
			}
		})
	}
}

func TestReleaseStateAndStaleHandover(t *testing.T) {
	d := newMemDriver()
	src := NewManager(d, Options{})
	dst := NewManager(d, Options{}) // another host sharing the driver
	other := NewManager(d, Options{})
	ctx := context.Background()
	register(t, src, uuidA, "vm", DiskResource("/img/a", Exclusive))
	if err := src.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	state, err := src.Release(ctx, uuidA, nil)
	if err != nil || !strings.Contains(state, ":1:") {
		t.Fatalf("Release = %q, %v; want a state with token 1", state, err)
	}
	// Handover succeeds while nobody took the disk in between.
	register(t, dst, uuidA, "vm", DiskResource("/img/a", Exclusive))
	if err := dst.Acquire(ctx, uuidA, state); err != nil {
		t.Fatalf("handover acquire: %v", err)
	}
	st2, _ := dst.Release(ctx, uuidA, nil)
	// Someone else takes and releases it: the old state is stale now.
	register(t, other, uuidB, "intruder", DiskResource("/img/a", Exclusive))
	other.Acquire(ctx, uuidB, "")
	other.Release(ctx, uuidB, nil)
	err = src.Acquire(ctx, uuidA, st2)
	var se *StaleStateError
	if !errors.As(err, &se) || se.Want != 2 || se.Current != 3 {
		t.Fatalf("stale acquire = %v, want StaleStateError want 2 current 3", err)
	}
	if d.held("disk:/img/a") {
		t.Fatal("a stale acquire left the disk held")
	}
	// A state naming a resource the object does not use is refused.
	if err := src.Acquire(ctx, uuidA, "v1:disk:exclusive:3:%2Fimg%2Fzzz"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("acquire with foreign state = %v, want invalid argument", err)
	}
}

func TestHotplugAndUnplug(t *testing.T) {
	d := newMemDriver()
	m := NewManager(d, Options{})
	ctx := context.Background()
	register(t, m, uuidA, "vm", DiskResource("/img/a", Exclusive))
	m.Acquire(ctx, uuidA, "")
	if err := m.AcquireResource(ctx, uuidA, DiskResource("/img/b", Shared)); err != nil {
		t.Fatal(err)
	}
	if !d.held("disk:/img/b") {
		t.Fatal("hotplugged disk not held")
	}
	r := DiskResource("/img/b", Shared)
	st, err := m.Release(ctx, uuidA, &r)
	if err != nil || !strings.Contains(st, "img%2Fb") || strings.Contains(st, "img%2Fa") {
		t.Fatalf("unplug state = %q, %v", st, err)
	}
	if d.held("disk:/img/b") || !d.held("disk:/img/a") {
		t.Fatal("unplug released the wrong disk")
	}
	if _, err := m.Release(ctx, uuidA, &r); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("second unplug = %v, want not held", err)
	}
	// A failed hotplug leaves the object as it was.
	register(t, m, uuidB, "other", DiskResource("/img/c", Exclusive))
	m.Acquire(ctx, uuidB, "")
	if err := m.AcquireResource(ctx, uuidA, DiskResource("/img/c", Exclusive)); !errors.Is(err, ErrBusy) {
		t.Fatalf("hotplug of a busy disk = %v", err)
	}
	if st, _ := m.Inquire(uuidA); strings.Contains(st, "img%2Fc") {
		t.Fatalf("failed hotplug is recorded: %q", st)
	}
}

func TestHungDriverTimesOutAndUndoesLateGrant(t *testing.T) {
	d := newMemDriver()
	d.hang = make(chan struct{})
	m := NewManager(d, Options{})
	register(t, m, uuidA, "vm", DiskResource("/img/a", Exclusive))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := m.Acquire(ctx, uuidA, "")
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("Acquire on a hung driver = %v, want timeout", err)
	}
	// Other objects are not blocked while the driver hangs for this one.
	if err := m.Register(Object{UUID: uuidB, PID: 1}); err != nil {
		t.Fatal(err)
	}
	close(d.hang) // the late grant must be released, not leaked
	deadline := time.Now().Add(5 * time.Second)
	for d.held("disk:/img/a") || d.token("disk:/img/a") == 0 {
		if time.Now().After(deadline) {
			t.Fatal("late grant of a timed-out acquire was leaked")
		}
		time.Sleep(time.Millisecond)
	}
}

// recordingObserver keeps the last holding reported for each object.
type recordingObserver struct {
	mu     sync.Mutex
	counts map[string][2]int // leases, read-only uses
	tokens map[string]uint64 // the first lease's token, as a record would keep it
	fail   error             // what Changed returns
}

func (r *recordingObserver) Changed(_ context.Context, o Object, ls []Lease, ro []Resource) error {
	r.mu.Lock()
	if r.counts == nil {
		r.counts, r.tokens = map[string][2]int{}, map[string]uint64{}
	}
	r.counts[o.UUID] = [2]int{len(ls), len(ro)}
	if len(ls) > 0 {
		r.tokens[o.UUID] = ls[0].Token()
	}
	r.mu.Unlock()
	return r.fail
}

// last returns the token of uuid's first lease when the observer was last told.
func (r *recordingObserver) last(uuid string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.tokens[uuid]
}

func TestLocksMonitorObserverAndRestore(t *testing.T) {
	d := newMemDriver()
	obs := &recordingObserver{}
	m := NewManager(d, Options{Observer: obs})
	ctx := context.Background()
	register(t, m, uuidA, "a", DiskResource("/img/s", Shared), DiskResource("/img/ro", ReadOnly))
	register(t, m, uuidB, "b", DiskResource("/img/s", Shared))
	m.Acquire(ctx, uuidA, "")
	m.Acquire(ctx, uuidB, "")
	locks := m.Locks()
	if len(locks) != 2 || locks[0].Resource.Name != "/img/ro" || locks[1].Resource.Name != "/img/s" {
		t.Fatalf("Locks = %+v", locks)
	}
	if len(locks[1].Holders) != 2 || locks[1].Resource.Mode != Shared || locks[1].Token != 2 {
		t.Fatalf("shared lock entry = %+v", locks[1])
	}
	if locks[0].Resource.Mode != ReadOnly || locks[0].Holders[0].UUID != uuidA {
		t.Fatalf("read-only entry = %+v", locks[0])
	}
	if got := obs.counts[uuidA]; got != [2]int{1, 1} {
		t.Fatalf("observer says a holds %v, want 1 lease and 1 read-only use", got)
	}
	if err := m.Unregister(ctx, uuidB); err != nil || obs.counts[uuidB] != [2]int{0, 0} {
		t.Fatalf("Unregister: %v, observer says b holds %v", err, obs.counts[uuidB])
	}
	// A restarted daemon restores a holder without calling the driver.
	ls, ro, _ := m.Held(uuidA)
	m2 := NewManager(d, Options{})
	if err := m2.Restore(Object{UUID: uuidA, Name: "a", PID: 100}, ls, ro, time.Now()); err != nil {
		t.Fatal(err)
	}
	register(t, m2, uuidB, "b", DiskResource("/img/s", Exclusive))
	err := m2.Acquire(ctx, uuidB, "")
	var be *BusyError
	if !errors.As(err, &be) || be.Holder.UUID != uuidA {
		t.Fatalf("acquire against a restored holder = %v", err)
	}
	if _, err := m2.Release(ctx, uuidA, nil); err != nil || d.held("disk:/img/s") {
		t.Fatalf("releasing a restored holder: %v (still held %v)", err, d.held("disk:/img/s"))
	}
}

func TestRegisterErrors(t *testing.T) {
	m := NewManager(NopDriver{}, Options{})
	if err := m.Register(Object{UUID: "nope"}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("bad uuid: %v", err)
	}
	register(t, m, uuidA, "a")
	if err := m.Register(Object{UUID: uuidA}); !errors.Is(err, ErrNotRegistered) {
		t.Fatalf("double register: %v", err)
	}
	if err := m.Acquire(context.Background(), uuidB, ""); !errors.Is(err, ErrNotRegistered) {
		t.Fatalf("acquire unknown: %v", err)
	}
	if err := m.AddResource(uuidA, DiskResource("/x/../..", Exclusive)); err != nil {
		t.Fatalf("a path with .. is fine once canonical: %v", err)
	}
	if err := m.AddResource(uuidA, DiskResource("/", Exclusive)); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("adding the same canonical resource twice: %v", err)
	}
}

func TestConcurrentExclusiveAcquiresWithNopDriverGrantOne(t *testing.T) {
	// NopDriver locks nothing, so only the Manager's reservation of a key
	// during the grant keeps two objects from both getting it.
	for round := range 200 {
		m := NewManager(NopDriver{}, Options{})
		const n = 4
		uuids := make([]string, n)
		for i := range n {
			uuids[i] = fmt.Sprintf("cccccccc-0000-0000-0000-%012d", i)
			register(t, m, uuids[i], "vm", DiskResource("/img/contended", Exclusive))
		}
		var wg sync.WaitGroup
		var granted atomic.Int32
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if m.Acquire(context.Background(), uuids[i], "") == nil {
					granted.Add(1)
				}
			}()
		}
		wg.Wait()
		if g := granted.Load(); g != 1 {
			t.Fatalf("round %d: %d objects were granted one exclusive disk", round, g)
		}
	}
}

func TestAResourceStaysListedUntilTheDriverHasReleasedIt(t *testing.T) {
	d := newMemDriver()
	d.releasing, d.finish = make(chan struct{}), make(chan struct{})
	m := NewManager(d, Options{})
	ctx := context.Background()
	register(t, m, uuidA, "a", DiskResource("/img/x", Exclusive))
	register(t, m, uuidB, "b", DiskResource("/img/x", Exclusive))
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := m.Release(ctx, uuidA, nil); done <- err }()
	<-d.releasing // the driver has not unlocked yet
	if locks := m.Locks(); len(locks) != 1 || locks[0].Holders[0].UUID != uuidA {
		t.Fatalf("while the driver releases, Locks = %+v, want a still listed", locks)
	}
	var be *BusyError
	if err := m.Acquire(ctx, uuidB, ""); !errors.As(err, &be) || be.Holder.UUID != uuidA {
		t.Fatalf("acquire while the driver releases = %v, want busy naming a", err)
	}
	close(d.finish)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(m.Locks()) != 0 {
		t.Fatalf("after the release, Locks = %+v", m.Locks())
	}
	if err := m.Acquire(ctx, uuidB, ""); err != nil {
		t.Fatalf("acquire after the release: %v", err)
	}
}

func TestUnplugOfAResourceNotHeldChangesNothing(t *testing.T) {
	d := newMemDriver()
	m := NewManager(d, Options{})
	ctx := context.Background()
	register(t, m, uuidA, "vm", DiskResource("/img/a", Exclusive))
	r := DiskResource("/img/a", Exclusive)
	if _, err := m.Release(ctx, uuidA, &r); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("unplug of a resource not acquired yet = %v, want not held", err)
	}
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	if !d.held("disk:/img/a") {
		t.Fatal("a refused unplug forgot the resource: Acquire did not take it")
	}
}

func TestUnplugForgetsTheResourceEvenIfTheDriverFails(t *testing.T) {
	d := newMemDriver()
	m := NewManager(d, Options{})
	ctx := context.Background()
	register(t, m, uuidA, "vm", DiskResource("/img/a", Exclusive), DiskResource("/img/b", Exclusive))
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	d.releaseErr = Errorf(CodeInternal, "injected")
	r := DiskResource("/img/b", Exclusive)
	if _, err := m.Release(ctx, uuidA, &r); !errors.Is(err, ErrInternal) {
		t.Fatalf("unplug with a failing driver = %v, want the driver's error", err)
	}
	d.releaseErr = nil
	if _, err := m.Release(ctx, uuidA, nil); err != nil {
		t.Fatal(err)
	}
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	if d.held("disk:/img/b") {
		t.Fatal("an unplugged resource was acquired again with the others")
	}
}

// UnregisterIf releases and forgets the object only if it is the one
// meant; otherwise it changes nothing.
func TestUnregisterIfChecksTheObject(t *testing.T) {
	d := newMemDriver()
	m := NewManager(d, Options{})
	register(t, m, uuidA, "web1", DiskResource("/img/a", Exclusive))
	if err := m.Acquire(context.Background(), uuidA, ""); err != nil {
		t.Fatal(err)
	}
	pidIs := func(pid int) func(Object) bool { return func(o Object) bool { return o.PID == pid } }
	if err := m.UnregisterIf(context.Background(), uuidA, pidIs(101)); !errors.Is(err, ErrNotRegistered) {
		t.Fatalf("UnregisterIf for another pid = %v, want not registered", err)
	}
	if !d.held("disk:/img/a") {
		t.Fatal("a refused UnregisterIf released the disk")
	}
	if _, err := m.Object(uuidA); err != nil {
		t.Fatalf("a refused UnregisterIf forgot the object: %v", err)
	}
	if err := m.UnregisterIf(context.Background(), uuidA, pidIs(100)); err != nil {
		t.Fatalf("UnregisterIf for its pid: %v", err)
	}
	if d.held("disk:/img/a") {
		t.Fatal("the disk is still held after UnregisterIf")
	}
	if _, err := m.Object(uuidA); !errors.Is(err, ErrNotRegistered) {
		t.Fatalf("after UnregisterIf: %v, want not registered", err)
	}
}

// A grant the observer cannot record (the daemon's lock-holder did not take
// it in time) is undone: the call fails with the observer's error, the
// driver's lock is released, the table is as before, and the observer
// hears of the undo.
func TestAGrantTheObserverCannotRecordIsUndone(t *testing.T) {
	d := newMemDriver()
	notRecorded := errors.New("not recorded")
	obs := &recordingObserver{}
	m := NewManager(d, Options{Observer: obs})
	ctx := context.Background()
	register(t, m, uuidA, "a", DiskResource("/img/kept", Exclusive))
	if err := m.Acquire(ctx, uuidA, ""); err != nil {
		t.Fatal(err)
	}
	obs.mu.Lock()
	obs.fail = notRecorded
	obs.mu.Unlock()
	err := m.AcquireResource(ctx, uuidA, DiskResource("/img/new", Exclusive))
	if !errors.Is(err, notRecorded) {
		t.Fatalf("AcquireResource with a failing observer = %v, want its error", err)
	}
	if d.held(DiskResource("/img/new", Exclusive).Key()) {
		t.Fatal("the driver still holds the grant that was not recorded")
	}
	if locks := m.Locks(); len(locks) != 1 || locks[0].Resource.Name != "/img/kept" {
		t.Fatalf("Locks after the undone grant = %+v, want only /img/kept", locks)
	}
	if got := obs.counts[uuidA]; got != [2]int{1, 0} {
		t.Fatalf("the observer was last told that a holds %v, want the one lease it kept", got)
	}
	// The object is as before: the same resource can be granted later.
	obs.mu.Lock()
	obs.fail = nil
	obs.mu.Unlock()
	if err := m.AcquireResource(ctx, uuidA, DiskResource("/img/new", Exclusive)); err != nil {
		t.Fatalf("AcquireResource once the observer records again: %v", err)
	}
}

// HoldingOf is Object and Held in one: the object and its leases and
// read-only uses, by its uuid in any case; nothing for an object that is
// not registered (any more) or a uuid that is not one.
func TestHoldingOf(t *testing.T) {
	m := NewManager(newMemDriver(), Options{})
	if _, ok := m.HoldingOf(uuidA); ok {
		t.Fatal("HoldingOf an object never registered: ok")
	}
	if _, ok := m.HoldingOf("not-a-uuid"); ok {
		t.Fatal("HoldingOf an invalid uuid: ok")
	}
	register(t, m, uuidA, "web1", DiskResource("/img/a", Exclusive), DiskResource("/img/ro", ReadOnly))
	h, ok := m.HoldingOf(strings.ToUpper(uuidA))
	if !ok || h.Object.UUID != uuidA || h.Object.Name != "web1" || len(h.Leases)+len(h.ReadOnly) != 0 {
		t.Fatalf("HoldingOf before Acquire = %+v, %v; want web1 holding nothing", h, ok)
	}
	if err := m.Acquire(context.Background(), uuidA, ""); err != nil {
		t.Fatal(err)
	}
	h, ok = m.HoldingOf(uuidA)
	if !ok || len(h.Leases) != 1 || h.Leases[0].Resource().Name != "/img/a" || len(h.ReadOnly) != 1 || h.ReadOnly[0].Name != "/img/ro" {
		t.Fatalf("HoldingOf after Acquire = %+v, %v; want /img/a leased and /img/ro read-only", h, ok)
	}
	if err := m.Unregister(context.Background(), uuidA); err != nil {
		t.Fatal(err)
	}
	if _, ok := m.HoldingOf(uuidA); ok {
		t.Fatal("HoldingOf an unregistered object: ok")
	}
}
