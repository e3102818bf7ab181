package hierlock

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"
)

// MinTimeout is the shortest wait worth queueing for: an acquire whose
// deadline is closer than this (or already past) on a busy lock fails at
// once with ErrTimeout without ever joining the queue, like Ganeti's
// _LOCK_ACQUIRE_MIN_TIMEOUT. This is the try-lock. (One whose context is
// already canceled fails at once too, with ErrCanceled.)
const MinTimeout = time.Millisecond

// SharedLock is a shared/exclusive lock with priorities and fair queueing:
// Ganeti's SharedLock with explicit owners. See the package comment for the
// queueing rules and invariants.
//
// The zero value is an unnamed, unlocked lock that uses the real clock. A
// SharedLock must not be copied after first use. All methods are safe for
// concurrent use.
type SharedLock struct {
	name  string
	clock Clock // nil: the real clock

	mu      sync.Mutex
	exc     Owner              // the exclusive holder, "" if none
	shr     map[Owner]struct{} // the shared holders
	queue   []*prioQueue       // non-empty per-priority queues, by ascending priority
	waiting map[Owner]*entry   // every queued owner and its entry
	deleted bool
}

// prioQueue holds the entries of one priority in arrival order.
type prioQueue struct {
	prio    int
	entries []*entry
	shared  *entry // the queued shared entry that new sharers of this priority join, if any
}

type outcome uint8

const (
	waiting outcome = iota
	granted
	deleted
)

// entry is one position in the queue: one exclusive request, or all the
// shared requests of one priority that arrived while it was queued.
type entry struct {
	mode   Mode
	prio   int
	owners []Owner       // the waiting owners, in arrival order
	ready  chan struct{} // closed once result is granted or deleted
	result outcome       // written under the lock's mu before ready is closed
}

// NewSharedLock returns an unlocked lock. The name is what the monitor and
// errors show; clock nil means the real clock.
func NewSharedLock(name string, clock Clock) *SharedLock {
	return &SharedLock{name: name, clock: clock}
}

// Name returns the lock's name.
func (l *SharedLock) Name() string { return l.name }

func (l *SharedLock) now() time.Time {
	if l.clock == nil {
		return time.Now()
	}
	return l.clock.Now()
}

func (l *SharedLock) newTimer(d time.Duration) Timer {
	if l.clock == nil {
		return RealClock{}.NewTimer(d)
	}
	return l.clock.NewTimer(d)
}

func (l *SharedLock) invalid(owner Owner, mode Mode) error {
	if owner == "" {
		return &Error{Kind: ErrInvalid, Lock: l.name, Msg: "empty owner"}
	}
	if !mode.valid() {
		return &Error{Kind: ErrInvalid, Lock: l.name, Owner: owner, Msg: "invalid mode " + mode.String()}
	}
	return nil
}

// Acquire takes the lock for owner in mode, waiting in the queue at priority
// prio (lower first; Ganeti uses -20 … 19, default 0) if it cannot be
// granted at once.
//
// It is granted at once only if it fits the current holders and nobody
// waits ahead of it (no waiter at all, or only waiters of a lower priority,
// i.e. a greater number). Otherwise, if ctx's deadline is less than
// MinTimeout away (or past), it fails at once with ErrTimeout (try-lock),
// and if ctx is already canceled, at once with ErrCanceled; neither
// queues. Otherwise it waits until granted, or until ctx is done: a
// deadline fails only once the lock's clock has reached it (early timer
// fires and other wake-ups never fail it), with ErrTimeout; a cancellation
// fails with ErrCanceled. A context without deadline waits forever. If the
// lock is deleted meanwhile, it fails with ErrDeleted. If the grant races
// with the deadline, the grant wins and Acquire returns nil.
//
// Errors: ErrInvalid, ErrDoubleAcquire (owner already holds or waits for the
// lock, in any mode), ErrDeleted, ErrTimeout, ErrCanceled. On error the lock
// is not held and owner is not queued.
func (l *SharedLock) Acquire(ctx context.Context, owner Owner, mode Mode, prio int) error {
	if err := l.invalid(owner, mode); err != nil {
		return err
	}
	l.mu.Lock()
	if err := l.admitLocked(owner); err != nil {
		l.mu.Unlock()
		return err
	}
	if l.grantableLocked(mode, prio) {
		l.holdLocked(owner, mode)
		l.mu.Unlock()
		return nil
	}
	deadline, hasDeadline := ctx.Deadline()
	if hasDeadline && deadline.Sub(l.now()) < MinTimeout {
		l.mu.Unlock()
		return timeoutError(l.name, owner, "busy")
	}
	if err := ctx.Err(); err != nil && !(err == context.DeadlineExceeded && hasDeadline) {
		// Canceled: try-lock only. (A deadline that the context's real-time
		// timer has passed but the lock's clock has not is still waited for.)
		l.mu.Unlock()
		return ctxError(ctx, l.name, owner)
	}
	e := l.enqueueLocked(owner, mode, prio)
	l.mu.Unlock()
	return l.wait(ctx, owner, e, deadline, hasDeadline)
}

