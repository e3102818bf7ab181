package lockholder

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Serve runs the holder for stateDir until its controller has gone and it
// holds nothing, or ctx is done. It refuses to run (returning an error)
// while another holder serves the same directory.
func Serve(ctx context.Context, stateDir string) error {
	return serveWith(ctx, stateDir, true)
}

// serveWith is Serve; batches false makes a holder from before batches
// (tests: a holder left running by an older vmlockd).
func serveWith(ctx context.Context, stateDir string, batches bool) error {
	lock, err := os.OpenFile(filepath.Join(stateDir, LockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("lockholder: another lock-holder serves %s: %w", stateDir, err)
	}
	path := filepath.Join(stateDir, SocketName)
	_ = os.Remove(path) // stale: we hold the holder lock, so no holder listens there
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fmt.Errorf("lockholder: bind %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return err
	}
	if err := unix.Listen(lfd, 8); err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		unix.Shutdown(lfd, unix.SHUT_RDWR)
	}()
	h := &holder{entries: make(map[string]*Entry), rearm: make(chan struct{}, 1), batches: batches}
	fctx, stopFence := context.WithCancel(ctx)
	defer stopFence()
	go h.fenceLoop(fctx)
	for {
		cfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		// Only vmlockd (same uid as this process, which it started) may
		// control the holder.
		if cred, err := unix.GetsockoptUcred(cfd, unix.SOL_SOCKET, unix.SO_PEERCRED); err != nil || int(cred.Uid) != os.Geteuid() {
			unix.Close(cfd)
			continue
		}
		h.serve(cfd)
		unix.Close(cfd)
		if h.empty() {
			os.Remove(path)
			return nil
		}
	}
}

type holder struct {
	rearm   chan struct{} // nudges fenceLoop after a new deadline (buffered, 1)
	batches bool          // takes 'B' ... 'C' (and says so in a list's 'Z')

	// mu guards the fields below between serve's goroutine, the only one
	// that changes entries, and fenceLoop, which reads them.
	mu       sync.Mutex
	entries  map[string]*Entry
	deadline int64 // CLOCK_MONOTONIC ns; 0: disarmed
	fired    bool  // the deadline passed and its owners were killed
}

func (h *holder) empty() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.entries) == 0
}

// fenceLoop kills the owners of every entry when the armed deadline passes
// (see "Fencing" in the package comment).
func (h *holder) fenceLoop(ctx context.Context) {
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		h.mu.Lock()
		var wait time.Duration
		if h.deadline != 0 && !h.fired {
			if wait = time.Duration(h.deadline - monoNow()); wait <= 0 {
				h.fired = true
				for _, e := range h.entries {
					if e.Owner != nil {
						_ = unix.PidfdSendSignal(int(e.Owner.Fd()), unix.SIGKILL, nil, 0)
					}
				}
			}
		}
		h.mu.Unlock()
		if wait > 0 {
			t.Reset(wait)
		}
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-h.rearm:
			t.Stop()
		case <-t.C:
		}
	}
}

func (h *holder) setDeadline(meta []byte) bool {
	if len(meta) != 8 {
		return false
	}
	h.mu.Lock()
	h.deadline = int64(binary.LittleEndian.Uint64(meta))
	h.fired = false
	h.mu.Unlock()
	select {
	case h.rearm <- struct{}{}:
	default:
	}
	return true
}

// batchDelay is how long the holder lets messages queue up once it has
// read one. A Put is safe from the moment sendmsg returns (the socket
// buffer references its descriptors) and a release unlocks explicitly
// before its Drop, so the holder need not read promptly; reading in
// batches spares vmlockd's hot path a cross-process wake-up per lock
// operation under load. Only a List waits for replies, at most this long.
const batchDelay = time.Millisecond

