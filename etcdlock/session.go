package etcdlock

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/lockmgr"
)

// stateFileName is the session file in Config.StateDir.
const stateFileName = "etcd-session.json"

type stateFile struct {
	Lease  int64  `json:"lease"`
	Host   string `json:"host"`
	Prefix string `json:"prefix"`
}

// sessionFileError is what decodeSession finds wrong with a session file.
type sessionFileError struct{ Err error }

func (e *sessionFileError) Error() string { return "not an etcd session file: " + e.Err.Error() }
func (e *sessionFileError) Unwrap() error { return e.Err }

// decodeSession reads a session file's content as writeState writes it. A
// session it returns names a lease that etcd can have granted (etcd's IDs
// are positive), a host and a prefix ending in "/"; anything else is a
// *sessionFileError.
func decodeSession(b []byte) (stateFile, error) {
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return stateFile{}, &sessionFileError{err}
	}
	switch {
	case st.Lease <= 0:
		return stateFile{}, &sessionFileError{fmt.Errorf("lease %d is not an etcd lease ID (want > 0)", st.Lease)}
	case st.Host == "":
		return stateFile{}, &sessionFileError{errors.New("no host name")}
	case !strings.HasSuffix(st.Prefix, "/"):
		return stateFile{}, &sessionFileError{fmt.Errorf("prefix %q does not end with /", st.Prefix)}
	}
	return st, nil
}

func (d *Driver) statePath() string { return filepath.Join(d.cfg.StateDir, stateFileName) }

func (d *Driver) writeState(id clientv3.LeaseID) error {
	if d.cfg.StateDir == "" {
		return nil
	}
	b, err := json.Marshal(stateFile{Lease: int64(id), Host: d.cfg.Host, Prefix: d.cfg.Prefix})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(d.cfg.StateDir, stateFileName+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), d.statePath()); err != nil {
		return err
	}
	if dir, err := os.Open(d.cfg.StateDir); err == nil {
		_ = dir.Sync()
		dir.Close()
	}
	return nil
}

func (d *Driver) removeState() {
	if d.cfg.StateDir != "" {
		_ = os.Remove(d.statePath())
	}
}

func (d *Driver) readState() (stateFile, bool) {
	if d.cfg.StateDir == "" {
		return stateFile{}, false
	}
	b, err := os.ReadFile(d.statePath())
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			d.log.Warn("cannot read the etcd session file; starting a new session", "err", err)
		}
		return stateFile{}, false
	}
	st, err := decodeSession(b)
	if err != nil {
		d.log.Warn("bad etcd session file; starting a new session", "path", d.statePath(), "err", err)
		return stateFile{}, false
	}
	if st.Host != d.cfg.Host || st.Prefix != d.cfg.Prefix {
		d.log.Warn("etcd session file is for another host name or prefix; starting a new session",
			"file_host", st.Host, "file_prefix", st.Prefix)
		return stateFile{}, false
	}
	return st, true
}

// ttlOf returns the effective TTL for a lease the server granted (or
// renewed) for serverTTL seconds: the smaller of it and the configured TTL,
// so the fence deadline is never later than the server's expiry.
func (d *Driver) ttlOf(serverTTL int64) time.Duration {
	return min(d.cfg.TTL, time.Duration(serverTTL)*time.Second)
}

// claimHost makes the host key point at lease id and returns the key's
// new ModRevision, which every grant, conversion and release of the
// session then compares (see "Restarts" in the package comment). It writes
// the key even when it already points at id (a re-attach), so that a
// transaction the previous run sent and etcd applies only now fails. It
// fails if another live session holds the host name.
func (d *Driver) claimHost(ctx context.Context, id clientv3.LeaseID) (int64, error) {
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	seen := int64(0)
	for range 3 {
		resp, err := d.cli.Do(octx, d.hostClaim(id, seen))
		if err != nil {
			return 0, opError("etcd driver: register host", err)
		}
		t := resp.Txn()
		if t.Succeeded {
			return t.Header.Revision, nil
		}
		kvs := t.Responses[0].GetResponseRange().GetKvs()
		switch {
		case len(kvs) == 0:
			seen = 0
		case clientv3.LeaseID(kvs[0].Lease) == id:
			seen = kvs[0].ModRevision
		default:
			return 0, d.hostTaken(kvs[0])
		}
	}
	return 0, lockmgr.Errorf(lockmgr.CodeTimeout, "etcd driver: register host: the host name's key kept changing while it was claimed")
}

