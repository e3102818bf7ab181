package lockmgr

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"
)

// Observer is told, synchronously and before the Manager call returns,
// what an object holds after every change of it (a grant, a release, an
// unregistration): its leases and its read-only uses. Both are empty when
// it holds nothing. The daemon uses it to hand lease files to its
// lock-holder process. Calls for one object are never concurrent and come
// in the order of the changes; calls for different objects may be
// concurrent. ctx is the call's context (or, for an undo, one without its
// cancellation). If Changed fails after a grant or a change of mode, the
// Manager undoes it (a release, or a change back, told to the observer
// too) and the call fails with Changed's error; after any other change the
// error is ignored: the change has happened, and the observer must bring
// its records in step itself.
type Observer interface {
	Changed(ctx context.Context, o Object, leases []Lease, readonly []Resource) error
}

// Options configure a Manager. The zero value is usable.
type Options struct {
	// Now returns the current time; time.Now if nil.
	Now func() time.Time
	// Observer, if set, is told of grants and releases.
	Observer Observer
}

// Manager is the lock manager of one process: it keeps the objects, the
// resources each one uses, and which of them are held, and calls a Driver to
// take and release the real locks.
//
// Invariants, kept under mu:
//   - a resource key is in held only while at least one object holds it or
//     is releasing it (until the driver has unlocked it), and every holder
//     listed there has the entry in its own resources;
//   - two holders of one key never have conflicting modes (the driver
//     enforces this across processes; the table mirrors it for this one and
//     names holders in busy errors without a system call);
//   - a key being granted (the driver call in flight) is reserved in
//     pending, and a conflicting request from another object is refused
//     against the reservation: the check and the grant are one step even
//     for a driver that locks nothing (NopDriver).
//
// Driver calls are made without mu held, so a slow driver never blocks
// calls about other objects. Calls about one object are serialised by the
// object's own lock.
type Manager struct {
	driver    Driver
	immediate bool // driver calls are made directly (see immediate)
	now       func() time.Time
	obs       Observer

	mu      sync.Mutex
	objects map[string]*object // by UUID
	held    map[string]*heldResource
	pending map[string][]reservation // keys whose grant is in flight
}

// reservation is a key being granted to ob in mode.
type reservation struct {
	ob   *object
	mode Mode
}

type object struct {
	op   sync.Mutex // serialises operations on this object; taken before Manager.mu
	obj  Object
	uses []*use // in the order they were added
	gone bool   // unregistered; operations that waited on op must fail
}

// held returns the uses of ob that hold their resource. Called with ob.op
// held.
func (ob *object) held() []*use {
	var held []*use
	for _, u := range ob.uses {
		if u.held {
			held = append(held, u)
		}
	}
	return held
}

// use is one resource an object uses; lease is nil while it is not held.
// A read-only use is "held" without a lease once acquired.
type use struct {
	res   Resource
	key   string // res.Key(), built once: the table is keyed by it at every step
	lease Lease
	held  bool
	token uint64
	since time.Time
}

// newUse returns a use of r, not held.
func newUse(r Resource) *use { return &use{res: r, key: r.Key()} }

type heldResource struct {
	res     Resource             // the key's identity (type and name; Locks computes the mode from the holders)
	holders map[string]holderRef // by object UUID
}

// holderRef is one holder of a held resource: its use and its object.
type holderRef struct {
	u  *use
	ob *object
}

// NewManager returns a Manager that locks through d.
func NewManager(d Driver, opt Options) *Manager {
	now := opt.Now
	if now == nil {
		now = time.Now
	}
	return &Manager{driver: d, immediate: immediate(d), now: now, obs: opt.Observer,
		objects: make(map[string]*object), held: make(map[string]*heldResource), pending: make(map[string][]reservation)}
}

// Driver returns the Manager's driver.
func (m *Manager) Driver() Driver { return m.driver }

