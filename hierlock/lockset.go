package hierlock

import (
	"context"
	"errors"
	"slices"
	"sync"
)

// SetLockName is the member name under which a set's set-level lock appears
// in the monitor ("node/[lockset]"). It cannot be a member's name.
const SetLockName = "[lockset]"

// Request says what to acquire in a LockSet (or at a Manager level).
type Request struct {
	// Names are the members to acquire (duplicates are ignored). They are
	// acquired in natural order whatever their order here. Must be empty
	// when All is set.
	Names []string
	// All acquires the set-level lock first, in Mode, then every current
	// member, skipping members removed meanwhile. Holding the set-level lock
	// keeps others from adding members until it is released.
	All bool
	// Mode of every lock taken by the call.
	Mode Mode
	// Priority of every queued request of the call (lower first).
	Priority int
	// Opportunistic takes each member only if it is free at once, skipping
	// busy and missing ones, and returns what it got (possibly nothing). The
	// context's deadline then applies to the set-level lock only (with All);
	// it is ignored for the members.
	Opportunistic bool
	// Create makes the names that are not members implicit members first
	// (taking the set-level lock exclusively for that moment, as Add does,
	// and waiting for it within the context). An implicit member is
	// removed again as soon as nobody holds it, waits for it or is about to
	// acquire it; Add makes it explicit. Must not be set with All.
	Create bool
}

// LockSet is a set of named SharedLocks of one kind (Ganeti's LockSet), plus
// a set-level lock. Members are acquired in natural order of their names and
// all-or-nothing; see the package comment for the rules.
//
// The zero value is an empty, unnamed set using the real clock. A LockSet
// must not be copied after first use. All methods are safe for concurrent
// use.
type LockSet struct {
	name  string
	clock Clock

	once sync.Once
	set  SharedLock // the set-level lock

	mu     sync.Mutex
	locks  map[string]*SharedLock // members, including deleted ones not yet unlinked
	sorted []string               // the keys of locks, naturally sorted
	owners map[Owner]*holding     // owners holding anything in the set, or acquiring
	// implicit holds the members created by an acquire with Create, each
	// with the number of acquires in progress that have looked it up
	// (pins). The invariant, enforced by dropIfUnusedLocked: an implicit
	// member stays linked only while it is held, waited for, or pinned;
	// every call that may leave it unused (a release, an acquire done with
	// it) checks it under mu afterwards. Looking up and pinning happen
	// under mu too, so an unlinked lock has nobody left to acquire it, and
	// an acquire never finds an implicit member removed: it pins it, or
	// finds the name missing and creates it again. Every implicit member is
	// the one linked under its name (linkLocked drops a replaced one).
	implicit map[*SharedLock]int
}

// holding is what one owner holds in a set.
type holding struct {
	locks map[string]*SharedLock // members held
	set   bool                   // holds the set-level lock (from an All acquire)
	busy  bool                   // an Acquire is in progress
}

// NewLockSet returns a set with the given initial members (duplicates are
// ignored). Member locks are named "name/member" for the monitor and
// errors. clock nil means the real clock.
//
// Errors: ErrInvalid for an empty member name or SetLockName.
func NewLockSet(name string, members []string, clock Clock) (*LockSet, error) {
	if err := validNames(name, members); err != nil {
		return nil, err
	}
	s := &LockSet{name: name, clock: clock}
	s.init()
	for _, m := range sortNatural(members) {
		s.locks[m] = NewSharedLock(s.lockName(m), clock)
		s.sorted = append(s.sorted, m)
	}
	return s, nil
}

func (s *LockSet) init() {
	s.once.Do(func() {
		s.set.name = s.lockName(SetLockName)
		s.set.clock = s.clock
		s.locks = make(map[string]*SharedLock)
		s.owners = make(map[Owner]*holding)
		s.implicit = make(map[*SharedLock]int)
	})
}

