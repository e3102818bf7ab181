package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// peerCredentials authenticates API clients by SO_PEERCRED: the kernel's
// word on the uid, gid and pid of the process at the other end of the unix
// socket. There is no encryption to add on a local socket.
//
// A non-root peer's supplementary groups come from SO_PEERGROUPS, also the
// kernel's word, as of the connect: they decide membership of the socket
// group (with the primary gid) and the peer's access to files (access.go).
type peerCredentials struct{ gid int }

type peerInfo struct {
	credentials.CommonAuthInfo
	ucred  unix.Ucred
	groups []uint32 // supplementary groups; not read for root
	// inGroup: the peer was a member of the socket group when it connected.
	inGroup bool
}

func (peerInfo) AuthType() string { return "peercred" }

func (p peerCredentials) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, nil, errors.New("vmlockd serves unix sockets only")
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return nil, nil, err
	}
	if cerr != nil {
		return nil, nil, cerr
	}
	pi := peerInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}, ucred: *cred}
	if cred.Uid != 0 {
		var gerr error
		if err := rc.Control(func(fd uintptr) { pi.groups, gerr = peerGroups(int(fd)) }); err != nil {
			return nil, nil, err
		}
		if gerr != nil {
			return nil, nil, gerr
		}
		pi.inGroup = p.gid >= 0 && (int(cred.Gid) == p.gid || slices.Contains(pi.groups, uint32(p.gid)))
	}
	return c, pi, nil
}

func (peerCredentials) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peerCredentials is for the server side")
}
func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (p peerCredentials) Clone() credentials.TransportCredentials { return p }
func (peerCredentials) OverrideServerName(string) error           { return nil }

// caller is the authenticated client of a call.
type caller struct {
	uid, pid int
	gid      int      // primary group
	groups   []uint32 // supplementary groups (nil for root)
}

func (c caller) root() bool { return c.uid == 0 }

type callerKey struct{}

func callerOf(ctx context.Context) caller { return ctx.Value(callerKey{}).(caller) }

// authenticate reads the caller's credentials and admits it or not.
func (d *Daemon) authenticate(ctx context.Context, method string) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	pi, ok2 := p.AuthInfo.(peerInfo)
	if !ok || !ok2 {
		return nil, lockmgr.Errorf(lockmgr.CodePermission, "no peer credentials")
	}
	c := caller{uid: int(pi.ucred.Uid), pid: int(pi.ucred.Pid), gid: int(pi.ucred.Gid), groups: pi.groups}
	if err := d.authorize(c, pi.inGroup); err != nil {
		d.log.Warn("refused a client", "uid", c.uid, "pid", c.pid, "method", method)
		return nil, err
	}
	return context.WithValue(ctx, callerKey{}, c), nil
}

// recovered turns a panic of a handler into an internal error, so that one
// bad call cannot take the daemon (and its owner watches) down.
func (d *Daemon) recovered(method string, err *error) {
	if r := recover(); r != nil {
		d.log.Error("a call panicked; answering internal error", "method", method, "panic", r, "stack", string(debug.Stack()))
		*err = api.ToStatus(lockmgr.Errorf(lockmgr.CodeInternal, "internal error in %s (logged by vmlockd)", method))
	}
}

// intercept authenticates every unary call and runs it (see run).
func (d *Daemon) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	ctx, err := d.authenticate(ctx, method)
	if err != nil {
		return nil, api.ToStatus(err)
	}
	return d.run(ctx, method, req, h)
}

// run bounds and measures a call of an authenticated caller, whether unary
// or carried by a Session, and turns its error (or panic) into an API
// status.
func (d *Daemon) run(ctx context.Context, method string, req any, h grpc.UnaryHandler) (resp any, err error) {
	t0 := time.Now()
	defer d.recovered(method, &err)
	ctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
	defer cancel()
	resp, err = h(ctx, req)
	d.cfg.Metrics.latency.WithLabelValues(method).Observe(time.Since(t0).Seconds())
	if err != nil {
		return nil, api.ToStatus(err)
	}
	return resp, nil
}

// interceptStream authenticates streams (hierarchical lock sessions). A
// stream has no deadline: it lives as long as its session.
func (d *Daemon) interceptStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	defer d.recovered(method, &err)
	ctx, err := d.authenticate(ss.Context(), method)
	if err != nil {
		return api.ToStatus(err)
	}
	if err := h(srv, &authedStream{ServerStream: ss, ctx: ctx}); err != nil {
		return api.ToStatus(err)
	}
	return nil
}

type authedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *authedStream) Context() context.Context { return s.ctx }

// authorize admits root and members of the socket group (inGroup, as the
// handshake found the peer).
func (d *Daemon) authorize(c caller, inGroup bool) error {
	if c.root() || inGroup {
		return nil
	}
	return lockmgr.Errorf(lockmgr.CodePermission, "uid %d may not use vmlockd: only root and members of the socket group (%s) may", c.uid, groupName(d.gid))
}

func groupName(gid int) string {
	if gid < 0 {
		return "none configured"
	}
	if g, err := user.LookupGroupId(strconv.Itoa(gid)); err == nil {
		return g.Name
	}
	return strconv.Itoa(gid)
}

func lookupGroup(s string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return n, nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return -1, fmt.Errorf("socket group %q: %w", s, err)
	}
	return strconv.Atoi(g.Gid)
}

// mayAct checks that c may change the object o: root, or the uid that
// registered it.
func (d *Daemon) mayAct(c caller, uuid string) error {
	if c.root() {
		return nil
	}
	d.mu.Lock()
	o := d.owners[uuid]
	d.mu.Unlock()
	if o == nil {
		// An object is in the table a moment before its owner is recorded
		// (acquireNew, libvirt's REGISTER): whose it is, is not known yet,
		// so only root may touch it. An object not in the table is left to
		// the call to report as not registered.
		if _, err := d.mgr.Object(uuid); err == nil {
			return lockmgr.Errorf(lockmgr.CodePermission, "object %s is being registered by another call, whose uid is not known yet: uid %d may not change it; retry once that call has returned", uuid, c.uid)
		}
		return nil
	}
	if o.uid != c.uid {
		return lockmgr.Errorf(lockmgr.CodePermission, "object %s was registered by uid %d; uid %d may not change it", uuid, o.uid, c.uid)
	}
	return nil
}

type service struct {
	vmlockpb.UnimplementedVMLockServer
	d *Daemon
}

func (s *service) Status(ctx context.Context, _ *vmlockpb.StatusRequest) (*vmlockpb.StatusReply, error) {
	d := s.d
	return &vmlockpb.StatusReply{
		Version: d.cfg.Version, Driver: d.cfg.Driver.Name(), UptimeSeconds: time.Since(d.started).Seconds(),
		Objects: int64(d.mgr.ObjectCount()), Locks: int64(d.mgr.HeldCount()), Pid: int64(os.Getpid()),
		Host: d.cfg.Host, StateDir: d.cfg.StateDir, StartedUnixNano: d.started.UnixNano(), Reloads: int64(d.reloads),
	}, nil
}

func (s *service) Acquire(ctx context.Context, req *vmlockpb.AcquireRequest) (*vmlockpb.StateReply, error) {
	d := s.d
	st, err := d.acquire(ctx, callerOf(ctx), req)
	res := "ok"
	if err != nil {
		res = strings.ReplaceAll(lockmgr.CodeOf(err).String(), " ", "_")
		if errors.Is(err, lockmgr.ErrBusy) {
			d.cfg.Metrics.busy.Inc()
		}
	}
	d.cfg.Metrics.acquires.WithLabelValues(res).Inc()
	if err != nil {
		return nil, err
	}
	return &vmlockpb.StateReply{State: st}, nil
}

func (d *Daemon) acquire(ctx context.Context, c caller, req *vmlockpb.AcquireRequest) (string, error) {
	o := api.ObjectFromPB(req.Object)
	if err := o.Validate(); err != nil {
		return "", err
	}
	if o.Host == "" {
		o.Host = d.cfg.Host
	}
	rs := make([]lockmgr.Resource, 0, len(req.Resources))
	for _, pr := range req.Resources {
		r, err := api.ResourceFromPB(pr)
		if err != nil {
			return "", err
		}
		if err := clientPath(r); err != nil {
			return "", err
		}
		rs = append(rs, r)
	}
	if o.PID <= 0 {
		return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "object %s: a pid is required (its locks live as long as that process)", o.UUID)
	}
	// A handover state from `migrate prepare` (migrate.go).
	rs, state, mig, err := d.handoverIn(rs, req.State)
	if err != nil {
		return "", err
	}
	if !c.root() {
		for i, r := range rs {
			if rs[i], err = lockmgr.Canonical(r); err != nil {
				return "", err
			}
			if err := mayUse(ctx, c, rs[i]); err != nil {
				return "", err
			}
		}
	}
	if err := d.mgr.Register(o); err == nil {
		return d.acquireNew(ctx, c, o, rs, state, mig)
	} else if !errors.Is(err, lockmgr.ErrNotRegistered) {
		return "", err
	}
	return d.hotplug(ctx, c, o, rs, state)
}

