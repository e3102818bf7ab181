package lockspace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// Config configures a Driver. Relative directories are taken relative to
// the working directory at New.
type Config struct {
	// StateDir is this host's state directory (required). Direct leases keep
	// their tokens in StateDir/tokens. It is created (mode 0700) if missing.
	StateDir string
	// LeaseDir is the root of the lockspaces: the lease "LS/KEY" is the file
	// LeaseDir/LS/KEY, and a custom resource of type T is a file in
	// LeaseDir/custom.T. Lockspace directories are created on demand (mode
	// 0700). Hosts that share LeaseDir (NFS, GFS2, CephFS) exclude each
	// other. If empty, lease and custom resources are refused with
	// CodeUnsupported. LeaseDir and DiskLeaseDir are opened once, by New:
	// they must not be renamed or removed while leases in them are held
	// (see the package comment).
	LeaseDir string
	// DiskLeaseDir, if set, makes disk leases indirect: a disk is locked
	// through the lease file DiskLeaseDir/<sha256hex(canonical path)>,
	// which is what virtlockd's indirect lockspace does too. If empty, a
	// disk lease locks the image file itself (direct), and the image must
	// exist. It must not be a lockspace directory of LeaseDir.
	DiskLeaseDir string
}

// Cache sizes: descriptors kept open between calls.
const (
	maxCachedTokenFiles = 1024 // direct leases' token files
	maxCachedDirs       = 256  // lockspace directories
)

// maxReopen bounds how often an acquire starts again because the lease file
// it locked was being removed by its last holder.
const maxReopen = 100

// sharedRetries bounds how often a shared acquire retries a conflict that
// looks like a last sharer's removal (see the package comment).
const sharedRetries = 20

// Driver is the lockspace lock driver. It implements lockmgr.Driver and
// lockmgr.Adopter, and its leases implement lockmgr.FileLease. It is safe for
// concurrent use. Two Drivers, in one process or in several, exclude each
// other on the same files.
type Driver struct {
	cfg     Config
	holders holderCache

	// Directory handles, set by New and never changed: read without mu.
	tokDir   *handle // StateDir/tokens
	leaseDir *handle // LeaseDir, or nil
	diskDir  *handle // DiskLeaseDir, or nil (direct disk leases)

	boot bootState // StateDir/boot as this Driver's New left it (boot.go)

	mu     sync.Mutex
	closed bool
	tokens handleCache // token files, by canonical disk path
	dirs   handleCache // lockspace directories, by name in LeaseDir

	images imageCache // released direct leases' descriptors (images.go)

	testHookLocked func() // if set, runs between Acquire's two phases
}

var _ lockmgr.Driver = (*Driver)(nil)
var _ lockmgr.Adopter = (*Driver)(nil)
var _ lockmgr.FileLease = (*lease)(nil)

// New returns a driver for cfg, creating its directories if missing, and
// records the start in StateDir/boot (see the package comment, "Host
// crashes"). One Driver at a time should use a StateDir: its Close marks
// the epoch as ended cleanly.
func New(cfg Config) (*Driver, error) {
	bootID, err := hostBootID()
	if err != nil {
		return nil, err
	}
	return newDriver(cfg, bootID)
}

// newDriver is New in the boot bootID of the host.
func newDriver(cfg Config, bootID string) (*Driver, error) {
	if cfg.StateDir == "" {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "lockspace: StateDir is required")
	}
	for _, p := range []*string{&cfg.StateDir, &cfg.LeaseDir, &cfg.DiskLeaseDir} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "lockspace: bad directory " + *p, Err: err}
		}
		*p = abs
	}
	if cfg.LeaseDir != "" && cfg.DiskLeaseDir != "" && filepath.Dir(cfg.DiskLeaseDir) == cfg.LeaseDir {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument,
			"lockspace: DiskLeaseDir %s must not be a lockspace directory of LeaseDir %s", cfg.DiskLeaseDir, cfg.LeaseDir)
	}
	d := &Driver{cfg: cfg,
		tokens: handleCache{m: make(map[string]*handle), max: maxCachedTokenFiles},
		dirs:   handleCache{m: make(map[string]*handle), max: maxCachedDirs}}
	var err error
	if d.tokDir, err = openConfDir(filepath.Join(cfg.StateDir, "tokens")); err != nil {
		return nil, err
	}
	if d.boot, err = startEpoch(cfg.StateDir, bootID); err != nil {
		d.tokDir.close()
		return nil, err
	}
	if cfg.LeaseDir != "" {
		if d.leaseDir, err = openConfDir(cfg.LeaseDir); err != nil {
			d.tokDir.close()
			return nil, err
		}
	}
	if cfg.DiskLeaseDir != "" {
		if d.diskDir, err = openConfDir(cfg.DiskLeaseDir); err != nil {
			d.tokDir.close()
			if d.leaseDir != nil {
				d.leaseDir.close()
			}
			return nil, err
		}
	}
	return d, nil
}

