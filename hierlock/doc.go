// Package hierlock is an in-process library of hierarchical locks: a Go
// port of Ganeti's SharedLock, LockSet and lock manager (lib/locking.py),
// faithful to their semantics and stricter where Ganeti is weak. vmlockd
// uses it to order its own work and serves it to management applications,
// so that several processes share one lock hierarchy; it is also importable
// on its own.
//
// # Overview
//
// The package has three layers, each built on the one below:
//
//   - SharedLock: one lock, held exclusively by one owner or shared by
//     many, with a fair priority queue for waiters.
//   - LockSet: a set of named SharedLocks of one kind (instances, nodes …)
//     plus a set-level lock, acquired all-or-nothing in one global order.
//   - Manager: an ordered list of LockSets (levels: cluster with its single
//     Big Global Lock, instance, nodegroup, node, node-res, network) and the
//     rules that make every owner take levels in that order.
//
// Beside them: a Monitor and LockInfo rows (Ganeti's `gnt-debug locks`),
// natural name order (CompareNatural), and TimeoutStrategy, the job
// processor's growing lock-attempt timeouts.
//
// # Owners
//
// Ganeti identifies owners by thread; Go has no thread identity, so every
// call names its Owner, an explicit token (a job id, a client session).
// Ownership is never inferred from the calling goroutine: a session may hand
// a lock from one goroutine to another, and a daemon can release everything
// a dead client held (Manager.ReleaseAll) from any goroutine. An owner is one
// logical actor: its calls should not overlap. If they do, the state stays
// consistent (every structure is guarded by a mutex) and the second call
// fails with ErrDoubleAcquire where overlapping would be ambiguous.
//
// # SharedLock: the queue
//
// A SharedLock has holders (one exclusive owner, or a set of shared owners)
// and a queue of entries ordered by priority (lower number first; Ganeti uses
// -20 … 19, default 0) and, within a priority, by arrival. Each exclusive
// request is its own entry. A shared request joins the queued shared entry
// of its priority if there is one, otherwise it opens a new one at the tail
// of its priority; so a later sharer can pass exclusives that queued after
// the first waiting sharer of its priority (Ganeti's grouping), and all the
// members of a shared entry are granted together.
//
// A request is granted at once only if it fits the holders and nobody waits
// ahead of it: a new sharer does not barge past a queued exclusive even when
// only sharers hold the lock, unless its priority puts it at the head.
// Otherwise it is queued, unless its context's deadline is less than
// MinTimeout away (or past): then it fails at once with ErrTimeout without
// queueing, which is the try-lock (TryAcquire is the same without a
// context). A context already canceled fails at once with ErrCanceled.
//
// Grants are hand-offs: whoever makes the lock available (release,
// downgrade, a waiter that gives up, a later grant) grants the head entries
// under the lock's mutex and closes their channel; a woken waiter never
// competes for the lock, so there are no spurious wake-ups to survive and no
// window for a newcomer to slip in. This gives the central invariant:
//
//	After every operation, the queue is empty or its head entry does not
//	fit the current holders.
//
// It rules out lost wake-ups (a free lock with waiters) and is checked by the
// tests after every step of the randomized stress test. Two consequences,
// both deliberate improvements on Ganeti: when the head entry gives up (its
// deadline passes, its context is canceled) the next entry is granted at
// once if it fits, instead of waiting for the next release; and a run of
// shared entries at the head (of successive priorities, with no exclusive
// between them) is granted together.
//
// # SharedLock: deadlines
//
// Every blocking call takes a context.Context. One deadline covers a whole
// call (a LockSet acquire of a hundred locks has one deadline, not one per
// lock; Ganeti re-armed a full timeout after each wake-up). A timed acquire
// never fails early: the deadline is measured on the lock's Clock, and a
// timer that fires before the clock reaches the deadline is re-armed for the
// rest. A grant that races with the deadline wins. Without a deadline an
// acquire waits forever; a canceled context fails it with ErrCanceled.
// Tests inject a Clock to move time themselves.
//
// Downgrade turns an exclusive hold into a shared one and lets the queued
// shared entry of the head priority jump ahead of the exclusives queued
// before it; downgrading a shared hold is a no-op. Delete acquires the lock
// exclusively (honouring priority and deadline; on a timeout the lock is left
// as it was), marks it deleted and fails every waiter, and every later
// acquire, with ErrDeleted. Locks are not re-entrant: a second acquire by an
// owner that holds or waits for the lock, in any mode, is ErrDoubleAcquire,
// and releasing a lock one does not hold is ErrNotOwned. Misuse is reported
// as errors, never as panics.
//
// # LockSet
//
// A LockSet's members are always acquired in natural order of their names
// (CompareNatural: "node2" before "node10"), duplicates removed: since every
// owner takes them in the same order, no two owners can wait for each other
// in a cycle within a set. An owner acquires once per set (a second call
// while holding anything there is ErrDoubleAcquire), and one call is
// all-or-nothing: if any member fails, everything the call took is released.
//
// Three modes (Request): exact names, where a missing or deleted name fails
// with ErrNotFound ("it may have been removed"); All, which first takes the
// set-level lock ("name/[lockset]") in the same mode and then every current
// member, skipping those removed meanwhile; and Opportunistic, which takes
// each member only if it is free at once and returns what it got. Holding
// the set-level lock keeps others from adding members (Add takes it
// exclusively), so no name can appear behind an All holder's back.
//
// Add is allowed to an owner that holds nothing in the set, or holds the
// set-level lock exclusively; new members can be added already acquired.
// Remove is allowed to an owner that holds nothing in the set (each lock is
// deleted in turn, waiting for its holders) or holds all the names
// exclusively; waiters of a removed lock fail. Release releases the set-level
// lock first, then the members; Downgrade downgrades the members, then the
// set-level lock once no member is held exclusively.
//
// An exact-names acquire with Create first adds the missing names as
// implicit members (taking the set-level lock exclusively for that moment,
// as Add does, so All holders still see no name appear). Explicit members
// (initial or added) stay until Remove, Ganeti's semantics; an implicit
// member lives only while it is used, so that a client locking one name per
// job leaves nothing behind. The invariant, enforced where members are
// released or an acquire is done with them:
//
//	An implicit member is in the set only while someone holds it, waits
//	for it, or is acquiring it (an acquire in progress that has looked it
//	up, which pins it).
//
// Pinning and unlinking both happen under the set's mutex, so an acquire
// either pins the member or finds the name missing and creates it again: it
// never fails because the name went away unused. Only Remove fails its
// waiters. An implicit member is a member like any other while it exists:
// All takes it, Names and the monitor list it, and Add makes it explicit.
//
// # Manager: levels and rules
//
// A Manager has ordered levels (Config; DefaultLevels is current Ganeti's).
// Level 0 holds one lock, the BGL. The rules, which together make every
// owner acquire along one global order (level, then name) and so rule out
// deadlock across levels:
//
//  1. The BGL is held (usually shared; exclusive for operations that must
//     run alone) before anything else is acquired, added or removed.
//  2. A level is not acquired while holding anything at a higher level.
//  3. Each level is acquired in one call.
//  4. The BGL is not released while holding a higher level; other levels
//     may be released in any order.
//  5. Locks are added and removed only at modifiable levels (not level 0).
//
// A broken rule fails the call before it acquires or releases anything, with
// an *OrderViolationError that names the lock asked for and the held lock it
// conflicts with (or the BGL it lacks). Ganeti asserts instead, which kills
// the job; a daemon serving many clients must not die of one client's
// mistake.
//
// # Monitor
//
// SharedLock.Info, LockSet.AppendInfo, Manager.Snapshot and Monitor.Snapshot
// return LockInfo rows: name, state (none, exclusive, shared, deleted),
// holders, and pending entries (mode, priority, waiting owners) in queue
// order, rows naturally sorted by name. They are plain values, safe to keep
// and to encode as JSON. Each row is consistent (read under its lock's
// mutex); a snapshot of many locks is not taken at one instant.
//
// # Concurrency and lock order inside the package
//
// Every exported method is safe for concurrent use. Internal mutexes are
// never held while blocking on another lock: waiting happens on a channel
// with no mutex held. A LockSet's mutex may be held while taking a member's
// mutex, never the reverse; a SharedLock never calls out while holding its
// mutex, except to an injected Clock, which must not call back into the
// package. There is no package-level mutable state; the error sentinels are
// constants (Kind).
//
// # Errors
//
// Every error is an *Error or an *OrderViolationError and matches its Kind
// with errors.Is (ErrTimeout, ErrDeleted, ErrOrderViolation …). ErrTimeout
// also matches context.DeadlineExceeded and ErrCanceled context.Canceled. A
// timeout is an error here, where Ganeti returns a false value: Go callers
// check errors, and errors.Is(err, ErrTimeout) tells the two apart.
package hierlock
