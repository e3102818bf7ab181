package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
	"github.com/vmlock/vmlock/qemu"
	"github.com/vmlock/vmlock/qemu/qemutest"
	"github.com/vmlock/vmlock/qmp"
)

// These tests drive the supervisor's block jobs against real QEMU
// (-machine none), calling the daemon in-process so that they can step in
// between the supervisor and QEMU. The e2e tests cover the CLI.

func needQEMUTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("CI=true but %s is not installed: %v", tool, err)
			}
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
}

type jobTestVM struct {
	d         *Daemon
	vm        *qemuVM
	ctx       context.Context // carries the caller (this process)
	top, base string
	dir       string
	disk      string // the drive's id
	mon       string // vmlockd's monitor socket
	pid       int    // QEMU's
	// test is a client on another monitor of QEMU, as another
	// management tool would have.
	test *qmp.Client
}

// startJobTestVM runs a daemon in-process and a QEMU VM on base ← top
// supervised by it, connected and verified; its disk is drive0.
func startJobTestVM(t *testing.T) *jobTestVM { return startJobTestVMDisk(t, "drive0") }

// startJobTestVMDisk is startJobTestVM with the drive's id.
func startJobTestVMDisk(t *testing.T, disk string) *jobTestVM {
	tv := newJobTestVM(t, disk)
	sctx, scancel := context.WithTimeout(tv.ctx, 30*time.Second)
	defer scancel()
	tv.supervise(t)
	if err := tv.vm.waitAttached(sctx); err != nil {
		t.Fatal(err)
	}
	if e := tv.vm.errText(); e != "" {
		t.Fatalf("supervising QEMU: %s", e)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
	return tv
}

// newJobTestVM runs a daemon in-process and a QEMU VM on base ← top,
// paused (-S), not yet supervised, with a test monitor.
func newJobTestVM(t *testing.T, disk string) *jobTestVM {
	needQEMUTools(t)
	dir, err := os.MkdirTemp("", "vqd") // short: it holds sockets
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	dir, _ = filepath.EvalSymlinks(dir)
	tv := &jobTestVM{top: filepath.Join(dir, "top.qcow2"), base: filepath.Join(dir, "base.qcow2"), dir: dir, disk: disk}
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", tv.base, "4M"},
		{"create", "-q", "-f", "qcow2", "-b", tv.base, "-F", "qcow2", tv.top},
	} {
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
	}

	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	drv, err := lockspace.New(lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go lockholder.Serve(ctx, state)
	cfg := Config{Driver: drv, Socket: filepath.Join(dir, "s.sock"), StateDir: state,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), HolderCommand: func() error { return nil }}
	if tv.d, err = New(ctx, cfg, nil); err != nil {
		t.Fatal(err)
	}

	tv.mon = filepath.Join(dir, "m.qmp")
	test := filepath.Join(dir, "t.qmp")
	cmd := exec.Command("qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg", "-S",
		"-drive", "if=none,id="+disk+",format=qcow2,file="+tv.top,
		"-chardev", "socket,id=vmlock-qmp,path="+tv.mon+",server=on,wait=off", "-mon", "chardev=vmlock-qmp,mode=control",
		"-qmp", "unix:"+test+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	tv.pid = cmd.Process.Pid
	tv.ctx = context.WithValue(ctx, callerKey{}, caller{uid: os.Getuid(), pid: os.Getpid()})
	dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
	defer dcancel()
	for tv.test == nil {
		if tv.test, err = qmp.Dial(dctx, test); err != nil && dctx.Err() != nil {
			t.Fatalf("QEMU's test monitor: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() { tv.test.Close() })
	return tv
}

// supervise has vmlockd supervise the VM, as vmlock run --qemu does.
func (tv *jobTestVM) supervise(t *testing.T) {
	t.Helper()
	sup := tv.d.newQEMUSupervisor()
	tv.d.qemu = sup // as Run does
	sctx, scancel := context.WithTimeout(tv.ctx, 30*time.Second)
	defer scancel()
	o := lockmgr.Object{UUID: "5e550000-0000-4000-8000-000000000001", Name: "vm1", PID: tv.pid}
	_, err := (&qemuService{s: sup}).Start(sctx, &vmlockpb.QEMUStartRequest{Object: api.ObjectToPB(o),
		Drives: []*vmlockpb.QEMUDrive{{Path: tv.top, Format: "qcow2"}}, Monitor: tv.mon, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if tv.vm, err = sup.lookup("vm1"); err != nil {
		t.Fatal(err)
	}
}

// status returns QEMU's run state (query-status).
func (tv *jobTestVM) status(t *testing.T) string {
	t.Helper()
	var st struct {
		Status string `json:"status"`
	}
	if err := tv.test.Execute(tv.ctx, "query-status", nil, &st); err != nil {
		t.Fatalf("QEMU no longer answers: %v", err)
	}
	return st.Status
}

func (tv *jobTestVM) wantLocks(t *testing.T, want map[string]lockmgr.Mode) {
	t.Helper()
	if got := tv.vm.heldModes(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("the VM's locks\n got %v\nwant %v", got, want)
	}
}

// waitPhase waits until the disk's job is in phase.
func (tv *jobTestVM) waitPhase(t *testing.T, phase string) *vmlockpb.BlockJobInfo {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		info, err := tv.vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: tv.disk, Action: vmlockpb.BlockJobAction_BLOCK_JOB_INFO})
		if err != nil {
			t.Fatal(err)
		}
		if info.Phase == phase {
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("the job never reached phase %s: %+v", phase, info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A caller that gives up (its connection closed, its deadline passed) after
// QEMU received block-commit but before its reply arrived: QEMU runs the
// job, so vmlockd must track it, keep its base exclusive, and let it be
// pivoted; it must not put the locks back as if the job had been refused.
func TestJobStartedByQEMUWhenTheCallerGaveUpIsTracked(t *testing.T) {
	tv := startJobTestVM(t)
	vm := tv.vm
	if err := vm.lock(tv.ctx); err != nil {
		t.Fatal(err)
	}
	if err := tv.d.mgr.ChangeMode(tv.ctx, vm.uuid, lockmgr.DiskResource(tv.base, lockmgr.Exclusive)); err != nil {
		vm.unlock()
		t.Fatal(err)
	}
	rec := jobRecord{Disk: "drive0", Type: jobActiveCommit, Top: tv.top, Base: tv.base, ID: vm.newJobIDLocked("commit", "drive0")}
	opts := qemu.CommitOptions{JobID: rec.ID, Device: "drive0", AutoDismiss: new(false)}
	_, err := vm.startJobLocked(tv.ctx, rec, func() (*qemu.Job, error) {
		// What qmp.Client.Execute returns when the caller's context ends
		// while the reply is on its way.
		q, err := qemu.StartCommit(tv.ctx, vm.c, opts)
		if err != nil {
			return nil, err
		}
		q.Close()
		return nil, fmt.Errorf("qemu: starting commit job %s: qmp: block-commit: waiting for reply: %w", rec.ID, context.Canceled)
	})
	vm.unlock()
	t.Logf("start: %v", err)
	if jobs, qerr := qemu.QueryJobs(tv.ctx, vm.c); qerr != nil || len(jobs) != 1 {
		t.Fatalf("QEMU's jobs: %v %v", jobs, qerr)
	}
	// The job runs in QEMU: vmlockd tracks it and its base stays exclusive.
	tv.waitPhase(t, phaseReady)
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Exclusive})
	info, err := vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "drive0", Action: vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT})
	if err != nil || info.Phase != phasePivoted {
		t.Fatalf("pivot: %+v %v", info, err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.base: lockmgr.Exclusive})
}

// A pivot makes the base (or copy) the active image: it must not happen
// while the VM does not hold that image exclusively (here its lock was
// released through the API and another owner took it).
func TestPivotRefusedWhenTheBaseLockWasLost(t *testing.T) {
	tv := startJobTestVM(t)
	vm := tv.vm
	if _, err := vm.blockCommit(tv.ctx, &vmlockpb.BlockCommitRequest{Disk: "drive0", Active: true}); err != nil {
		t.Fatal(err)
	}
	tv.waitPhase(t, phaseReady)
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Exclusive})

	// The API refuses to release a supervised VM's locks behind QEMU's
	// back, one or all.
	svc := &service{d: tv.d}
	base := lockmgr.DiskResource(tv.base, lockmgr.Exclusive)
	for _, res := range [][]*vmlockpb.Resource{{api.ResourceToPB(base)}, nil} {
		if _, err := svc.Release(tv.ctx, &vmlockpb.ReleaseRequest{Uuid: vm.uuid, Resources: res}); !errors.Is(err, lockmgr.ErrInvalidArgument) {
			t.Fatalf("release %v of a supervised VM through the API: %v, want invalid argument", res, err)
		}
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Exclusive})
	// The base's lock is lost all the same (here: released in the table
	// directly), and another process takes it.
	if _, err := tv.d.mgr.Release(tv.ctx, vm.uuid, &base); err != nil {
		t.Fatal(err)
	}
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	otherUUID := "0ddba11e-0000-4000-8000-000000000001"
	if _, err := tv.d.acquire(tv.ctx, callerOf(tv.ctx), &vmlockpb.AcquireRequest{
		Object:    api.ObjectToPB(lockmgr.Object{UUID: otherUUID, PID: other.Process.Pid}),
		Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(tv.base, lockmgr.Shared))}}); err != nil {
		t.Fatal(err)
	}

	_, err := vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "drive0", Action: vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT})
	if !errors.Is(err, lockmgr.ErrBusy) || !strings.Contains(err.Error(), tv.base) {
		t.Fatalf("pivot without the base's lock: %v, want busy naming the base", err)
	}
	if jobs, qerr := qemu.QueryJobs(tv.ctx, vm.c); qerr != nil || len(jobs) != 1 || jobs[0].Status != qemu.JobReady {
		t.Fatalf("after the refused pivot, QEMU's jobs: %+v %v", jobs, qerr)
	}
	// Abort still works, and the locks are what the graph uses.
	if _, err := svc.Release(tv.ctx, &vmlockpb.ReleaseRequest{Uuid: otherUUID}); err != nil {
		t.Fatal(err)
	}
	info, err := vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "drive0", Action: vmlockpb.BlockJobAction_BLOCK_JOB_ABORT})
	if err != nil || info.Phase != phaseAborted {
		t.Fatalf("abort: %+v %v", info, err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
}

// QEMU limits node names to 31 bytes. A copy must start on a disk with a
// long name (libvirt names its drives "drive-virtio-disk0") just as on
// drive0: the target node vmlockd adds must have a name QEMU accepts.
func TestBlockCopyOfADiskWithALongName(t *testing.T) {
	const disk = "drive-virtio-disk0"
	tv := startJobTestVMDisk(t, disk)
	vm := tv.vm
	dest := filepath.Join(tv.dir, "copy.qcow2")
	if _, err := vm.blockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Disk: disk, Dest: dest}); err != nil {
		t.Fatalf("blockcopy of disk %s: %v", disk, err)
	}
	tv.waitPhase(t, phaseReady)
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared, dest: lockmgr.Exclusive})
	info, err := vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: disk, Action: vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT})
	if err != nil || info.Phase != phasePivoted {
		t.Fatalf("pivot: %+v %v", info, err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
}

// A caller that gives up before QEMU received block-commit: QEMU runs no
// job, so the base, taken exclusively for the job, must be shared again
// although the caller's context has ended.
func TestJobNeverStartedWhenTheCallerGaveUpPutsTheLocksBack(t *testing.T) {
	tv := startJobTestVM(t)
	vm := tv.vm
	if err := vm.lock(tv.ctx); err != nil {
		t.Fatal(err)
	}
	if err := tv.d.mgr.ChangeMode(tv.ctx, vm.uuid, lockmgr.DiskResource(tv.base, lockmgr.Exclusive)); err != nil {
		vm.unlock()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(tv.ctx)
	rec := jobRecord{Disk: "drive0", Type: jobActiveCommit, Top: tv.top, Base: tv.base, ID: vm.newJobIDLocked("commit", "drive0")}
	_, err := vm.startJobLocked(ctx, rec, func() (*qemu.Job, error) {
		// What qmp.Client.Execute returns when the caller's context ends
		// before the command was sent.
		cancel()
		return nil, fmt.Errorf("qemu: starting commit job %s: qmp: block-commit: waiting to send: %w", rec.ID, context.Canceled)
	})
	vm.unlock()
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("start: %v, want the caller's cancellation", err)
	}
	if jobs, qerr := qemu.QueryJobs(tv.ctx, vm.c); qerr != nil || len(jobs) != 0 {
		t.Fatalf("QEMU's jobs: %v %v", jobs, qerr)
	}
	if info := tv.waitPhase(t, "none"); info.Id != "" {
		t.Fatalf("a job that never started is listed: %+v", info)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
}

// An image that is renamed while QEMU uses it can still be opened under its
// new name: it keeps its lock, although nothing is left at the path QEMU
// names it by. (Only a file with no name left, like -snapshot's temporary
// overlay, needs no lock.)
func TestRenamedImageKeepsItsLock(t *testing.T) {
	tv := startJobTestVM(t)
	vm := tv.vm
	if err := os.Rename(tv.top, tv.top+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := vm.lock(tv.ctx); err != nil {
		t.Fatal(err)
	}
	err := vm.reconcileLocked(tv.ctx)
	vm.unlock()
	if err != nil {
		t.Fatal(err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
}

// attachBareDisk adds base2 ← top2 to the VM as a bare node named "bare"
// (vmlock disk attach): no guest device or drive uses it.
func (tv *jobTestVM) attachBareDisk(t *testing.T) (top, base string) {
	t.Helper()
	top, base = filepath.Join(tv.dir, "top2.qcow2"), filepath.Join(tv.dir, "base2.qcow2")
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", base, "4M"},
		{"create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top},
	} {
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
	}
	if _, err := tv.vm.attachDisk(tv.ctx, &vmlockpb.QEMUAttachDiskRequest{Path: top, Node: "bare"}); err != nil {
		t.Fatal(err)
	}
	tv.disk = "bare"
	return top, base
}

// pivotRefusedAsUnused pivots the ready job on the bare disk and checks
// that vmlockd refuses, saying why and what to do, and leaves QEMU's job
// ready.
func (tv *jobTestVM) pivotRefusedAsUnused(t *testing.T) {
	t.Helper()
	tv.waitPhase(t, phaseReady)
	_, err := tv.vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "bare", Action: vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT})
	if !errors.Is(err, lockmgr.ErrNotRegistered) || !strings.Contains(err.Error(), "nothing in QEMU uses disk bare") || !strings.Contains(err.Error(), "--abort") {
		t.Fatalf("pivot on a disk nothing uses: %v, want a refusal saying nothing uses it and to abort instead", err)
	}
	jobs, err := qemu.QueryJobs(tv.ctx, tv.vm.c)
	if err != nil || len(jobs) != 1 || jobs[0].Status != qemu.JobReady {
		t.Fatalf("after the refused pivot, QEMU's jobs: %+v %v", jobs, err)
	}
	if info := tv.waitPhase(t, phaseReady); info.Ended {
		t.Fatalf("after the refused pivot: %+v", info)
	}
}

// A pivot replaces the job's source in its users (a guest device, a
// drive, an export). On a bare node nothing uses, QEMU would complete the
// job and replace nothing: vmlockd refuses to call that a pivot, and the
// job can still be aborted, which is what it would have amounted to.
func TestPivotOfAnActiveCommitOnADiskNothingUsesIsRefused(t *testing.T) {
	tv := startJobTestVM(t)
	top, base := tv.attachBareDisk(t)
	if _, err := tv.vm.blockCommit(tv.ctx, &vmlockpb.BlockCommitRequest{Disk: "bare", Active: true}); err != nil {
		t.Fatal(err)
	}
	tv.pivotRefusedAsUnused(t)
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared, top: lockmgr.Exclusive, base: lockmgr.Exclusive})
	info, err := tv.vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "bare", Action: vmlockpb.BlockJobAction_BLOCK_JOB_ABORT})
	if err != nil || info.Phase != phaseAborted {
		t.Fatalf("abort: %+v %v", info, err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared, top: lockmgr.Exclusive, base: lockmgr.Shared})
}