// hostClaim is the transaction that points the host key at lease id: it
// creates the key if seen is 0, and otherwise rewrites it if it is still
// on id as it was at revision seen. So a claim that a killed run sent, and
// that etcd applies after another run's claim, changes nothing. Its Else
// branch reads the key.
func (d *Driver) hostClaim(id clientv3.LeaseID, seen int64) clientv3.Op {
	hk := d.hostKey
	val, _ := json.Marshal(hostRecord{Host: d.cfg.Host, Lease: strconv.FormatInt(int64(id), 16), PID: os.Getpid()})
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(hk), "=", 0)}
	if seen != 0 {
		cmps = []clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(hk), "=", id), clientv3.Compare(clientv3.ModRevision(hk), "=", seen)}
	}
	return clientv3.OpTxn(cmps, []clientv3.Op{clientv3.OpPut(hk, string(val), clientv3.WithLease(id))}, []clientv3.Op{clientv3.OpGet(hk)})
}

// newSession grants a new lease and makes it the current session.
func (d *Driver) newSession(ctx context.Context) error {
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	t0 := time.Now()
	g, err := d.cli.Grant(octx, int64(d.cfg.TTL/time.Second))
	if err != nil {
		return opError("etcd driver: grant lease", err)
	}
	revoke := func() {
		rctx, cancel := d.opCtx(context.Background())
		defer cancel()
		_, _ = d.cli.Revoke(rctx, g.ID)
	}
	hostRev, err := d.claimHost(ctx, g.ID)
	if err != nil {
		revoke()
		return err
	}
	if err := d.writeState(g.ID); err != nil {
		revoke()
		return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "etcd driver: write session file", Err: err}
	}
	ttl := d.ttlOf(g.TTL)
	// The deadline is announced before the session can grant anything.
	d.announce(t0.Add(ttl - d.cfg.FenceMargin))
	d.mu.Lock()
	d.leaseID, d.ttl, d.hostRev = g.ID, ttl, hostRev
	d.epoch++
	d.fenced = false
	d.fenceCh = make(chan struct{})
	d.lastSent, d.deadline = t0, t0.Add(d.ttl-d.cfg.FenceMargin)
	d.reattached = false
	clear(d.sweep)
	clear(d.voids)
	d.mu.Unlock()
	d.nudge(d.dogWake)
	d.log.Info("etcd session started", "lease", fmt.Sprintf("%x", int64(g.ID)), "ttl", d.ttl)
	return nil
}