// Register adds an object. Its UUID must be new to this Manager.
func (m *Manager) Register(o Object) error {
	if err := o.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if prev, ok := m.objects[o.UUID]; ok {
		return Errorf(CodeNotRegistered, "object %s is already registered (name %q, pid %d)", o.UUID, prev.obj.Name, prev.obj.PID)
	}
	m.objects[o.UUID] = &object{obj: o}
	return nil
}

// lookup returns the object with its op lock held, or a not-registered error.
func (m *Manager) lookup(uuid string) (*object, error) {
	u, err := ParseUUID(uuid)
	if err != nil {
		return nil, err
	}
	ob := m.registered(u)
	if ob == nil {
		return nil, Errorf(CodeNotRegistered, "object %s is not registered", u)
	}
	return ob, nil
}

// registered returns the object registered as the canonical UUID u with
// its op lock held, or nil.
func (m *Manager) registered(u string) *object {
	m.mu.Lock()
	ob := m.objects[u]
	m.mu.Unlock()
	if ob == nil {
		return nil
	}
	ob.op.Lock()
	if ob.gone {
		ob.op.Unlock()
		return nil
	}
	return ob
}

// Object returns the identity of a registered object.
func (m *Manager) Object(uuid string) (Object, error) {
	ob, err := m.lookup(uuid)
	if err != nil {
		return Object{}, err
	}
	defer ob.op.Unlock()
	return ob.obj, nil
}

// AddResource records that the object uses r; it is locked by the next
// Acquire. The name is canonicalised first (see Canonical).
func (m *Manager) AddResource(uuid string, r Resource) error {
	ob, r, err := m.lookupWith(uuid, r)
	if err != nil {
		return err
	}
	defer ob.op.Unlock()
	_, err = ob.add(r)
	return err
}

// lookupWith canonicalises r and returns it with the object, whose op lock
// is held.
func (m *Manager) lookupWith(uuid string, r Resource) (*object, Resource, error) {
	r, err := Canonical(r)
	if err != nil {
		return nil, r, err
	}
	ob, err := m.lookup(uuid)
	return ob, r, err
}

// add records a new use of r; an object uses a resource once.
func (ob *object) add(r Resource) (*use, error) {
	u := newUse(r)
	if ob.find(u.key) != nil {
		return nil, invalid("object %s already uses %s", ob.obj.UUID, r)
	}
	ob.uses = append(ob.uses, u)
	return u, nil
}

func (ob *object) find(key string) *use {
	for _, u := range ob.uses {
		if u.key == key {
			return u
		}
	}
	return nil
}

// Acquire takes every resource of the object that it does not hold yet, all
// or nothing: when one cannot be granted, none of this call's grants remain
// and the error names the resource that failed. state, if not empty, is a
// state string from Release or Inquire (possibly on another host): every
// resource it lists must be one the object uses, and is granted only if its
// token is still current (else a *StaleStateError).
func (m *Manager) Acquire(ctx context.Context, uuid string, state string) error {
	st, err := ParseState(state)
	if err != nil {
		return err
	}
	ob, err := m.lookup(uuid)
	if err != nil {
		return err
	}
	defer ob.op.Unlock()
	expect := make(map[string]uint64, len(st))
	for _, e := range st {
		r, err := Canonical(e.Resource)
		if err != nil {
			return err
		}
		k := r.Key()
		if ob.find(k) == nil {
			return invalid("state names %s, which object %s does not use", r, ob.obj.UUID)
		}
		expect[k] = e.Token
	}
	var todo []*use
	for _, u := range ob.uses {
		if !u.held {
			todo = append(todo, u)
		}
	}
	return m.acquire(ctx, ob, todo, expect)
}

