package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

func TestSecondRunOnOneDiskIsRefusedNamingTheHolder(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.qcow2")
	first := d.startRun("web1", "--disk", disk)

	r := d.vmlock("run", "--name", "web2", "--disk", disk, "--", "true")
	if r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("second run: exit %d (stderr %q), want %d (busy)", r.code, r.stderr, lockmgr.CodeBusy)
	}
	mustContain(t, "busy message", r.stderr, "disk "+disk+" is locked exclusively", `vm "web1"`, fmt.Sprintf("pid %d", first.Process.Pid), " since ")

	// Another spelling of the same file is the same lock.
	link := filepath.Join(t.TempDir(), "link.qcow2")
	if err := os.Symlink(disk, link); err != nil {
		t.Fatal(err)
	}
	if r := d.vmlock("run", "--disk", link, "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("run through a symlink: exit %d, want busy", r.code)
	}
	// Shared and read-only uses of an exclusively held disk: shared is
	// refused, read-only is recorded and runs.
	if r := d.vmlock("run", "--disk", disk+":shared", "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("shared run against an exclusive holder: exit %d, want busy", r.code)
	}
	if r := d.vmlock("run", "--disk", disk+":readonly", "--", "sh", "-c", "exit 5"); r.code != 5 {
		t.Fatalf("read-only run: exit %d (%s), want the command's own status 5", r.code, r.stderr)
	}
}

func TestRunExitsWithTheCommandsStatusAndReleases(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	if r := d.vmlock("run", "--disk", disk, "--", "sh", "-c", "exit 9"); r.code != 9 {
		t.Fatalf("run: exit %d (%s), want 9", r.code, r.stderr)
	}
	d.waitFree(disk, 10*time.Second)
	if r := d.vmlock("run", "--disk", disk, "--", "/nonexistent/cmd"); r.code != int(lockmgr.CodeInvalidArgument) {
		t.Fatalf("run of a missing command: exit %d, want 2", r.code)
	}
}

// A command that exists but that the kernel cannot execute fails after the
// locks were taken: vmlock exits 126, like a shell, and gives them back.
func TestRunOfACommandThatCannotBeExecutedExits126AndReleases(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	notExecutable := filepath.Join(t.TempDir(), "garbage")
	if err := os.WriteFile(notExecutable, []byte("\x00\x01 not a program\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := d.vmlock("run", "--disk", disk, "--", notExecutable)
	if r.code != 126 {
		t.Fatalf("run of a file that is not a program: exit %d (stderr %q), want 126", r.code, r.stderr)
	}
	mustContain(t, "exec failure", r.stderr, "cannot execute "+notExecutable, "exec format error")
	if ls := d.locks(); len(ls) != 0 {
		t.Fatalf("after the failed exec, vmlockd still holds %v", ls)
	}
	if !probeFree(t, disk) {
		t.Fatal("the disk is still locked after the failed exec")
	}
}

func TestKill9OfTheHolderFreesItsLock(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	holder := d.startRun("web1", "--disk", disk)
	if probeFree(t, disk) {
		t.Fatal("the disk is not locked while its holder runs")
	}
	holder.Process.Kill()
	took := d.waitFree(disk, 10*time.Second)
	t.Logf("lock freed %v after kill -9 of the holder", took)
	if r := d.vmlock("run", "--disk", disk, "--", "true"); r.code != 0 {
		t.Fatalf("run after the holder died: exit %d: %s", r.code, r.stderr)
	}
}

func TestStopOrCrashOfVmlockdKeepsEveryLock(t *testing.T) {
	for _, how := range []string{"SIGKILL", "SIGTERM"} {
		t.Run(how, func(t *testing.T) { testDownKeepsLocks(t, how) })
	}
}

func testDownKeepsLocks(t *testing.T, how string) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	shared := image(t, "s.img")
	holder := d.startRun("web1", "--disk", disk, "--disk", shared+":shared")

	if how == "SIGKILL" {
		d.kill9()
	} else {
		d.stop()
	}
	// A stop syncs what the driver wrote and says so, so that state strings
	// survive a crash of the host that follows; a crash of vmlockd does not.
	want := map[string]string{"SIGKILL": " running\n", "SIGTERM": " clean\n"}[how]
	if b, err := os.ReadFile(filepath.Join(d.stateDir, "boot")); err != nil || !strings.HasSuffix(string(b), want) {
		t.Fatalf("the state directory's boot record after %s: %q (%v), want it to end with %q", how, b, err, want)
	}
	// While vmlockd is down, nobody can take the disk.
	for i := 0; i < 20; i++ {
		if probeFree(t, disk) {
			t.Fatal("an OFD write lock on the disk succeeded while vmlockd was down")
		}
		time.Sleep(5 * time.Millisecond)
	}
	d.start()
	var found bool
	for _, l := range d.locks() {
		if l.Resource.Name == disk && len(l.Holders) == 1 && l.Holders[0].PID == holder.Process.Pid && l.Holders[0].Name == "web1" {
			found = true
		}
	}
	if !found {
		t.Fatalf("after restart, vmlock locks does not show web1 holding %s: %+v", disk, d.locks())
	}
	if r := d.vmlock("run", "--disk", disk, "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("run after restart: exit %d, want busy", r.code)
	}
	// The restarted daemon still watches the owner.
	holder.Process.Kill()
	d.waitFree(disk, 10*time.Second)
	d.waitFree(shared, 10*time.Second)
}

func TestOwnerThatExitsWhileVmlockdIsDownIsReleasedOnRestart(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	holder := d.startRun("web1", "--disk", disk)
	d.kill9()
	holder.Process.Kill()
	holder.Wait()
	if probeFree(t, disk) {
		t.Fatal("the lock-holder dropped the lock before vmlockd came back")
	}
	d.start()
	d.waitFree(disk, 10*time.Second)
}

func TestSecondDaemonOnTheSameStateDirRefusesToStart(t *testing.T) {
	d := startDaemon(t)
	out, err := exec.Command(bins.vmlockd, "--socket", filepath.Join(d.dir, "other.sock"), "--state-dir", d.stateDir).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("second vmlockd: %v, want a failure", err)
	}
	mustContain(t, "second vmlockd's message", string(out), "another vmlockd (pid", "is running on state directory "+d.stateDir)
}

