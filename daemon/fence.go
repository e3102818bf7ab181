package daemon

import (
	"context"
	"sync"
	"syscall"
	"time"

	"github.com/vmlock/vmlock/lockholder"
)

// Fencer connects a cluster lock driver's self-fencing (etcdlock's OnFence
// and OnDeadline) to the daemon and its lock-holder. The driver exists
// before the daemon (the daemon takes its locks back through it), so
// vmlockd makes a Fencer first, hands its Fence and Deadline methods to the
// driver and the Fencer itself to the daemon (Config.Fencer), which
// attaches to it once its lock-holder is connected.
//
// Invariants:
//   - Fence returns only once every process that owns an object of the
//     daemon has been sent SIGKILL and has exited. A Fence that comes
//     before the daemon is attached waits for it, and one that comes while
//     the daemon takes its locks back (restore) waits for the end of it, so
//     no restored owner escapes; if no daemon is ever attached, Fence never
//     returns, and vmlockd must exit (its lease then runs out, and its
//     lock-holder fences).
//   - Every deadline the driver announces reaches the lock-holder, in the
//     order announced; one announced before the daemon was attached is sent
//     when it attaches.
//   - With a Fencer, every lock-holder record of an object that holds a
//     lease carries its owner's pidfd, so the lock-holder kills the owners
//     itself when the last deadline passes while vmlockd is gone.
type Fencer struct {
	attached chan struct{} // closed by attach

	// armMu serialises passing deadlines on, so that the lock-holder gets
	// them in order. It is taken before the daemon's recordMu, and mu is
	// never held while waiting for either: resyncHolder reads the newest
	// deadline (mu) with recordMu held.
	armMu sync.Mutex

	mu       sync.Mutex
	d        *Daemon
	deadline time.Time // the newest deadline announced
}

// NewFencer returns a Fencer with no daemon attached.
func NewFencer() *Fencer { return &Fencer{attached: make(chan struct{})} }

// Fence is the driver's OnFence: it kills every owner of the daemon's
// objects with SIGKILL, without a grace period, and returns once they are
// dead. reason is logged.
func (f *Fencer) Fence(reason string) {
	<-f.attached
	f.d.fenceAll(reason)
}

// Deadline is the driver's OnDeadline: it passes the fence deadline on to
// the lock-holder.
func (f *Fencer) Deadline(t time.Time) {
	f.armMu.Lock()
	defer f.armMu.Unlock()
	f.mu.Lock()
	f.deadline = t
	d := f.d
	f.mu.Unlock()
	if d != nil {
		d.armHolder(t)
	}
}

// attach makes d the daemon to fence and hands the lock-holder the newest
// deadline. Called once, with d.holder connected and d.fenceMu held.
func (f *Fencer) attach(d *Daemon) {
	f.armMu.Lock()
	f.mu.Lock()
	f.d = d
	t := f.deadline
	f.mu.Unlock()
	if !t.IsZero() {
		d.armHolder(t)
	}
	f.armMu.Unlock()
	close(f.attached)
}

// latest returns the newest deadline announced.
func (f *Fencer) latest() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.deadline
}

// armTimeout bounds passing a deadline on (the driver's next deadline
// waits for it; its renewals do not): a holder that takes no message for this long is
// stuck (it reads every millisecond); its client is then unusable, so the
// next check (watchHolder) replaces it, and the replacement is armed.
const armTimeout = time.Second

func (d *Daemon) armHolder(t time.Time) {
	d.recordMu.RLock()
	defer d.recordMu.RUnlock()
	ctx, cancel := context.WithTimeout(context.Background(), armTimeout)
	defer cancel()
	d.armHolderWith(ctx, d.holder, t)
}

func (d *Daemon) armHolderWith(ctx context.Context, h *lockholder.Client, t time.Time) {
	if err := h.FenceAt(ctx, t); err != nil {
		d.log.Error("lock-holder: cannot pass on the fence deadline; if vmlockd dies now, the holders of its locks are not fenced", "err", err)
	}
}

// startFencing takes fenceMu for restore and attaches the Fencer, if there
// is one; the returned function ends the restore.
func (d *Daemon) startFencing() (done func()) {
	d.fenceMu.Lock()
	if d.cfg.Fencer != nil {
		d.cfg.Fencer.attach(d)
	}
	return d.fenceMu.Unlock
}

// fenceAll kills every owner process of the daemon's objects at once
// (SIGKILL through their pidfds) and waits until they are gone. Owners of
// read-only uses die too: an object whose grant is on its way may not be
// listed as a holder yet, but its owner is registered before the grant. The
// exit handlers then release the objects (the driver's leases are lost
// already, so releasing them costs nothing).
func (d *Daemon) fenceAll(reason string) {
	d.fenceMu.Lock()
	defer d.fenceMu.Unlock()
	t0 := time.Now()
	procs := map[*process]string{}
	d.mu.Lock()
	for uuid, o := range d.owners {
		p := o.proc
		if pr := d.procs[o.obj.PID]; pr != nil {
			p = pr.p // the watched process (o.proc may be a duplicate closed by watchLocked)
		}
		procs[p] = uuid
	}
	d.mu.Unlock()
	d.log.Error("fencing: this host's cluster lease can no longer be confirmed; killing every lock holder", "reason", reason, "processes", len(procs))
	for p, uuid := range procs {
		if err := p.signal(syscall.SIGKILL); err != nil {
			d.log.Error("fencing: SIGKILL failed", "pid", p.pid, "uuid", uuid, "err", err)
		}
	}
	for p := range procs {
		d.waitDead(p)
	}
	d.log.Warn("fenced: every lock holder is dead", "processes", len(procs), "took", time.Since(t0))
}

// waitDead waits, however long it takes, until p has exited: a fence that
// returned early would let another host take the locks of a live process.
func (d *Daemon) waitDead(p *process) {
	for {
		select {
		case <-p.done:
			if p.dead || !p.alive() {
				return
			}
		case <-time.After(time.Second):
			d.log.Error("fencing: a killed holder has not exited yet (uninterruptible sleep?); still waiting", "pid", p.pid)
			continue
		}
		// We stopped watching it without an exit: poll.
		time.Sleep(10 * time.Millisecond)
	}
}

// killLost ends an owner found alive on restart whose leases could not all
// be taken back (with a cluster driver: its session expired while vmlockd
// was down, so other hosts may hold them now). It reports whether the
// process is gone.
func (d *Daemon) killLost(uuid string, p *process, lost int) bool {
	if d.cfg.Fencer == nil || lost == 0 {
		return false
	}
	d.log.Error("restore: an owner runs without some of its locks (they were lost while vmlockd was down); killing it",
		"uuid", uuid, "pid", p.pid, "lost", lost)
	if err := p.signal(syscall.SIGKILL); err != nil {
		d.log.Error("restore: SIGKILL failed", "pid", p.pid, "err", err)
	}
	d.waitDead(p)
	return true
}

// dropUnadopted lets a driver that re-attached to its previous session
// release the grants no lock-holder record claimed (grants whose clients
// never got an answer before vmlockd died). Called once restore is done.
func (d *Daemon) dropUnadopted(ctx context.Context) {
	du, ok := d.cfg.Driver.(interface{ DropUnadopted(context.Context) error })
	if !ok {
		return
	}
	if err := du.DropUnadopted(ctx); err != nil {
		d.log.Error("releasing the previous session's locks that no record claims", "err", err)
	}
}
