package lockspace

import (
	"encoding/binary"
	"runtime/debug"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mapped token files.
//
// A direct lease's token file is read and rewritten on every grant. Once it
// holds a record, it is extended to mapSize bytes, ending with mapSentinel,
// and mapped shared into memory: a grant then reads and writes the record
// there, without a system call, and the page cache is the same one that
// pread and pwrite (and other processes) see. Stores survive a crash of the
// process as a pwrite does; neither is synced.
//
// What pread told that the mapping cannot: the file's size. A file an
// operator truncated or rewrote shorter reads as zeros past its end (and
// faults past its last page), so the sentinel at the end of the mapping is
// checked on every read: if it is gone, the mapping is given up and the
// record read with pread, which tells a damaged record (readToken). A fault
// is caught (debug.SetPanicOnFault) and handled the same way.
//
// Only little-endian hosts map, since the token is stored as one native
// 64-bit word (a torn token cannot be read by a process that crashed
// half-way: the JSON and its length are stored first, the token last).
const (
	mapSize     = 4096
	mapSentinel = "vmlock.tokens.v1"
)

// tokenMap is a mapped token file.
type tokenMap struct{ b []byte }

// littleEndian reports whether this host stores words little endian, as
// the record does.
func littleEndian() bool { return binary.NativeEndian.Uint16([]byte{1, 0}) == 1 }

// guard runs f, turning a memory fault (a mapped file truncated under us)
// into ok == false.
func guard(f func()) (ok bool) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if _, fault := r.(interface{ Addr() uintptr }); !fault {
				panic(r)
			}
			ok = false
		}
	}()
	f()
	return true
}

func (m *tokenMap) word() *uint64 { return (*uint64)(unsafe.Pointer(&m.b[0])) }

// token returns the mapped record's token; ok is false if the file no
// longer ends with the sentinel (or faulted): then read it with pread.
func (m *tokenMap) token() (tok uint64, ok bool) {
	ok = guard(func() {
		if string(m.b[mapSize-len(mapSentinel):]) == mapSentinel {
			tok = atomic.LoadUint64(m.word())
		}
	})
	return tok, ok && tok != 0
}

// write stores rec (see appendRecord) as the record: JSON and length
// first, the token last. ok is false if rec does not fit, or the file no
// longer ends with the sentinel: then pwrite it.
func (m *tokenMap) write(rec []byte) (ok bool) {
	if len(rec) > mapSize-len(mapSentinel) {
		return false
	}
	done := false
	ok = guard(func() {
		if string(m.b[mapSize-len(mapSentinel):]) != mapSentinel {
			return
		}
		copy(m.b[8:], rec[8:])
		atomic.StoreUint64(m.word(), binary.LittleEndian.Uint64(rec))
		done = true
	})
	return ok && done
}

// mapTokens maps the token file fd, which holds a record now, extending it
// to mapSize and writing the sentinel if needed. It returns nil if the
// file cannot be mapped (too long a record, a file system that does not
// map, a sentinel missing from a long enough file).
func mapTokens(fd int) *tokenMap {
	if !littleEndian() {
		return nil
	}
	var st unix.Stat_t
	var sfs unix.Statfs_t
	if unix.Fstat(fd, &st) != nil || unix.Fstatfs(fd, &sfs) != nil || !localFS(sfs.Type) {
		return nil
	}
	switch {
	case st.Size > mapSize:
		return nil
	case st.Size < mapSize:
		if st.Size > mapSize-int64(len(mapSentinel)) ||
			unix.Ftruncate(fd, mapSize) != nil ||
			pwriteAll(fd, []byte(mapSentinel), mapSize-int64(len(mapSentinel))) != nil {
			return nil
		}
	}
	b, err := unix.Mmap(fd, 0, mapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	m := &tokenMap{b: b}
	if _, ok := m.token(); !ok {
		_ = unix.Munmap(b)
		return nil
	}
	return m
}

// recordToken reads the token of h, a direct lease's token file: from its
// mapping if it has one, else with pread (see readToken).
func (h *handle) recordToken() (tok uint64, fresh bool, err error) {
	if m := h.tm.Load(); m != nil {
		if tok, ok := m.token(); ok {
			return tok, false, nil
		}
		h.unmap(m)
	}
	return readToken(h.fd)
}

// writeRecord writes rec into h, a direct lease's token file: into its
// mapping if it has one, else with pwrite, after which it maps the file.
func (h *handle) writeRecord(rec []byte) error {
	if m := h.tm.Load(); m != nil {
		if m.write(rec) {
			return nil
		}
		h.unmap(m)
	}
	if err := pwriteAll(h.fd, rec, 0); err != nil {
		return err
	}
	if !h.noMap.Load() {
		if m := mapTokens(h.fd); m == nil {
			h.noMap.Store(true)
		} else if !h.tm.CompareAndSwap(nil, m) {
			_ = unix.Munmap(m.b)
		}
	}
	return nil
}

// unmap gives up m, which no longer maps the record; it is unmapped when h
// is closed, since another goroutine may still be reading it.
func (h *handle) unmap(m *tokenMap) {
	if h.tm.CompareAndSwap(m, nil) {
		h.hwmMu.Lock()
		h.oldMaps = append(h.oldMaps, m)
		h.hwmMu.Unlock()
	}
}
