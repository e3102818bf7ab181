package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// Migration handover (the Migrate service).
//
// The source daemon's Prepare marks the object as migrating and converts
// each resource it holds exclusively to a shared hold with the same token
// (lockmgr.Manager.ChangeMode: the resource is never unheld). Its reply is
// a handover state: a v1 state string listing every resource with its
// original mode and token, plus a marker entry of type vmlock.migration
// naming the destination host. The destination's Acquire with that state
// (handoverIn) takes every resource listed exclusive as shared, with the
// token as Expect, so it is granted only if nobody else was granted the
// resource since the source's grant; it marks the object as the target,
// with those resources pending an upgrade. Complete ends it on each side:
// the side that gives the object up releases everything; the side that
// keeps it takes its pending resources exclusively again, waiting until
// the other side has released them; each upgrade is a new grant with a
// new token, greater than the other side's.
//
// Invariants:
//   - While the handover lasts both sides hold the resources shared; no
//     third party can hold them exclusively. A third party asking for them
//     shared could join (shared never conflicts with shared); the
//     destination's grant then fails as stale (the token moved), or, if it
//     joins after that grant, the final upgrade fails busy and names it.
//   - A mark is kept in the object's lock-holder record, so it survives a
//     restart of vmlockd. Pending lists the resources still to be upgraded;
//     a resource is removed from it before its upgrade is tried (and put
//     back, in the record too, if that fails), so the record of a completed
//     upgrade never lists it. A target's mark with nothing pending stays,
//     across restarts too, until its complete or cancel.
//     A resource unplugged during the handover leaves Pending (keepHeld):
//     hotplugged again, it keeps the mode it was asked for.
//   - A prepare that fails takes back exclusively what it made shared;
//     what it cannot take back stays pending in a source mark, so that a
//     cancel takes it back and a new prepare hands it over exclusive.
//   - The destination must be a different vmlockd than the source (an
//     object's uuid is unique within one daemon).

// migrationType is the type of the handover state's marker entry.
const migrationType lockmgr.ResourceType = "vmlock.migration"

// Roles in a handover.
const (
	roleSource = "source"
	roleTarget = "target"
)

// migration is an object's part in a handover, in its owner record (under
// Daemon.mu) and in its lock-holder record.
type migration struct {
	Role string `json:"role"`
	// Peer is the destination host (source side); unknown on the target.
	Peer string `json:"peer,omitempty"`
	// Pending are the resources this side holds shared for the handover
	// and holds exclusively again if it keeps the object.
	Pending []lockmgr.Resource `json:"pending,omitempty"`
}

func (m *migration) clone() *migration {
	if m == nil {
		return nil
	}
	c := *m
	c.Pending = slices.Clone(m.Pending)
	return &c
}

// keepHeld drops the pending resources that the object no longer holds
// (unplugged during the handover): granted again later, such a resource is
// a new use, in the mode it was asked for, that the handover does not take
// back exclusively. The observer calls it, with Daemon.mu held, in order
// with the object's changes, before it records the mark.
func (m *migration) keepHeld(leases []lockmgr.Lease, ro []lockmgr.Resource) {
	if m == nil || len(m.Pending) == 0 {
		return
	}
	held := make(map[string]bool, len(leases)+len(ro))
	for _, l := range leases {
		held[l.Resource().Key()] = true
	}
	for _, r := range ro {
		held[r.Key()] = true
	}
	m.Pending = slices.DeleteFunc(m.Pending, func(p lockmgr.Resource) bool { return !held[p.Key()] })
}

// restoredMigration returns the mark to keep for a record's mark: the
// mark as recorded. A target with nothing pending (its source held nothing
// exclusively, or a complete upgraded everything before a crash) is still
// the target: `migrate complete` ends it, and `--cancel` releases it, as
// before the restart.
func restoredMigration(m *migration) *migration {
	return m
}

type migrateService struct {
	vmlockpb.UnimplementedMigrateServer
	d *Daemon
}

func (s *migrateService) Prepare(ctx context.Context, req *vmlockpb.MigratePrepareRequest) (*vmlockpb.MigrateReply, error) {
	st, err := s.d.migratePrepare(ctx, callerOf(ctx), req.Uuid, req.ToHost)
	if err != nil {
		return nil, err
	}
	return &vmlockpb.MigrateReply{State: st, Role: roleSource}, nil
}

func (s *migrateService) Complete(ctx context.Context, req *vmlockpb.MigrateCompleteRequest) (*vmlockpb.MigrateReply, error) {
	return s.d.migrateComplete(ctx, callerOf(ctx), req.Uuid, req.Cancel)
}