// The same for a copy: the pivot is refused, and an abort leaves the copy
// complete and releases it.
func TestPivotOfACopyOfADiskNothingUsesIsRefused(t *testing.T) {
	tv := startJobTestVM(t)
	top, base := tv.attachBareDisk(t)
	dest := filepath.Join(tv.dir, "copy.qcow2")
	if _, err := tv.vm.blockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Disk: "bare", Dest: dest}); err != nil {
		t.Fatal(err)
	}
	tv.pivotRefusedAsUnused(t)
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared, top: lockmgr.Exclusive, base: lockmgr.Shared, dest: lockmgr.Exclusive})
	info, err := tv.vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "bare", Action: vmlockpb.BlockJobAction_BLOCK_JOB_ABORT})
	if err != nil || info.Phase != phaseAborted {
		t.Fatalf("abort: %+v %v", info, err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared, top: lockmgr.Exclusive, base: lockmgr.Shared})
	if out, err := exec.Command("qemu-img", "compare", "-U", top, dest).CombinedOutput(); err != nil {
		t.Fatalf("the copy after the abort: %v\n%s", err, out)
	}
}

// With a lease on the image itself (direct), blockcopy creates a new
// target, then locks it. Another owner that locks the file in between may
// be using it: the copy is refused as busy naming that owner, and the
// file is left in place, not removed from under it.
func TestBlockCopyLeavesANewTargetAnotherOwnerLockedFirst(t *testing.T) {
	tv := startJobTestVM(t)
	dest := filepath.Join(tv.dir, "copy.qcow2")
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	tv.d.qemu.copyHook = func(step, p string) {
		if step != "created" {
			return
		}
		if _, err := tv.d.acquire(tv.ctx, callerOf(tv.ctx), &vmlockpb.AcquireRequest{
			Object:    api.ObjectToPB(lockmgr.Object{UUID: "0ddba11e-0000-4000-8000-000000000002", Name: "other", PID: other.Process.Pid}),
			Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(p, lockmgr.Exclusive))}}); err != nil {
			t.Errorf("the other owner locking %s: %v", p, err)
		}
	}
	_, err := tv.vm.blockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Disk: "drive0", Dest: dest})
	if !errors.Is(err, lockmgr.ErrBusy) || !strings.Contains(err.Error(), `"other"`) || !strings.Contains(err.Error(), "left in place") {
		t.Fatalf("blockcopy to a new target another owner locked first: %v, want busy naming it and saying the file is left", err)
	}
	if _, err := os.Lstat(dest); err != nil {
		t.Fatalf("the target the other owner holds: %v, want it left in place", err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
	if jobs, err := qemu.QueryJobs(tv.ctx, tv.vm.c); err != nil || len(jobs) != 0 {
		t.Fatalf("QEMU's jobs after the refused copy: %+v %v", jobs, err)
	}
}

// A QEMU whose graph cannot be read when vmlockd first attaches (a stream
// job started through another monitor waits to be dismissed, and QEMU 7.2
// crashes if asked for its block nodes then) is neither crashed nor
// killed as a VM whose images cannot be locked: its guest stays paused,
// with the locks vmlock run took, until the job is dismissed; then
// vmlockd checks the locks against QEMU's graph and the guest runs.
func TestGuestStaysPausedWhileAStreamWaitsToBeDismissed(t *testing.T) {
	tv := newJobTestVM(t, "drive0")
	sub := tv.test.Subscribe(qemu.EventJobStatusChange)
	defer sub.Close()
	if err := tv.test.Execute(tv.ctx, "block-stream", map[string]any{"job-id": "mine", "device": "drive0", "auto-dismiss": false}, nil); err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := sub.Next(tv.ctx)
		if err != nil {
			t.Fatal(err)
		}
		var d qemu.JobStatusChange
		if ev.DecodeData(&d) == nil && d.Status == qemu.JobConcluded {
			break
		}
	}
	tv.supervise(t)
	if err := tv.vm.waitAttached(tv.ctx); err != nil {
		t.Fatal(err)
	}
	if e := tv.vm.errText(); !strings.Contains(e, `stream job "mine"`) {
		t.Fatalf("supervising QEMU while stream job mine waits to be dismissed: %q, want it to say so", e)
	}
	if st := tv.status(t); st != "prelaunch" {
		t.Fatalf("QEMU's status before the graph could be read: %s, want prelaunch (paused before its guest ran)", st)
	}
	// The top no longer names a backing file: vmlock run locked it alone.
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive})
	if err := qemu.JobDismiss(tv.ctx, tv.test, "mine"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); tv.status(t) != "running"; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU never ran once the stream was dismissed: %s (%s)", tv.status(t), tv.vm.errText())
		}
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive})
	if e := tv.vm.errText(); e != "" {
		t.Fatalf("supervising QEMU once the stream was dismissed: %s", e)
	}
}

