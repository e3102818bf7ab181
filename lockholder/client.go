package lockholder

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Client is vmlockd's connection to its lock-holder. It is safe for
// concurrent use; operations are applied by the holder in the order their
// calls returned.
//
// Every operation is bounded by its context and by DefaultTimeout, whichever
// ends first: a holder that does not read (stopped, stuck) cannot block its
// controller for ever. An operation that gives up returns a
// *NotAnsweringError. An operation that fails on the connection (it gave
// up, or the holder went away) leaves the Client unusable, since a List
// may have left answers unread: every later operation returns that
// failure (Err), Alive reports false, and the caller replaces the holder
// (Kill, if it did not answer, then Connect).
type Client struct {
	sem chan struct{} // one operation at a time; a waiter gives up when its context ends
	f   *os.File      // the connection: non-blocking, in the runtime's poller, for deadlines
	rc  syscall.RawConn
	pid int      // the holder's pid, for errors; 0 if unknown
	pfd *os.File // the holder's pidfd, for Kill; nil if unknown

	mu     sync.Mutex
	failed error // the failure that made the connection unusable, or nil
	listed bool  // a List told what the holder takes:
	batch  bool  // 'B' ... 'C' (Apply)
}

// DefaultTimeout bounds every operation whose context has no earlier
// deadline. A holder that reads takes a message at once (it reads every
// millisecond under load; a write waits only when hundreds of records sit
// unread in its socket buffer), so one that takes nothing for this long is
// stopped or stuck. It is long enough for a holder starved of CPU on a
// loaded host, and the same as vmlockd's default request timeout.
const DefaultTimeout = 10 * time.Second

// NotAnsweringError says that the lock-holder did not take a message or
// answer before the operation's context ended or DefaultTimeout passed. Err
// is context.DeadlineExceeded or context.Canceled.
type NotAnsweringError struct {
	PID int // the lock-holder's pid; 0 if unknown
	Err error
}

func (e *NotAnsweringError) Error() string {
	pid := "unknown"
	if e.PID > 0 {
		pid = strconv.Itoa(e.PID)
	}
	if errors.Is(e.Err, context.Canceled) {
		return "the lock-holder (pid " + pid + ") did not answer before the call was cancelled"
	}
	return "the lock-holder (pid " + pid + ") did not answer within the deadline"
}

func (e *NotAnsweringError) Unwrap() error { return e.Err }

// newClient makes a Client of a connected socket, which it owns from now on.
func newClient(fd int) (*Client, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	c := &Client{sem: make(chan struct{}, 1), f: os.NewFile(uintptr(fd), "lock-holder")}
	rc, err := c.f.SyscallConn()
	if err != nil {
		c.f.Close()
		return nil, err
	}
	c.rc = rc
	// The peer's credentials are the listener's, taken by the holder when
	// it listened. A pidfd opened after connecting is the holder's if the
	// connection is still open afterwards: a holder that had died (its pid
	// free for reuse) would have reset it.
	if cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil && cred.Pid > 0 {
		c.pid = int(cred.Pid)
		if c.pid == os.Getpid() {
			return c, nil // served in this process (tests): never Kill it
		}
		if pfd, err := unix.PidfdOpen(c.pid, 0); err == nil {
			c.pfd = os.NewFile(uintptr(pfd), "lock-holder pidfd")
			if !c.Alive() {
				c.pfd.Close()
				c.pfd = nil
			}
		}
	}
	return c, nil
}

// PID returns the holder's process id, or 0 if it is unknown.
func (c *Client) PID() int { return c.pid }

// Err returns the failure that made the Client unusable (every operation
// returns it now), or nil while it is usable.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failed
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
			return newClient(fd)
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
		entries, err := c.List(ctx)
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
	// Non-blocking: a holder whose backlog is full (it does not accept)
	// makes Connect retry until its context ends instead of hanging.
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// ReapIfChild makes the Client's process reap the holder when it exits, if
// the holder is its child: one started by the process image that vmlockd
// replaced on a reload is, yet nothing in this image waits for it, so it
// would stay a zombie. Call it only for a holder this image did not start
// (StartDetached waits for those, and of two waits only one gets the exit
// status).
func (c *Client) ReapIfChild() {
	if c.pfd == nil {
		return
	}
	if rc, err := c.pfd.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) { reapIfChild(int(fd)) })
	}
}