// ownerFor returns uuid's owner after the permission check.
func (d *Daemon) ownerFor(c caller, id string) (string, *owner, error) {
	uuid, err := lockmgr.ParseUUID(id)
	if err != nil {
		return "", nil, err
	}
	if err := d.mayAct(c, uuid); err != nil {
		return "", nil, err
	}
	d.mu.Lock()
	ow := d.owners[uuid]
	d.mu.Unlock()
	if ow == nil {
		return "", nil, lockmgr.Errorf(lockmgr.CodeNotRegistered, "object %s is not registered", uuid)
	}
	return uuid, ow, nil
}

// migratePrepare is the source's step: mark, downgrade, and return the
// handover state.
func (d *Daemon) migratePrepare(ctx context.Context, c caller, id, to string) (string, error) {
	if to == "" {
		return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "migrate prepare: the destination host is required")
	}
	if err := lockmgr.ValidName("destination host", to); err != nil {
		return "", err
	}
	if to == d.cfg.Host {
		return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "migrate prepare: %q is this host; a migration goes to another vmlockd", to)
	}
	uuid, ow, err := d.ownerFor(c, id)
	if err != nil {
		return "", err
	}
	leases, _, err := d.mgr.Held(uuid)
	if err != nil {
		return "", err
	}
	d.mu.Lock()
	prev := ow.mig
	if prev != nil && prev.Role == roleTarget && len(prev.Pending) > 0 {
		d.mu.Unlock()
		return "", lockmgr.Errorf(lockmgr.CodeNotRegistered,
			"object %s is still the target of an unfinished migration; run `vmlock migrate complete` on it first", uuid)
	}
	mig := &migration{Role: roleSource, Peer: to}
	if prev != nil && prev.Role == roleSource {
		mig.Pending = slices.Clone(prev.Pending) // prepared before: downgraded already
	}
	var todo []lockmgr.Resource
	for _, l := range leases {
		if r := l.Resource(); r.Mode == lockmgr.Exclusive {
			if !slices.ContainsFunc(mig.Pending, func(p lockmgr.Resource) bool { return p.Key() == r.Key() }) {
				mig.Pending = append(mig.Pending, r)
			}
			todo = append(todo, r)
		}
	}
	// The mark is set and recorded first: a downgrade is recorded once the
	// driver made it, and a vmlockd killed in between takes the lease
	// back as the driver has it (etcd: shared), with this mark to take it
	// back exclusively.
	ow.mig = mig
	d.mu.Unlock()
	d.recordMark(uuid)
	for _, r := range todo {
		r.Mode = lockmgr.Shared
		if err := d.mgr.ChangeMode(ctx, uuid, r); err != nil {
			return "", d.undoPrepare(ctx, uuid, ow, prev, to, todo, err)
		}
	}
	d.log.Info("migration prepared: exclusive holds are shared until the handover completes", "uuid", uuid, "to", to, "downgraded", len(todo))
	return d.handoverState(uuid)
}

// undoPrepare takes back exclusively what a failed prepare downgraded:
// every resource of todo (those it found held exclusively) that the object
// now holds shared, the one whose downgrade failed included if it could not
// be converted back. What cannot be taken back (someone joined it shared
// meanwhile, or the driver fails) must not be left shared with nothing to
// say so, or a later prepare would hand it over shared and `migrate complete
// --cancel` would know nothing of it: it stays pending in a source mark, so
// that `vmlock migrate complete --cancel` takes it back (waiting, within its
// request, for the other holders to go) and a new prepare hands it over
// exclusive. The error names it. It returns the error for the prepare.
func (d *Daemon) undoPrepare(ctx context.Context, uuid string, ow *owner, prev *migration, to string, todo []lockmgr.Resource, cause error) error {
	// The mark is restored first, so that every restoring upgrade's record
	// carries it (and none the failed one).
	d.mu.Lock()
	ow.mig = prev
	d.mu.Unlock()
	leases, _, err := d.mgr.Held(uuid)
	if err != nil {
		return cause // gone meanwhile: nothing is held
	}
	shared := map[string]bool{}
	for _, l := range leases {
		if r := l.Resource(); r.Mode == lockmgr.Shared {
			shared[r.Key()] = true
		}
	}
	back := context.WithoutCancel(ctx)
	var stuck []lockmgr.Resource
	for _, u := range todo {
		if !shared[u.Key()] {
			continue
		}
		if berr := d.mgr.ChangeMode(back, uuid, u); berr != nil && !errors.Is(berr, lockmgr.ErrNotHeld) {
			d.log.Error("migrate prepare: cannot restore an exclusive hold", "uuid", uuid, "resource", u.String(), "err", berr)
			stuck = append(stuck, u)
		}
	}
	if len(stuck) > 0 {
		mig := &migration{Role: roleSource, Peer: to, Pending: stuck}
		if prev != nil && prev.Role == roleSource {
			mig.Peer, mig.Pending = prev.Peer, append(slices.Clone(prev.Pending), stuck...)
		}
		d.mu.Lock()
		ow.mig = mig
		d.mu.Unlock()
	}
	// The record shows the mark as it is now, whichever records the
	// downgrades and their undoing made.
	d.recordMark(uuid)
	if len(stuck) == 0 {
		return cause
	}
	names := make([]string, len(stuck))
	for i, r := range stuck {
		names[i] = r.Name
	}
	return &lockmgr.Error{Code: lockmgr.CodeOf(cause), Err: cause,
		Msg: fmt.Sprintf("migrate prepare failed, and %s could not be taken back exclusively: held shared now, pending; "+
			"`vmlock migrate complete --uuid %s --cancel` takes them back exclusively (or prepare again)", strings.Join(names, ", "), uuid)}
}