// AcquireResource adds rs to a running object and takes them at once: the
// hotplug path. The list is one grant, all or nothing: one driver call and
// one observer call for all of rs. On failure the object is as it was (its
// uses, the table, the driver's locks and the observer's record) and the
// error names the resource that failed (and, when it is busy, its holder).
// A resource the object already uses, or one named twice, is an invalid
// argument.
func (m *Manager) AcquireResource(ctx context.Context, uuid string, rs ...Resource) error {
	cs := make([]Resource, len(rs))
	for i, r := range rs {
		c, err := Canonical(r)
		if err != nil {
			return err
		}
		cs[i] = c
	}
	ob, err := m.lookup(uuid)
	if err != nil {
		return err
	}
	defer ob.op.Unlock()
	// One set of keys instead of ob.find per resource: a long list on an
	// object with many uses would otherwise cost their product.
	keys := make(map[string]bool, len(ob.uses)+len(cs))
	for _, u := range ob.uses {
		keys[u.key] = true
	}
	todo := make([]*use, len(cs))
	for i, r := range cs {
		u := newUse(r)
		if keys[u.key] {
			return invalid("object %s already uses %s, or the list names it twice; nothing was acquired", ob.obj.UUID, r)
		}
		keys[u.key] = true
		todo[i] = u
	}
	n := len(ob.uses)
	ob.uses = append(ob.uses, todo...)
	if err := m.acquire(ctx, ob, todo, nil); err != nil {
		clear(ob.uses[n:])
		ob.uses = ob.uses[:n]
		return err
	}
	return nil
}

// acquire grants todo to ob. Called with ob.op held.
func (m *Manager) acquire(ctx context.Context, ob *object, todo []*use, expect map[string]uint64) error {
	if len(todo) == 0 {
		return nil
	}
	var reqs []Request
	var locked []*use
	m.mu.Lock()
	for _, u := range todo {
		if u.res.Mode == ReadOnly {
			continue
		}
		if err := m.conflictLocked(ob, u.key, u.res); err != nil {
			m.unreserveLocked(ob, locked)
			m.mu.Unlock()
			return err
		}
		m.pending[u.key] = append(m.pending[u.key], reservation{ob, u.res.Mode})
		reqs = append(reqs, Request{Resource: u.res, Expect: expect[u.key], Holder: holderOf(ob.obj, u.res.Mode, time.Time{})})
		locked = append(locked, u)
	}
	m.mu.Unlock()

	var leases []Lease
	if len(reqs) > 0 {
		var err error
		leases, err = m.acquireLeases(ctx, reqs)
		if err != nil {
			m.mu.Lock()
			m.unreserveLocked(ob, locked)
			m.mu.Unlock()
			return m.nameHolder(ob, err)
		}
	}
	now := m.now()
	m.mu.Lock()
	m.unreserveLocked(ob, locked)
	for i, u := range locked {
		u.lease, u.token = leases[i], leases[i].Token()
	}
	for _, u := range todo {
		u.held, u.since = true, now
		m.addHeldLocked(ob, u)
	}
	m.mu.Unlock()
	if err := m.notify(ctx, ob); err != nil {
		// Not recorded (the daemon's lock-holder did not take it in
		// time): a caller told that the call failed must hold nothing
		// new, so the grant is released again, even if ctx is done.
		_ = m.release(context.WithoutCancel(ctx), ob, todo)
		return &Error{Code: CodeOf(err), Msg: "the grant was not recorded and is undone", Err: err}
	}
	return nil
}

// acquireLeases has the driver grant reqs, bounded by ctx (see Bounded): a
// grant that comes after ctx is done is released.
func (m *Manager) acquireLeases(ctx context.Context, reqs []Request) ([]Lease, error) {
	if m.immediate {
		if err := ended(ctx); err != nil {
			return nil, err
		}
		return m.driver.Acquire(ctx, reqs)
	}
	return Bounded(ctx, func() ([]Lease, error) { return m.driver.Acquire(ctx, reqs) },
		func(ls []Lease) { _ = m.driver.Release(context.Background(), ls) })
}

// notify tells the observer what ob holds now. Called with ob.op held.
func (m *Manager) notify(ctx context.Context, ob *object) error {
	if m.obs == nil {
		return nil
	}
	ls, ro := ob.holding()
	return m.obs.Changed(ctx, ob.obj, ls, ro)
}

