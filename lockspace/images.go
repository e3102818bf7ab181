package lockspace

import (
	"bytes"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kept image descriptors.
//
// A direct lease locks the image file itself, and opening it (a walk of its
// path) costs more than the lock. So when a direct lease is released, its
// descriptor, unlocked, is kept open for the next grant of the same image,
// for as long as its path is known to still name that file. That is known
// through inotify, watching the file and every directory on its path:
// before a kept descriptor is used, the driver reads the queue, and any
// event that could change what the path names drops the descriptors it
// concerns: the file unlinked, renamed or its attributes changed; an entry
// of the path created, removed or renamed over in a directory on the way;
// such a directory itself moved or removed. A change of the mount table
// (/proc/self/mountinfo polls ready) or an overflow of the queue drops
// them all. The system call that makes a change queues its event before it
// returns, so a change made before an Acquire begins is seen by it: what is
// left is the window between an open and its lock, which every acquire
// already has.
//
// The rules that keep this sound:
//
//   - Only images on local file systems (ext2/3/4, XFS, Btrfs, tmpfs, F2FS)
//     are kept: on a network file system another host's rename raises no
//     event here. And only regular files: a block device (an LVM volume, a
//     LUN; /dev is a tmpfs) that is open cannot be removed (lvremove,
//     dmsetup remove: "in use"), and its release must leave it free.
//   - A descriptor is admitted only after its watches are in place and its
//     path is then checked to name it: a change before the watches existed
//     is caught by that check, one after it by an event.
//   - A descriptor that was passed out (lease.File, which the daemon sends
//     to its lock-holder) is never kept: copies of its open file
//     description live on elsewhere, and a later grant through it would
//     lock them too.
//   - Descriptors are kept unlocked: a lease unlocks byte 0 explicitly
//     before its descriptor is kept, and one that fails to is closed.
//   - Only a Release adds a descriptor; one opened by an Acquire that
//     failed (busy, stale) is closed. So vmlockd, whose successful grants
//     all pass their files out, keeps none.
//
// At most maxKeptImages are kept. Each is closed when it has not been used
// for keptImageTTL, and one whose file was removed is closed at the next
// Acquire or sweep (every keptSweepEvery), so that a deleted image's space
// is freed. A kept descriptor keeps its file system busy too: an unmount
// fails with EBUSY until it is closed (Close the Driver first). Anything
// that goes wrong with inotify (no instance left, no watch left) just means
// descriptors are not kept.
const (
	maxKeptImages  = 256
	keptImageTTL   = time.Minute
	keptSweepEvery = 10 * time.Second
)

// Inotify masks: what can change the file a path names.
const (
	dirWatchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
		unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR | unix.IN_DONT_FOLLOW
	// An unlink or a rename over the file lowers its link count: IN_ATTRIB.
	fileWatchMask = unix.IN_ATTRIB | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF
)

// imageCache holds the kept descriptors of one Driver. The zero value
// keeps nothing until first used; close ends it.
type imageCache struct {
	mu     sync.Mutex
	closed bool
	off    bool // inotify could not be set up: keep nothing
	ready  bool // ep, in and mounts are open
	ep     int  // epoll set of in and mounts
	in     int  // inotify instance
	mounts int  // /proc/self/mountinfo
	byPath map[string]*keptImage
	byWD   map[int32]*watch
	uses   uint64 // descriptors returned so far
	buf    []byte // inotify read buffer
	sweep  *time.Timer

	ttl, sweepEvery time.Duration // keptImageTTL, keptSweepEvery; tests shorten them
}

// keptImage is one kept descriptor, idle or lent to a lease.
type keptImage struct {
	path    string
	fd      int
	lent    bool   // to a lease, which returns it (release) or drops it
	dropped bool   // out of the cache: the lease holding fd closes it
	used    uint64 // imageCache.uses when last returned, for eviction
	idle    int    // sweeps since it was last used
	deps    []dep
}

// dep is one watch a kept image depends on.
type dep struct {
	wd   int32
	name string // the path's entry in the watched directory; "" for the file's own watch
}

// watch is one inotify watch, with the kept images that depend on it and,
// for each, its entry in the directory ("" for a file's own watch).
type watch struct{ users map[*keptImage]string }

// sync reads the inotify queue and drops the kept descriptors whose paths
// changed. An Acquire calls it once, before its first take: any change made
// before the call began is then accounted for.
func (c *imageCache) sync() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.byPath) > 0 { // nil when not ready
		c.syncLocked()
	}
}

