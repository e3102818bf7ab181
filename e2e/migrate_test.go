package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

// The migration handover, run against three vmlockd "hosts": src, dst and
// a third party. It is the same with the etcd driver and with the lockspace
// driver on a shared directory.

// handoverHost is one vmlockd and the host name it was started with.
type handoverHost struct {
	*daemon
	name string
}

func TestMigrationHandoverEtcd(t *testing.T) {
	c := startEtcd(t)
	hc := hostConfig{endpoints: c.Endpoints(), ttl: 3 * time.Second, margin: time.Second}
	var hs []handoverHost
	for _, n := range []string{"src", "dst", "other"} {
		hs = append(hs, handoverHost{startHost(t, n, hc).daemon, n})
	}
	testHandover(t, hs[0], hs[1], hs[2])
}

// Two vmlockd on one machine with their own state directories, sharing an
// indirect disk lease directory, are two hosts sharing an NFS lockspace.
func TestMigrationHandoverLockspaceSharedDir(t *testing.T) {
	shared := t.TempDir()
	os.Chmod(shared, 0o755)
	var hs []handoverHost
	for _, n := range []string{"src", "dst", "other"} {
		hs = append(hs, handoverHost{startDaemon(t, "--host", n, "--disk-lease-dir", filepath.Join(shared, "disks")), n})
	}
	testHandover(t, hs[0], hs[1], hs[2])
}

// holds reports the mode in which h's object uuid holds disk, and false if
// it does not hold it.
func holds(h handoverHost, uuid, disk string) (lockmgr.Mode, bool) {
	for _, l := range h.locks() {
		if l.Resource.Name != disk {
			continue
		}
		for _, x := range l.Holders {
			if x.UUID == uuid {
				return x.Mode, true
			}
		}
	}
	return 0, false
}

// tokenOf returns the token a state string gives disk.
func tokenOf(t *testing.T, state, disk string) uint64 {
	t.Helper()
	st, err := lockmgr.ParseState(strings.TrimSpace(state))
	if err != nil {
		t.Fatalf("state %q: %v", state, err)
	}
	for _, e := range st {
		if e.Resource.Name == disk {
			return e.Token
		}
	}
	t.Fatalf("state %q does not list %s", state, disk)
	return 0
}

func wantCode(t *testing.T, what string, r result, code lockmgr.Code) {
	t.Helper()
	if r.code != int(code) {
		t.Fatalf("%s: exit %d (%s%s), want %d (%s)", what, r.code, r.stdout, r.stderr, code, code)
	}
}

