package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// hierStream opens a raw hierarchical lock session on the daemon at sock.
func hierStream(t *testing.T, sock string) vmlockpb.HierLock_SessionClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///vmlockd",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s, err := vmlockpb.NewHierLockClient(conn).Session(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func hierAcquire(id uint64, level string, names ...string) *vmlockpb.SessionRequest {
	return &vmlockpb.SessionRequest{Id: id, Op: &vmlockpb.SessionRequest_Acquire{Acquire: &vmlockpb.HierAcquire{
		Levels: []*vmlockpb.LevelRequest{{Level: level, Names: names}}}}}
}

// A stop (or reload) ends every hierarchical lock session at once, with
// status OK, whether it holds locks or waits for them: the locks live in
// the daemon's memory, so the graceful stop must not wait out the request
// timeout for sessions that never end by themselves.
func TestStopEndsHierSessionsAtOnce(t *testing.T) {
	sock, stop := runInProcess(t, Config{RequestTimeout: time.Minute})
	holder, waiter := hierStream(t, sock), hierStream(t, sock)
	if err := holder.Send(hierAcquire(1, "instance", "web1")); err != nil {
		t.Fatal(err)
	}
	if r, err := holder.Recv(); err != nil || r.Code != 0 {
		t.Fatalf("holder's acquire: %+v %v", r, err)
	}
	if err := waiter.Send(hierAcquire(1, "instance", "web1")); err != nil {
		t.Fatal(err)
	}
	// The waiter is queued once the monitor shows it.
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for queued := false; !queued; {
		rep, err := c.HierMonitor(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range rep.Locks {
			queued = queued || (l.Name == "instance/web1" && len(l.Pending) == 1)
		}
		time.Sleep(time.Millisecond)
	}

	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }()
	if _, err := holder.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("the holding session after the stop: %v, want EOF (ended by the daemon)", err)
	}
	// The waiter's request ends (cancelled, or granted as the holder's
	// session released first; answered or not), then its session ends.
	_, err = waiter.Recv()
	if err == nil {
		_, err = waiter.Recv()
	}
	if !errors.Is(err, io.EOF) {
		t.Fatalf("the waiting session after the stop: %v, want EOF (ended by the daemon)", err)
	}
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not stop with hierarchical lock sessions open")
	}
}