func TestReloadUnderLoadLosesNoLockAndFailsNoRequest(t *testing.T) {
	d := startDaemon(t)
	kept := image(t, "kept.img")
	d.startRun("kept", "--disk", kept)

	const clients = 8
	var failures atomic.Int64
	var pairs atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		owner := exec.Command("sleep", "300")
		if err := owner.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
		disk := image(t, fmt.Sprintf("d%d.img", i))
		c := d.client()
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := lockmgr.Object{UUID: fmt.Sprintf("00000000-0000-0000-0000-%012d", i), Name: fmt.Sprintf("load%d", i), PID: owner.Process.Pid}
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				_, err := c.Acquire(ctx, o, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, "")
				if err == nil {
					_, err = c.Release(ctx, o.UUID)
				}
				cancel()
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					return
				}
				pairs.Add(1)
			}
		}()
	}
	for range 3 {
		time.Sleep(150 * time.Millisecond)
		if r := d.vmlock("daemon", "reload"); r.code != 0 {
			t.Fatalf("reload: exit %d: %s", r.code, r.stderr)
		}
		if probeFree(t, kept) {
			t.Fatal("a reload dropped a held lock")
		}
	}
	time.Sleep(150 * time.Millisecond)
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d requests failed during reloads; first: %v", n, firstErr.Load())
	}
	if pairs.Load() == 0 {
		t.Fatal("the load made no progress")
	}
	t.Logf("%d acquire+release pairs across 3 reloads, none failed", pairs.Load())
	var keptHeld bool
	for _, l := range d.locks() {
		if l.Resource.Name == kept {
			keptHeld = true
		}
	}
	if !keptHeld {
		t.Fatal("the kept lock is missing from vmlock locks after the reloads")
	}
	st, err := d.client().Status(context.Background())
	if err != nil || st.Reloads != 3 {
		t.Fatalf("status after 3 reloads: %v, %v", st, err)
	}
}

