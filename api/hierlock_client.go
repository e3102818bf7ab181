package api

import (
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// HierSession is a session of hierarchical locks: every lock it takes is
// held until it is released, the session is closed, or the process dies.
// Calls are served one at a time.
type HierSession struct {
	mu     sync.Mutex // held for a whole call
	stream vmlockpb.HierLock_SessionClient
	cancel context.CancelFunc
	id     uint64
	owner  string

	replies chan *vmlockpb.SessionReply // from the reader, one per request
	done    chan struct{}               // closed by the reader when the session ends
	err     error                       // why it ended; set before done is closed
}

// HierSession opens a session. Its lifetime is independent of ctx's
// deadline; Close ends it.
func (c *Client) HierSession(ctx context.Context) (*HierSession, error) {
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	st, err := vmlockpb.NewHierLockClient(c.conn).Session(sctx)
	if err != nil {
		cancel()
		return nil, FromStatus(err)
	}
	s := &HierSession{stream: st, cancel: cancel, replies: make(chan *vmlockpb.SessionReply, 1), done: make(chan struct{})}
	go s.read()
	return s, nil
}

// read receives the replies until the session ends, whoever ends it: so
// that Done tells of a daemon that went away even between calls.
func (s *HierSession) read() {
	for {
		rep, err := s.stream.Recv()
		if err != nil {
			if err == io.EOF {
				err = &lockmgr.Error{Code: lockmgr.CodeNotHeld, Msg: "vmlockd ended the hierarchical lock session (it stopped or reloaded): its locks are released"}
			} else {
				err = FromStatus(err)
			}
			s.err = err
			close(s.done)
			return
		}
		// One request is in flight at a time and its call takes the
		// reply, or cancels the stream: the buffer of one is enough.
		s.replies <- rep
	}
}

// Done returns a channel that is closed when the session has ended: by
// Close, or by the daemon (stopped, reloaded, crashed), or with the
// connection. Its locks are then released: a holder that sees Done closed
// before it released them no longer holds them. Err says why.
func (s *HierSession) Done() <-chan struct{} { return s.done }

// Err returns why the session ended, once Done is closed; nil before.
func (s *HierSession) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Owner is the session's owner token as the monitor shows it, known after
// the first call.
func (s *HierSession) Owner() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.owner
}

// call sends one request and waits for its reply. A request cannot be
// abandoned half-way: if ctx ends first, the session is closed (which
// cancels the request and releases the session's locks).
func (s *HierSession) call(ctx context.Context, req *vmlockpb.SessionRequest) (*vmlockpb.SessionReply, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.id++
	req.Id = s.id
	if err := s.stream.Send(req); err != nil {
		if err == io.EOF { // the stream ended: its status is what Recv got
			<-s.done
			return nil, s.err
		}
		return nil, FromStatus(err)
	}
	var rep *vmlockpb.SessionReply
	select {
	case rep = <-s.replies:
	case <-s.done:
		return nil, s.err
	case <-ctx.Done():
		s.cancel()
		return nil, &lockmgr.Error{Code: lockmgr.CodeTimeout, Msg: "hierarchical lock request abandoned; the session is closed", Err: ctx.Err()}
	}
	if rep.Id != req.Id {
		return nil, fmt.Errorf("vmlockd answered request %d with the reply to %d", req.Id, rep.Id)
	}
	s.owner = rep.Owner
	if rep.Code != 0 {
		return rep, &lockmgr.Error{Code: lockmgr.Code(rep.Code), Msg: rep.Error}
	}
	return rep, nil
}

// Acquire takes locks at one or more levels (see vmlockpb.HierAcquire) and
// returns what it took as "level/name".
func (s *HierSession) Acquire(ctx context.Context, req *vmlockpb.HierAcquire) ([]string, error) {
	rep, err := s.call(ctx, &vmlockpb.SessionRequest{Op: &vmlockpb.SessionRequest_Acquire{Acquire: req}})
	if err != nil {
		return nil, err
	}
	return rep.Acquired, nil
}

// Release releases names at level, the whole level (no names), or
// everything (level "").
func (s *HierSession) Release(ctx context.Context, level string, names ...string) error {
	_, err := s.call(ctx, &vmlockpb.SessionRequest{Op: &vmlockpb.SessionRequest_Release{Release: &vmlockpb.HierRelease{Level: level, Names: names}}})
	return err
}

// Close ends the session; the daemon releases everything it holds.
func (s *HierSession) Close() error {
	// Not CloseSend: it may not run beside a call's Send. Cancelling the
	// stream ends it for both sides.
	s.cancel()
	return nil
}

// HierMonitor returns the daemon's hierarchical locks.
func (c *Client) HierMonitor(ctx context.Context) (*vmlockpb.HierMonitorReply, error) {
	rep, err := vmlockpb.NewHierLockClient(c.conn).Monitor(ctx, &vmlockpb.HierMonitorRequest{})
	return rep, FromStatus(err)
}