// holding returns what ob holds: its leases and its read-only uses. Called
// with ob.op held.
func (ob *object) holding() ([]Lease, []Resource) {
	var ls []Lease
	var ro []Resource
	for _, u := range ob.uses {
		switch {
		case u.lease != nil:
			ls = append(ls, u.lease)
		case u.held:
			ro = append(ro, u.res)
		}
	}
	return ls, ro
}

// unreserveLocked drops ob's reservations of uses.
func (m *Manager) unreserveLocked(ob *object, uses []*use) {
	for _, u := range uses {
		k := u.key
		rs := slices.DeleteFunc(m.pending[k], func(r reservation) bool { return r.ob == ob })
		if len(rs) == 0 {
			delete(m.pending, k)
		} else {
			m.pending[k] = rs
		}
	}
}

// holderOf describes o holding (or being granted) a resource in mode m.
func holderOf(o Object, m Mode, since time.Time) Holder {
	return Holder{Name: o.Name, UUID: o.UUID, PID: o.PID, Host: o.Host, Mode: m, Since: since}
}

// conflictLocked returns a BusyError if another object of this Manager
// holds r's key (key), or is being granted it, in a conflicting mode.
func (m *Manager) conflictLocked(ob *object, key string, r Resource) error {
	for _, p := range m.pending[key] {
		if p.ob != ob && p.mode.Conflicts(r.Mode) {
			o := p.ob.obj
			return &BusyError{Resource: r, Holder: holderOf(o, p.mode, time.Time{})}
		}
	}
	h := m.held[key]
	if h == nil {
		return nil
	}
	for id, hr := range h.holders {
		if u := hr.u; id != ob.obj.UUID && u.res.Mode.Conflicts(r.Mode) {
			return &BusyError{Resource: r, Holder: holderOf(hr.ob.obj, u.res.Mode, u.since)}
		}
	}
	return nil
}

