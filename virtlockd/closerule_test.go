package virtlockd

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// ownerChild is a helper process (see childMain "owner") playing QEMU: it
// holds connection A, registered with its own pid and restricted.
type ownerChild struct {
	cmd   *exec.Cmd
	pid   int
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startOwnerChild starts the helper, whose connection registers the owner
// name; if earlier is not "", it registers that owner first.
func startOwnerChild(t *testing.T, ts *testServer, name string, earlier ...string) *ownerChild {
	t.Helper()
	o := owner(name, 0)
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), envChild+"=owner", envSocket+"="+ts.sock, envUUID+"="+hex.EncodeToString(o.UUID[:]))
	for _, e := range earlier {
		eo := owner(e, 0)
		cmd.Env = append(cmd.Env, envEarlier+"="+hex.EncodeToString(eo.UUID[:]))
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := &ownerChild{cmd: cmd, pid: cmd.Process.Pid, stdin: stdin, out: bufio.NewReader(stdout)}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	ch.expect(t, "ready")
	return ch
}

func (ch *ownerChild) expect(t *testing.T, line string) {
	t.Helper()
	got, err := ch.out.ReadString('\n')
	if strings.TrimSpace(got) != line {
		t.Fatalf("helper process said %q (%v), want %q", got, err, line)
	}
}

// acquireFor plays libvirtd's connection B: it registers the child's owner,
// acquires img, and closes; that close releases nothing.
func acquireFor(t *testing.T, ts *testServer, ch *ownerChild, name, img string) {
	t.Helper()
	b := ts.registered(name, ch.pid)
	wantOK(t, "acquire for the child", b.AcquireResource(testCtx(t), "", img, 0))
	b.Close()
	ts.waitClosed(os.Getpid())
	if got := ts.holders(diskKey(t, img)); !slices.Equal(got, []string{uuidOf(name)}) {
		t.Fatalf("after connection B closed: holders %v, want the child's owner (B's peer is not the owner)", got)
	}
}

// QEMU exits: its connection A closes, and every lock of its owner is
// released; it is not signalled (it is gone already).
func TestCloseRuleReleasesWhenOwnerExits(t *testing.T) {
	ts := startServer(t, Config{})
	img := image(t, "exit.img")
	ch := startOwnerChild(t, ts, "qemu-exit")
	acquireFor(t, ts, ch, "qemu-exit", img)

	ch.stdin.Close() // the helper exits normally
	if err := ch.cmd.Wait(); err != nil {
		t.Fatalf("helper process: %v", err)
	}
	cc := ts.waitClosed(ch.pid)
	if cc.owner == nil || int(cc.owner.PID) != ch.pid {
		t.Fatalf("closed connection's owner %+v, want pid %d", cc.owner, ch.pid)
	}
	if got := ts.holders(diskKey(t, img)); len(got) != 0 {
		t.Fatalf("holders after the owner exited: %v", got)
	}
	if _, err := ts.m.Object(uuidOf("qemu-exit")); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("the exited owner is still an object: %v", err)
	}
	next := ts.registered("next", fakePID)
	wantOK(t, "another domain takes the disk", next.AcquireResource(testCtx(t), "", img, 0))
}

// Connection A closes while QEMU still runs and holds locks: QEMU is
// killed, and its locks are released once it is gone.
func TestCloseRuleKillsLiveOwner(t *testing.T) {
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	heldAtKill := make(chan int, 1)
	ts := startServer(t, Config{Manager: m, Kill: func(_ context.Context, p *Peer) error {
		heldAtKill <- len(m.Locks())
		return p.Signal(syscall.SIGKILL) // the default
	}})
	img := image(t, "kill.img")
	ch := startOwnerChild(t, ts, "qemu-live")
	acquireFor(t, ts, ch, "qemu-live", img)

	if _, err := io.WriteString(ch.stdin, "close\n"); err != nil {
		t.Fatal(err)
	}
	// No waiting for its "closed": the kill may come first.
	ts.waitClosed(ch.pid)
	if got := ts.holders(diskKey(t, img)); len(got) != 0 {
		t.Fatalf("holders after the owner's connection closed: %v", got)
	}
	err := ch.cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("helper process: %v, want it killed", err)
	}
	if ws := ee.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("helper process ended with %v, want SIGKILL", ws)
	}
	if n := <-heldAtKill; n != 1 {
		t.Fatalf("%d locks held when the owner was killed, want 1: the lock is freed only once its holder is gone", n)
	}
}

// Connection A closes while QEMU runs but holds nothing (a paused domain):
// nothing to release, and QEMU is left alone.
func TestCloseRuleSparesOwnerWithoutLocks(t *testing.T) {
	ts := startServer(t, Config{})
	img := image(t, "paused.img")
	ch := startOwnerChild(t, ts, "qemu-paused")
	acquireFor(t, ts, ch, "qemu-paused", img)
	b := ts.registered("qemu-paused", ch.pid)
	wantOK(t, "pause releases", b.ReleaseResource(testCtx(t), "", img, 0))

	if _, err := io.WriteString(ch.stdin, "close\n"); err != nil {
		t.Fatal(err)
	}
	ch.expect(t, "closed")
	ts.waitClosed(ch.pid)
	if err := ch.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("an owner holding nothing was killed: %v", err)
	}
	ch.stdin.Close()
	if err := ch.cmd.Wait(); err != nil {
		t.Fatalf("helper process: %v", err)
	}
}

