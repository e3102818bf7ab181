package lockspace

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// Byte ranges of a locked file.
const (
	lockByte  = 0 // the lease: F_WRLCK exclusive, F_RDLCK shared
	mutexByte = 1 // token-update mutex of shared grants
)

// Record layout (see the package comment).
const (
	recHeader   = 12   // token (8) + JSON length (4)
	maxRecJSON  = 8192 // a longer holder is not recorded
	hwmFileName = ".hwm"
)

// Open flags.
const (
	fileFlags = unix.O_RDWR | unix.O_CREAT | unix.O_CLOEXEC | unix.O_NOFOLLOW
	dirFlags  = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW
)

func lockType(m lockmgr.Mode) int16 {
	if m == lockmgr.Shared {
		return unix.F_RDLCK
	}
	return unix.F_WRLCK
}

// fcntlLock runs an OFD lock command (F_OFD_SETLK, F_OFD_SETLKW) on one
// range, retrying on EINTR. A length of 0 means "to the end of the file".
func fcntlLock(fd int, cmd int, typ int16, start, length int64) error {
	l := unix.Flock_t{Type: typ, Whence: io.SeekStart, Start: start, Len: length}
	for {
		err := unix.FcntlFlock(uintptr(fd), cmd, &l)
		if err != unix.EINTR {
			return err
		}
	}
}

// tryLock takes an OFD lock without waiting; a conflict is EAGAIN.
func tryLock(fd int, typ int16, start int64) error {
	err := fcntlLock(fd, unix.F_OFD_SETLK, typ, start, 1)
	if err == unix.EACCES { // POSIX allows EACCES for a conflict
		err = unix.EAGAIN
	}
	return err
}

// waitLock takes an OFD lock, waiting for it. It is only used for locks
// that are held for a few system calls (the token mutex, .hwm).
func waitLock(fd int, typ int16, start int64) error {
	return fcntlLock(fd, unix.F_OFD_SETLKW, typ, start, 1)
}

func unlock(fd int, start, length int64) error {
	return fcntlLock(fd, unix.F_OFD_SETLK, unix.F_UNLCK, start, length)
}

// conflict asks which lock would block a lock of type typ on byte 0. ok is
// false if none does (any more). pid is the owner of a POSIX lock, -1 for an
// OFD lock.
func conflict(fd int, typ int16) (held int16, pid int32, ok bool) {
	l := unix.Flock_t{Type: typ, Whence: io.SeekStart, Start: lockByte, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &l); err != nil || l.Type == unix.F_UNLCK {
		return 0, 0, false
	}
	return l.Type, l.Pid, true
}

func modeOfLock(typ int16) lockmgr.Mode {
	if typ == unix.F_RDLCK {
		return lockmgr.Shared
	}
	return lockmgr.Exclusive
}

// damagedError says a token record or high-water mark holds what the
// driver never writes (a torn write, a file truncated or overwritten by
// another program or host). Its token cannot be trusted to be the greatest
// granted, so nothing is granted on it: a fencing token must never go back.
type damagedError struct {
	size int    // bytes read (at most a record header)
	why  string // what is wrong
}

func (e *damagedError) Error() string {
	return fmt.Sprintf("damaged token record (%s, %d bytes read): refusing to grant, since the next token could be lower than one already granted; "+
		"find the last token granted and write a greater one into the file in place (docs/operations.md); removing it would restart its tokens", e.why, e.size)
}

// readToken reads the token of a record file; fresh is true when the file
// is empty (new). A record the driver cannot have written (shorter than its
// header, token 0: a torn write, zeros after a crash) is a *damagedError.
func readToken(fd int) (tok uint64, fresh bool, err error) {
	var b [recHeader]byte
	n, err := preadFull(fd, b[:])
	switch {
	case err != nil:
		return 0, false, err
	case n == 0:
		return 0, true, nil
	case n < recHeader:
		return 0, false, &damagedError{size: n, why: "shorter than a record header"}
	}
	if tok = binary.LittleEndian.Uint64(b[:8]); tok == 0 {
		return 0, false, &damagedError{size: n, why: "token 0"}
	}
	return tok, false, nil
}

