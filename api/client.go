package api

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// DefaultSocket is where vmlockd listens unless told otherwise, and so where
// vmlock looks for it: /run/vmlock/vmlockd.sock for root;
// $XDG_RUNTIME_DIR/vmlock/vmlockd.sock for other users, or, without
// XDG_RUNTIME_DIR, $TMPDIR/vmlock-UID/vmlock/vmlockd.sock.
func DefaultSocket() string { return defaultSocket(os.Geteuid(), os.Getenv) }

func defaultSocket(euid int, getenv func(string) string) string {
	if euid == 0 {
		return "/run/vmlock/vmlockd.sock"
	}
	run := getenv("XDG_RUNTIME_DIR")
	if run == "" {
		tmp := getenv("TMPDIR")
		if tmp == "" {
			tmp = "/tmp"
		}
		run = filepath.Join(tmp, fmt.Sprintf("vmlock-%d", euid))
	}
	return filepath.Join(run, "vmlock", "vmlockd.sock")
}

// Client is a connection to vmlockd. It is safe for concurrent use. Every
// method returns lockmgr errors (see FromStatus).
type Client struct {
	conn *grpc.ClientConn
	rpc  vmlockpb.VMLockClient
	sess session // Status, Acquire, Release and Inquire go this way first
}

// Dial connects to the daemon at socket. It fails at once, with an error
// that says so, when nothing listens there; once connected, calls wait
// through a reload of the daemon (whose listening socket stays open) until
// their own deadline.
func Dial(ctx context.Context, socket string) (*Client, error) {
	probe, err := (&net.Dialer{}).DialContext(ctx, "unix", socket)
	if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
		return nil, &lockmgr.Error{Code: lockmgr.CodePermission,
			Msg: fmt.Sprintf("no permission to use vmlockd's socket %s: add this user to vmlockd's socket_group, or run as root", socket), Err: err}
	}
	if err != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInternal,
			Msg: fmt.Sprintf("vmlockd is not running or not reachable at %s (start it, or set --socket / VMLOCK_SOCKET)", socket), Err: err}
	}
	probe.Close()
	conn, err := grpc.NewClient("passthrough:///vmlockd",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}),
		// The lock monitor's reply grows with the table (a few hundred
		// bytes a lock, 4 KiB names allowed): gRPC's default limit of
		// 4 MiB would make `vmlock locks` fail on a big host.
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true), grpc.MaxCallRecvMsgSize(math.MaxInt32)),
		// Fixed flow-control windows, as the daemon's: no BDP-estimation
		// ping after each reply (see daemon.Run).
		grpc.WithStaticStreamWindowSize(1<<20),
		grpc.WithStaticConnWindowSize(4<<20),
	)
	if err != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "connecting to vmlockd", Err: err}
	}
	return &Client{conn: conn, rpc: vmlockpb.NewVMLockClient(conn)}, nil
}

// Close closes the connection. Calls in progress fail.
func (c *Client) Close() error {
	err := c.conn.Close()
	c.sess.close()
	return err
}

// RPC returns the raw gRPC client, for calls this type does not wrap.
func (c *Client) RPC() vmlockpb.VMLockClient { return c.rpc }

// Acquire registers o (if new) and takes rs, all or nothing; state, if not
// empty, makes the grant conditional on its tokens. It returns the state of
// everything o holds.
func (c *Client) Acquire(ctx context.Context, o lockmgr.Object, rs []lockmgr.Resource, state string) (string, error) {
	// What the daemon would refuse, and what could not even be sent (a
	// name that is not UTF-8), is refused here with the daemon's error.
	if err := o.Validate(); err != nil {
		return "", err
	}
	req := &vmlockpb.AcquireRequest{Object: ObjectToPB(o), State: state}
	for _, r := range rs {
		req.Resources = append(req.Resources, ResourceToPB(r))
	}
	if rep, ok, err := c.sess.do(ctx, c.rpc, &vmlockpb.Call{Method: &vmlockpb.Call_Acquire{Acquire: req}}); ok {
		return rep.GetState().GetState(), err
	}
	rep, err := c.rpc.Acquire(ctx, req)
	return rep.GetState(), FromStatus(err)
}

// Release releases rs of the object uuid, or everything if rs is empty, and
// returns the state of what it released.
func (c *Client) Release(ctx context.Context, uuid string, rs ...lockmgr.Resource) (string, error) {
	req := &vmlockpb.ReleaseRequest{Uuid: uuid}
	for _, r := range rs {
		req.Resources = append(req.Resources, ResourceToPB(r))
	}
	if rep, ok, err := c.sess.do(ctx, c.rpc, &vmlockpb.Call{Method: &vmlockpb.Call_Release{Release: req}}); ok {
		return rep.GetState().GetState(), err
	}
	rep, err := c.rpc.Release(ctx, req)
	return rep.GetState(), FromStatus(err)
}

