package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

// The lock monitor shows every lock, however long the reply: here 1,100
// resources with 4,000-byte names, over 4 MiB (gRPC's default limit of a
// message a client accepts).
func TestLocksShowsAReplyLargerThanFourMiB(t *testing.T) {
	d := startDaemon(t)
	owner := exec.Command("sleep", "300")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	c := d.client()
	const objects, each = 11, 100
	for i := range objects {
		var rs []lockmgr.Resource
		for j := range each {
			name := fmt.Sprintf("%04d-%04d-%s", i, j, strings.Repeat("x", 3990))
			rs = append(rs, lockmgr.Resource{Type: "big", Name: name, Mode: lockmgr.Exclusive})
		}
		o := lockmgr.Object{UUID: fmt.Sprintf("abcdefab-0000-4000-8000-%012d", i), PID: owner.Process.Pid}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := c.Acquire(ctx, o, rs, "")
		cancel()
		if err != nil {
			t.Fatalf("acquire of object %d: %v", i, err)
		}
	}
	r := d.vmlock("locks", "-o", "json")
	if r.code != 0 {
		t.Fatalf("vmlock locks -o json: exit %d: %s", r.code, r.stderr)
	}
	var m struct {
		Resources []json.RawMessage `json:"resources"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatal(err)
	}
	if len(m.Resources) != objects*each {
		t.Fatalf("vmlock locks listed %d resources, want %d", len(m.Resources), objects*each)
	}
}

// A disk named through /proc/self or /dev/stdin (/dev/fd, ...) is the file
// the client has open there: vmlock resolves it itself, since vmlockd would
// resolve it to a descriptor of its own (here its /dev/null).
func TestADiskNamedThroughTheClientsDescriptorIsTheClientsFile(t *testing.T) {
	d := startDaemon(t)
	disk := image(t, "a.img")
	owner := exec.Command("sleep", "300")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	for i, name := range []string{"/dev/stdin", "/proc/self/fd/0"} {
		f, err := os.Open(disk)
		if err != nil {
			t.Fatal(err)
		}
		uuid := fmt.Sprintf("abcdefab-0000-4000-8000-00000000000%d", i)
		cmd := exec.Command(bins.vmlock, "--socket", d.socket, "acquire", "--uuid", uuid, "--pid", fmt.Sprint(owner.Process.Pid), "--disk", name)
		cmd.Stdin = f
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		f.Close()
		if err != nil {
			t.Fatalf("acquire --disk %s: %v: %s", name, err, stderr.String())
		}
		if want := "v1:disk:exclusive:"; !strings.HasPrefix(string(out), want) || !strings.Contains(string(out), "a.img") {
			t.Fatalf("acquire --disk %s with the image on stdin: state %q, want the image's", name, out)
		}
		if probeFree(t, disk) {
			t.Fatalf("acquire --disk %s with the image on stdin did not lock the image", name)
		}
		if r := d.vmlock("release", "--uuid", uuid); r.code != 0 {
			t.Fatalf("release: exit %d: %s", r.code, r.stderr)
		}
	}
}

// Through the API, vmlockd refuses such a disk: it cannot resolve it in the
// client's stead, and resolving it in its own locks another file.
func TestADiskNamedThroughProcSelfIsRefusedByTheAPI(t *testing.T) {
	d := startDaemon(t)
	owner := exec.Command("sleep", "300")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	c := d.client()
	for _, name := range []string{"/proc/self/fd/0", "/proc/thread-self/fd/0", "/dev/fd/0", "/dev/stdin", "/proc//self/../self/fd/0"} {
		o := lockmgr.Object{UUID: "abcdefab-0000-4000-8000-000000000001", PID: owner.Process.Pid}
		_, err := c.Acquire(context.Background(), o, []lockmgr.Resource{lockmgr.DiskResource(name, lockmgr.Exclusive)}, "")
		if !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), name) {
			t.Fatalf("acquire of %s through the API: %v, want invalid argument naming it", name, err)
		}
	}
	if l := d.locks(); len(l) != 0 {
		t.Fatalf("refused acquires left locks: %+v", l)
	}
}

// The kill command names its victim by uuid or name; a non-root client
// chooses those of its objects freely (they could be a root VM's), so
// vmlockd runs it only for root's objects and kills the (verified) owner
// process of anybody else's with SIGTERM.
func TestKillCommandIsNotRunForANonRootUsersObject(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another uid")
	}
	dir := t.TempDir()
	marker := filepath.Join(dir, "kill-command-ran")
	conf := filepath.Join(dir, "vmlockd.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf(`[revoke]
grace = "5s"
kill_command = ["sh", "-c", "echo $0 > %s", "{name}"]
`, marker)), 0o644)
	d := startDaemon(t, "--config", conf, "--socket-group", "65534")
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	disk := imageOf(t, "own.img", 65534)
	holder := exec.Command(bins.vmlock, "--socket", d.socket, "run", "--name", "roots-vm", "--disk", disk, "--", "sleep", "300")
	holder.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	for probeFree(t, disk) {
		time.Sleep(5 * time.Millisecond)
	}
	if r := d.vmlock("revoke", disk); r.code != 0 {
		t.Fatalf("revoke: exit %d: %s", r.code, r.stderr)
	}
	if b, err := os.ReadFile(marker); err == nil {
		t.Fatalf("the kill command ran for uid 65534's object, with %q", strings.TrimSpace(string(b)))
	}
	var ee *exec.ExitError
	if err := holder.Wait(); !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Fatalf("holder: %v, want killed by SIGTERM", err)
	}
	if !probeFree(t, disk) {
		t.Fatal("the disk is still locked after revoke returned")
	}
}

// A request larger than vmlockd takes (4 MiB) is an invalid argument
// (exit 2 for the CLI) that says so, not an internal error; it changes
// nothing, and the daemon goes on serving.
func TestARequestTooLargeForVmlockdIsAnInvalidArgument(t *testing.T) {
	d := startDaemon(t)
	owner := exec.Command("sleep", "300")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	var rs []lockmgr.Resource
	for i := range 1100 {
		rs = append(rs, lockmgr.Resource{Type: "big", Name: fmt.Sprintf("%04d-%s", i, strings.Repeat("x", 4000)), Mode: lockmgr.Exclusive})
	}
	o := lockmgr.Object{UUID: "abcdefab-0000-4000-8000-000000000001", PID: owner.Process.Pid}
	_, err := d.client().Acquire(context.Background(), o, rs, "")
	if !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "too large") {
		t.Fatalf("acquire of 4.4 MB of resources: %v, want invalid argument saying it is too large", err)
	}
	if l := d.locks(); len(l) != 0 {
		t.Fatalf("the refused acquire left locks: %d", len(l))
	}
}