// Each level is acquired in one call: a second request at a level the
// session holds is an order violation (invalid argument), whether the names
// it asks for exist already or would be created on first use.
func TestSecondAcquireAtAHeldLevelIsAnOrderViolation(t *testing.T) {
	sock, _ := runInProcess(t)
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	s, err := c.HierSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Acquire(ctx, &vmlockpb.HierAcquire{Levels: []*vmlockpb.LevelRequest{{Level: "instance", Names: []string{"a", "b"}}}}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"b", "new"} {
		_, err := s.Acquire(ctx, &vmlockpb.HierAcquire{Levels: []*vmlockpb.LevelRequest{{Level: "instance", Names: []string{name}}}})
		var le *lockmgr.Error
		if !errors.As(err, &le) || le.Code != lockmgr.CodeInvalidArgument || !strings.Contains(le.Msg, "each level is acquired in one call") {
			t.Errorf("second acquire of instance/%s: %v, want an order violation (each level in one call)", name, err)
		}
	}
	// Nothing was created by the refused request.
	rep, err := c.HierMonitor(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range rep.Locks {
		if l.Name == "instance/new" {
			t.Errorf("the refused request created %s", l.Name)
		}
	}
}

// Names created on first use go away once no session holds or waits for
// them, so a client that locks one name per job does not make the daemon
// (and `vmlock locks`) grow; a name added explicitly stays.
func TestHierNamesCreatedOnFirstUseGoAwayWhenReleased(t *testing.T) {
	sock, _ := runInProcess(t)
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	adder := hierStream(t, sock)
	for i, req := range []*vmlockpb.SessionRequest{
		hierAcquire(1, "cluster", "BGL"),
		{Id: 2, Op: &vmlockpb.SessionRequest_Add{Add: &vmlockpb.HierAdd{Level: "instance", Names: []string{"kept"}}}},
		{Id: 3, Op: &vmlockpb.SessionRequest_Release{Release: &vmlockpb.HierRelease{}}},
	} {
		if err := adder.Send(req); err != nil {
			t.Fatal(err)
		}
		if r, err := adder.Recv(); err != nil || r.Code != 0 {
			t.Fatalf("adder's request %d: %+v %v", i+1, r, err)
		}
	}

	s, err := c.HierSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range 200 {
		job := fmt.Sprintf("job%d", i)
		if _, err := s.Acquire(ctx, &vmlockpb.HierAcquire{Levels: []*vmlockpb.LevelRequest{
			{Level: "instance", Names: []string{job, "kept"}}, {Level: "node", Names: []string{"n-" + job}, Shared: true}}}); err != nil {
			t.Fatal(err)
		}
		if err := s.Release(ctx, ""); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := c.HierMonitor(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var members []string
	for _, l := range rep.Locks {
		if !strings.HasSuffix(l.Name, "/[lockset]") {
			members = append(members, l.Name)
		}
	}
	if want := []string{"cluster/BGL", "instance/kept"}; !slices.Equal(members, want) {
		t.Fatalf("the monitor lists %d locks (%v…), want %v", len(members), members[:min(len(members), 5)], want)
	}
}

// A timeout is a number of milliseconds: a negative one is refused as
// invalid before anything is acquired (it used to wait without end), and
// one too long to represent as a duration waits as long as it takes (it
// overflowed into a deadline in the past and failed at once).
func TestHierAcquireTimeoutBounds(t *testing.T) {
	sock, _ := runInProcess(t)
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	holder, waiter := hierStream(t, sock), hierStream(t, sock)
	if err := holder.Send(hierAcquire(1, "instance", "web1")); err != nil {
		t.Fatal(err)
	}
	if r, err := holder.Recv(); err != nil || r.Code != 0 {
		t.Fatalf("holder's acquire: %+v %v", r, err)
	}
	answers := make(chan *vmlockpb.SessionReply, 2)
	go func() {
		for {
			r, err := waiter.Recv()
			if err != nil {
				close(answers)
				return
			}
			answers <- r
		}
	}()
	// send sends the waiter's request and returns its answer, or nil once
	// the monitor shows the waiter queued for web1.
	send := func(req *vmlockpb.SessionRequest) *vmlockpb.SessionReply {
		t.Helper()
		if err := waiter.Send(req); err != nil {
			t.Fatal(err)
		}
		for {
			select {
			case r, ok := <-answers:
				if !ok {
					t.Fatal("the waiter's session ended")
				}
				return r
			default:
			}
			rep, err := c.HierMonitor(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, l := range rep.Locks {
				if l.Name == "instance/web1" && len(l.Pending) == 1 {
					return nil
				}
			}
			time.Sleep(time.Millisecond)
		}
	}

	neg := hierAcquire(1, "instance", "web1")
	neg.GetAcquire().TimeoutMs = -1
	r := send(neg)
	if r == nil {
		t.Fatal("acquire with timeout_ms -1 was queued, want it refused as invalid")
	}
	if lockmgr.Code(r.Code) != lockmgr.CodeInvalidArgument || !strings.Contains(r.Error, "timeout") {
		t.Fatalf("acquire with timeout_ms -1: code %d %q, want invalid argument about the timeout", r.Code, r.Error)
	}

	huge := hierAcquire(2, "instance", "web1")
	huge.GetAcquire().TimeoutMs = math.MaxInt64
	if r := send(huge); r != nil {
		t.Fatalf("acquire with timeout_ms MaxInt64 on a held lock: code %d %q, want it queued", r.Code, r.Error)
	}
	if err := holder.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if r := <-answers; r == nil || r.Code != 0 {
		t.Fatalf("acquire with timeout_ms MaxInt64 after the holder left: %+v, want granted", r)
	}
}
