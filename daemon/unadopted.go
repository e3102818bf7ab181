package daemon

import (
	"context"
	"encoding/json"
	"maps"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
)

// unadoptedLease is a lease restore could not take back from an object
// whose owner runs (the driver's Adopt failed: its image was renamed or
// replaced while vmlockd was down, its token changed, ...). It is not in
// the lock table, but its descriptor still holds the lock, and must until
// the owner is gone: the owner may still use the disk through the file it
// opened.
type unadoptedLease struct {
	Resource lockmgr.Resource `json:"resource"`
	Problem  string           `json:"problem"` // why it was not taken back
	file     *os.File         // vmlockd's copy of the descriptor
}

// keepUnadopted keeps the locks of an object's unadopted leases: old, the
// L entries an earlier start left (not tried again), and fresh, those of
// this restore. Their descriptors go to lock-holder entries of their own
// (unadoptedKey), which writeRecord never rewrites, so that the locks
// outlive the object's next record; the entries go with the object's
// records (writeRecord's DropPrefix), when its owner exits or it releases
// everything. vmlockd keeps its own copies meanwhile, for a lock-holder
// that replaces this one (resyncHolder).
func (d *Daemon) keepUnadopted(ctx context.Context, uuid string, old []*lockholder.Entry, fresh []unadoptedLease) {
	var all []unadoptedLease
	for _, e := range old {
		all = append(all, decodeUnadopted(e)...)
	}
	all = append(all, fresh...)
	if len(all) == 0 {
		return
	}
	d.mu.Lock()
	if d.unadopted == nil {
		d.unadopted = map[string][]unadoptedLease{}
	}
	d.unadopted[uuid] = all
	d.mu.Unlock()
	for _, l := range all {
		d.log.Error("restore: a lease that could not be taken back stays locked until its owner exits (see docs/operations.md, \"Troubleshooting\")",
			"uuid", uuid, "resource", l.Resource.String(), "problem", l.Problem)
	}
	if err := putUnadopted(ctx, d.holder, uuid, all, len(old)); err != nil {
		// The chunks that still hold the descriptors stay until the
		// object's next record, and vmlockd's copies until its owner goes.
		d.log.Error("lock-holder: cannot record the leases that could not be taken back", "uuid", uuid, "err", err)
	}
}

// putUnadopted writes ls to h as the object's L entries (L0, L1, ...: at
// most lockholder.MaxFiles descriptors and about half of MaxMeta of record
// each), and drops the entries from an earlier write beyond them (prev),
// as one change.
func putUnadopted(ctx context.Context, h *lockholder.Client, uuid string, ls []unadoptedLease, prev int) error {
	var ops []lockholder.Op
	for len(ls) > 0 {
		k, size := 0, 0
		for k < len(ls) && k < lockholder.MaxFiles && (k == 0 || size+len(ls[k].Problem)+len(ls[k].Resource.Name) < lockholder.MaxMeta/2) {
			size += len(ls[k].Problem) + len(ls[k].Resource.Name) + 64
			k++
		}
		meta, err := json.Marshal(ls[:k])
		if err != nil {
			return err
		}
		op := lockholder.Op{Key: unadoptedKey(uuid, len(ops)), Meta: meta, Files: make([]*os.File, k)}
		for i := range op.Files {
			op.Files[i] = ls[i].file
		}
		ops = append(ops, op)
		ls = ls[k:]
	}
	for n := len(ops); n < prev; n++ {
		ops = append(ops, lockholder.Op{Key: unadoptedKey(uuid, n), Drop: true})
	}
	return h.Apply(ctx, ops)
}

// decodeUnadopted returns the leases of an L entry, with its descriptors
// (which it takes over). A record that does not match its descriptors
// still keeps every descriptor, named by what can be read of it.
func decodeUnadopted(e *lockholder.Entry) []unadoptedLease {
	var ls []unadoptedLease
	if err := json.Unmarshal(e.Meta, &ls); err != nil || len(ls) != len(e.Files) {
		ls = make([]unadoptedLease, len(e.Files))
		for i := range ls {
			ls[i].Problem = "lock-holder entry " + e.Key + " with an unreadable record"
		}
	}
	for i, f := range e.Files {
		ls[i].file = f
	}
	e.Files = nil
	return ls
}

// forgetUnadoptedLocked closes vmlockd's copies of uuid's unadopted
// leases: their L entries were dropped, or the lock-holder keeps them
// alone from now on. Called with d.mu held.
func (d *Daemon) forgetUnadoptedLocked(uuid string) {
	closeUnadopted(d.unadopted[uuid])
	delete(d.unadopted, uuid)
}

// untracked returns what the lock monitor shows of the holdings vmlockd
// keeps locked without managing them: the objects restore kept untouched,
// and the leases it could not take back from running owners.
func (d *Daemon) untracked() []*vmlockpb.Untracked {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*vmlockpb.Untracked
	for _, id := range slices.Sorted(maps.Keys(d.kept)) {
		k := d.kept[id]
		u := &vmlockpb.Untracked{Uuid: k.uuid, Pid: int64(k.pid), Keys: k.keys, Problem: "kept untouched at vmlockd's start: " + k.problem}
		for _, r := range k.resources {
			u.Resources = append(u.Resources, api.ResourceToPB(r))
		}
		out = append(out, u)
	}
	for _, uuid := range slices.Sorted(maps.Keys(d.unadopted)) {
		pid := 0
		if ow := d.owners[uuid]; ow != nil {
			pid = ow.obj.PID
		}
		for _, l := range d.unadopted[uuid] {
			out = append(out, &vmlockpb.Untracked{Uuid: uuid, Pid: int64(pid), Resources: []*vmlockpb.Resource{api.ResourceToPB(l.Resource)},
				Problem: "not taken back at vmlockd's start: " + l.Problem, UntilOwnerExits: true})
		}
	}
	return out
}

func (d *Daemon) unadoptedCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, ls := range d.unadopted {
		n += len(ls)
	}
	return n
}

func closeUnadopted(ls []unadoptedLease) {
	for _, l := range ls {
		if l.file != nil {
			l.file.Close()
		}
	}
}

func closeEntries(es []*lockholder.Entry) {
	for _, e := range es {
		e.Close()
	}
}

// dupFile returns a copy of f's descriptor, or nil if it cannot be made
// (no descriptors left: the lock then goes with the object's next record,
// as it would have without the copy).
func dupFile(f *os.File) *os.File {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), f.Name())
}
