package etcdlock

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/vmlock/vmlock/lockmgr"
)

// Driver is the etcd lock driver. It implements lockmgr.Driver and
// lockmgr.Adopter; it is safe for concurrent use.
type Driver struct {
	cfg     Config
	cli     *clientv3.Client
	ks      keyspace
	hostKey string // ks.host(cfg.Host), which every grant, conversion and release compares
	log     *slog.Logger

	ctx    context.Context // done when Close is called
	cancel context.CancelFunc
	wg     sync.WaitGroup

	renewWake chan struct{} // nudges renewLoop (buffered, 1)
	dogWake   chan struct{} // nudges watchdog (buffered, 1)
	sweepWake chan struct{} // nudges sweepLoop (buffered, 1)
	fenceMu   sync.Mutex    // serialises fence, so OnFence never runs twice at once
	// announceWake nudges announceLoop (buffered, 1); annMu serialises
	// OnDeadline calls.
	announceWake chan struct{}
	annMu        sync.Mutex
	attempts     atomic.Uint64 // grant transactions sent

	mu         sync.Mutex
	closed     bool
	leaseID    clientv3.LeaseID
	ttl        time.Duration // effective TTL of the current session
	epoch      uint64        // number of the current session; leases of older ones are lost
	hostRev    int64         // ModRevision of the host key as the current session wrote it
	fenced     bool
	fenceCh    chan struct{} // closed when the current session is fenced
	lastSent   time.Time     // send time of the newest confirmed renewal (monotonic)
	deadline   time.Time     // fence deadline: lastSent + ttl − margin (monotonic)
	pending    time.Time     // a deadline for announceLoop to announce (zero: none)
	renewals   uint64
	reattached bool
	live       map[string]*lease         // holder key → granted lease of this session
	inflight   map[string]int            // holder key → grant transactions in flight
	sweep      map[string]int64          // holder key → token (0: unknown) that may be left behind
	voids      map[string]attempt        // void key → grant attempt whose answer was lost, not voided yet
	recovered  map[string]recoveredGrant // holder key → grant found on re-attach, not yet adopted
}

// lease is one granted resource. Convert moves it to another holder key
// (res.Mode, key, rev and mod change, under d.mu), and an upgrade gives it a
// new token (under d.mu).
type lease struct {
	d        *Driver
	res      lockmgr.Resource
	token    uint64
	key      string
	rev      int64          // CreateRevision of key: equal to token unless a downgrade moved it
	mod      int64          // ModRevision of key, which Convert's transaction compares (under d.mu)
	holder   lockmgr.Holder // as recorded in the key's value
	epoch    uint64
	released bool // under d.mu
}

// Resource returns the leased resource, in its current mode.
func (l *lease) Resource() lockmgr.Resource {
	l.d.mu.Lock()
	defer l.d.mu.Unlock()
	return l.res
}

// Token returns the fencing token of the grant: a new one after an
// upgrade by Convert.
func (l *lease) Token() uint64 {
	l.d.mu.Lock()
	defer l.d.mu.Unlock()
	return l.token
}

type recoveredGrant struct {
	res      lockmgr.Resource
	token    uint64
	replaced uint64 // an upgrade's: the token of the grant it replaced
	rev      int64
	mod      int64
	holder   lockmgr.Holder
}

// New connects to etcd and starts the host's session: it re-attaches to the
// lease named in Config.StateDir if that lease is still alive (the daemon
// restarted within the TTL; see Adopt), and grants a new lease otherwise.
// ctx bounds the connection and the session's start.
func New(ctx context.Context, cfg Config) (*Driver, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	tc, err := cfg.tlsConfig()
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		TLS:                  tc,
		Logger:               zap.NewNop(),
		DialOptions:          []grpc.DialOption{grpc.WithConnectParams(reconnectParams(cfg))},
	})
	if err != nil {
		return nil, opError("etcd driver: connect", err)
	}
	d := &Driver{
		cfg:          cfg,
		cli:          cli,
		ks:           keyspace{cfg.Prefix},
		hostKey:      keyspace{cfg.Prefix}.host(cfg.Host),
		log:          cfg.Logger.With("driver", "etcd", "host", cfg.Host),
		renewWake:    make(chan struct{}, 1),
		dogWake:      make(chan struct{}, 1),
		sweepWake:    make(chan struct{}, 1),
		announceWake: make(chan struct{}, 1),
		fenceCh:      make(chan struct{}),
		live:         make(map[string]*lease),
		inflight:     make(map[string]int),
		sweep:        make(map[string]int64),
		voids:        make(map[string]attempt),
		recovered:    make(map[string]recoveredGrant),
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	ok, err := d.reattach(ctx)
	if err == nil && !ok {
		err = d.newSession(ctx)
	}
	if err != nil {
		d.cancel()
		cli.Close()
		return nil, err
	}
	d.wg.Go(d.renewLoop)
	d.wg.Go(d.watchdog)
	d.wg.Go(d.sweepLoop)
	d.wg.Go(d.announceLoop)
	return d, nil
}

