package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// MaxMessageSize is the largest single QMP message (one line) the client
// accepts. A larger message fails the connection with a *[ProtocolError].
const MaxMessageSize = 256 << 20

var (
	// ErrClosed is wrapped by the errors of calls on a Client (or a
	// Subscription) after it was closed locally.
	ErrClosed = errors.New("qmp: client closed")
	// ErrDisconnected is wrapped by the errors of calls that failed because
	// the connection to the QMP server was lost (EOF, reset, write error).
	// The underlying cause is wrapped as well.
	ErrDisconnected = errors.New("qmp: connection lost")
	// ErrProtocol is matched (errors.Is) by every *ProtocolError.
	ErrProtocol = errors.New("qmp: protocol error")
)

// Option configures a Client.
type Option func(*options)

type options struct {
	logger  *slog.Logger
	maxLine int
}

// WithLogger makes the client log what it has to discard — lines that are
// not JSON objects, replies that match no pending command, messages of
// unknown shape — at level Warn (unknown shapes at Debug). Without it the
// client logs nothing.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// withMaxMessageSize lowers MaxMessageSize for one client (for tests).
func withMaxMessageSize(n int) Option {
	return func(o *options) { o.maxLine = n }
}

// Client is a connection to one QMP monitor. Its methods are safe for
// concurrent use. A Client must be closed with Close to release its
// connection and reader goroutine, even after the connection was lost.
type Client struct {
	conn     net.Conn
	log      *slog.Logger
	maxLine  int
	greeting Greeting

	nextID atomic.Uint64
	wmu    chan struct{} // write lock; a channel so waiting honours contexts

	mu      sync.Mutex
	pending map[uint64]chan response
	subs    map[*Subscription]struct{}
	err     error         // terminal error, set once
	done    chan struct{} // closed when err is set

	greeted    chan Greeting // the reader hands the greeting over once
	readerDone chan struct{}
	closeOnce  sync.Once
}

type response struct {
	ret json.RawMessage
	err error // *Error or *ProtocolError
}

// Dial connects to a QMP monitor listening on the unix socket at path
// (QEMU's -qmp unix:PATH,server=on,wait=off) and negotiates capabilities.
// The context bounds the connect and the handshake only.
func Dial(ctx context.Context, path string, opts ...Option) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	return New(ctx, conn, opts...)
}

// New takes over conn, reads the server's greeting and sends
// qmp_capabilities, and returns a Client in command mode. The context
// bounds the handshake only. On error conn is closed. The Client owns conn
// from then on; close the Client, not conn.
func New(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	o := options{maxLine: MaxMessageSize}
	for _, opt := range opts {
		opt(&o)
	}
	c := &Client{
		conn:       conn,
		log:        o.logger,
		maxLine:    o.maxLine,
		wmu:        make(chan struct{}, 1),
		pending:    make(map[uint64]chan response),
		subs:       make(map[*Subscription]struct{}),
		done:       make(chan struct{}),
		greeted:    make(chan Greeting, 1),
		readerDone: make(chan struct{}),
	}
	go c.readLoop()
	select {
	case c.greeting = <-c.greeted:
	case <-c.done:
		err := c.Err()
		c.Close()
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", err)
	case <-ctx.Done():
		c.Close()
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", ctx.Err())
	}
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("qmp: negotiating capabilities: %w", err)
	}
	return c, nil
}

// Greeting returns the greeting the server sent when the client connected.
func (c *Client) Greeting() Greeting { return c.greeting }

// Done returns a channel that is closed when the client can no longer be
// used: after Close, or once the connection was lost. Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns nil while the client is usable; afterwards ErrClosed if it
// was closed locally, or an error wrapping ErrDisconnected (and its cause)
// or a *ProtocolError if the connection failed.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection, fails every pending Execute with ErrClosed,
// ends every subscription (after its queued events are read) and waits for
// the reader goroutine to exit. It is idempotent and always returns nil.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.fail(ErrClosed)
		<-c.readerDone
	})
	return nil
}