// nameHolder fills in the holder of a driver's busy error, refusing a
// request of ob, from the table when the driver could not name it (another
// Manager in this process, or a race with a grant that is being recorded).
// Only another object holding the resource in a mode that conflicts with
// the request is named: never ob itself.
func (m *Manager) nameHolder(ob *object, err error) error {
	be, ok := err.(*BusyError)
	if !ok || be.Holder.UUID != "" {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if h := m.held[be.Resource.Key()]; h != nil {
		for id, hr := range h.holders {
			if u := hr.u; id != ob.obj.UUID && u.res.Mode.Conflicts(be.Resource.Mode) {
				return &BusyError{Resource: be.Resource, Holder: holderOf(hr.ob.obj, u.res.Mode, u.since)}
			}
		}
	}
	return err
}

func (m *Manager) addHeldLocked(ob *object, u *use) {
	k := u.key
	h := m.held[k]
	if h == nil {
		h = &heldResource{res: u.res, holders: make(map[string]holderRef, 1)}
		m.held[k] = h
	}
	h.holders[ob.obj.UUID] = holderRef{u, ob}
}

func (m *Manager) dropHeldLocked(ob *object, u *use) {
	k := u.key
	if h := m.held[k]; h != nil {
		delete(h.holders, ob.obj.UUID)
		if len(h.holders) == 0 {
			delete(m.held, k)
		}
	}
}

// Release releases every held resource of the object (r == nil), or only r
// (unplug, as by Unplug). It returns the state string of what it released,
// for a later Acquire elsewhere. After a release of all, the object stays
// registered with its resources, so that Acquire takes them again (a
// paused VM that resumes). The driver releases the locks even if ctx is
// done; if ctx ends first, the error has CodeTimeout and the release
// completes in the background.
func (m *Manager) Release(ctx context.Context, uuid string, r *Resource) (string, error) {
	if r != nil {
		return m.Unplug(ctx, uuid, *r)
	}
	ob, err := m.lookup(uuid)
	if err != nil {
		return "", err
	}
	defer ob.op.Unlock()
	rel := ob.held()
	state := stateOf(rel).String()
	return state, m.release(ctx, ob, rel)
}

// Unplug releases rs and forgets them (a later Acquire does not take them
// again), as one release: one observer call and one driver call for the
// whole list. Every resource must be one the object holds, named once:
// otherwise the error (CodeNotHeld, or CodeInvalidArgument for one named
// twice) names it and nothing is released. It returns the state string of
// what it released. The resources are forgotten even when the driver fails
// to release them, and, as for Release, the driver releases them even if
// ctx is done.
func (m *Manager) Unplug(ctx context.Context, uuid string, rs ...Resource) (string, error) {
	for _, r := range rs {
		if err := r.Validate(); err != nil {
			return "", err
		}
	}
	ob, err := m.lookup(uuid)
	if err != nil {
		return "", err
	}
	defer ob.op.Unlock()
	// By type and name, which is the key without building it.
	type id struct {
		t    ResourceType
		name string
	}
	byKey := make(map[id]*use, len(ob.uses))
	for _, u := range ob.uses {
		byKey[id{u.res.Type, u.res.Name}] = u
	}
	rel := make([]*use, 0, len(rs))
	seen := make(map[*use]bool, len(rs))
	for _, r := range rs {
		// Callers usually give back the canonical name they were granted:
		// look it up as given first, and resolve the path only if needed.
		u := byKey[id{r.Type, r.Name}]
		if u == nil {
			c, err := Canonical(r)
			if err != nil {
				return "", err
			}
			u = byKey[id{c.Type, c.Name}]
		}
		switch {
		case u == nil:
			return "", &Error{Code: CodeNotHeld, Resource: r.String(), Msg: "not used by object " + ob.obj.UUID + "; nothing was released"}
		case !u.held:
			return "", &Error{Code: CodeNotHeld, Resource: r.String(), Msg: "not held by object " + ob.obj.UUID + "; nothing was released"}
		case seen[u]:
			return "", &Error{Code: CodeInvalidArgument, Resource: r.String(), Msg: "named twice; nothing was released"}
		}
		seen[u] = true
		rel = append(rel, u)
	}
	state := stateOf(rel).String()
	err = m.release(ctx, ob, rel)
	// Even if the driver failed: the uses are no longer held (see release),
	// and a later Acquire must not take an unplugged resource again.
	ob.uses = slices.DeleteFunc(ob.uses, func(u *use) bool { return seen[u] })
	return state, err
}

// release releases rel; called with ob.op held. A driver failure leaves the
// failed uses marked as not held all the same: the driver's lease is gone
// or unusable, and keeping it would block the object forever. For the same
// reason the driver is asked to release even if ctx is done.
func (m *Manager) release(ctx context.Context, ob *object, rel []*use) error {
	if len(rel) == 0 {
		return nil
	}
	var leases []Lease
	m.mu.Lock()
	for _, u := range rel {
		if u.lease != nil {
			leases = append(leases, u.lease)
		}
		u.lease, u.held = nil, false
	}
	m.mu.Unlock()
	// The observer hears of the release before the driver unlocks: whoever
	// keeps copies of the lease files drops them first, so no copy outlives
	// the lock it stood for.
	_ = m.notify(ctx, ob)
	var err error
	if len(leases) > 0 {
		_, err = m.releaseLeases(ctx, leases)
	}
	// Only now does the table let the resources go: until the driver has
	// unlocked them, the monitor shows them held and a conflicting request
	// is refused naming this holder, as the driver would refuse it.
	m.mu.Lock()
	for _, u := range rel {
		m.dropHeldLocked(ob, u)
	}
	m.mu.Unlock()
	return err
}

// releaseLeases has the driver release leases that the table and the
// observer no longer list. The release is made whatever ctx does, and
// without its cancellation: a lease left locked would be held by nobody.
// ctx only bounds how long the caller waits, so that a hung system call
// does not hold it up; if ctx ends first, waited is false, the error has
// CodeTimeout, and the release completes in the background.
func (m *Manager) releaseLeases(ctx context.Context, leases []Lease) (waited bool, err error) {
	bg := context.WithoutCancel(ctx)
	if m.immediate {
		return true, m.driver.Release(bg, leases)
	}
	_, waited, err = await(ctx, func() (struct{}, error) { return struct{}{}, m.driver.Release(bg, leases) }, nil)
	if !waited {
		return false, &Error{Code: CodeTimeout, Err: ctx.Err(),
			Msg: "the lock driver had not finished releasing when the call's time was up; the release goes on in the background"}
	}
	return true, err
}

func stateOf(uses []*use) State {
	st := make(State, 0, len(uses))
	for _, u := range uses {
		st = append(st, StateEntry{Resource: u.res, Token: u.token})
	}
	return st
}

// Inquire returns the state string of everything the object holds, without
// releasing it.
func (m *Manager) Inquire(uuid string) (string, error) {
	ob, err := m.lookup(uuid)
	if err != nil {
		return "", err
	}
	defer ob.op.Unlock()
	held := ob.held()
	return stateOf(held).String(), nil
}

// Unregister releases everything the object holds and forgets it.
func (m *Manager) Unregister(ctx context.Context, uuid string) error {
	return m.UnregisterIf(ctx, uuid, nil)
}

// UnregisterIf is Unregister of the object registered as uuid, if is (when
// not nil) says it is the one meant: a caller that learnt of an object
// earlier (its owner process exited) must not release another registration
// of the same uuid made since. is runs under the object's lock, so no other
// registration can come between the check and the release. When is refuses
// it, nothing changes and the error has CodeNotRegistered.
func (m *Manager) UnregisterIf(ctx context.Context, uuid string, is func(Object) bool) error {
	ob, err := m.lookup(uuid)
	if err != nil {
		return err
	}
	defer ob.op.Unlock()
	if is != nil && !is(ob.obj) {
		return Errorf(CodeNotRegistered, "object %s is now registered for pid %d; the one meant is gone", ob.obj.UUID, ob.obj.PID)
	}
	held := ob.held()
	err = m.release(ctx, ob, held)
	ob.gone = true
	m.mu.Lock()
	delete(m.objects, ob.obj.UUID)
	m.mu.Unlock()
	return err
}

// Restore registers o as holding leases that were taken before (by an
// earlier run of this daemon, kept by its lock-holder process). It is how a
// restarted daemon takes back its locks; no driver call is made.
func (m *Manager) Restore(o Object, leases []Lease, readonly []Resource, since time.Time) error {
	if err := o.Validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.objects[o.UUID]; ok {
		return Errorf(CodeNotRegistered, "object %s is already registered", o.UUID)
	}
	ob := &object{obj: o}
	for _, l := range leases {
		u := newUse(l.Resource())
		u.lease, u.held, u.token, u.since = l, true, l.Token(), since
		ob.uses = append(ob.uses, u)
		m.addHeldLocked(ob, u)
	}
	for _, r := range readonly {
		u := newUse(r)
		u.held, u.since = true, since
		ob.uses = append(ob.uses, u)
		m.addHeldLocked(ob, u)
	}
	m.objects[o.UUID] = ob
	return nil
}

// LockInfo is one resource in the lock monitor.
type LockInfo struct {
	Resource Resource  `json:"resource"` // Mode is the strongest held mode
	Token    uint64    `json:"token"`    // the newest grant's token
	Holders  []Holder  `json:"holders"`
	Since    time.Time `json:"since"` // the oldest holder's grant
}

// Locks returns every held resource, sorted by type and name, with its
// holders sorted by grant time.
func (m *Manager) Locks() []LockInfo {
	m.mu.Lock()
	out := make([]LockInfo, 0, len(m.held))
	for _, h := range m.held {
		li := LockInfo{Resource: h.res, Holders: make([]Holder, 0, len(h.holders))}
		li.Resource.Mode = ReadOnly
		for _, hr := range h.holders {
			u := hr.u
			li.Holders = append(li.Holders, holderOf(hr.ob.obj, u.res.Mode, u.since))
			if u.res.Mode < li.Resource.Mode {
				li.Resource.Mode = u.res.Mode
			}
			li.Token = max(li.Token, u.token)
			if li.Since.IsZero() || u.since.Before(li.Since) {
				li.Since = u.since
			}
		}
		out = append(out, li)
	}
	m.mu.Unlock()
	for i := range out {
		slices.SortFunc(out[i].Holders, func(a, b Holder) int {
			return cmp.Or(a.Since.Compare(b.Since), cmp.Compare(a.UUID, b.UUID))
		})
	}
	slices.SortFunc(out, func(a, b LockInfo) int {
		return cmp.Or(cmp.Compare(a.Resource.Type, b.Resource.Type), cmp.Compare(a.Resource.Name, b.Resource.Name))
	})
	return out
}

// ObjectCount returns the number of registered objects.
func (m *Manager) ObjectCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.objects)
}