// clientPath refuses a disk path (of any call) that vmlockd would resolve
// otherwise than its client: a relative one (vmlockd's working directory is not the
// client's), or one through /proc/self, /dev/fd and the like (vmlockd's own
// descriptors are not the client's).
func clientPath(r lockmgr.Resource) error {
	switch {
	case r.Type != lockmgr.TypeDisk:
		return nil
	case !filepath.IsAbs(r.Name):
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(), Msg: "a disk path must be absolute"}
	case api.SelfRelative(r.Name):
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.String(),
			Msg: "the path names a descriptor of whichever process resolves it, and vmlockd's are not the client's: name the file itself"}
	}
	return nil
}

// acquireNew takes the resources of a just-registered object; on any
// failure the object is forgotten again. mig, if not nil, marks it as the
// target of a migration handover.
func (d *Daemon) acquireNew(ctx context.Context, c caller, o lockmgr.Object, rs []lockmgr.Resource, state string, mig *migration) (string, error) {
	err := d.own(ctx, o, c.uid, mig)
	if err != nil {
		return "", err
	}
	for _, r := range rs {
		if err = d.mgr.AddResource(o.UUID, r); err != nil {
			break
		}
	}
	if err == nil {
		err = d.mgr.Acquire(ctx, o.UUID, state)
	}
	if err != nil {
		_ = d.forget(context.WithoutCancel(ctx), o.UUID)
		return "", err
	}
	d.log.Debug("acquired", "uuid", o.UUID, "name", o.Name, "pid", o.PID, "resources", len(rs))
	return d.mgr.Inquire(o.UUID)
}

// own ties the just-registered object o to its owner process, on behalf of
// uid: the process is pinned by a pidfd and its exit releases o. The owner
// is known before the first grant, so that the observer records its uid and
// start time with the locks. On failure o is unregistered again.
func (d *Daemon) own(ctx context.Context, o lockmgr.Object, uid int, mig *migration) error {
	d.mu.Lock()
	var p *process
	err := d.keptLocked(o.UUID)
	if err == nil {
		p, err = d.pinLocked(o.PID)
	}
	if err == nil && uid != 0 {
		if err = processOwnedBy(p, uid); err != nil {
			if pr := d.procs[p.pid]; pr == nil || pr.p != p {
				p.close() // a fresh pidfd nobody watches
			}
		}
	}
	if err == nil {
		p = d.watchLocked(o.UUID, p)
		d.owners[o.UUID] = &owner{obj: o, uid: uid, proc: p, since: time.Now(), mig: mig}
	}
	d.mu.Unlock()
	if err != nil {
		_ = d.mgr.Unregister(context.WithoutCancel(ctx), o.UUID)
		if errors.Is(err, errGone) {
			err = lockmgr.Errorf(lockmgr.CodeInvalidArgument, "object %s (%q): process %d does not exist", o.UUID, o.Name, o.PID)
		}
	}
	return err
}

// processOwnedBy checks that the pinned process p belongs to uid. It reads the
// owner after pinning and checks that p is still alive after reading, so
// the uid read is p's own even if the pid number were reused right before:
// a user can never make vmlockd watch (and revoke, that is kill) a process
// of another user.
func processOwnedBy(p *process, uid int) error {
	owner, _, err := procIDs(p.pid)
	if err != nil || !p.alive() {
		return errGone
	}
	if owner != uid {
		return lockmgr.Errorf(lockmgr.CodePermission, "process %d belongs to uid %d, not to the caller (uid %d)", p.pid, owner, uid)
	}
	return nil
}

// hotplug adds resources to a registered object, all or nothing (see
// lockmgr.Manager.AcquireResource).
func (d *Daemon) hotplug(ctx context.Context, c caller, o lockmgr.Object, rs []lockmgr.Resource, state string) (string, error) {
	if err := d.mayAct(c, o.UUID); err != nil {
		return "", err
	}
	d.mu.Lock()
	ow := d.owners[o.UUID]
	d.mu.Unlock()
	if ow == nil {
		return "", lockmgr.Errorf(lockmgr.CodeNotRegistered, "object %s is being registered or released by another call; retry", o.UUID)
	}
	if ow.obj.PID != o.PID {
		return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "object %s is already registered with pid %d, not %d", o.UUID, ow.obj.PID, o.PID)
	}
	if state != "" {
		return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "object %s already holds locks; a state applies only to its first acquire", o.UUID)
	}
	// One grant for the whole list: one driver call and one lock-holder
	// record, and on failure nothing of the list is held.
	if err := d.mgr.AcquireResource(ctx, o.UUID, rs...); err != nil {
		return "", err
	}
	return d.mgr.Inquire(o.UUID)
}