// openConfDir creates and opens a configured directory. Unlike lockspace
// directories, it may be (or lie under) a symlink the operator made.
func openConfDir(p string) (*handle, error) {
	if err := os.MkdirAll(p, 0o700); err != nil {
		return nil, &lockmgr.Error{Code: codeOfErrno(err), Msg: "lockspace: cannot create " + p, Err: err}
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &lockmgr.Error{Code: codeOfErrno(err), Msg: "lockspace: cannot open " + p, Err: err}
	}
	return newHandle(fd, 1), nil
}

// Name returns "lockspace".
func (d *Driver) Name() string { return "lockspace" }

// Close syncs the file systems of the tokens and lease files, records in
// StateDir/boot that this epoch ended cleanly (see the package comment,
// "Host crashes"), and closes the driver's cached descriptors. It releases
// no lease: the leases it granted stay held until they are released (which
// still works after Close) or their files are closed everywhere. Acquire
// and Adopt fail after Close; a grant or release still in progress when
// Close is called may be left unsynced, so Close belongs after the last
// call returned. An error says the sync or the record failed; the
// descriptors are closed all the same.
func (d *Driver) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	err := d.syncAndMarkClean()
	d.mu.Lock()
	d.images.close()
	cl := d.tokens.clearLocked()
	cl = append(cl, d.dirs.clearLocked()...)
	for _, h := range []*handle{d.tokDir, d.leaseDir, d.diskDir} {
		if h != nil {
			if h.refs--; h.refs == 0 {
				cl = append(cl, h)
			}
		}
	}
	d.mu.Unlock()
	for _, h := range cl {
		d.closeHandle(h)
	}
	return err
}

// errClosed is the error of a call about r after Close.
func errClosed(r lockmgr.Resource) error {
	return &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: r.String(), Msg: "the lockspace driver is closed"}
}

// put drops a reference to h, closing it if it was the last.
func (d *Driver) put(h *handle) {
	d.mu.Lock()
	h.refs--
	last := h.refs == 0
	d.mu.Unlock()
	if last {
		d.closeHandle(h)
	}
}

// closeHandle closes h, whose last reference was dropped, and drops its
// reference to its parent directory.
func (d *Driver) closeHandle(h *handle) {
	h.close()
	if h.parent != nil {
		d.put(h.parent)
	}
}

// target is where a resource's lock lives.
type target struct {
	direct bool   // the disk image itself, path
	path   string // direct: the image's canonical path
	sub    string // lease file: its directory in LeaseDir; "" for DiskLeaseDir
	name   string // lease file: its name in that directory
	rel    string // lease file in LeaseDir: its path there, sub/name
}

// filePath is the path of a target's locked file, for messages.
func (d *Driver) filePath(t *target) string {
	switch {
	case t.direct:
		return t.path
	case t.sub == "":
		return filepath.Join(d.cfg.DiskLeaseDir, t.name)
	}
	return filepath.Join(d.cfg.LeaseDir, t.sub, t.name)
}

const customPrefix = "custom."