// linkLocked makes lk the member n, replacing a deleted one not yet
// unlinked (a Remove between its Delete and its clean-up). The replaced
// one leaves the implicit members too: nobody can acquire it any more, and
// an implicit member is always the one linked under its name.
func (s *LockSet) linkLocked(n string, lk *SharedLock) {
	if old, ok := s.locks[n]; ok {
		delete(s.implicit, old)
	} else {
		i, _ := slices.BinarySearchFunc(s.sorted, n, CompareNatural)
		s.sorted = slices.Insert(s.sorted, i, n)
	}
	s.locks[n] = lk
}

// dropIfUnusedLocked unlinks lk, the member n, if it is implicit, unpinned,
// and nobody holds it or waits for it; it is marked deleted first, so that
// a stale reference (a Remove that looked it up) fails with ErrDeleted.
func (s *LockSet) dropIfUnusedLocked(n string, lk *SharedLock) {
	pins, implicit := s.implicit[lk]
	if !implicit || pins > 0 || !lk.deleteIfUnused() {
		return
	}
	delete(s.implicit, lk)
	if s.locks[n] == lk {
		delete(s.locks, n)
		if i, found := slices.BinarySearchFunc(s.sorted, n, CompareNatural); found {
			s.sorted = slices.Delete(s.sorted, i, i+1)
		}
	}
}

// dropUnused unlinks those of locks (released by the caller) that are now
// unused implicit members.
func (s *LockSet) dropUnused(locks map[string]*SharedLock) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.implicit) == 0 {
		return
	}
	for n, lk := range locks {
		s.dropIfUnusedLocked(n, lk)
	}
}

func validNames(set string, names []string) error {
	for _, n := range names {
		if n == "" || n == SetLockName {
			return &Error{Kind: ErrInvalid, Lock: set, Msg: "invalid lock name", Names: []string{n}}
		}
	}
	return nil
}

// Name returns the set's name.
func (s *LockSet) Name() string { return s.name }

func (s *LockSet) lockName(member string) string {
	if s.name == "" {
		return member
	}
	return s.name + "/" + member
}

// Names returns the current members, naturally sorted.
func (s *LockSet) Names() []string {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]string, 0, len(s.sorted))
	for _, n := range s.sorted {
		if !s.locks[n].IsDeleted() {
			out = append(out, n)
		}
	}
	return out
}

