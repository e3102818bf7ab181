package e2e

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

// exportedChainArgs are the QEMU arguments of ch as explicit nodes base ←
// mid ← top, none of them a drive or a guest device.
func exportedChainArgs(ch *vchain) []string {
	node := func(name, file, backing string) string {
		b := "null"
		if backing != "" {
			b = fmt.Sprintf("%q", backing)
		}
		return fmt.Sprintf(`{"driver":"qcow2","node-name":%q,"backing":%s,"file":{"driver":"file","filename":%q}}`, name, b, file)
	}
	return []string{"-blockdev", node("base", ch.base, ""), "-blockdev", node("mid", ch.mid, "base"), "-blockdev", node("top", ch.top, "mid")}
}

// export serves node over NBD as block export id (the only user of the
// disk: no drive, no guest device).
func (v *vm) export(dir, id, node string) {
	v.t.Helper()
	ctx := qctx(v.t)
	if err := v.mon.Execute(ctx, "nbd-server-start", map[string]any{
		"addr": map[string]any{"type": "unix", "data": map[string]any{"path": filepath.Join(dir, id+".nbd")}},
	}, nil); err != nil {
		v.t.Fatal(err)
	}
	if err := v.mon.Execute(ctx, "block-export-add", map[string]any{
		"type": "nbd", "id": id, "node-name": node, "writable": true,
	}, nil); err != nil {
		v.t.Fatal(err)
	}
}

// leftover are the locks of ch's top and mid once a pivot made base the
// active image: -blockdev nodes stay open in QEMU (top read-write) until
// they are removed, so they stay locked, over base exclusive.
func leftover(ch *vchain) map[string]lockmgr.Mode {
	return map[string]lockmgr.Mode{ch.base: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.top: lockmgr.Exclusive}
}

// removeLeftovers detaches ch's old top and mid nodes, which releases them.
func (d *daemon) removeLeftovers(v *vm, ch *vchain) {
	d.t.Helper()
	d.mustRun("disk", "detach", "vm1", "top")
	d.mustRun("disk", "detach", "vm1", "mid")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.base: lockmgr.Exclusive})
}

// A disk that only a block export uses is named by the export's id, which
// a pivot does not change (its top node's name does). After the pivot the
// base is the disk's active image, exclusive, although the old top nodes
// (still in QEMU) name it as their backing node; the job is still found
// under the name it was started with.
func TestQEMUExportedDiskKeepsItsNameAndItsJobAcrossAPivot(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, exportedChainArgs(ch)...)
	v.export(ch.dir, "exp0", "top")
	d.mustRun("blockcommit", "vm1", "top", "--active", "--wait")
	if info := d.jobInfo("vm1", "top"); info["disk"] != "exp0" || info["phase"] != "ready" {
		t.Fatalf("blockjob vm1 top at ready: %v", info)
	}
	d.mustRun("blockjob", "vm1", "top", "--pivot")
	for _, name := range []string{"top", "exp0"} {
		if info := d.jobInfo("vm1", name); info["disk"] != "exp0" || info["phase"] != "pivoted" {
			t.Fatalf("blockjob vm1 %s after the pivot: %v", name, info)
		}
	}
	d.wantLocks(v.pid(), leftover(ch))
	d.removeLeftovers(v, ch)
	v.quit()
	checkMerged(t, ch.base)
}

// The same when the pivot ended while vmlockd was down (here: asked for
// through QMP then; as when vmlockd dies right after asking): the
// restarted vmlockd reports a pivot, and locks the new active image
// exclusively.
func TestQEMUExportedDiskPivotedWhileVmlockdWasDown(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, exportedChainArgs(ch)...)
	v.export(ch.dir, "exp0", "top")
	d.mustRun("blockcommit", "vm1", "top", "--active", "--wait")
	info := d.jobInfo("vm1", "top")
	d.kill9()
	if err := v.mon.Execute(qctx(t), "job-complete", map[string]any{"id": info["id"]}, nil); err != nil {
		t.Fatal(err)
	}
	v.waitJobStatus(fmt.Sprint(info["id"]), "concluded")
	d.start()
	for _, name := range []string{"top", "exp0"} {
		if info := d.jobInfo("vm1", name); info["disk"] != "exp0" || info["phase"] != "pivoted" {
			t.Fatalf("blockjob vm1 %s after the restart: %v, want pivoted", name, info)
		}
	}
	d.wantLocks(v.pid(), leftover(ch))
	d.removeLeftovers(v, ch)
	v.quit()
	checkMerged(t, ch.base)
}