// reconnectBackoff bounds the wait between attempts to reconnect to an
// etcd endpoint. gRPC's default (1 s growing by 1.6x to 120 s) would wait
// 4 s and more once etcd has been gone a few seconds, so a host would
// fence itself although etcd came back before its fence deadline.
const reconnectBackoff = 500 * time.Millisecond

// reconnectParams makes a lost connection to etcd come back within about
// reconnectBackoff of etcd answering again, as the renewals need, and
// bounds each connection attempt by DialTimeout.
func reconnectParams(cfg Config) grpc.ConnectParams {
	return grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: reconnectBackoff},
		MinConnectTimeout: cfg.DialTimeout,
	}
}

// Name returns "etcd".
func (d *Driver) Name() string { return "etcd" }

// Close stops renewing the session and disconnects, without revoking the
// lease: the host's locks stay in etcd until the TTL runs out, so that a
// daemon restarting within the TTL re-attaches to them. Use Shutdown to give
// them up at once.
func (d *Driver) Close() error {
	if !d.stop() {
		return nil
	}
	return d.cli.Close()
}

// stop marks the driver closed and stops its loops, waiting for them; it
// returns false if the driver was closed already. Once it returns, no
// renewal is in flight and nothing fences the session any more.
func (d *Driver) stop() bool {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return false
	}
	d.closed = true
	d.mu.Unlock()
	d.cancel()
	d.wg.Wait()
	return true
}

// Shutdown revokes the session's lease, which releases every lock of this
// host at once, forgets the session (its state file), and closes the
// driver. It first stops renewing and watching the session, so that a
// renewal that meets the revoked lease cannot fence (kill) the holders. A
// fenced session is not revoked (its lease is lost already), nor one that
// another run took over (a CodeBusy error says so). Shutdown after Close or
// Shutdown does nothing.
func (d *Driver) Shutdown(ctx context.Context) error {
	if !d.stop() {
		return nil
	}
	d.mu.Lock()
	id, fenced, hostRev := d.leaseID, d.fenced, d.hostRev
	d.mu.Unlock()
	var err error
	if !fenced {
		octx, cancel := d.opCtx(ctx)
		var other *mvccpb.KeyValue
		other, err = d.revokeOwn(octx, id, hostRev)
		cancel()
		switch {
		case err != nil:
		case other != nil && clientv3.LeaseID(other.Lease) == id:
			err = lockmgr.Errorf(lockmgr.CodeBusy, "etcd driver: the session was taken over by another run (%s): left to it", describeHostKey(other))
		default:
			d.removeState()
		}
	}
	if cerr := d.cli.Close(); err == nil && cerr != nil {
		err = opError("etcd driver: close", cerr)
	}
	return err
}

// Status describes the driver's session, for the daemon's monitor and
// metrics.
type Status struct {
	Host          string
	LeaseID       int64
	TTL           time.Duration
	Fenced        bool
	Reattached    bool      // the session was taken over from an earlier run
	LastRenewal   time.Time // send time of the newest confirmed renewal (local clock)
	FenceDeadline time.Time // when OnFence is called without a further confirmed renewal
	Renewals      uint64    // confirmed renewals
	Held          int       // leases granted and not released in this session
	Recovered     int       // grants found on re-attach and not yet adopted
	Attempts      uint64    // grant transactions sent
}

// Status returns the session's state.
func (d *Driver) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return Status{
		Host: d.cfg.Host, LeaseID: int64(d.leaseID), TTL: d.ttl, Fenced: d.fenced, Reattached: d.reattached,
		LastRenewal: d.lastSent, FenceDeadline: d.deadline, Renewals: d.renewals,
		Held: len(d.live), Recovered: len(d.recovered), Attempts: d.attempts.Load(),
	}
}

