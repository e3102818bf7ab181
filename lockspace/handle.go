package lockspace

import (
	"encoding/binary"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// handle is a reference-counted file descriptor the driver caches: a
// directory (the state, lease and disk-lease directories, one lockspace
// directory) or a direct lease's token file. refs counts the cache's own
// reference and every user's; the descriptor is closed when it drops to 0,
// so evicting a handle from its cache is safe while it is in use.
type handle struct {
	fd     int
	refs   int     // guarded by Driver.mu
	parent *handle // a lockspace directory's LeaseDir (referenced), else nil

	// The .hwm file of a directory of lease files, opened on first use.
	// hwmMu serialises this process's users of hwmFd (OFD locks taken
	// through one description do not exclude each other); the OFD lock on
	// .hwm excludes other processes.
	hwmMu sync.Mutex
	hwmFd int

	// leases counts the leases held through lease files in this directory
	// (locked by lockFile or adopted, not yet released), so that a removed
	// lockspace directory is not made again under them (see lockFile).
	leases atomic.Int64

	// A direct lease's token file's mapping (tokenmap.go), and mappings
	// given up (guarded by hwmMu), unmapped by close. noMap: the file
	// cannot be mapped.
	tm      atomic.Pointer[tokenMap]
	oldMaps []*tokenMap
	noMap   atomic.Bool
}

func newHandle(fd, refs int) *handle { return &handle{fd: fd, refs: refs, hwmFd: -1} }

func (h *handle) close() {
	_ = unix.Close(h.fd)
	if h.hwmFd >= 0 {
		_ = unix.Close(h.hwmFd)
	}
	if m := h.tm.Load(); m != nil {
		_ = unix.Munmap(m.b)
	}
	for _, m := range h.oldMaps {
		_ = unix.Munmap(m.b)
	}
}

// openHWM returns the .hwm descriptor; called with hwmMu held.
func (h *handle) openHWM() (int, error) {
	if h.hwmFd < 0 {
		fd, err := unix.Openat(h.fd, hwmFileName, fileFlags, 0o600)
		if err != nil {
			return -1, err
		}
		h.hwmFd = fd
	}
	return h.hwmFd, nil
}

// readHWM returns the directory's high-water mark (0 if there is none).
func (h *handle) readHWM() (uint64, error) {
	h.hwmMu.Lock()
	defer h.hwmMu.Unlock()
	fd, err := h.openHWM()
	if err != nil {
		return 0, err
	}
	if err := waitLock(fd, unix.F_RDLCK, 0); err != nil {
		return 0, err
	}
	defer unlock(fd, 0, 1)
	return readMark(fd)
}

// raiseHWM sets the high-water mark to max(hwm, tok).
func (h *handle) raiseHWM(tok uint64) error {
	h.hwmMu.Lock()
	defer h.hwmMu.Unlock()
	fd, err := h.openHWM()
	if err != nil {
		return err
	}
	if err := waitLock(fd, unix.F_WRLCK, 0); err != nil {
		return err
	}
	defer unlock(fd, 0, 1)
	v, err := readMark(fd)
	if err != nil || v >= tok {
		return err
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], tok)
	return pwriteAll(fd, b[:], 0)
}

// handleCache maps names to handles, at most max of them. Guarded by
// Driver.mu.
type handleCache struct {
	m   map[string]*handle
	max int
}

// getLocked returns the cached handle for key with a reference taken.
func (c *handleCache) getLocked(key string) *handle {
	h := c.m[key]
	if h != nil {
		h.refs++
	}
	return h
}

// addLocked caches a new handle (which already counts the caller's
// reference) and returns the handles evicted to make room, whose
// descriptors the caller must close after unlocking.
func (c *handleCache) addLocked(key string, h *handle) (closeList []*handle) {
	if len(c.m) >= c.max {
		n := max(1, c.max/4)
		for k, old := range c.m {
			if old.leases.Load() > 0 {
				// Kept while leases are held in it, so that the removal of
				// the directory is noticed (see lockFile).
				continue
			}
			delete(c.m, k)
			if old.refs--; old.refs == 0 {
				closeList = append(closeList, old)
			}
			if n--; n == 0 {
				break
			}
		}
	}
	h.refs++
	c.m[key] = h
	return closeList
}

// removeLocked drops key from the cache if it maps to h.
func (c *handleCache) removeLocked(key string, h *handle) (closeIt bool) {
	if c.m[key] != h {
		return false
	}
	delete(c.m, key)
	h.refs--
	return h.refs == 0
}

// clearLocked empties the cache.
func (c *handleCache) clearLocked() (closeList []*handle) {
	for k, h := range c.m {
		delete(c.m, k)
		if h.refs--; h.refs == 0 {
			closeList = append(closeList, h)
		}
	}
	return closeList
}
