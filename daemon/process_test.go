package daemon

import (
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// An owner that exits before the goroutine watching it first runs (on a
// busy host it may start late, after the runtime's poller has already seen
// and recorded the pidfd's readiness) is seen gone all the same. The watch
// used to wait for a readiness edge that had passed, so such an owner's
// locks were never released.
func TestAnOwnerThatExitedBeforeItsWatchStartedIsSeenGone(t *testing.T) {
	cmd := sleeperCmd(t)
	fd, err := unix.PidfdOpen(cmd.Process.Pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	p := &process{pid: cmd.Process.Pid, file: os.NewFile(uintptr(fd), "pidfd"), done: make(chan struct{})}
	defer p.file.Close()
	cmd.Process.Kill()
	cmd.Wait()
	// Let the poller take the exit's readiness before the watch starts.
	for range 10 {
		runtime.Gosched()
		time.Sleep(10 * time.Millisecond)
	}
	go p.wait()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the watch of a process that had exited never saw it go")
	}
	if !p.dead {
		t.Fatal("the watch ended without taking the exit for one")
	}
}