func TestRevokeKillsTheHolderAndFreesTheLock(t *testing.T) {
	cases := []struct {
		name    string
		command []string
	}{
		{"holder that obeys SIGTERM", []string{"sleep", "300"}},
		{"holder that ignores SIGTERM gets SIGKILL", []string{"sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := startDaemon(t)
			disk := image(t, "a.img")
			args := append([]string{"--socket", d.socket, "run", "--name", "victim", "--disk", disk, "--"}, c.command...)
			holder := exec.Command(bins.vmlock, args...)
			if err := holder.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
			for probeFree(t, disk) {
				time.Sleep(5 * time.Millisecond)
			}
			time.Sleep(50 * time.Millisecond) // let sh install its trap
			r := d.vmlock("revoke", disk, "--grace", "300ms")
			if r.code != 0 {
				t.Fatalf("revoke: exit %d: %s", r.code, r.stderr)
			}
			mustContain(t, "revoke output", r.stdout, fmt.Sprint(holder.Process.Pid))
			err := holder.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signaled() == false {
				t.Fatalf("holder: %v, want killed by a signal", err)
			}
			// Revoke answered only once the lock was free.
			if !probeFree(t, disk) {
				t.Fatal("the disk is still locked after revoke returned")
			}
		})
	}
}

func TestRevokeRunsTheConfiguredKillCommand(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "killed-by-command")
	conf := filepath.Join(dir, "vmlockd.toml")
	// The kill command records its arguments, then kills the holder itself.
	os.WriteFile(conf, []byte(fmt.Sprintf(`[revoke]
grace = "5s"
kill_command = ["sh", "-c", "echo $0 $1 > %s; kill -KILL $0", "{pid}", "{name}"]
`, marker)), 0o644)
	d := startDaemon(t, "--config", conf)
	disk := image(t, "a.img")
	holder := d.startRun("victim", "--disk", disk)
	if r := d.vmlock("revoke", disk); r.code != 0 {
		t.Fatalf("revoke: exit %d: %s", r.code, r.stderr)
	}
	b, err := os.ReadFile(marker)
	if err != nil {
		t.Fatalf("the kill command did not run: %v", err)
	}
	if got, want := strings.TrimSpace(string(b)), fmt.Sprintf("%d victim", holder.Process.Pid); got != want {
		t.Fatalf("kill command got %q, want %q", got, want)
	}
	if !probeFree(t, disk) {
		t.Fatal("the disk is still locked after revoke returned")
	}
}

// A user whom the socket's mode shuts out is told that it lacks the
// permission (exit 5), not that vmlockd is not running.
func TestAUserOutsideTheSocketGroupIsToldItLacksPermission(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	d := startDaemon(t) // no socket_group: the socket is root's alone
	r := d.vmlockAs(&syscall.Credential{Uid: 65534, Gid: 65534}, "status")
	if r.code != int(lockmgr.CodePermission) || !strings.Contains(r.stderr, "socket_group") {
		t.Fatalf("status as nobody: exit %d (%s), want %d saying to join socket_group", r.code, r.stderr, lockmgr.CodePermission)
	}
}

