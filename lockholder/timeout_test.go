package lockholder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serveEnv makes this test binary a lock-holder process (TestMain).
const serveEnv = "LOCKHOLDER_TEST_SERVE"

func TestMain(m *testing.M) {
	if dir := os.Getenv(reexecEnv); dir != "" {
		if err := reexecMain(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if dir := os.Getenv(serveEnv); dir != "" {
		if err := Serve(context.Background(), dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// hangGuard bounds a call that must not hang. It is no timing assertion:
// the calls it guards end within seconds.
const hangGuard = 30 * time.Second

// within runs f and fails the test if it has not returned after hangGuard.
func within[T any](t *testing.T, what string, f func() T) T {
	t.Helper()
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	select {
	case v := <-ch:
		return v
	case <-time.After(hangGuard):
		t.Fatalf("%s has not returned after %s: it hangs", what, hangGuard)
		panic("unreachable")
	}
}

// holderProcess is a real lock-holder process serving dir.
type holderProcess struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed when it has exited (cmd.ProcessState is set)
}

// startHolder starts this test binary as the lock-holder of dir, as
// vmlockd starts its own (Command: a session of its own), and connects to
// it. The process is killed when the test ends.
func startHolder(t *testing.T, dir string) (*holderProcess, *Client) {
	t.Helper()
	cmd := Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), serveEnv+"="+dir)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &holderProcess{cmd: cmd, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-p.exited
	})
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	c, err := Connect(ctx, dir, func() error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if c.PID() != cmd.Process.Pid {
		t.Fatalf("the client names pid %d as its holder, want %d", c.PID(), cmd.Process.Pid)
	}
	return p, c
}

func (p *holderProcess) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// fillUntilRefused puts records into a holder that does not read until a
// Put with a short deadline is refused, and returns how many got through
// and the refusal. (Only a full socket buffer makes a write wait.)
func fillUntilRefused(t *testing.T, c *Client) (int, error) {
	t.Helper()
	meta := make([]byte, 1024)
	for i := range 100000 {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := within(t, "a Put to a holder that does not read", func() error {
			return c.Put(ctx, fmt.Sprintf("O/%d/0", i), meta, nil)
		})
		cancel()
		if err != nil {
			return i, err
		}
	}
	t.Fatal("100000 records were taken by a holder that does not read")
	return 0, nil
}

// A holder that stops reading (here: SIGSTOP) does not block its
// controller for ever: the write that finds its socket buffer full fails
// at the call's deadline with a NotAnsweringError naming the holder, and
// the client is unusable from then on. The holder, once it runs again,
// serves a new connection and keeps every record that was taken.
func TestAWriteToAStoppedHolderFailsAtItsDeadlineNamingTheHolder(t *testing.T) {
	dir := t.TempDir()
	p, c := startHolder(t, dir)
	p.signal(t, syscall.SIGSTOP)
	taken, err := fillUntilRefused(t, c)
	var na *NotAnsweringError
	if !errors.As(err, &na) || na.PID != p.cmd.Process.Pid || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Put to a stopped holder = %v, want a NotAnsweringError for pid %d and the deadline", err, p.cmd.Process.Pid)
	}
	if want := fmt.Sprintf("the lock-holder (pid %d) did not answer within the deadline", na.PID); !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
	// Unusable: a later call fails at once with the same error, even
	// without a deadline of its own, and Alive says so.
	err = within(t, "a Put after the client gave up", func() error { return c.Put(context.Background(), "late", nil, nil) })
	if !errors.As(err, &na) {
		t.Fatalf("Put after the client gave up = %v, want the NotAnsweringError", err)
	}
	if c.Alive() {
		t.Fatal("Alive is true after the client gave up on its holder")
	}
	p.signal(t, syscall.SIGCONT)
	c.Close()
	c2 := connect(t, dir)
	defer c2.Close()
	var es []Entry
	err = within(t, "List from the holder running again", func() (err error) {
		es, err = c2.List(context.Background())
		return err
	})
	if len(es) != taken {
		t.Fatalf("the holder running again keeps %d entries, want the %d taken before it stopped (%v)", len(es), taken, err)
	}
}

// Cancelling the context of a write that waits for a holder that does not
// read ends it at once, with a NotAnsweringError for the cancellation.
func TestCancellingEndsABlockedWrite(t *testing.T) {
	c, _ := fullSocketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		time.Sleep(50 * time.Millisecond) // most likely waiting by then; either way it must end
		cancel()
	}()
	err := within(t, "a cancelled Put", func() error { return c.Put(ctx, "k", nil, nil) })
	var na *NotAnsweringError
	if !errors.As(err, &na) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Put = %v, want a NotAnsweringError for the cancellation", err)
	}
	if !strings.Contains(err.Error(), "did not answer before the call was cancelled") {
		t.Fatalf("error %q does not say that the call was cancelled", err)
	}
}

