package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/qemu"
	"github.com/vmlock/vmlock/qmp"
)

// Job types, as BlockJobInfo.type names them.
const (
	jobCommit       = "commit"        // intermediate: one phase
	jobActiveCommit = "active-commit" // two phases
	jobCopy         = "copy"          // two phases
	// Adopted only (started through another monitor), one phase each.
	jobBackup = "backup"
	jobStream = "stream"
)

// Job phases (BlockJobInfo.phase). The first four are a live job's.
const (
	phaseRunning   = "running"
	phaseReady     = "ready"
	phasePivoting  = "pivoting"
	phaseAborting  = "aborting"
	phasePivoted   = "pivoted"   // the base or the copy became the active image
	phaseAborted   = "aborted"   // a two-phase job ended without pivot: the top stays active
	phaseCompleted = "completed" // an intermediate commit ended
	phaseCancelled = "cancelled" // cancelled before it was ready
	phaseFailed    = "failed"
	// phaseConcluded: a job started through another monitor has ended in
	// QEMU and waits for its creator to dismiss it (auto-dismiss=false);
	// it ends (and its locks move) once it is dismissed.
	phaseConcluded = "concluded"
	// phaseUnknown: the job ended while vmlockd was down, and neither
	// QEMU nor its graph tells how (an adopted backup QEMU dismissed).
	phaseUnknown = "unknown"
)

// jobRecord is what survives a restart of vmlockd about a job.
type jobRecord struct {
	Disk string `json:"disk"`
	// Asked is the name the caller gave the disk, if not Disk (a node
	// name, a path): a pivot can take it from the disk, and the job must
	// stay findable by it.
	Asked string `json:"asked,omitempty"`
	ID    string `json:"id"`
	Type  string `json:"type"`
	// Top is the image the job reads from (a copy's or a backup's: the
	// disk's image it reads; a stream's: the image it writes), Base the
	// image a commit writes (a stream's: the image below which it reads
	// nothing, "" for none), Target the image a copy or a backup writes
	// (canonical paths). See written.
	Top    string `json:"top"`
	Base   string `json:"base,omitempty"`
	Target string `json:"target,omitempty"`
	// TargetNode is a copy target's node, deleted after an abort.
	TargetNode string `json:"target_node,omitempty"`
	// Delete lists the images to unlink once the job has succeeded; a
	// caller other than root (UID) may only have its own files unlinked.
	Delete []string `json:"delete,omitempty"`
	UID    int      `json:"uid"`
	// Foreign marks a job started through another monitor, which vmlockd
	// adopted (adoptLocked): its nodes are not vmlockd's to remove.
	Foreign bool `json:"foreign,omitempty"`
}

// blockJob is a disk's current job, or its last one once it ended. Its
// fields are guarded by the VM's lk.
type blockJob struct {
	rec     jobRecord
	q       *qemu.Job // tracks QEMU's events; nil until attached
	phase   string
	errMsg  string
	ended   bool
	deleted []string
	// changed is closed and replaced at every phase change; done is closed
	// once the job ended and the locks were moved.
	changed, done chan struct{}
}

func newBlockJob(rec jobRecord) *blockJob {
	return &blockJob{rec: rec, phase: phaseRunning, changed: make(chan struct{}), done: make(chan struct{})}
}

func (j *blockJob) twoPhase() bool { return j.rec.Type == jobActiveCommit || j.rec.Type == jobCopy }

// written is the image the job writes: a commit's base, a copy's or a
// backup's target, a stream's top.
func (r jobRecord) written() string {
	switch r.Type {
	case jobCopy, jobBackup:
		return r.Target
	case jobStream:
		return r.Top
	}
	return r.Base
}

func (vm *qemuVM) setPhaseLocked(j *blockJob, phase string) {
	j.phase = phase
	close(j.changed)
	j.changed = make(chan struct{})
}

// liveJobLocked returns the disk's job if it has not ended.
func (vm *qemuVM) liveJobLocked(disk string) *blockJob {
	if j := vm.jobs[disk]; j != nil && !j.ended {
		return j
	}
	return nil
}

var jobIDUnsafe = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// newJobIDLocked returns a fresh QEMU job id for a disk.
func (vm *qemuVM) newJobIDLocked(kind, disk string) string {
	vm.rec.Seq++
	return fmt.Sprintf("vmlock-%s-%s-%d", kind, jobIDUnsafe.ReplaceAllString(disk, "_"), vm.rec.Seq)
}

// newNodeNameLocked returns a fresh block node name. QEMU refuses node
// names longer than 31 bytes, so it does not include the disk's name.
func (vm *qemuVM) newNodeNameLocked(kind string) string {
	vm.rec.Seq++
	return fmt.Sprintf("vmlock-%s-%d", kind, vm.rec.Seq)
}

// jobDiskLocked finds the disk a request names, and refuses it while a
// block job runs on that disk (a second job, or a detach).
func (vm *qemuVM) jobDiskLocked(ctx context.Context, name string) (*qemu.Disk, error) {
	vm.adoptLocked(ctx)
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		return nil, err
	}
	d, err := findDisk(disks, name)
	if err != nil {
		return nil, err
	}
	if j := vm.liveJobLocked(d.Name); j != nil {
		todo := "pivot or abort it first"
		if j.phase == phaseConcluded {
			todo = "it has ended and waits for its creator to dismiss it (job-dismiss)"
		}
		return nil, lockmgr.Errorf(lockmgr.CodeNotRegistered, "disk %s already has a block job (%s %s, %s): %s", d.Name, j.rec.Type, j.rec.ID, j.phase, todo)
	}
	return d, nil
}

// imageIndex finds an image of the chain by path (absolute) or node name.
func imageIndex(imgs []qemu.Image, what, name string) (int, error) {
	if err := relativePath("--"+what, name); err != nil {
		return 0, err
	}
	canonical := name
	if r, err := lockmgr.Canonical(lockmgr.DiskResource(name, lockmgr.Exclusive)); err == nil && strings.ContainsRune(name, '/') {
		canonical = r.Name
	}
	for i, img := range imgs {
		if img.Node == name || img.Path == canonical {
			return i, nil
		}
	}
	return 0, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "--%s %s is not an image of the disk's chain", what, name)
}