func (s *service) Release(ctx context.Context, req *vmlockpb.ReleaseRequest) (*vmlockpb.StateReply, error) {
	d := s.d
	uuid, err := lockmgr.ParseUUID(req.Uuid)
	if err != nil {
		return nil, err
	}
	if err := d.mayAct(callerOf(ctx), uuid); err != nil {
		return nil, err
	}
	if d.qemu.supervises(uuid) {
		// Its locks follow QEMU's block graph: released behind QEMU's back,
		// QEMU would go on writing images nobody holds.
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument,
			"object %s is a QEMU VM that vmlockd supervises (vmlock run --qemu): its locks follow the disks QEMU uses and are released when it exits", uuid)
	}
	if len(req.Resources) == 0 {
		st, err := d.mgr.Release(ctx, uuid, nil)
		if err != nil {
			return nil, err
		}
		if err := d.forget(ctx, uuid); err != nil && !errors.Is(err, lockmgr.ErrNotRegistered) {
			return nil, err
		}
		return &vmlockpb.StateReply{State: st}, nil
	}
	rs := make([]lockmgr.Resource, 0, len(req.Resources))
	for _, pr := range req.Resources {
		r, err := api.ResourceFromPB(pr)
		if err != nil {
			return nil, err
		}
		if err := clientPath(r); err != nil {
			return nil, err
		}
		rs = append(rs, r)
	}
	// One release for the whole list: one driver call and one lock-holder
	// record; a resource not held, or named twice, releases nothing.
	st, err := d.mgr.Unplug(ctx, uuid, rs...)
	if err != nil {
		return nil, err
	}
	if ls, ro, err := d.mgr.Held(uuid); err == nil && len(ls) == 0 && len(ro) == 0 {
		_ = d.forget(ctx, uuid)
	}
	return &vmlockpb.StateReply{State: st}, nil
}

func (s *service) Inquire(ctx context.Context, req *vmlockpb.InquireRequest) (*vmlockpb.StateReply, error) {
	st, err := s.d.mgr.Inquire(req.Uuid)
	if err != nil {
		return nil, err
	}
	return &vmlockpb.StateReply{State: st}, nil
}

func (s *service) Locks(ctx context.Context, _ *vmlockpb.LocksRequest) (*vmlockpb.LocksReply, error) {
	locks := s.d.mgr.Locks()
	rep := &vmlockpb.LocksReply{Locks: make([]*vmlockpb.Lock, 0, len(locks))}
	for _, l := range locks {
		pl := &vmlockpb.Lock{Resource: api.ResourceToPB(l.Resource), Token: l.Token, SinceUnixNano: l.Since.UnixNano()}
		for _, h := range l.Holders {
			pl.Holders = append(pl.Holders, api.HolderToPB(h))
		}
		rep.Locks = append(rep.Locks, pl)
	}
	rep.Untracked = s.d.untracked()
	return rep, nil
}

func (s *service) Reload(ctx context.Context, _ *vmlockpb.ReloadRequest) (*vmlockpb.ReloadReply, error) {
	if !callerOf(ctx).root() {
		return nil, lockmgr.Errorf(lockmgr.CodePermission, "only root may reload vmlockd")
	}
	// Run stops the server gracefully, so this reply goes out first.
	s.d.requestReload()
	return &vmlockpb.ReloadReply{Pid: int64(os.Getpid())}, nil
}

func (s *service) Revoke(ctx context.Context, req *vmlockpb.RevokeRequest) (*vmlockpb.RevokeReply, error) {
	r, err := api.ResourceFromPB(req.Resource)
	if err != nil {
		return nil, err
	}
	if err := clientPath(r); err != nil {
		return nil, err
	}
	if req.GraceMs < 0 || req.GraceMs > api.MaxGrace.Milliseconds() {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "grace %d ms: want 0 (vmlockd's revoke.grace) up to %v", req.GraceMs, api.MaxGrace)
	}
	grace := time.Duration(req.GraceMs) * time.Millisecond
	if grace == 0 {
		grace = s.d.cfg.KillGrace
	}
	pids, err := s.d.revoke(ctx, callerOf(ctx), r, grace)
	if err != nil {
		return nil, err
	}
	rep := &vmlockpb.RevokeReply{}
	for _, p := range pids {
		rep.KilledPids = append(rep.KilledPids, int64(p))
	}
	return rep, nil
}

