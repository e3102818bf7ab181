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
	sock := filepath.Join(t.TempDir(), "old.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	old := &oldDaemon{}
	vmlockpb.RegisterVMLockServer(srv, old)
	go srv.Serve(ln)
	defer srv.Stop()

	c, err := Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
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