// Fenced reports whether the host's session is lost (OnFence was called and
// no new session is established yet).
func (d *Driver) Fenced() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.fenced
}

// Holds reports whether l is a lease of this driver that is still held: not
// released, and its session not lost to fencing.
func (d *Driver) Holds(l lockmgr.Lease) bool {
	x, ok := l.(*lease)
	if !ok || x.d != d {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return !x.released && !d.fenced && !d.closed && x.epoch == d.epoch
}

// opCtx bounds one etcd call by OpTimeout as well as ctx.
func (d *Driver) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d.cfg.OpTimeout)
}

// usableLocked returns why no grant can be made now, or nil.
func (d *Driver) usableLocked() error {
	switch {
	case d.closed:
		return closedError()
	case d.fenced:
		return fencedError()
	}
	return nil
}

// prep is one validated request with its keys.
type prep struct {
	req  lockmgr.Request
	key  string // Resource.Key()
	base string
	tok  string
	excl bool
}

// maxPerTxn is the number of resources one grant may hold: each costs two
// comparisons at most, and the attempt's void key and the host key one
// more each.
func (d *Driver) maxPerTxn() int { return (d.cfg.MaxTxnOps - 2) / 2 }

func (d *Driver) prepare(reqs []lockmgr.Request) ([]prep, error) {
	if n := d.maxPerTxn(); len(reqs) > n {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument,
			"etcd driver: a grant holds at most %d resources (one etcd transaction of at most %d operations); this one has %d", n, d.cfg.MaxTxnOps, len(reqs))
	}
	ps := make([]prep, len(reqs))
	seen := make(map[string]bool, len(reqs))
	for i, r := range reqs {
		if err := r.Resource.Validate(); err != nil {
			return nil, err
		}
		switch r.Resource.Mode {
		case lockmgr.Exclusive, lockmgr.Shared:
		default:
			return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.Resource.String(), Msg: "etcd driver: only exclusive and shared resources are locked"}
		}
		k := r.Resource.Key()
		if seen[k] {
			return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: r.Resource.String(), Msg: "requested twice in one grant"}
		}
		seen[k] = true
		ps[i] = prep{req: r, key: k, base: d.ks.base(k), tok: d.ks.token(k), excl: r.Resource.Mode == lockmgr.Exclusive}
	}
	return ps, nil
}

// Acquire grants every request or none, in one etcd transaction (see the
// package comment). A busy resource is a *lockmgr.BusyError naming its
// holder; a moved token a *lockmgr.StaleStateError; a lost etcd a
// CodeTimeout error once ctx (or OpTimeout) runs out. A failed Acquire
// leaves nothing of its own in etcd: when etcd's answer was lost, the
// attempt is voided first (see the package comment), which may take up to
// OpTimeout more.
func (d *Driver) Acquire(ctx context.Context, reqs []lockmgr.Request) ([]lockmgr.Lease, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	ps, err := d.prepare(reqs)
	if err != nil {
		return nil, err
	}
	ls, _, err := d.tryAcquire(ctx, ps)
	return ls, err
}

// conflict is what a waiter watches: the holder keys of one resource.
type conflict struct {
	base string
	excl bool // the request is exclusive: any holder conflicts
}

// maxOwnVoids bounds the grant transactions one tryAcquire sends after
// finding that the token it expects was moved only by grants of its own
// that were withdrawn.
const maxOwnVoids = 4