// With direct leases, blockcopy creates a new target, then locks it. If
// that lock fails for any reason (here: the caller gives up), vmlockd does
// not hold it, so another owner may have locked the file meanwhile: it is
// left in place, and the error says so.
func TestBlockCopyLeavesANewTargetItCouldNotLock(t *testing.T) {
	tv := startJobTestVM(t)
	dest := filepath.Join(tv.dir, "copy.qcow2")
	ctx, cancel := context.WithCancel(tv.ctx)
	defer cancel()
	tv.d.qemu.copyHook = func(step, p string) {
		if step == "created" {
			cancel()
		}
	}
	_, err := tv.vm.blockCopy(ctx, &vmlockpb.BlockCopyRequest{Disk: "drive0", Dest: dest})
	if !errors.Is(err, lockmgr.ErrTimeout) || !strings.Contains(err.Error(), "cannot lock it, so it is left in place") {
		t.Fatalf("blockcopy whose caller gave up before the new target was locked: %v, want a timeout saying the file is left", err)
	}
	if _, err := os.Lstat(dest); err != nil {
		t.Fatalf("the target vmlockd could not lock: %v, want it left in place", err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
	if jobs, err := qemu.QueryJobs(tv.ctx, tv.vm.c); err != nil || len(jobs) != 0 {
		t.Fatalf("QEMU's jobs after the refused copy: %+v %v", jobs, err)
	}
}

// A copy that fails in QEMU (here: QEMU cannot open the target, emptied
// before it did) removes the new target vmlockd created for it, and does
// so while the VM still holds its lock: another owner that tries to lock
// the file then is refused, and so never uses a file that is being removed.
func TestBlockCopyRemovesTheTargetItCreatedBeforeReleasingIt(t *testing.T) {
	tv := startJobTestVM(t)
	dest := filepath.Join(tv.dir, "copy.qcow2")
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	var otherErr error
	removing := false
	tv.d.qemu.copyHook = func(step, p string) {
		switch step {
		case "formatted":
			if err := os.Truncate(p, 0); err != nil {
				t.Error(err)
			}
			return
		case "remove":
		default:
			return
		}
		removing = true
		_, otherErr = tv.d.acquire(tv.ctx, callerOf(tv.ctx), &vmlockpb.AcquireRequest{
			Object:    api.ObjectToPB(lockmgr.Object{UUID: "0ddba11e-0000-4000-8000-000000000003", Name: "other", PID: other.Process.Pid}),
			Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(p, lockmgr.Exclusive))}})
	}
	_, err := tv.vm.blockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Disk: "drive0", Dest: dest})
	if !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "QEMU cannot open the copy target") {
		t.Fatalf("blockcopy to a target QEMU cannot open: %v, want QEMU's refusal", err)
	}
	if !removing {
		t.Fatal("vmlockd did not remove the target it created")
	}
	if !errors.Is(otherErr, lockmgr.ErrBusy) {
		t.Fatalf("another owner locking the target while vmlockd removes it: %v, want busy", otherErr)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the target after the refused copy: %v, want it removed", err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
}

