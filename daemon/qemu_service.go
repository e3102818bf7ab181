package daemon

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/qemu"
)

// qemuService serves vmlock.v1.QEMU (see qemu.proto) over the supervisor.
type qemuService struct {
	vmlockpb.UnimplementedQEMUServer
	s *qemuSupervisor
}

// maxSocketPath is the longest path a unix socket address can hold.
const maxSocketPath = 107

func (q *qemuService) Start(ctx context.Context, req *vmlockpb.QEMUStartRequest) (*vmlockpb.QEMUStartReply, error) {
	s := q.s
	o := api.ObjectFromPB(req.Object)
	if err := o.Validate(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	old := s.vms[o.UUID]
	if old != nil && old.gone() {
		// Its locks were released through the API while QEMU ran on:
		// stop supervising it, the uuid is free.
		delete(s.vms, o.UUID)
		old.disconnect()
		old = nil
	}
	s.mu.Unlock()
	if _, err := s.d.mgr.Object(o.UUID); err == nil || old != nil {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "object %s is already registered: a VM's uuid must be new", o.UUID)
	}
	monitor := req.Monitor
	if monitor == "" {
		monitor = s.defaultMonitor(o.UUID)
	}
	if !filepath.IsAbs(monitor) || len(monitor) > maxSocketPath {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "monitor socket %q: want an absolute path of at most %d bytes", monitor, maxSocketPath)
	}

	// The chains, from the image headers: QEMU opens them the same way.
	chains := make([][]string, len(req.Drives))
	backing := map[string]bool{}
	dataFile := map[string]string{} // image → its external data file
	for i, dr := range req.Drives {
		if !filepath.IsAbs(dr.Path) {
			return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "drive %q: want an absolute path", dr.Path)
		}
		chain, err := qemu.BackingChain(ctx, callerOf(ctx).credential(), dr.Path, dr.Format)
		if err != nil {
			return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: "disk " + dr.Path, Msg: "cannot read the backing chain", Err: err}
		}
		for k, img := range chain {
			r, err := lockmgr.Canonical(lockmgr.DiskResource(img.Filename, lockmgr.Exclusive))
			if err != nil {
				return nil, err
			}
			chains[i] = append(chains[i], r.Name)
			backing[r.Name] = backing[r.Name] || k > 0
			if df := img.DataFile(); df != "" {
				// QEMU opens it relative to its working directory: the
				// caller's, whose process becomes QEMU.
				if dataFile[r.Name], err = canonAt(o.PID, df); err != nil {
					return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: "disk " + r.Name, Msg: "cannot resolve its data file", Err: err}
				}
			}
		}
	}
	want := map[string]lockmgr.Mode{}
	for i, dr := range req.Drives {
		for k, p := range chains[i] {
			// A -blockdev that another names as its backing node is a
			// backing image too, though the command line opens it itself.
			m := lockmgr.Exclusive
			switch {
			case dr.ReadOnly:
				m = lockmgr.ReadOnly
			case k > 0 || dr.Backing || dr.Shared || backing[p]:
				m = lockmgr.Shared
			}
			// A data file is written whenever its image is.
			for _, p := range []string{p, dataFile[p]} {
				if cur, ok := want[p]; p != "" && (!ok || m < cur) {
					want[p] = m
				}
			}
		}
	}
	areq := &vmlockpb.AcquireRequest{Object: req.Object}
	for _, pr := range req.Resources {
		r, err := api.ResourceFromPB(pr)
		if err != nil {
			return nil, err
		}
		if r, err = lockmgr.Canonical(r); err != nil {
			return nil, err
		}
		if _, ok := want[r.Name]; ok && r.Type == lockmgr.TypeDisk {
			continue // an image of QEMU's: its chain's mode applies
		}
		areq.Resources = append(areq.Resources, pr)
	}
	rec := vmRecord{UUID: o.UUID, PID: o.PID, Monitor: monitor, Resume: req.Resume}
	for p, m := range want {
		rec.Managed = append(rec.Managed, p)
		areq.Resources = append(areq.Resources, api.ResourceToPB(lockmgr.DiskResource(p, m)))
	}
	slices.Sort(rec.Managed)

	// The record first: a restart after the grant must find the VM.
	if monitor == s.defaultMonitor(o.UUID) {
		_ = os.Remove(monitor)
	}
	vm := &qemuVM{s: s, uuid: o.UUID, rec: rec}
	vm.saveLocked()
	st, err := s.d.acquire(ctx, callerOf(ctx), areq)
	if err != nil {
		s.removeRecord(o.UUID, monitor)
		return nil, err
	}
	vm = s.add(o, rec)
	s.log.Info("QEMU VM registered; waiting for its monitor", "uuid", o.UUID, "name", o.Name, "pid", o.PID, "images", len(want), "monitor", monitor)
	go vm.run()
	return &vmlockpb.QEMUStartReply{Monitor: monitor, State: st}, nil
}