func (d *Driver) tryAcquire(ctx context.Context, ps []prep) ([]lockmgr.Lease, *conflict, error) {
	// want[i] is the ModRevision the grant compares for ps[i]'s token key:
	// the caller's Expect, or the revision at which the driver withdrew a
	// grant of its own conditional on that Expect (see ownWithdrawn).
	want := make([]int64, len(ps))
	for i, p := range ps {
		want[i] = int64(p.req.Expect)
	}
	for round := 0; ; round++ {
		ls, resp, err := d.grantOnce(ctx, ps, want)
		if err != nil || resp == nil {
			return ls, nil, err
		}
		if len(resp.Responses) != 2*len(ps) {
			return nil, nil, lockmgr.Errorf(lockmgr.CodeInternal, "etcd driver: unexpected transaction reply (%d responses for %d resources)", len(resp.Responses), len(ps))
		}
		// Stale state first: waiting cannot cure it.
		again := false
		for i, p := range ps {
			if p.req.Expect == 0 {
				continue
			}
			var kv *mvccpb.KeyValue
			if kvs := resp.Responses[2*i+1].GetResponseRange().GetKvs(); len(kvs) > 0 {
				kv = kvs[0]
			}
			if kv != nil && kv.ModRevision == want[i] {
				continue
			}
			if kv != nil && round < maxOwnVoids {
				ok, err := d.ownWithdrawn(ctx, p, kv)
				if err != nil {
					return nil, nil, err
				}
				if ok {
					want[i], again = kv.ModRevision, true
					continue
				}
			}
			var cur uint64
			if kv != nil {
				cur = uint64(kv.ModRevision)
			}
			return nil, nil, &lockmgr.StaleStateError{Resource: p.req.Resource, Want: p.req.Expect, Current: cur}
		}
		if again {
			continue
		}
		for i, p := range ps {
			kvs := resp.Responses[2*i].GetResponseRange().GetKvs()
			if len(kvs) == 0 {
				continue
			}
			kv := kvs[0]
			if !isExcl(string(kv.Key)) && !p.excl {
				continue
			}
			return nil, &conflict{base: p.base, excl: p.excl}, &lockmgr.BusyError{Resource: p.req.Resource, Holder: holderOf(kv.Key, kv.Value)}
		}
		return nil, nil, lockmgr.Errorf(lockmgr.CodeInternal, "etcd driver: grant refused at revision %d but no conflict found", resp.Header.Revision)
	}
}

// ownWithdrawn reports whether the token key kv of p's resource was last
// moved by a grant of this host to p's object, conditional on p's Expect,
// that the driver withdrew because its answer was lost (voidOnce marked
// the token key so). Nobody was granted the resource then, so the state
// is as current as before: the caller compares kv's ModRevision instead.
// A grant of that kind not withdrawn yet (in d.voids) is withdrawn first.
// Another host's or object's withdrawn grant does not count: a state
// string is for the handover it was made for.
func (d *Driver) ownWithdrawn(ctx context.Context, p prep, kv *mvccpb.KeyValue) (bool, error) {
	rec, ok := parseTokRecord(kv.Value)
	if !ok || rec.Host != d.cfg.Host || rec.UUID != p.req.Holder.UUID || rec.Expect != p.req.Expect || rec.Attempt == "" {
		return false, nil
	}
	if rec.Void {
		return true, nil
	}
	vk := d.ks.void(d.cfg.Host, rec.Attempt)
	d.mu.Lock()
	at, pending := d.voids[vk]
	d.mu.Unlock()
	if !pending {
		return false, nil // granted, and not lost: the state is used up
	}
	octx, cancel := d.opCtx(ctx)
	err := d.voidOnce(octx, at)
	cancel()
	switch {
	case err == nil:
		d.mu.Lock()
		delete(d.voids, vk)
		d.mu.Unlock()
		return true, nil
	case isLeaseNotFound(err):
		go d.fence(at.epoch, "etcd says this host's lease is gone (expired or revoked)")
		return false, fencedError()
	}
	return false, opError("etcd driver: acquire: withdraw an earlier grant whose answer was lost", err)
}