// Acquire takes the locks req names for owner, in natural order of their
// names, and returns the names it acquired, naturally sorted. One ctx
// deadline covers the whole call.
//
// An owner acquires in a set once: a second Acquire while it holds anything
// in the set fails with ErrDoubleAcquire. Without Opportunistic the call is
// all-or-nothing: on any failure everything it took is released and nothing
// is returned. Exact names that are missing or deleted before they are
// granted fail with ErrNotFound; with All, vanished members are skipped.
// With Create, missing names are created as implicit members (see Request);
// an implicit member is never removed under an acquire that looked it up,
// so only a Remove can make such an acquire fail with ErrNotFound.
//
// Errors: ErrInvalid, ErrDoubleAcquire, ErrNotFound, ErrTimeout,
// ErrCanceled, ErrDeleted (never for members; possible only if the caller
// deleted the set-level lock, which it cannot).
func (s *LockSet) Acquire(ctx context.Context, owner Owner, req Request) ([]string, error) {
	s.init()
	switch {
	case owner == "":
		return nil, &Error{Kind: ErrInvalid, Lock: s.name, Msg: "empty owner"}
	case !req.Mode.valid():
		return nil, &Error{Kind: ErrInvalid, Lock: s.name, Owner: owner, Msg: "invalid mode " + req.Mode.String()}
	case req.All && len(req.Names) > 0:
		return nil, &Error{Kind: ErrInvalid, Lock: s.name, Owner: owner, Msg: "names given with All"}
	case req.All && req.Create:
		return nil, &Error{Kind: ErrInvalid, Lock: s.name, Owner: owner, Msg: "Create given with All"}
	}
	var names []string
	if !req.All {
		if err := validNames(s.name, req.Names); err != nil {
			return nil, err
		}
		if len(req.Names) == 0 {
			return nil, nil
		}
		names = sortNatural(req.Names)
	}

	s.mu.Lock()
	if _, ok := s.owners[owner]; ok {
		s.mu.Unlock()
		return nil, &Error{Kind: ErrDoubleAcquire, Lock: s.name, Owner: owner, Msg: "already acquired in this set (one acquire per set)"}
	}
	h := &holding{busy: true, locks: make(map[string]*SharedLock, len(names))}
	s.owners[owner] = h
	s.mu.Unlock()

	var locks []*SharedLock // looked up; the implicit ones pinned until the end
	fail := func(err error) ([]string, error) {
		s.mu.Lock()
		delete(s.owners, owner)
		set, held := h.set, h.locks
		h.set, h.locks = false, nil
		s.mu.Unlock()
		if set {
			_ = s.set.Release(owner)
		}
		for _, lk := range held {
			_ = lk.Release(owner)
		}
		s.mu.Lock()
		s.unpinLocked(names, locks)
		s.mu.Unlock()
		return nil, err
	}

	if req.All {
		if err := s.set.Acquire(ctx, owner, req.Mode, req.Priority); err != nil {
			return fail(err)
		}
		s.mu.Lock()
		h.set = true
		s.mu.Unlock()
	}
	// Look up the members once; a member removed after this point shows up
	// as ErrDeleted when acquired (only Remove can do that to an implicit
	// one: it is pinned).
	var err error
	if names, locks, err = s.lookup(ctx, owner, names, req); err != nil {
		return fail(err)
	}

	exact := !req.All && !req.Opportunistic
	got := make([]string, 0, len(names))
	for i, lk := range locks {
		if lk == nil {
			if exact {
				return fail(&Error{Kind: ErrNotFound, Lock: s.lockName(names[i]), Owner: owner})
			}
			continue
		}
		var err error
		if req.Opportunistic {
			err = lk.TryAcquire(owner, req.Mode, req.Priority)
		} else {
			err = lk.Acquire(ctx, owner, req.Mode, req.Priority)
		}
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				return fail(err)
			}
			switch {
			case e.Kind == ErrDeleted && exact:
				return fail(&Error{Kind: ErrNotFound, Lock: s.lockName(names[i]), Owner: owner, Err: err})
			case e.Kind == ErrDeleted:
				continue
			case e.Kind == ErrTimeout && req.Opportunistic:
				continue
			}
			return fail(err)
		}
		s.mu.Lock()
		h.locks[names[i]] = lk
		s.mu.Unlock()
		got = append(got, names[i])
	}
	s.mu.Lock()
	h.busy = false
	if len(h.locks) == 0 && !h.set {
		delete(s.owners, owner)
	}
	s.unpinLocked(names, locks)
	s.mu.Unlock()
	return got, nil
}

// lookup returns the members to acquire (every current one with All) and
// their locks, nil for a missing name, and pins the implicit ones. With
// Create it creates the missing names as implicit members, under the
// set-level lock held exclusively: creating a name is adding it, and no
// name may appear behind an All holder's back. Whether a name is missing is
// decided under the same hold of mu that pins: a name unlinked just before
// is found missing, and created again.
func (s *LockSet) lookup(ctx context.Context, owner Owner, names []string, req Request) ([]string, []*SharedLock, error) {
	holdsSet := false
	for {
		s.mu.Lock()
		if req.All {
			names = slices.Clone(s.sorted)
		}
		missing := false
		for _, n := range names {
			if lk := s.locks[n]; req.Create && (lk == nil || lk.IsDeleted()) {
				missing = true
			}
		}
		if missing && !holdsSet {
			s.mu.Unlock()
			if err := s.set.Acquire(ctx, owner, Exclusive, req.Priority); err != nil {
				return names, nil, err
			}
			holdsSet = true
			defer func() { _ = s.set.Release(owner) }() // after the pins below
			continue
		}
		locks := make([]*SharedLock, len(names))
		for i, n := range names {
			lk := s.locks[n]
			if missing && (lk == nil || lk.IsDeleted()) {
				lk = NewSharedLock(s.lockName(n), s.clock)
				s.linkLocked(n, lk)
				s.implicit[lk] = 0
			}
			if pins, ok := s.implicit[lk]; ok {
				s.implicit[lk] = pins + 1
			}
			locks[i] = lk
		}
		s.mu.Unlock()
		return names, locks, nil
	}
}