func (h *holder) serve(fd int) {
	buf := make([]byte, maxMsg)
	oob := make([]byte, oobSize)
	flags := 0 // blocking while idle; MSG_DONTWAIT while draining a batch
	napped := false
	var batch []change // the changes of an open batch ('B' ... 'C')
	inBatch := false
	defer func() { // a batch the controller did not commit is not applied
		for _, c := range batch {
			closeAll(c.files)
		}
	}()
	for {
		msg, files, err := recvmsg(fd, buf, oob, flags)
		if flags != 0 && errors.Is(err, unix.EAGAIN) {
			if napped { // nothing came during a nap: idle again
				flags, napped = 0, false
			} else {
				time.Sleep(batchDelay)
				napped = true
			}
			continue
		}
		if err != nil {
			return
		}
		flags, napped = unix.MSG_DONTWAIT, false
		op, key, meta, err := decode(msg)
		if err != nil {
			closeAll(files)
			return
		}
		switch op {
		case opPut, opPutOwned, opDrop, opDropPrefix:
			c := change{op: op, key: key, meta: meta, files: files}
			if op == opPut || op == opPutOwned {
				c.meta = append([]byte(nil), meta...)
			} else if len(files) > 0 {
				closeAll(files) // only a put carries descriptors
				c.files = nil
			}
			if op == opPutOwned && len(files) == 0 {
				return
			}
			if inBatch {
				if len(batch) == maxBatch {
					closeAll(c.files)
					return
				}
				batch = append(batch, c)
				continue
			}
			h.mu.Lock()
			h.apply(c)
			h.mu.Unlock()
		case opBegin:
			closeAll(files)
			if inBatch || !h.batches {
				return
			}
			inBatch = true
		case opCommit:
			closeAll(files)
			if !inBatch {
				return
			}
			h.mu.Lock()
			for _, c := range batch {
				h.apply(c)
			}
			h.mu.Unlock()
			batch, inBatch = batch[:0], false
		case opFence:
			closeAll(files)
			if inBatch || !h.setDeadline(meta) {
				return
			}
		case opList:
			closeAll(files)
			if inBatch {
				return
			}
			if err := h.list(fd); err != nil {
				return
			}
		default:
			closeAll(files)
			return
		}
	}
}

// change is one put or drop, as received.
type change struct {
	op    byte
	key   string
	meta  []byte // a put's, copied
	files []*os.File
}

// apply makes the change c; called with h.mu held.
func (h *holder) apply(c change) {
	switch c.op {
	case opPut, opPutOwned:
		e := &Entry{Key: c.key, Meta: c.meta, Files: c.files}
		if c.op == opPutOwned {
			e.Owner, e.Files = c.files[0], c.files[1:]
		}
		h.drop(c.key)
		h.entries[c.key] = e
	case opDrop:
		h.drop(c.key)
	case opDropPrefix:
		for k := range h.entries {
			if strings.HasPrefix(k, c.key) {
				h.drop(k)
			}
		}
	}
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// drop closes and forgets key's entry; called with h.mu held.
func (h *holder) drop(key string) {
	if e := h.entries[key]; e != nil {
		e.Close()
		delete(h.entries, key)
	}
}

func (h *holder) list(fd int) error {
	// Only serve's goroutine (this one) changes entries, so the snapshot
	// stays valid while it is sent without h.mu: a controller that stops
	// reading must not hold up the fence loop.
	h.mu.Lock()
	es := make([]*Entry, 0, len(h.entries))
	for _, e := range h.entries {
		es = append(es, e)
	}
	h.mu.Unlock()
	for _, e := range es {
		op, files := byte(opEntry), e.Files
		if e.Owner != nil {
			op, files = opEntryOwned, append([]*os.File{e.Owner}, e.Files...)
		}
		msg, err := encode(op, e.Key, e.Meta)
		if err != nil {
			return err
		}
		if err := sendmsg(fd, msg, files); err != nil {
			return err
		}
	}
	var features []byte
	if h.batches {
		features = []byte(featureBatch)
	}
	msg, _ := encode(opEnd, "", features)
	return sendmsg(fd, msg, nil)
}
