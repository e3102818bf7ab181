package etcdlock

import (
	"context"
	"errors"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/lockmgr"
)

// AcquireWait is Acquire that waits while a resource is busy: it sleeps on
// an etcd watch of the conflicting resource's holder keys and tries again
// when one of them is deleted (released, or its host's lease expired). It
// never polls. waiting, if not nil, is called with the busy error each time
// the call starts to wait (the daemon shows it as "waiting for ... held by
// ..."). A stale state, an invalid request, a lost session or ctx ending
// (a CodeTimeout error) end the wait. Waiters are not queued: when several
// wait for one resource, whichever transaction comes first wins.
func (d *Driver) AcquireWait(ctx context.Context, reqs []lockmgr.Request, waiting func(*lockmgr.BusyError)) ([]lockmgr.Lease, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	ps, err := d.prepare(reqs)
	if err != nil {
		return nil, err
	}
	for {
		ls, c, err := d.tryAcquire(ctx, ps)
		var be *lockmgr.BusyError
		if err == nil || c == nil || !errors.As(err, &be) {
			return ls, err
		}
		if waiting != nil {
			waiting(be)
		}
		if err := d.waitRelease(ctx, c); err != nil {
			return nil, err
		}
	}
}

// waitRelease returns when the conflict c may be gone: a holder key of its
// resource was deleted, or was already gone once the watch was in place.
func (d *Driver) waitRelease(ctx context.Context, c *conflict) error {
	d.mu.Lock()
	if err := d.usableLocked(); err != nil {
		d.mu.Unlock()
		return err
	}
	fenced := d.fenceCh
	d.mu.Unlock()

	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	// A watch from the current revision is in etcd's synced group and is
	// notified as soon as the DELETE is applied; one from an older revision
	// would wait for the server's 100 ms catch-up loop.
	wch := d.cli.Watch(wctx, c.base, clientv3.WithPrefix(), clientv3.WithFilterPut(), clientv3.WithCreatedNotify())
	created := false
	for {
		select {
		case wr, ok := <-wch:
			if !ok || wr.Canceled || wr.Err() != nil {
				if ctx.Err() != nil {
					return opError("etcd driver: wait", ctx.Err())
				}
				// Lost leader or connection: back off a little and let the
				// caller's next transaction find out what is going on.
				return d.pause(ctx, 100*time.Millisecond)
			}
			if len(wr.Events) > 0 {
				return nil
			}
			if wr.Created && !created {
				created = true
				// The holder may have gone between the failed transaction
				// and the watch: look once.
				busy, err := d.stillBusy(ctx, c)
				if err != nil || !busy {
					return err
				}
			}
		case <-fenced:
			return fencedError()
		case <-d.ctx.Done():
			return closedError()
		case <-ctx.Done():
			return opError("etcd driver: wait", ctx.Err())
		}
	}
}

func (d *Driver) pause(ctx context.Context, dur time.Duration) error {
	t := time.NewTimer(dur)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return opError("etcd driver: wait", ctx.Err())
	}
}

// stillBusy reports whether a holder conflicting with c is still there.
func (d *Driver) stillBusy(ctx context.Context, c *conflict) (bool, error) {
	octx, cancel := d.opCtx(ctx)
	defer cancel()
	resp, err := d.cli.Get(octx, c.base, clientv3.WithPrefix(), clientv3.WithLimit(1), clientv3.WithKeysOnly())
	if err != nil {
		return false, opError("etcd driver: wait", err)
	}
	if len(resp.Kvs) == 0 {
		return false, nil
	}
	return c.excl || isExcl(string(resp.Kvs[0].Key)), nil
}

// WaitAlone returns nil once no holder of x's resource other than x itself
// is left in etcd: at once if there is none, else when etcd reports the
// deletion of the last other holder key (released, or its host's lease
// expired). It reads the holder keys at a revision R and follows them on a
// watch from R+1, so no change between the look and the watch is missed,
// and it never polls. A holder that joins meanwhile is waited for too. The
// side of a migration handover that keeps the object waits with it before
// it upgrades its shared hold (Convert); WaitAlone itself changes nothing.
// ctx ending is a CodeTimeout error; a lost session an ErrFenced one; x
// released a CodeNotHeld one.
func (d *Driver) WaitAlone(ctx context.Context, x lockmgr.Lease) error {
	l, ok := x.(*lease)
	if !ok || l.d != d {
		return lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: %v is not a lease of this driver", x)
	}
	for {
		d.mu.Lock()
		if err := d.usableLocked(); err != nil {
			d.mu.Unlock()
			return err
		}
		if l.released || l.epoch != d.epoch {
			d.mu.Unlock()
			return &lockmgr.Error{Code: lockmgr.CodeNotHeld, Resource: l.res.String(), Msg: "the lease was released"}
		}
		own, base, fenced := l.key, d.ks.base(l.res.Key()), d.fenceCh
		d.mu.Unlock()
		alone, err := d.followHolders(ctx, base, own, fenced)
		if alone || err != nil {
			return err
		}
		// The watch broke (a lost leader or connection, a compaction):
		// look again after a pause.
		if err := d.pause(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
}

// followHolders reads the holder keys under base and follows them on a
// watch until none but own is left (true). It returns false, nil when the
// watch broke before that.
func (d *Driver) followHolders(ctx context.Context, base, own string, fenced <-chan struct{}) (bool, error) {
	octx, cancel := d.opCtx(ctx)
	resp, err := d.cli.Get(octx, base, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	cancel()
	if err != nil {
		return false, opError("etcd driver: wait", err)
	}
	others := make(map[string]bool)
	for _, kv := range resp.Kvs {
		if string(kv.Key) != own {
			others[string(kv.Key)] = true
		}
	}
	if len(others) == 0 {
		return true, nil
	}
	wctx, stop := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer stop()
	wch := d.cli.Watch(wctx, base, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for {
		select {
		case wr, ok := <-wch:
			if !ok || wr.Canceled || wr.Err() != nil {
				if ctx.Err() != nil {
					return false, opError("etcd driver: wait", ctx.Err())
				}
				return false, nil
			}
			for _, ev := range wr.Events {
				k := string(ev.Kv.Key)
				switch {
				case k == own:
				case ev.Type == clientv3.EventTypeDelete:
					delete(others, k)
				default:
					others[k] = true
				}
			}
			if len(others) == 0 {
				return true, nil
			}
		case <-fenced:
			return false, fencedError()
		case <-d.ctx.Done():
			return false, closedError()
		case <-ctx.Done():
			return false, opError("etcd driver: wait", ctx.Err())
		}
	}
}
