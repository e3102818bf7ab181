package hierlock

import (
	"context"
	"fmt"
	"strconv"
	"strings"
)

// Kind classifies every error of the package. Each Kind is itself an error,
// so the constants below are the targets of errors.Is:
//
//	if errors.Is(err, hierlock.ErrTimeout) { ... }
//
// They are constants, not variables: the package has no mutable global state.
type Kind uint8

// The kinds of failure. A call that fails with any of them has changed
// nothing (all-or-nothing), except where its doc comment says otherwise
// (LockSet.Remove returns what it removed before failing).
const (
	// ErrInvalid: a malformed argument (empty owner or name, unknown mode
	// or level, bad configuration).
	ErrInvalid Kind = iota + 1
	// ErrTimeout: the context's deadline passed before the lock could be
	// granted, or a try-lock (deadline under a millisecond away) found it
	// busy. Also matches context.DeadlineExceeded.
	ErrTimeout
	// ErrCanceled: the context was canceled while waiting. Also matches
	// context.Canceled (or the context's cause).
	ErrCanceled
	// ErrDeleted: the lock was deleted, before or while waiting for it.
	ErrDeleted
	// ErrDoubleAcquire: the owner already holds, or already waits for, this
	// lock (locks are not re-entrant), or already acquired in this set.
	ErrDoubleAcquire
	// ErrNotOwned: release or downgrade of a lock the owner does not hold.
	ErrNotOwned
	// ErrNotFound: a named lock is not in the set ("it may have been
	// removed").
	ErrNotFound
	// ErrExists: add of a name that is already in the set.
	ErrExists
	// ErrOwnership: the owner's holdings forbid the operation: delete while
	// holding the lock shared, add while holding part of the set or the
	// set-level lock only shared, remove while holding some but not all of
	// the names exclusively.
	ErrOwnership
	// ErrOrderViolation: a Manager rule was broken (see
	// OrderViolationError).
	ErrOrderViolation
)

func (k Kind) String() string {
	switch k {
	case ErrInvalid:
		return "invalid argument"
	case ErrTimeout:
		return "timeout"
	case ErrCanceled:
		return "canceled"
	case ErrDeleted:
		return "deleted lock"
	case ErrDoubleAcquire:
		return "double acquire"
	case ErrNotOwned:
		return "not owned"
	case ErrNotFound:
		return "not found, it may have been removed"
	case ErrExists:
		return "already exists"
	case ErrOwnership:
		return "not permitted by the owner's holdings"
	case ErrOrderViolation:
		return "lock order violation"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Error makes every Kind an error (the sentinel of its class).
func (k Kind) Error() string { return "hierlock: " + k.String() }

// Error is the error type of the package for everything but order
// violations. It matches its Kind with errors.Is and unwraps to its cause
// (the context's error for ErrTimeout and ErrCanceled).
type Error struct {
	Kind  Kind
	Lock  string   // the lock or set concerned ("node/node1", "node/[lockset]"), if any
	Owner Owner    // the owner that made the call, if any
	Names []string // the names concerned (missing, duplicate, not held), if any
	Msg   string   // detail for a human, if any
	Err   error    // the cause, if any
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("hierlock: ")
	if e.Lock != "" {
		b.WriteString(e.Lock)
		b.WriteString(": ")
	}
	b.WriteString(e.Kind.String())
	if e.Msg != "" {
		b.WriteString(": ")
		b.WriteString(e.Msg)
	}
	if len(e.Names) > 0 {
		fmt.Fprintf(&b, " %q", e.Names)
	}
	if e.Owner != "" {
		fmt.Fprintf(&b, " (owner %q)", e.Owner)
	}
	return b.String()
}

// Is reports whether target is e's Kind.
func (e *Error) Is(target error) bool {
	k, ok := target.(Kind)
	return ok && k == e.Kind
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Rule names the Manager rule an OrderViolationError broke.
type Rule uint8

// The Manager's rules (Ganeti's lock manager assertions).
const (
	// RuleBGLFirst: the BGL must be held before any other lock is acquired,
	// added or removed.
	RuleBGLFirst Rule = iota + 1
	// RuleLevelOrder: no level may be acquired (added to, removed from)
	// while holding a lock at a higher level.
	RuleLevelOrder
	// RuleOneCall: each level is acquired in one call; a second acquire at a
	// level already held is refused.
	RuleOneCall
	// RuleBGLLast: the BGL may not be released while holding a lock at a
	// higher level.
	RuleBGLLast
	// RuleNotModifiable: locks are added and removed only at modifiable
	// levels (never at the cluster level).
	RuleNotModifiable
)

func (r Rule) String() string {
	switch r {
	case RuleBGLFirst:
		return "the BGL must be held before any other lock"
	case RuleLevelOrder:
		return "levels are acquired in order: no level while holding a higher one"
	case RuleOneCall:
		return "each level is acquired in one call"
	case RuleBGLLast:
		return "the BGL may not be released while holding higher levels"
	case RuleNotModifiable:
		return "locks are added and removed only at modifiable levels"
	}
	return "rule(" + strconv.Itoa(int(r)) + ")"
}

// OrderViolationError reports a broken Manager rule. It names the lock the
// call was about and the lock it conflicts with: Held, a lock the owner
// holds, or Required, a lock the owner should hold but does not (the BGL).
// It matches ErrOrderViolation with errors.Is, and unwraps to Err when set
// (ErrDoubleAcquire for RuleOneCall).
type OrderViolationError struct {
	Op       string // "acquire", "release", "add" or "remove"
	Owner    Owner
	Lock     string // the lock the call was about, "level/name"
	Held     string // the held lock it conflicts with, if any
	Required string // the lock that must be held first, if any
	Rule     Rule
	Err      error
}

func (e *OrderViolationError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "hierlock: lock order violation: owner %q cannot %s %s", e.Owner, e.Op, e.Lock)
	if e.Held != "" {
		fmt.Fprintf(&b, " while holding %s", e.Held)
	}
	if e.Required != "" {
		fmt.Fprintf(&b, " without holding %s", e.Required)
	}
	fmt.Fprintf(&b, " (%s)", e.Rule)
	return b.String()
}

// Is reports whether target is ErrOrderViolation.
func (e *OrderViolationError) Is(target error) bool { return target == ErrOrderViolation }

// Unwrap returns the underlying error, if any.
func (e *OrderViolationError) Unwrap() error { return e.Err }

// ctxError turns a done context into ErrTimeout or ErrCanceled.
func ctxError(ctx context.Context, lock string, owner Owner) error {
	err := ctx.Err()
	if err == context.DeadlineExceeded {
		return &Error{Kind: ErrTimeout, Lock: lock, Owner: owner, Err: err}
	}
	return &Error{Kind: ErrCanceled, Lock: lock, Owner: owner, Err: context.Cause(ctx)}
}

func timeoutError(lock string, owner Owner, msg string) error {
	return &Error{Kind: ErrTimeout, Lock: lock, Owner: owner, Msg: msg, Err: context.DeadlineExceeded}
}