// waitJobStatus waits until QEMU lists job id in status.
func (v *vm) waitJobStatus(id, status string) {
	v.t.Helper()
	ctx := qctx(v.t)
	for {
		var jobs []struct{ ID, Status string }
		if err := v.mon.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
			v.t.Fatal(err)
		}
		i := slices.IndexFunc(jobs, func(j struct{ ID, Status string }) bool { return j.ID == id })
		if i >= 0 && jobs[i].Status == status {
			return
		}
		select {
		case <-ctx.Done():
			v.t.Fatalf("job %s never became %s: %+v", id, status, jobs)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// A block job started through QEMU's monitor directly (not through vmlock)
// is adopted: vmlock blockjob shows it, its base is locked exclusively,
// and an abort through vmlock puts the base back to shared.
func TestQEMUCommitStartedThroughQMPIsAdoptedAndCanBeAborted(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	if err := v.mon.Execute(qctx(t), "block-commit", map[string]any{"job-id": "mine", "device": "drive0"}, nil); err != nil {
		t.Fatal(err)
	}
	v.waitJobStatus("mine", "ready")
	info := d.jobInfo("vm1", "drive0")
	if info["id"] != "mine" || info["type"] != "active-commit" || info["phase"] != "ready" || info["base"] != ch.base {
		t.Fatalf("blockjob vm1 drive0 of a commit started through QMP: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Exclusive})
	d.mustRun("blockjob", "vm1", "drive0", "--abort")
	if info := d.jobInfo("vm1", "drive0"); info["id"] != "mine" || info["phase"] != "aborted" {
		t.Fatalf("after the abort: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	v.quit()
}

// A copy started through QEMU's monitor (drive-mirror, QEMU creating the
// target) is adopted: the target is locked exclusively while QEMU writes
// it, and a pivot through vmlock leaves it the disk's only image.
func TestQEMUCopyStartedThroughQMPIsAdoptedAndCanBePivoted(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	if err := v.mon.Execute(qctx(t), "drive-mirror", map[string]any{"job-id": "mine", "device": "drive0", "target": dest, "format": "qcow2", "sync": "full"}, nil); err != nil {
		t.Fatal(err)
	}
	v.waitJobStatus("mine", "ready")
	if info := d.jobInfo("vm1", "drive0"); info["id"] != "mine" || info["type"] != "copy" || info["phase"] != "ready" || info["target"] != dest {
		t.Fatalf("blockjob vm1 drive0 of a copy started through QMP: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, dest: lockmgr.Exclusive})
	d.mustRun("blockjob", "vm1", "drive0", "--pivot")
	if info := d.jobInfo("vm1", "drive0"); info["phase"] != "pivoted" {
		t.Fatalf("after the pivot: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, dest)
}

// A job started through QEMU's monitor that writes an image vmlock cannot
// lock for the VM (another owner shares it) is cancelled at once, and
// vmlock blockjob says why, naming the holder.
func TestQEMUJobStartedThroughQMPOnAnImageHeldElsewhereIsCancelled(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	reader := d.startRun("reader", "--disk", ch.base+":shared")
	// Slow: the job cannot be done before vmlockd sees it.
	if err := v.mon.Execute(qctx(t), "block-commit", map[string]any{"job-id": "mine", "device": "drive0", "speed": 1}, nil); err != nil {
		t.Fatal(err)
	}
	var info map[string]any
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if info = d.jobInfo("vm1", "drive0"); info["ended"] == true {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the job was not ended: %v", info)
		}
	}
	if info["id"] != "mine" || info["phase"] != "cancelled" || !strings.Contains(fmt.Sprint(info["error"]), `vm "reader"`) {
		t.Fatalf("blockjob vm1 drive0: %v, want cancelled naming the reader", info)
	}
	modes := d.modes()
	if want := fmt.Sprintf("shared %d,%d", v.pid(), reader.Process.Pid); modes[ch.base] != want {
		t.Fatalf("base: %q, want %q", modes[ch.base], want)
	}
	v.quit()
}