// take lends the kept descriptor of path, unlocked, or returns -1 if there
// is none. The caller called sync first.
func (c *imageCache) take(path string) (int, *keptImage) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := c.byPath[path]
	if k == nil || k.lent {
		return -1, nil
	}
	k.lent = true
	return k.fd, k
}

// keep is called with the descriptor fd of a direct lease on path, never
// passed out, when the lease is released (still locked) or could not be
// locked; k is the kept image it was lent, or nil. A descriptor not lent
// joins the kept ones only if admit (a Release; not a failed Acquire). It
// reports whether fd was unlocked and kept; if not, the caller closes it
// (which unlocks it).
func (c *imageCache) keep(k *keptImage, path string, fd int, admit bool) bool {
	if k == nil {
		if !admit {
			return false
		}
		if k = c.admit(path, fd); k == nil {
			return false
		}
	}
	if err := unlock(fd, 0, 0); err != nil {
		c.drop(k)
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if k.dropped || k.fd != fd {
		return false
	}
	c.uses++
	k.lent, k.used, k.idle = false, c.uses, 0
	return true
}

// drop takes k out of the cache; its descriptor is the caller's.
func (c *imageCache) drop(k *keptImage) {
	if k == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !k.dropped && k.lent {
		c.removeLocked(k)
	}
}

// admit adds fd, locked by a lease on path, to the cache as lent to that
// lease, if path can be watched and names fd; else it returns nil.
func (c *imageCache) admit(path string, fd int) *keptImage {
	var sfs unix.Statfs_t
	var st unix.Stat_t
	if unix.Fstatfs(fd, &sfs) != nil || !localFS(sfs.Type) ||
		unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.off || !c.setupLocked() {
		return nil
	}
	c.syncLocked()
	if !c.ready || c.byPath[path] != nil || len(c.byPath) >= maxKeptImages && !c.evictLocked() {
		return nil
	}
	k := &keptImage{path: path, fd: fd, lent: true}
	ok := c.watchLocked(k)
	var pst unix.Stat_t
	if ok {
		// After the watches: a change from now on raises an event.
		ok = unix.Lstat(path, &pst) == nil && sameFile(&st, &pst)
	}
	if !ok {
		c.unwatchLocked(k)
		return nil
	}
	c.byPath[path] = k
	if c.sweep == nil {
		c.sweep = time.AfterFunc(c.sweepEvery, c.sweepIdle)
	}
	return k
}

// localFS reports whether a file system's changes are all made on this
// host: inotify sees them, and only a crash of this host can take its
// writes back (boot.go). Unknown types count as shared.
func localFS(typ int64) bool {
	switch uint32(typ) {
	case unix.EXT4_SUPER_MAGIC, unix.XFS_SUPER_MAGIC, unix.BTRFS_SUPER_MAGIC, unix.TMPFS_MAGIC, unix.F2FS_SUPER_MAGIC:
		return true
	}
	return false
}

// setupLocked makes the inotify instance and the epoll set on first use.
func (c *imageCache) setupLocked() bool {
	if c.ready {
		return true
	}
	if c.ttl == 0 {
		c.ttl, c.sweepEvery = keptImageTTL, keptSweepEvery
	}
	in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		c.off = true
		return false
	}
	mounts, err := unix.Open("/proc/self/mountinfo", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		_ = unix.Close(in)
		c.off = true
		return false
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err == nil {
		err = unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, in, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(in)})
	}
	if err == nil {
		// The mount table polls EPOLLPRI (with EPOLLERR) once per change.
		err = unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, mounts, &unix.EpollEvent{Events: unix.EPOLLPRI, Fd: int32(mounts)})
	}
	if err != nil {
		if ep >= 0 {
			_ = unix.Close(ep)
		}
		_ = unix.Close(in)
		_ = unix.Close(mounts)
		c.off = true
		return false
	}
	c.ready, c.ep, c.in, c.mounts = true, ep, in, mounts
	c.byPath, c.byWD = make(map[string]*keptImage), make(map[int32]*watch)
	if c.buf == nil {
		c.buf = make([]byte, 16*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	}
	return true
}

// teardownLocked closes every kept descriptor that is not lent and the
// inotify instance; the next admit starts afresh.
func (c *imageCache) teardownLocked() {
	if !c.ready {
		return
	}
	for _, k := range c.byPath {
		k.dropped = true
		if !k.lent {
			_ = unix.Close(k.fd)
		}
	}
	_ = unix.Close(c.ep)
	_ = unix.Close(c.in)
	_ = unix.Close(c.mounts)
	c.ready = false
	c.byPath, c.byWD = nil, nil
}