// resolve validates r and says where its lock lives. Every error is of
// class CodeInvalidArgument (or CodeUnsupported) and names r.
func (d *Driver) resolve(r lockmgr.Resource) (target, error) {
	if err := r.Validate(); err != nil {
		var e *lockmgr.Error
		if errors.As(err, &e) && e.Resource == "" {
			c := *e
			c.Resource = r.String()
			return target{}, &c
		}
		return target{}, err
	}
	if r.Mode != lockmgr.Exclusive && r.Mode != lockmgr.Shared {
		return target{}, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
			Msg: "only exclusive and shared resources are locked (read-only ones never reach a driver)"}
	}
	switch r.Type {
	case lockmgr.TypeDisk:
		if !lockmgr.InCanonicalForm(r.Name) {
			return target{}, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
				Msg: "disk path is not canonical (want an absolute, clean path with symlinks resolved: see lockmgr.Canonical)"}
		}
		if d.diskDir == nil {
			return target{direct: true, path: r.Name}, nil
		}
		return target{name: hashName(r.Name)}, nil
	case lockmgr.TypeLease:
		ls, key, err := r.SplitLease()
		if err != nil {
			var e *lockmgr.Error
			if errors.As(err, &e) {
				c := *e
				c.Resource = r.String()
				return target{}, &c
			}
			return target{}, err
		}
		switch {
		case key == hwmFileName || ls == hwmFileName:
			return target{}, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
				Msg: fmt.Sprintf("the name %q is reserved for the lockspace's high-water mark", hwmFileName)}
		case strings.HasPrefix(ls, customPrefix):
			return target{}, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
				Msg: fmt.Sprintf("lockspace names beginning with %q are reserved for custom resource types", customPrefix)}
		}
		if d.leaseDir == nil {
			return target{}, &lockmgr.Error{Code: lockmgr.CodeUnsupported, Resource: r.String(), Msg: "no lease directory is configured (Config.LeaseDir)"}
		}
		return target{sub: ls, name: key, rel: r.Name}, nil
	default:
		if d.leaseDir == nil {
			return target{}, &lockmgr.Error{Code: lockmgr.CodeUnsupported, Resource: r.String(), Msg: "no lease directory is configured (Config.LeaseDir) for custom resources"}
		}
		rel := customPath(r.Type, r.Name)
		n := len(customPrefix) + len(r.Type)
		return target{sub: rel[:n], name: rel[n+1:], rel: rel}, nil
	}
}

// Acquire grants every request or none, in order. Each grant carries a
// fencing token greater than any earlier grant's of the same resource, and
// records req.Holder (with the grant time) for busy errors elsewhere. A
// request with a non-zero Expect is granted only if the resource's current
// token is Expect, else it fails with a *lockmgr.StaleStateError.
//
// Acquire works in two phases: it first locks every resource and checks
// every Expect, and only then writes the new tokens. So a failure (a busy
// or stale resource, a done ctx) changes no token, and when it fails part-way
// nothing this call took remains held (lease files it created are removed).
// The error names the failing resource: a *lockmgr.BusyError, a
// *lockmgr.StaleStateError, or a *lockmgr.Error (CodeInvalidArgument for a
// malformed resource or a missing image of a direct lease, CodePermission,
// CodeTimeout when ctx is done between two resources, CodeInternal for any
// other system error, wrapping the errno). Acquire never waits for a held
// lock.
func (d *Driver) Acquire(ctx context.Context, reqs []lockmgr.Request) ([]lockmgr.Lease, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	ls := make([]lease, len(reqs))
	synced := false
	for i := range reqs {
		if !synced && d.diskDir == nil && reqs[i].Resource.Type == lockmgr.TypeDisk {
			d.images.sync()
			synced = true
		}
		err := ctx.Err()
		if err != nil {
			err = &lockmgr.Error{Code: lockmgr.CodeTimeout, Resource: reqs[i].Resource.String(),
				Msg: "the deadline passed before this resource was locked; nothing is held", Err: err}
		} else {
			err = d.lockOne(&ls[i], &reqs[i])
		}
		if err != nil {
			undo(ls[:i])
			return nil, err
		}
	}
	if d.testHookLocked != nil {
		d.testHookLocked()
	}
	// Sharers with an Expect go first, so that no later write can fail on
	// a token.
	now := time.Now().UTC()
	var buf [512]byte
	err := d.commitExpectingSharers(ls, reqs, now, buf[:0])
	for i := range reqs {
		r := &reqs[i]
		if err != nil {
			break
		}
		if r.Resource.Mode != lockmgr.Shared || r.Expect == 0 {
			err = d.commit(&ls[i], r, now, buf[:0], false)
		}
	}
	if err != nil {
		undo(ls)
		return nil, err
	}
	out := make([]lockmgr.Lease, len(reqs))
	for i := range ls {
		out[i] = &ls[i]
	}
	return out, nil
}

// undo releases the leases of a failed Acquire, last first.
func undo(ls []lease) {
	for i := len(ls) - 1; i >= 0; i-- {
		ls[i].undo()
	}
}