// blockCommit starts a commit job; see the QEMU service's BlockCommit.
func (vm *qemuVM) blockCommit(ctx context.Context, req *vmlockpb.BlockCommitRequest) (*vmlockpb.BlockJobInfo, error) {
	if err := vm.lock(ctx); err != nil {
		return nil, err
	}
	defer vm.unlock()
	d, err := vm.jobDiskLocked(ctx, req.Disk)
	if err != nil {
		return nil, err
	}
	imgs := d.Images
	top := 0
	if req.Top != "" {
		if top, err = imageIndex(imgs, "top", req.Top); err != nil {
			return nil, err
		}
	}
	base := len(imgs) - 1
	switch {
	case req.Shallow && req.Base != "":
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "--shallow and --base exclude each other")
	case req.Shallow:
		base = top + 1
	case req.Base != "":
		if base, err = imageIndex(imgs, "base", req.Base); err != nil {
			return nil, err
		}
	}
	switch {
	case base <= top || base >= len(imgs):
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "nothing to commit: the base must be an image below the top in disk %s's chain (%d images)", d.Name, len(imgs))
	case top == 0 && !req.Active:
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument,
			"committing the active layer of disk %s requires --active: it is a two-phase job that runs until ready, then waits for you to pivot (--pivot) or abort (--keep-overlay, or vmlock blockjob --abort)", d.Name)
	case top > 0 && req.Active:
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "--active commits the active layer, but --top names backing image %s", imgs[top].Path)
	case imgs[base].Path == "":
		return nil, lockmgr.Errorf(lockmgr.CodeUnsupported, "the base of disk %s is not a local file: vmlock cannot lock it", d.Name)
	}
	rec := jobRecord{Disk: d.Name, Asked: asked(d, req.Disk), Type: jobCommit, Top: imgs[top].Path, Base: imgs[base].Path, UID: callerOf(ctx).uid}
	if top == 0 {
		rec.Type = jobActiveCommit
	}
	if req.Delete {
		for _, img := range imgs[top:base] {
			rec.Delete = append(rec.Delete, img.Path)
		}
	}
	// Locks follow the data: the base (and its data file) is QEMU's to
	// write from now on.
	for i, p := range []string{rec.Base, imgs[base].DataFile} {
		if p == "" {
			continue
		}
		what := "its base " + p
		if i > 0 {
			what = fmt.Sprintf("the data file %s of its base %s", p, rec.Base)
		}
		if err := vm.s.d.mgr.ChangeMode(ctx, vm.uuid, lockmgr.DiskResource(p, lockmgr.Exclusive)); err != nil {
			if rerr := vm.reconcileDetachedLocked(); rerr != nil {
				vm.s.log.Error("putting the locks back after a refused commit", "uuid", vm.uuid, "err", rerr)
			}
			return nil, fmt.Errorf("the commit cannot start: %s cannot be locked exclusively: %w", what, err)
		}
		vm.s.log.Info("QEMU lock", "uuid", vm.uuid, "name", vm.name, "image", p, "mode", "exclusive", "why", "commit base")
	}
	rec.ID = vm.newJobIDLocked("commit", d.Name)
	opts := qemu.CommitOptions{JobID: rec.ID, Device: d.Root, BaseNode: imgs[base].Node, Speed: req.Bandwidth, AutoDismiss: new(false)}
	if top > 0 {
		opts.TopNode = imgs[top].Node
	}
	return vm.startJobLocked(ctx, rec, func() (*qemu.Job, error) { return qemu.StartCommit(ctx, vm.c, opts) })
}

// errJobUnknown is wrapped by startJobLocked's error when QEMU did not say
// whether it started the job: the job and its locks are kept until the
// connection is re-attached, so its images must not be cleaned up.
var errJobUnknown = errors.New("QEMU did not answer whether it started the block job")

// startJobLocked records a job, starts it and tracks it; if QEMU refuses
// it, the locks are put back.
func (vm *qemuVM) startJobLocked(ctx context.Context, rec jobRecord, start func() (*qemu.Job, error)) (*vmlockpb.BlockJobInfo, error) {
	j := newBlockJob(rec)
	prev := vm.jobs[rec.Disk]
	vm.jobs[rec.Disk] = j
	vm.rec.Jobs = append(vm.rec.Jobs, rec)
	vm.saveLocked() // before QEMU starts writing: a restart must find the job
	q, err := start()
	var qe *qmp.Error
	if err != nil && !errors.As(err, &qe) {
		// QEMU did not answer (the caller gave up, or the connection was
		// lost): it may run the job all the same. Its word decides.
		actx, cancel := context.WithTimeout(vm.s.ctx, 10*time.Second)
		aq, aerr := qemu.Attach(actx, vm.c, rec.ID)
		cancel()
		switch {
		case aerr == nil:
			vm.s.log.Warn("QEMU started a block job whose start call failed; tracking it", "uuid", vm.uuid, "job", rec.ID, "err", err)
			q, err = aq, nil
		case !errors.Is(aerr, qemu.ErrNoSuchJob):
			// Unknown: keep the job and its locks, and reconnect; attach
			// then tracks the job or, if QEMU has none, ends it.
			vm.c.Close()
			vm.s.log.Error("cannot tell whether QEMU started a block job; keeping its locks until it is re-attached", "uuid", vm.uuid, "job", rec.ID, "err", err, "query", aerr)
			return nil, fmt.Errorf("%w: job %s (%w); see vmlock blockjob --info", errJobUnknown, rec.ID, err)
		}
	}
	if err != nil {
		if prev != nil {
			vm.jobs[rec.Disk] = prev
		} else {
			delete(vm.jobs, rec.Disk)
		}
		vm.dropJobRecordLocked(rec.ID)
		if rerr := vm.reconcileDetachedLocked(); rerr != nil {
			vm.s.log.Error("putting the locks back after QEMU refused a job", "uuid", vm.uuid, "err", rerr)
		}
		if qe != nil {
			// QEMU's words do not name the image (its lock errors say
			// only 'Failed to get "write" lock').
			kind := "commit"
			if rec.Type == jobCopy {
				kind = "copy"
			}
			return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: fmt.Sprintf("QEMU refused the job, a %s of disk %s into %s", kind, rec.Disk, rec.written()), Err: qe}
		}
		return nil, err
	}
	j.q = q
	vm.s.log.Info("block job started", "uuid", vm.uuid, "name", vm.name, "disk", rec.Disk, "job", rec.ID, "type", rec.Type,
		"top", rec.Top, "base", rec.Base, "target", rec.Target)
	go vm.watch(j, q)
	return vm.infoLocked(ctx, j), nil
}

