package daemon

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// sessionErr turns a reply's error back into what the unary call returns.
func sessionErr(r *vmlockpb.Reply) error {
	if r.Error == nil {
		return nil
	}
	return api.FromStatus(status.ErrorProto(&spb.Status{Code: r.Error.Code, Message: r.Error.Message, Details: r.Error.Details}))
}

func TestSessionAnswersEachCallInOrderWithItsMethodsErrors(t *testing.T) {
	c, dir := startInProcess(t)
	pid := sleeper(t)
	disk := filepath.Join(dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	ctx := context.Background()
	// The first holder, by the unary method.
	first := lockmgr.Object{UUID: "44444444-0000-4000-8000-000000000001", Name: "first", PID: pid}
	if _, err := c.RPC().Acquire(ctx, &vmlockpb.AcquireRequest{Object: api.ObjectToPB(first),
		Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(disk, lockmgr.Exclusive))}}); err != nil {
		t.Fatal(err)
	}
	s, err := c.RPC().Session(ctx)
	if err != nil {
		t.Fatal(err)
	}
	second := lockmgr.Object{UUID: "44444444-0000-4000-8000-000000000002", PID: pid}
	calls := []*vmlockpb.Call{
		{Id: 7, Method: &vmlockpb.Call_Status{Status: &vmlockpb.StatusRequest{}}},
		{Id: 8, Method: &vmlockpb.Call_Acquire{Acquire: &vmlockpb.AcquireRequest{Object: api.ObjectToPB(second),
			Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(disk, lockmgr.Exclusive))}}}},
		{Id: 9}, // names no method
		{Id: 10, Method: &vmlockpb.Call_Inquire{Inquire: &vmlockpb.InquireRequest{Uuid: first.UUID}}},
	}
	for _, call := range calls { // all sent before any reply is read
		if err := s.Send(call); err != nil {
			t.Fatal(err)
		}
	}
	var reps []*vmlockpb.Reply
	for range calls {
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		reps = append(reps, r)
	}
	for i, r := range reps {
		if r.Id != calls[i].Id {
			t.Fatalf("reply %d has id %d, want %d", i, r.Id, calls[i].Id)
		}
	}
	if reps[0].Error != nil || reps[0].GetStatus().GetPid() != int64(os.Getpid()) {
		t.Fatalf("status reply %+v", reps[0])
	}
	var be *lockmgr.BusyError
	if err := sessionErr(reps[1]); !errors.As(err, &be) || be.Holder.Name != "first" || be.Holder.PID != pid {
		t.Fatalf("busy acquire: %v, want a busy error naming the first holder", err)
	}
	if reps[2].Error == nil || codes.Code(reps[2].Error.Code) != codes.Unimplemented {
		t.Fatalf("call without a method: %+v, want Unimplemented", reps[2])
	}
	if err := sessionErr(reps[3]); err != nil || reps[3].GetState().GetState() == "" {
		t.Fatalf("inquire: %+v %v", reps[3], err)
	}
	// The refused acquire registered nothing.
	if _, err := c.Inquire(ctx, second.UUID); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("the refused object: %v, want not registered", err)
	}
}

