package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// session is the client's end of a Session stream (see vmlock.proto): one
// call at a time. A caller that finds it busy with another goroutine's
// call, or cannot open it, makes the unary call instead, so a Client stays
// safe and concurrent for any number of goroutines.
type session struct {
	mu     sync.Mutex // held for a whole call (TryLock)
	stream grpc.BidiStreamingClient[vmlockpb.Call, vmlockpb.Reply]
	cancel context.CancelFunc
	lastID uint64
	closed bool // by Close, or the daemon has no sessions: unary calls only

	testHookAnswered func(ctx context.Context) // if set, runs once a call's reply is in
}

// do makes call on the session. handled is false when the call was
// certainly not run: the session was busy or could not be opened, the call
// could not be sent, the daemon ended the session (stopping or reloading)
// before answering, or the daemon has no sessions; the caller then
// makes the unary call, which waits through a reload. Otherwise err is the
// call's error as FromStatus returns it, and a reply that arrives after
// ctx is done is not waited for (the stream is dropped, as a unary call is
// cancelled).
func (s *session) do(ctx context.Context, rpc vmlockpb.VMLockClient, call *vmlockpb.Call) (rep *vmlockpb.Reply, handled bool, err error) {
	if !s.mu.TryLock() {
		return nil, false, nil
	}
	defer s.mu.Unlock()
	if s.closed {
		return nil, false, nil
	}
	if s.stream == nil {
		var sctx context.Context
		sctx, s.cancel = context.WithCancel(context.Background())
		// Not WaitForReady: while the daemon is away (a reload), the unary
		// call waits for it instead.
		stopOpen := context.AfterFunc(ctx, s.cancel)
		st, err := rpc.Session(sctx, grpc.WaitForReady(false))
		stopOpen()
		if err != nil {
			s.drop()
			return nil, false, nil
		}
		s.stream = st
	}
	s.lastID++
	call.Id = s.lastID
	if dl, ok := ctx.Deadline(); ok {
		call.TimeoutMs = max(1, time.Until(dl).Milliseconds())
	}
	stop := context.AfterFunc(ctx, s.cancel)
	defer func() {
		// ctx ended while the call was in flight: its AfterFunc cancels
		// the stream (or has), even if the reply came in first, so the
		// next call must not find this stream.
		if !stop() {
			s.drop()
		}
	}()
	if err := s.stream.Send(call); err != nil {
		// Not sent (the stream ended, or the connection did): the unary
		// call makes it, waiting for the daemon if it is coming back.
		s.drop()
		return nil, false, nil
	}
	rep, err = s.stream.Recv()
	if s.testHookAnswered != nil {
		s.testHookAnswered(ctx)
	}
	switch {
	case err == nil && rep.Id == call.Id:
		if rep.Error != nil {
			st := status.ErrorProto(&spb.Status{Code: rep.Error.Code, Message: rep.Error.Message, Details: rep.Error.Details})
			return nil, true, FromStatus(st)
		}
		return rep, true, nil
	case err == nil:
		s.drop()
		return nil, true, &lockmgr.Error{Code: lockmgr.CodeInternal,
			Msg: fmt.Sprintf("vmlockd answered call %d of a session with the reply to call %d", call.Id, rep.Id)}
	case errors.Is(err, io.EOF):
		s.drop() // ended between calls: ours was not run
		return nil, false, nil
	case status.Code(err) == codes.Unimplemented:
		// A vmlockd older than sessions (a client upgraded first): the
		// call was not run; use unary calls from now on.
		s.drop()
		s.closed = true
		return nil, false, nil
	}
	s.drop()
	if ctx.Err() != nil {
		return nil, true, FromStatus(status.FromContextError(ctx.Err()).Err())
	}
	return nil, true, FromStatus(err)
}

// drop forgets the stream; the next call opens another. Called with mu.
func (s *session) drop() {
	if s.cancel != nil {
		s.cancel()
	}
	s.stream, s.cancel = nil, nil
}

// close ends the session for good, once any call in progress is over.
func (s *session) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.drop()
}