// unpinLocked drops an acquire's pins on the implicit ones of locks (the
// members names), unlinking those now unused.
func (s *LockSet) unpinLocked(names []string, locks []*SharedLock) {
	for i, lk := range locks {
		if pins, ok := s.implicit[lk]; ok {
			s.implicit[lk] = pins - 1
			s.dropIfUnusedLocked(names[i], lk)
		}
	}
}

// Release releases everything owner holds in the set: the set-level lock
// first, then the members.
//
// Errors: ErrNotOwned if owner holds nothing here.
func (s *LockSet) Release(owner Owner) error {
	s.init()
	s.mu.Lock()
	h, err := s.holderLocked(owner)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	delete(s.owners, owner)
	s.mu.Unlock()
	return s.release(owner, h.set, h.locks)
}

// ReleaseNames releases the set-level lock, if owner holds it, and the named
// members; with no names it releases only the set-level lock (Ganeti's
// release([])).
//
// Errors: ErrNotOwned if owner holds nothing here or does not hold one of the
// names (then nothing is released).
func (s *LockSet) ReleaseNames(owner Owner, names []string) error {
	s.init()
	s.mu.Lock()
	h, err := s.holderLocked(owner)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	var missing []string
	for _, n := range names {
		if h.locks[n] == nil {
			missing = append(missing, n)
		}
	}
	if missing != nil {
		s.mu.Unlock()
		return &Error{Kind: ErrNotOwned, Lock: s.name, Owner: owner, Names: missing}
	}
	locks := make(map[string]*SharedLock, len(names))
	for _, n := range names {
		locks[n] = h.locks[n]
		delete(h.locks, n)
	}
	set := h.set
	h.set = false
	if len(h.locks) == 0 {
		delete(s.owners, owner)
	}
	s.mu.Unlock()
	return s.release(owner, set, locks)
}

func (s *LockSet) holderLocked(owner Owner) (*holding, error) {
	h := s.owners[owner]
	if h == nil || owner == "" {
		return nil, &Error{Kind: ErrNotOwned, Lock: s.name, Owner: owner, Msg: "holds nothing in this set"}
	}
	if h.busy {
		return nil, &Error{Kind: ErrDoubleAcquire, Lock: s.name, Owner: owner, Msg: "an acquire of this owner is in progress"}
	}
	return h, nil
}

func (s *LockSet) release(owner Owner, set bool, locks map[string]*SharedLock) error {
	var errs []error
	if set {
		errs = append(errs, s.set.Release(owner))
	}
	for _, lk := range locks { // in any order: releasing never waits
		if err := lk.Release(owner); err != nil {
			errs = append(errs, err)
		}
	}
	s.dropUnused(locks)
	return errors.Join(errs...)
}

func sortedKeys(m map[string]*SharedLock) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, CompareNatural)
	return keys
}

// Downgrade downgrades every member owner holds exclusively to shared, then
// the set-level lock.
//
// Errors: ErrNotOwned if owner holds nothing here.
func (s *LockSet) Downgrade(owner Owner) error { return s.downgrade(owner, nil, true) }

// DowngradeNames downgrades the named members to shared, and the set-level
// lock too once owner holds no member exclusively.
//
// Errors: ErrNotOwned if owner holds nothing here or not all the names (then
// nothing changes).
func (s *LockSet) DowngradeNames(owner Owner, names []string) error {
	return s.downgrade(owner, names, false)
}

func (s *LockSet) downgrade(owner Owner, names []string, all bool) error {
	s.init()
	s.mu.Lock()
	h, err := s.holderLocked(owner)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if all {
		names = sortedKeys(h.locks)
	}
	var missing []string
	var locks []*SharedLock
	for _, n := range names {
		if lk := h.locks[n]; lk != nil {
			locks = append(locks, lk)
		} else {
			missing = append(missing, n)
		}
	}
	held := make([]*SharedLock, 0, len(h.locks))
	for _, lk := range h.locks {
		held = append(held, lk)
	}
	set := h.set
	s.mu.Unlock()
	if missing != nil {
		return &Error{Kind: ErrNotOwned, Lock: s.name, Owner: owner, Names: missing}
	}
	var errs []error
	for _, lk := range locks {
		errs = append(errs, lk.Downgrade(owner))
	}
	if set {
		for _, lk := range held {
			if m, ok := lk.Holds(owner); ok && m == Exclusive {
				return errors.Join(errs...)
			}
		}
		errs = append(errs, s.set.Downgrade(owner))
	}
	return errors.Join(errs...)
}

