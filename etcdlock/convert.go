package etcdlock

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/lockmgr"
)

var _ lockmgr.Converter = (*Driver)(nil)

// Convert changes the mode of a granted lease in place (lockmgr.Converter),
// in one etcd transaction that deletes the lease's holder key and puts the
// holder key of the new mode, so that no other host sees the resource
// unheld at any revision:
//
//	to Shared:    If ModRevision(key) == mod, ModRevision(P hosts/HOST) == the session's
//	              Then: Delete(key), Put(new holder key, record, lease)
//	to Exclusive: If the same, and no other key in P res/K/
//	              (two range comparisons around our own key)
//	              Then: Delete(key), Put(new holder key, record, lease), Put(P tok/K)
//
// A downgrade keeps the grant's fencing token and leaves the token key
// alone (the record carries the token, so a re-attached daemon adopts the
// lease by it), so a state string made before it stays current. An upgrade
// is a new exclusive grant: its token is the transaction's revision (the
// new key's CreateRevision), greater than every token granted for the
// resource so far, a sharer's since the lease's own grant included, and
// the token key moves with it, so a state string made before the upgrade
// is stale and one made after it is current. A downgrade never meets a
// conflict; an upgrade fails with a *lockmgr.BusyError naming another
// holder while there is one, and the lease stays shared. A lease that is
// no longer in etcd is a CodeNotHeld error. A session whose host key is
// gone (its lease expired) or was written by another run (see Restarts in
// the package comment) makes the host fence itself, and Convert returns
// an error wrapping ErrFenced.
//
// The transaction compares the old key's ModRevision, not merely its
// existence, so that its outcome can be settled when etcd's answer is lost
// (a timeout, a broken connection: the proposal may still be committed
// later). Convert then sends a second transaction that rewrites the old
// key in place (same value, same lease: a new ModRevision) if its
// ModRevision is still the one compared, and else reads both keys:
//
//   - it succeeded: the conversion was not applied and never will be (its
//     comparison can no longer hold); the lease is unchanged and Convert
//     returns a CodeTimeout error;
//   - the new key holds this attempt's record (a random Attempt value in
//     it): the conversion was applied, and Convert succeeds;
//   - the old key is still this grant's (an earlier settling rewrite whose
//     answer was lost moved its ModRevision): not applied, as in the first
//     case;
//   - the host key changed: the session was taken over, and the host fences
//     itself, leaving the keys to the run that took it.
//
// The settling transaction is repeated until etcd answers it, for at most
// OpTimeout; if etcd does not, or the grant is in neither key, the host fences
// itself, because a lease whose mode is unknown could be weaker in etcd
// than the daemon believes.
func (d *Driver) Convert(ctx context.Context, x lockmgr.Lease, m lockmgr.Mode) (lockmgr.Lease, error) {
	l, ok := x.(*lease)
	if !ok || l.d != d {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: %v is not a lease of this driver", x)
	}
	if m != lockmgr.Exclusive && m != lockmgr.Shared {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Resource: l.res.String(), Msg: "etcd driver: a lease converts only to exclusive or shared"}
	}
	d.mu.Lock()
	if err := d.usableLocked(); err != nil {
		d.mu.Unlock()
		return nil, err
	}
	if l.released {
		d.mu.Unlock()
		return nil, &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: l.res.String(), Msg: "the lease was released"}
	}
	if l.epoch != d.epoch {
		d.mu.Unlock()
		return nil, fencedError()
	}
	if l.res.Mode == m {
		d.mu.Unlock()
		return l, nil
	}
	id, epoch, hostRev, oldKey, oldRev, oldMod, token := d.leaseID, d.epoch, d.hostRev, l.key, l.rev, l.mod, l.token
	nres := l.res
	nres.Mode = m
	k := nres.Key()
	base := d.ks.base(k)
	newKey := d.ks.excl(k)
	if m == lockmgr.Shared {
		newKey = d.ks.shared(k, d.cfg.Host)
	}
	h := l.holder
	h.Mode = m
	d.inflight[newKey]++ // keeps the sweeper off the new key until we know
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		if d.inflight[newKey]--; d.inflight[newKey] <= 0 {
			delete(d.inflight, newKey)
		}
		d.mu.Unlock()
	}()

	rec := record{Resource: nres, Holder: h, Token: token, Attempt: nonce()}
	if m == lockmgr.Exclusive {
		rec.Token = 0 // a new grant: its token is the new key's CreateRevision
		rec.Replaced = token
	}
	val, err := json.Marshal(rec)
	if err != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInternal, Resource: nres.String(), Msg: "encode holder", Err: err}
	}
	hk := d.hostKey
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(oldKey), "=", oldMod), clientv3.Compare(clientv3.ModRevision(hk), "=", hostRev)}
	thens := []clientv3.Op{clientv3.OpDelete(oldKey), clientv3.OpPut(newKey, string(val), clientv3.WithLease(id))}
	if m == lockmgr.Exclusive {
		cmps = append(cmps,
			clientv3.Compare(clientv3.CreateRevision(base), "=", 0).WithRange(oldKey),
			clientv3.Compare(clientv3.CreateRevision(oldKey+"\x00"), "=", 0).WithRange(clientv3.GetPrefixRangeEnd(base)))
		thens = append(thens, clientv3.OpPut(d.ks.token(k), tokRecord{Host: d.cfg.Host, UUID: h.UUID}.String()))
	}
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	resp, err := d.cli.Txn(octx).If(cmps...).Then(thens...).
		Else(clientv3.OpGet(oldKey), clientv3.OpGet(base, clientv3.WithPrefix(), clientv3.WithLimit(2)), clientv3.OpGet(hk)).Commit()
	applied, newRev := false, int64(0)
	switch {
	case err != nil && isLeaseNotFound(err):
		go d.fence(epoch, "etcd says this host's lease is gone (expired or revoked)")
		return nil, fencedError()
	case err != nil && definite(err):
		return nil, opError("etcd driver: convert", err)
	case err != nil:
		var mod int64
		applied, newRev, mod, err = d.convertOutcome(ctx, epoch, id, hostRev, oldKey, oldRev, oldMod, newKey, string(val))
		if errors.Is(err, ErrFenced) {
			return nil, err // taken over: fenced, saying so
		}
		if err != nil {
			d.log.Error("a lock conversion's outcome is unknown", "resource", nres.String(), "err", err)
			d.fence(epoch, "a lock conversion's outcome could not be settled in etcd")
			return nil, fencedError()
		}
		if !applied {
			d.mu.Lock()
			if l.key == oldKey && l.mod == oldMod {
				l.mod = mod // rewritten in place by convertOutcome
			}
			d.mu.Unlock()
			return nil, &lockmgr.Error{Code: lockmgr.CodeTimeout, Resource: nres.String(), Msg: "etcd driver: convert: etcd did not answer in time; the lease is unchanged"}
		}
	case resp.Succeeded:
		applied, newRev = true, resp.Header.Revision
	}
	if !applied {
		if len(resp.Responses) != 3 {
			return nil, lockmgr.Errorf(lockmgr.CodeInternal, "etcd driver: unexpected conversion reply (%d responses)", len(resp.Responses))
		}
		if err := d.takenOver(epoch, hostRev, resp.Responses[2]); err != nil {
			return nil, err
		}
		return nil, convertRefused(resp, nres, oldKey, oldMod)
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	// Unlike a new grant, a conversion whose reply comes after the fence
	// deadline is kept: its holder runs already and is fenced with the
	// others if no renewal moves the deadline, and the old key is gone, so
	// withdrawing the new one would leave the holder with no lock in etcd.
	if d.epoch != epoch || d.fenced || d.closed {
		if d.epoch == epoch && !d.fenced {
			d.sweep[newKey] = newRev
		}
		return nil, fencedError()
	}
	if l.released {
		// Released while the conversion was on its way (the Manager never
		// does this): the new key is nobody's.
		d.sweep[newKey] = newRev
		return nil, &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: nres.String(), Msg: "the lease was released"}
	}
	if d.live[oldKey] == l {
		delete(d.live, oldKey)
	}
	l.res, l.key, l.rev, l.mod, l.holder = nres, newKey, newRev, newRev, h
	if m == lockmgr.Exclusive {
		l.token = uint64(newRev)
	}
	d.live[newKey] = l
	return l, nil
}

