package main

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/vmlock/vmlock/lockholder"
)

// TestMain lets serve start this test binary as its lock-holder.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "lock-holder" {
		cmd := newRootCmd()
		cmd.SetArgs(os.Args[1:])
		if err := cmd.Execute(); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// A metrics address something else listens on fails the start before
// vmlockd creates its socket or starts a lock-holder: nothing is left
// behind for the next start to trip on.
func TestABusyMetricsAddressFailsTheStartBeforeAnythingIsCreated(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0)) // serve sets it
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := t.TempDir()
	c := defaults()
	c.Socket = filepath.Join(dir, "vmlockd.sock")
	c.StateDir = filepath.Join(dir, "state")
	c.MetricsAddr = busy.Addr().String()
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	err = serve(c)
	if err == nil || !strings.Contains(err.Error(), "metrics_addr") || !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("serve with a busy metrics address: %v, want a metrics_addr error wrapping EADDRINUSE", err)
	}
	for _, p := range []string{c.Socket, filepath.Join(c.StateDir, lockholder.SocketName)} {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s exists after the failed start (%v)", p, err)
		}
	}
}