// TryAcquire takes the lock for owner if that is possible at once (see
// Acquire), and otherwise fails with ErrTimeout without queueing.
func (l *SharedLock) TryAcquire(owner Owner, mode Mode, prio int) error {
	if err := l.invalid(owner, mode); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.admitLocked(owner); err != nil {
		return err
	}
	if !l.grantableLocked(mode, prio) {
		return timeoutError(l.name, owner, "busy")
	}
	l.holdLocked(owner, mode)
	return nil
}

func (l *SharedLock) admitLocked(owner Owner) error {
	if l.deleted {
		return &Error{Kind: ErrDeleted, Lock: l.name, Owner: owner}
	}
	if m, ok := l.holdsLocked(owner); ok {
		return &Error{Kind: ErrDoubleAcquire, Lock: l.name, Owner: owner, Msg: "already held " + m.String() + " (locks are not re-entrant)"}
	}
	if _, ok := l.waiting[owner]; ok {
		return &Error{Kind: ErrDoubleAcquire, Lock: l.name, Owner: owner, Msg: "already waiting for it"}
	}
	return nil
}

func (l *SharedLock) holdsLocked(owner Owner) (Mode, bool) {
	if owner == "" {
		return 0, false
	}
	if l.exc == owner {
		return Exclusive, true
	}
	if _, ok := l.shr[owner]; ok {
		return Shared, true
	}
	return 0, false
}

// compatibleLocked reports whether mode fits the current holders.
func (l *SharedLock) compatibleLocked(mode Mode) bool {
	return l.exc == "" && (mode == Shared || len(l.shr) == 0)
}

// grantableLocked reports whether a new request may be granted without
// queueing: it fits the holders and would be at the head of the queue.
func (l *SharedLock) grantableLocked(mode Mode, prio int) bool {
	return l.compatibleLocked(mode) && (len(l.queue) == 0 || prio < l.queue[0].prio)
}

func (l *SharedLock) holdLocked(owner Owner, mode Mode) {
	if mode == Exclusive {
		l.exc = owner
		return
	}
	if l.shr == nil {
		l.shr = make(map[Owner]struct{})
	}
	l.shr[owner] = struct{}{}
}

func (l *SharedLock) findQueueLocked(prio int) (int, bool) {
	return slices.BinarySearchFunc(l.queue, prio, func(q *prioQueue, p int) int { return cmp.Compare(q.prio, p) })
}

// enqueueLocked queues owner: a sharer joins its priority's queued shared
// entry if there is one, anything else gets a new entry at the tail of its
// priority.
func (l *SharedLock) enqueueLocked(owner Owner, mode Mode, prio int) *entry {
	i, found := l.findQueueLocked(prio)
	var q *prioQueue
	if found {
		q = l.queue[i]
	} else {
		q = &prioQueue{prio: prio}
		l.queue = slices.Insert(l.queue, i, q)
	}
	var e *entry
	if mode == Shared && q.shared != nil {
		e = q.shared
		e.owners = append(e.owners, owner)
	} else {
		e = &entry{mode: mode, prio: prio, owners: []Owner{owner}, ready: make(chan struct{})}
		q.entries = append(q.entries, e)
		if mode == Shared {
			q.shared = e
		}
	}
	if l.waiting == nil {
		l.waiting = make(map[Owner]*entry)
	}
	l.waiting[owner] = e
	return e
}