// grantOnce sends one grant transaction, comparing want[i] with the
// ModRevision of ps[i]'s token key where ps[i] has an Expect. It returns
// the leases if it was granted, the refused transaction's reply if not,
// or an error.
func (d *Driver) grantOnce(ctx context.Context, ps []prep, want []int64) ([]lockmgr.Lease, *clientv3.TxnResponse, error) {
	d.attempts.Add(1)
	d.mu.Lock()
	if err := d.usableLocked(); err != nil {
		d.mu.Unlock()
		return nil, nil, err
	}
	id, epoch, hostRev := d.leaseID, d.epoch, d.hostRev
	keys := make([]string, len(ps))
	for i, p := range ps {
		if p.excl {
			keys[i] = d.ks.excl(p.key)
		} else {
			keys[i] = d.ks.shared(p.key, d.cfg.Host)
		}
		d.inflight[keys[i]]++
	}
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		for _, k := range keys {
			if d.inflight[k]--; d.inflight[k] <= 0 {
				delete(d.inflight, k)
			}
		}
		d.mu.Unlock()
	}()

	since := time.Now().Round(0)
	nc := nonce()
	at := attempt{lease: id, epoch: epoch, void: d.ks.void(d.cfg.Host, nc), keys: keys, vals: make([]string, len(ps))}
	holders := make([]lockmgr.Holder, len(ps))
	hk := d.hostKey
	cmps := make([]clientv3.Cmp, 0, 2*len(ps)+2)
	cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(at.void), "=", 0), clientv3.Compare(clientv3.ModRevision(hk), "=", hostRev))
	thens := make([]clientv3.Op, 0, 2*len(ps))
	elses := make([]clientv3.Op, 0, 2*len(ps)+1)
	for i, p := range ps {
		if p.excl {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(p.base), "=", 0).WithPrefix())
		} else {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(d.ks.excl(p.key)), "=", 0))
		}
		if p.req.Expect != 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(p.tok), "=", want[i]))
		}
		h := p.req.Holder
		h.Host, h.Mode = d.cfg.Host, p.req.Resource.Mode
		if h.Since.IsZero() {
			h.Since = since
		}
		holders[i] = h
		val, err := json.Marshal(record{Resource: p.req.Resource, Holder: h, Attempt: nc})
		if err != nil {
			return nil, nil, &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: p.req.Resource.String(), Msg: "encode holder", Err: err}
		}
		at.vals[i] = string(val)
		tr := tokRecord{Host: d.cfg.Host, UUID: p.req.Holder.UUID, Attempt: nc, Expect: p.req.Expect}
		if p.req.Expect != 0 {
			// Only a conditional grant's token key is marked when the
			// grant is withdrawn: only a retry with the same state needs it.
			at.toks = append(at.toks, p.tok)
			at.tokVals = append(at.tokVals, tr.String())
			tr.Void = true
			at.tokVoids = append(at.tokVoids, tr.String())
			tr.Void = false
		}
		thens = append(thens, clientv3.OpPut(keys[i], at.vals[i], clientv3.WithLease(id)), clientv3.OpPut(p.tok, tr.String()))
		elses = append(elses, clientv3.OpGet(p.base, clientv3.WithPrefix(), clientv3.WithLimit(1)), clientv3.OpGet(p.tok))
	}
	elses = append(elses, clientv3.OpGet(hk))
	if err := ctx.Err(); err != nil {
		return nil, nil, opError("etcd driver: acquire", err) // nothing sent, nothing to void
	}
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	resp, err := d.cli.Txn(octx).If(cmps...).Then(thens...).Else(elses...).Commit()
	if err != nil {
		if isLeaseNotFound(err) {
			go d.fence(epoch, "etcd says this host's lease is gone (expired or revoked)")
			return nil, nil, fencedError()
		}
		if definite(err) {
			return nil, nil, opError("etcd driver: acquire", err)
		}
		// The transaction may be committed, now or later: void it, so that
		// a failed Acquire leaves nothing of its own in etcd. The attempt
		// is listed in d.voids while it is not void, so that a retry of
		// this grant (ownWithdrawn) or the sweeper voids it if this cannot.
		d.mu.Lock()
		if d.epoch == epoch && !d.fenced {
			d.voids[at.void] = at
		}
		d.mu.Unlock()
		switch verr := d.voidAttempt(at); {
		case verr == nil:
			d.mu.Lock()
			delete(d.voids, at.void)
			d.mu.Unlock()
			return nil, nil, opError("etcd driver: acquire (nothing was granted)", err)
		case isLeaseNotFound(verr):
			go d.fence(epoch, "etcd says this host's lease is gone (expired or revoked)")
			return nil, nil, fencedError()
		default:
			d.log.Warn("a grant whose answer was lost could not be withdrawn yet; will retry", "err", verr)
			return nil, nil, opError("etcd driver: acquire (anything it granted is withdrawn in the background)", err)
		}
	}
	if !resp.Succeeded {
		if err := d.takenOver(epoch, hostRev, resp.Responses[len(resp.Responses)-1]); err != nil {
			return nil, nil, err
		}
		resp.Responses = resp.Responses[:len(resp.Responses)-1]
		return nil, resp, nil
	}
	tok := uint64(resp.Header.Revision)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.epoch != epoch || d.fenced || d.closed || !time.Now().Before(d.deadline) {
		// The reply came after the fence deadline: its holders could
		// not be fenced in time, so the grant is withdrawn.
		if d.epoch == epoch && !d.fenced {
			for _, k := range keys {
				d.sweep[k] = int64(tok)
			}
		}
		return nil, nil, fencedError()
	}
	out := make([]lockmgr.Lease, len(ps))
	for i, p := range ps {
		l := &lease{d: d, res: p.req.Resource, token: tok, key: keys[i], rev: int64(tok), mod: int64(tok), holder: holders[i], epoch: epoch}
		d.live[keys[i]] = l
		out[i] = l
	}
	return out, nil, nil
}

