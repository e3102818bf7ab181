package lockmgr

import (
	"context"
	"errors"
	"os"
)

// Request asks a driver for one resource. Resource is canonical (see
// Canonical) and its mode is Exclusive or Shared: read-only resources never
// reach a driver.
type Request struct {
	Resource Resource
	// Expect, when non-zero, makes the grant conditional: it succeeds only if
	// the resource's current token is Expect, that is nobody else was granted
	// the resource since the state string that carried Expect was made.
	Expect uint64
	// Holder is recorded with the lease where the driver can store it, so
	// that other processes and hosts can name who holds the resource.
	Holder Holder
}

// Lease is a granted resource. Token is its fencing token: it is strictly
// greater than the token of every earlier grant of the same resource.
type Lease interface {
	Resource() Resource
	Token() uint64
}

// Driver takes and releases locks. Implementations must be safe for
// concurrent use.
//
// Acquire grants all requests or none: when it fails part-way it releases
// what it took before returning, and the error names the resource that
// failed (a *BusyError, a *StaleStateError, or an *Error whose Resource is
// set). The Manager bounds every call by the context's deadline even when a
// driver blocks in a system call (see Bounded), but a driver should honour
// ctx where it can.
//
// Release releases each lease, continuing past failures, and returns the
// first error. Releasing a lease twice is an error of class CodeNotHeld.
type Driver interface {
	Name() string
	Acquire(ctx context.Context, reqs []Request) ([]Lease, error)
	Release(ctx context.Context, leases []Lease) error
	Close() error
}

// FileLease is a lease held through an open file description: the lock
// lasts as long as any copy of File stays open, in any process. The daemon
// keeps a copy in its lock-holder process so that locks survive its crash.
type FileLease interface {
	Lease
	File() *os.File
}

// Adopter is a driver that can take back leases whose files were kept
// elsewhere (by the lock-holder process) across a restart of the daemon.
// Adopt takes ownership of f.
type Adopter interface {
	Adopt(r Resource, token uint64, f *os.File) (Lease, error)
}

// Bounded runs f and returns its result, or a timeout error as soon as ctx is
// done, whichever comes first. When ctx wins, f keeps running in the
// background and undo is called with its result once it returns, so that a
// late grant is not leaked. A hung system call (a dead NFS server) thus
// never holds up the caller beyond its deadline.
func Bounded[T any](ctx context.Context, f func() (T, error), undo func(T)) (T, error) {
	if err := ended(ctx); err != nil {
		var zero T
		return zero, err
	}
	v, ok, err := await(ctx, f, undo)
	if !ok {
		return v, timeoutError(ctx.Err())
	}
	return v, err
}

// await runs f and returns its result with ok set, or ok false as soon as
// ctx is done; f then keeps running in the background, and undo (if not
// nil) gets its result once it returns without error.
func await[T any](ctx context.Context, f func() (T, error), undo func(T)) (v T, ok bool, err error) {
	if ctx.Done() == nil {
		v, err = f()
		return v, true, err
	}
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, true, r.err
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.err == nil && undo != nil {
				undo(r.v)
			}
		}()
		var zero T
		return zero, false, nil
	}
}

// ended returns the error of a call whose ctx is done before the driver is
// asked, or nil.
func ended(ctx context.Context) error {
	err := ctx.Err()
	switch {
	case err == nil:
		return nil
	case errors.Is(err, context.Canceled):
		return timeoutError(err)
	}
	// Not the driver's fault: the call had no time left to ask it.
	return &Error{Code: CodeTimeout, Msg: "deadline exceeded before the lock driver was asked; nothing was changed", Err: err}
}

// immediate reports whether d's calls return at once whatever happens
// (NopDriver): the caller never waits past its deadline on them, so the
// Manager makes them directly instead of in a goroutine that bounds them.
func immediate(d Driver) bool {
	_, ok := d.(NopDriver)
	return ok
}

func timeoutError(err error) error {
	if errors.Is(err, context.Canceled) {
		return &Error{Code: CodeTimeout, Msg: "canceled", Err: err}
	}
	return &Error{Code: CodeTimeout, Msg: "deadline exceeded (the lock driver did not answer in time; nothing was changed)", Err: err}
}

// NopDriver grants everything and locks nothing. It is the backwards-
// compatible default of libvirt's lock manager ("nop"): the Manager still
// records who uses what and still refuses conflicts it can see itself.
type NopDriver struct{}

type nopLease struct{ r Resource }

func (l nopLease) Resource() Resource { return l.r }
func (l nopLease) Token() uint64      { return 0 }

// Name returns "nop".
func (NopDriver) Name() string { return "nop" }

// Acquire grants every request.
func (NopDriver) Acquire(_ context.Context, reqs []Request) ([]Lease, error) {
	out := make([]Lease, len(reqs))
	for i, r := range reqs {
		out[i] = nopLease{r.Resource}
	}
	return out, nil
}

// Release does nothing.
func (NopDriver) Release(context.Context, []Lease) error { return nil }

// Close does nothing.
func (NopDriver) Close() error { return nil }