// cleanupContext bounds the work that puts the locks (and QEMU's graph)
// back after an operation failed: it must be done even if the failure
// is that the caller's context ended.
func (vm *qemuVM) cleanupContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(vm.s.ctx, 10*time.Second)
}

// reconcileDetachedLocked is reconcileLocked on a cleanupContext.
func (vm *qemuVM) reconcileDetachedLocked() error {
	ctx, cancel := vm.cleanupContext()
	defer cancel()
	return vm.reconcileLocked(ctx)
}

func (vm *qemuVM) dropJobRecordLocked(id string) {
	vm.rec.Jobs = slices.DeleteFunc(vm.rec.Jobs, func(r jobRecord) bool { return r.ID == id })
}

// blockCopy starts a full copy of a disk into a new image.
func (vm *qemuVM) blockCopy(ctx context.Context, req *vmlockpb.BlockCopyRequest) (*vmlockpb.BlockJobInfo, error) {
	if err := vm.lock(ctx); err != nil {
		return nil, err
	}
	defer vm.unlock()
	d, err := vm.jobDiskLocked(ctx, req.Disk)
	if err != nil {
		return nil, err
	}
	format := req.Format
	if format == "" {
		format = "qcow2"
	}
	dest, err := lockmgr.Canonical(lockmgr.DiskResource(req.Dest, lockmgr.Exclusive))
	if err != nil {
		return nil, err
	}
	_, statErr := os.Lstat(dest.Name)
	switch uid := callerOf(ctx).uid; {
	case uid != 0 && req.ReuseExternal && !ownedBy(dest.Name, uid):
		return nil, lockmgr.Errorf(lockmgr.CodePermission, "uid %d may copy only into an image of its own (--reuse-external), or into a new one", uid)
	case req.ReuseExternal && statErr != nil:
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "--reuse-external: %v", statErr)
	case !req.ReuseExternal && statErr == nil:
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "%s exists: use --reuse-external to copy into an existing image", dest.Name)
	}
	// A new target is the VM's image: vmlockd creates it as the VM's
	// user, as QEMU's own images are, so that QEMU can open it. vmlockd
	// does so as root, so a caller other than root gets one only where it
	// could create it itself.
	var owner caller
	if !req.ReuseExternal {
		if err := mayUse(ctx, callerOf(ctx), lockmgr.DiskResource(dest.Name, lockmgr.Exclusive)); err != nil {
			return nil, err
		}
		if owner, err = processCaller(vm.pid); err != nil {
			return nil, &lockmgr.Error{Code: lockmgr.CodePermission, Resource: "disk " + dest.Name, Msg: fmt.Sprintf("cannot tell whose the VM's process %d is", vm.pid), Err: err}
		}
	}
	var created *unix.Stat_t // the image vmlockd created, the only file undo removes
	// undo removes the image vmlockd created; call it only while the VM
	// holds the image's lock, or another owner may use the file.
	undo := func() {
		if created == nil {
			return
		}
		if h := vm.s.copyHook; h != nil {
			h("remove", dest.Name)
		}
		cctx, cancel := vm.cleanupContext()
		defer cancel()
		if err := removeCreated(cctx, owner, dest.Name, created); err != nil {
			vm.s.log.Error("removing a copy target vmlockd created", "uuid", vm.uuid, "path", dest.Name, "err", err)
		}
	}
	lock := func(p string) error {
		r := lockmgr.DiskResource(p, lockmgr.Exclusive)
		err := vm.mayUse(ctx, r)
		if err == nil {
			err = vm.s.d.mgr.AcquireResource(ctx, vm.uuid, r)
		}
		if err == nil {
			vm.rec.Managed = append(vm.rec.Managed, p)
		}
		return err
	}
	// dropCreated removes the target vmlockd created, unless QEMU uses
	// it, while the VM still holds its lock (so nobody else can have
	// begun to use the file), then lets the locks follow QEMU's graph,
	// which releases it.
	dropCreated := func(ctx context.Context) {
		if disks, err := vm.disksLocked(ctx); created != nil && err == nil && !usesImage(disks, dest.Name) {
			undo()
		}
		if rerr := vm.reconcileLocked(ctx); rerr != nil {
			vm.s.log.Error("releasing a copy target QEMU does not use", "uuid", vm.uuid, "err", rerr)
		}
	}
	putBack := func() {
		if rerr := vm.reconcileDetachedLocked(); rerr != nil {
			vm.s.log.Error("releasing a copy target QEMU did not open", "uuid", vm.uuid, "err", rerr)
		}
	}
	// The target (and an existing target's data file) is QEMU's to
	// write: lock it before QEMU opens it. A new target is locked before
	// it is created, too: with lease files (indirect leases) a path can be
	// locked before its image exists, by whoever is about to create it,
	// and the file is theirs to create. A lease on the image itself
	// (direct) needs the file: it is created first, then locked.
	targets := []string{dest.Name}
	if req.ReuseExternal {
		info, err := qemu.BackingChain(ctx, callerOf(ctx).credential(), dest.Name, format)
		if err != nil {
			return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: "disk " + dest.Name, Msg: "cannot read the copy target", Err: err}
		}
		if df := info[0].DataFile(); df != "" {
			p, err := vm.canon(df)
			if err != nil {
				return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: "disk " + dest.Name, Msg: "cannot resolve its data file", Err: err}
			}
			targets = append(targets, p)
		}
	}
	for _, p := range targets {
		err := lock(p)
		if !req.ReuseExternal && (err == nil || errors.Is(err, os.ErrNotExist)) {
			// The file first, empty; its content (qemu-img) only once
			// the VM holds its lock, so that whatever fails from then on
			// removes it under that lock.
			locked := err == nil
			if created, err = createFile(ctx, owner, dest.Name); err != nil {
				if locked {
					putBack()
				}
				return nil, err
			}
			if !locked {
				if h := vm.s.copyHook; h != nil {
					h("created", dest.Name)
				}
				if err = lock(p); err != nil {
					putBack()
					// Not vmlockd's to remove without its lock: another
					// owner may have locked the file meanwhile and use it.
					why := "cannot lock it"
					if errors.Is(err, lockmgr.ErrBusy) {
						why = "another owner locked it first"
					}
					return nil, fmt.Errorf("the copy cannot start: vmlockd created %s for it, but %s, so it is left in place: %w", dest.Name, why, err)
				}
			}
			if err = formatImage(ctx, owner, dest.Name, format, d.Images[0].Size); err != nil {
				undo()
				putBack()
				return nil, err
			}
			if h := vm.s.copyHook; h != nil {
				h("formatted", dest.Name)
			}
		}
		if err != nil {
			putBack()
			return nil, fmt.Errorf("the copy cannot start: %w", err)
		}
	}
	rec := jobRecord{Disk: d.Name, Asked: asked(d, req.Disk), Type: jobCopy, Top: d.Images[0].Path, Target: dest.Name,
		TargetNode: vm.newNodeNameLocked("target"), ID: vm.newJobIDLocked("copy", d.Name)}
	node := map[string]any{"driver": format, "node-name": rec.TargetNode,
		"file": map[string]any{"driver": "file", "filename": dest.Name}}
	if format == "qcow2" {
		node["backing"] = nil // a full copy stands alone
	}
	if err := qemu.BlockdevAdd(ctx, vm.c, node); err != nil {
		cctx, cancel := vm.cleanupContext()
		defer cancel()
		dropCreated(cctx)
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "QEMU cannot open the copy target " + dest.Name, Err: err}
	}
	opts := qemu.MirrorOptions{JobID: rec.ID, Device: d.Root, Target: rec.TargetNode, Sync: "full", Speed: req.Bandwidth, AutoDismiss: new(false)}
	info, err := vm.startJobLocked(ctx, rec, func() (*qemu.Job, error) { return qemu.StartMirror(ctx, vm.c, opts) })
	if err != nil && !errors.Is(err, errJobUnknown) {
		cctx, cancel := vm.cleanupContext()
		defer cancel()
		if derr := qemu.BlockdevDel(cctx, vm.c, rec.TargetNode); derr != nil {
			vm.s.log.Error("removing a copy target from QEMU", "uuid", vm.uuid, "node", rec.TargetNode, "err", derr)
		}
		dropCreated(cctx)
	}
	return info, err
}