// A call that waits behind another call stuck on a holder that does not
// read gives up at its own deadline, not the other call's.
func TestACallQueuedBehindABlockedWriteGivesUpAtItsOwnDeadline(t *testing.T) {
	c, _ := fullSocketPair(t)
	first, cancelFirst := context.WithCancel(context.Background()) // no deadline: DefaultTimeout
	defer cancelFirst()
	firstDone := make(chan error, 1)
	go func() { firstDone <- c.Put(first, "first", nil, nil) }()
	for len(c.sem) == 0 { // until the first call has the connection
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := within(t, "a Put queued behind a blocked one", func() error { return c.Put(ctx, "second", nil, nil) })
	var na *NotAnsweringError
	if !errors.As(err, &na) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("queued Put = %v, want a NotAnsweringError for its deadline", err)
	}
	select {
	case err := <-firstDone:
		t.Fatalf("the first Put returned (%v) before the queued one gave up", err)
	default:
	}
	cancelFirst()
	within(t, "the first, cancelled Put", func() error { return <-firstDone })
}

// fullSocketPair returns a client of a socket pair whose other end never
// reads, with its socket buffer full, and the other end.
func fullSocketPair(t *testing.T) (*Client, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[1]) })
	msg := make([]byte, 1024)
	for {
		err := unix.Sendmsg(fds[0], msg, nil, nil, unix.MSG_DONTWAIT)
		if err == unix.EAGAIN {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	c, err := newClient(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, fds[1]
}

// Kill ends a holder that does not read, and with it the locks that only
// it kept, including those of descriptors still queued for it unread: a
// queued descriptor keeps its open file description, and so its lock,
// until the holder's socket goes. A new holder can then serve the
// directory.
func TestKillEndsAStoppedHolderAndWhatOnlyItKept(t *testing.T) {
	dir := t.TempDir()
	p, c := startHolder(t, dir)
	p.signal(t, syscall.SIGSTOP)
	path := dir + "/disk"
	f := lockedFile(t, path)
	if err := c.Put(context.Background(), "O/x/0", nil, []*os.File{f}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if free(t, path) {
		t.Fatal("the lock went away while its descriptor was queued for the holder")
	}
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	if err := c.Kill(ctx); err != nil {
		t.Fatalf("Kill of a stopped holder: %v", err)
	}
	if !exitedAlready(t, p.cmd.Process.Pid) {
		t.Fatal("Kill returned before the holder exited")
	}
	<-p.exited
	if ws := p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the holder ended with %v, want SIGKILL", p.cmd.ProcessState)
	}
	if !free(t, path) {
		t.Fatal("a lock only the killed holder kept is still held")
	}
	_, c2 := startHolder(t, dir)
	if es, err := c2.List(context.Background()); err != nil || len(es) != 0 {
		t.Fatalf("a new holder after the kill lists %v, %v; want nothing", es, err)
	}
}

// Open does not hang on a holder that does not answer (vmlockd starting
// while the previous one's holder is stopped): it fails at its deadline,
// naming the holder, and the holder keeps what it holds.
func TestOpenFailsAtItsDeadlineWithAStoppedHolder(t *testing.T) {
	dir := t.TempDir()
	p, c := startHolder(t, dir)
	if err := c.Put(context.Background(), "kept", nil, nil); err != nil {
		t.Fatal(err)
	}
	c.Close()
	p.signal(t, syscall.SIGSTOP)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := within(t, "Open with a stopped holder", func() error {
		_, _, err := Open(ctx, dir, func() error { return nil })
		return err
	})
	var na *NotAnsweringError
	if !errors.As(err, &na) || na.PID != p.cmd.Process.Pid {
		t.Fatalf("Open with a stopped holder = %v, want a NotAnsweringError for pid %d", err, p.cmd.Process.Pid)
	}
	p.signal(t, syscall.SIGCONT)
	c2 := connect(t, dir)
	defer c2.Close()
	var es []Entry
	err = within(t, "List from the holder running again", func() (err error) {
		es, err = c2.List(context.Background())
		return err
	})
	if err != nil || len(es) != 1 || es[0].Key != "kept" {
		t.Fatalf("the holder running again lists %v, %v; want its entry", es, err)
	}
}

// exitedAlready reports whether pid has exited: a zombie not reaped yet, or
// gone.
func exitedAlready(t *testing.T, pid int) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if errors.Is(err, os.ErrNotExist) {
		return true
	}
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(rest, "Z") || strings.HasPrefix(rest, "X")
}