// lockOne is Acquire's first phase for one resource: it locks it into l and
// reads its current token into l.token, checking req.Expect. l is left
// unheld on error.
func (d *Driver) lockOne(l *lease, req *lockmgr.Request) error {
	t, err := d.resolve(req.Resource)
	if err != nil {
		return err
	}
	l.d, l.res, l.sub, l.name = d, req.Resource, t.sub, t.name
	if t.direct {
		err = d.lockDirect(l, &t)
	} else {
		err = d.lockFile(l, &t)
	}
	if err != nil {
		return err
	}
	l.held = true
	if req.Resource.Mode == lockmgr.Exclusive || req.Expect != 0 {
		// An exclusive lock freezes the token; a shared one does not, so a
		// sharer's Expect is checked again by commit.
		if l.token, err = d.current(l, &t, req.Resource.Mode == lockmgr.Shared); err == nil && req.Expect != 0 {
			err = d.checkExpect(l, req, l.token)
		}
		if err != nil {
			l.undo()
			return err
		}
	}
	return nil
}

// current reads the resource's current token: the record's, or for a new
// lease file its directory's high-water mark. mutex takes the token mutex
// (byte 1) meanwhile, as sharers must.
//
// Since the high-water mark covers every resource of a directory, a state
// string's token for a resource whose lease file was removed can look stale
// when another resource of the directory was removed later with a greater
// token: a conservative false "stale", never a false grant.
func (d *Driver) current(l *lease, t *target, mutex bool) (uint64, error) {
	if mutex {
		if err := waitLock(l.fd, unix.F_WRLCK, mutexByte); err != nil {
			return 0, fsError(l.res, "lock the token of", d.filePath(t), err)
		}
		defer unlock(l.fd, mutexByte, 1)
	}
	return d.readCurrent(l, t)
}

func (d *Driver) readCurrent(l *lease, t *target) (uint64, error) {
	var cur uint64
	var fresh bool
	var err error
	if l.tf != nil {
		cur, fresh, err = l.tf.recordToken()
	} else {
		cur, fresh, err = readToken(l.fd)
	}
	if err != nil {
		return 0, d.readTokenError(l.res, t.direct, d.filePath(t), err)
	}
	if fresh && l.dir != nil {
		if cur, err = l.dir.readHWM(); err != nil {
			return 0, fsError(l.res, "read the high-water mark of", filepath.Dir(d.filePath(t)), err)
		}
	}
	return cur, nil
}

// checkExpect checks req.Expect against cur, the current token of l's
// resource, read from l's record; a record that a crash of the host may
// have taken back is not trusted to match (boot.go).
func (d *Driver) checkExpect(l *lease, req *lockmgr.Request, cur uint64) error {
	if req.Expect != cur {
		return &lockmgr.StaleStateError{Resource: req.Resource, Want: req.Expect, Current: cur}
	}
	fd := l.fd
	if l.tf != nil {
		fd = l.tf.fd
	}
	if d.distrusted(fd, cur) {
		return staleAfterCrash(req.Resource, req.Expect, cur)
	}
	return nil
}

// commitExpectingSharers commits the shared requests that carry an Expect.
// lockOne checked their tokens, but other sharers may have been granted
// since, so each is checked again under its token mutex. All those mutexes
// are taken before the first check and held until the last write, so that
// one stale resource fails the call before any token moved. They are taken
// in the order of the resources' keys, the same in every process, so two
// such calls cannot wait for each other; nobody else holds two at once.
func (d *Driver) commitExpectingSharers(ls []lease, reqs []lockmgr.Request, now time.Time, buf []byte) error {
	var idx []int
	for i := range reqs {
		if reqs[i].Resource.Mode == lockmgr.Shared && reqs[i].Expect != 0 {
			idx = append(idx, i)
		}
	}
	if len(idx) == 0 {
		return nil
	}
	slices.SortFunc(idx, func(a, b int) int { return strings.Compare(reqs[a].Resource.Key(), reqs[b].Resource.Key()) })
	locked := 0
	defer func() {
		for _, i := range idx[:locked] {
			unlock(ls[i].fd, mutexByte, 1)
		}
	}()
	for _, i := range idx {
		if err := waitLock(ls[i].fd, unix.F_WRLCK, mutexByte); err != nil {
			return fsError(reqs[i].Resource, "lock the token of", ls[i].path(), err)
		}
		locked++
	}
	for _, i := range idx {
		l, r := &ls[i], &reqs[i]
		t := l.target()
		cur, err := d.readCurrent(l, &t)
		if err != nil {
			return err
		}
		if err := d.checkExpect(l, r, cur); err != nil {
			return err
		}
		l.token = cur
	}
	for _, i := range idx {
		if err := d.commit(&ls[i], &reqs[i], now, buf, true); err != nil {
			return err
		}
	}
	return nil
}

