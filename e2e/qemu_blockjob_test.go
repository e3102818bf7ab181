package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

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

// setSpeed sets a running job's speed limit through the test's monitor
// (0: no limit).
func (v *vm) setSpeed(id string, speed int) {
	v.t.Helper()
	if err := v.mon.Execute(qctx(v.t), "block-job-set-speed", map[string]any{"device": id, "speed": speed}, nil); err != nil {
		v.t.Fatal(err)
	}
}

// waitJobEnded polls vmlock blockjob VM DISK until it shows the job ended.
func (d *daemon) waitJobEnded(vmName, disk string) map[string]any {
	d.t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		info := d.jobInfo(vmName, disk)
		if info["ended"] == true {
			return info
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("the job on %s never ended: %v", disk, info)
		}
	}
}

// nodeOf returns the name of the qcow2 node QEMU opened for image path.
func (v *vm) nodeOf(path string) string {
	v.t.Helper()
	var nodes []struct {
		Name   string `json:"node-name"`
		Driver string `json:"drv"`
		File   string `json:"file"`
	}
	if err := v.mon.Execute(qctx(v.t), "query-named-block-nodes", map[string]bool{"flat": true}, &nodes); err != nil {
		v.t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Driver == "qcow2" && n.File == path {
			return n.Name
		}
	}
	v.t.Fatalf("no qcow2 node for %s: %+v", path, nodes)
	return ""
}