// usesImage reports whether QEMU uses file p as an image of a disk (or as
// an image's data file).
func usesImage(disks []qemu.Disk, p string) bool {
	for _, d := range disks {
		for _, img := range d.Images {
			if img.Path == p || img.DataFile == p {
				return true
			}
		}
	}
	return false
}

// createFile creates an empty file at path as owner (its fs uid, gid and
// groups: the kernel judges the creation as owner's, and the file is
// owner's, as an image owner's qemu-img made would be, mode 0644), and
// returns its identity. It is made with O_EXCL: a file that appeared at
// path meanwhile is someone else's.
func createFile(ctx context.Context, owner caller, path string) (*unix.Stat_t, error) {
	var st unix.Stat_t
	create := func() error {
		fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
		if err != nil {
			return &os.PathError{Op: "create", Path: path, Err: err}
		}
		defer unix.Close(fd)
		return unix.Fstat(fd, &st)
	}
	var err error
	if vmlockdIs(owner) {
		err = create()
	} else {
		err = asFSIdentity(ctx, owner, create)
	}
	switch {
	case err == nil:
		return &st, nil
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return nil, &lockmgr.Error{Code: lockmgr.CodeTimeout, Resource: "disk " + path,
			Msg: "creating the copy target took too long; if it was created after all, it is left in place", Err: err}
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM), errors.Is(err, unix.EROFS), errors.Is(err, errNoIdentity):
		return nil, &lockmgr.Error{Code: lockmgr.CodePermission, Resource: "disk " + path,
			Msg: fmt.Sprintf("the VM's user (uid %d) cannot create the copy target", owner.uid), Err: err}
	}
	return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "creating " + path, Err: err}
}

// vmlockdIs reports whether c is vmlockd's own file-system identity, which
// needs no thread of its own to act as.
func vmlockdIs(c caller) bool { return c.uid == os.Geteuid() && c.gid == os.Getegid() }

// formatImage writes a new image of size bytes into the empty file at
// path with qemu-img, run as owner: it writes only what owner could.
func formatImage(ctx context.Context, owner caller, path, format string, size int64) error {
	cmd := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", format, path, strconv.FormatInt(size, 10))
	if !vmlockdIs(owner) {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(owner.uid), Gid: uint32(owner.gid), Groups: owner.groups}}
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "creating " + path, Err: fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))}
	}
	return nil
}

// removeCreated removes the file at path, as owner, if it is still the
// file created (same device and inode).
func removeCreated(ctx context.Context, owner caller, path string, created *unix.Stat_t) error {
	remove := func() error {
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil || st.Dev != created.Dev || st.Ino != created.Ino {
			return nil // gone, or not the file vmlockd made
		}
		return unix.Unlink(path)
	}
	if vmlockdIs(owner) {
		return remove()
	}
	return asFSIdentity(ctx, owner, remove)
}