// commit is Acquire's second phase for one resource: it writes the new
// token and the holder record (granted at now) and makes l a lease. A
// sharer's token is read again under the token mutex, which commit takes
// unless mutexHeld (then l.token is already current and checked).
func (d *Driver) commit(l *lease, req *lockmgr.Request, now time.Time, buf []byte, mutexHeld bool) error {
	r := req.Resource
	cur := l.token
	if r.Mode == lockmgr.Shared && !mutexHeld {
		t := l.target()
		if err := waitLock(l.fd, unix.F_WRLCK, mutexByte); err != nil {
			return fsError(r, "lock the token of", d.filePath(&t), err)
		}
		defer unlock(l.fd, mutexByte, 1)
		var err error
		if cur, err = d.readCurrent(l, &t); err != nil {
			return err
		}
	}
	h := req.Holder
	h.Mode = r.Mode
	next := max(cur, d.floor()) + 1
	rec := appendRecord(buf, next, h, now, &d.holders)
	var err error
	if l.tf != nil {
		err = l.tf.writeRecord(rec)
	} else {
		err = pwriteAll(l.fd, rec, 0)
	}
	if err != nil {
		t := l.target()
		return fsError(r, "write the token of", d.filePath(&t), err)
	}
	h.Since = now
	l.token, l.committed, l.holder = next, true, h
	if l.tf != nil {
		d.put(l.tf)
		l.tf = nil
	}
	return nil
}

// lockDirect locks the image itself; the token lives in the token file,
// which l keeps referenced until commit.
func (d *Driver) lockDirect(l *lease, t *target) error {
	r, path := l.res, t.path
	tf, err := d.tokenFile(r, path)
	if err != nil {
		return err
	}
	fd, k := d.images.take(path)
	if k == nil {
		if fd, err = openImage(path); err != nil {
			d.put(tf)
			return imageError(r, path, err)
		}
	}
	if err := d.lock(fd, r, t, tf.fd, false); err != nil {
		if !d.images.keep(k, path, fd, false) {
			_ = unix.Close(fd)
		}
		d.put(tf)
		return err
	}
	l.fd, l.tf, l.img = fd, tf, k
	return nil
}

// openImage opens a direct lease's image, a canonical path, without
// following symlinks: if one was swapped in since the path was resolved,
// the path no longer names the file that was keyed (or that vmlockd checked
// a client may use), and the open fails with ELOOP instead of reaching
// another file. Kernels before 5.6 lack openat2 and follow symlinks.
func openImage(path string) (int, error) {
	fd, err := unix.Openat2(unix.AT_FDCWD, path, &unix.OpenHow{Flags: unix.O_RDWR | unix.O_CLOEXEC, Resolve: unix.RESOLVE_NO_SYMLINKS})
	if err == unix.ENOSYS {
		return unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	}
	return fd, err
}

// imageError maps a failure to open a direct lease's image.
func imageError(r lockmgr.Resource, path string, err error) error {
	switch errno(err) {
	case unix.ENOENT, unix.ENOTDIR:
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
			Msg: "the disk image does not exist (a direct lease locks the image file itself: create it first, or configure indirect disk leases)", Err: err}
	case unix.EISDIR:
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(), Msg: "the disk path is a directory", Err: err}
	case unix.ELOOP:
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
			Msg: "the disk path has a symbolic link in it (it changed since it was resolved, or was never resolved: see lockmgr.Canonical)", Err: err}
	}
	return fsError(r, "open", path, err)
}