// handoverState is the object's state with the pending resources in their
// original (exclusive) mode and the marker naming the destination.
func (d *Daemon) handoverState(uuid string) (string, error) {
	s, err := d.mgr.Inquire(uuid)
	if err != nil {
		return "", err
	}
	st, err := lockmgr.ParseState(s)
	if err != nil {
		return "", err
	}
	d.mu.Lock()
	var mig *migration
	if ow := d.owners[uuid]; ow != nil {
		mig = ow.mig.clone()
	}
	d.mu.Unlock()
	if mig == nil || mig.Role != roleSource {
		return "", lockmgr.Errorf(lockmgr.CodeNotRegistered, "object %s is not being migrated away", uuid)
	}
	for i := range st {
		for _, p := range mig.Pending {
			if p.Key() == st[i].Resource.Key() {
				st[i].Resource.Mode = lockmgr.Exclusive
			}
		}
	}
	st = append(st, lockmgr.StateEntry{Resource: lockmgr.Resource{Type: migrationType, Name: mig.Peer, Mode: lockmgr.ReadOnly}})
	return st.String(), nil
}

// handoverIn recognises a handover state given to Acquire on the
// destination. For any other state it returns rs and state unchanged and a
// nil mark. For a handover state it checks that the state has one marker
// and that this is the destination, takes the state's resources if rs is
// empty, turns every exclusive resource the state lists into a shared one
// pending an upgrade, and returns the state without its marker.
func (d *Daemon) handoverIn(rs []lockmgr.Resource, state string) ([]lockmgr.Resource, string, *migration, error) {
	if state == "" {
		return rs, state, nil, nil
	}
	st, err := lockmgr.ParseState(state)
	if err != nil {
		return nil, "", nil, err
	}
	i := slices.IndexFunc(st, func(e lockmgr.StateEntry) bool { return e.Resource.Type == migrationType })
	if i < 0 {
		return rs, state, nil, nil
	}
	to := st[i].Resource.Name
	st = slices.Delete(st, i, i+1)
	if slices.ContainsFunc(st, func(e lockmgr.StateEntry) bool { return e.Resource.Type == migrationType }) {
		return nil, "", nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "the state names more than one migration destination")
	}
	if to != d.cfg.Host {
		return nil, "", nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument,
			"the state was prepared for a migration to host %q; this vmlockd is host %q", to, d.cfg.Host)
	}
	if len(rs) == 0 {
		for _, e := range st {
			rs = append(rs, e.Resource)
		}
	}
	listed := make(map[string]bool, len(st))
	for _, e := range st {
		listed[e.Resource.Key()] = true
	}
	mig := &migration{Role: roleTarget}
	out := make([]lockmgr.Resource, len(rs))
	for i, r := range rs {
		c, err := lockmgr.Canonical(r)
		if err != nil {
			return nil, "", nil, err
		}
		if c.Mode == lockmgr.Exclusive && listed[c.Key()] {
			mig.Pending = append(mig.Pending, c)
			c.Mode = lockmgr.Shared
		}
		out[i] = c
	}
	return out, st.String(), mig, nil
}

