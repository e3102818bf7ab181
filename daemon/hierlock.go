package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/hierlock"
	"github.com/vmlock/vmlock/lockmgr"
)

// hierService serves the daemon's hierarchical locks: one hierlock.Manager
// shared by every client, each client session an owner. A session's locks
// live exactly as long as its stream: the stream ends when the client ends
// it or when its connection closes, which the kernel does when the client
// process dies, so a killed holder never leaves locks behind (Ganeti waits
// for a dead job for minutes).
type hierService struct {
	vmlockpb.UnimplementedHierLockServer
	d       *Daemon
	mgr     *hierlock.Manager
	session atomic.Uint64
}

func newHierService(d *Daemon, levels []hierlock.LevelConfig) (*hierService, error) {
	m, err := hierlock.NewManager(hierlock.Config{Levels: levels})
	if err != nil {
		return nil, fmt.Errorf("hierarchical lock levels: %w", err)
	}
	return &hierService{d: d, mgr: m}, nil
}

// ownerName names a session after its client process, as the monitor
// shows it: "vmlock[4242]#7".
func (h *hierService) ownerName(pid int) hierlock.Owner {
	comm, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	name := strings.TrimSpace(string(comm))
	if err != nil || name == "" {
		name = "pid"
	}
	return hierlock.Owner(fmt.Sprintf("%s[%d]#%d", name, pid, h.session.Add(1)))
}

// Session serves one session's requests in order. The session ends when
// the client ends the stream, its connection closes, or the daemon stops or
// reloads: the locks live in this process only, so a stop does not wait for
// them (a graceful stop would otherwise wait out the request timeout for
// every session that holds a lock); a request in progress is cancelled.
// Everything the session holds is released when it ends.
func (h *hierService) Session(stream vmlockpb.HierLock_SessionServer) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	c := callerOf(ctx)
	owner := h.ownerName(c.pid)
	h.d.log.Debug("hierarchical lock session opened", "owner", owner, "uid", c.uid)
	defer func() {
		if err := h.mgr.ReleaseAll(owner); err != nil {
			h.d.log.Error("releasing a session's hierarchical locks", "owner", owner, "err", err)
		}
		h.d.log.Debug("hierarchical lock session closed; its locks are released", "owner", owner)
	}()
	// Requests are read by a goroutine of their own so that a stop ends an
	// idle session at once instead of waiting in Recv, and cancels a
	// request in progress.
	reqs := make(chan *vmlockpb.SessionRequest)
	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() {
		select {
		case <-h.d.stopping:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		var req *vmlockpb.SessionRequest
		select {
		case <-ctx.Done():
			return nil
		case err := <-recvErr:
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return err
		case req = <-reqs:
			if ctx.Err() != nil {
				return nil // stopping: not served, so not answered
			}
		}
		rep := &vmlockpb.SessionReply{Id: req.Id, Owner: string(owner)}
		var names []string
		var err error
		switch op := req.Op.(type) {
		case *vmlockpb.SessionRequest_Acquire:
			names, err = h.acquire(ctx, owner, op.Acquire)
		case *vmlockpb.SessionRequest_Release:
			err = h.release(owner, op.Release)
		case *vmlockpb.SessionRequest_Add:
			err = h.add(ctx, owner, op.Add)
		case *vmlockpb.SessionRequest_Remove:
			names, err = h.remove(ctx, owner, op.Remove)
		default:
			err = lockmgr.Errorf(lockmgr.CodeInvalidArgument, "empty session request")
		}
		rep.Acquired = names
		if err != nil {
			rep.Code, rep.Error = int32(hierCode(err)), err.Error()
		}
		if err := stream.Send(rep); err != nil {
			return err
		}
	}
}

// hierCode classifies hierlock's errors in lockmgr's codes, which are the
// CLI's exit statuses.
func hierCode(err error) lockmgr.Code {
	switch {
	case errors.Is(err, hierlock.ErrOrderViolation): // before the kind it may wrap
		return lockmgr.CodeInvalidArgument
	case errors.Is(err, hierlock.ErrTimeout), errors.Is(err, hierlock.ErrCanceled):
		return lockmgr.CodeTimeout
	case errors.Is(err, hierlock.ErrNotOwned):
		return lockmgr.CodeNotHeld
	case errors.Is(err, hierlock.ErrDoubleAcquire), errors.Is(err, hierlock.ErrOwnership):
		return lockmgr.CodeNotRegistered
	case errors.Is(err, hierlock.ErrDeleted):
		return lockmgr.CodeBusy
	case errors.Is(err, hierlock.ErrInvalid), errors.Is(err, hierlock.ErrNotFound), errors.Is(err, hierlock.ErrExists):
		return lockmgr.CodeInvalidArgument
	}
	return lockmgr.CodeOf(err)
}

func (h *hierService) level(name string) (hierlock.Level, error) {
	l, ok := h.mgr.LevelByName(name)
	if !ok {
		var names []string
		for _, lc := range h.mgr.Levels() {
			names = append(names, lc.Name)
		}
		return 0, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "unknown lock level %q (levels: %s)", name, strings.Join(names, ", "))
	}
	return l, nil
}