// watch follows a job's events until it ends, then moves the locks. If
// the connection is lost first it returns: the next attach watches again.
func (vm *qemuVM) watch(j *blockJob, q *qemu.Job) {
	ctx := vm.s.ctx
	st, err := q.WaitStatus(ctx, qemu.JobReady, qemu.JobStandby, qemu.JobConcluded, qemu.JobNull)
	if err == nil && (st == qemu.JobReady || st == qemu.JobStandby) {
		if vm.lock(ctx) == nil {
			if j.q == q && j.phase == phaseRunning {
				vm.setPhaseLocked(j, phaseReady)
				vm.s.log.Info("block job ready: pivot or abort it", "uuid", vm.uuid, "name", vm.name, "disk", j.rec.Disk, "job", j.rec.ID)
			}
			vm.unlock()
		}
		st, err = q.WaitStatus(ctx, qemu.JobConcluded, qemu.JobNull)
	}
	if err == nil && st == qemu.JobConcluded && j.rec.Foreign && q.Status() == qemu.JobConcluded {
		// Not vmlockd's to dismiss: its creator may have asked QEMU to
		// keep it (auto-dismiss=false) to read its outcome. QEMU keeps
		// its nodes until then, and the locks stay.
		res, _ := q.Result()
		if vm.lock(ctx) == nil {
			if j.q == q && !j.ended {
				if res.Error != "" {
					j.errMsg = res.Error
				}
				vm.setPhaseLocked(j, phaseConcluded)
				vm.s.log.Info("block job ended; its locks move once its creator dismisses it", "uuid", vm.uuid, "name", vm.name, "disk", j.rec.Disk, "job", j.rec.ID,
					"outcome", res.Outcome, "error", res.Error)
			}
			vm.unlock()
		}
		_, err = q.WaitStatus(ctx, qemu.JobNull)
	}
	if err != nil {
		return
	}
	res, _ := q.Result()
	fctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if vm.lock(fctx) != nil {
		return
	}
	defer vm.unlock()
	if j.q == q && !j.ended {
		vm.finishLocked(fctx, j, res)
	}
}

// finishLocked handles a job's end: it dismisses the job (if vmlockd
// started it; see watch), names the outcome, unlinks the images a successful commit invalidated (--delete),
// removes an unused copy target from QEMU, and moves the locks to what
// QEMU now uses. res is QEMU's report (zero if the end was not seen: the job had
// vanished when vmlockd re-attached; QEMU's graph then tells).
func (vm *qemuVM) finishLocked(ctx context.Context, j *blockJob, res qemu.Result) {
	// Dismissed first: a concluded job still holds the nodes it used.
	if vm.c != nil && !j.rec.Foreign {
		if err := qemu.JobDismiss(ctx, vm.c, j.rec.ID); err != nil {
			var qe *qmp.Error
			if !errors.As(err, &qe) {
				vm.s.log.Warn("dismissing a block job", "job", j.rec.ID, "err", err)
			}
		}
	}
	disks, derr := vm.disksLocked(ctx)
	active := ""
	inUse := map[string]bool{}
	for _, d := range disks {
		if d.Name == j.rec.Disk {
			active = d.Images[0].Path
		}
		for _, img := range d.Images {
			inUse[img.Path] = true
		}
	}
	phase := phaseFailed
	switch res.Outcome {
	case qemu.OutcomeFailed:
		j.errMsg = res.Error
	case qemu.OutcomeCancelled:
		phase = phaseCancelled
	case qemu.OutcomeCompleted, qemu.OutcomeUnknown:
		// QEMU's graph tells a pivot too: one asked for before a restart
		// of vmlockd is not in res.
		pivoted := res.Pivoted || derr == nil && (active == j.rec.Base && j.rec.Type == jobActiveCommit || active == j.rec.Target && j.rec.Type == jobCopy)
		unknown := res.Outcome == qemu.OutcomeUnknown
		switch {
		case !j.twoPhase():
			phase = phaseCompleted
			switch {
			case !unknown:
			case j.rec.Type == jobBackup:
				phase, j.errMsg = phaseUnknown, "the job ended while vmlockd was down, and QEMU kept no outcome"
			case j.rec.Type == jobStream && (derr != nil || !streamed(disks, j.rec)):
				phase, j.errMsg = phaseFailed, "the job ended while vmlockd was down, and its top image still reads through the images it was to pull in"
			case j.rec.Type == jobCommit && (derr != nil || inUse[j.rec.Top]):
				phase, j.errMsg = phaseFailed, "the job ended while vmlockd was down, and its top image is still in use"
			}
		case pivoted:
			phase = phasePivoted
		default:
			phase = phaseAborted
		}
	}
	if (phase == phasePivoted || phase == phaseCompleted) && derr == nil {
		for _, p := range j.rec.Delete {
			if inUse[p] {
				vm.s.log.Warn("--delete: QEMU still uses the image; not deleting it", "uuid", vm.uuid, "image", p)
				continue
			}
			if !ownedBy(p, j.rec.UID) {
				vm.s.log.Warn("--delete: the image is not the caller's; not deleting it", "uuid", vm.uuid, "image", p, "uid", j.rec.UID)
				continue
			}
			// Unlinked while still locked; reconcile releases it next.
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				vm.s.log.Error("--delete", "image", p, "err", err)
				continue
			}
			j.deleted = append(j.deleted, p)
		}
	}
	if j.rec.Type == jobCopy && phase != phasePivoted && vm.c != nil && !j.rec.Foreign {
		if err := qemu.BlockdevDel(ctx, vm.c, j.rec.TargetNode); err != nil {
			vm.s.log.Warn("removing the copy target from QEMU", "uuid", vm.uuid, "node", j.rec.TargetNode, "err", err)
		}
		derr = errors.New("the graph changed") // read it again
	}
	j.ended = true
	vm.dropJobRecordLocked(j.rec.ID)
	var err error
	if derr == nil {
		err = vm.applyLocked(ctx, vm.wanted(disks))
	} else {
		err = vm.reconcileLocked(ctx)
	}
	if err != nil {
		vm.s.log.Error("moving the locks after a block job", "uuid", vm.uuid, "job", j.rec.ID, "err", err)
	}
	if j.q != nil {
		j.q.Close()
	}
	vm.setPhaseLocked(j, phase)
	close(j.done)
	vm.s.log.Info("block job ended", "uuid", vm.uuid, "name", vm.name, "disk", j.rec.Disk, "job", j.rec.ID,
		"phase", phase, "error", j.errMsg, "deleted", j.deleted)
}

