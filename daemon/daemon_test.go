package daemon

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vmlock/vmlock/lockmgr"
)

// hangingDriver grants everything except resources whose name contains
// "hang", on which it blocks until released (after closing entered, if
// set, the first time).
type hangingDriver struct {
	lockmgr.NopDriver
	release chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (h *hangingDriver) Acquire(ctx context.Context, reqs []lockmgr.Request) ([]lockmgr.Lease, error) {
	for _, r := range reqs {
		if strings.Contains(r.Resource.Name, "hang") {
			if h.entered != nil {
				h.once.Do(func() { close(h.entered) })
			}
			<-h.release
		}
	}
	return h.NopDriver.Acquire(ctx, reqs)
}

func sleeper(t *testing.T) int {
	t.Helper()
	c := exec.Command("sleep", "300")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c.Process.Pid
}

func TestHungDriverCallTimesOutAndDoesNotStallOthers(t *testing.T) {
	drv := &hangingDriver{release: make(chan struct{})}
	defer close(drv.release)
	c, dir := startInProcess(t, Config{Driver: drv, RequestTimeout: 300 * time.Millisecond})
	pid := sleeper(t)
	hung := make(chan error, 1)
	go func() {
		_, err := c.Acquire(context.Background(), lockmgr.Object{UUID: "11111111-0000-4000-8000-000000000001", PID: pid},
			[]lockmgr.Resource{lockmgr.DiskResource(filepath.Join(dir, "hang.img"), lockmgr.Exclusive)}, "")
		hung <- err
	}()
	// While that call hangs in the driver, others are served.
	for i := range 5 {
		o := lockmgr.Object{UUID: "22222222-0000-4000-8000-00000000000" + string(rune('0'+i)), PID: pid}
		if _, err := c.Acquire(context.Background(), o, []lockmgr.Resource{lockmgr.DiskResource(filepath.Join(dir, "ok.img"), lockmgr.Shared)}, ""); err != nil {
			t.Fatalf("acquire while another call hangs: %v", err)
		}
	}
	if err := <-hung; !errors.Is(err, lockmgr.ErrTimeout) {
		t.Fatalf("the hung call returned %v, want a timeout", err)
	}
	// The timed-out object was not left registered.
	if _, err := c.Inquire(context.Background(), "11111111-0000-4000-8000-000000000001"); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("inquire of the timed-out object: %v, want not registered", err)
	}
}

func TestMetricsCountAcquiresAndBusyRefusals(t *testing.T) {
	m := NewMetrics()
	c, dir := startInProcess(t, Config{Metrics: m})
	pid := sleeper(t)
	disk := filepath.Join(dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	rs := []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}
	if _, err := c.Acquire(context.Background(), lockmgr.Object{UUID: "33333333-0000-4000-8000-000000000001", PID: pid}, rs, ""); err != nil {
		t.Fatal(err)
	}
	_, err := c.Acquire(context.Background(), lockmgr.Object{UUID: "33333333-0000-4000-8000-000000000002", PID: pid}, rs, "")
	var be *lockmgr.BusyError
	if !errors.As(err, &be) || be.Holder.UUID != "33333333-0000-4000-8000-000000000001" || be.Holder.PID != pid {
		t.Fatalf("second acquire = %v, want busy naming the first object", err)
	}
	if got := testutil.ToFloat64(m.busy); got != 1 {
		t.Errorf("busy refusals = %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.acquires.WithLabelValues("ok")); got != 1 {
		t.Errorf("ok acquires = %v, want 1", got)
	}
	n, err := testutil.GatherAndCount(m.Registry, "vmlock_locks_held", "vmlock_owners", "vmlock_request_duration_seconds")
	if err != nil || n < 3 {
		t.Fatalf("gathered %d series (%v), want the held, owners and latency metrics", n, err)
	}
}

func TestReadinessIsNotifiedToSystemd(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	var got []string
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 512)
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := conn.Read(buf)
		if err == nil {
			mu.Lock()
			got = append(got, string(buf[:n]))
			mu.Unlock()
		}
	}()
	startInProcess(t)
	<-done
	mu.Lock()
	defer mu.Unlock()
	if len(got) == 0 || !strings.Contains(got[0], "READY=1") {
		t.Fatalf("notify socket got %q, want READY=1", got)
	}
}
