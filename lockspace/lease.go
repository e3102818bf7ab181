package lockspace

import (
	"context"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// lease is a granted resource: an open file description locked on byte 0.
type lease struct {
	d     *Driver
	res   lockmgr.Resource
	token uint64  // under mu once granted (see Convert)
	dir   *handle // the lease file's directory (referenced); nil for a direct lease
	sub   string  // the lease file's lockspace directory, "" for DiskLeaseDir
	name  string  // the lease file's name in dir
	id    fileID  // the lease file

	// During Acquire: tf is a direct lease's token file (referenced) until
	// commit, which sets committed.
	tf        *handle
	committed bool

	// img is the kept descriptor a direct lease was lent (images.go), or
	// nil.
	img *keptImage

	mu   sync.Mutex // guards the fields below, res.Mode and token (see Convert)
	held bool
	fd   int
	file *os.File // made by File, or given to Adopt; owns fd when set
	// holder is the holder recorded by this grant, with its grant time;
	// unnamed for an adopted shared lease, whose record may be another's.
	holder lockmgr.Holder
}

// Resource returns the leased resource. Its mode is the current one: it
// changes with Convert.
func (l *lease) Resource() lockmgr.Resource {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.res
}

// Token returns the lease's fencing token. It changes with an upgrade by
// Convert.
func (l *lease) Token() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.token
}

// File returns the locked open file: the lock lasts while any copy of its
// description stays open, in any process, unless the lease is released
// (Release unlocks the description explicitly, so copies kept elsewhere do
// not keep the lock). The file belongs to the lease: do not close it; pass
// a dup. File returns nil once the lease is released. A lease dropped
// without Release keeps its lock until its file is garbage collected (if
// File was called) or until the process exits (if not).
func (l *lease) File() *os.File {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.held {
		return nil
	}
	if l.file == nil {
		l.file = os.NewFile(uintptr(l.fd), l.path())
	}
	return l.file
}

// target is the locked file as resolve named it.
func (l *lease) target() target {
	return target{direct: l.dir == nil, path: l.res.Name, sub: l.sub, name: l.name}
}

func (l *lease) path() string {
	switch {
	case l.dir == nil:
		return l.res.Name
	case l.sub == "":
		return filepath.Join(l.d.cfg.DiskLeaseDir, l.name)
	}
	return filepath.Join(l.d.cfg.LeaseDir, l.sub, l.name)
}

// release frees the lease: a lease file's last holder removes it. A second
// release is a CodeNotHeld error. keep lets a direct lease's descriptor that
// was not lent from the kept ones join them (see images.go); Release passes
// true, a failed Acquire false.
func (l *lease) release(keep bool) error {
	l.mu.Lock()
	if !l.held {
		l.mu.Unlock()
		return &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: l.res.String(), Msg: "the lease was already released"}
	}
	l.held = false
	fd, f := l.fd, l.file
	l.file = nil
	l.mu.Unlock()
	if f != nil {
		// If the user closed the file (which File forbids), fd may already
		// name another file: do not touch it.
		if v := f.Fd(); v == ^uintptr(0) {
			l.d.images.drop(l.img)
			if l.dir != nil {
				l.dir.leases.Add(-1)
				l.d.put(l.dir)
			}
			return &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: l.res.String(),
				Msg: "the lease's file was closed before Release; the lock lasts as long as copies of it stay open"}
		}
	}

	// Without a File, no copy of the description exists: close unlocks.
	// A direct lease's descriptor without one may be kept (images.go).
	explicit := f != nil
	if l.tf != nil {
		l.d.put(l.tf)
		l.tf = nil
	}
	switch {
	case l.dir != nil:
		l.d.dropFile(fd, l.dir, l.name, l.id, l.res.Mode, l.token, l.committed, explicit)
		l.dir.leases.Add(-1)
		l.d.put(l.dir)
	case explicit:
		_ = unlock(fd, 0, 0)
		l.d.images.drop(l.img) // f owns the descriptor
	case l.d.images.keep(l.img, l.res.Name, fd, keep):
		return nil
	}
	if f != nil {
		_ = f.Close()
	} else {
		_ = unix.Close(fd)
	}
	return nil
}

// undo releases a lease of a failed Acquire, if it was locked.
func (l *lease) undo() {
	if l.held {
		_ = l.release(false)
	}
}