// HeldCount returns the number of resources held.
func (m *Manager) HeldCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.held)
}

// Objects returns every registered object, sorted by UUID.
func (m *Manager) Objects() []Object {
	m.mu.Lock()
	out := make([]Object, 0, len(m.objects))
	for _, ob := range m.objects {
		out = append(out, ob.obj)
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Object) int { return cmp.Compare(a.UUID, b.UUID) })
	return out
}

// Holding is what one object holds.
type Holding struct {
	Object   Object
	Leases   []Lease
	ReadOnly []Resource
}

// Holdings returns what every object holds, read from the lock table in one
// step (the daemon re-records them all in a new lock-holder process). It
// takes no object's lock, so it never waits for a call in progress; a
// grant in flight is not included (its Observer call comes after).
func (m *Manager) Holdings() []Holding {
	m.mu.Lock()
	defer m.mu.Unlock()
	by := map[string]*Holding{}
	for _, h := range m.held {
		for id, hr := range h.holders {
			u := hr.u
			hd := by[id]
			if hd == nil {
				hd = &Holding{Object: hr.ob.obj}
				by[id] = hd
			}
			switch {
			case u.lease != nil:
				hd.Leases = append(hd.Leases, u.lease)
			case u.held:
				hd.ReadOnly = append(hd.ReadOnly, u.res)
			}
		}
	}
	out := make([]Holding, 0, len(by))
	for _, hd := range by {
		out = append(out, *hd)
	}
	return out
}

