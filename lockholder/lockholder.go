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
// then referenced by the holder's socket buffer. The holder exits when its
// controller goes away and it holds nothing.
//
// The wire format is one SOCK_SEQPACKET message per operation:
//
//	op(1) keylen(2, LE) key meta  [+ up to MaxFiles descriptors]
//
// with op 'P' put (replace), 'D' drop key, 'X' drop every key with the
// prefix, 'L' list; a list is answered by one 'E' message per entry and a
// final 'Z'.
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
	opDrop       = 'D'
	opDropPrefix = 'X'
	opList       = 'L'
	opEntry      = 'E'
	opEnd        = 'Z'

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
}

// Close closes the entry's descriptors.
func (e *Entry) Close() {
	for _, f := range e.Files {
		f.Close()
	}
	e.Files = nil
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

var errShort = errors.New("lockholder: short message")

func decode(b []byte) (op byte, key string, meta []byte, err error) {
	if len(b) < 3 {
		return 0, "", nil, errShort
	}
	n := int(binary.LittleEndian.Uint16(b[1:]))
	if len(b) < 3+n {
		return 0, "", nil, errShort
	}
	return b[0], string(b[3 : 3+n]), b[3+n:], nil
}

// oobSize is the control buffer for MaxFiles descriptors.
var oobSize = unix.CmsgSpace(MaxFiles * 4)

// recvmsg reads one message and the descriptors that came with it.
func recvmsg(fd int, buf, oob []byte) (msg []byte, files []*os.File, err error) {
	n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
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

func sendmsg(fd int, msg []byte, files []*os.File) error {
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	for {
		err := unix.Sendmsg(fd, msg, oob, nil, 0)
		if err != unix.EINTR {
			return err
		}
	}
}