// fsError maps a system error: EACCES and EPERM to CodePermission, ELOOP
// (a symlink where O_NOFOLLOW refuses one) to CodeInvalidArgument, the rest
// to CodeInternal. The errno stays in the chain for errors.Is.
func fsError(r lockmgr.Resource, op, path string, err error) error {
	e := &lockmgr.Error{Code: codeOfErrno(err), Resource: r.String(), Msg: "cannot " + op + " " + path, Err: err}
	if errno(err) == unix.ELOOP {
		e.Msg = path + " is a symbolic link, which lease files and lockspace directories must not be"
	}
	return e
}

func codeOfErrno(err error) lockmgr.Code {
	switch errno(err) {
	case unix.EACCES, unix.EPERM:
		return lockmgr.CodePermission
	case unix.ELOOP:
		return lockmgr.CodeInvalidArgument
	}
	return lockmgr.CodeInternal
}

// tokenFile returns the token file of a direct lease, referenced.
func (d *Driver) tokenFile(r lockmgr.Resource, path string) (*handle, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, errClosed(r)
	}
	if h := d.tokens.getLocked(path); h != nil {
		d.mu.Unlock()
		return h, nil
	}
	base := d.tokDir
	base.refs++
	d.mu.Unlock()
	fd, err := unix.Openat(base.fd, hashName(path), fileFlags, 0o600)
	d.put(base)
	if err != nil {
		return nil, fsError(r, "open token file", d.tokenPath(path), err)
	}
	return d.cacheHandle(r, &d.tokens, path, fd, nil)
}

// tokenPath is where the token of a direct lease on the image path lives.
func (d *Driver) tokenPath(path string) string {
	return filepath.Join(d.cfg.StateDir, "tokens", hashName(path))
}

// readTokenError is the error of a token that cannot be read from the
// record of the lease on path: the lease file, or a direct lease's token
// file, named so that an operator can repair it.
func (d *Driver) readTokenError(r lockmgr.Resource, direct bool, path string, err error) error {
	if direct {
		return fsError(r, "read the token of "+path+" from", d.tokenPath(path), err)
	}
	return fsError(r, "read the token of", path, err)
}

// cacheHandle adds a freshly opened descriptor to a cache and returns its
// handle, referenced; if another goroutine was faster, fd is closed and
// theirs is returned. parent, if not nil, is the directory fd was opened in,
// whose reference the new handle takes over (else it is dropped). r is the
// resource it is opened for, for errors.
func (d *Driver) cacheHandle(r lockmgr.Resource, c *handleCache, key string, fd int, parent *handle) (*handle, error) {
	d.mu.Lock()
	var h *handle
	var err error
	if d.closed {
		err = errClosed(r)
	} else {
		h = c.getLocked(key)
	}
	if h != nil || err != nil {
		d.mu.Unlock()
		_ = unix.Close(fd)
		if parent != nil {
			d.put(parent)
		}
		return h, err
	}
	h = newHandle(fd, 1)
	h.parent = parent
	evicted := c.addLocked(key, h)
	d.mu.Unlock()
	for _, e := range evicted {
		d.closeHandle(e)
	}
	return h, nil
}

// dirFor returns the directory of a lease file, referenced, creating a
// lockspace directory if needed.
func (d *Driver) dirFor(r lockmgr.Resource, t *target) (*handle, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, errClosed(r)
	}
	if t.sub == "" {
		d.diskDir.refs++
		d.mu.Unlock()
		return d.diskDir, nil
	}
	if h := d.dirs.getLocked(t.sub); h != nil {
		d.mu.Unlock()
		return h, nil
	}
	base := d.leaseDir
	base.refs++
	d.mu.Unlock()
	fd, err := openSubdir(base.fd, t.sub)
	if err != nil {
		d.put(base)
		return nil, fsError(r, "create lockspace directory", filepath.Join(d.cfg.LeaseDir, t.sub), err)
	}
	// The lockspace directory keeps LeaseDir open: lockFile stats lease
	// files from there.
	return d.cacheHandle(r, &d.dirs, t.sub, fd, base)
}