// vm finds a VM the caller may act on, connected to QEMU.
func (q *qemuService) vm(ctx context.Context, name string) (*qemuVM, error) {
	vm, err := q.s.lookup(name)
	if err != nil {
		return nil, err
	}
	if err := q.s.d.mayAct(callerOf(ctx), vm.uuid); err != nil {
		return nil, err
	}
	if err := vm.waitAttached(ctx); err != nil {
		return nil, err
	}
	return vm, nil
}

func (q *qemuService) List(ctx context.Context, req *vmlockpb.QEMUListRequest) (*vmlockpb.QEMUListReply, error) {
	var vms []*qemuVM
	if req.Vm != "" {
		vm, err := q.s.lookup(req.Vm)
		if err != nil {
			return nil, err
		}
		vms = append(vms, vm)
	} else {
		q.s.mu.Lock()
		for _, vm := range q.s.vms {
			vms = append(vms, vm)
		}
		q.s.mu.Unlock()
		slices.SortFunc(vms, func(a, b *qemuVM) int { return cmp.Compare(a.label(), b.label()) })
	}
	rep := &vmlockpb.QEMUListReply{}
	for _, vm := range vms {
		rep.Vms = append(rep.Vms, vm.describe(ctx))
	}
	return rep, nil
}

// describe lists the VM's disks with their locks and jobs. A VM busy with
// a long operation is listed without them rather than holding up the list
// (the lock monitor shows it).
func (vm *qemuVM) describe(ctx context.Context) *vmlockpb.QEMUVM {
	pv := &vmlockpb.QEMUVM{Uuid: vm.uuid, Name: vm.name, Pid: int64(vm.pid), Monitor: vm.rec.Monitor}
	lctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := vm.lock(lctx); err != nil {
		pv.Error = err.Error()
		return pv
	}
	defer vm.unlock()
	pv.Connected, pv.Error = vm.c != nil, vm.errText()
	if vm.c == nil {
		return pv
	}
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		pv.Error = err.Error()
		return pv
	}
	modes := vm.heldModes()
	for _, d := range disks {
		pv.Disks = append(pv.Disks, vm.diskPB(ctx, d, modes))
	}
	return pv
}

func (vm *qemuVM) diskPB(ctx context.Context, d qemu.Disk, modes map[string]lockmgr.Mode) *vmlockpb.QEMUDisk {
	pd := &vmlockpb.QEMUDisk{Name: d.Name, Node: d.Node, ReadOnly: d.ReadOnly, ShareRw: d.ShareRW}
	for _, img := range d.Images {
		mode := "unlocked"
		if m, ok := modes[img.Path]; ok {
			mode = m.String()
		}
		pd.Images = append(pd.Images, &vmlockpb.QEMUImage{Path: img.Path, Node: img.Node, Format: img.Format, Mode: mode, DataFile: img.DataFile})
	}
	if j := vm.jobs[d.Name]; j != nil {
		pd.Job = vm.infoLocked(ctx, j)
	}
	return pd
}

func (q *qemuService) AttachDisk(ctx context.Context, req *vmlockpb.QEMUAttachDiskRequest) (*vmlockpb.QEMUDisk, error) {
	vm, err := q.vm(ctx, req.Vm)
	if err != nil {
		return nil, err
	}
	return vm.attachDisk(ctx, req)
}

func (q *qemuService) DetachDisk(ctx context.Context, req *vmlockpb.QEMUDetachDiskRequest) (*vmlockpb.QEMUDisk, error) {
	vm, err := q.vm(ctx, req.Vm)
	if err != nil {
		return nil, err
	}
	return vm.detachDisk(ctx, req.Disk)
}

func (q *qemuService) BlockCommit(ctx context.Context, req *vmlockpb.BlockCommitRequest) (*vmlockpb.BlockJobInfo, error) {
	if err := checkBandwidth(req.Bandwidth); err != nil {
		return nil, err
	}
	vm, err := q.vm(ctx, req.Vm)
	if err != nil {
		return nil, err
	}
	return vm.blockCommit(ctx, req)
}

func (q *qemuService) BlockCopy(ctx context.Context, req *vmlockpb.BlockCopyRequest) (*vmlockpb.BlockJobInfo, error) {
	if !filepath.IsAbs(req.Dest) {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "copy destination %q: want an absolute path", req.Dest)
	}
	if err := checkBandwidth(req.Bandwidth); err != nil {
		return nil, err
	}
	if !copyFormat(req.Format) {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "format %q: want qcow2 (the default), raw, qcow, qed, vmdk, vdi, vpc, vhdx or parallels", req.Format)
	}
	vm, err := q.vm(ctx, req.Vm)
	if err != nil {
		return nil, err
	}
	return vm.blockCopy(ctx, req)
}

func (q *qemuService) BlockJob(ctx context.Context, req *vmlockpb.BlockJobRequest) (*vmlockpb.BlockJobInfo, error) {
	if req.WaitMs < 0 {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "wait_ms %d: want 0 or more", req.WaitMs)
	}
	vm, err := q.vm(ctx, req.Vm)
	if err != nil {
		return nil, err
	}
	return vm.blockJobAction(ctx, req)
}

