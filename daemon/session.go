package daemon

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmlock/vmlock/api/vmlockpb"
)

// Session serves calls over one stream (see vmlock.proto). The stream was
// authenticated when it opened (interceptStream); each call is then run
// like a unary one: bounded, measured, its error an API status.
//
// Invariant: the session ends (status OK) only between calls, so a Call it
// has not answered was not run and the client may make it again. Calls are
// read, run and answered by a goroutine of their own, holding callMu for
// each call, so that a stop or reload ends an idle session at once instead
// of waiting in Recv; the handler sets stopped under callMu, so a call is
// either answered before the session ends or not run at all. (Serving in
// the reading goroutine, rather than handing each call to the handler,
// spares a goroutine switch per call; gRPC allows one goroutine to Send
// while another waits for the handler.)
func (s *service) Session(stream grpc.BidiStreamingServer[vmlockpb.Call, vmlockpb.Reply]) error {
	ctx := stream.Context()
	var (
		callMu  sync.Mutex
		stopped bool // guarded by callMu: no call may start, or Send
	)
	ended := make(chan error, 1)
	go func() {
		for {
			c, err := stream.Recv()
			if err != nil {
				ended <- err
				return
			}
			callMu.Lock()
			if stopped {
				callMu.Unlock()
				return // not run: the client sees the session end
			}
			err = stream.Send(s.serveCall(ctx, c))
			callMu.Unlock()
			if err != nil {
				ended <- err
				return
			}
		}
	}()
	select {
	case <-s.d.stopping:
		callMu.Lock() // waits for a call in progress to be answered
		stopped = true
		callMu.Unlock()
		return nil
	case err := <-ended:
		if errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
}

// serveCall runs one call of a session and returns its reply.
func (s *service) serveCall(ctx context.Context, c *vmlockpb.Call) *vmlockpb.Reply {
	if c.TimeoutMs > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(c.TimeoutMs)*time.Millisecond)
		defer cancel()
	}
	var method string
	var req any
	var h grpc.UnaryHandler
	switch m := c.Method.(type) {
	case *vmlockpb.Call_Status:
		method, req = "Status", m.Status
		h = func(ctx context.Context, r any) (any, error) { return s.Status(ctx, r.(*vmlockpb.StatusRequest)) }
	case *vmlockpb.Call_Acquire:
		method, req = "Acquire", m.Acquire
		h = func(ctx context.Context, r any) (any, error) { return s.Acquire(ctx, r.(*vmlockpb.AcquireRequest)) }
	case *vmlockpb.Call_Release:
		method, req = "Release", m.Release
		h = func(ctx context.Context, r any) (any, error) { return s.Release(ctx, r.(*vmlockpb.ReleaseRequest)) }
	case *vmlockpb.Call_Inquire:
		method, req = "Inquire", m.Inquire
		h = func(ctx context.Context, r any) (any, error) { return s.Inquire(ctx, r.(*vmlockpb.InquireRequest)) }
	default:
		return &vmlockpb.Reply{Id: c.Id, Error: &vmlockpb.CallStatus{Code: int32(codes.Unimplemented),
			Message: "this session call names no method this vmlockd knows (a newer client?)"}}
	}
	rep := &vmlockpb.Reply{Id: c.Id}
	resp, err := s.d.run(ctx, method, req, h)
	if err != nil {
		st := status.Convert(err).Proto()
		rep.Error = &vmlockpb.CallStatus{Code: st.Code, Message: st.Message, Details: st.Details}
		return rep
	}
	switch r := resp.(type) {
	case *vmlockpb.StatusReply:
		rep.Result = &vmlockpb.Reply_Status{Status: r}
	case *vmlockpb.StateReply:
		rep.Result = &vmlockpb.Reply_State{State: r}
	}
	return rep
}
