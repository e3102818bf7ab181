package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/qmp"
)

// The QEMU tests run real QEMU (-machine none, TCG, no guest) under
// `vmlock run --qemu`, on qcow2 chains made with qemu-img and filled with
// qemu-io. Each VM also gets a QMP monitor of the test's own, through which
// the test writes into the disk during jobs (HMP qemu-io) and quits QEMU.

// needTool returns the path of a QEMU tool. Without it the test is
// skipped, except under CI=true, where a missing QEMU is a failure.
func needTool(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %s is not installed (Debian packages qemu-system-x86, qemu-utils): %v", tool, err)
		}
		t.Skipf("%s not installed: %v", tool, err)
	}
	return p
}

func needQEMU(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "qemu-io"} {
		needTool(t, tool)
	}
}

func qctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuIO runs qemu-io commands on an image (read-only: without taking
// QEMU's image locks) and fails on any failure, pattern checks included.
func qemuIO(t *testing.T, image string, readOnly bool, cmds ...string) {
	t.Helper()
	var args []string
	if readOnly {
		args = append(args, "-r", "-U")
	}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := runTool(t, "qemu-io", append(args, image)...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed:") {
		t.Fatalf("qemu-io %s %q:\n%s", image, cmds, out)
	}
}

// vchain is base ← mid ← top (qcow2, 4 MiB) with data in every layer:
// base 0x11 in [0,2M), mid 0x22 in [1M,2M), top 0x33 in [2M,3M). ref is a
// standalone image with the merged content, to compare against.
type vchain struct {
	dir, base, mid, top, ref string
}

func makeVChain(t *testing.T) *vchain {
	t.Helper()
	// A short directory: it also holds the test's monitor socket.
	dir, err := os.MkdirTemp("", "vq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	dir, _ = filepath.EvalSymlinks(dir)
	c := &vchain{dir: dir, base: filepath.Join(dir, "base.qcow2"), mid: filepath.Join(dir, "mid.qcow2"),
		top: filepath.Join(dir, "top.qcow2"), ref: filepath.Join(dir, "ref.qcow2")}
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", c.base, "4M")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", c.base, "-F", "qcow2", c.mid)
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", c.mid, "-F", "qcow2", c.top)
	qemuIO(t, c.base, false, "write -P 0x11 0 2M")
	qemuIO(t, c.mid, false, "write -P 0x22 1M 1M")
	qemuIO(t, c.top, false, "write -P 0x33 2M 1M")
	runTool(t, "qemu-img", "convert", "-O", "qcow2", c.top, c.ref)
	return c
}

// checkMerged checks that image reads as the merged chain.
func checkMerged(t *testing.T, image string) {
	t.Helper()
	qemuIO(t, image, true, "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x33 2M 1M")
}

// sameContent checks that two images read the same (qemu-img compare).
func sameContent(t *testing.T, a, b string) {
	t.Helper()
	runTool(t, "qemu-img", "compare", "-U", a, b)
}

// vm is a QEMU started by `vmlock run --qemu`.
type vm struct {
	t    *testing.T
	d    *daemon
	name string
	cmd  *exec.Cmd // vmlock run, which became QEMU (same pid)
	mon  *qmp.Client
	errb *bytes.Buffer
}

var qemuBase = []string{"qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"}

// startVM runs QEMU with args under `vmlock run --qemu` and waits until
// vmlockd has checked its chains and continued it.
func (d *daemon) startVM(name, dir string, args ...string) *vm {
	d.t.Helper()
	return d.startVMAs(nil, name, dir, args...)
}

// startVMAs is startVM with vmlock run, and so QEMU, running as cred (nil:
// as this test). A non-root QEMU needs its images and dir to be its own.
func (d *daemon) startVMAs(cred *syscall.Credential, name, dir string, args ...string) *vm {
	d.t.Helper()
	t := d.t
	sock := filepath.Join(dir, name+".mon")
	argv := []string{"--socket", d.socket, "run", "--qemu", "--name", name, "--"}
	argv = append(append(append(argv, qemuBase...), "-qmp", "unix:"+sock+",server=on,wait=off"), args...)
	v := &vm{t: t, d: d, name: name, cmd: exec.Command(bins.vmlock, argv...), errb: &bytes.Buffer{}}
	v.cmd.Stderr = v.errb
	if cred != nil {
		v.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		// Its monitor socket goes to $XDG_RUNTIME_DIR, or the temporary
		// directory: not this test's runtime directory.
		v.cmd.Env = append(os.Environ(), "XDG_RUNTIME_DIR=")
	}
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if v.mon != nil {
			v.mon.Close()
		}
		v.cmd.Process.Kill()
		v.cmd.Wait()
	})
	ctx := qctx(t)
	for v.mon == nil {
		c, err := qmp.Dial(ctx, sock)
		if err == nil {
			v.mon = c
			break
		}
		if v.cmd.ProcessState != nil || ctx.Err() != nil {
			t.Fatalf("QEMU's monitor never came up: %v; stderr: %s", err, v.errb)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// vmlockd continues the guest (vmlock added -S) once it has locked
	// everything QEMU opened.
	for {
		var st struct {
			Status string `json:"status"`
		}
		if err := v.mon.Execute(ctx, "query-status", nil, &st); err != nil {
			t.Fatalf("query-status: %v; stderr: %s", err, v.errb)
		}
		if st.Status == "running" {
			return v
		}
		select {
		case <-ctx.Done():
			t.Fatalf("vmlockd never continued QEMU (status %s); vms: %s", st.Status, d.vmlock("vms").stdout)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (v *vm) pid() int { return v.cmd.Process.Pid }

// write writes into the VM's disk through QEMU (HMP qemu-io), as a guest
// would.
func (v *vm) write(disk, cmd string) {
	v.t.Helper()
	var out string
	line := fmt.Sprintf("qemu-io %s %q", disk, cmd)
	if err := v.mon.Execute(qctx(v.t), "human-monitor-command", map[string]string{"command-line": line}, &out); err != nil {
		v.t.Fatal(err)
	}
	if strings.Contains(out, "rror") || strings.Contains(out, "failed") {
		v.t.Fatalf("%s: %s", line, out)
	}
}

// quit makes QEMU exit cleanly (flushing its images) and waits for it.
func (v *vm) quit() {
	v.t.Helper()
	if err := v.mon.Execute(qctx(v.t), "quit", nil, nil); err != nil && !errors.Is(err, qmp.ErrDisconnected) {
		v.t.Fatal(err)
	}
	if err := v.cmd.Wait(); err != nil {
		v.t.Fatalf("QEMU exit: %v; stderr: %s", err, v.errb)
	}
}

// modes returns, for every disk lock, its mode and its holders' pids.
func (d *daemon) modes() map[string]string {
	d.t.Helper()
	out := map[string]string{}
	for _, l := range d.locks() {
		var pids []string
		for _, h := range l.Holders {
			pids = append(pids, fmt.Sprint(h.PID))
		}
		out[l.Resource.Name] = l.Resource.Mode.String() + " " + strings.Join(pids, ",")
	}
	return out
}

// wantLocks checks that the lock monitor lists exactly want (path → mode,
// each held by pid alone).
func (d *daemon) wantLocks(pid int, want map[string]lockmgr.Mode) {
	d.t.Helper()
	got := d.modes()
	exp := map[string]string{}
	for p, m := range want {
		exp[p] = fmt.Sprintf("%s %d", m, pid)
	}
	if fmt.Sprint(got) != fmt.Sprint(exp) {
		d.t.Fatalf("locks:\n got %v\nwant %v", got, exp)
	}
}

// jobInfo is `vmlock blockjob VM DISK -o json`.
func (d *daemon) jobInfo(vmName, disk string) map[string]any {
	d.t.Helper()
	r := d.vmlock("blockjob", vmName, disk, "-o", "json")
	if r.code != 0 {
		d.t.Fatalf("blockjob --info: exit %d: %s", r.code, r.stderr)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		d.t.Fatalf("blockjob -o json: %v\n%s", err, r.stdout)
	}
	return m
}

func (d *daemon) mustRun(args ...string) string {
	d.t.Helper()
	r := d.vmlock(args...)
	if r.code != 0 {
		d.t.Fatalf("vmlock %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

func driveArg(path string) []string {
	return []string{"-drive", "if=none,id=drive0,format=qcow2,file=" + path}
}

func TestQEMUChainLocksAndActiveCommitPivot(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	ro := filepath.Join(ch.dir, "ro.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", ro, "1M")
	v := d.startVM("vm1", ch.dir, append(driveArg(ch.top), "-drive", "if=none,id=cd0,format=qcow2,readonly=on,file="+ro)...)

	// The whole chain: active exclusive, backing files shared, the
	// read-only disk recorded only; all owned by QEMU's pid.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, ro: lockmgr.ReadOnly})
	if probeFree(t, ch.base) || probeFree(t, ch.mid) || !probeFree(t, ro) {
		t.Fatalf("OFD probes: base free %v, mid free %v, read-only free %v", probeFree(t, ch.base), probeFree(t, ch.mid), probeFree(t, ro))
	}

	// Committing the active layer needs --active.
	r := d.vmlock("blockcommit", "vm1", "drive0")
	if r.code != int(lockmgr.CodeInvalidArgument) || !strings.Contains(r.stderr, "requires --active") {
		t.Fatalf("active commit without --active: exit %d, stderr %q", r.code, r.stderr)
	}
	if got := d.jobInfo("vm1", "drive0")["phase"]; got != "none" {
		t.Fatalf("a refused commit left a job: %v", got)
	}

	out := d.mustRun("blockcommit", "vm1", "drive0", "--active", "--wait", "--verbose")
	mustContain(t, "blockcommit --wait --verbose", out, "Active Block Commit: [100 %]", "Now in synchronized phase")
	info := d.jobInfo("vm1", "drive0")
	if info["phase"] != "ready" || info["qemu_status"] != "ready" || info["type"] != "active-commit" {
		t.Fatalf("blockjob --info at ready: %v", info)
	}
	// The base is QEMU's to write: exclusive; nobody else may take it.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Exclusive, ro: lockmgr.ReadOnly})
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	for _, mode := range []string{"", ":shared"} {
		r = d.vmlock("acquire", "--uuid", "0ddba11e-0000-4000-8000-000000000001", "--pid", fmt.Sprint(other.Process.Pid), "--disk", ch.base+mode)
		if r.code != int(lockmgr.CodeBusy) || !strings.Contains(r.stderr, `vm "vm1"`) {
			t.Fatalf("acquire of the commit's base%s by another process: exit %d, %s", mode, r.code, r.stderr)
		}
	}
	if probeFree(t, ch.base) {
		t.Fatal("an OFD write lock on the commit's base succeeded")
	}
	mustContain(t, "vmlock locks", d.mustRun("locks"), "active-commit", "ready")
	var monitor struct {
		BlockJobs []struct{ Disk, Phase, Base string } `json:"block_jobs"`
	}
	if err := json.Unmarshal([]byte(d.mustRun("locks", "-o", "json")), &monitor); err != nil || len(monitor.BlockJobs) != 1 ||
		monitor.BlockJobs[0].Phase != "ready" || monitor.BlockJobs[0].Base != ch.base {
		t.Fatalf("vmlock locks -o json block_jobs: %+v %v", monitor.BlockJobs, err)
	}

	v.write("drive0", "write -P 0x44 3M 512k") // mirrored into the base
	d.mustRun("blockjob", "vm1", "drive0", "--pivot")
	info = d.jobInfo("vm1", "drive0")
	if info["phase"] != "pivoted" || info["ended"] != true {
		t.Fatalf("after the pivot: %v", info)
	}
	// The images above the base left the chain: released.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.base: lockmgr.Exclusive, ro: lockmgr.ReadOnly})
	if !probeFree(t, ch.top) || !probeFree(t, ch.mid) {
		t.Fatal("top or mid still locked after the pivot")
	}
	v.write("drive0", "write -P 0x55 3584k 512k") // lands in the base now
	v.quit()
	d.waitFree(ch.base, 10*time.Second)

	checkMerged(t, ch.base)
	qemuIO(t, ch.base, true, "read -P 0x44 3M 512k", "read -P 0x55 3584k 512k")
	qemuIO(t, ch.ref, false, "write -P 0x44 3M 512k", "write -P 0x55 3584k 512k")
	sameContent(t, ch.ref, ch.base)
}

func TestQEMUActiveCommitAbortKeepsTheTop(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	mustContain(t, "blockcommit", d.mustRun("blockcommit", "vm1", "drive0", "--active", "--wait"), "Now in synchronized phase")
	d.mustRun("blockjob", "vm1", "drive0", "--abort")
	if info := d.jobInfo("vm1", "drive0"); info["phase"] != "aborted" {
		t.Fatalf("after the abort: %v", info)
	}
	// The top stays active; the base is shared again.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	v.write("drive0", "write -P 0x55 3M 512k")
	v.quit()
	qemuIO(t, ch.top, true, "read -P 0x55 3M 512k")
	checkMerged(t, ch.top)
	// The commit's data is in the base all the same; the later write is not.
	checkMerged(t, ch.base)
	qemuIO(t, ch.base, true, "read -P 0 3M 1M")
}

func TestQEMUIntermediateCommitEndsByItself(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	out := d.mustRun("blockcommit", "vm1", "drive0", "--top", ch.mid, "--base", ch.base, "--wait", "--delete")
	mustContain(t, "blockcommit --top mid --wait", out, "Commit complete")
	info := d.jobInfo("vm1", "drive0")
	if info["phase"] != "completed" || info["type"] != "commit" {
		t.Fatalf("intermediate commit: %v", info)
	}
	r := d.vmlock("blockjob", "vm1", "drive0", "--pivot")
	if r.code == 0 {
		t.Fatal("pivot of an ended intermediate commit accepted")
	}
	// mid left the chain and was deleted; base is a backing file again.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.base: lockmgr.Shared})
	if _, err := os.Stat(ch.mid); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("--delete left mid: %v", err)
	}
	v.quit()
	mustContain(t, "qemu-img info top", runTool(t, "qemu-img", "info", "-U", ch.top), "backing file: "+ch.base)
	sameContent(t, ch.ref, ch.top)
}

func TestQEMUBlockCopyPivot(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	mustContain(t, "blockcopy --wait", d.mustRun("blockcopy", "vm1", "drive0", dest, "--wait"), "Now in mirroring phase")
	// The copy target is QEMU's to write: exclusive.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, dest: lockmgr.Exclusive})
	v.write("drive0", "write -P 0x44 3M 512k")
	d.mustRun("blockjob", "vm1", "drive0", "--pivot")
	// The copy is the disk now; the old chain is released.
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
	// --finish: a complete copy, released; the disk stays on dest.
	dest2 := filepath.Join(ch.dir, "copy2.qcow2")
	mustContain(t, "blockcopy --finish", d.mustRun("blockcopy", "vm1", "drive0", dest2, "--finish"), "Successfully copied")
	if info := d.jobInfo("vm1", "drive0"); info["phase"] != "aborted" || info["target"] != dest2 {
		t.Fatalf("after --finish: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
	if !probeFree(t, dest2) {
		t.Fatal("the finished copy is still locked")
	}
	v.quit()
	sameContent(t, dest, dest2)
	if info := runTool(t, "qemu-img", "info", "-U", dest); strings.Contains(info, "backing file") {
		t.Fatalf("the copy has a backing file:\n%s", info)
	}
	checkMerged(t, dest)
	qemuIO(t, ch.ref, false, "write -P 0x44 3M 512k")
	sameContent(t, ch.ref, dest)
}

func TestQEMUPivotBeforeReadyIsRefused(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	// A job with a bad argument (a negative speed) is refused (by the CLI
	// here; vmlockd refuses it too, see daemon's
	// TestBlockJobArgumentsAreCheckedBeforeAnythingIsDone), and leaves no
	// job and the locks as they were.
	r := d.vmlock("blockcommit", "vm1", "drive0", "--active", "--bandwidth", "-1", "--bytes")
	if r.code != int(lockmgr.CodeInvalidArgument) || !strings.Contains(r.stderr, "--bandwidth -1") {
		t.Fatalf("a commit with a negative bandwidth: exit %d, stderr %q", r.code, r.stderr)
	}
	if got := d.jobInfo("vm1", "drive0")["phase"]; got != "none" {
		t.Fatalf("a refused job is listed: %v", got)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	// At one byte per second the job cannot become ready.
	mustContain(t, "blockcommit", d.mustRun("blockcommit", "vm1", "drive0", "--active", "--bandwidth", "1", "--bytes"), "Block Commit started")
	r = d.vmlock("blockjob", "vm1", "drive0", "--pivot")
	if r.code != int(lockmgr.CodeNotRegistered) || !strings.Contains(r.stderr, "not ready yet") {
		t.Fatalf("pivot before ready: exit %d, stderr %q", r.code, r.stderr)
	}
	if info := d.jobInfo("vm1", "drive0"); info["phase"] != "running" {
		t.Fatalf("after the refused pivot: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Exclusive})
	d.mustRun("blockjob", "vm1", "drive0", "--abort")
	if info := d.jobInfo("vm1", "drive0"); info["phase"] != "cancelled" {
		t.Fatalf("after the abort: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
}

func TestQEMUBackingFileCannotBeTakenExclusively(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v1 := d.startVM("vm1", ch.dir, driveArg(ch.top)...)

	r := d.vmlock("run", "--name", "intruder", "--disk", ch.base, "--", "true")
	if r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("run on a backing file of a running VM: exit %d (%s), want busy", r.code, r.stderr)
	}
	mustContain(t, "busy message", r.stderr, "disk "+ch.base+" is locked shared", `vm "vm1"`, fmt.Sprintf("pid %d", v1.pid()))

	// A second VM on another overlay of the same base shares it...
	top2 := filepath.Join(ch.dir, "top2.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", ch.mid, "-F", "qcow2", top2)
	v2 := d.startVM("vm2", ch.dir, driveArg(top2)...)
	// ...so vm1 may not commit into it: refused before the job starts.
	r = d.vmlock("blockcommit", "vm1", "drive0", "--active", "--wait")
	if r.code != int(lockmgr.CodeBusy) || !strings.Contains(r.stderr, `vm "vm2"`) {
		t.Fatalf("commit into a base another VM reads: exit %d, stderr %q", r.code, r.stderr)
	}
	if got := d.jobInfo("vm1", "drive0")["phase"]; got != "none" {
		t.Fatalf("the refused commit left a job: %v", got)
	}
	modes := d.modes()
	if modes[ch.base] != fmt.Sprintf("shared %d,%d", v1.pid(), v2.pid()) && modes[ch.base] != fmt.Sprintf("shared %d,%d", v2.pid(), v1.pid()) {
		t.Fatalf("base after the refused commit: %q", modes[ch.base])
	}
	// kill -9 of QEMU releases its whole chain: QEMU's pid owns the locks.
	v2.cmd.Process.Kill()
	v2.cmd.Wait()
	d.waitFree(top2, 10*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for d.modes()[ch.base] != fmt.Sprintf("shared %d", v1.pid()) {
		if time.Now().After(deadline) {
			t.Fatalf("vm2's share of base not released: %v", d.modes())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestQEMUKill9OfVmlockdAtReadyThenPivot(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	d.mustRun("blockcommit", "vm1", "drive0", "--active", "--wait")

	d.kill9()
	// QEMU and its job run on; the locks stay held.
	var jobs []struct {
		ID     string `json:"id"`
		Status string `json:"status"`
	}
	if err := v.mon.Execute(qctx(t), "query-jobs", nil, &jobs); err != nil || len(jobs) != 1 || jobs[0].Status != "ready" {
		t.Fatalf("jobs while vmlockd is down: %+v %v", jobs, err)
	}
	if probeFree(t, ch.base) || probeFree(t, ch.top) {
		t.Fatal("a lock was lost while vmlockd was down")
	}
	v.write("drive0", "write -P 0x44 3M 512k")
	d.start()

	info := d.jobInfo("vm1", "drive0")
	if info["phase"] != "ready" || info["qemu_status"] != "ready" || info["id"] != jobs[0].ID {
		t.Fatalf("blockjob --info after the restart: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Exclusive})
	d.mustRun("blockjob", "vm1", "drive0", "--pivot")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.base: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, ch.base)
	qemuIO(t, ch.ref, false, "write -P 0x44 3M 512k")
	sameContent(t, ch.ref, ch.base)
}

func TestQEMUBlockJobIOErrorRestoresLocks(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	// base sits on blkdebug, which fails every write to it with EIO.
	base := fmt.Sprintf(`{"driver":"qcow2","node-name":"base","backing":null,"file":{"driver":"blkdebug","node-name":"base-debug",`+
		`"inject-error":[{"event":"write_aio","errno":5}],"image":{"driver":"file","node-name":"base-file","filename":%q}}}`, ch.base)
	mid := fmt.Sprintf(`{"driver":"qcow2","node-name":"mid","backing":"base","file":{"driver":"file","filename":%q}}`, ch.mid)
	top := fmt.Sprintf(`{"driver":"qcow2","node-name":"top","backing":"mid","file":{"driver":"file","filename":%q}}`, ch.top)
	v := d.startVM("vm1", ch.dir, "-blockdev", base, "-blockdev", mid, "-blockdev", top)
	want := map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared}
	d.wantLocks(v.pid(), want)

	r := d.vmlock("blockcommit", "vm1", "top", "--top", "mid", "--base", "base", "--wait")
	if r.code == 0 || !strings.Contains(r.stderr, "Input/output error") {
		t.Fatalf("commit into a failing base: exit %d, stderr %q", r.code, r.stderr)
	}
	info := d.jobInfo("vm1", "top")
	if info["phase"] != "failed" || !strings.Contains(fmt.Sprint(info["error"]), "Input/output error") {
		t.Fatalf("blockjob --info of the failed job: %v", info)
	}
	mustContain(t, "blockjob --info", d.mustRun("blockjob", "vm1", "top"), "failed", "Input/output error")
	d.wantLocks(v.pid(), want)
}

func TestQEMUDiskAttachDetach(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	img := filepath.Join(ch.dir, "data.qcow2")
	base2 := filepath.Join(ch.dir, "data-base.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base2, "1M")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base2, "-F", "qcow2", img)

	mustContain(t, "disk attach", d.mustRun("disk", "attach", "vm1", img, "--node", "data0"), "attached "+img+" as data0")
	chain := map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared}
	with := map[string]lockmgr.Mode{img: lockmgr.Exclusive, base2: lockmgr.Shared}
	for p, m := range chain {
		with[p] = m
	}
	d.wantLocks(v.pid(), with)
	if r := d.vmlock("run", "--disk", img, "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("run on a hotplugged disk: exit %d, want busy", r.code)
	}
	// An image someone else holds is refused before QEMU opens it.
	held := filepath.Join(ch.dir, "held.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", held, "1M")
	holder := d.startRun("holder", "--disk", held)
	r := d.vmlock("disk", "attach", "vm1", held)
	if r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("attach of a disk held elsewhere: exit %d (%s), want busy", r.code, r.stderr)
	}
	var nodes []struct {
		File string `json:"file"`
	}
	if err := v.mon.Execute(qctx(t), "query-named-block-nodes", nil, &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.File == held {
			t.Fatal("QEMU opened the image vmlock could not lock")
		}
	}
	holder.Process.Kill()
	d.waitFree(held, 10*time.Second)
	mustContain(t, "disk detach", d.mustRun("disk", "detach", "vm1", "data0"), "detached data0")
	d.wantLocks(v.pid(), chain)
}

// TestQEMUApiListsChains checks the Go client's view of a VM.
func TestQEMUApiListsChains(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	vms, err := d.client().QEMUVMs(qctx(t), "vm1")
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].Pid != int64(v.pid()) || !vms[0].Connected || len(vms[0].Disks) != 1 {
		t.Fatalf("vms: %v", vms)
	}
	var got []string
	for _, img := range vms[0].Disks[0].Images {
		got = append(got, filepath.Base(img.Path)+"="+img.Mode)
	}
	if strings.Join(got, " ") != "top.qcow2=exclusive mid.qcow2=shared base.qcow2=shared" {
		t.Fatalf("drive0's chain: %v", got)
	}
	if _, err := d.client().QEMUVMs(qctx(t), "nonexistent"); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("an unknown VM: %v", err)
	}
}

// A -snapshot VM reads its images through a temporary overlay: they are
// backing files, locked shared like any other, so that nobody writes them
// while the VM reads them. An image another process holds exclusively is
// refused before QEMU starts, naming the holder.
func TestQEMUSnapshotImagesAreBackingFiles(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	holder := d.startRun("writer", "--disk", ch.top)
	argv := append([]string{"run", "--qemu", "--name", "vm1", "--"}, qemuBase...)
	r := d.vmlock(append(argv, append([]string{"-snapshot"}, driveArg(ch.top)...)...)...)
	if r.code != int(lockmgr.CodeBusy) || !strings.Contains(r.stderr, `"writer"`) {
		t.Fatalf("-snapshot VM on an image another process holds exclusively: exit %d, stderr %q; want busy naming the holder", r.code, r.stderr)
	}
	holder.Process.Kill()
	d.waitFree(ch.top, 10*time.Second)

	v := d.startVM("vm1", ch.dir, append([]string{"-snapshot"}, driveArg(ch.top)...)...)
	modes := d.modes()
	for _, p := range []string{ch.top, ch.mid, ch.base} {
		if modes[p] != fmt.Sprintf("shared %d", v.pid()) {
			t.Fatalf("-snapshot VM: %s is %q, want shared by QEMU; locks %v", p, modes[p], modes)
		}
	}
	if r := d.vmlock("run", "--disk", ch.top, "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("exclusive run on the image a -snapshot VM reads: exit %d, want busy", r.code)
	}
	v.quit()
}

// runQEMUToEnd runs QEMU under `vmlock run --qemu` to its end and returns
// how it ended (a signal's death included) and its stderr.
func (d *daemon) runQEMUToEnd(name string, args ...string) (*os.ProcessState, string) {
	d.t.Helper()
	argv := append([]string{"--socket", d.socket, "run", "--qemu", "--name", name, "--"}, qemuBase...)
	cmd := exec.Command(bins.vmlock, append(argv, args...)...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-qctx(d.t).Done():
		cmd.Process.Kill()
		<-done
		d.t.Fatalf("QEMU under vmlock run --qemu did not end; stderr: %s", errb.String())
	}
	return cmd.ProcessState, errb.String()
}

// An image QEMU opens that vmlock could not see on the command line (a
// json: filename whose file node names no driver: vmlock does not guess)
// and that another process holds: QEMU is stopped before its guest runs,
// its process fails, and its stderr names the image and who holds it.
func TestQEMUWhoseImageCannotBeLockedFailsNamingTheHolder(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	holder := d.startRun("writer", "--disk", ch.base)
	// QEMU's -drive syntax doubles the commas inside a value.
	opts := strings.ReplaceAll(fmt.Sprintf(`{"driver":"qcow2","backing":null,"file":{"filename":%q}}`, ch.base), ",", ",,")
	st, stderr := d.runQEMUToEnd("vm1", "-drive", "if=none,id=drive0,file=json:"+opts)
	if st.Success() {
		t.Fatalf("QEMU with an image another process holds ended successfully; stderr %q", stderr)
	}
	mustContain(t, "QEMU's stderr", stderr, ch.base, "locked exclusively", `vm "writer"`, fmt.Sprintf("pid %d", holder.Process.Pid))
	// The holder keeps its lock; the VM holds nothing.
	if got, want := d.modes(), map[string]string{ch.base: fmt.Sprintf("exclusive %d", holder.Process.Pid)}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("locks after the refused VM: %v, want %v", got, want)
	}
}

// An image named inside a json: filename or behind blkdebug: is locked
// before QEMU starts, like a plain one: if another process holds it, vmlock
// run refuses (busy, naming the holder) and QEMU never runs.
func TestQEMUImagesOfJSONAndBlkdebugFilenamesAreLockedBeforeQEMUStarts(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	d.startRun("writer", "--disk", ch.base)
	// QEMU's -drive syntax doubles the commas inside a value.
	opts := strings.ReplaceAll(fmt.Sprintf(`{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, ch.base), ",", ",,")
	for _, file := range []string{"json:" + opts, "blkdebug::" + ch.base} {
		argv := append([]string{"run", "--qemu", "--name", "vm1", "--"}, qemuBase...)
		r := d.vmlock(append(argv, "-drive", "if=none,id=drive0,file="+file)...)
		if r.code != int(lockmgr.CodeBusy) || !strings.Contains(r.stderr, `"writer"`) || !strings.Contains(r.stderr, ch.base) {
			t.Fatalf("-drive file=%s on an image another process holds: exit %d, stderr %q; want busy before QEMU starts, naming the image and its holder", file, r.code, r.stderr)
		}
	}
}

// vmlockIn runs the CLI to completion in directory dir.
func (d *daemon) vmlockIn(dir string, args ...string) result {
	d.t.Helper()
	cmd := exec.Command(bins.vmlock, append([]string{"--socket", d.socket}, args...)...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		r.code = ee.ExitCode()
	default:
		d.t.Fatalf("vmlock %v: %v", args, err)
	}
	return r
}

// Relative image paths are the client's: vmlock makes them absolute
// against its own working directory (a bare name when such a file is
// there), not vmlockd against its own.
func TestQEMUCommitResolvesRelativeImagePathsInTheClientsDirectory(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	r := d.vmlockIn(ch.dir, "blockcommit", "vm1", "drive0", "--top", "mid.qcow2", "--base", "./base.qcow2", "--wait")
	if r.code != 0 {
		t.Fatalf("blockcommit --top mid.qcow2 --base ./base.qcow2 in the chain's directory: exit %d, stderr %q", r.code, r.stderr)
	}
	mustContain(t, "blockcommit", r.stdout, "Commit complete")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.base: lockmgr.Shared})
	// DISK may be the active image's path, relative too.
	r = d.vmlockIn(ch.dir, "blockjob", "vm1", "./top.qcow2")
	if r.code != 0 || !strings.Contains(r.stdout, "completed") {
		t.Fatalf("blockjob ./top.qcow2 in the chain's directory: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
}

// vmlockd cannot know the working directory of an API client: a relative
// path is refused as an invalid argument, and no job starts.
func TestQEMUCommitRefusesRelativeImagePathsAtTheAPI(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	rel, err := filepath.Rel(bins.dir, ch.base) // relative to neither process's directory on purpose
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range []*vmlockpb.BlockCommitRequest{
		{Vm: "vm1", Disk: "drive0", Top: "./mid.qcow2"},
		{Vm: "vm1", Disk: "drive0", Top: ch.mid, Base: rel},
		{Vm: "vm1", Disk: "./top.qcow2", Top: ch.mid},
	} {
		_, err := d.client().BlockCommit(qctx(t), req)
		if !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "relative path") {
			t.Fatalf("BlockCommit %v: %v, want an invalid argument naming the relative path", req, err)
		}
	}
	if got := d.jobInfo("vm1", "drive0")["phase"]; got != "none" {
		t.Fatalf("a refused commit left a job: %v", got)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
}

// A qcow2 image with an external data file keeps the guest's data there:
// the data file is locked in its image's mode (exclusive for an active
// image, shared for a backing one), so another qcow2 image naming the same
// data file cannot give a second VM write access to it.
func TestQEMULocksTheDataFileOfAQcow2ImageInItsMode(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	data, img := filepath.Join(ch.dir, "data.raw"), filepath.Join(ch.dir, "img.qcow2")
	data2, base2, top2 := filepath.Join(ch.dir, "data2.raw"), filepath.Join(ch.dir, "base2.qcow2"), filepath.Join(ch.dir, "top2.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data, img, "1M")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data2, base2, "1M")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base2, "-F", "qcow2", top2)
	v := d.startVM("vm1", ch.dir, "-drive", "if=none,id=drive0,format=qcow2,file="+img, "-drive", "if=none,id=drive1,format=qcow2,file="+top2)
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{img: lockmgr.Exclusive, data: lockmgr.Exclusive,
		top2: lockmgr.Exclusive, base2: lockmgr.Shared, data2: lockmgr.Shared})
	if probeFree(t, data) || probeFree(t, data2) {
		t.Fatal("an OFD write lock on a data file in use succeeded")
	}
	// vmlock vms shows each data file with its image, in its mode.
	var vms []struct {
		Disks []struct {
			Images []struct {
				Path     string `json:"path"`
				Mode     string `json:"mode"`
				DataFile string `json:"data_file"`
			} `json:"images"`
		} `json:"disks"`
	}
	if err := json.Unmarshal([]byte(d.mustRun("vms", "-o", "json")), &vms); err != nil {
		t.Fatal(err)
	}
	dataFiles := map[string]string{}
	for _, vm := range vms {
		for _, disk := range vm.Disks {
			for _, im := range disk.Images {
				dataFiles[im.Path] = im.DataFile
			}
		}
	}
	if want := map[string]string{img: data, top2: "", base2: data2}; !maps.Equal(dataFiles, want) {
		t.Fatalf("vms -o json shows the data files %v, want %v", dataFiles, want)
	}
	table := d.mustRun("vms")
	for _, row := range []string{"drive0 data file " + data + " exclusive", "drive1 data file " + data2 + " shared"} {
		if !slices.ContainsFunc(strings.Split(table, "\n"), func(l string) bool { return strings.Contains(strings.Join(strings.Fields(l), " "), row) }) {
			t.Fatalf("vms shows no row %q:\n%s", row, table)
		}
	}

	// Another qcow2 image on the same data file: refused, naming vm1.
	other := filepath.Join(ch.dir, "other.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(ch.dir, "scratch.raw"), other, "1M")
	runTool(t, "qemu-img", "amend", "-f", "qcow2", "-o", "data_file="+data, other)
	argv := append([]string{"run", "--qemu", "--name", "vm2", "--"}, qemuBase...)
	r := d.vmlock(append(argv, "-drive", "if=none,id=drive0,format=qcow2,file="+other)...)
	if r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("a VM on another image of vm1's data file: exit %d, stderr %q; want busy", r.code, r.stderr)
	}
	mustContain(t, "busy message", r.stderr, data, `vm "vm1"`)
	v.quit()
}

// QEMU's block graph tells the data file too: an image the command line
// does not show (a json: filename) has its data file locked with it.
func TestQEMUDataFileOfAnImageOnlyQEMUsGraphShowsIsLocked(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	data, img := filepath.Join(ch.dir, "data.raw"), filepath.Join(ch.dir, "img.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data, img, "1M")
	opts := strings.ReplaceAll(fmt.Sprintf(`{"driver":"qcow2","file":{"driver":"file","filename":%q}}`, img), ",", ",,")
	v := d.startVM("vm1", ch.dir, "-drive", "if=none,id=drive0,file=json:"+opts)
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{img: lockmgr.Exclusive, data: lockmgr.Exclusive})
	v.quit()
}
