package main

import (
	"bytes"
	"context"
	"encoding/json"
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

// runLocks serves srv on a unix socket and runs `vmlock locks` with args
// against it, returning its output and stderr.
func runLocks(t *testing.T, srv vmlockpb.VMLockServer, args ...string) (out, errOut string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	vmlockpb.RegisterVMLockServer(gs, srv)
	go gs.Serve(ln)
	defer gs.Stop()

	root := newRootCmd()
	var o, e bytes.Buffer
	root.SetOut(&o)
	root.SetErr(&e)
	root.SetArgs(append([]string{"--socket", sock, "locks"}, args...))
	if err := root.Execute(); err != nil {
		t.Fatalf("vmlock locks: %v (stderr %q)", err, e.String())
	}
	return o.String(), e.String()
}

// The lock monitor shows the resource locks even when the daemon cannot
// list hierarchical locks, and says what it could not show.
func TestLocksShowsResourcesWithoutHierarchicalLocks(t *testing.T) {
	out, errOut := runLocks(t, lockOnlyServer{})
	if !strings.Contains(out, "/images/web1.img") || !strings.Contains(out, "web1") {
		t.Fatalf("vmlock locks printed %q, want the held disk and its holder", out)
	}
	if !strings.Contains(errOut, "hierarchical locks not shown") {
		t.Fatalf("stderr %q, want a word on the hierarchical locks not shown", errOut)
	}
}

// untrackedServer holds one disk, and keeps one it does not manage (a
// lease a start could not take back).
type untrackedServer struct{ lockOnlyServer }

func (s untrackedServer) Locks(ctx context.Context, req *vmlockpb.LocksRequest) (*vmlockpb.LocksReply, error) {
	rep, _ := s.lockOnlyServer.Locks(ctx, req)
	rep.Untracked = []*vmlockpb.Untracked{{Uuid: "88888888-0000-4000-8000-000000000002", Pid: 4343,
		Resources: []*vmlockpb.Resource{{Type: "disk", Name: "/images/db.img", Mode: "exclusive"}},
		Problem:   "not taken back at vmlockd's start: the image was replaced", UntilOwnerExits: true}}
	return rep, nil
}

// The holdings vmlockd keeps locked without managing them are shown after
// the lock table, in the table and in JSON, with why and until when.
func TestLocksShowsWhatIsHeldButNotManaged(t *testing.T) {
	out, _ := runLocks(t, untrackedServer{})
	for _, want := range []string{"/images/web1.img", "HELD, NOT MANAGED", "88888888-0000-4000-8000-000000000002", "4343",
		"its owner exits", "disk /images/db.img", "the image was replaced"} {
		if !strings.Contains(out, want) {
			t.Fatalf("vmlock locks printed\n%s\nwant %q in it", out, want)
		}
	}
	out, _ = runLocks(t, untrackedServer{}, "-o", "json")
	var got struct {
		Untracked []struct {
			UUID            string `json:"uuid"`
			PID             int    `json:"pid"`
			Resources       []any  `json:"resources"`
			Problem         string `json:"problem"`
			UntilOwnerExits bool   `json:"until_owner_exits"`
		} `json:"untracked"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("vmlock locks -o json: %v\n%s", err, out)
	}
	if len(got.Untracked) != 1 || got.Untracked[0].PID != 4343 || !got.Untracked[0].UntilOwnerExits || len(got.Untracked[0].Resources) != 1 {
		t.Fatalf("untracked in JSON: %+v, want the one kept lease", got.Untracked)
	}
	// Without any, the table has no such section.
	if out, _ := runLocks(t, lockOnlyServer{}); strings.Contains(out, "NOT MANAGED") {
		t.Fatalf("vmlock locks printed an empty section:\n%s", out)
	}
}