// wait blocks until e is settled or the context gives up. It holds no lock.
func (l *SharedLock) wait(ctx context.Context, owner Owner, e *entry, deadline time.Time, hasDeadline bool) error {
	done := ctx.Done()
	var t Timer
	var tick <-chan time.Time
	arm := func(d time.Duration) {
		if t != nil {
			t.Stop()
		}
		t = l.newTimer(d)
		tick = t.C()
	}
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	if hasDeadline && l.clock != nil {
		// An injected clock decides when the deadline is reached; with the
		// real clock the context's own timer does.
		arm(deadline.Sub(l.now()))
	}
	for {
		select {
		case <-e.ready:
			return l.settled(owner, e)
		case <-done:
			if hasDeadline && ctx.Err() == context.DeadlineExceeded {
				if rest := deadline.Sub(l.now()); rest > 0 {
					// Not yet by the lock's clock: keep waiting on it.
					done = nil
					arm(rest)
					continue
				}
			}
			return l.giveUp(owner, e, ctxError(ctx, l.name, owner))
		case <-tick:
			if rest := deadline.Sub(l.now()); rest > 0 {
				arm(rest) // an early or spurious fire: never fail before the deadline
				continue
			}
			return l.giveUp(owner, e, timeoutError(l.name, owner, ""))
		}
	}
}

// settled reports the outcome of a closed entry. The channel close orders the
// read after the write.
func (l *SharedLock) settled(owner Owner, e *entry) error {
	if e.result == granted {
		return nil
	}
	return &Error{Kind: ErrDeleted, Lock: l.name, Owner: owner}
}

// giveUp leaves the queue after a timeout or cancellation, unless the entry
// was settled meanwhile (then the grant or the deletion wins).
func (l *SharedLock) giveUp(owner Owner, e *entry, err error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.result != waiting {
		return l.settled(owner, e)
	}
	delete(l.waiting, owner)
	e.owners = slices.DeleteFunc(e.owners, func(o Owner) bool { return o == owner })
	if len(e.owners) == 0 {
		i, found := l.findQueueLocked(e.prio)
		if found {
			q := l.queue[i]
			q.entries = slices.DeleteFunc(q.entries, func(x *entry) bool { return x == e })
			if q.shared == e {
				q.shared = nil
			}
			if len(q.entries) == 0 {
				l.queue = slices.Delete(l.queue, i, i+1)
			}
		}
		// The head may have left: let the next entries in at once (Ganeti
		// waits for the next release).
		l.dispatchLocked()
	}
	return err
}

// dispatchLocked grants queue entries from the head for as long as they fit
// the holders. Afterwards the queue is empty or its head does not fit: the
// invariant that rules out lost wake-ups.
func (l *SharedLock) dispatchLocked() {
	for len(l.queue) > 0 {
		q := l.queue[0]
		e := q.entries[0]
		if !l.compatibleLocked(e.mode) {
			return
		}
		q.entries = slices.Delete(q.entries, 0, 1)
		if q.shared == e {
			q.shared = nil
		}
		if len(q.entries) == 0 {
			l.queue = slices.Delete(l.queue, 0, 1)
		}
		for _, o := range e.owners {
			l.holdLocked(o, e.mode)
			delete(l.waiting, o)
		}
		e.result = granted
		close(e.ready)
	}
}

// Release releases owner's hold, whatever its mode, and grants the lock to
// the head of the queue if it now fits.
//
// Errors: ErrNotOwned if owner does not hold the lock (nothing changes).
func (l *SharedLock) Release(owner Owner) error {
	l.mu.Lock()
	switch {
	case owner == "":
		l.mu.Unlock()
		return &Error{Kind: ErrInvalid, Lock: l.name, Msg: "empty owner"}
	case l.exc == owner:
		l.exc = ""
	default:
		if _, ok := l.shr[owner]; !ok {
			l.mu.Unlock()
			return &Error{Kind: ErrNotOwned, Lock: l.name, Owner: owner}
		}
		delete(l.shr, owner)
	}
	if len(l.queue) > 0 {
		l.dispatchLocked()
	}
	l.mu.Unlock()
	return nil
}

