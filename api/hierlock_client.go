package api

import (
	"context"
	"fmt"
	"sync"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// HierSession is a session of hierarchical locks: every lock it takes is
// held until it is released, the session is closed, or the process dies.
// Calls are served one at a time.
type HierSession struct {
	mu     sync.Mutex
	stream vmlockpb.HierLock_SessionClient
	cancel context.CancelFunc
	id     uint64
	owner  string
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
	return &HierSession{stream: st, cancel: cancel}, nil
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
		return nil, FromStatus(err)
	}
	type result struct {
		rep *vmlockpb.SessionReply
		err error
	}
	ch := make(chan result, 1)
	go func() {
		rep, err := s.stream.Recv()
		ch <- result{rep, err}
	}()
	var r result
	select {
	case r = <-ch:
	case <-ctx.Done():
		s.cancel()
		return nil, &lockmgr.Error{Code: lockmgr.CodeTimeout, Msg: "hierarchical lock request abandoned; the session is closed", Err: ctx.Err()}
	}
	if r.err != nil {
		return nil, FromStatus(r.err)
	}
	if r.rep.Id != req.Id {
		return nil, fmt.Errorf("vmlockd answered request %d with the reply to %d", req.Id, r.rep.Id)
	}
	s.owner = r.rep.Owner
	if r.rep.Code != 0 {
		return r.rep, &lockmgr.Error{Code: lockmgr.Code(r.rep.Code), Msg: r.rep.Error}
	}
	return r.rep, nil
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
	err := s.stream.CloseSend()
	s.cancel()
	return err
}

// HierMonitor returns the daemon's hierarchical locks.
func (c *Client) HierMonitor(ctx context.Context) (*vmlockpb.HierMonitorReply, error) {
	rep, err := vmlockpb.NewHierLockClient(c.conn).Monitor(ctx, &vmlockpb.HierMonitorRequest{})
	return rep, FromStatus(err)
}
