package api

import (
	"context"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"

	"github.com/vmlock/vmlock/api/vmlockpb"
)

// dialServer serves impl on a unix socket and returns a Client of it; both
// end with the test.
func dialServer(t *testing.T, impl vmlockpb.VMLockServer) *Client {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "vmlock.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	vmlockpb.RegisterVMLockServer(srv, impl)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	c, err := Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// oldDaemon serves the lock service as a vmlockd from before sessions did:
// Status only, no Session.
type oldDaemon struct {
	vmlockpb.UnimplementedVMLockServer
	calls atomic.Int32
}

func (o *oldDaemon) Status(context.Context, *vmlockpb.StatusRequest) (*vmlockpb.StatusReply, error) {
	o.calls.Add(1)
	return &vmlockpb.StatusReply{Version: "old"}, nil
}

// A client newer than its daemon falls back to unary calls, every time.
func TestClientOfADaemonWithoutSessionsUsesUnaryCalls(t *testing.T) {
	old := &oldDaemon{}
	c := dialServer(t, old)
	for i := range 3 {
		st, err := c.Status(context.Background())
		if err != nil || st.GetVersion() != "old" {
			t.Fatalf("Status #%d = %v, %v; want the old daemon's answer", i, st, err)
		}
	}
	if n := old.calls.Load(); n != 3 {
		t.Fatalf("the daemon ran %d Status calls, want 3", n)
	}
}

// sessionDaemon answers Status on sessions.
type sessionDaemon struct {
	vmlockpb.UnimplementedVMLockServer
}

func (sessionDaemon) Session(stream grpc.BidiStreamingServer[vmlockpb.Call, vmlockpb.Reply]) error {
	for {
		c, err := stream.Recv()
		if err != nil {
			return nil
		}
		if err := stream.Send(&vmlockpb.Reply{Id: c.Id, Result: &vmlockpb.Reply_Status{Status: &vmlockpb.StatusReply{Version: "sessions"}}}); err != nil {
			return err
		}
	}
}

// A call's deadline can pass just after its reply came in: the session's
// stream is then cancelled behind the call's back, and the next call must
// open another rather than fail on it.
func TestACallWhoseDeadlinePassesAsItsReplyArrivesLeavesTheNextCallASession(t *testing.T) {
	c := dialServer(t, sessionDaemon{})
	ctx, cancel := context.WithCancel(context.Background())
	c.sess.testHookAnswered = func(context.Context) {
		stream := c.sess.stream
		cancel()                  // the deadline passes now...
		<-stream.Context().Done() // ...and the stream is cancelled
	}
	if _, err := c.Status(ctx); err != nil {
		t.Fatalf("the call answered before its deadline: %v", err)
	}
	c.sess.testHookAnswered = nil
	st, err := c.Status(context.Background())
	if err != nil || st.GetVersion() != "sessions" {
		t.Fatalf("the next call: %v, %v; want the daemon's answer", st, err)
	}
}