// revoke kills every holder of r and waits until they are gone and their
// locks released.
func (d *Daemon) revoke(ctx context.Context, c caller, r lockmgr.Resource, grace time.Duration) ([]int, error) {
	r, err := lockmgr.Canonical(r)
	if err != nil {
		return nil, err
	}
	var victims []*owner
	for _, l := range d.mgr.Locks() {
		if l.Resource.Key() != r.Key() {
			continue
		}
		for _, h := range l.Holders {
			d.mu.Lock()
			o := d.owners[h.UUID]
			d.mu.Unlock()
			if o != nil {
				victims = append(victims, o)
			}
		}
	}
	if len(victims) == 0 {
		return nil, &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: r.String(), Msg: "not held by any owner of this vmlockd"}
	}
	for _, o := range victims {
		if err := d.mayAct(c, o.obj.UUID); err != nil {
			return nil, err
		}
	}
	// Killing may take the whole grace period and more: the call's own
	// deadline is extended to cover it.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), grace+d.cfg.RequestTimeout)
	defer cancel()
	// Every holder at once: one after another, holders that ignore SIGTERM
	// would each take a grace period, beyond the deadline.
	errs := make([]error, len(victims))
	var wg sync.WaitGroup
	for i, o := range victims {
		d.log.Warn("revoking: killing the holder", "resource", r.String(), "uuid", o.obj.UUID, "name", o.obj.Name, "pid", o.obj.PID)
		wg.Go(func() { errs[i] = d.kill(ctx, o, grace) })
	}
	wg.Wait()
	var pids []int
	var failed error
	for i, o := range victims {
		if errs[i] != nil {
			if failed == nil {
				failed = errs[i]
			}
			continue
		}
		d.cfg.Metrics.revocations.Inc()
		pids = append(pids, o.obj.PID)
	}
	if failed != nil {
		return pids, failed
	}
	// The exit handler releases the locks; wait for it, so that the resource
	// is free when we answer.
	for {
		busy := false
		for _, o := range victims {
			if _, err := d.mgr.Object(o.obj.UUID); err == nil {
				busy = true
			}
		}
		if !busy {
			return pids, nil
		}
		select {
		case <-ctx.Done():
			return pids, lockmgr.Errorf(lockmgr.CodeTimeout, "the holders of %s were killed but their locks were not released in time", r)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// kill ends a holder: the kill command or SIGTERM, then SIGKILL once grace
// has passed since either began (a kill command that hangs is stopped then).
// The kill command is only for objects of root or of vmlockd's own uid: it
// names its victim by uuid or name, which any other client chooses freely
// (they may be root's VM's), so anybody else's holder gets SIGTERM, through
// the pidfd of the process vmlockd checked to be theirs.
func (d *Daemon) kill(ctx context.Context, o *owner, grace time.Duration) error {
	p := o.proc
	gctx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	if len(d.cfg.KillCommand) > 0 && (o.uid == 0 || o.uid == os.Geteuid()) {
		args := make([]string, len(d.cfg.KillCommand))
		rep := strings.NewReplacer("{pid}", strconv.Itoa(o.obj.PID), "{uuid}", o.obj.UUID, "{name}", o.obj.Name)
		for i, a := range d.cfg.KillCommand {
			args[i] = rep.Replace(a)
		}
		out, err := exec.CommandContext(gctx, args[0], args[1:]...).CombinedOutput()
		if err != nil {
			d.log.Error("kill command failed; falling back to SIGKILL after the grace period", "cmd", args, "err", err, "output", string(out))
		}
	} else if err := p.signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("SIGTERM to pid %d: %w", o.obj.PID, err)
	}
	err := p.waitExit(gctx)
	if err == nil {
		return nil
	}
	d.log.Warn("holder survived the grace period; sending SIGKILL", "pid", o.obj.PID, "grace", grace)
	if err := p.signal(syscall.SIGKILL); err != nil {
		return fmt.Errorf("SIGKILL to pid %d: %w", o.obj.PID, err)
	}
	if err := p.waitExit(ctx); err != nil {
		return lockmgr.Errorf(lockmgr.CodeTimeout, "pid %d did not die after SIGKILL (uninterruptible sleep?); its locks stay held", o.obj.PID)
	}
	return nil
}