// fail makes err the client's terminal error (if it has none yet), wakes
// every pending call and subscriber, and closes the connection.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	close(c.done)
	subs := c.subs
	c.subs = nil
	c.mu.Unlock()
	for s := range subs {
		s.end(err)
	}
	c.conn.Close()
}

// Execute runs a QMP command and waits for its reply.
//
// args, if not nil, is marshalled with encoding/json and must encode as a
// JSON object (a struct or a map); it becomes the command's "arguments".
// If reply is not nil the command's "return" value is unmarshalled into it
// (it must be a pointer, as for json.Unmarshal; a *json.RawMessage takes
// the raw value).
//
// Errors: a *Error if QEMU answered with an error reply; an error wrapping
// ErrDisconnected if the connection was lost before the reply arrived;
// one wrapping ErrClosed after Close; an error wrapping ctx.Err() if the context ended
// first — in that case QEMU may still execute the command, and its late
// reply is discarded. A reply that cannot be unmarshalled into reply gives
// an error wrapping the json error. Execute is safe for concurrent use.
func (c *Client) Execute(ctx context.Context, command string, args any, reply any) error {
	if command == "" {
		return errors.New("qmp: Execute: empty command name")
	}
	req := struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments,omitempty"`
		ID        uint64          `json:"id"`
	}{Execute: command, ID: c.nextID.Add(1)}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("qmp: %s: encoding arguments: %w", command, err)
		}
		if !bytes.Equal(raw, []byte("null")) {
			if !isObject(raw) {
				return fmt.Errorf("qmp: %s: arguments must encode as a JSON object, not %.40s", command, raw)
			}
			req.Arguments = raw
		}
	}
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp: %s: encoding command: %w", command, err)
	}
	line = append(line, '\n')

	ch := make(chan response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return fmt.Errorf("%w (command %s)", err, command)
	}
	c.pending[req.ID] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, req.ID)
		c.mu.Unlock()
	}()

	if err := c.write(ctx, line); err != nil {
		if ctx.Err() != nil && !errors.Is(err, ErrDisconnected) {
			return fmt.Errorf("qmp: %s: %w", command, err)
		}
		return fmt.Errorf("%w (command %s)", err, command)
	}

	var r response
	select {
	case r = <-ch:
	case <-c.done:
		select {
		case r = <-ch: // the reply won the race against the failure
		default:
			return fmt.Errorf("%w (command %s)", c.Err(), command)
		}
	case <-ctx.Done():
		return fmt.Errorf("qmp: %s: waiting for reply: %w", command, ctx.Err())
	}
	if r.err != nil {
		var qe *Error
		if errors.As(r.err, &qe) {
			e := *qe
			e.Command = command
			return &e
		}
		return fmt.Errorf("%w (command %s)", r.err, command)
	}
	if reply != nil {
		if err := json.Unmarshal(r.ret, reply); err != nil {
			return fmt.Errorf("qmp: %s: decoding reply: %w", command, err)
		}
	}
	return nil
}

// write writes one complete line, honouring ctx while waiting for the
// write lock and during the write. A write interrupted by ctx after part
// of the line was sent would corrupt the stream, so it fails the client.
func (c *Client) write(ctx context.Context, line []byte) error {
	select {
	case c.wmu <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting to send: %w", ctx.Err())
	case <-c.done:
		return c.Err()
	}
	defer func() { <-c.wmu }()

	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetWriteDeadline(time.Unix(1, 0))
		close(fired)
	})
	n, err := c.conn.Write(line)
	if !stop() {
		<-fired
		c.conn.SetWriteDeadline(time.Time{})
	}
	if err == nil {
		return nil
	}
	if ctx.Err() != nil && n == 0 {
		return fmt.Errorf("sending: %w", ctx.Err())
	}
	var cause error
	if n > 0 && n < len(line) {
		cause = fmt.Errorf("%w: write interrupted after %d of %d bytes: %w", ErrDisconnected, n, len(line), err)
	} else {
		cause = fmt.Errorf("%w: %w", ErrDisconnected, err)
	}
	c.fail(cause)
	return c.Err()
}