// readMark reads a high-water mark file: empty is 0, else 8 bytes.
func readMark(fd int) (uint64, error) {
	var b [8]byte
	n, err := preadFull(fd, b[:])
	switch {
	case err != nil:
		return 0, err
	case n == 0:
		return 0, nil
	case n < len(b):
		return 0, &damagedError{size: n, why: "high-water mark shorter than 8 bytes"}
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// preadFull reads len(b) bytes at offset 0, or up to the end of the file.
func preadFull(fd int, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := unix.Pread(fd, b[n:], int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return n, nil
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// readHolder reads the holder of a record file, best effort and without
// locking: a record being rewritten may not parse, and then nobody is named.
func readHolder(fd int) (lockmgr.Holder, bool) {
	b := make([]byte, recHeader+maxRecJSON)
	n, err := unix.Pread(fd, b, 0)
	if err != nil {
		return lockmgr.Holder{}, false
	}
	return parseHolder(b[:n])
}

// parseHolder decodes the holder of a record (see appendRecord); ok
// reports whether it parsed and names anyone. Another host may have written
// the file, so any bytes are expected.
func parseHolder(b []byte) (h lockmgr.Holder, ok bool) {
	if len(b) < recHeader {
		return lockmgr.Holder{}, false
	}
	l := int(binary.LittleEndian.Uint32(b[8:12]))
	if l == 0 || l > maxRecJSON || recHeader+l > len(b) {
		return lockmgr.Holder{}, false
	}
	if json.Unmarshal(b[recHeader:recHeader+l], &h) != nil {
		return lockmgr.Holder{}, false
	}
	return h, isNamed(h)
}

// sameFile reports whether two stats are of one inode.
func sameFile(a, b *unix.Stat_t) bool { return a.Dev == b.Dev && a.Ino == b.Ino }

// fileID names an inode: its device and number.
type fileID struct{ dev, ino uint64 }

func idOf(st *unix.Stat_t) fileID { return fileID{uint64(st.Dev), uint64(st.Ino)} }

// hashName is the lowercase hex SHA-256 of s: the name of a disk's or a
// custom resource's lease file and of a direct lease's token file.
func hashName(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// customPath is the path in LeaseDir of the lease file of the custom
// resource of type typ named name, custom.TYPE/<hashName(name)>, built in
// one allocation.
func customPath(typ lockmgr.ResourceType, name string) string {
	sum := sha256.Sum256([]byte(name))
	var h [2 * sha256.Size]byte
	hex.Encode(h[:], sum[:])
	var b strings.Builder
	b.Grow(len(customPrefix) + len(typ) + 1 + len(h))
	b.WriteString(customPrefix)
	b.WriteString(string(typ))
	b.WriteByte('/')
	b.Write(h[:])
	return b.String()
}

// holderJSON caches the JSON of one holder without its grant time, so that
// the records of a grant of many resources (all with one holder) and of
// repeated grants are built without encoding/json.
type holderJSON struct {
	h      lockmgr.Holder // Since is zero
	prefix []byte         // JSON of h without its closing brace
}

// appendRecord appends the record of a grant: tok, then h as JSON with
// Since set to now. cache keeps the last holder's encoding.
func appendRecord(b []byte, tok uint64, h lockmgr.Holder, now time.Time, cache *holderCache) []byte {
	b = binary.LittleEndian.AppendUint64(b, tok)
	lenAt := len(b)
	b = append(b, 0, 0, 0, 0)
	start := len(b)
	h.Since = time.Time{}
	if h.Foreign { // never from the Manager; encode it the slow way
		h.Since = now
		js, err := json.Marshal(h)
		if err == nil {
			b = append(b, js...)
		}
	} else {
		b = cache.appendJSON(b, h, now)
	}
	n := len(b) - start
	if n > maxRecJSON {
		b, n = b[:start], 0
	}
	binary.LittleEndian.PutUint32(b[lenAt:], uint32(n))
	return b
}

// holderCache is a one-entry cache of a holder's JSON encoding, and of a
// grant time's (all the resources of one grant share both).
type holderCache struct {
	mu    sync.Mutex
	last  *holderJSON
	now   time.Time
	since []byte // now in RFC 3339
}

// appendJSON appends the JSON of h, with Since set to now.
func (c *holderCache) appendJSON(b []byte, h lockmgr.Holder, now time.Time) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.since == nil || !c.now.Equal(now) {
		c.now, c.since = now, now.AppendFormat(c.since[:0], time.RFC3339Nano)
	}
	b = append(b, c.prefixLocked(h)...)
	b = append(b, `,"since":"`...)
	b = append(b, c.since...)
	return append(b, `"}`...)
}

func (c *holderCache) prefixLocked(h lockmgr.Holder) []byte {
	if c.last != nil && c.last.h == h {
		return c.last.prefix
	}
	js, err := json.Marshal(h) // cannot fail for a Holder with zero Since
	if err != nil || len(js) < 2 {
		js = []byte(`{"mode":"` + h.Mode.String() + `"}`)
	}
	c.last = &holderJSON{h: h, prefix: js[:len(js)-1]}
	return c.last.prefix
}

// errno returns err's errno, or 0.
func errno(err error) unix.Errno {
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}