func mode(shared bool) hierlock.Mode {
	if shared {
		return hierlock.Shared
	}
	return hierlock.Exclusive
}

// acquire takes every level of the request in level order, each in one
// call, under one deadline; on failure it releases what it took. Names a
// request asks for at a modifiable level are created on first use (so that
// `vmlock hold instance/web1` works without a separate add) as implicit
// locks, which go away again once nobody holds or waits for them: a client
// that locks one name per job leaves nothing behind.
func (h *hierService) acquire(ctx context.Context, owner hierlock.Owner, req *vmlockpb.HierAcquire) ([]string, error) {
	type step struct {
		level hierlock.Level
		req   hierlock.Request
	}
	var steps []step
	levels := h.mgr.Levels()
	for _, lr := range req.Levels {
		l, err := h.level(lr.Level)
		if err != nil {
			return nil, err
		}
		if lr.All == (len(lr.Names) > 0) {
			return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "level %s: give names or the whole level, not both or neither", lr.Level)
		}
		for _, s := range steps {
			if s.level == l {
				return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "level %s appears twice: each level is acquired in one call", lr.Level)
			}
		}
		steps = append(steps, step{l, hierlock.Request{Names: lr.Names, All: lr.All, Mode: mode(lr.Shared),
			Priority: int(req.Priority), Opportunistic: req.Opportunistic, Create: !lr.All && levels[l].Modifiable}})
	}
	if len(steps) == 0 {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "nothing to acquire")
	}
	// Levels in order; without the BGL, take it shared first, as every
	// Ganeti job does.
	for i := 1; i < len(steps); i++ {
		for j := i; j > 0 && steps[j].level < steps[j-1].level; j-- {
			steps[j], steps[j-1] = steps[j-1], steps[j]
		}
	}
	if steps[0].level != 0 && !h.mgr.IsOwned(owner, 0) {
		steps = append([]step{{0, hierlock.Request{All: true, Mode: hierlock.Shared, Priority: int(req.Priority)}}}, steps...)
	}
	switch {
	case req.TimeoutMs < 0:
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "timeout_ms %d: want 0 (wait as long as it takes) or a positive number", req.TimeoutMs)
	case req.TimeoutMs > math.MaxInt64/int64(time.Millisecond):
		// Longer than a Duration holds (292 years): as long as it takes.
	case req.TimeoutMs > 0:
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.TimeoutMs)*time.Millisecond)
		defer cancel()
	}
	var got []string
	var took []hierlock.Level
	for _, s := range steps {
		names, err := h.mgr.Acquire(ctx, owner, s.level, s.req)
		if err != nil {
			h.undo(owner, took)
			return nil, err
		}
		took = append(took, s.level)
		for _, n := range names {
			got = append(got, levels[s.level].Name+"/"+n)
		}
	}
	return got, nil
}

func (h *hierService) undo(owner hierlock.Owner, took []hierlock.Level) {
	for i := len(took) - 1; i >= 0; i-- {
		_ = h.mgr.Release(owner, took[i])
	}
}

func (h *hierService) release(owner hierlock.Owner, req *vmlockpb.HierRelease) error {
	if req.Level == "" {
		return h.mgr.ReleaseAll(owner)
	}
	l, err := h.level(req.Level)
	if err != nil {
		return err
	}
	if len(req.Names) == 0 {
		return h.mgr.Release(owner, l)
	}
	return h.mgr.ReleaseNames(owner, l, req.Names)
}

func (h *hierService) add(ctx context.Context, owner hierlock.Owner, req *vmlockpb.HierAdd) error {
	l, err := h.level(req.Level)
	if err != nil {
		return err
	}
	return h.mgr.Add(ctx, owner, l, req.Names, req.Acquired, mode(req.Shared))
}

func (h *hierService) remove(ctx context.Context, owner hierlock.Owner, req *vmlockpb.HierRemove) ([]string, error) {
	l, err := h.level(req.Level)
	if err != nil {
		return nil, err
	}
	return h.mgr.Remove(ctx, owner, l, req.Names)
}

func (h *hierService) Monitor(ctx context.Context, _ *vmlockpb.HierMonitorRequest) (*vmlockpb.HierMonitorReply, error) {
	rep := &vmlockpb.HierMonitorReply{}
	for _, lc := range h.mgr.Levels() {
		rep.Levels = append(rep.Levels, lc.Name)
	}
	for _, li := range h.mgr.Snapshot() {
		pl := &vmlockpb.HierLockInfo{Name: li.Name, Mode: li.State.String(), Owners: owners(li.Owners)}
		for _, p := range li.Pending {
			pl.Pending = append(pl.Pending, &vmlockpb.HierPending{Mode: p.Mode.String(), Priority: int32(p.Priority), Owners: owners(p.Owners)})
		}
		rep.Locks = append(rep.Locks, pl)
	}
	return rep, nil
}

func owners(os []hierlock.Owner) []string {
	out := make([]string, len(os))
	for i, o := range os {
		out[i] = string(o)
	}
	return out
}
