package etcdlock

import (
	"context"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/lockmgr"
)

// fastCluster starts one member with short ticks, for unit tests.
func fastCluster(t *testing.T) *etcdtest.Cluster {
	t.Helper()
	return startCluster(t, etcdtest.Options{Members: 1, TickMs: 10, ElectionMs: 100, NoFsync: true})
}

func startCluster(t *testing.T, opt etcdtest.Options) *etcdtest.Cluster {
	t.Helper()
	opt.Dir = t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := etcdtest.Start(ctx, opt)
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

func testLogger() *slog.Logger {
	if os.Getenv("VMLOCK_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func hostConfig(endpoints []string, host string) Config {
	return Config{Endpoints: endpoints, Host: host, Logger: testLogger().With("test_host", host), OpTimeout: 3 * time.Second}
}

func newDriver(t *testing.T, cfg Config) *Driver {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d, err := New(ctx, cfg)
	if err != nil {
		t.Fatalf("New(%s): %v", cfg.Host, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// rawClient is a plain etcd client for looking at keys behind the driver.
func rawClient(t *testing.T, endpoints []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

const (
	uuidA = "11111111-1111-1111-1111-111111111111"
	uuidB = "22222222-2222-2222-2222-222222222222"
	uuidC = "33333333-3333-3333-3333-333333333333"
)

func req(path string, m lockmgr.Mode, uuid string) lockmgr.Request {
	return lockmgr.Request{Resource: lockmgr.DiskResource(path, m), Holder: lockmgr.Holder{Name: "vm-" + uuid[:4], UUID: uuid, PID: 4242}}
}

func mustAcquire(t *testing.T, d *Driver, reqs ...lockmgr.Request) []lockmgr.Lease {
	t.Helper()
	ls, err := d.Acquire(ctxT(t, 5*time.Second), reqs)
	if err != nil {
		t.Fatalf("%s: acquire: %v", d.cfg.Host, err)
	}
	if len(ls) != len(reqs) {
		t.Fatalf("%s: acquire returned %d leases for %d requests", d.cfg.Host, len(ls), len(reqs))
	}
	return ls
}

func mustRelease(t *testing.T, d *Driver, ls ...lockmgr.Lease) {
	t.Helper()
	if err := d.Release(ctxT(t, 5*time.Second), ls); err != nil {
		t.Fatalf("%s: release: %v", d.cfg.Host, err)
	}
}

// wantBusy checks that err is a busy error for path naming a holder on host
// with uuid.
func wantBusy(t *testing.T, err error, path, host, uuid string, mode lockmgr.Mode) {
	t.Helper()
	be, ok := err.(*lockmgr.BusyError)
	if !ok {
		t.Fatalf("want *lockmgr.BusyError for %s, got %T %v", path, err, err)
	}
	if be.Resource.Name != path || be.Holder.Host != host || be.Holder.UUID != uuid || be.Holder.Mode != mode || be.Holder.PID != 4242 {
		t.Fatalf("busy error names %+v on %s, want %s held %s by %s on %s", be.Holder, be.Resource.Name, path, mode, uuid, host)
	}
	if lockmgr.CodeOf(err) != lockmgr.CodeBusy {
		t.Fatalf("code of %v is %v", err, lockmgr.CodeOf(err))
	}
}

// eventually waits for cond, checking it every 20 ms, for at most limit.
func eventually(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
