package daemon

import (
	"errors"
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// sleeperCmd is sleeper's process, for a test that ends it itself.
func sleeperCmd(t *testing.T) *exec.Cmd {
	t.Helper()
	c := exec.Command("sleep", "300")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c
}

// A process whose start time cannot be read (/proc unreadable) is not
// taken for gone while its pidfd says it runs; one that exited is.
func TestAnOwnerWhoseStartTimeCannotBeReadIsGoneOnlyIfItExited(t *testing.T) {
	unreadable := func(int) (uint64, error) { return 0, &os.PathError{Op: "open", Path: "/proc/N/stat", Err: unix.EACCES} }
	pin := func(pid int) *os.File {
		fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		return os.NewFile(uintptr(fd), "pidfd")
	}
	live := sleeperCmd(t).Process.Pid
	if _, err := pinned(pin(live), live, 1, unreadable); err == nil || errors.Is(err, errGone) || !errors.Is(err, unix.EACCES) {
		t.Fatalf("pinning a running process whose start time cannot be read = %v, want the read's error", err)
	}
	cmd := sleeperCmd(t)
	f := pin(cmd.Process.Pid)
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := pinned(f, cmd.Process.Pid, 1, unreadable); !errors.Is(err, errGone) {
		t.Fatalf("pinning an exited process whose start time cannot be read = %v, want gone", err)
	}
}