// watchLocked adds the watches k's path needs: every directory from the
// root down, and the file through its descriptor.
func (c *imageCache) watchLocked(k *keptImage) bool {
	dir := "/"
	for _, name := range strings.Split(strings.TrimPrefix(k.path, "/"), "/") {
		if !c.addWatchLocked(k, dir, dirWatchMask, name) {
			return false
		}
		dir = filepath.Join(dir, name)
	}
	return c.addWatchLocked(k, "/proc/self/fd/"+strconv.Itoa(k.fd), fileWatchMask, "")
}

func (c *imageCache) addWatchLocked(k *keptImage, path string, mask uint32, name string) bool {
	wd, err := unix.InotifyAddWatch(c.in, path, mask)
	if err != nil {
		return false
	}
	w := c.byWD[int32(wd)]
	if w == nil {
		w = &watch{users: make(map[*keptImage]string)}
		c.byWD[int32(wd)] = w
	}
	w.users[k] = name
	k.deps = append(k.deps, dep{wd: int32(wd), name: name})
	return true
}

// unwatchLocked drops k's watches, removing those nobody else needs.
func (c *imageCache) unwatchLocked(k *keptImage) {
	for _, d := range k.deps {
		w := c.byWD[d.wd]
		if w == nil {
			continue
		}
		delete(w.users, k)
		if len(w.users) == 0 {
			delete(c.byWD, d.wd)
			_, _ = unix.InotifyRmWatch(c.in, uint32(d.wd))
		}
	}
	k.deps = nil
}

// removeLocked takes k out of the cache, closing its descriptor unless it
// is lent.
func (c *imageCache) removeLocked(k *keptImage) {
	c.unwatchLocked(k)
	delete(c.byPath, k.path)
	k.dropped = true
	if !k.lent {
		_ = unix.Close(k.fd)
	}
}

// evictLocked makes room by closing the idle descriptor unused longest.
func (c *imageCache) evictLocked() bool {
	var old *keptImage
	for _, k := range c.byPath {
		if !k.lent && (old == nil || k.used < old.used) {
			old = k
		}
	}
	if old == nil {
		return false
	}
	c.removeLocked(old)
	return true
}

// syncLocked reads what changed since the last call and drops the
// descriptors concerned.
func (c *imageCache) syncLocked() {
	var evs [2]unix.EpollEvent
	n, err := unix.EpollWait(c.ep, evs[:], 0)
	if err != nil && err != unix.EINTR {
		c.teardownLocked()
		return
	}
	for _, ev := range evs[:max(n, 0)] {
		if ev.Fd == int32(c.mounts) || !c.drainLocked() {
			c.teardownLocked()
			return
		}
	}
}

// drainLocked reads the whole inotify queue, dropping the kept images
// each event concerns. It reports false if everything must go: the queue
// overflowed, or could not be read.
func (c *imageCache) drainLocked() bool {
	for {
		n, err := unix.Read(c.in, c.buf)
		switch {
		case err == unix.EAGAIN:
			return true
		case err == unix.EINTR:
			continue
		case err != nil || n <= 0:
			return false
		}
		for b := c.buf[:n]; len(b) >= unix.SizeofInotifyEvent; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[0]))
			end := unix.SizeofInotifyEvent + int(ev.Len)
			if end > len(b) {
				return false
			}
			if ev.Mask&unix.IN_Q_OVERFLOW != 0 {
				return false
			}
			name := b[unix.SizeofInotifyEvent:end]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			c.eventLocked(ev.Wd, string(name))
			b = b[end:]
		}
	}
}

// eventLocked drops the kept images an event concerns: an event on a file,
// on a directory itself (no name), or on the entry of a directory that is
// on an image's path.
func (c *imageCache) eventLocked(wd int32, name string) {
	w := c.byWD[wd]
	if w == nil {
		return
	}
	for k, entry := range w.users {
		if name == "" || entry == name {
			c.removeLocked(k)
		}
	}
}

// sweepIdle closes the descriptors of removed images and those unused for
// the TTL; it runs every sweepEvery while anything is kept.
func (c *imageCache) sweepIdle() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || !c.ready {
		c.sweep = nil
		return
	}
	c.syncLocked()
	for _, k := range c.byPath {
		if k.lent {
			k.idle = 0
		} else if k.idle++; time.Duration(k.idle)*c.sweepEvery >= c.ttl {
			c.removeLocked(k)
		}
	}
	if len(c.byPath) == 0 {
		c.sweep = nil
		return
	}
	c.sweep.Reset(c.sweepEvery)
}

// close closes every idle descriptor and the inotify instance; lent ones
// are closed by their leases' release.
func (c *imageCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.teardownLocked()
	if c.sweep != nil {
		c.sweep.Stop()
		c.sweep = nil
	}
}