// migrateComplete ends the handover on this side.
func (d *Daemon) migrateComplete(ctx context.Context, c caller, id string, cancel bool) (*vmlockpb.MigrateReply, error) {
	uuid, ow, err := d.ownerFor(c, id)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	mig := ow.mig.clone()
	d.mu.Unlock()
	if mig == nil {
		return nil, lockmgr.Errorf(lockmgr.CodeNotRegistered, "object %s is not being migrated (prepare on the source, or acquire with its state on the destination, first)", uuid)
	}
	if (mig.Role == roleSource) != cancel {
		// This side gives the object up.
		st, err := d.mgr.Release(ctx, uuid, nil)
		if err != nil {
			return nil, err
		}
		if err := d.forget(ctx, uuid); err != nil && !errors.Is(err, lockmgr.ErrNotRegistered) {
			return nil, err
		}
		d.log.Info("migration completed: released", "uuid", uuid, "role", mig.Role, "cancel", cancel)
		return &vmlockpb.MigrateReply{State: st, Role: mig.Role, Released: true}, nil
	}
	// This side keeps it: take the pending resources exclusively again.
	for len(mig.Pending) > 0 {
		r := mig.Pending[0]
		rest := mig.Pending[1:]
		d.setPending(ow, rest)
		err := d.upgrade(ctx, uuid, r)
		if err != nil && !errors.Is(err, lockmgr.ErrNotHeld) { // not held: unplugged meanwhile
			// Back in the record too: a failed try may have recorded the
			// mark without r (an undone upgrade, a replaced lock-holder).
			d.setPending(ow, mig.Pending)
			d.recordMark(uuid)
			return nil, err
		}
		mig.Pending = rest
	}
	d.mu.Lock()
	ow.mig = nil
	d.mu.Unlock()
	d.recordMark(uuid)
	st, err := d.mgr.Inquire(uuid)
	if err != nil {
		return nil, err
	}
	d.log.Info("migration completed: kept", "uuid", uuid, "role", mig.Role, "cancel", cancel)
	return &vmlockpb.MigrateReply{State: st, Role: mig.Role}, nil
}

// recordMark rewrites uuid's lock-holder record after its mark changed
// without a change of its locks, so that a restart restores the mark it
// has now.
func (d *Daemon) recordMark(uuid string) {
	if err := d.mgr.Notify(uuid); err != nil && !errors.Is(err, lockmgr.ErrNotRegistered) {
		d.log.Error("migration: cannot record the object's mark", "uuid", uuid, "err", err)
	}
}

func (d *Daemon) setPending(ow *owner, p []lockmgr.Resource) {
	d.mu.Lock()
	if ow.mig != nil {
		ow.mig.Pending = slices.Clone(p)
	}
	d.mu.Unlock()
}

// releaseWaiter is a driver that can wait until nobody but a lease's
// holder holds its resource (etcdlock.Driver, on an etcd watch).
type releaseWaiter interface {
	WaitAlone(ctx context.Context, l lockmgr.Lease) error
}

// upgrade takes r exclusively again, waiting while the other side of the
// handover (or anyone else) still holds it, until ctx ends: then the busy
// error names who still holds it. With a driver that can say when the
// other holders are gone (releaseWaiter) it sleeps until then; the
// lockspace driver hears nothing of another host's unlock, so with it, and
// while the conflict is with another object of this daemon, it tries again
// after growing pauses.
func (d *Daemon) upgrade(ctx context.Context, uuid string, r lockmgr.Resource) error {
	r.Mode = lockmgr.Exclusive
	// The wait ends early enough to answer with the busy error before the
	// caller's deadline.
	wctx := ctx
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		wctx, cancel = context.WithDeadline(ctx, dl.Add(-100*time.Millisecond))
		defer cancel()
	}
	waiter, _ := d.cfg.Driver.(releaseWaiter)
	pause := 5 * time.Millisecond
	for {
		err := d.mgr.ChangeMode(ctx, uuid, r)
		var be *lockmgr.BusyError
		if !errors.As(err, &be) {
			return err
		}
		if l := d.leaseOf(uuid, r); waiter != nil && l != nil && !d.localHolder(uuid, be) {
			if werr := waiter.WaitAlone(wctx, l); werr != nil {
				if wctx.Err() != nil {
					return err
				}
				return werr
			}
			continue
		}
		select {
		case <-wctx.Done():
			return err
		case <-time.After(pause):
		}
		pause = min(2*pause, 200*time.Millisecond)
	}
}

// leaseOf returns the lease by which uuid holds r, or nil.
func (d *Daemon) leaseOf(uuid string, r lockmgr.Resource) lockmgr.Lease {
	ls, _, err := d.mgr.Held(uuid)
	if err != nil {
		return nil
	}
	for _, l := range ls {
		if l.Resource().Key() == r.Key() {
			return l
		}
	}
	return nil
}

// localHolder reports whether be names another object of this daemon: a
// conflict in its own lock table, of which the driver knows nothing yet
// while that object's grant is on its way.
func (d *Daemon) localHolder(uuid string, be *lockmgr.BusyError) bool {
	if be.Holder.UUID == uuid {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.owners[be.Holder.UUID] != nil
}