// Bad arguments of a block job are refused as invalid, naming the field,
// before anything is done: no job in QEMU, the locks as they were, no
// copy target created.
func TestBlockJobArgumentsAreCheckedBeforeAnythingIsDone(t *testing.T) {
	tv := startJobTestVM(t)
	q := &qemuService{s: tv.d.qemu}
	dest := filepath.Join(tv.dir, "copy.qcow2")
	for _, tc := range []struct {
		name, field string
		call        func() error
	}{
		{"active commit with a negative bandwidth", "bandwidth", func() error {
			_, err := q.BlockCommit(tv.ctx, &vmlockpb.BlockCommitRequest{Vm: tv.vm.uuid, Disk: tv.disk, Active: true, Bandwidth: -1})
			return err
		}},
		{"copy with a negative bandwidth", "bandwidth", func() error {
			_, err := q.BlockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Vm: tv.vm.uuid, Disk: tv.disk, Dest: dest, Bandwidth: -1 << 20})
			return err
		}},
		{"copy into a format that is no image format", "format", func() error {
			_, err := q.BlockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Vm: tv.vm.uuid, Disk: tv.disk, Dest: dest, Format: "file"})
			return err
		}},
		{"copy into an unknown format", "format", func() error {
			_, err := q.BlockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Vm: tv.vm.uuid, Disk: tv.disk, Dest: dest, Format: "qcow3"})
			return err
		}},
		{"wait for a negative time", "wait_ms", func() error {
			_, err := q.BlockJob(tv.ctx, &vmlockpb.BlockJobRequest{Vm: tv.vm.uuid, Disk: tv.disk, Action: vmlockpb.BlockJobAction_BLOCK_JOB_WAIT, WaitMs: -1})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("got %v, want invalid argument naming %s", err, tc.field)
			}
			tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
			if jobs, err := qemu.QueryJobs(tv.ctx, tv.vm.c); err != nil || len(jobs) != 0 {
				t.Fatalf("QEMU's jobs after the refusal: %+v %v", jobs, err)
			}
			if _, err := os.Lstat(dest); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the copy target after the refusal: %v, want none", err)
			}
		})
	}
}

