// Package lockholder keeps vmlockd's locks alive while vmlockd itself is not
// running: across a reload, a graceful stop, or a crash (SIGKILL).
//
// An OFD lock belongs to an open file description and lasts until the last
// descriptor referring to it is closed, in whatever process. The lock-holder
// is a minimal process, started by vmlockd in its own session, that receives
// a duplicate of every lock descriptor over a unix socket (SCM_RIGHTS) and
// keeps it, together with a small record (meta) describing the grant: the
// object, its owner pid and the resource's token. When vmlockd dies, its own
// descriptors close but the holder's keep every lock held, so no other
// process can take a resource while the daemon is down. When vmlockd starts
// again it connects to the holder, receives every descriptor and record back
// (List), and resumes managing them.
//
// The holder serves one controller connection at a time, in order: a new
// vmlockd's connection is accepted only after the previous one reached
// end-of-file, so every message of the old daemon is applied before the new
// one lists the entries. Messages other than List have no reply: a Put is
// durable (for this purpose) once sendmsg returns, because the descriptor is
// then referenced by the holder's socket buffer. So the holder reads in
// batches, a millisecond apart under load, and vmlockd's lock operations
// do not wake it one by one. The holder exits when its
// controller goes away and it holds nothing.
//
// A holder that stops reading (stopped, stuck) makes its controller's
// writes wait once its socket buffer is full; every Client operation is
// bounded by its context and DefaultTimeout, fails with a
// *NotAnsweringError naming the holder's pid, and leaves the Client
// unusable; the controller then kills the holder (Client.Kill) and starts
// another.
//
// # Fencing
//
// With a cluster lock driver (etcd), a lock lives only as long as the host
// keeps renewing its lease, which vmlockd does; if vmlockd is down for
// longer than the lease's TTL, other hosts may be granted its resources.
// So the holder also kills the holders itself, invariants:
//
//   - An entry may carry the pidfd of the process that owns its locks
//     (PutOwned). Only such entries are ever acted on.
//   - The controller arms a fence deadline (FenceAt), an absolute time on
//     CLOCK_MONOTONIC, which is system-wide, so the deadline means the same
//     to both processes. vmlockd sends the newest one after confirmed
//     lease renewals (one may stand for several that came while the last
//     was being sent): the time by which its own driver would fence. A
//     new deadline replaces the old one, earlier or later; the zero time
//     disarms.
//   - When the armed deadline passes, the holder sends SIGKILL, through
//     the pidfds (never to a reused pid), to the owner of every entry it
//     holds at that moment, once; then it stays disarmed until the next
//     deadline arrives. Entries put after the firing are not killed by it.
//   - The deadline outlives its controller: after a crash or stop of
//     vmlockd the last one stays armed, so the holders die before the lease
//     can expire unless a new vmlockd confirms a renewal and sends a later
//     one first. Entries stay after a firing; the next vmlockd finds their
//     owners dead and releases their locks.
//
// The holder does not wait for the killed processes to exit: SIGKILL is
// delivered at once; a process stuck in uninterruptible sleep dies when it
// leaves it (the timing argument in docs/architecture.md counts that time).
//
// The wire format is one SOCK_SEQPACKET message per operation:
//
//	op(1) keylen(2, LE) key meta  [+ up to MaxFiles+1 descriptors]
//
// with op 'P' put (replace), 'K' put with an owner (its first descriptor is
// the owner's pidfd), 'D' drop key, 'X' drop every key with the prefix,
// 'F' fence deadline (meta: int64 LE nanoseconds of CLOCK_MONOTONIC, 0 to
// disarm), 'L' list; a list is answered by one 'E' (or, for an entry with
// an owner, 'O', pidfd first) message per entry and a final 'Z'. 'B' and
// 'C' bracket a batch (Client.Apply): the puts and drops between them are
// applied together at 'C', and not at all if the connection ends first, so
// a record of several entries (an object's chunks) never changes in part.
// At most maxBatch changes make a batch. A holder that takes batches says
// "batch" in the record of its list's 'Z' (one started by an older vmlockd
// says nothing, and ends a connection that sends 'B': Apply then sends the
// changes one by one).
package lockholder

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