// blockJobAction serves BlockJob: info, wait, pivot or abort.
func (vm *qemuVM) blockJobAction(ctx context.Context, req *vmlockpb.BlockJobRequest) (*vmlockpb.BlockJobInfo, error) {
	if err := vm.lock(ctx); err != nil {
		return nil, err
	}
	j, err := vm.jobOfLocked(ctx, req.Disk)
	if err != nil || j == nil {
		defer vm.unlock()
		if err != nil {
			return nil, err
		}
		return &vmlockpb.BlockJobInfo{Vm: vm.label(), Disk: req.Disk, Phase: "none"}, nil
	}
	switch req.Action {
	case vmlockpb.BlockJobAction_BLOCK_JOB_INFO:
		defer vm.unlock()
		return vm.infoLocked(ctx, j), nil
	case vmlockpb.BlockJobAction_BLOCK_JOB_WAIT:
		vm.unlock()
		return vm.waitJob(ctx, j, time.Duration(req.WaitMs)*time.Millisecond)
	case vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT:
		err = vm.pivotLocked(ctx, j)
	case vmlockpb.BlockJobAction_BLOCK_JOB_ABORT:
		err = vm.abortLocked(ctx, j)
	default:
		err = lockmgr.Errorf(lockmgr.CodeInvalidArgument, "unknown block job action %v", req.Action)
	}
	vm.unlock()
	if err != nil {
		return nil, err
	}
	if !req.Async {
		if err := vm.waitEnd(ctx, j); err != nil {
			return nil, err
		}
	}
	if err := vm.lock(ctx); err != nil {
		return nil, err
	}
	defer vm.unlock()
	info := vm.infoLocked(ctx, j)
	if j.phase == phaseFailed {
		return nil, lockmgr.Errorf(lockmgr.CodeInternal, "block job %s on disk %s failed: %s; its locks are back as before the job", j.rec.ID, j.rec.Disk, j.errMsg)
	}
	return info, nil
}

// waitEnd waits until job j has ended, or has ended in QEMU and waits for
// its creator to dismiss it (phaseConcluded).
func (vm *qemuVM) waitEnd(ctx context.Context, j *blockJob) error {
	for {
		if err := vm.lock(ctx); err != nil {
			return err
		}
		end, changed := j.ended || j.phase == phaseConcluded, j.changed
		vm.unlock()
		if end {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return lockmgr.Errorf(lockmgr.CodeTimeout, "the job on disk %s did not end in time; see vmlock blockjob --info", j.rec.Disk)
		}
	}
}

// asked is the name a caller gave disk d, if it is not d's Name.
func asked(d *qemu.Disk, name string) string {
	if name == d.Name {
		return ""
	}
	return name
}

// jobOfLocked finds the current or last job of the disk named; nil if it
// never had one. A name that no longer names the job's disk (a pivot
// replaced the node or image it named) still finds the job started with
// it, unless the disk it names now has a job of its own.
func (vm *qemuVM) jobOfLocked(ctx context.Context, disk string) (*blockJob, error) {
	if j := vm.jobs[disk]; j != nil && !j.ended {
		return j, nil
	}
	vm.adoptLocked(ctx)
	if j := vm.jobs[disk]; j != nil {
		return j, nil
	}
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		return nil, err
	}
	d, ferr := findDisk(disks, disk)
	if ferr == nil && vm.jobs[d.Name] != nil {
		return vm.jobs[d.Name], nil
	}
	var found *blockJob
	for _, name := range slices.Sorted(maps.Keys(vm.jobs)) {
		if j := vm.jobs[name]; j.rec.Asked == disk && (found == nil || found.ended && !j.ended) {
			found = j
		}
	}
	if found == nil && ferr != nil {
		return nil, ferr
	}
	return found, nil
}

func (vm *qemuVM) pivotLocked(ctx context.Context, j *blockJob) error {
	switch {
	case j.ended:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job on disk %s has ended (%s): nothing to pivot", j.rec.Disk, j.phase)
	case j.rec.Type == jobCommit:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the job on disk %s is an intermediate commit: it has no ready phase and ends by itself; there is nothing to pivot", j.rec.Disk)
	case !j.twoPhase():
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the job on disk %s is a %s: it has no ready phase and ends by itself; there is nothing to pivot", j.rec.Disk, j.rec.Type)
	case j.phase == phasePivoting || j.phase == phaseAborting:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job on disk %s is already %s", j.rec.Disk, j.phase)
	case j.phase == phaseConcluded:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job %s on disk %s has ended and waits for its creator to dismiss it (job-dismiss)", j.rec.ID, j.rec.Disk)
	case j.q == nil:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job on disk %s is being re-attached; retry", j.rec.Disk)
	}
	// QEMU's pivot replaces the job's source in the source's users; on a
	// disk nothing uses it replaces nothing, yet reports success.
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		return err
	}
	if d, err := findDisk(disks, j.rec.Disk); err == nil && d.Unused {
		kept := "the base keeps the committed data and the top stays the disk's active image"
		if j.rec.Type == jobCopy {
			kept = "the copy " + j.rec.Target + " is complete"
		}
		return lockmgr.Errorf(lockmgr.CodeNotRegistered,
			"no pivot: nothing in QEMU uses disk %s (no guest device, drive or block export), so a pivot would replace nothing; abort the job instead (vmlock blockjob %s %s --abort): %s",
			j.rec.Disk, vm.label(), j.rec.Disk, kept)
	}
	// The pivot makes the base (or the copy) the active image: only while
	// the VM holds it exclusively (its lock may have been released through
	// the API meanwhile; it is taken back if it can be).
	img := j.rec.Base
	if j.rec.Type == jobCopy {
		img = j.rec.Target
	}
	if m, ok := vm.heldModes()[img]; !ok || m != lockmgr.Exclusive {
		if err := vm.reconcileLocked(ctx); err != nil {
			return fmt.Errorf("no pivot: %s is not locked exclusively for the VM: %w", img, err)
		}
	}
	if err := j.q.Complete(ctx); err != nil {
		if errors.Is(err, qemu.ErrNotReady) {
			info := vm.infoLocked(ctx, j)
			return lockmgr.Errorf(lockmgr.CodeNotRegistered, "block job %s on disk %s is not ready yet (%s, %s): pivot once it is ready (see vmlock blockjob --info)",
				j.rec.ID, j.rec.Disk, info.QemuStatus, percent(info.Cur, info.End))
		}
		return err
	}
	vm.setPhaseLocked(j, phasePivoting)
	return nil
}