// Release releases each lease, continuing past failures, and returns the
// first error: CodeNotHeld for a lease released before, CodeInvalidArgument
// for a lease of another driver. The last holder of a lease file removes
// it. Release works after Close.
func (d *Driver) Release(_ context.Context, leases []lockmgr.Lease) error {
	var first error
	for _, x := range leases {
		var err error
		if l, ok := x.(*lease); ok && l.d == d {
			err = l.release(true)
		} else {
			err = lockmgr.Errorf(lockmgr.CodeInvalidArgument, "%T is not a lease of this lockspace driver", x)
		}
		if first == nil {
			first = err
		}
	}
	return first
}

// Adopt takes back a lease whose file was kept elsewhere across a restart
// of the daemon (the lock is still on f's open file description), and takes
// ownership of f: it is closed when the lease is released, or at once if
// Adopt fails. A failed Adopt never unlocks: other copies of f's
// description (the lock-holder's) keep whatever lock it has until they are
// closed. r must be canonical, as for Acquire, and token the lease's
// token.
//
// Adopt checks that f is still the file at r's path (a lease file that was
// replaced means the lock is lost: CodeInternal), re-asserts the lock on f
// (a no-op if f holds it; a *lockmgr.BusyError if someone else took it),
// and checks the token: an exclusive lease's file must still carry token,
// a shared one's at least token, else a *lockmgr.StaleStateError. The
// adopted lease releases like any other, removing the lease file if it is
// the last holder.
func (d *Driver) Adopt(r lockmgr.Resource, token uint64, f *os.File) (lockmgr.Lease, error) {
	if f == nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(), Msg: "no file to adopt"}
	}
	t, err := d.resolve(r)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	fd := int(f.Fd())
	l := &lease{d: d, res: r, token: token, sub: t.sub, name: t.name, committed: true, held: true, fd: fd, file: f}
	path := d.filePath(&t)
	var st, pst unix.Stat_t
	var recFd int
	if t.direct {
		tf, err := d.tokenFile(r, path)
		if err != nil {
			_ = f.Close()
			return nil, err
		}
		defer d.put(tf)
		recFd = tf.fd
		err = unix.Stat(path, &pst)
		if err != nil {
			_ = f.Close()
			return nil, imageError(r, path, err)
		}
	} else {
		dir, err := d.dirFor(r, &t)
		if err != nil {
			_ = f.Close()
			return nil, err
		}
		l.dir, recFd = dir, fd
		if err = statPath(dir, &t, &pst); err != nil {
			d.put(dir)
			_ = f.Close()
			return nil, &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: r.String(), Msg: "the lease file " + path + " is gone: the lock was lost", Err: err}
		}
	}
	// A failure closes f and leaves the lock alone: the description is
	// shared with the lock-holder's copy, and the owner may still run.
	// Whether the lock goes is the caller's decision (it drops the other
	// copies once the owner is known to be gone, or killed).
	fail := func(err error) (lockmgr.Lease, error) {
		if l.dir != nil {
			d.put(l.dir)
		}
		_ = f.Close()
		return nil, err
	}
	if err := unix.Fstat(fd, &st); err != nil {
		return fail(fsError(r, "stat", path, err))
	}
	if !sameFile(&st, &pst) {
		return fail(&lockmgr.Error{Code: lockmgr.CodeInternal, Resource: r.String(),
			Msg: "the adopted file is no longer the one at " + path + ": the lock was lost"})
	}
	l.id = idOf(&st)
	if err := d.lock(fd, r, &t, recFd, false); err != nil {
		_ = f.Close()
		if l.dir != nil {
			d.put(l.dir)
		}
		return nil, err
	}
	cur, _, err := readToken(recFd)
	if err != nil {
		return fail(d.readTokenError(r, l.dir == nil, path, err))
	}
	if cur < token || r.Mode == lockmgr.Exclusive && cur != token {
		return fail(&lockmgr.StaleStateError{Resource: r, Want: token, Current: cur})
	}
	if r.Mode == lockmgr.Exclusive {
		// Nobody was granted the resource since: the record is this lease's.
		l.holder, _ = readHolder(recFd)
	}
	if l.dir != nil {
		l.dir.leases.Add(1)
	}
	return l, nil
}
