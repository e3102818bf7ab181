package main

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/vmlock/vmlock/api/vmlockpb"
)

// lockOnlyServer is a daemon with the resource-lock service alone (one
// from before hierarchical locks): it holds one disk.
type lockOnlyServer struct {
	vmlockpb.UnimplementedVMLockServer
}

func (lockOnlyServer) Locks(context.Context, *vmlockpb.LocksRequest) (*vmlockpb.LocksReply, error) {
	return &vmlockpb.LocksReply{Locks: []*vmlockpb.Lock{{
		Resource: &vmlockpb.Resource{Type: "disk", Name: "/images/web1.img", Mode: "exclusive"},
		Token:    7,
		Holders:  []*vmlockpb.Holder{{Name: "web1", Uuid: "88888888-0000-4000-8000-000000000001", Pid: 4242, Mode: "exclusive"}},
	}}}, nil
}

// The lock monitor shows the resource locks even when the daemon cannot
// list hierarchical locks, and says what it could not show.
func TestLocksShowsResourcesWithoutHierarchicalLocks(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	vmlockpb.RegisterVMLockServer(srv, lockOnlyServer{})
	go srv.Serve(ln)
	defer srv.Stop()

	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs([]string{"--socket", sock, "locks"})
	if err := root.Execute(); err != nil {
		t.Fatalf("vmlock locks: %v (stderr %q)", err, errOut.String())
	}
	if !strings.Contains(out.String(), "/images/web1.img") || !strings.Contains(out.String(), "web1") {
		t.Fatalf("vmlock locks printed %q, want the held disk and its holder", out.String())
	}
	if !strings.Contains(errOut.String(), "hierarchical locks not shown") {
		t.Fatalf("stderr %q, want a word on the hierarchical locks not shown", errOut.String())
	}
}