func (vm *qemuVM) abortLocked(ctx context.Context, j *blockJob) error {
	switch {
	case j.ended:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job on disk %s has ended (%s): nothing to abort", j.rec.Disk, j.phase)
	case j.phase == phasePivoting || j.phase == phaseAborting:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job on disk %s is already %s", j.rec.Disk, j.phase)
	case j.phase == phaseConcluded:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job %s on disk %s has ended and waits for its creator to dismiss it (job-dismiss)", j.rec.ID, j.rec.Disk)
	case j.q == nil:
		return lockmgr.Errorf(lockmgr.CodeNotRegistered, "the block job on disk %s is being re-attached; retry", j.rec.Disk)
	}
	if err := j.q.Cancel(ctx, false); err != nil {
		return err
	}
	vm.setPhaseLocked(j, phaseAborting)
	return nil
}

// waitJob waits until the job is ready or has ended, or for at most max.
func (vm *qemuVM) waitJob(ctx context.Context, j *blockJob, max time.Duration) (*vmlockpb.BlockJobInfo, error) {
	if dl, ok := ctx.Deadline(); ok {
		max = min(max, time.Until(dl)/2)
	}
	timer := time.NewTimer(max)
	defer timer.Stop()
	for {
		if err := vm.lock(ctx); err != nil {
			return nil, err
		}
		if j.ended || j.phase == phaseReady || j.phase == phaseConcluded {
			defer vm.unlock()
			return vm.infoLocked(ctx, j), nil
		}
		changed := j.changed
		vm.unlock()
		select {
		case <-changed:
		case <-timer.C:
			if err := vm.lock(ctx); err != nil {
				return nil, err
			}
			defer vm.unlock()
			return vm.infoLocked(ctx, j), nil
		case <-ctx.Done():
			return nil, lockmgr.Errorf(lockmgr.CodeTimeout, "waiting for the job on disk %s: %v", j.rec.Disk, ctx.Err())
		}
	}
}

// infoLocked describes a job; a live job's progress and status come from
// QEMU (query-jobs), whose word on readiness wins over the events seen.
func (vm *qemuVM) infoLocked(ctx context.Context, j *blockJob) *vmlockpb.BlockJobInfo {
	info := &vmlockpb.BlockJobInfo{Vm: vm.label(), Disk: j.rec.Disk, Id: j.rec.ID, Type: j.rec.Type, Phase: j.phase,
		Error: j.errMsg, Ended: j.ended, Top: j.rec.Top, Base: j.rec.Base, Target: j.rec.Target, Deleted: j.deleted}
	if j.ended || vm.c == nil {
		return info
	}
	if qi, err := qemu.QueryJob(ctx, vm.c, j.rec.ID); err == nil {
		info.QemuStatus, info.Cur, info.End = string(qi.Status), qi.CurrentProgress, qi.TotalProgress
		if (qi.Status == qemu.JobReady || qi.Status == qemu.JobStandby) && j.phase == phaseRunning {
			vm.setPhaseLocked(j, phaseReady)
			info.Phase = phaseReady
		}
	}
	return info
}

// ownedBy reports whether uid may have vmlockd (root) act on file p on
// its behalf: root may, other users on their own files only.
func ownedBy(p string, uid int) bool {
	if uid == 0 {
		return true
	}
	var st unix.Stat_t
	return unix.Lstat(p, &st) == nil && int(st.Uid) == uid
}

func percent(cur, end int64) string {
	if end <= 0 {
		return "0%"
	}
	return strconv.FormatInt(cur*100/end, 10) + "%"
}

// adoptLocked tracks the commit, mirror, backup and stream jobs that QEMU
// runs and vmlockd did not start (started through another monitor), as if
// it had: they are shown and controlled by vmlock blockjob, the image each
// writes (see jobRecord.written) is locked exclusively, and the locks move
// when it ends. vmlockd sees such a job
// only once it runs, so if the image it writes cannot be locked for the
// VM (another owner has it), the job is cancelled at once, saying why.
// Errors are logged: the jobs already tracked are not affected.
func (vm *qemuVM) adoptLocked(ctx context.Context) {
	if vm.c == nil {
		return
	}
	jobs, err := qemu.QueryJobs(ctx, vm.c)
	if err != nil {
		vm.s.log.Warn("listing QEMU's block jobs", "uuid", vm.uuid, "err", err)
		return
	}
	var adopted []*blockJob
	var g *qemu.Graph
	var disks []qemu.Disk
	for _, info := range jobs {
		if vm.tracksLocked(info.ID) || info.Status.Ended() || info.Status == qemu.JobAborting || !slices.Contains([]string{"commit", "mirror", "backup", "stream"}, info.Type) {
			continue
		}
		if g == nil {
			if g, err = qemu.QueryGraph(ctx, vm.c); err == nil {
				disks, err = vm.disksLocked(ctx)
			}
			if err != nil {
				vm.s.log.Warn("reading QEMU's graph to adopt its block jobs", "uuid", vm.uuid, "err", err)
				return
			}
		}
		rec, ok := foreignJob(g, disks, info)
		if !ok || vm.liveJobLocked(rec.Disk) != nil {
			vm.s.log.Warn("QEMU runs a block job vmlockd cannot follow", "uuid", vm.uuid, "job", info.ID, "type", info.Type)
			continue
		}
		q, err := qemu.Attach(ctx, vm.c, info.ID)
		if err != nil {
			continue // ended meanwhile
		}
		j := newBlockJob(rec)
		j.q = q
		if info.Status == qemu.JobReady || info.Status == qemu.JobStandby {
			j.phase = phaseReady
		}
		vm.jobs[rec.Disk] = j
		vm.rec.Jobs = append(vm.rec.Jobs, rec)
		adopted = append(adopted, j)
		vm.s.log.Warn("adopted a block job started through another monitor", "uuid", vm.uuid, "name", vm.name, "disk", rec.Disk, "job", rec.ID,
			"type", rec.Type, "top", rec.Top, "base", rec.Base, "target", rec.Target)
	}
	if len(adopted) == 0 {
		return
	}
	vm.saveLocked()
	rerr := vm.reconcileLocked(ctx)
	held := vm.heldModes()
	for _, j := range adopted {
		img := j.rec.written()
		if m, ok := held[img]; img != "" && (!ok || m != lockmgr.Exclusive) {
			j.errMsg = fmt.Sprintf("vmlockd cancelled this job, started through another monitor: QEMU writes %s, which cannot be locked exclusively for the VM: %v", img, rerr)
			vm.s.log.Error("cancelling a block job that writes an image the VM cannot lock", "uuid", vm.uuid, "job", j.rec.ID, "image", img, "err", rerr)
			if err := j.q.Cancel(ctx, true); err != nil {
				vm.s.log.Error("cancelling a block job", "uuid", vm.uuid, "job", j.rec.ID, "err", err)
			}
			vm.setPhaseLocked(j, phaseAborting)
		}
		go vm.watch(j, j.q)
	}
}

