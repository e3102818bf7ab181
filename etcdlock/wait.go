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
