package lockspace

import (
	"context"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// Convert changes a lease's mode in place (lockmgr.Converter): it converts
// the OFD lock on byte 0 of the lease's own open file description, which
// the kernel does atomically, so the resource is never unlocked on the
// way, and every copy of the description (the lock-holder's) holds the new
// mode at once. A downgrade to Shared always succeeds. An upgrade to
// Exclusive fails with a *lockmgr.BusyError while anyone else holds the
// resource, and the lease keeps its shared lock. The token is unchanged:
// the grant is the same. The returned lease is x.
func (d *Driver) Convert(_ context.Context, x lockmgr.Lease, m lockmgr.Mode) (lockmgr.Lease, error) {
	l, ok := x.(*lease)
	if !ok || l.d != d {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "%T is not a lease of this lockspace driver", x)
	}
	if m != lockmgr.Exclusive && m != lockmgr.Shared {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "%s: cannot convert a lease to %s", l.res, m)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.held {
		return nil, &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: l.res.String(), Msg: "the lease was already released"}
	}
	if l.res.Mode == m {
		return l, nil
	}
	typ := lockType(m)
	if err := tryLock(l.fd, typ, lockByte); err != nil {
		if err != unix.EAGAIN {
			return nil, fsError(l.res, "convert the lock of", l.path(), err)
		}
		r := l.res
		r.Mode = m
		var h lockmgr.Holder
		if held, pid, ok := conflict(l.fd, typ); ok {
			h.Mode = modeOfLock(held)
			if pid > 0 {
				h.Foreign, h.PID = true, int(pid)
			}
		}
		return nil, &lockmgr.BusyError{Resource: r, Holder: h}
	}
	l.res.Mode = m
	return l, nil
}