// reattach takes over the session named in the state file if its lease is
// still alive, and collects the grants under it for Adopt. It returns false
// (and no error) when there is no session to take over.
func (d *Driver) reattach(ctx context.Context) (bool, error) {
	st, ok := d.readState()
	if !ok {
		return false, nil
	}
	id := clientv3.LeaseID(st.Lease)
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	ttl, err := d.cli.TimeToLive(octx, id)
	if err != nil {
		return false, opError("etcd driver: look up the previous session", err)
	}
	if ttl.TTL <= 0 {
		return false, d.dropExpired(octx, id)
	}
	t0 := time.Now()
	ka, err := d.cli.KeepAliveOnce(octx, id)
	if err != nil {
		if isLeaseNotFound(err) {
			return false, nil
		}
		return false, opError("etcd driver: renew the previous session", err)
	}
	// The host key is rewritten before the session's keys are listed: a
	// transaction of the previous run that etcd applies later fails its
	// comparison of the host key, and one applied earlier is in the list
	// (etcd's leader answers once it has applied what it knows committed;
	// DropUnadopted looks again, for a leader elected just then).
	hostRev, err := d.claimHost(ctx, id)
	if err != nil {
		return false, err
	}
	keys, err := d.keysOf(octx, id)
	switch {
	case isLeaseNotFound(err):
		return false, d.dropExpired(octx, id) // expired just now
	case err != nil:
		return false, opError("etcd driver: list the previous session's locks", err)
	}
	kvs, err := d.readOwn(octx, id, keys)
	if err != nil {
		return false, opError("etcd driver: read the previous session's locks", err)
	}
	rec := make(map[string]recoveredGrant)
	for _, kv := range kvs {
		r, ok := parseRecord(kv.Value)
		if !ok {
			d.log.Warn("unreadable lock record under the previous session; left to expire with it", "key", string(kv.Key))
			continue
		}
		tok := r.Token // set when the grant was converted to another key
		if tok == 0 {
			tok = uint64(kv.CreateRevision)
		}
		rec[string(kv.Key)] = recoveredGrant{res: r.Resource, token: tok, replaced: r.Replaced, rev: kv.CreateRevision, mod: kv.ModRevision, holder: r.Holder}
	}
	effTTL := d.ttlOf(min(ttl.GrantedTTL, ka.TTL))
	d.announce(t0.Add(effTTL - d.cfg.FenceMargin))
	d.mu.Lock()
	d.leaseID, d.ttl, d.hostRev = id, effTTL, hostRev
	d.epoch++
	d.fenced = false
	d.lastSent, d.deadline = t0, t0.Add(d.ttl-d.cfg.FenceMargin)
	d.reattached = true
	d.recovered = rec
	d.mu.Unlock()
	d.log.Info("re-attached to the previous etcd session", "lease", fmt.Sprintf("%x", st.Lease), "locks", len(rec))
	return true, nil
}

// keysOf lists the holder keys attached to lease id. An expired lease is
// a lease-not-found error.
func (d *Driver) keysOf(ctx context.Context, id clientv3.LeaseID) ([]string, error) {
	ttl, err := d.cli.TimeToLive(ctx, id, clientv3.WithAttachedKeys())
	switch {
	case err != nil:
		return nil, err
	case ttl.TTL <= 0:
		return nil, rpctypes.ErrLeaseNotFound
	}
	resPrefix := d.cfg.Prefix + "res/"
	var keys []string
	for _, k := range ttl.Keys {
		if strings.HasPrefix(string(k), resPrefix) {
			keys = append(keys, string(k))
		}
	}
	return keys, nil
}

// readOwn reads keys, MaxTxnOps at a time, and returns those still on
// lease id.
func (d *Driver) readOwn(ctx context.Context, id clientv3.LeaseID, keys []string) ([]*mvccpb.KeyValue, error) {
	var out []*mvccpb.KeyValue
	for len(keys) > 0 {
		n := min(len(keys), d.cfg.MaxTxnOps)
		ops := make([]clientv3.Op, n)
		for i, k := range keys[:n] {
			ops[i] = clientv3.OpGet(k)
		}
		resp, err := d.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return nil, err
		}
		for _, r := range resp.Responses {
			for _, kv := range r.GetResponseRange().GetKvs() {
				if clientv3.LeaseID(kv.Lease) == id {
					out = append(out, kv)
				}
			}
		}
		keys = keys[n:]
	}
	return out, nil
}

// dropExpired makes sure the expired session id is gone, keys and all, so
// that a new session can claim the host name.
func (d *Driver) dropExpired(ctx context.Context, id clientv3.LeaseID) error {
	d.log.Warn("the previous etcd session expired; its locks are gone and their holders must have been fenced",
		"lease", fmt.Sprintf("%x", int64(id)))
	// etcd deletes an expired lease's keys (the host name's among them)
	// only when its lessor next looks, up to half a second later; until
	// then the new session could not claim the host name. Nobody can
	// renew an expired lease, so revoking it now changes nothing but that.
	if _, err := d.cli.Revoke(ctx, id); err != nil && !isLeaseNotFound(err) {
		return opError("etcd driver: revoke the expired previous session", err)
	}
	return nil
}