func testHandover(t *testing.T, src, dst, other handoverHost) {
	disks := diskPaths(t, 3)

	t.Run("success", func(t *testing.T) {
		const u = "aaaaaaaa-0000-4000-8000-000000000001"
		disk := disks[0]
		src.startRun("vm1", "--uuid", u, "--disk", disk)
		before := src.vmlock("inquire", "--uuid", u)
		r := src.vmlock("migrate", "prepare", "--uuid", u, "--to", dst.name)
		wantCode(t, "prepare", r, lockmgr.CodeOK)
		state := strings.TrimSpace(r.stdout)
		mustContain(t, "handover state", state, "disk:exclusive:", "vmlock.migration:readonly:0:"+dst.name)
		if tokenOf(t, state, disk) != tokenOf(t, before.stdout, disk) {
			t.Fatalf("prepare changed the token: %s, then %s", before.stdout, state)
		}
		if m, ok := holds(src, u, disk); !ok || m != lockmgr.Shared {
			t.Fatalf("source holds %s as %v %v during the handover, want shared", disk, m, ok)
		}
		wantCode(t, "third party, exclusive, during the handover", other.vmlock("run", "--disk", disk, "--", "true"), lockmgr.CodeBusy)

		// The destination's QEMU opens the disk while the source's still has it.
		dstVM := sleeper(t)
		r = dst.vmlock("acquire", "--uuid", u, "--name", "vm1", "--pid", strconv.Itoa(dstVM.Process.Pid), "--state", state)
		wantCode(t, "destination acquire with the handover state", r, lockmgr.CodeOK)
		if m, ok := holds(dst, u, disk); !ok || m != lockmgr.Shared {
			t.Fatalf("destination holds %s as %v %v during the handover, want shared", disk, m, ok)
		}
		newTok := tokenOf(t, r.stdout, disk)
		if newTok <= tokenOf(t, state, disk) {
			t.Fatalf("destination's token %d is not above the source's %d", newTok, tokenOf(t, state, disk))
		}
		wantCode(t, "third party, shared, during the handover", other.vmlock("run", "--disk", disk+":shared", "--", "true"), lockmgr.CodeOK)

		// Complete on the destination first: it waits for the source.
		done := make(chan result, 1)
		go func() { done <- dst.vmlockQuiet("migrate", "complete", "--uuid", u) }()
		time.Sleep(300 * time.Millisecond)
		r = src.vmlock("migrate", "complete", "--uuid", u)
		wantCode(t, "complete on the source", r, lockmgr.CodeOK)
		wantCode(t, "complete on the destination", <-done, lockmgr.CodeOK)
		if _, ok := holds(src, u, disk); ok {
			t.Fatal("the source still holds the disk after completing")
		}
		if m, ok := holds(dst, u, disk); !ok || m != lockmgr.Exclusive {
			t.Fatalf("destination holds %s as %v %v after completing, want exclusive", disk, m, ok)
		}
		wantCode(t, "third party, shared, after the handover", other.vmlock("run", "--disk", disk+":shared", "--", "true"), lockmgr.CodeBusy)
		wantCode(t, "complete again", dst.vmlock("migrate", "complete", "--uuid", u), lockmgr.CodeNotRegistered)
	})

	t.Run("cancel", func(t *testing.T) {
		const u = "aaaaaaaa-0000-4000-8000-000000000002"
		disk := disks[1]
		src.startRun("vm2", "--uuid", u, "--disk", disk)
		r := src.vmlock("migrate", "prepare", "--uuid", u, "--to", dst.name)
		wantCode(t, "prepare", r, lockmgr.CodeOK)
		dstVM := sleeper(t)
		pid := strconv.Itoa(dstVM.Process.Pid)
		r = dst.vmlock("acquire", "--uuid", u, "--pid", pid, "--disk", disk, "--state", strings.TrimSpace(r.stdout))
		wantCode(t, "destination acquire", r, lockmgr.CodeOK)
		joined := tokenOf(t, r.stdout, disk)
		wantCode(t, "cancel on the destination", dst.vmlock("migrate", "complete", "--uuid", u, "--cancel"), lockmgr.CodeOK)
		if _, ok := holds(dst, u, disk); ok {
			t.Fatal("the destination still holds the disk after cancelling")
		}
		r = src.vmlock("migrate", "complete", "--uuid", u, "--cancel")
		wantCode(t, "cancel on the source", r, lockmgr.CodeOK)
		if m, ok := holds(src, u, disk); !ok || m != lockmgr.Exclusive {
			t.Fatalf("source holds %s as %v %v after the cancel, want exclusive", disk, m, ok)
		}
		// Taking the disk back is a new grant: its token is above the
		// destination's, which storage may have seen.
		if got := tokenOf(t, r.stdout, disk); got <= joined {
			t.Fatalf("source's token after the cancel %d, want one above the destination's %d", got, joined)
		}
		wantCode(t, "third party, shared, after the cancel", other.vmlock("run", "--disk", disk+":shared", "--", "true"), lockmgr.CodeBusy)

		// The migration can be tried again.
		r = src.vmlock("migrate", "prepare", "--uuid", u, "--to", dst.name)
		wantCode(t, "prepare again", r, lockmgr.CodeOK)
		wantCode(t, "destination acquire again", dst.vmlock("acquire", "--uuid", u, "--pid", pid, "--disk", disk, "--state", strings.TrimSpace(r.stdout)), lockmgr.CodeOK)
		wantCode(t, "cancel again on the destination", dst.vmlock("migrate", "complete", "--uuid", u, "--cancel"), lockmgr.CodeOK)
		wantCode(t, "cancel again on the source", src.vmlock("migrate", "complete", "--uuid", u, "--cancel"), lockmgr.CodeOK)
	})

	t.Run("stale", func(t *testing.T) {
		const u = "aaaaaaaa-0000-4000-8000-000000000003"
		disk := disks[2]
		src.startRun("vm3", "--uuid", u, "--disk", disk)
		r := src.vmlock("migrate", "prepare", "--uuid", u, "--to", dst.name)
		wantCode(t, "prepare", r, lockmgr.CodeOK)
		state := strings.TrimSpace(r.stdout)
		// A third party slips in, shared, while the disk is in handover.
		intruder := other.startRun("intruder", "--disk", disk+":shared")
		dstVM := sleeper(t)
		pid := strconv.Itoa(dstVM.Process.Pid)
		r = dst.vmlock("acquire", "--uuid", u, "--pid", pid, "--state", state)
		wantCode(t, "destination acquire after someone else was granted the disk", r, lockmgr.CodeStaleState)
		mustContain(t, "stale state message", r.stderr, "stale state")
		if _, ok := holds(dst, u, disk); ok {
			t.Fatal("a refused handover left the destination holding the disk")
		}
		intruder.Process.Kill()
		intruder.Wait()
		// A state prepared for another destination is refused there.
		r = src.vmlock("migrate", "prepare", "--uuid", u, "--to", other.name)
		wantCode(t, "prepare for another destination", r, lockmgr.CodeOK)
		r = dst.vmlock("acquire", "--uuid", u, "--pid", pid, "--state", strings.TrimSpace(r.stdout))
		wantCode(t, "acquire on a host the state was not prepared for", r, lockmgr.CodeInvalidArgument)
		mustContain(t, "wrong destination message", r.stderr, "prepared for a migration to host \""+other.name+"\"")
	})
}