// leaveDir gives up dir, the cached lockspace directory of t, which is no
// longer at its path in LeaseDir (an operator renamed or removed it), and
// returns the directory now there, made again if needed. While this Driver
// holds leases through lease files in dir, it fails instead, and dir stays
// cached so that every acquire in the lockspace fails so: a lease file in a
// new directory would not conflict with their locks. dir's reference is
// dropped either way.
func (d *Driver) leaveDir(r lockmgr.Resource, t *target, dir *handle, err error) (*handle, error) {
	if dir.leases.Load() > 0 {
		d.put(dir)
		return nil, &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: r.String(), Err: err,
			Msg: fmt.Sprintf("the lockspace directory %s was renamed or removed while this host holds leases in it: "+
				"it is not made again until they are released (vmlock locks lists them), since new lease files would not conflict with them",
				filepath.Join(d.cfg.LeaseDir, t.sub))}
	}
	d.mu.Lock()
	d.dirs.removeLocked(t.sub, dir) // not the last reference: ours is
	d.mu.Unlock()
	d.put(dir)
	return d.dirFor(r, t)
}

// dirInPlace reports whether the lockspace directory dir is still the one
// named sub in LeaseDir.
func dirInPlace(dir *handle, sub string) bool {
	var st, pst unix.Stat_t
	return unix.Fstat(dir.fd, &st) == nil &&
		unix.Fstatat(dir.parent.fd, sub, &pst, unix.AT_SYMLINK_NOFOLLOW) == nil && sameFile(&st, &pst)
}

// statPath stats a lease file by its path from the configured directory
// (LeaseDir, or DiskLeaseDir), not from its cached lockspace directory dir:
// that is where other drivers find it, also when dir was renamed or removed
// since it was cached.
func statPath(dir *handle, t *target, st *unix.Stat_t) error {
	if t.sub == "" {
		return unix.Fstatat(dir.fd, t.name, st, unix.AT_SYMLINK_NOFOLLOW)
	}
	return unix.Fstatat(dir.parent.fd, t.rel, st, unix.AT_SYMLINK_NOFOLLOW)
}

// openSubdir opens (creating it, mode 0700, if needed) the directory name
// in base, refusing a symlink.
func openSubdir(base int, name string) (int, error) {
	fd, err := unix.Openat(base, name, dirFlags, 0)
	if err != unix.ENOENT {
		return fd, err
	}
	if err := unix.Mkdirat(base, name, 0o700); err != nil && err != unix.EEXIST {
		return -1, err
	}
	return unix.Openat(base, name, dirFlags, 0)
}

// lockFile locks a lease file, creating it if needed, and re-checks that
// the locked inode is still the one at the path (see the package comment).
func (d *Driver) lockFile(l *lease, t *target) error {
	r := l.res
	dir, err := d.dirFor(r, t)
	if err != nil {
		return err
	}
	for range maxReopen {
		fd, err := unix.Openat(dir.fd, t.name, fileFlags, 0o600)
		if err == unix.ENOENT && t.sub != "" {
			// The lockspace directory was removed under us.
			if dir, err = d.leaveDir(r, t, dir, err); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			d.put(dir)
			return fsError(r, "open lease file", d.filePath(t), err)
		}
		if err := d.lock(fd, r, t, fd, true); err != nil {
			_ = unix.Close(fd)
			d.put(dir)
			return err
		}
		// Counted before the re-check, so that an acquirer that finds dir
		// moved away after this check cannot miss this lease (leaveDir).
		dir.leases.Add(1)
		var st, pst unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			dir.leases.Add(-1)
			_ = unix.Close(fd)
			d.put(dir)
			return fsError(r, "stat lease file", d.filePath(t), err)
		}
		err = statPath(dir, t, &pst)
		if err == nil && sameFile(&st, &pst) {
			l.fd, l.dir, l.id = fd, dir, idOf(&st)
			return nil
		}
		dir.leases.Add(-1)
		switch {
		case t.sub != "" && !dirInPlace(dir, t.sub):
			// The lockspace directory was renamed (or removed) after it
			// was cached: the file locked is not at the lease's path.
			d.dropFile(fd, dir, t.name, idOf(&st), r.Mode, 0, false, false)
			_ = unix.Close(fd)
			if dir, err = d.leaveDir(r, t, dir, err); err != nil {
				return err
			}
		case err == nil || err == unix.ENOENT:
			// We locked a file its last holder removed meanwhile.
			_ = unix.Close(fd)
			runtime.Gosched()
		default:
			_ = unix.Close(fd)
			d.put(dir)
			return fsError(r, "stat lease file", d.filePath(t), err)
		}
	}
	d.put(dir)
	return &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: r.String(),
		Msg: fmt.Sprintf("gave up after %d attempts: the lease file %s was removed every time it was locked", maxReopen, d.filePath(t))}
}