// Downgrade turns owner's exclusive hold into a shared one. The queued
// shared entry of the head priority, if any, moves ahead of the exclusive
// entries queued before it and is granted at once, together with any shared
// entries right behind it. Downgrading a shared hold is a no-op that
// succeeds (and moves nobody, so a sharer cannot keep pushing others ahead).
//
// Errors: ErrNotOwned if owner does not hold the lock.
func (l *SharedLock) Downgrade(owner Owner) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	m, ok := l.holdsLocked(owner)
	if !ok {
		return &Error{Kind: ErrNotOwned, Lock: l.name, Owner: owner}
	}
	if m == Shared {
		return nil
	}
	l.exc = ""
	l.holdLocked(owner, Shared)
	if len(l.queue) > 0 {
		q := l.queue[0]
		if e := q.shared; e != nil {
			if i := slices.Index(q.entries, e); i > 0 {
				copy(q.entries[1:i+1], q.entries[:i])
				q.entries[0] = e
			}
		}
		l.dispatchLocked()
	}
	return nil
}

// Delete deletes the lock on behalf of owner: it acquires it exclusively
// first (at priority prio, honouring ctx as Acquire does) unless owner
// already holds it exclusively, then marks it deleted and fails every
// waiter with ErrDeleted; every later Acquire or Delete fails the same way.
// A deleted lock has no holder.
//
// Errors: ErrOwnership if owner holds it shared, ErrDeleted, and Acquire's
// errors (on a timeout the lock is left as it was).
func (l *SharedLock) Delete(ctx context.Context, owner Owner, prio int) error {
	if err := l.invalid(owner, Exclusive); err != nil {
		return err
	}
	l.mu.Lock()
	if l.deleted {
		l.mu.Unlock()
		return &Error{Kind: ErrDeleted, Lock: l.name, Owner: owner}
	}
	if _, ok := l.shr[owner]; ok {
		l.mu.Unlock()
		return &Error{Kind: ErrOwnership, Lock: l.name, Owner: owner, Msg: "cannot delete a lock while holding it shared"}
	}
	held := l.exc == owner
	l.mu.Unlock()
	if !held {
		if err := l.Acquire(ctx, owner, Exclusive, prio); err != nil {
			return err
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.exc != owner { // released behind our back by a concurrent call of the same owner
		return &Error{Kind: ErrNotOwned, Lock: l.name, Owner: owner}
	}
	l.exc = ""
	l.deleted = true
	for _, q := range l.queue {
		for _, e := range q.entries {
			e.result = deleted
			close(e.ready)
		}
	}
	l.queue = nil
	l.waiting = nil
	return nil
}

// deleteIfUnused marks the lock deleted if nobody holds it or waits for it,
// and reports whether it did (a LockSet unlinking an implicit member).
func (l *SharedLock) deleteIfUnused() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.deleted || l.exc != "" || len(l.shr) > 0 || len(l.queue) > 0 {
		return false
	}
	l.deleted = true
	return true
}

// Holds reports whether owner holds the lock, and in which mode.
func (l *SharedLock) Holds(owner Owner) (Mode, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.holdsLocked(owner)
}

// IsDeleted reports whether the lock has been deleted.
func (l *SharedLock) IsDeleted() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.deleted
}

// Info returns the lock's state for the monitor: its holders (naturally
// sorted) and its queue, head first, each entry's waiting owners naturally
// sorted.
func (l *SharedLock) Info() LockInfo {
	l.mu.Lock()
	defer l.mu.Unlock()
	info := LockInfo{Name: l.name}
	switch {
	case l.deleted:
		info.State = StateDeleted
	case l.exc != "":
		info.State = StateExclusive
		info.Owners = []Owner{l.exc}
	case len(l.shr) > 0:
		info.State = StateShared
		info.Owners = make([]Owner, 0, len(l.shr))
		for o := range l.shr {
			info.Owners = append(info.Owners, o)
		}
		sortOwners(info.Owners)
	}
	for _, q := range l.queue {
		for _, e := range q.entries {
			p := PendingInfo{Mode: e.mode, Priority: e.prio, Owners: slices.Clone(e.owners)}
			sortOwners(p.Owners)
			info.Pending = append(info.Pending, p)
		}
	}
	return info
}

// AppendInfo appends Info to dst (InfoSource).
func (l *SharedLock) AppendInfo(dst []LockInfo) []LockInfo { return append(dst, l.Info()) }