// vmlockQuiet is vmlock for use off the test's goroutine: it never calls
// t.Fatal.
func (d *daemon) vmlockQuiet(args ...string) result {
	return runVmlock(d.socket, nil, args...)
}

// A migration mark names every disk the handover covers. A VM with many
// long-named disks (20 paths of about 4,000 bytes: listed in one piece,
// the mark alone passes the lock-holder's 64 KiB limit of a record) keeps
// its locks and its mark through a crash of vmlockd: after the restart the
// source is still handing its disks over, and a cancel takes every one of
// them back exclusively.
func TestAMigrationMarkOfManyLongPathsSurvivesACrash(t *testing.T) {
	d := startDaemon(t, "--host", "src")
	const u = "aaaaaaaa-0000-4000-8000-0000000000f1"
	disks, args := longPaths(t, 20)
	d.startRun("many-disks", append([]string{"--uuid", u}, args...)...)
	wantCode(t, "prepare", d.vmlock("migrate", "prepare", "--uuid", u, "--to", "dst"), lockmgr.CodeOK)
	d.kill9()
	for _, p := range disks {
		if probeFree(t, p) {
			t.Fatalf("disk %s...%s was free while vmlockd was down", p[:40], p[len(p)-20:])
		}
	}
	d.start()
	h := handoverHost{d, "src"}
	for _, p := range disks {
		if m, ok := holds(h, u, p); !ok || m != lockmgr.Shared {
			t.Fatalf("after the restart the source holds %s...%s as %v %v, want shared", p[:40], p[len(p)-20:], m, ok)
		}
	}
	wantCode(t, "cancel after the restart", d.vmlock("migrate", "complete", "--uuid", u, "--cancel"), lockmgr.CodeOK)
	for _, p := range disks {
		if m, ok := holds(h, u, p); !ok || m != lockmgr.Exclusive {
			t.Fatalf("after the cancel the source holds %s...%s as %v %v, want exclusive", p[:40], p[len(p)-20:], m, ok)
		}
	}
}