// readLoop reads and dispatches messages until the connection fails.
func (c *Client) readLoop() {
	defer close(c.readerDone)
	r := bufio.NewReaderSize(c.conn, 64<<10)
	greeted := false
	for {
		line, err := readLine(r, c.maxLine)
		if err != nil {
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				err = fmt.Errorf("%w: %w", ErrDisconnected, err)
			}
			c.fail(err)
			return
		}
		if len(trimJSONSpace(line)) == 0 {
			continue
		}
		m, derr := decodeMessage(line)
		if !greeted {
			if derr == nil && m.kind == kindEvent {
				// QEMU queues events on a monitor nobody is connected to
				// and flushes them to the next client, sometimes ahead of
				// the greeting. They predate this session: skip them.
				if c.log != nil {
					c.log.Debug("skipping QMP event sent before the greeting", "message", truncate(line))
				}
				continue
			}
			if derr != nil || m.kind != kindGreeting {
				if derr == nil {
					derr = errors.New("first message is not a QMP greeting")
				}
				c.fail(newProtocolError(line, derr))
				return
			}
			greeted = true
			c.greeted <- m.greeting
			continue
		}
		c.dispatch(line, m, derr)
	}
}

func (c *Client) dispatch(line []byte, m message, derr error) {
	switch {
	case derr != nil && m.hasID && (m.kind == kindReturn || m.kind == kindError):
		// A malformed reply to a command: fail that command, don't lose it.
		c.deliver(line, m.id, response{err: newProtocolError(line, derr)})
	case derr != nil:
		c.warn("discarding malformed QMP message", line, derr)
	case m.kind == kindEvent:
		c.mu.Lock()
		for s := range c.subs {
			s.push(m.event)
		}
		c.mu.Unlock()
	case m.kind == kindReturn || m.kind == kindError:
		if !m.hasID {
			c.warn("discarding QMP reply without a known id", line, nil)
			return
		}
		r := response{ret: m.ret}
		if m.err != nil {
			r.err = m.err
		}
		c.deliver(line, m.id, r)
	case m.kind == kindGreeting:
		c.warn("discarding unexpected second QMP greeting", line, nil)
	default:
		if c.log != nil {
			c.log.Debug("ignoring QMP message of unknown shape", "message", truncate(line))
		}
	}
}

func (c *Client) deliver(line []byte, id uint64, r response) {
	c.mu.Lock()
	ch, ok := c.pending[id]
	delete(c.pending, id)
	c.mu.Unlock()
	if !ok {
		c.warn("discarding QMP reply that matches no pending command (cancelled?)", line, nil)
		return
	}
	ch <- r // buffered, delivered at most once
}

func (c *Client) warn(msg string, line []byte, err error) {
	if c.log == nil {
		return
	}
	attrs := []any{"message", truncate(line)}
	if err != nil {
		attrs = append(attrs, "error", err)
	}
	c.log.Warn(msg, attrs...)
}

func truncate(line []byte) string {
	const max = 256
	if len(line) > max {
		return string(line[:max]) + "…"
	}
	return string(line)
}

// readLine reads one '\n'-terminated line of at most max bytes (the
// terminator included). A longer line is a *ProtocolError; a partial line
// at EOF is an error wrapping io.ErrUnexpectedEOF.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var buf []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(buf)+len(frag) > max {
			head := buf
			if len(head) == 0 {
				head = frag
			}
			return nil, newProtocolError(head, fmt.Errorf("message longer than %d bytes", max))
		}
		switch {
		case err == nil:
			if buf == nil {
				return bytes.Clone(frag), nil
			}
			return append(buf, frag...), nil
		case errors.Is(err, bufio.ErrBufferFull):
			buf = append(buf, frag...)
		case errors.Is(err, io.EOF) && len(buf)+len(frag) > 0:
			return nil, fmt.Errorf("connection closed in the middle of a message: %w", io.ErrUnexpectedEOF)
		default:
			return nil, err
		}
	}
}
