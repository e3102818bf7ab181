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
// resource, naming them as far as the record tells (never the lease's own
// holder), and the lease keeps its shared lock. The token is unchanged:
// the grant is the same. An upgrade rewrites the record with the lease's
// holder (and the file's current token), so that busy errors elsewhere
// name it rather than the newest sharer. The returned lease is x.
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
			if pid > 0 {
				h.Foreign, h.PID = true, int(pid)
			} else if rec, named := l.readRecord(); named && isNamed(l.holder) && !sameHolder(rec, l.holder) {
				h = rec
			}
			h.Mode = modeOfLock(held)
		}
		return nil, &lockmgr.BusyError{Resource: r, Holder: h}
	}
	l.res.Mode = m
	l.holder.Mode = m
	if m == lockmgr.Exclusive && isNamed(l.holder) {
		l.rewriteRecord() // best effort: the conversion is done
	}
	return l, nil
}

// recordFd returns the descriptor of the file that holds l's record, and a
// function to call when done with it. Called with l.mu held.
func (l *lease) recordFd() (int, func(), error) {
	if l.dir != nil {
		return l.fd, func() {}, nil
	}
	tf, err := l.d.tokenFile(l.res, l.res.Name)
	if err != nil {
		return -1, nil, err
	}
	return tf.fd, func() { l.d.put(tf) }, nil
}

// readRecord reads the holder recorded for l's resource, best effort.
// Called with l.mu held.
func (l *lease) readRecord() (lockmgr.Holder, bool) {
	fd, done, err := l.recordFd()
	if err != nil {
		return lockmgr.Holder{}, false
	}
	defer done()
	return readHolder(fd)
}

// rewriteRecord records l's holder, keeping the file's current token.
// Called with l.mu held and byte 0 write-locked, which excludes every
// other writer of the record.
func (l *lease) rewriteRecord() {
	fd, done, err := l.recordFd()
	if err != nil {
		return
	}
	defer done()
	cur, fresh, err := readToken(fd)
	if err != nil || fresh {
		return
	}
	_ = pwriteAll(fd, appendRecord(nil, cur, l.holder, l.holder.Since, &l.d.holders), 0)
}

// isNamed reports whether h names anyone (see readHolder).
func isNamed(h lockmgr.Holder) bool { return h.UUID != "" || h.Name != "" || h.PID != 0 }

// sameHolder reports whether two holders describe one grant's holder.
func sameHolder(a, b lockmgr.Holder) bool {
	return a.UUID == b.UUID && a.Name == b.Name && a.PID == b.PID && a.Host == b.Host
}