// A copy into a new target whose job QEMU refuses (here: another process
// reads the target with force-share, holding QEMU's "consistent read"
// lock, which a mirror's target must not share) fails saying QEMU refused,
// in QEMU's words; the target, which vmlockd created, is removed from QEMU
// and from the disk, the locks are as before, no job is left, the guest
// runs on, and the copy succeeds once the reader is gone.
func TestBlockCopyWhoseJobQEMURefusesRemovesTheTargetItCreated(t *testing.T) {
	tv := startJobTestVM(t)
	dest := filepath.Join(tv.dir, "copy.qcow2")
	var release func()
	tv.d.qemu.copyHook = func(step, p string) {
		if step == "formatted" {
			release = qemutest.HoldOpen(t, p, "-r", "-U")
		}
	}
	_, err := tv.vm.blockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Disk: "drive0", Dest: dest})
	if !strings.Contains(fmt.Sprint(err), "QEMU refused the job, a copy of disk drive0 into "+dest+": ") || !strings.Contains(fmt.Sprint(err), `Failed to get shared "consistent read" lock`) {
		t.Fatalf("blockcopy whose mirror QEMU refuses: %v, want QEMU's refusal in its words", err)
	}
	release()
	tv.d.qemu.copyHook = nil
	if _, err := os.Lstat(dest); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the target vmlockd created, after the refused copy: %v, want it removed", err)
	}
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared})
	if jobs, err := qemu.QueryJobs(tv.ctx, tv.vm.c); err != nil || len(jobs) != 0 {
		t.Fatalf("QEMU's jobs after the refused copy: %+v %v", jobs, err)
	}
	if info, err := tv.vm.blockJobAction(tv.ctx, &vmlockpb.BlockJobRequest{Disk: "drive0"}); err != nil || info.Phase != "none" {
		t.Fatalf("vmlock blockjob after the refused copy: %v %v, want no job", info, err)
	}
	if len(tv.vm.rec.Jobs) != 0 {
		t.Fatalf("the VM's record after the refused copy: %+v, want no job", tv.vm.rec.Jobs)
	}
	var nodes []qemu.NodeInfo
	if err := tv.test.Execute(tv.ctx, "query-named-block-nodes", map[string]bool{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Filename == dest {
			t.Fatalf("QEMU still has node %s on the removed target", n.Name)
		}
	}
	if st := tv.status(t); st != "running" {
		t.Fatalf("QEMU after the refused copy: %s, want running", st)
	}

	if _, err := tv.vm.blockCopy(tv.ctx, &vmlockpb.BlockCopyRequest{Disk: "drive0", Dest: dest}); err != nil {
		t.Fatalf("blockcopy again, once the reader is gone: %v", err)
	}
	tv.waitPhase(t, phaseReady)
	tv.wantLocks(t, map[string]lockmgr.Mode{tv.top: lockmgr.Exclusive, tv.base: lockmgr.Shared, dest: lockmgr.Exclusive})
}