func TestNonRootClientCannotTouchAnotherUidsLocks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	d := startDaemon(t, "--socket-group", "65534")
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	disk := image(t, "a.img")
	holder := d.startRun("root-vm", "--disk", disk)
	var uuid string
	for _, l := range d.locks() {
		for _, h := range l.Holders {
			if h.PID == holder.Process.Pid {
				uuid = h.UUID
			}
		}
	}
	r := d.vmlockAs(nobody, "release", "--uuid", uuid)
	if r.code != int(lockmgr.CodePermission) {
		t.Fatalf("nobody releasing root's object: exit %d (%s), want %d", r.code, r.stderr, lockmgr.CodePermission)
	}
	if r := d.vmlockAs(nobody, "revoke", disk); r.code != int(lockmgr.CodePermission) {
		t.Fatalf("nobody revoking root's lock: exit %d (%s), want %d", r.code, r.stderr, lockmgr.CodePermission)
	}
	if probeFree(t, disk) {
		t.Fatal("a refused release freed the lock")
	}
	// nobody may not register a process it does not own either.
	if r := d.vmlockAs(nobody, "acquire", "--uuid", "12345678-1234-1234-1234-123456789abc", "--pid", fmt.Sprint(holder.Process.Pid), "--disk", image(t, "b.img")); r.code != int(lockmgr.CodePermission) {
		t.Fatalf("nobody registering root's process: exit %d (%s)", r.code, r.stderr)
	}
	// But it may lock for its own process, and root may release that.
	mine := exec.Command("sleep", "300")
	mine.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
	if err := mine.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mine.Process.Kill(); mine.Wait() })
	own := imageOf(t, "own.img", 65534)
	if r := d.vmlockAs(nobody, "acquire", "--uuid", "12345678-1234-1234-1234-123456789abd", "--pid", fmt.Sprint(mine.Process.Pid), "--disk", own); r.code != 0 {
		t.Fatalf("nobody locking for its own process: exit %d (%s)", r.code, r.stderr)
	}
	if r := d.vmlock("release", "--uuid", "12345678-1234-1234-1234-123456789abd"); r.code != 0 {
		t.Fatalf("root releasing nobody's object: exit %d (%s)", r.code, r.stderr)
	}
	// A uid outside the socket group is refused outright.
	if r := d.vmlockAs(&syscall.Credential{Uid: 4242, Gid: 4242}, "status"); r.code != int(lockmgr.CodePermission) && !strings.Contains(r.stderr, "permission denied") {
		t.Fatalf("uid outside the group: exit %d (%s), want a refusal", r.code, r.stderr)
	}
	// A member by a supplementary group is admitted.
	if r := d.vmlockAs(&syscall.Credential{Uid: 4242, Gid: 4242, Groups: []uint32{65534}}, "status"); r.code != 0 {
		t.Fatalf("uid in the group by a supplementary group: exit %d (%s), want 0", r.code, r.stderr)
	}
}

// vmlockd is root, its socket group's members are not: it locks for them
// only what they could open themselves, so that none of them can have root
// open (or lock) a file of the host they have no access to.
func TestNonRootClientLocksOnlyFilesItCouldOpen(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	d := startDaemon(t, "--socket-group", "65534")
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	mine := exec.Command("sleep", "300")
	mine.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
	if err := mine.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mine.Process.Kill(); mine.Wait() })
	pid := fmt.Sprint(mine.Process.Pid)

	rootsOnly := imageOf(t, "shadow.img", 0) // 0600, root's
	r := d.vmlockAs(nobody, "acquire", "--uuid", "12345678-1234-1234-1234-123456789abe", "--pid", pid, "--disk", rootsOnly)
	if r.code != int(lockmgr.CodePermission) {
		t.Fatalf("nobody locking a file only root may open: exit %d (%s), want %d", r.code, r.stderr, lockmgr.CodePermission)
	}
	mustContain(t, "the refusal", r.stderr, "uid 65534 may not read and write "+rootsOnly)
	if !probeFree(t, rootsOnly) {
		t.Fatal("the refused file is locked")
	}
	if len(d.locks()) != 0 {
		t.Fatalf("a refused acquire left locks: %+v", d.locks())
	}
	// All or nothing: its own file is not locked either when another is refused.
	own := imageOf(t, "own.img", 65534)
	r = d.vmlockAs(nobody, "acquire", "--uuid", "12345678-1234-1234-1234-123456789abe", "--pid", pid, "--disk", own, "--disk", rootsOnly)
	if r.code != int(lockmgr.CodePermission) || !probeFree(t, own) {
		t.Fatalf("nobody locking its own file and root's: exit %d (%s), own file free %v", r.code, r.stderr, probeFree(t, own))
	}
	// Root may lock it, for root's process.
	holder := d.startRun("root-vm", "--disk", rootsOnly)
	if probeFree(t, rootsOnly) {
		t.Fatalf("root's run (pid %d) did not lock %s", holder.Process.Pid, rootsOnly)
	}
}