// takenOver checks, for a transaction of session epoch refused for a
// reason its own reply does not show, the host key as that reply read it
// (hostResp): if it is no longer as the session wrote it (hostRev), another
// run of the daemon re-attached to the session and owns its locks now (see
// "Restarts" in the package comment), so this run fences itself and
// returns the fenced error. It returns nil otherwise.
func (d *Driver) takenOver(epoch uint64, hostRev int64, hostResp *etcdserverpb.ResponseOp) error {
	kvs := hostResp.GetResponseRange().GetKvs()
	if len(kvs) == 1 && kvs[0].ModRevision == hostRev {
		return nil
	}
	reason := "etcd says this host's session key is gone (the lease expired or was revoked)"
	if len(kvs) == 1 {
		reason = fmt.Sprintf("this host's etcd session was taken over: its host key was written again (%s), no longer by this run (pid %d)",
			describeHostKey(kvs[0]), os.Getpid())
	}
	go d.fence(epoch, reason)
	return fencedError()
}

// attempt is a grant transaction sent under session epoch (lease) whose
// answer was lost: it put vals[i] in keys[i] and tokVals[j] in token key
// toks[j] if it was applied, and it is applied only while its void key
// does not exist. tokVoids[j] marks toks[j] as moved by a withdrawn grant.
type attempt struct {
	lease    clientv3.LeaseID
	epoch    uint64
	void     string
	keys     []string
	vals     []string
	toks     []string // token keys of the requests with an Expect
	tokVals  []string
	tokVoids []string
}

// voidAttempt makes sure the grant attempt at has no effect, now or later,
// trying for at most OpTimeout (or until Close) whatever the caller's
// context.
func (d *Driver) voidAttempt(at attempt) error {
	ctx, cancel := d.opCtx(d.ctx)
	defer cancel()
	for {
		err := d.voidOnce(ctx, at)
		if err == nil || definite(err) || isLeaseNotFound(err) {
			return err
		}
		if perr := d.pause(ctx, 100*time.Millisecond); perr != nil {
			return err
		}
	}
}

// voidOnce sends the transaction that voids at: it creates the attempt's
// void key, so that its transaction, if it is still on its way, fails its
// comparison, and deletes each key that holds the attempt's own value (its
// record carries the attempt's random value), so that no later grant is
// touched. A token key the attempt moved, where its grant was conditional
// on a token, it marks as moved by a withdrawn grant (see ownWithdrawn),
// in the same transaction. It is idempotent. The void key is on the
// session's lease: it must outlive any request of the attempt still on its
// way, and it goes with the session.
func (d *Driver) voidOnce(ctx context.Context, at attempt) error {
	ops := make([]clientv3.Op, 0, 1+len(at.keys)+len(at.toks))
	ops = append(ops, clientv3.OpPut(at.void, "", clientv3.WithLease(at.lease)))
	for i, k := range at.keys {
		ops = append(ops, clientv3.OpTxn(
			[]clientv3.Cmp{clientv3.Compare(clientv3.Value(k), "=", at.vals[i])},
			[]clientv3.Op{clientv3.OpDelete(k)}, nil))
	}
	for i, k := range at.toks {
		ops = append(ops, clientv3.OpTxn(
			[]clientv3.Cmp{clientv3.Compare(clientv3.Value(k), "=", at.tokVals[i])},
			[]clientv3.Op{clientv3.OpPut(k, at.tokVoids[i])}, nil))
	}
	_, err := d.cli.Txn(ctx).Then(ops...).Commit()
	return err
}

