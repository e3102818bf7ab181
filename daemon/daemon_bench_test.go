package daemon

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// startInProcess runs a daemon in this process with the lock-holder served
// by a goroutine (the real one is a process of its own; its protocol is the
// same). cfg's zero fields get test defaults: the lockspace driver, a
// socket and state directory in a temporary directory.
func startInProcess(tb testing.TB, cfgs ...Config) (*api.Client, string) {
	tb.Helper()
	sock, stop := runInProcess(tb, cfgs...)
	c, err := api.Dial(context.Background(), sock)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close(); stop() })
	return c, filepath.Dir(sock)
}

// runInProcess runs a daemon (and its lock-holder) in the test process and
// returns its socket, in the test's temporary directory, and a function
// that stops it gracefully and returns once Run has.
func runInProcess(tb testing.TB, cfgs ...Config) (socket string, stop func()) {
	tb.Helper()
	_, socket, stop = serveInProcess(tb, cfgs...)
	return socket, stop
}

// serveInProcess is runInProcess that also returns the daemon, for tests
// that look at its tables.
func serveInProcess(tb testing.TB, cfgs ...Config) (d *Daemon, socket string, stop func()) {
	tb.Helper()
	dir := tb.TempDir()
	state := filepath.Join(dir, "state")
	var cfg Config
	if len(cfgs) > 0 {
		cfg = cfgs[0]
	}
	if cfg.Driver == nil {
		drv, err := lockspace.New(lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces")})
		if err != nil {
			tb.Fatal(err)
		}
		cfg.Driver = drv
	}
	cfg.Socket, cfg.StateDir = filepath.Join(dir, "s.sock"), state
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg.HolderCommand = func() error { return nil }
	ctx, cancel := context.WithCancel(context.Background())
	os.MkdirAll(state, 0o700)
	go lockholder.Serve(ctx, state)
	d, err := New(ctx, cfg, nil)
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	tb.Cleanup(stop)
	// Serving, so that a test may call the daemon's methods directly.
	c, err := api.Dial(ctx, cfg.Socket)
	if err == nil {
		_, err = c.Status(ctx)
		c.Close()
	}
	if err != nil {
		tb.Fatal(err)
	}
	return d, cfg.Socket, stop
}

func BenchmarkAPIAcquireRelease(b *testing.B) {
	c, dir := startInProcess(b)
	owner := exec.Command("sleep", "600")
	if err := owner.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { owner.Process.Kill(); owner.Wait() }()
	disk := filepath.Join(dir, "a.img")
	os.WriteFile(disk, nil, 0o600)
	o := lockmgr.Object{UUID: "b0000000-0000-4000-8000-000000000001", PID: owner.Process.Pid}
	rs := []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Acquire(ctx, o, rs, ""); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Release(ctx, o.UUID); err != nil {
			b.Fatal(err)
		}
	}
}