// A backup started through QEMU's monitor (drive-backup, QEMU creating the
// target) is adopted: vmlock blockjob shows it, the target is locked
// exclusively while QEMU writes it, and released once the job ended and
// QEMU closed it.
func TestQEMUBackupStartedThroughQMPLocksItsTargetUntilItEnds(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "backup.qcow2")
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	// Slow: the job cannot be done before vmlockd sees it.
	if err := v.mon.Execute(qctx(t), "drive-backup", map[string]any{"job-id": "mine", "device": "drive0", "target": dest, "format": "qcow2", "sync": "full", "speed": 1}, nil); err != nil {
		t.Fatal(err)
	}
	info := d.jobInfo("vm1", "drive0")
	if info["id"] != "mine" || info["type"] != "backup" || info["phase"] != "running" || info["target"] != dest || info["top"] != ch.top {
		t.Fatalf("blockjob vm1 drive0 of a backup started through QMP: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, dest: lockmgr.Exclusive})
	v.setSpeed("mine", 0)
	if info := d.waitJobEnded("vm1", "drive0"); info["phase"] != "completed" {
		t.Fatalf("after the backup: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	v.quit()
	checkMerged(t, dest)
}

// A backup into a node that QEMU keeps open after the job (blockdev-backup
// to a node added beforehand) can be aborted through vmlock; its target
// stays locked exclusively while QEMU has it open, as any image it may
// write, and is released when the node is removed.
func TestQEMUBackupIntoANodeQEMUKeepsIsAbortedAndItsTargetStaysLocked(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "backup.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", dest, "4M")
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	d.mustRun("disk", "attach", "vm1", dest, "--node", "bk")
	if err := v.mon.Execute(qctx(t), "blockdev-backup", map[string]any{"job-id": "mine", "device": "drive0", "target": "bk", "sync": "full", "speed": 1}, nil); err != nil {
		t.Fatal(err)
	}
	if info := d.jobInfo("vm1", "drive0"); info["id"] != "mine" || info["type"] != "backup" || info["target"] != dest {
		t.Fatalf("blockjob vm1 drive0 of a backup started through QMP: %v", info)
	}
	chain := map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, dest: lockmgr.Exclusive}
	d.wantLocks(v.pid(), chain)
	d.mustRun("blockjob", "vm1", "drive0", "--abort")
	if info := d.jobInfo("vm1", "drive0"); info["id"] != "mine" || info["phase"] != "cancelled" {
		t.Fatalf("after the abort: %v", info)
	}
	d.wantLocks(v.pid(), chain)
	d.mustRun("disk", "detach", "vm1", "bk")
	delete(chain, dest)
	d.wantLocks(v.pid(), chain)
	v.quit()
}

// A stream started through QEMU's monitor (block-stream into the active
// image, no base) is adopted: the image it writes stays exclusive, the
// images it reads stay shared while it runs, and once it has pulled them
// into the top and QEMU dropped them from the chain, they are released.
func TestQEMUStreamStartedThroughQMPIsAdoptedAndReleasesThePulledImages(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	if err := v.mon.Execute(qctx(t), "block-stream", map[string]any{"job-id": "mine", "device": "drive0", "speed": 1}, nil); err != nil {
		t.Fatal(err)
	}
	info := d.jobInfo("vm1", "drive0")
	if info["id"] != "mine" || info["type"] != "stream" || info["phase"] != "running" || info["top"] != ch.top || info["base"] != nil {
		t.Fatalf("blockjob vm1 drive0 of a stream started through QMP: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	v.setSpeed("mine", 0)
	if info := d.waitJobEnded("vm1", "drive0"); info["phase"] != "completed" {
		t.Fatalf("after the stream: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, ch.top)
	if out := runTool(t, "qemu-img", "info", "-U", ch.top); strings.Contains(out, "backing file") {
		t.Fatalf("the top still has a backing file after the stream:\n%s", out)
	}
}

// A stream into a backing image (block-stream of an intermediate node)
// writes that image: it is locked exclusively while the job runs, and an
// abort through vmlock puts it back to shared.
func TestQEMUStreamIntoABackingImageLocksItExclusivelyWhileItRuns(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	if err := v.mon.Execute(qctx(t), "block-stream", map[string]any{"job-id": "mine", "device": v.nodeOf(ch.mid), "speed": 1}, nil); err != nil {
		t.Fatal(err)
	}
	if info := d.jobInfo("vm1", "drive0"); info["id"] != "mine" || info["type"] != "stream" || info["top"] != ch.mid {
		t.Fatalf("blockjob vm1 drive0 of a stream into mid: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Exclusive, ch.base: lockmgr.Shared})
	d.mustRun("blockjob", "vm1", "drive0", "--abort")
	if info := d.jobInfo("vm1", "drive0"); info["phase"] != "cancelled" {
		t.Fatalf("after the abort: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	v.quit()
}

// A stream that QEMU ends before vmlockd could adopt it (nothing slows
// it) still has the locks follow QEMU's graph: the images it dropped from
// the chain are released.
func TestQEMUStreamThatEndedBeforeVmlockdSawItReleasesThePulledImages(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	if err := v.mon.Execute(qctx(t), "block-stream", map[string]any{"job-id": "mine", "device": "drive0"}, nil); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprint(map[string]string{ch.top: fmt.Sprintf("%s %d", lockmgr.Exclusive, v.pid())})
	for deadline := time.Now().Add(20 * time.Second); fmt.Sprint(d.modes()) != want; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("locks after the stream: %v, want %s", d.modes(), want)
		}
	}
	v.quit()
	checkMerged(t, ch.top)
}

// watchCreates reports the names created (or moved) in dir from now on;
// call the function it returns to read them.
func watchCreates(t *testing.T, dir string) func() []string {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		t.Fatal(err)
	}
	return func() []string {
		var names []string
		buf := make([]byte, 64<<10)
		for {
			n, err := unix.Read(fd, buf)
			if err == unix.EAGAIN {
				return names
			}
			if err != nil {
				t.Fatal(err)
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				l := int(*(*uint32)(unsafe.Pointer(&buf[off+12]))) // InotifyEvent.Len
				name := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+l]
				names = append(names, string(bytes.TrimRight(name, "\x00")))
				off += unix.SizeofInotifyEvent + l
			}
		}
	}
}

// With lease files (--disk-lease-dir) a path can be locked before the
// image exists, by whoever is about to create it. A blockcopy to such a
// path is refused naming the holder, and vmlockd never creates the file,
// not even for a moment: it is the holder's to create.
func TestQEMUBlockCopyToAPathAnotherOwnerLockedNeverCreatesIt(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t, "--disk-lease-dir", filepath.Join(t.TempDir(), "leases"))
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	creator := d.startRun("creator", "--disk", dest)
	created := watchCreates(t, ch.dir)
	r := d.vmlock("blockcopy", "vm1", "drive0", dest)
	if r.code != 3 || !strings.Contains(r.stderr, `"creator"`) {
		t.Fatalf("blockcopy to a path creator locked: exit %d, stderr %q; want 3 naming creator", r.code, r.stderr)
	}
	if names := created(); slices.Contains(names, "copy.qcow2") {
		t.Fatalf("vmlockd created %s, which creator has locked (names created: %q)", dest, names)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after the refused blockcopy: %v, want no file", err)
	}
	want := map[string]string{ch.top: fmt.Sprintf("exclusive %d", v.pid()), ch.mid: fmt.Sprintf("shared %d", v.pid()),
		ch.base: fmt.Sprintf("shared %d", v.pid()), dest: fmt.Sprintf("exclusive %d", creator.Process.Pid)}
	if got := d.modes(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("locks after the refused blockcopy:\n got %v\nwant %v", got, want)
	}
	v.quit()
}

// With lease files, a blockcopy to a new path locks the path, then
// creates the image there: the copy runs, its target exclusive.
func TestQEMUBlockCopyWithLeaseFilesLocksThenCreatesTheTarget(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t, "--disk-lease-dir", filepath.Join(t.TempDir(), "leases"))
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	mustContain(t, "blockcopy --wait", d.mustRun("blockcopy", "vm1", "drive0", dest, "--wait"), "Now in mirroring phase")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, dest: lockmgr.Exclusive})
	d.mustRun("blockjob", "vm1", "drive0", "--pivot")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, dest)
}