// holderOf names the holder recorded in a holder key.
func holderOf(key, value []byte) lockmgr.Holder {
	if rec, ok := parseRecord(value); ok {
		return rec.Holder
	}
	h := lockmgr.Holder{Foreign: true, Mode: lockmgr.Shared}
	if isExcl(string(key)) {
		h.Mode = lockmgr.Exclusive
	}
	return h
}

// Release releases each lease, continuing past failures, and returns the
// first error. Leases lost with a fenced session are released without a
// call (nil). A release that etcd did not confirm in time is retried in the
// background until it is done or the session ends.
func (d *Driver) Release(ctx context.Context, ls []lockmgr.Lease) error {
	var first error
	note := func(err error) {
		if first == nil {
			first = err
		}
	}
	var todo []*lease
	d.mu.Lock()
	closed, epoch, hostRev := d.closed, d.epoch, d.hostRev
	for _, x := range ls {
		l, ok := x.(*lease)
		if !ok || l.d != d {
			note(lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: %v is not a lease of this driver", x))
			continue
		}
		if l.released {
			note(&lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: l.res.String(), Msg: "released twice"})
			continue
		}
		if closed {
			note(&lockmgr.Error{Code: lockmgr.CodeInternal, Resource: l.res.String(), Msg: "etcd driver", Err: errClosed})
			continue
		}
		l.released = true
		if l.epoch != d.epoch || d.fenced {
			continue // lost with its session
		}
		if d.live[l.key] == l {
			delete(d.live, l.key)
		}
		// A copy: key and rev are read under d.mu (Convert changes them).
		todo = append(todo, &lease{res: l.res, token: l.token, key: l.key, rev: l.rev, epoch: l.epoch})
	}
	d.mu.Unlock()
	for len(todo) > 0 {
		n := min(len(todo), d.cfg.MaxTxnOps)
		chunk := todo[:n]
		todo = todo[n:]
		if err := d.deleteGrants(ctx, epoch, hostRev, chunk); err != nil {
			note(err)
		}
	}
	return first
}

// deleteGrants deletes holder keys of session epoch whose CreateRevision
// is still their token, in one transaction, if the host key is still as
// the session wrote it (hostRev). Otherwise the session was taken over
// (see takenOver): its leases are lost, and nothing is deleted.
func (d *Driver) deleteGrants(ctx context.Context, epoch uint64, hostRev int64, ls []*lease) error {
	hk := d.hostKey
	mine := clientv3.Compare(clientv3.ModRevision(hk), "=", hostRev)
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	var resp *clientv3.TxnResponse
	var err error
	if len(ls) == 1 {
		// The common case (one disk unplugged, a hand-off) without nesting.
		l := ls[0]
		resp, err = d.cli.Txn(octx).If(clientv3.Compare(clientv3.CreateRevision(l.key), "=", l.rev), mine).
			Then(clientv3.OpDelete(l.key)).Else(clientv3.OpGet(hk)).Commit()
	} else {
		ops := make([]clientv3.Op, len(ls))
		for i, l := range ls {
			ops[i] = clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(l.key), "=", l.rev)},
				[]clientv3.Op{clientv3.OpDelete(l.key)}, nil)
		}
		resp, err = d.cli.Txn(octx).If(mine).Then(ops...).Else(clientv3.OpGet(hk)).Commit()
	}
	if err != nil {
		d.mu.Lock()
		for _, l := range ls {
			if l.epoch == d.epoch && !d.fenced {
				d.sweep[l.key] = l.rev
			}
		}
		d.mu.Unlock()
		return opError("etcd driver: release (it is retried in the background)", err)
	}
	if !resp.Succeeded {
		if d.takenOver(epoch, hostRev, resp.Responses[0]) != nil {
			return nil // lost with the session, as after any fence
		}
		l := ls[0] // only a single release's own comparison can fail
		return &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: l.res.String(), Msg: fmt.Sprintf("token %d was no longer in etcd", l.token)}
	}
	var first error
	for i, r := range resp.Responses {
		if t := r.GetResponseTxn(); t != nil && !t.Succeeded && first == nil {
			first = &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: ls[i].res.String(), Msg: fmt.Sprintf("token %d was no longer in etcd", ls[i].token)}
		}
	}
	return first
}