// tracksLocked reports whether job id is one of the VM's live jobs (its
// own, or adopted).
func (vm *qemuVM) tracksLocked(id string) bool {
	return slices.ContainsFunc(vm.rec.Jobs, func(r jobRecord) bool { return r.ID == id })
}

// knowsLocked reports whether job id is, or was, one of the VM's jobs.
func (vm *qemuVM) knowsLocked(id string) bool {
	return vm.tracksLocked(id) || slices.ContainsFunc(slices.Collect(maps.Values(vm.jobs)), func(j *blockJob) bool { return j.rec.ID == id })
}

// adoptOnEvents adopts the jobs started through other monitors as they
// start (see adoptLocked), and moves the locks when a job it never
// followed is gone, until the connection c ends. sub is c's
// subscription to JOB_STATUS_CHANGE.
func (vm *qemuVM) adoptOnEvents(c *qmp.Client, sub *qmp.Subscription) {
	defer sub.Close()
	for {
		ev, err := sub.Next(vm.s.ctx)
		if err != nil {
			return
		}
		var d qemu.JobStatusChange
		if ev.DecodeData(&d) != nil || d.Status != qemu.JobCreated && d.Status != qemu.JobRunning && d.Status != qemu.JobNull {
			continue
		}
		ctx, cancel := context.WithTimeout(vm.s.ctx, time.Minute)
		if vm.lock(ctx) == nil {
			switch known := vm.knowsLocked(d.ID); {
			case vm.c != c:
			case d.Status != qemu.JobNull:
				if !known {
					vm.adoptLocked(ctx)
				}
			case !known || vm.stale:
				// A job vmlockd never followed (it ended before vmlockd
				// saw it run) may have changed the graph: a stream
				// drops the images it pulled in. And a dismissed job
				// may be what kept the graph from being read.
				stale := vm.stale
				if err := vm.settleLocked(ctx); err != nil {
					vm.s.log.Error("moving the locks after a block job was dismissed", "uuid", vm.uuid, "job", d.ID, "err", err)
				} else if stale {
					vm.setErr("")
				}
			}
			vm.unlock()
		}
		cancel()
	}
}

// foreignJob describes a job from QEMU's graph, from the nodes the job
// links: a commit's or mirror's "source" and "target", a backup's
// "target" and the node its filter (the "main node") reads, a stream's
// "active node" (the image it writes) and "intermediate node"s (the images
// it pulls in); and the disk whose chain holds the source (the one whose
// root is the job's filter, if several).
func foreignJob(g *qemu.Graph, disks []qemu.Disk, info qemu.JobInfo) (jobRecord, bool) {
	roles := map[string][]string{}
	for _, name := range slices.Sorted(maps.Keys(g.Nodes)) {
		for _, e := range g.Nodes[name].Parents {
			if e.Kind == "block-job" && e.Node == info.ID {
				roles[e.Role] = append(roles[e.Role], name)
			}
		}
	}
	one := func(role string) string {
		if len(roles[role]) != 1 {
			return ""
		}
		return roles[role][0]
	}
	main := one("main node")
	var src, tgt string
	switch info.Type {
	case "commit", "mirror":
		src, tgt = one("source"), one("target")
	case "backup":
		tgt = one("target")
		if n := g.Nodes[main]; n != nil {
			src = n.Child("file")
		}
	case "stream":
		src = one("active node")
	}
	path := func(node string) string {
		for _, d := range disks {
			for _, img := range d.Images {
				if img.Node == node {
					return img.Path
				}
			}
		}
		return ""
	}
	var d *qemu.Disk
	top := -1
	for i := range disks {
		if k := slices.IndexFunc(disks[i].Images, func(img qemu.Image) bool { return img.Node == src }); k >= 0 && (d == nil || disks[i].Root == main) {
			d, top = &disks[i], k
		}
	}
	if d == nil || tgt == "" && info.Type != "stream" {
		return jobRecord{}, false
	}
	rec := jobRecord{Disk: d.Name, ID: info.ID, Top: d.Images[top].Path, Foreign: true}
	switch {
	case info.Type == "mirror":
		rec.Type, rec.Target = jobCopy, path(tgt)
	case info.Type == "backup":
		rec.Type, rec.Target = jobBackup, path(tgt)
	case info.Type == "stream":
		// The base is the first image below the top that the job does
		// not pull in.
		rec.Type = jobStream
		k := top + 1
		for k < len(d.Images) && slices.Contains(roles["intermediate node"], d.Images[k].Node) {
			k++
		}
		if k < len(d.Images) {
			rec.Base = d.Images[k].Path
		}
	case top == 0:
		rec.Type, rec.Base = jobActiveCommit, path(tgt)
	default:
		rec.Type, rec.Base = jobCommit, path(tgt)
	}
	return rec, true
}

// streamed reports whether QEMU's graph shows stream job r done: its top
// reads through its base directly (through nothing, without a base).
func streamed(disks []qemu.Disk, r jobRecord) bool {
	for _, d := range disks {
		if d.Name != r.Disk {
			continue
		}
		k := slices.IndexFunc(d.Images, func(img qemu.Image) bool { return img.Path == r.Top })
		if k < 0 {
			return false
		}
		if k+1 == len(d.Images) {
			return r.Base == ""
		}
		return d.Images[k+1].Path == r.Base
	}
	return false
}