const (
	opPut        = 'P'
	opPutOwned   = 'K'
	opDrop       = 'D'
	opDropPrefix = 'X'
	opFence      = 'F'
	opList       = 'L'
	opEntry      = 'E'
	opEntryOwned = 'O'
	opEnd        = 'Z'
	opBegin      = 'B'
	opCommit     = 'C'

	// maxBatch bounds the changes of one batch that the holder buffers.
	maxBatch = 1 << 14
	// featureBatch in a list's 'Z' says that the holder takes batches.
	featureBatch = "batch"

	// MaxMeta bounds an entry's record; a larger Put is refused by the client.
	MaxMeta = 64 << 10
	// MaxFiles bounds the descriptors of one entry (the kernel's SCM_MAX_FD
	// is 253).
	MaxFiles = 250
	maxKey   = 8 << 10
	maxMsg   = 1 + 2 + maxKey + MaxMeta
)

// SocketName and LockName are the holder's files in the state directory.
const (
	SocketName = "lockholder.sock"
	LockName   = "lockholder.lock"
)

// Entry is one kept record with its descriptors.
type Entry struct {
	Key   string
	Meta  []byte
	Files []*os.File // the lock descriptors, in the order they were put
	Owner *os.File   // the owner's pidfd (PutOwned), or nil
}

// Close closes the entry's descriptors.
func (e *Entry) Close() {
	for _, f := range e.Files {
		f.Close()
	}
	e.Files = nil
	if e.Owner != nil {
		e.Owner.Close()
		e.Owner = nil
	}
}

func encode(op byte, key string, meta []byte) ([]byte, error) {
	if len(key) > maxKey {
		return nil, fmt.Errorf("lockholder: key of %d bytes (at most %d)", len(key), maxKey)
	}
	if len(meta) > MaxMeta {
		return nil, fmt.Errorf("lockholder: record of %d bytes (at most %d)", len(meta), MaxMeta)
	}
	b := make([]byte, 3, 3+len(key)+len(meta))
	b[0] = op
	binary.LittleEndian.PutUint16(b[1:], uint16(len(key)))
	b = append(b, key...)
	return append(b, meta...), nil
}

var (
	errShort = errors.New("lockholder: short message")
	errLong  = fmt.Errorf("lockholder: key over %d bytes or record over %d bytes", maxKey, MaxMeta)
)

func decode(b []byte) (op byte, key string, meta []byte, err error) {
	if len(b) < 3 {
		return 0, "", nil, errShort
	}
	n := int(binary.LittleEndian.Uint16(b[1:]))
	if len(b) < 3+n {
		return 0, "", nil, errShort
	}
	// Only what encode writes: an entry kept with a longer key or record
	// could never be listed again.
	if n > maxKey || len(b)-3-n > MaxMeta {
		return 0, "", nil, errLong
	}
	return b[0], string(b[3 : 3+n]), b[3+n:], nil
}

// oobSize is the control buffer for MaxFiles descriptors and an owner's.
var oobSize = unix.CmsgSpace((MaxFiles + 1) * 4)

// monoNow reads CLOCK_MONOTONIC in nanoseconds.
func monoNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// recvmsg reads one message and the descriptors that came with it; flags
// may add MSG_DONTWAIT.
func recvmsg(fd int, buf, oob []byte, flags int) (msg []byte, files []*os.File, err error) {
	n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC|flags)
	if err != nil {
		return nil, nil, err
	}
	if n == 0 {
		return nil, nil, errEOF
	}
	if oobn > 0 {
		scms, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, err
		}
		for _, s := range scms {
			fds, err := unix.ParseUnixRights(&s)
			if err != nil {
				continue
			}
			for _, f := range fds {
				files = append(files, os.NewFile(uintptr(f), "lease"))
			}
		}
	}
	return buf[:n], files, nil
}

var errEOF = errors.New("lockholder: connection closed")

// rights is the SCM_RIGHTS control message passing files, or nil.
func rights(files []*os.File) []byte {
	if len(files) == 0 {
		return nil
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	return unix.UnixRights(fds...)
}

func sendmsg(fd int, msg []byte, files []*os.File) error {
	oob := rights(files)
	for {
		// MSG_NOSIGNAL: a dead holder is an EPIPE to handle, not a signal.
		err := unix.Sendmsg(fd, msg, oob, nil, unix.MSG_NOSIGNAL)
		if err != unix.EINTR {
			return err
		}
	}
}