// Grant is a lock found under a re-attached session.
type Grant struct {
	Resource lockmgr.Resource
	Token    uint64
	Holder   lockmgr.Holder
}

// Recovered lists the grants found under the session this driver
// re-attached to that are not adopted yet.
func (d *Driver) Recovered() []Grant {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]Grant, 0, len(d.recovered))
	for _, g := range d.recovered {
		out = append(out, Grant{Resource: g.res, Token: g.token, Holder: g.holder})
	}
	return out
}

// Adopt takes back a lease granted to an earlier run of the daemon on this
// host, named by its resource and token (from the daemon's saved state),
// after New re-attached to that run's session. It makes no etcd call. f is
// accepted for lockmgr.Adopter and closed if not nil. A grant that is not
// under the session is a CodeNotHeld error: its lease expired (its holders
// must have been fenced) or the daemon did not re-attach.
//
// The daemon records a conversion once etcd made it; an earlier run that
// died in between left a record of the grant as it was. Such a grant is
// adopted as etcd has it, and the lease's Resource and Token say so: a
// downgrade (same token) in its new mode, an upgrade (found by the token
// of the shared grant it replaced) exclusive, with its own token. Refusing
// it would make the daemon kill a holder whose lock is held.
func (d *Driver) Adopt(r lockmgr.Resource, token uint64, f *os.File) (lockmgr.Lease, error) {
	if f != nil {
		_ = f.Close()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.usableLocked(); err != nil {
		return nil, err
	}
	for key, g := range d.recovered {
		// A token names one grant of a resource: the mode need not match.
		if g.res.Key() == r.Key() && (g.token == token || g.replaced == token) {
			delete(d.recovered, key)
			l := &lease{d: d, res: g.res, token: g.token, key: key, rev: g.rev, mod: g.mod, holder: g.holder, epoch: d.epoch}
			d.live[key] = l
			return l, nil
		}
	}
	return nil, &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: r.String(),
		Msg: fmt.Sprintf("token %d is not held by this host's etcd session (expired, or not re-attached)", token)}
}

// DropUnadopted releases every recovered grant that was not adopted: the
// daemon calls it once it has restored every object it knows of. It then
// lists the session's holder keys again, and deletes in the background any
// readable one that no lease of this run accounts for: one that the
// re-attach's listing missed (an etcd leader elected just then may answer
// from a view that lacks the last writes before it) would otherwise stay,
// held for nobody, until the session ends. (An unreadable record, a newer
// daemon's perhaps, is left alone, as at the re-attach.)
func (d *Driver) DropUnadopted(ctx context.Context) error {
	d.mu.Lock()
	var ls []lockmgr.Lease
	for key, g := range d.recovered {
		l := &lease{d: d, res: g.res, token: g.token, key: key, rev: g.rev, mod: g.mod, holder: g.holder, epoch: d.epoch}
		ls = append(ls, l)
	}
	clear(d.recovered)
	id, epoch, reattached := d.leaseID, d.epoch, d.reattached
	d.mu.Unlock()
	err := d.Release(ctx, ls)
	if !reattached {
		return err
	}
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	keys, lerr := d.keysOf(octx, id)
	var kvs []*mvccpb.KeyValue
	if lerr == nil {
		kvs, lerr = d.readOwn(octx, id, d.unaccounted(keys))
	}
	if lerr != nil {
		d.log.Warn("cannot list the re-attached session's locks again", "err", lerr)
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.epoch != epoch || d.fenced {
		return err
	}
	n := 0
	for _, kv := range kvs {
		k := string(kv.Key)
		if _, ok := parseRecord(kv.Value); !ok || d.live[k] != nil || d.inflight[k] > 0 {
			continue
		}
		if _, ok := d.sweep[k]; !ok {
			// With its CreateRevision, so that only this grant is deleted,
			// not a later one of this run under the same key.
			d.sweep[k], n = kv.CreateRevision, n+1
		}
	}
	if n > 0 {
		d.log.Warn("locks under the re-attached session that its first listing missed; deleting them", "count", n)
		d.nudge(d.sweepWake)
	}
	return err
}

// unaccounted returns the keys that no live lease and no grant in flight
// accounts for.
func (d *Driver) unaccounted(keys []string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for _, k := range keys {
		if d.live[k] == nil && d.inflight[k] == 0 {
			out = append(out, k)
		}
	}
	return out
}