// A blockcopy into an image another owner holds is refused with the
// daemon's whole message: what could not start, then who holds the image.
func TestQEMUBlockCopyRefusedAsBusySaysTheCopyCannotStart(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", dest, "4M")
	d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	holder := d.startRun("holder", "--disk", dest)
	r := d.vmlock("blockcopy", "vm1", "drive0", dest, "--reuse-external")
	want := fmt.Sprintf(`vmlock: the copy cannot start: disk %s is locked exclusively by vm "holder"`, dest)
	if r.code != 3 || !strings.HasPrefix(r.stderr, want) || !strings.Contains(r.stderr, fmt.Sprintf("pid %d", holder.Process.Pid)) {
		t.Fatalf("blockcopy into an image holder has: exit %d, stderr %q; want 3 and %q... naming its pid", r.code, r.stderr, want)
	}
}

// waitLocks waits until the lock monitor lists exactly want, each held by
// pid alone.
func (d *daemon) waitLocks(pid int, want map[string]lockmgr.Mode) {
	d.t.Helper()
	exp := map[string]string{}
	for p, m := range want {
		exp[p] = fmt.Sprintf("%s %d", m, pid)
	}
	for deadline := time.Now().Add(20 * time.Second); fmt.Sprint(d.modes()) != fmt.Sprint(exp); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			d.t.Fatalf("locks:\n got %v\nwant %v", d.modes(), exp)
		}
	}
}

// alive checks that QEMU still answers on the test's monitor.
func (v *vm) alive() {
	v.t.Helper()
	if err := v.mon.Execute(qctx(v.t), "query-status", nil, nil); err != nil {
		v.t.Fatalf("QEMU no longer answers: %v; exit: %v; stderr: %s", err, v.cmd.Wait(), v.errb)
	}
}