// A domain restarted with a new QEMU pid replaces its old owner if the old
// process is gone, and is refused while the old process still holds locks.
func TestStaleOwnerReplaced(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "restart.img")
	other := image(t, "other.img")

	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	old := ts.registered("dom", sleeper.Process.Pid)
	wantOK(t, "old owner acquires", old.AcquireResource(ctx, "", img, 0))
	newer := ts.registered("dom", fakePID)
	wantRemote(t, "new pid while the old one lives", newer.AcquireResource(ctx, "", other, 0), CodeResourceBusy, DomainLockspace,
		"registered with pid", "alive")

	sleeper.Process.Kill()
	sleeper.Wait()
	// The same disk the dead process held: its stale lock goes first.
	wantOK(t, "new pid once the old one is gone", newer.AcquireResource(ctx, "", img, 0))
	wantOK(t, "and another disk", newer.AcquireResource(ctx, "", other, 0))
	if got := ts.holders(diskKey(t, img)); !slices.Equal(got, []string{uuidOf("dom")}) {
		t.Fatalf("holders %v, want the restarted domain", got)
	}
	obj, err := ts.m.Object(uuidOf("dom"))
	if err != nil || obj.PID != fakePID {
		t.Fatalf("object %+v %v, want pid %d", obj, err, fakePID)
	}
}

// Only the daemon's own uid is served (SO_PEERCRED), as virtlockd does.
func TestPeerCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a helper process as another uid")
	}
	run := func(ts *testServer) int {
		t.Helper()
		dir := filepath.Dir(ts.sock)
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(ts.sock, 0o666); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), envChild+"=nobody", envSocket+"="+ts.sock)
		cmd.Stderr = os.Stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	}
	if code := run(startServer(t, Config{})); code != childRefused {
		t.Fatalf("uid 65534 against the default policy: helper exit %d, want %d (refused)", code, childRefused)
	}
	seen := make(chan int, 8)
	open := startServer(t, Config{Authorize: func(p *Peer) error { seen <- p.UID; return nil }})
	if code := run(open); code != childOK {
		t.Fatalf("uid 65534 with a policy that admits it: helper exit %d, want 0", code)
	}
	if uid := <-seen; uid != 65534 {
		t.Fatalf("Authorize saw uid %d, want 65534", uid)
	}
}

// The daemon's pid tracking may release an exited QEMU's locks before the
// close rule gets to them (both see the same exit): the close still removes
// the auto-created lease files whose last holder the owner was, and forgets
// its grants, as when the close rule releases them itself.
func TestCloseRuleAfterReleaseElsewhere(t *testing.T) {
	for _, when := range []string{"before the close", "while killing"} {
		t.Run(when, func(t *testing.T) {
			const name = "qemu-elsewhere"
			m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
			cfg := Config{Manager: m}
			if when == "while killing" {
				cfg.Kill = func(ctx context.Context, p *Peer) error {
					if err := m.Unregister(ctx, uuidOf(name)); err != nil {
						return err
					}
					return p.Signal(syscall.SIGKILL)
				}
			}
			ts := startServer(t, cfg)
			ctx := testCtx(t)
			dir := t.TempDir()
			lease := filepath.Join(dir, "lease")
			ch := startOwnerChild(t, ts, name)
			b := ts.registered(name, ch.pid)
			wantOK(t, "lockspace", b.CreateLockspace(ctx, dir))
			wantOK(t, "acquire", b.AcquireResource(ctx, dir, "lease", AcquireAutoCreate))
			b.Close()
			ts.waitClosed(os.Getpid())
			if _, err := os.Stat(lease); err != nil {
				t.Fatalf("auto-created lease file: %v", err)
			}

			if when == "before the close" {
				if err := m.Unregister(ctx, uuidOf(name)); err != nil {
					t.Fatal(err)
				}
				ch.stdin.Close() // the helper exits
			} else if _, err := io.WriteString(ch.stdin, "close\n"); err != nil {
				t.Fatal(err)
			}
			ts.waitClosed(ch.pid)
			ch.cmd.Wait()
			if _, err := os.Stat(lease); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("lease file after its only holder exited: %v, want it removed", err)
			}
			ts.s.mu.Lock()
			n := len(ts.s.grants)
			ts.s.mu.Unlock()
			if n != 0 {
				t.Fatalf("%d grant records left after the only holder exited", n)
			}
		})
	}
}

// Connection A registered a first owner and then a second one of the same
// pid (the second REGISTER overwrites the first). When it closes while
// QEMU runs, the locks of the pid are released, whichever of its owners
// took them, and QEMU is killed, as virtlockd (whose locks belong to pids)
// does.
func TestCloseRuleAfterASecondRegisterCoversTheFirstOwnersLocks(t *testing.T) {
	ts := startServer(t, Config{})
	img := image(t, "reregistered.img")
	ch := startOwnerChild(t, ts, "qemu-second", "qemu-first")
	acquireFor(t, ts, ch, "qemu-first", img)

	if _, err := io.WriteString(ch.stdin, "close\n"); err != nil {
		t.Fatal(err)
	}
	ts.waitClosed(ch.pid)
	if got := ts.holders(diskKey(t, img)); len(got) != 0 {
		t.Fatalf("holders after the owner's connection closed: %v", got)
	}
	err := ch.cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("helper process: %v, want it killed", err)
	}
	if ws := ee.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("helper process ended with %v, want SIGKILL", ws)
	}
	for _, name := range []string{"qemu-first", "qemu-second"} {
		if _, err := ts.m.Object(uuidOf(name)); !errors.Is(err, lockmgr.ErrNotRegistered) {
			t.Errorf("owner %s is still an object: %v", name, err)
		}
	}
}