// checkBandwidth refuses a negative job speed before anything is done for
// the job (QEMU would refuse it only once the locks had moved and a copy
// target was created).
func checkBandwidth(bw int64) error {
	if bw < 0 {
		return lockmgr.Errorf(lockmgr.CodeInvalidArgument, "bandwidth %d bytes/s: want 0 (unlimited) or more", bw)
	}
	return nil
}

// copyFormat reports whether a copy target may have image format f ("" is
// qcow2): the formats qemu-img creates that QEMU opens on a local file
// with no more options.
func copyFormat(f string) bool {
	switch f {
	case "", "qcow2", "raw", "qcow", "qed", "vmdk", "vdi", "vpc", "vhdx", "parallels":
		return true
	}
	return false
}

// attachDisk locks an image's chain, then adds it to QEMU; on failure the
// locks are put back.
func (vm *qemuVM) attachDisk(ctx context.Context, req *vmlockpb.QEMUAttachDiskRequest) (*vmlockpb.QEMUDisk, error) {
	if !filepath.IsAbs(req.Path) {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "disk %q: want an absolute path", req.Path)
	}
	if err := vm.lock(ctx); err != nil {
		return nil, err
	}
	defer vm.unlock()
	c, err := vm.connectedLocked()
	if err != nil {
		return nil, err
	}
	chain, err := qemu.BackingChain(ctx, callerOf(ctx).credential(), req.Path, req.Format)
	if err != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: "disk " + req.Path, Msg: "cannot read the backing chain", Err: err}
	}
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		return nil, err
	}
	want := vm.wanted(disks)
	for i, img := range chain {
		r, err := lockmgr.Canonical(lockmgr.DiskResource(img.Filename, lockmgr.Exclusive))
		if err != nil {
			return nil, err
		}
		m := lockmgr.Exclusive
		switch {
		case req.ReadOnly:
			m = lockmgr.ReadOnly
		case i > 0:
			m = lockmgr.Shared
		}
		paths := []string{r.Name}
		if df := img.DataFile(); df != "" {
			// Written whenever its image is; QEMU opens a relative name
			// relative to its working directory.
			p, err := vm.canon(df)
			if err != nil {
				return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: "disk " + r.Name, Msg: "cannot resolve its data file", Err: err}
			}
			paths = append(paths, p)
		}
		for _, p := range paths {
			if cur, ok := want[p]; !ok || m < cur {
				want[p] = m
			}
		}
	}
	// Locks first: QEMU must not open an image that is not locked.
	if err := vm.applyLocked(ctx, want); err != nil {
		if rerr := vm.reconcileDetachedLocked(); rerr != nil {
			vm.s.log.Error("putting the locks back after a failed attach", "uuid", vm.uuid, "err", rerr)
		}
		return nil, err
	}
	node := req.Node
	if node == "" {
		node = vm.newNodeNameLocked("disk")
	}
	opts := map[string]any{"driver": chain[0].Format, "node-name": node, "read-only": req.ReadOnly,
		"file": map[string]any{"driver": "file", "filename": req.Path, "read-only": req.ReadOnly}}
	aerr := qemu.BlockdevAdd(ctx, c, opts)
	// Whatever QEMU did, the locks become what it uses.
	if err := vm.reconcileDetachedLocked(); err != nil {
		return nil, err
	}
	if aerr != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "QEMU cannot add the disk", Err: aerr}
	}
	vm.s.log.Info("disk attached", "uuid", vm.uuid, "name", vm.name, "node", node, "path", req.Path)
	return vm.diskLocked(ctx, node)
}

// detachDisk removes a disk added with blockdev-add, then releases what
// QEMU no longer uses.
func (vm *qemuVM) detachDisk(ctx context.Context, name string) (*vmlockpb.QEMUDisk, error) {
	if err := vm.lock(ctx); err != nil {
		return nil, err
	}
	defer vm.unlock()
	d, err := vm.jobDiskLocked(ctx, name)
	if err != nil {
		return nil, err
	}
	pd := vm.diskPB(ctx, *d, vm.heldModes())
	if err := qemu.BlockdevDel(ctx, vm.c, d.Node); err != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: fmt.Sprintf("QEMU cannot remove disk %s (only nodes added by vmlock disk attach or -blockdev can be, once no device uses them)", d.Name), Err: err}
	}
	if err := vm.reconcileDetachedLocked(); err != nil {
		return nil, err
	}
	vm.s.log.Info("disk detached", "uuid", vm.uuid, "name", vm.name, "disk", d.Name)
	return pd, nil
}

// diskLocked describes one disk by name.
func (vm *qemuVM) diskLocked(ctx context.Context, name string) (*vmlockpb.QEMUDisk, error) {
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		return nil, err
	}
	d, err := findDisk(disks, name)
	if err != nil {
		return nil, err
	}
	return vm.diskPB(ctx, *d, vm.heldModes()), nil
}