// Add adds members. The caller must hold nothing in the set, or hold the
// set-level lock exclusively; Add takes the set-level lock exclusively for
// the duration of the call if it is not held (so it waits, within ctx, for
// every All holder). With acquired set, owner holds the new members in mode
// when Add returns. A name that is an implicit member (see Request.Create)
// is made explicit, so that it stays until Remove; it cannot be added
// acquired while it is in use.
//
// Errors: ErrInvalid, ErrOwnership (owner holds part of the set, or the
// set-level lock only shared), ErrExists (a name is already an explicit
// member, or an implicit one in use and acquired is set; then nothing is
// added), ErrTimeout, ErrCanceled.
func (s *LockSet) Add(ctx context.Context, owner Owner, names []string, acquired bool, mode Mode) error {
	s.init()
	switch {
	case owner == "":
		return &Error{Kind: ErrInvalid, Lock: s.name, Msg: "empty owner"}
	case !mode.valid():
		return &Error{Kind: ErrInvalid, Lock: s.name, Owner: owner, Msg: "invalid mode " + mode.String()}
	}
	if err := validNames(s.name, names); err != nil {
		return err
	}
	names = sortNatural(names)
	setMode, holdsSet := s.set.Holds(owner)
	s.mu.Lock()
	_, owns := s.owners[owner]
	s.mu.Unlock()
	if owns && !(holdsSet && setMode == Exclusive) {
		return &Error{Kind: ErrOwnership, Lock: s.name, Owner: owner, Msg: "cannot add while holding part of the set, or the set-level lock shared"}
	}
	if !holdsSet {
		if err := s.set.Acquire(ctx, owner, Exclusive, 0); err != nil {
			return err
		}
		defer func() { _ = s.set.Release(owner) }()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var dups []string
	for _, n := range names {
		lk := s.locks[n]
		if lk == nil {
			continue
		}
		s.dropIfUnusedLocked(n, lk) // unused but not unlinked yet: absent
		if _, implicit := s.implicit[lk]; lk.IsDeleted() || implicit && !acquired {
			continue
		}
		dups = append(dups, n)
	}
	if dups != nil {
		return &Error{Kind: ErrExists, Lock: s.name, Owner: owner, Names: dups}
	}
	h := s.owners[owner]
	if acquired && h == nil {
		h = &holding{locks: make(map[string]*SharedLock, len(names))}
		s.owners[owner] = h
	}
	for _, n := range names {
		if lk := s.locks[n]; lk != nil && !lk.IsDeleted() {
			delete(s.implicit, lk) // implicit and not acquired: now explicit
			continue
		}
		lk := NewSharedLock(s.lockName(n), s.clock)
		if acquired {
			lk.holdLocked(owner, mode) // not yet published: no one else can see it
			h.locks[n] = lk
		}
		s.linkLocked(n, lk)
	}
	return nil
}

// Remove deletes the named members and returns the names it removed,
// naturally sorted. The caller must hold nothing in the set (then each lock
// is deleted in turn, waiting within ctx for its holders), or hold every
// name exclusively. Names that are not members, or are removed by someone
// else first, are skipped. Waiters for a removed lock fail with ErrDeleted
// (a LockSet acquire turns that into ErrNotFound).
//
// Errors: ErrInvalid, ErrOwnership, and, when waiting, ErrTimeout or
// ErrCanceled, returned with the names removed before the failure.
func (s *LockSet) Remove(ctx context.Context, owner Owner, names []string) ([]string, error) {
	s.init()
	if owner == "" {
		return nil, &Error{Kind: ErrInvalid, Lock: s.name, Msg: "empty owner"}
	}
	names = sortNatural(names)
	s.mu.Lock()
	h := s.owners[owner]
	if h != nil {
		var bad []string
		for _, n := range names {
			if lk := h.locks[n]; lk == nil {
				bad = append(bad, n)
			} else if m, _ := lk.Holds(owner); m != Exclusive {
				bad = append(bad, n)
			}
		}
		if bad != nil || h.busy {
			s.mu.Unlock()
			return nil, &Error{Kind: ErrOwnership, Lock: s.name, Owner: owner, Names: bad,
				Msg: "remove needs every name held exclusively, or nothing held in the set"}
		}
	}
	s.mu.Unlock()
	var removed []string
	for _, n := range names {
		s.mu.Lock()
		lk := s.locks[n]
		s.mu.Unlock()
		if lk == nil {
			continue
		}
		if err := lk.Delete(ctx, owner, 0); err != nil {
			if errors.Is(err, ErrDeleted) {
				continue
			}
			return removed, err
		}
		s.mu.Lock()
		delete(s.implicit, lk)
		if s.locks[n] == lk {
			delete(s.locks, n)
			if i, found := slices.BinarySearchFunc(s.sorted, n, CompareNatural); found {
				s.sorted = slices.Delete(s.sorted, i, i+1)
			}
		}
		if h != nil {
			delete(h.locks, n)
			if len(h.locks) == 0 && !h.set {
				delete(s.owners, owner)
			}
		}
		s.mu.Unlock()
		removed = append(removed, n)
	}
	return removed, nil
}

// IsOwned reports whether owner holds anything in the set.
func (s *LockSet) IsOwned(owner Owner) bool {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.owners[owner]
	return h != nil && (h.set || len(h.locks) > 0)
}

// OwnsAll reports whether owner holds the set-level lock (from an All
// acquire), which is equivalent to holding every member.
func (s *LockSet) OwnsAll(owner Owner) bool {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.owners[owner]
	return h != nil && h.set
}

// Owned returns the members owner holds, naturally sorted.
func (s *LockSet) Owned(owner Owner) []string {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.owners[owner]
	if h == nil {
		return nil
	}
	return sortedKeys(h.locks)
}

// Holding is one lock an owner holds.
type Holding struct {
	Level Level  `json:"level"` // the Manager level (0 from a LockSet)
	Lock  string `json:"lock"`  // full name: "node/node1", "node/[lockset]"
	Name  string `json:"name"`  // member name, or SetLockName
	Mode  Mode   `json:"mode"`
}

// Holdings returns what owner holds in the set: the set-level lock first,
// then the members in natural order, each with its current mode.
func (s *LockSet) Holdings(owner Owner) []Holding {
	s.init()
	s.mu.Lock()
	h := s.owners[owner]
	var set bool
	var locks map[string]*SharedLock
	if h != nil {
		set = h.set
		locks = make(map[string]*SharedLock, len(h.locks))
		for k, v := range h.locks {
			locks[k] = v
		}
	}
	s.mu.Unlock()
	var out []Holding
	if set {
		if m, ok := s.set.Holds(owner); ok {
			out = append(out, Holding{Lock: s.set.name, Name: SetLockName, Mode: m})
		}
	}
	for _, n := range sortedKeys(locks) {
		if m, ok := locks[n].Holds(owner); ok {
			out = append(out, Holding{Lock: locks[n].name, Name: n, Mode: m})
		}
	}
	return out
}

// AppendInfo appends the monitor rows of the set-level lock and of every
// current member, in natural order.
func (s *LockSet) AppendInfo(dst []LockInfo) []LockInfo {
	s.init()
	dst = append(dst, s.set.Info())
	s.mu.Lock()
	locks := make([]*SharedLock, 0, len(s.sorted))
	for _, n := range s.sorted {
		locks = append(locks, s.locks[n])
	}
	s.mu.Unlock()
	for _, lk := range locks {
		if info := lk.Info(); info.State != StateDeleted {
			dst = append(dst, info)
		}
	}
	return dst
}
