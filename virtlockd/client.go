package virtlockd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// ErrClientClosed is returned by calls on a Client that was closed, or
// whose connection can no longer be used (a call was cut short by its
// context, or the peer broke the protocol).
var ErrClientClosed = errors.New("virtlockd client: connection closed")

// Client speaks the lockspace program over one connection, one call at a
// time (calls from several goroutines are serialised). A call refused by the
// daemon returns a *RemoteError; the connection stays usable. A transport or
// protocol failure, or a context that ends during a call, closes the
// connection: later calls return ErrClientClosed.
//
// The protocol's state (the registered owner, restriction) belongs to the
// connection, as with libvirt's lock plugin.
type Client struct {
	conn net.Conn

	mu     sync.Mutex
	rd     *Reader
	wbuf   []byte
	serial uint32
	dead   error // why the connection is unusable, or nil
}

// Dial connects to the lock daemon's unix socket at socketPath.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("virtlockd client: %w", err)
	}
	return NewClient(conn), nil
}

// NewClient returns a Client on an established connection; it takes
// ownership of conn.
func NewClient(conn net.Conn) *Client {
	return &Client{conn: conn, rd: NewReader(conn, MaxMessageSize)}
}

// Close closes the connection. Closing the connection that registered an
// owner whose pid is the caller's own releases that owner's locks (and the
// daemon then kills it if it held any): that is virtlockd's contract.
//
// Close does not wait for a call in progress: that call fails.
func (c *Client) Close() error {
	err := c.conn.Close() // first, so that a call blocked in a read returns
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead == nil {
		c.dead = ErrClientClosed
	}
	return err
}

// Conn returns the underlying connection (for tests that need to misbehave).
func (c *Client) Conn() net.Conn { return c.conn }

// Call makes one call with the arguments a and waits for its reply until
// ctx is done. It returns nil for a void reply, a *RemoteError for an error
// reply, and otherwise an error wrapping the transport failure, the
// context's error, or a protocol sentinel (ErrUnexpectedReply, a
// *DecodeError).
func (c *Client) Call(ctx context.Context, a Args) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead != nil {
		return fmt.Errorf("virtlockd client: %s: %w", a.Procedure(), ErrClientClosed)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("virtlockd client: %s: %w", a.Procedure(), err)
	}
	serial := c.serial
	buf, err := AppendCall(c.wbuf[:0], serial, a)
	if err != nil {
		return err // nothing was sent; the connection is still fine
	}
	c.wbuf = buf
	c.serial++

	dl, _ := ctx.Deadline() // the zero time clears an earlier deadline
	if err := c.conn.SetDeadline(dl); err != nil {
		return c.kill(a.Procedure(), err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := c.conn.Write(buf); err != nil {
		return c.kill(a.Procedure(), c.ctxErr(ctx, err))
	}
	h, payload, err := c.rd.Next()
	if err != nil {
		return c.kill(a.Procedure(), c.ctxErr(ctx, err))
	}
	if h.Program != Program || h.Version != ProgramVersion || h.Procedure != a.Procedure() ||
		h.Serial != serial || h.Type != TypeReply {
		return c.kill(a.Procedure(), fmt.Errorf("%w: got prog %#x vers %d proc %d type %d serial %d for serial %d",
			ErrUnexpectedReply, h.Program, h.Version, h.Procedure, h.Type, h.Serial, serial))
	}
	switch h.Status {
	case StatusOK:
		if len(payload) != 0 {
			return c.kill(a.Procedure(), &DecodeError{Field: "void reply", Offset: 0, Err: ErrTrailingBytes})
		}
		return nil
	case StatusError:
		rerr, err := DecodeRemoteError(payload)
		if err != nil {
			return c.kill(a.Procedure(), err)
		}
		return rerr
	}
	return c.kill(a.Procedure(), fmt.Errorf("%w: reply status %d", ErrUnexpectedReply, h.Status))
}

// ctxErr prefers the context's error to the i/o timeout it caused. The
// connection's deadline is only ever the context's, so a deadline error
// means the context ended (its own timer may not have fired yet).
func (c *Client) ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%w (%v)", cerr, err)
	}
	if _, ok := ctx.Deadline(); ok && errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	}
	return err
}

// kill marks the connection unusable and closes it. Called with c.mu held.
func (c *Client) kill(p Procedure, err error) error {
	c.dead = err
	_ = c.conn.Close()
	return fmt.Errorf("virtlockd client: %s: %w", p, err)
}

// Register records the owner on this connection (REGISTER). Every other
// call but CreateLockspace needs it first.
func (c *Client) Register(ctx context.Context, owner Owner, flags uint32) error {
	return c.Call(ctx, &RegisterArgs{Owner: owner, Flags: flags})
}

// Restrict makes every later call on this connection fail (RESTRICT).
func (c *Client) Restrict(ctx context.Context, flags uint32) error {
	return c.Call(ctx, &RestrictArgs{Flags: flags})
}

// New creates a lockspace (NEW; libvirt never sends it).
func (c *Client) New(ctx context.Context, path string, flags uint32) error {
	return c.Call(ctx, &NewArgs{Path: path, Flags: flags})
}

// CreateResource creates a resource's lease file (CREATE_RESOURCE).
func (c *Client) CreateResource(ctx context.Context, path, name string, flags uint32) error {
	return c.Call(ctx, &CreateResourceArgs{Path: path, Name: name, Flags: flags})
}

// DeleteResource removes a resource's lease file (DELETE_RESOURCE).
func (c *Client) DeleteResource(ctx context.Context, path, name string, flags uint32) error {
	return c.Call(ctx, &DeleteResourceArgs{Path: path, Name: name, Flags: flags})
}

// AcquireResource locks a resource for the registered owner
// (ACQUIRE_RESOURCE); flags may hold AcquireShared and AcquireAutoCreate.
func (c *Client) AcquireResource(ctx context.Context, path, name string, flags uint32) error {
	return c.Call(ctx, &AcquireResourceArgs{Path: path, Name: name, Flags: flags})
}

// ReleaseResource unlocks a resource of the registered owner
// (RELEASE_RESOURCE).
func (c *Client) ReleaseResource(ctx context.Context, path, name string, flags uint32) error {
	return c.Call(ctx, &ReleaseResourceArgs{Path: path, Name: name, Flags: flags})
}

// CreateLockspace makes the daemon serve the directory path as a lockspace
// (CREATE_LOCKSPACE); it succeeds if it already does.
func (c *Client) CreateLockspace(ctx context.Context, path string) error {
	return c.Call(ctx, &CreateLockspaceArgs{Path: path})
}