// reapIfChild waits in the background for the process of pidfd if it is
// this process's child.
func reapIfChild(pidfd int) {
	var info unix.Siginfo
	if unix.Waitid(unix.P_PIDFD, pidfd, &info, unix.WEXITED|unix.WNOHANG, nil) != nil || info.Signo != 0 {
		return // not our child (ECHILD), or it had exited and is reaped now
	}
	fd, err := unix.FcntlInt(uintptr(pidfd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return
	}
	go func() {
		for unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED, nil) == unix.EINTR {
		}
		unix.Close(fd)
	}()
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
func (c *Client) Put(ctx context.Context, key string, meta []byte, files []*os.File) error {
	if len(files) > MaxFiles {
		return fmt.Errorf("lockholder: %d descriptors in one entry (at most %d)", len(files), MaxFiles)
	}
	msg, err := encode(opPut, key, meta)
	if err != nil {
		return err
	}
	return c.send(ctx, msg, files)
}

// PutOwned is Put for an entry whose locks belong to the process of the
// pidfd owner: the holder kills that process (SIGKILL) if a fence deadline
// armed by FenceAt passes while it holds the entry.
func (c *Client) PutOwned(ctx context.Context, key string, meta []byte, owner *os.File, files []*os.File) error {
	if owner == nil {
		return c.Put(ctx, key, meta, files)
	}
	if len(files) > MaxFiles {
		return fmt.Errorf("lockholder: %d descriptors in one entry (at most %d)", len(files), MaxFiles)
	}
	msg, err := encode(opPutOwned, key, meta)
	if err != nil {
		return err
	}
	return c.send(ctx, msg, append([]*os.File{owner}, files...))
}

// FenceAt arms the holder's fence deadline: if it passes before another
// call of FenceAt, the holder kills the owner of every entry put with
// PutOwned. deadline is converted to CLOCK_MONOTONIC when the call is made
// (it should carry a monotonic reading, as time.Now's do); the zero time
// disarms. The deadline outlives this connection.
func (c *Client) FenceAt(ctx context.Context, deadline time.Time) error {
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
	return c.send(ctx, msg, nil)
}

// Drop makes the holder close and forget key's entry.
func (c *Client) Drop(ctx context.Context, key string) error {
	msg, err := encode(opDrop, key, nil)
	if err != nil {
		return err
	}
	return c.send(ctx, msg, nil)
}

// DropPrefix makes the holder forget every entry whose key has prefix.
func (c *Client) DropPrefix(ctx context.Context, prefix string) error {
	msg, err := encode(opDropPrefix, prefix, nil)
	if err != nil {
		return err
	}
	return c.send(ctx, msg, nil)
}

// Op is one change of Apply: a put of Key (with Owner, a PutOwned), or with
// Drop set, a drop of Key.
type Op struct {
	Key   string
	Meta  []byte
	Owner *os.File
	Files []*os.File
	Drop  bool
}

// Apply makes the changes ops as one: the holder applies them together
// once the last is in, and none of them if the connection ends before (the
// caller died while sending), so that a record of several entries never
// changes in part. When Apply returns nil, the holder keeps the puts'
// descriptors, as with Put. A single change is sent as itself, and so is
// each change to a holder started by a vmlockd from before batches (the
// first Apply of several changes on a Client that has not listed lists, to
// learn which holder it is).
func (c *Client) Apply(ctx context.Context, ops []Op) error {
	type message struct {
		msg   []byte
		files []*os.File
	}
	switch {
	case len(ops) == 0:
		return nil
	case len(ops) == 1 && ops[0].Drop:
		return c.Drop(ctx, ops[0].Key)
	case len(ops) == 1:
		return c.PutOwned(ctx, ops[0].Key, ops[0].Meta, ops[0].Owner, ops[0].Files)
	}
	batch, err := c.takesBatches(ctx)
	if err != nil {
		return err
	}
	msgs := make([]message, 0, len(ops)+2)
	if batch {
		if len(ops) > maxBatch {
			return fmt.Errorf("lockholder: %d changes in one batch (at most %d)", len(ops), maxBatch)
		}
		b, _ := encode(opBegin, "", nil)
		msgs = append(msgs, message{msg: b})
	}
	for _, o := range ops {
		op, files := byte(opPut), o.Files
		switch {
		case o.Drop:
			op, files = opDrop, nil
		case o.Owner != nil:
			op, files = opPutOwned, append([]*os.File{o.Owner}, o.Files...)
		}
		if len(o.Files) > MaxFiles {
			return fmt.Errorf("lockholder: %d descriptors in one entry (at most %d)", len(o.Files), MaxFiles)
		}
		b, err := encode(op, o.Key, o.Meta)
		if err != nil {
			return err
		}
		msgs = append(msgs, message{b, files})
	}
	if batch {
		b, _ := encode(opCommit, "", nil)
		msgs = append(msgs, message{msg: b})
	}
	// One operation for the whole batch: no other change comes between.
	deadline, err := c.begin(ctx)
	if err != nil {
		return err
	}
	defer c.end()
	for _, m := range msgs {
		if err := c.write(ctx, deadline, m.msg, m.files); err != nil {
			return c.fail(fmt.Errorf("lockholder: %w", err))
		}
	}
	return nil
}

// takesBatches reports whether the holder takes batches, listing once to
// learn it.
func (c *Client) takesBatches(ctx context.Context) (bool, error) {
	c.mu.Lock()
	listed, batch := c.listed, c.batch
	c.mu.Unlock()
	if listed {
		return batch, nil
	}
	es, err := c.List(ctx)
	for i := range es {
		es[i].Close()
	}
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.batch, nil
}

func (c *Client) send(ctx context.Context, msg []byte, files []*os.File) error {
	deadline, err := c.begin(ctx)
	if err != nil {
		return err
	}
	defer c.end()
	if err := c.write(ctx, deadline, msg, files); err != nil {
		return c.fail(fmt.Errorf("lockholder: %w", err))
	}
	return nil
}

var errClosed = errors.New("lockholder: client closed")

// begin waits for the connection (one operation at a time) until ctx ends
// or DefaultTimeout passes, and returns the operation's deadline. The
// caller calls end when done.
func (c *Client) begin(ctx context.Context) (time.Time, error) {
	deadline := time.Now().Add(DefaultTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	select {
	case c.sem <- struct{}{}:
	default:
		// Another operation is under way; it waits only if the holder
		// does not read, and then this one would not get through either.
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		select {
		case c.sem <- struct{}{}:
		case <-ctx.Done():
			return deadline, c.fail(c.notAnswering(ctx.Err()))
		case <-t.C:
			return deadline, c.fail(c.notAnswering(context.DeadlineExceeded))
		}
	}
	if err := c.Err(); err != nil {
		<-c.sem
		return deadline, err
	}
	return deadline, nil
}

func (c *Client) end() { <-c.sem }

func (c *Client) notAnswering(cause error) error {
	return &NotAnsweringError{PID: c.pid, Err: cause}
}

// fail makes the connection unusable, with err (the first failure) as what
// every later operation returns, and returns err.
func (c *Client) fail(err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failed == nil {
		c.failed = err
	}
	return err
}

// write sends one message. SOCK_SEQPACKET sends a message whole or not at
// all, so a write that gives up has written nothing; but the caller may
// have sent earlier parts of a change (an object's record chunks), and a
// List's answers may be left unread, so a Client that gave up is not used
// again all the same.
func (c *Client) write(ctx context.Context, deadline time.Time, msg []byte, files []*os.File) error {
	oob := rights(files)
	var serr error
	try := func(fd uintptr) bool {
		for {
			// MSG_NOSIGNAL: a dead holder is an EPIPE to handle, not a signal.
			serr = unix.Sendmsg(int(fd), msg, oob, nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
			if serr != unix.EINTR {
				return serr != unix.EAGAIN
			}
		}
	}
	// First without waiting: a holder that reads has room, and a record
	// whose call's context has just ended still gets through.
	if err := c.rc.Control(func(fd uintptr) { try(fd) }); err != nil {
		return err
	}
	if serr != unix.EAGAIN {
		return serr
	}
	// The holder's socket buffer is full: wait for room.
	if err := c.wait(ctx, deadline, func() error { return c.rc.Write(try) }); err != nil {
		return err
	}
	return serr
}

// read receives one message, waiting until deadline or the end of ctx.
func (c *Client) read(ctx context.Context, deadline time.Time, buf, oob []byte) (msg []byte, files []*os.File, err error) {
	try := func(fd uintptr) bool {
		for {
			msg, files, err = recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT)
			if err != unix.EINTR {
				return err != unix.EAGAIN
			}
		}
	}
	if cerr := c.wait(ctx, deadline, func() error { return c.rc.Read(try) }); cerr != nil {
		return nil, nil, cerr
	}
	return msg, files, err
}

// wait runs io, a raw read or write through the runtime poller, with the
// connection's deadline at deadline, and moved to the past when ctx ends,
// so that a cancelled call stops waiting at once.
func (c *Client) wait(ctx context.Context, deadline time.Time, io func() error) error {
	if err := c.f.SetDeadline(deadline); err != nil {
		return err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = c.f.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	err := io()
	if !stop() {
		<-fired // it must not move the next operation's deadline
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		cause := ctx.Err()
		if cause == nil {
			cause = context.DeadlineExceeded
		}
		return c.notAnswering(cause)
	}
	return err
}

// List returns every entry the holder keeps, with its descriptors (owned by
// the caller from now on; the holder keeps its own copies).
func (c *Client) List(ctx context.Context) ([]Entry, error) {
	deadline, err := c.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer c.end()
	msg, _ := encode(opList, "", nil)
	if err := c.write(ctx, deadline, msg, nil); err != nil {
		return nil, c.fail(fmt.Errorf("lockholder: %w", err))
	}
	buf := make([]byte, maxMsg)
	oob := make([]byte, oobSize)
	var out []Entry
	fail := func(err error) ([]Entry, error) {
		for i := range out {
			out[i].Close()
		}
		return nil, c.fail(fmt.Errorf("lockholder: listing: %w", err))
	}
	for {
		m, files, err := c.read(ctx, deadline, buf, oob)
		if err != nil {
			return fail(err)
		}
		op, key, meta, err := decode(m)
		if err != nil {
			closeAll(files)
			return fail(err)
		}
		if op == opEnd {
			c.mu.Lock()
			c.listed, c.batch = true, slices.Contains(strings.Fields(string(meta)), featureBatch)
			c.mu.Unlock()
			return out, nil
		}
		e := Entry{Key: key, Meta: append([]byte(nil), meta...), Files: files}
		if op == opEntryOwned && len(files) > 0 {
			e.Owner, e.Files = files[0], files[1:]
		}
		out = append(out, e)
	}
}

// Alive reports whether the holder still has its end of the connection and
// no operation has given up on it. It never blocks: the holder sends
// nothing unasked, so anything readable on the socket is its end-of-file.
func (c *Client) Alive() bool {
	if c.Err() != nil {
		return false
	}
	alive := false
	err := c.rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		for {
			n, err := unix.Poll(fds, 0)
			if err == unix.EINTR {
				continue
			}
			alive = err == nil && n == 0
			return
		}
	})
	return err == nil && alive
}

// Kill ends the holder with SIGKILL, through its pidfd, and returns once it
// has exited (or ctx ends). vmlockd kills a holder that stopped answering
// before it starts another: the stuck one still owns the holder lock and
// socket of the state directory, so no other could serve it, and the
// descriptors queued for it unread are closed with it. While vmlockd runs,
// its own descriptors keep every lock, so killing the holder loses none.
func (c *Client) Kill(ctx context.Context) error {
	if c.pfd == nil {
		return fmt.Errorf("lockholder: cannot kill the lock-holder (pid %d): its pidfd is unknown", c.pid)
	}
	rc, err := c.pfd.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if serr = unix.PidfdSendSignal(int(fd), unix.SIGKILL, nil, 0); serr == unix.ESRCH {
			serr = nil // gone already
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("lockholder: killing the lock-holder (pid %d): %w", c.pid, serr)
	}
	for {
		// A pidfd is readable once its process has exited.
		exited := false
		if err := rc.Control(func(fd uintptr) {
			n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
			exited = err == nil && n > 0
		}); err != nil {
			return err
		}
		if exited {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lockholder: the killed lock-holder (pid %d) has not exited: %w", c.pid, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Close closes the connection. The holder keeps every entry; if it holds
// none, it exits. An operation under way fails.
func (c *Client) Close() error {
	c.fail(errClosed)
	if c.pfd != nil {
		c.pfd.Close()
	}
	if err := c.f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return err
	}
	return nil
}
