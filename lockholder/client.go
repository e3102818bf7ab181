package lockholder

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Client is vmlockd's connection to its lock-holder. It is safe for
// concurrent use; operations are applied by the holder in the order their
// calls returned.
type Client struct {
	mu sync.Mutex
	fd int
}

// Connect connects to the holder of stateDir, starting one with start if
// none serves it. start must launch a process that calls Serve(stateDir) in
// a session of its own (so that it outlives the caller); Command returns the
// usual one. If nobody listens a second after a start, Connect starts
// another: the first may have found the previous holder still exiting
// (Serve refuses to run while another holder has the directory), and a
// holder too many exits at once for the same reason.
func Connect(ctx context.Context, stateDir string, start func() error) (*Client, error) {
	path := filepath.Join(stateDir, SocketName)
	var started time.Time
	for {
		fd, err := dial(path)
		if err == nil {
			return &Client{fd: fd}, nil
		}
		if started.IsZero() || time.Since(started) >= restartAfter {
			if err := start(); err != nil {
				return nil, fmt.Errorf("starting the lock-holder: %w", err)
			}
			started = time.Now()
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the lock-holder did not start listening on %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Open is Connect followed by List: it connects to the holder of stateDir
// (starting one with start if none serves it) and returns what the holder
// keeps. A holder that keeps nothing exits when its controller leaves; one
// reached at that moment (vmlockd restarted right after the previous one
// left, so the new connection still waited in the old holder's backlog)
// goes away without answering. Open then connects again, which starts a
// new holder, until ctx is done. Any other error of the listing is
// returned as it is.
func Open(ctx context.Context, stateDir string, start func() error) (*Client, []Entry, error) {
	for {
		c, err := Connect(ctx, stateDir, start)
		if err != nil {
			return nil, nil, err
		}
		entries, err := c.List()
		if err == nil {
			return c, entries, nil
		}
		c.Close()
		if !holderLeft(err) {
			return nil, nil, err
		}
		select {
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("the lock-holder went away before answering: %w (last: %v)", ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// holderLeft reports whether err says that the holder closed or reset the
// connection.
func holderLeft(err error) bool {
	return errors.Is(err, errEOF) || errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE)
}

// restartAfter is how long Connect waits for a started holder to listen
// before it starts another.
const restartAfter = time.Second

func dial(path string) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// Command returns the command that starts a holder: exe with args, in a new
// session, with no standard streams, so that it survives the daemon and its
// process group.
func Command(exe string, args ...string) *exec.Cmd {
	cmd := exec.Command(exe, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	return cmd
}

// StartDetached starts cmd and does not wait for it; the holder is
// reparented when its parent exits.
func StartDetached(cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	go cmd.Wait() // reap it if it exits while we live
	return nil
}

// Put hands the holder a record and duplicates of files (at most
// MaxFiles). It replaces any entry with the same key. When Put returns nil,
// the holder keeps the files' open file descriptions even if the caller
// dies at once.
func (c *Client) Put(key string, meta []byte, files []*os.File) error {
	if len(files) > MaxFiles {
		return fmt.Errorf("lockholder: %d descriptors in one entry (at most %d)", len(files), MaxFiles)
	}
	msg, err := encode(opPut, key, meta)
	if err != nil {
		return err
	}
	return c.send(msg, files)
}

// PutOwned is Put for an entry whose locks belong to the process of the
// pidfd owner: the holder kills that process (SIGKILL) if a fence deadline
// armed by FenceAt passes while it holds the entry.
func (c *Client) PutOwned(key string, meta []byte, owner *os.File, files []*os.File) error {
	if owner == nil {
		return c.Put(key, meta, files)
	}
	if len(files) > MaxFiles {
		return fmt.Errorf("lockholder: %d descriptors in one entry (at most %d)", len(files), MaxFiles)
	}
	msg, err := encode(opPutOwned, key, meta)
	if err != nil {
		return err
	}
	return c.send(msg, append([]*os.File{owner}, files...))
}

// FenceAt arms the holder's fence deadline: if it passes before another
// call of FenceAt, the holder kills the owner of every entry put with
// PutOwned. deadline is converted to CLOCK_MONOTONIC when the call is made
// (it should carry a monotonic reading, as time.Now's do); the zero time
// disarms. The deadline outlives this connection.
func (c *Client) FenceAt(deadline time.Time) error {
	var mono int64
	if !deadline.IsZero() {
		mono = max(monoNow()+int64(time.Until(deadline)), 1)
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(mono))
	msg, err := encode(opFence, "", b[:])
	if err != nil {
		return err
	}
	return c.send(msg, nil)
}

// Drop makes the holder close and forget key's entry.
func (c *Client) Drop(key string) error {
	msg, err := encode(opDrop, key, nil)
	if err != nil {
		return err
	}
	return c.send(msg, nil)
}

// DropPrefix makes the holder forget every entry whose key has prefix.
func (c *Client) DropPrefix(prefix string) error {
	msg, err := encode(opDropPrefix, prefix, nil)
	if err != nil {
		return err
	}
	return c.send(msg, nil)
}

func (c *Client) send(msg []byte, files []*os.File) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return errClosed
	}
	if err := sendmsg(c.fd, msg, files); err != nil {
		return fmt.Errorf("lockholder: %w", err)
	}
	return nil
}

var errClosed = errors.New("lockholder: client closed")

// List returns every entry the holder keeps, with its descriptors (owned by
// the caller from now on; the holder keeps its own copies).
func (c *Client) List() ([]Entry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	msg, _ := encode(opList, "", nil)
	if err := sendmsg(c.fd, msg, nil); err != nil {
		return nil, fmt.Errorf("lockholder: %w", err)
	}
	buf := make([]byte, maxMsg)
	oob := make([]byte, oobSize)
	var out []Entry
	fail := func(err error) ([]Entry, error) {
		for i := range out {
			out[i].Close()
		}
		return nil, fmt.Errorf("lockholder: listing: %w", err)
	}
	for {
		m, files, err := recvmsg(c.fd, buf, oob, 0)
		if err != nil {
			return fail(err)
		}
		op, key, meta, err := decode(m)
		if err != nil {
			closeAll(files)
			return fail(err)
		}
		if op == opEnd {
			return out, nil
		}
		e := Entry{Key: key, Meta: append([]byte(nil), meta...), Files: files}
		if op == opEntryOwned && len(files) > 0 {
			e.Owner, e.Files = files[0], files[1:]
		}
		out = append(out, e)
	}
}

// Alive reports whether the holder still has its end of the connection. It
// never blocks: the holder sends nothing unasked, so anything readable on
// the socket is its end-of-file.
func (c *Client) Alive() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return false
	}
	fds := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	for {
		n, err := unix.Poll(fds, 0)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n == 0
	}
}

// Close closes the connection. The holder keeps every entry; if it holds
// none, it exits.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}