// Notify tells the observer what the object uuid holds, as after a change
// of it, in order with the changes: for a caller whose own part of the
// observer's records changed (the daemon's migration mark). It returns the
// observer's error.
func (m *Manager) Notify(uuid string) error {
	ob, err := m.lookup(uuid)
	if err != nil {
		return err
	}
	defer ob.op.Unlock()
	return m.notify(context.Background(), ob)
}

// HoldingOf returns the object registered as uuid and what it holds, read
// in one step; ok is false if no object is registered as uuid (or uuid is
// not a UUID). It is Object and Held in one lookup, and builds no error
// for an object that is not registered.
func (m *Manager) HoldingOf(uuid string) (h Holding, ok bool) {
	u, err := ParseUUID(uuid)
	if err != nil {
		return Holding{}, false
	}
	ob := m.registered(u)
	if ob == nil {
		return Holding{}, false
	}
	defer ob.op.Unlock()
	h.Object = ob.obj
	h.Leases, h.ReadOnly = ob.holding()
	return h, true
}

// Held returns the leases an object holds (for the daemon's bookkeeping).
func (m *Manager) Held(uuid string) ([]Lease, []Resource, error) {
	ob, err := m.lookup(uuid)
	if err != nil {
		return nil, nil, err
	}
	defer ob.op.Unlock()
	ls, ro := ob.holding()
	return ls, ro, nil
}
