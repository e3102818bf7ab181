package lockholder

import (
	"context"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// child starts a process that would live for a minute and returns it with
// a pidfd for it.
func child(t *testing.T) (*exec.Cmd, *os.File) {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	fd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	t.Cleanup(func() { f.Close() })
	return cmd, f
}

// waitKilled waits for cmd to exit and checks that SIGKILL ended it.
func waitKilled(t *testing.T, cmd *exec.Cmd, within time.Duration) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(within):
		t.Fatalf("pid %d still runs %s after its fence deadline", cmd.Process.Pid, within)
	}
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("pid %d ended with %v, want SIGKILL", cmd.Process.Pid, cmd.ProcessState)
	}
}

func alive(t *testing.T, cmd *exec.Cmd) bool {
	t.Helper()
	return cmd.Process.Signal(syscall.Signal(0)) == nil
}

// A deadline armed by a controller that then goes away (vmlockd crashed)
// kills the owners of the entries put with one, and only those.
func TestFenceDeadlineOutlivesTheController(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	owned, pidfd := child(t)
	other, _ := child(t)
	c := connect(t, dir)
	if err := c.PutOwned(context.Background(), "O/a/0", []byte("a"), pidfd, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(context.Background(), "O/b/0", []byte("b"), nil); err != nil {
		t.Fatal(err)
	}
	if err := c.FenceAt(context.Background(), time.Now().Add(200*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitKilled(t, owned, 10*time.Second)
	if !alive(t, other) {
		t.Fatal("a process no entry names as owner was killed")
	}
	// The entries stay for the next controller, the owner's pidfd with it.
	c2 := connect(t, dir)
	defer c2.Close()
	es, err := c2.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	owners := 0
	for i := range es {
		if es[i].Owner != nil {
			owners++
			if es[i].Key != "O/a/0" {
				t.Fatalf("entry %s came back with an owner", es[i].Key)
			}
		}
		es[i].Close()
	}
	if len(es) != 2 || owners != 1 {
		t.Fatalf("after the fence: %d entries, %d with an owner; want 2 and 1", len(es), owners)
	}
}

// Each newer deadline replaces the older one; the zero time disarms; a
// firing kills only the owners held at that moment, once.
func TestNewerDeadlinesPostponeTheFence(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	owned, pidfd := child(t)
	c := connect(t, dir)
	defer c.Close()
	if err := c.PutOwned(context.Background(), "O/a/0", nil, pidfd, nil); err != nil {
		t.Fatal(err)
	}
	// Renewals every 50 ms, each moving a 1 s deadline: no firing.
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if err := c.FenceAt(context.Background(), time.Now().Add(time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.FenceAt(context.Background(), time.Time{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1200 * time.Millisecond)
	if !alive(t, owned) {
		t.Fatal("the owner was killed although every deadline was replaced in time, or disarmed")
	}
	if err := c.FenceAt(context.Background(), time.Now()); err != nil {
		t.Fatal(err)
	}
	waitKilled(t, owned, 10*time.Second)
	// An owner put after the firing is not killed by it; the next deadline
	// that passes kills it.
	late, pidfd2 := child(t)
	if err := c.PutOwned(context.Background(), "O/b/0", nil, pidfd2, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.List(context.Background()); err != nil { // a round trip: the put was applied
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if !alive(t, late) {
		t.Fatal("an owner put after the firing was killed by it")
	}
	if err := c.FenceAt(context.Background(), time.Now().Add(50*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	waitKilled(t, late, 10*time.Second)
}