func (d *Driver) nudge(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// sleep waits for dur, a nudge on wake, or Close. It returns false on Close.
func (d *Driver) sleep(dur time.Duration, wake chan struct{}) bool {
	t := time.NewTimer(dur)
	defer t.Stop()
	select {
	case <-t.C:
	case <-wake:
	case <-d.ctx.Done():
		return false
	}
	return true
}

// renewLoop renews the session every TTL/3, each attempt bounded, retrying
// soon after a failure; after a fence it revokes the old lease and starts a
// new session. After each confirmed renewal it wakes sweepLoop, which
// retries releases that etcd did not confirm: never itself, so that no
// cleanup can delay a renewal.
func (d *Driver) renewLoop() {
	var next time.Time // when the next renewal is due
	var nextEpoch uint64
	for {
		d.mu.Lock()
		fenced, id, epoch, ttl, last := d.fenced, d.leaseID, d.epoch, d.ttl, d.lastSent
		d.mu.Unlock()
		period := ttl / 3
		if fenced {
			if err := d.recoverSession(id); err != nil {
				d.log.Warn("cannot start a new etcd session yet", "err", err)
				if !d.sleep(max(period, time.Second), d.renewWake) {
					return
				}
			}
			continue
		}
		if epoch != nextEpoch {
			next, nextEpoch = last.Add(period), epoch
		}
		if wait := time.Until(next); wait > 0 {
			if !d.sleep(wait, d.renewWake) {
				return
			}
			continue
		}
		t0 := time.Now()
		actx, cancel := context.WithTimeout(d.ctx, max(period/2, 500*time.Millisecond))
		ka, err := d.cli.KeepAliveOnce(actx, id)
		cancel()
		switch {
		case err == nil:
			d.confirm(epoch, t0, ka.TTL)
			next = t0.Add(period)
			d.nudge(d.sweepWake)
		case d.ctx.Err() != nil:
			return
		case isLeaseNotFound(err):
			d.fence(epoch, "etcd says this host's lease is gone (expired or revoked)")
		default:
			d.log.Warn("etcd lease renewal failed", "err", err, "fence_in", time.Until(d.Status().FenceDeadline).Round(time.Millisecond))
			next = time.Now().Add(min(period/6, 500*time.Millisecond))
		}
	}
}

// confirm records a renewal sent at t0 and confirmed by etcd.
func (d *Driver) confirm(epoch uint64, t0 time.Time, serverTTL int64) {
	d.mu.Lock()
	if d.epoch != epoch || d.fenced {
		d.mu.Unlock()
		return
	}
	d.renewals++
	d.lastSent = t0
	dl := t0.Add(min(d.ttl, d.ttlOf(serverTTL)) - d.cfg.FenceMargin)
	moved := dl.After(d.deadline)
	if moved {
		d.deadline = dl
		d.pending = dl // announceLoop's: a slow OnDeadline must not hold up the next renewal
	}
	d.mu.Unlock()
	d.nudge(d.dogWake)
	if moved {
		d.nudge(d.announceWake)
	}
}

// announce calls OnDeadline at once, for a session that must not grant
// anything before (New, recoverSession): the deadline supersedes any that
// announceLoop has not announced yet. annMu keeps calls from overlapping
// and in the order the deadlines were set.
func (d *Driver) announce(deadline time.Time) {
	if d.cfg.OnDeadline == nil {
		return
	}
	d.annMu.Lock()
	defer d.annMu.Unlock()
	d.mu.Lock()
	d.pending = time.Time{}
	d.mu.Unlock()
	d.cfg.OnDeadline(deadline)
}

// announceLoop announces the deadlines that renewals set, the newest one
// each time, until Close.
func (d *Driver) announceLoop() {
	for {
		select {
		case <-d.announceWake:
		case <-d.ctx.Done():
			return
		}
		d.annMu.Lock()
		d.mu.Lock()
		dl := d.pending
		d.pending = time.Time{}
		d.mu.Unlock()
		if !dl.IsZero() && d.cfg.OnDeadline != nil {
			d.cfg.OnDeadline(dl)
		}
		d.annMu.Unlock()
	}
}

// watchdog calls fence when the fence deadline passes without a renewal
// moving it.
func (d *Driver) watchdog() {
	for {
		d.mu.Lock()
		fenced, epoch, dl := d.fenced, d.epoch, d.deadline
		d.mu.Unlock()
		var fire <-chan time.Time
		var t *time.Timer
		if !fenced {
			t = time.NewTimer(time.Until(dl))
			fire = t.C
		}
		select {
		case <-d.ctx.Done():
			if t != nil {
				t.Stop()
			}
			return
		case <-d.dogWake:
			if t != nil {
				t.Stop()
			}
		case <-fire:
			d.mu.Lock()
			due := !d.fenced && d.epoch == epoch && !time.Now().Before(d.deadline)
			last, ttl := d.lastSent, d.ttl
			d.mu.Unlock()
			if due {
				d.fence(epoch, fmt.Sprintf("no renewal of the etcd lease confirmed for %s (TTL %s, fence margin %s; last confirmed renewal sent %s ago)",
					ttl-d.cfg.FenceMargin, ttl, d.cfg.FenceMargin, time.Since(last).Round(time.Millisecond)))
			}
		}
	}
}

// fence ends session epoch: from now on no grant is returned and the
// session's leases are lost; then OnFence kills their holders. It does
// nothing if that session has ended already.
func (d *Driver) fence(epoch uint64, reason string) {
	d.fenceMu.Lock()
	defer d.fenceMu.Unlock()
	d.mu.Lock()
	if d.fenced || d.epoch != epoch || d.closed {
		d.mu.Unlock()
		return
	}
	d.fenced = true
	lost := len(d.live) + len(d.recovered)
	clear(d.live)
	clear(d.recovered)
	clear(d.sweep)
	clear(d.voids)
	close(d.fenceCh)
	d.mu.Unlock()
	d.log.Error("fencing: this host's etcd session is lost; its lock holders must be killed", "reason", reason, "locks_lost", lost)
	if d.cfg.OnFence != nil {
		d.cfg.OnFence(reason)
	}
	d.nudge(d.renewWake)
	d.nudge(d.dogWake)
}

// recoverSession revokes the fenced session's lease once its holders are
// dead (OnFence returned), unless another run took the session over, and
// starts a new one.
func (d *Driver) recoverSession(old clientv3.LeaseID) error {
	// fence sets d.fenced before it calls OnFence, under fenceMu: wait for
	// OnFence to return, since revoking the lease frees its resources at once.
	d.fenceMu.Lock()
	//lint:ignore SA2001 an empty critical section: it waits for fence
	d.fenceMu.Unlock()
	d.mu.Lock()
	hostRev := d.hostRev
	d.mu.Unlock()
	ctx, cancel := d.opCtx(d.ctx)
	other, err := d.revokeOwn(ctx, old, hostRev)
	cancel()
	switch {
	case err != nil:
		return err
	case other != nil:
		// Granting a lease only to find the name taken would be churn.
		return d.hostTaken(other)
	}
	return d.newSession(d.ctx)
}

// revokeOwn revokes the session's lease id, which frees its locks at once,
// unless another run took the session over (the host key is on id, but
// not as this run wrote it at hostRev): then the lease is that run's, and
// it is left alone. It returns the host key if it is not this run's. etcd
// has no conditional revoke: a take-over between the look and the revoke
// goes unseen (only a second vmlockd on a copy of the state directory
// takes a live session over).
func (d *Driver) revokeOwn(ctx context.Context, id clientv3.LeaseID, hostRev int64) (*mvccpb.KeyValue, error) {
	resp, err := d.cli.Get(ctx, d.hostKey)
	if err != nil {
		return nil, opError("etcd driver: look at the host key", err)
	}
	var other *mvccpb.KeyValue
	if len(resp.Kvs) == 1 && (clientv3.LeaseID(resp.Kvs[0].Lease) != id || resp.Kvs[0].ModRevision != hostRev) {
		other = resp.Kvs[0]
		if clientv3.LeaseID(other.Lease) == id {
			return other, nil
		}
	}
	if _, err := d.cli.Revoke(ctx, id); err != nil && !isLeaseNotFound(err) {
		return other, opError("etcd driver: revoke the session's lease", err)
	}
	return other, nil
}

// hostTaken is the error for a host name whose key kv is another live
// session's.
func (d *Driver) hostTaken(kv *mvccpb.KeyValue) error {
	return lockmgr.Errorf(lockmgr.CodeBusy,
		"etcd driver: host name %q already has a live session (%s): another vmlockd uses this name, or a previous one died less than %s ago",
		d.cfg.Host, describeHostKey(kv), d.cfg.TTL)
}

// describeHostKey names the run that wrote a host key.
func describeHostKey(kv *mvccpb.KeyValue) string {
	var hr hostRecord
	_ = json.Unmarshal(kv.Value, &hr)
	return fmt.Sprintf("lease %s, written at revision %d by pid %d", hr.Lease, kv.ModRevision, hr.PID)
}

// sweepLoop runs runSweep each time renewLoop confirms a renewal, until
// Close.
func (d *Driver) sweepLoop() {
	for {
		select {
		case <-d.sweepWake:
			d.runSweep()
		case <-d.ctx.Done():
			return
		}
	}
}

// runSweep deletes grants that may have been left behind by a grant whose
// reply was lost or came too late, or a release that was not confirmed:
// it voids the grant attempts that Acquire could not void, and deletes
// holder keys on this session's lease that no live lease owns.
func (d *Driver) runSweep() {
	d.mu.Lock()
	if len(d.sweep) == 0 && len(d.voids) == 0 {
		d.mu.Unlock()
		return
	}
	id, epoch, hostRev := d.leaseID, d.epoch, d.hostRev
	todo := maps.Clone(d.sweep)
	voids := maps.Clone(d.voids)
	d.mu.Unlock()
	for key, at := range voids {
		ctx, cancel := d.opCtx(d.ctx)
		err := d.voidOnce(ctx, at)
		cancel()
		if err != nil && !isLeaseNotFound(err) { // a lost lease took the attempt's keys with it
			d.log.Warn("withdrawing a grant whose answer was lost failed; will retry", "err", err)
			return
		}
		d.mu.Lock()
		delete(d.voids, key)
		d.mu.Unlock()
		d.log.Info("withdrew a grant whose answer was lost", "keys", at.keys)
	}
	for key, tok := range todo {
		ctx, cancel := d.opCtx(d.ctx)
		done, err := d.sweepOne(ctx, id, epoch, hostRev, key, tok)
		cancel()
		if err != nil {
			d.log.Warn("cleanup of a possibly left-behind lock failed; will retry", "key", key, "err", err)
			return
		}
		if done {
			d.mu.Lock()
			if d.sweep[key] == tok {
				delete(d.sweep, key)
			}
			d.mu.Unlock()
		}
	}
}

func (d *Driver) sweepOne(ctx context.Context, id clientv3.LeaseID, epoch uint64, hostRev int64, key string, tok int64) (bool, error) {
	resp, err := d.cli.Get(ctx, key)
	if err != nil {
		return false, err
	}
	if len(resp.Kvs) == 0 || clientv3.LeaseID(resp.Kvs[0].Lease) != id {
		return true, nil
	}
	rev := resp.Kvs[0].CreateRevision
	if tok != 0 && rev != tok {
		return true, nil
	}
	d.mu.Lock()
	if d.epoch != epoch || d.fenced {
		d.mu.Unlock()
		return true, nil
	}
	if d.inflight[key] > 0 {
		d.mu.Unlock()
		return false, nil // a grant of this key may be on its way: look again later
	}
	if l := d.live[key]; l != nil && l.rev == rev {
		d.mu.Unlock()
		return true, nil
	}
	d.mu.Unlock()
	del, err := d.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", rev), clientv3.Compare(clientv3.LeaseValue(key), "=", id),
			clientv3.Compare(clientv3.ModRevision(d.hostKey), "=", hostRev)). // not taken over
		Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return false, err
	}
	if del.Succeeded {
		d.log.Info("deleted a lock left behind by an unconfirmed grant or release", "key", key, "token", rev)
	}
	return true, nil
}