// QEMU 7.2 crashes (SIGSEGV) when asked for its block nodes while a stream
// job started with auto-dismiss=false has ended and waits to be dismissed.
// A vmlockd restarted in that window must not ask: QEMU lives on, the
// locks stay as they were (the images the stream pulled in stay locked
// longer, never fewer), and vmlock says why it cannot read the graph; once
// the job's creator dismisses it, the locks follow QEMU's graph.
func TestQEMUStreamWaitingToBeDismissedSurvivesARestartOfVmlockd(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	chain := map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared}
	d.kill9()
	if err := v.mon.Execute(qctx(t), "block-stream", map[string]any{"job-id": "mine", "device": "drive0", "auto-dismiss": false}, nil); err != nil {
		t.Fatal(err)
	}
	v.waitJobStatus("mine", "concluded")
	d.start()
	// vmlock blockjob waits until vmlockd has re-attached to QEMU.
	r := d.vmlock("blockjob", "vm1", "drive0")
	v.alive()
	if r.code == 0 || !strings.Contains(r.stderr, `job "mine"`) || !strings.Contains(r.stderr, "dismiss") {
		t.Fatalf("vmlock blockjob vm1 drive0 while the stream waits to be dismissed: exit %d\nstdout: %s\nstderr: %s\nwant it to say job \"mine\" must be dismissed", r.code, r.stdout, r.stderr)
	}
	r = d.vmlock("vms", "vm1")
	v.alive()
	if !strings.Contains(r.stdout, `job "mine"`) {
		t.Fatalf("vmlock vms vm1 while the stream waits to be dismissed: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	r = d.vmlock("disk", "detach", "vm1", "drive0")
	v.alive()
	if r.code == 0 || !strings.Contains(r.stderr, `job "mine"`) {
		t.Fatalf("vmlock disk detach while the stream waits to be dismissed: exit %d, stderr %q", r.code, r.stderr)
	}
	d.wantLocks(v.pid(), chain)
	if err := v.mon.Execute(qctx(t), "job-dismiss", map[string]any{"id": "mine"}, nil); err != nil {
		t.Fatal(err)
	}
	d.waitLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, ch.top)
}

// waitJobPhase polls vmlock blockjob VM DISK until it shows the job in
// phase.
func (d *daemon) waitJobPhase(vmName, disk, phase string) map[string]any {
	d.t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		info := d.jobInfo(vmName, disk)
		if info["phase"] == phase {
			return info
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("the job on %s never reached phase %s: %v", disk, phase, info)
		}
	}
}

// A job started through another monitor with auto-dismiss=false is its
// creator's to dismiss (it wants to read the outcome): vmlockd leaves it
// concluded in QEMU, shows it so, keeps its locks meanwhile (without
// asking QEMU 7.2 for its graph, which would crash it), and moves them
// when the creator dismisses it.
func TestQEMUJobStartedThroughQMPWithoutAutoDismissIsLeftForItsCreatorToDismiss(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	chain := map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared}
	// Slow: the job cannot be done before vmlockd sees it.
	if err := v.mon.Execute(qctx(t), "block-stream", map[string]any{"job-id": "mine", "device": "drive0", "speed": 1, "auto-dismiss": false}, nil); err != nil {
		t.Fatal(err)
	}
	if info := d.jobInfo("vm1", "drive0"); info["id"] != "mine" || info["type"] != "stream" || info["phase"] != "running" {
		t.Fatalf("blockjob vm1 drive0 of a stream started through QMP: %v", info)
	}
	v.setSpeed("mine", 0)
	if info := d.waitJobPhase("vm1", "drive0", "concluded"); info["ended"] == true || info["qemu_status"] != "concluded" {
		t.Fatalf("blockjob vm1 drive0 once the stream ended in QEMU: %v", info)
	}
	var jobs []struct{ ID, Status string }
	if err := v.mon.Execute(qctx(t), "query-jobs", nil, &jobs); err != nil || len(jobs) != 1 || jobs[0].Status != "concluded" {
		t.Fatalf("QEMU's jobs once vmlockd saw the stream end: %+v %v, want mine concluded", jobs, err)
	}
	r := d.vmlock("vms", "vm1")
	v.alive()
	if !strings.Contains(r.stdout, `job "mine"`) {
		t.Fatalf("vmlock vms vm1 while the stream waits to be dismissed: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	d.wantLocks(v.pid(), chain)
	if err := v.mon.Execute(qctx(t), "job-dismiss", map[string]any{"id": "mine"}, nil); err != nil {
		t.Fatal(err)
	}
	if info := d.waitJobEnded("vm1", "drive0"); info["phase"] != "completed" {
		t.Fatalf("after the creator dismissed the stream: %v", info)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, ch.top)
}