// Inquire returns the state of what the object holds.
func (c *Client) Inquire(ctx context.Context, uuid string) (string, error) {
	req := &vmlockpb.InquireRequest{Uuid: uuid}
	if rep, ok, err := c.sess.do(ctx, c.rpc, &vmlockpb.Call{Method: &vmlockpb.Call_Inquire{Inquire: req}}); ok {
		return rep.GetState().GetState(), err
	}
	rep, err := c.rpc.Inquire(ctx, req)
	return rep.GetState(), FromStatus(err)
}

// Lock is one entry of the lock monitor.
type Lock struct {
	Resource lockmgr.Resource `json:"resource"`
	Token    uint64           `json:"token"`
	Holders  []lockmgr.Holder `json:"holders"`
	Since    time.Time        `json:"since,omitzero"`
	Waiters  int              `json:"waiters"`
}

// Untracked is a holding whose locks vmlockd keeps held without managing
// them: what a start of vmlockd could not take back (see vmlock.proto).
type Untracked struct {
	UUID      string             `json:"uuid"`
	PID       int                `json:"pid"`
	Resources []lockmgr.Resource `json:"resources"`
	Keys      []string           `json:"keys,omitempty"`
	Problem   string             `json:"problem"`
	// UntilOwnerExits: its locks go when its owner exits; otherwise they
	// stay until an operator resolves them.
	UntilOwnerExits bool `json:"until_owner_exits"`
}

// Monitor is the lock monitor: every lock in vmlockd's table, and the
// holdings it keeps locked without managing them.
type Monitor struct {
	Locks     []Lock
	Untracked []Untracked
}

// Monitor returns the lock monitor.
func (c *Client) Monitor(ctx context.Context) (Monitor, error) {
	rep, err := c.rpc.Locks(ctx, &vmlockpb.LocksRequest{})
	if err != nil {
		return Monitor{}, FromStatus(err)
	}
	m := Monitor{Locks: make([]Lock, 0, len(rep.Locks))}
	for _, l := range rep.Locks {
		r, err := ResourceFromPB(l.Resource)
		if err != nil {
			return Monitor{}, fmt.Errorf("vmlockd sent a bad resource: %w", err)
		}
		lk := Lock{Resource: r, Token: l.Token, Since: fromUnixNano(l.SinceUnixNano), Waiters: int(l.Waiters)}
		for _, h := range l.Holders {
			lk.Holders = append(lk.Holders, HolderFromPB(h))
		}
		m.Locks = append(m.Locks, lk)
	}
	for _, u := range rep.Untracked {
		ut := Untracked{UUID: u.Uuid, PID: int(u.Pid), Keys: u.Keys, Problem: u.Problem, UntilOwnerExits: u.UntilOwnerExits,
			Resources: make([]lockmgr.Resource, 0, len(u.Resources))}
		for _, pr := range u.Resources {
			r, err := ResourceFromPB(pr)
			if err != nil {
				return Monitor{}, fmt.Errorf("vmlockd sent a bad resource: %w", err)
			}
			ut.Resources = append(ut.Resources, r)
		}
		m.Untracked = append(m.Untracked, ut)
	}
	return m, nil
}

// Locks returns the lock monitor's entries of vmlockd's table.
func (c *Client) Locks(ctx context.Context) ([]Lock, error) {
	m, err := c.Monitor(ctx)
	return m.Locks, err
}

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (*vmlockpb.StatusReply, error) {
	req := &vmlockpb.StatusRequest{}
	if rep, ok, err := c.sess.do(ctx, c.rpc, &vmlockpb.Call{Method: &vmlockpb.Call_Status{Status: req}}); ok {
		return rep.GetStatus(), err
	}
	rep, err := c.rpc.Status(ctx, req)
	return rep, FromStatus(err)
}

// MaxGrace is the longest grace period a revocation may give its holders
// between SIGTERM and SIGKILL; the call waits that long at most.
const MaxGrace = time.Hour

// Revoke kills the holders of r and returns their pids once they are gone.
// grace is how long they have between SIGTERM and SIGKILL (0: the daemon's
// default; at most MaxGrace).
func (c *Client) Revoke(ctx context.Context, r lockmgr.Resource, grace time.Duration) ([]int, error) {
	rep, err := c.rpc.Revoke(ctx, &vmlockpb.RevokeRequest{Resource: ResourceToPB(r), GraceMs: grace.Milliseconds()})
	if err != nil {
		return nil, FromStatus(err)
	}
	pids := make([]int, len(rep.KilledPids))
	for i, p := range rep.KilledPids {
		pids[i] = int(p)
	}
	return pids, nil
}

// Reload asks the daemon to re-execute itself; it returns the daemon's pid.
func (c *Client) Reload(ctx context.Context) (int, error) {
	rep, err := c.rpc.Reload(ctx, &vmlockpb.ReloadRequest{})
	return int(rep.GetPid()), FromStatus(err)
}

// IsNotRunning reports whether err says the daemon could not be reached.
func IsNotRunning(err error) bool {
	var le *lockmgr.Error
	return errors.As(err, &le) && le.Code == lockmgr.CodeInternal && errors.Is(le.Err, os.ErrNotExist)
}