// openSession opens a Session stream on the daemon at sock.
func openSession(t *testing.T, sock string) grpc.BidiStreamingClient[vmlockpb.Call, vmlockpb.Reply] {
	t.Helper()
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := c.RPC().Session(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A stop ends an idle session at once, with status OK: Recv sees EOF
// instead of the graceful stop waiting out the request timeout.
func TestStopEndsAnIdleSessionBetweenCalls(t *testing.T) {
	sock, stop := runInProcess(t, Config{RequestTimeout: time.Minute})
	s := openSession(t, sock)
	if err := s.Send(&vmlockpb.Call{Id: 1, Method: &vmlockpb.Call_Status{Status: &vmlockpb.StatusRequest{}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Recv(); err != nil || r.Id != 1 {
		t.Fatalf("first call: %+v %v", r, err)
	}
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after the stop: %v, want EOF (the session ended between calls)", err)
	}
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not stop with a session open")
	}
}

// A stop while a session's call is in progress waits for that call: its
// reply comes first, and only then does the session end (EOF), so the
// client never sees a call that was run go unanswered.
func TestStopAnswersTheSessionCallInProgressBeforeEndingTheSession(t *testing.T) {
	drv := &hangingDriver{release: make(chan struct{}), entered: make(chan struct{})}
	d, sock, stop := serveInProcess(t, Config{Driver: drv, RequestTimeout: time.Minute})
	s := openSession(t, sock)
	o := lockmgr.Object{UUID: "66666666-0000-4000-8000-000000000002", PID: sleeper(t)}
	disk := lockmgr.DiskResource(filepath.Join(t.TempDir(), "hang.img"), lockmgr.Exclusive)
	if err := s.Send(&vmlockpb.Call{Id: 1, Method: &vmlockpb.Call_Acquire{Acquire: &vmlockpb.AcquireRequest{
		Object: api.ObjectToPB(o), Resources: []*vmlockpb.Resource{api.ResourceToPB(disk)}}}}); err != nil {
		t.Fatal(err)
	}
	<-drv.entered
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	<-d.stopping
	type recvd struct {
		r   *vmlockpb.Reply
		err error
	}
	first := make(chan recvd, 1)
	go func() { r, err := s.Recv(); first <- recvd{r, err} }()
	// Neither the session nor the stop may end while the call runs. (A
	// while is given for a wrong one to show; a right one waits forever.)
	select {
	case <-stopped:
		t.Fatal("the stop finished while a session call was in progress")
	case got := <-first:
		t.Fatalf("while its call was in progress, the session gave %+v %v", got.r, got.err)
	case <-time.After(200 * time.Millisecond):
	}
	close(drv.release)
	got := <-first
	if got.err != nil || got.r.Id != 1 || sessionErr(got.r) != nil {
		t.Fatalf("the call in progress at the stop: %+v %v, want its reply (granted)", got.r, got.err)
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after the answered call: %v, want EOF", err)
	}
	<-stopped
}

// One Client used by many goroutines at once: one of them has the session,
// the others make unary calls, and every call gets its own answer.
func TestClientIsSafeForConcurrentCalls(t *testing.T) {
	c, dir := startInProcess(t)
	pid := sleeper(t)
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := lockmgr.Object{UUID: "55555555-0000-4000-8000-00000000000" + string(rune('0'+g)), PID: pid}
			disk := filepath.Join(dir, o.UUID+".img")
			os.WriteFile(disk, nil, 0o600)
			rs := []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}
			for range 50 {
				st, err := c.Acquire(context.Background(), o, rs, "")
				if err == nil {
					var rel string
					if rel, err = c.Release(context.Background(), o.UUID); err == nil && rel != st {
						err = errors.New("release returned " + rel + ", acquire " + st)
					}
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
}

// A call whose deadline passes while the daemon works gives a timeout; the
// next call on the same Client opens a new session and succeeds.
func TestDeadlineDuringASessionCall(t *testing.T) {
	drv := &hangingDriver{release: make(chan struct{})}
	c, dir := startInProcess(t, Config{Driver: drv, RequestTimeout: time.Minute})
	pid := sleeper(t)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := c.Acquire(ctx, lockmgr.Object{UUID: "66666666-0000-4000-8000-000000000001", PID: pid},
		[]lockmgr.Resource{lockmgr.DiskResource(filepath.Join(dir, "hang.img"), lockmgr.Exclusive)}, "")
	close(drv.release)
	if !errors.Is(err, lockmgr.ErrTimeout) {
		t.Fatalf("hung acquire: %v, want a timeout", err)
	}
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatalf("the next call: %v", err)
	}
}