// convertRefused explains a conversion transaction whose comparisons
// failed: the lease's key is gone (CodeNotHeld), or another holder stands
// in the way of an upgrade (a *lockmgr.BusyError).
func convertRefused(resp *clientv3.TxnResponse, r lockmgr.Resource, oldKey string, oldMod int64) error {
	own := resp.Responses[0].GetResponseRange().GetKvs()
	if len(own) == 0 || own[0].ModRevision != oldMod {
		return &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: r.String(), Msg: "the lease is no longer in etcd"}
	}
	for _, kv := range resp.Responses[1].GetResponseRange().GetKvs() {
		if string(kv.Key) != oldKey {
			return &lockmgr.BusyError{Resource: r, Holder: holderOf(kv.Key, kv.Value)}
		}
	}
	return lockmgr.Errorf(lockmgr.CodeInternal, "etcd driver: conversion of %s refused but no conflict found", r)
}

// convertOutcome settles a conversion whose answer was lost (see Convert):
// it returns whether it was applied, with the new key's CreateRevision if
// so, or else the old key's ModRevision now. Once it has returned, the
// conversion's transaction can no longer change anything. It tries until
// etcd answers, for at most OpTimeout.
func (d *Driver) convertOutcome(ctx context.Context, epoch uint64, id clientv3.LeaseID, hostRev int64, oldKey string, oldRev, oldMod int64, newKey, val string) (applied bool, newRev, mod int64, err error) {
	octx, cancel := d.opCtx(context.WithoutCancel(ctx))
	defer cancel()
	hk := d.hostKey
	for {
		resp, err := d.cli.Txn(octx).
			If(clientv3.Compare(clientv3.ModRevision(oldKey), "=", oldMod), clientv3.Compare(clientv3.ModRevision(hk), "=", hostRev)).
			Then(clientv3.OpPut(oldKey, "", clientv3.WithIgnoreValue(), clientv3.WithIgnoreLease())).
			Else(clientv3.OpGet(oldKey), clientv3.OpGet(newKey), clientv3.OpGet(hk)).Commit()
		switch {
		case err == nil && resp.Succeeded:
			return false, 0, resp.Header.Revision, nil
		case err == nil:
			if err := d.takenOver(epoch, hostRev, resp.Responses[2]); err != nil {
				return false, 0, 0, err // the keys are the other run's now: leave them be
			}
			if kvs := resp.Responses[1].GetResponseRange().GetKvs(); len(kvs) > 0 && string(kvs[0].Value) == val {
				return true, kvs[0].CreateRevision, 0, nil
			}
			if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 && kvs[0].CreateRevision == oldRev && clientv3.LeaseID(kvs[0].Lease) == id {
				return false, 0, kvs[0].ModRevision, nil
			}
			return false, 0, 0, &lockmgr.Error{Code: lockmgr.CodeNotHeld, Msg: "neither the old nor the new holder key is in etcd"}
		case definite(err) || isLeaseNotFound(err):
			return false, 0, 0, opError("etcd driver: convert", err)
		}
		if err := d.pause(octx, 100*time.Millisecond); err != nil {
			return false, 0, 0, err
		}
	}
}
