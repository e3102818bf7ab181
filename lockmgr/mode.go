package lockmgr

import (
	"context"
	"fmt"
	"time"
)

// Converter is a Driver that can change the mode of a lease it granted in
// place and atomically: at no moment is the resource unlocked, and a
// conversion that fails leaves the lease exactly as it was. A conversion
// to Shared (a downgrade) cannot meet a conflict; a conversion to
// Exclusive fails with a *BusyError while anyone else holds the resource.
// m is Exclusive or Shared. The returned lease replaces l (it may be l
// itself, changed). A downgrade keeps l's token; an upgrade is a new grant,
// whose token is greater than every token granted for the resource so far
// (another sharer's included) and is the resource's current one for
// Request.Expect.
//
// Drivers whose own leases of one resource exclude each other (the
// lockspace driver's OFD locks do) need this for Manager.ChangeMode to
// work at all.
type Converter interface {
	Convert(ctx context.Context, l Lease, m Mode) (Lease, error)
}

// ChangeMode changes the mode in which the object uuid holds the resource
// r (r.Mode is the new mode) without a moment at which the resource is
// unheld, so that no other holder can slip in: a block job takes its
// base image from Shared to Exclusive before it writes it, and back to
// Shared when it ends.
//
// The object must hold r (else a CodeNotHeld error); the same mode is a
// no-op. A mode that conflicts with another holder in this Manager is
// refused with a *BusyError naming it, before the driver is asked; while
// the driver works, the key is reserved in the new mode, so that no
// conflicting request of another object is granted meanwhile. Then:
//   - to ReadOnly: the driver's lease is released; the use stays recorded;
//   - from ReadOnly: a lease is acquired, as by AcquireResource;
//   - between Exclusive and Shared: through Converter if the driver is
//     one; otherwise a new lease in the new mode is acquired first and
//     the old one released after, which works with drivers whose leases
//     for one holder do not exclude each other (the nop driver) and fails
//     with a *BusyError with the others.
//
// On any failure the object holds r as before (a conversion or a grant
// that completes after ctx is done is undone; a late conversion that
// cannot be converted back stays, and the table and the observer show it). The use keeps its "since"
// (the holding began then); its token becomes the new lease's. The
// observer is told of the change; if it fails (the daemon's lock-holder
// did not record it in time), the change is undone as a failed grant is,
// even if ctx is done: the driver's lease is converted back (or the new
// one released and the old one kept), the table shows the old mode, the
// observer is told, and the call fails with the observer's error. A lease
// converted back carries the driver's current token (a conversion back to
// exclusive is a new grant). If converting back fails, the object holds r
// in the new mode, and the error says so.
//
// Once the change is recorded it stands, whatever ctx does: an old lease
// the change leaves behind (to ReadOnly, or without a Converter) is
// released then even if ctx is done, and if ctx ends before the driver
// has released it, ChangeMode returns nil and the release completes in
// the background. If the driver fails to release it, the error says that
// r is held in the new mode.
func (m *Manager) ChangeMode(ctx context.Context, uuid string, r Resource) error {
	ob, r, err := m.lookupWith(uuid, r)
	if err != nil {
		return err
	}
	defer ob.op.Unlock()
	u := ob.find(r.Key())
	if u == nil || !u.held {
		return &Error{Code: CodeNotHeld, Resource: r.String(), Msg: "not held by object " + ob.obj.UUID}
	}
	if u.res.Mode == r.Mode {
		return nil
	}
	old, from, tok := u.lease, u.res.Mode, u.token
	// The key is reserved, as by acquire, until the change is recorded or
	// undone, in the stronger of the two modes (Exclusive < Shared <
	// ReadOnly): no conflicting request slips in between the check and the
	// change, nor while the change is recorded one that would keep it from
	// being undone.
	m.mu.Lock()
	err = m.conflictLocked(ob, u.key, r)
	if err == nil {
		m.pending[u.key] = append(m.pending[u.key], reservation{ob, min(from, r.Mode)})
	}
	m.mu.Unlock()
	if err != nil {
		return err
	}
	defer func() {
		m.mu.Lock()
		m.unreserveLocked(ob, []*use{u})
		m.mu.Unlock()
	}()

	var lease Lease
	conv, converts := m.driver.(Converter)
	converts = converts && old != nil && r.Mode != ReadOnly
	switch {
	case r.Mode == ReadOnly:
	case converts:
		orig := old
		// A conversion that completes after ctx is done is converted back,
		// so that the lease stays in the mode the table records; if that
		// fails, the table and the observer take the lease's mode instead.
		lease, err = Bounded(ctx, func() (Lease, error) { return conv.Convert(ctx, orig, r.Mode) },
			func(l Lease) {
				if back, err := conv.Convert(context.Background(), l, from); err == nil {
					m.settle(ob, u, orig, back, from)
				} else {
					m.settle(ob, u, orig, l, r.Mode)
				}
			})
	default:
		h := holderOf(ob.obj, r.Mode, time.Time{})
		var ls []Lease
		ls, err = Bounded(ctx, func() ([]Lease, error) { return m.driver.Acquire(ctx, []Request{{Resource: r, Holder: h}}) },
			func(ls []Lease) { _ = m.driver.Release(context.Background(), ls) })
		if err == nil {
			lease = ls[0]
		}
	}
	if err != nil {
		return m.nameHolder(ob, err)
	}
	if converts {
		old = nil // converted, not to be released
	}

	m.setMode(u, r.Mode, lease, tok)
	if err := m.notify(ctx, ob); err != nil {
		// Not recorded: a caller told that the call failed must hold r as
		// before, so the change is undone, even if ctx is done.
		bctx := context.WithoutCancel(ctx)
		switch {
		case converts:
			back, cerr := conv.Convert(bctx, lease, from)
			if cerr != nil {
				// The lease is as it was: in the new mode, as the table says.
				_ = m.notify(bctx, ob)
				return &Error{Code: CodeOf(err), Resource: r.String(), Err: err,
					Msg: fmt.Sprintf("the change to %s was not recorded, and converting it back to %s failed (%v): it is held %s now", r.Mode, from, cerr, r.Mode.Adverb())}
			}
			lease = back
		case lease != nil:
			// A failed release leaves no usable lease (see release).
			_ = m.driver.Release(bctx, []Lease{lease})
			lease = old
		default:
			lease = old // to read-only: the old lease was kept
		}
		m.setMode(u, from, lease, tok)
		_ = m.notify(bctx, ob)
		return &Error{Code: CodeOf(err), Resource: r.String(), Err: err,
			Msg: fmt.Sprintf("the change to %s was not recorded and is undone: it is held %s as before", r.Mode, from.Adverb())}
	}
	if old != nil {
		// The change is made and recorded: the old lease, which the
		// observer no longer lists, is released whatever ctx does. A
		// release the caller could not wait for is no failure of the
		// change.
		if waited, err := m.releaseLeases(ctx, []Lease{old}); waited && err != nil {
			return &Error{Code: CodeOf(err), Resource: r.String(), Err: err,
				Msg: fmt.Sprintf("it is held %s now, but releasing its %s lease failed", r.Mode.Adverb(), from)}
		}
	}
	return nil
}

// setMode records that u is held in mode through lease (nil: none, read-
// only), with lease's token, or tok without one.
func (m *Manager) setMode(u *use, mode Mode, lease Lease, tok uint64) {
	if lease != nil {
		tok = lease.Token()
	}
	m.mu.Lock()
	u.res.Mode, u.lease, u.token = mode, lease, tok
	m.mu.Unlock()
}

// settle records the lease of u, in mode, after a conversion that
// completed after its ChangeMode had returned: converted back, the lease is
// in the mode the table records, but it may be another Lease value than
// orig, and an upgrade undone keeps the upgrade's token, which the table
// and the observer (the daemon's lock-holder records) must show, or a
// handover state would carry a token already gone; not converted back, it
// is held in the new mode, which they must show too. Nothing is done if u
// no longer holds orig (released meanwhile).
func (m *Manager) settle(ob *object, u *use, orig, back Lease, mode Mode) {
	tok := back.Token()
	ob.op.Lock()
	defer ob.op.Unlock()
	m.mu.Lock()
	same := !ob.gone && u.lease == orig
	if same {
		u.res.Mode, u.lease, u.token = mode, back, tok
	}
	m.mu.Unlock()
	if same {
		_ = m.notify(context.Background(), ob)
	}
}