// imageOf is image, owned by uid with mode 0600, in a directory anybody may
// search.
func imageOf(t *testing.T, name string, uid int) string {
	t.Helper()
	p := image(t, name)
	for _, dir := range []string{filepath.Dir(filepath.Dir(p)), filepath.Dir(p)} { // t.TempDir makes both 0700
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(p, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, uid, uid); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestGarbageAndVanishingClientsLeaveTheDaemonServing(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	d.startRun("web1", "--disk", disk)
	payloads := [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		make([]byte, 1<<16), // zeros
		[]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00"), // a preface, then a cut frame
		{0xff, 0xfe, 0xfd},
	}
	for _, p := range payloads {
		c, err := net.Dial("unix", d.socket)
		if err != nil {
			t.Fatal(err)
		}
		c.Write(p)
		c.Close()
	}
	// A client that vanishes in the middle of a call.
	for range 5 {
		ctx, cancel := context.WithCancel(context.Background())
		c := d.client()
		go func() { time.Sleep(time.Millisecond); cancel() }()
		c.Acquire(ctx, lockmgr.Object{UUID: "99999999-0000-0000-0000-000000000000", PID: os.Getpid()}, []lockmgr.Resource{lockmgr.DiskResource(image(t, "v.img"), lockmgr.Exclusive)}, "")
		c.Close()
	}
	if r := d.vmlock("status"); r.code != 0 {
		t.Fatalf("status after garbage: exit %d: %s", r.code, r.stderr)
	}
	if r := d.vmlock("run", "--disk", disk, "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("the held lock was disturbed by garbage: exit %d", r.code)
	}
}

func TestCLIUsageAndStateRoundTrip(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	owner := exec.Command("sleep", "300")
	owner.Start()
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	pid := fmt.Sprint(owner.Process.Pid)
	const uuid = "abcdefab-0000-4000-8000-000000000001"
	for _, args := range [][]string{
		{"acquire", "--pid", pid, "--disk", disk},                                 // no uuid
		{"acquire", "--uuid", "nope", "--pid", pid, "--disk", disk},               // bad uuid
		{"acquire", "--uuid", uuid, "--pid", pid, "--lease", "../etc/passwd"},     // escape
		{"acquire", "--uuid", uuid, "--pid", pid, "--lease", "ls/.."},             // escape
		{"acquire", "--uuid", uuid, "--pid", pid, "--disk", disk, "--state", "x"}, // bad state
		{"locks", "--sort", "bogus"},
		{"acquire", "--bogus-flag"},
		{"locks", "-o", "yaml"},
	} {
		if r := d.vmlock(args...); r.code != int(lockmgr.CodeInvalidArgument) {
			t.Errorf("vmlock %v: exit %d (%s), want 2", args, r.code, r.stderr)
		}
	}
	if len(d.locks()) != 0 {
		t.Fatal("a refused call left a lock behind")
	}
	r := d.vmlock("acquire", "--uuid", uuid, "--name", "vm", "--pid", pid, "--disk", disk)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "v1:disk:exclusive:") {
		t.Fatalf("acquire: %d %q %s", r.code, r.stdout, r.stderr)
	}
	inq := d.vmlock("inquire", "--uuid", uuid)
	if inq.stdout != r.stdout {
		t.Fatalf("inquire %q != acquire %q", inq.stdout, r.stdout)
	}
	rel := d.vmlock("release", "--uuid", uuid)
	if rel.code != 0 || rel.stdout != r.stdout {
		t.Fatalf("release: %d %q, want %q", rel.code, rel.stdout, r.stdout)
	}
	state := strings.TrimSpace(rel.stdout)
	// Re-acquire with the state: fine while nobody took the disk since.
	if r := d.vmlock("acquire", "--uuid", uuid, "--pid", pid, "--disk", disk, "--state", state); r.code != 0 {
		t.Fatalf("acquire with a current state: %d %s", r.code, r.stderr)
	}
	d.vmlock("release", "--uuid", uuid)
	// Someone else takes and releases it: the state is stale now.
	if r := d.vmlock("run", "--disk", disk, "--", "true"); r.code != 0 {
		t.Fatal(r.stderr)
	}
	d.waitFree(disk, 10*time.Second)
	if r := d.vmlock("acquire", "--uuid", uuid, "--pid", pid, "--disk", disk, "--state", state); r.code != int(lockmgr.CodeStaleState) {
		t.Fatalf("acquire with a stale state: exit %d (%s), want 4", r.code, r.stderr)
	}
	if !probeFree(t, disk) {
		t.Fatal("a stale acquire left the disk locked")
	}
	// Unplugging several disks, one of which is not held, releases none.
	other := image(t, "b.img")
	if r := d.vmlock("acquire", "--uuid", uuid, "--pid", pid, "--disk", disk, "--disk", other); r.code != 0 {
		t.Fatalf("acquire of two disks: %d %s", r.code, r.stderr)
	}
	r = d.vmlock("release", "--uuid", uuid, "--disk", disk, "--disk", image(t, "never.img"))
	if r.code != int(lockmgr.CodeNotHeld) || !strings.Contains(r.stderr, "nothing was released") {
		t.Fatalf("release of a held and an unheld disk: exit %d (%s), want 9", r.code, r.stderr)
	}
	if probeFree(t, disk) || probeFree(t, other) {
		t.Fatal("a refused release released a disk")
	}
	if r := d.vmlock("release", "--uuid", uuid, "--disk", disk); r.code != 0 || probeFree(t, other) || !probeFree(t, disk) {
		t.Fatalf("unplug of one disk: exit %d (%s)", r.code, r.stderr)
	}
}

func TestLockHolderKilledWhileVmlockdRunsIsReplaced(t *testing.T) {
	// How vmlockd finds out that its lock-holder died.
	cases := []struct {
		name  string
		after func(d *daemon, t *testing.T) // what happens between the holder's death and vmlockd's crash
	}{
		{"the next change", func(d *daemon, t *testing.T) { d.startRun("vm-b", "--disk", image(t, "b.img")) }},
		{"its periodic check, with no change", func(d *daemon, t *testing.T) {
			time.Sleep(2500 * time.Millisecond) // the check runs every second
		}},
		{"a reload right away", func(d *daemon, t *testing.T) {
			if r := d.vmlock("daemon", "reload"); r.code != 0 {
				t.Fatalf("reload: %d %s", r.code, r.stderr)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := startDaemon(t)
			a := image(t, "a.img")
			holderA := d.startRun("vm-a", "--disk", a)
			// The lock-holder dies: vmlockd still holds every lock itself...
			d.killHolder()
			if probeFree(t, a) {
				t.Fatal("a lock went away with the lock-holder while vmlockd runs")
			}
			// ...and starts a new holder and records everything again, so
			// that a crash of vmlockd now loses nothing.
			c.after(d, t)
			d.kill9()
			if probeFree(t, a) {
				t.Fatal("the lock was lost when vmlockd crashed after its lock-holder had died")
			}
			d.start()
			var held bool
			for _, l := range d.locks() {
				held = held || l.Resource.Name == a
			}
			if !held {
				t.Fatal("after restart vmlock locks does not show the disk")
			}
			holderA.Process.Kill()
			d.waitFree(a, 10*time.Second)
		})
	}
}

// An object's record in the lock-holder is split to fit its size limit:
// one with many long-named disks (20 paths of 4,000 bytes) keeps every lock
// through a crash of vmlockd, as any other does.
func TestAnObjectWithManyLongPathsKeepsItsLocksThroughACrash(t *testing.T) {
	d := startDaemon(t)
	disks, args := longPaths(t, 20)
	d.startRun("many-disks", args...)
	d.kill9()
	for _, p := range disks {
		if probeFree(t, p) {
			t.Fatalf("disk %s...%s was free while vmlockd was down", p[:40], p[len(p)-20:])
		}
	}
	d.start()
	if n := len(d.locks()); n != len(disks) {
		t.Fatalf("after the restart vmlock locks shows %d locks, want %d", n, len(disks))
	}
}

// longPaths creates n disk images whose paths are about 4,000 bytes long,
// and returns them with the --disk arguments that name them.
func longPaths(t *testing.T, n int) (disks, args []string) {
	t.Helper()
	dir := t.TempDir()
	for len(dir) < 3800 {
		dir = filepath.Join(dir, strings.Repeat("d", 200))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		p := filepath.Join(dir, fmt.Sprintf("%0100d.img", i))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		disks = append(disks, p)
		args = append(args, "--disk", p)
	}
	return disks, args
}