// lock takes byte 0 of fd in r's mode without waiting. On a conflict it
// returns a *lockmgr.BusyError naming the holder: a foreign POSIX lock's
// process, else the holder recorded in recFd. removable says fd is a lease
// file, whose last sharer write-locks it for a moment to remove it.
func (d *Driver) lock(fd int, r lockmgr.Resource, t *target, recFd int, removable bool) error {
	typ := lockType(r.Mode)
	for attempt := 0; ; attempt++ {
		err := tryLock(fd, typ, lockByte)
		if err == nil {
			return nil
		}
		if err != unix.EAGAIN {
			return fsError(r, "lock", d.filePath(t), err)
		}
		held, pid, ok := conflict(fd, typ)
		if !ok && attempt < 3 {
			continue // released meanwhile
		}
		rec, named := readHolder(recFd)
		if removable && r.Mode == lockmgr.Shared && ok && held == unix.F_WRLCK && pid < 0 &&
			named && rec.Mode == lockmgr.Shared && attempt < sharedRetries {
			// The newest grant was shared, yet byte 0 is write-locked: most
			// likely the last sharer removing the file. Try again shortly.
			time.Sleep(50 * time.Microsecond)
			continue
		}
		h := rec
		switch {
		case ok && pid > 0:
			// vmlock takes only OFD locks: a POSIX lock is another program's
			// (virtlockd's, for one), whatever the record says.
			h = lockmgr.Holder{Foreign: true, PID: int(pid)}
		case !named:
			h = lockmgr.Holder{Foreign: true}
		}
		if ok {
			h.Mode = modeOfLock(held)
		}
		return &lockmgr.BusyError{Resource: r, Holder: h}
	}
}

// dropFile gives up the lock on a lease file (it does not close fd). If this
// is the last holder of a granted lease, it first raises the directory's
// high-water mark to the file's token and removes the file, all while
// holding the write lock, so that an acquirer that opened the file meanwhile
// notices (its inode re-check fails) and no token is lost. For a lock that
// was never granted (a failed Acquire) it removes the file only if it holds
// no token, so that the resource's current token stays what it was.
// It removes the file at name only if that is still fd's file, id: one an
// operator moved away leaves name to whoever made the lease file anew.
// explicit unlocks byte 0 explicitly, needed when copies of the description
// may live elsewhere.
func (d *Driver) dropFile(fd int, dir *handle, name string, id fileID, m lockmgr.Mode, tok uint64, granted, explicit bool) {
	if m == lockmgr.Exclusive || tryLock(fd, unix.F_WRLCK, lockByte) == nil {
		cur, fresh, err := readToken(fd)
		switch {
		case err != nil:
		case !granted:
			if fresh {
				unlinkFile(dir, name, id)
			}
		default:
			cur = max(cur, tok)
			if cur == 0 || dir.raiseHWM(cur) == nil {
				// If the mark cannot be raised the file stays: it still
				// holds the token, and a lease file left behind is harmless.
				unlinkFile(dir, name, id)
			}
		}
		explicit = true // undo the write lock we may have just taken
	}
	if explicit {
		_ = unlock(fd, 0, 0)
	}
}

// unlinkFile removes name from dir if it is the file id. Both system calls
// take the one C string of name, so that the check allocates nothing more
// than the unlink did alone (hence statx, the stat call whose number and
// layout are the same on every Linux architecture).
func unlinkFile(dir *handle, name string, id fileID) {
	p, err := unix.BytePtrFromString(name)
	if err != nil {
		return
	}
	var stx unix.Statx_t
	_, _, e := unix.Syscall6(unix.SYS_STATX, uintptr(dir.fd), uintptr(unsafe.Pointer(p)),
		unix.AT_SYMLINK_NOFOLLOW, unix.STATX_INO, uintptr(unsafe.Pointer(&stx)), 0)
	switch {
	case e == unix.ENOSYS: // before Linux 4.11
		var st unix.Stat_t
		if unix.Fstatat(dir.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || idOf(&st) != id {
			return
		}
	case e != 0 || (fileID{unix.Mkdev(stx.Dev_major, stx.Dev_minor), stx.Ino}) != id:
		return
	}
	_, _, _ = unix.Syscall(unix.SYS_UNLINKAT, uintptr(dir.fd), uintptr(unsafe.Pointer(p)), 0)
}
