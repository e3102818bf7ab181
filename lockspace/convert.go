package lockspace

import (
	"context"
	"path/filepath"

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
// holder), and the lease keeps its shared lock. A downgrade keeps the
// token. An upgrade is a new exclusive grant: the lease takes a new token,
// the record's current one plus one, so that it is greater than every
// token granted for the resource so far (a sharer's granted since the
// lease's own grant included) and a state string made with the old token
// is stale; the record is rewritten with it and the lease's holder, so that
// busy errors elsewhere name the holder rather than the newest sharer. If
// the record cannot be written the lease is converted back to shared and
// keeps its token. The returned lease is x.
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
	h := l.holder
	h.Mode = m
	if m == lockmgr.Exclusive {
		tok, err := l.regrant(h)
		if err != nil {
			// Back to shared: converting our own write lock to a read
			// lock meets no conflict.
			_ = tryLock(l.fd, lockType(lockmgr.Shared), lockByte)
			return nil, err
		}
		l.token = tok
	}
	l.res.Mode = m
	l.holder = h
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

// regrant records an upgrade of l as a new grant to h and returns its
// token: the record's current token plus one (for a record without one,
// the lockspace directory's high-water mark's), never less than l's own
// plus one or the epoch's floor plus one (boot.go). An unnamed h (an
// adopted shared lease, which does not know its holder) keeps the holder
// recorded. Called with l.mu held and byte 0 write-locked, which excludes
// every other writer of the record.
func (l *lease) regrant(h lockmgr.Holder) (uint64, error) {
	fd, done, err := l.recordFd()
	if err != nil {
		return 0, err
	}
	defer done()
	cur, fresh, err := readToken(fd)
	if err != nil {
		return 0, l.d.readTokenError(l.res, l.dir == nil, l.path(), err)
	}
	if fresh && l.dir != nil {
		if cur, err = l.dir.readHWM(); err != nil {
			return 0, fsError(l.res, "read the high-water mark of", filepath.Dir(l.path()), err)
		}
	}
	tok := max(cur, l.token, l.d.floor()) + 1
	if !isNamed(h) {
		if rec, named := readHolder(fd); named {
			h = rec
		}
	}
	if err := pwriteAll(fd, appendRecord(nil, tok, h, h.Since, &l.d.holders), 0); err != nil {
		return 0, fsError(l.res, "write the token of", l.path(), err)
	}
	return tok, nil
}

// isNamed reports whether h names anyone (see readHolder).
func isNamed(h lockmgr.Holder) bool { return h.UUID != "" || h.Name != "" || h.PID != 0 }

// sameHolder reports whether two holders describe one grant's holder.
func sameHolder(a, b lockmgr.Holder) bool {
	return a.UUID == b.UUID && a.Name == b.Name && a.PID == b.PID && a.Host == b.Host
}
