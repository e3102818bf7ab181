// Package etcdlock is vmlock's cluster lock driver ("etcd"): locks that hold
// across hosts without a shared file system, kept in an etcd cluster.
//
// # Sessions
//
// Each host (one Driver, named by Config.Host) keeps one etcd lease, its
// session, with a TTL (default 10 s). Every lock the host is granted is a key
// attached to that lease, so the locks of a host that dies vanish when its
// lease expires. The driver renews the lease itself, every TTL/3, with
// LeaseKeepAliveOnce, so that it knows when each renewal was confirmed (see
// "Self-fencing" below). The lease ID is written to Config.StateDir; a daemon
// that restarts within the TTL re-attaches to its lease and takes its locks
// back with Adopt.
//
// # Key layout
//
// With P the prefix (default "/vmlock/") and K a resource's Key()
// ("disk:/var/lib/images/a.qcow2") escaped with url.PathEscape, so that it is
// one path component and no resource's keys are a prefix of another's (a
// name longer than 256 bytes escaped is replaced by "~" and its SHA-256):
//
//	P hosts/HOST          the host's session key, on its lease; one live session per host name
//	P res/K/e             the exclusive holder, on the holder host's lease
//	P res/K/s/HOST.RAND   one key per shared holder grant, on the holder host's lease
//	P tok/K               the token key: not leased, never deleted; its value names who moved it last
//	P void/HOST.RAND      voids a grant attempt whose answer was lost, on the host's lease
//
// The value of a holder key is the JSON of {resource, holder, attempt} (the
// lockmgr.Holder with the driver's host name, and a random value unique to
// the transaction that wrote it), so that a busy error names the holder —
// vm name, uuid, pid, host and since when — whichever host asks.
// "e" sorts before "s/", so a range over P res/K/ with limit 1 returns the
// exclusive holder if there is one, else a shared one.
//
// # The grant transaction
//
// A grant of N resources is one etcd transaction, all or nothing:
//
//	If:   for an exclusive request   CreateRevision(P res/K/ as a prefix range) == 0  (no holder at all)
//	      for a shared request       CreateRevision(P res/K/e) == 0                  (no exclusive holder)
//	      if Request.Expect != 0     ModRevision(P tok/K) == Expect                  (the state is current)
//	      once                       CreateRevision(P void/HOST.RAND) == 0           (the attempt is not void)
//	      once                       ModRevision(P hosts/HOST) == the session's       (see Restarts)
//	Then: Put(holder key, record, lease) and Put(P tok/K) for every request
//	Else: Get(P res/K/, prefix, limit 1) and Get(P tok/K) for every request, and Get(P hosts/HOST)
//
// The fencing token of every resource of a grant is the transaction's
// revision, which the Then branch also makes the token key's ModRevision:
// it is strictly greater than every earlier grant's, since etcd's revision
// only grows, and it survives releases (the token key is never deleted) and
// compaction. A failed transaction's Else branch is read at the same revision
// as its comparisons, so the error is exact: a *lockmgr.StaleStateError when
// the token key moved (checked first: waiting cannot help), else a
// *lockmgr.BusyError naming the first conflicting holder.
//
// Each request costs at most two comparisons, two puts and two gets, the
// attempt two comparisons and a get more, and etcd refuses a transaction
// with more than MaxTxnOps (default 128) operations in any branch, so a
// grant holds at most (MaxTxnOps−2)/2 = 63 resources. A larger
// grant is refused with an invalid-argument error rather than split, because
// a split grant is no longer atomic to other hosts; set Config.MaxTxnOps when
// the cluster runs with a larger --max-txn-ops.
//
// When etcd's answer to a grant is lost (a timeout, a broken connection:
// the transaction may be applied, now or later), Acquire voids the attempt
// before it returns its error: one transaction creates the attempt's void
// key, so that the grant, if it is still on its way, fails its comparison,
// and deletes each of its holder keys whose value is still the one the
// attempt wrote (its RAND), so that no later grant is touched. The void
// transaction is idempotent and is repeated until etcd answers it, for at
// most OpTimeout whatever the caller's context; if etcd does not, the
// driver repeats it after each confirmed renewal until it is done or the
// session ends. A void key stays until its session ends.
//
// A withdrawn grant moved the token keys all the same, so a grant
// conditional on a token (Request.Expect: a migration's destination with
// the source's state) would find its own retry stale, though nobody was
// granted the resource. The void transaction therefore also marks each
// such token key, if its value is still the one the attempt wrote (host,
// object uuid, attempt, Expect), as moved by a withdrawn grant. A grant
// whose token comparison fails and whose token key holds such a mark for
// this host, the same object uuid and the same Expect is sent again
// comparing the mark's revision instead (at most a few times per call);
// an attempt of that kind still waiting to be voided is voided first. Any
// other host or object with the same state still finds it stale, and the
// new grant's token is a new revision, above every one before.
//
// Release deletes the holder keys in one transaction of nested transactions,
// each deleting its key only if its CreateRevision is still the lease's token,
// so a release never deletes somebody else's later grant (and the whole only
// if the session's host key is as its run wrote it: see Restarts).
//
// # Migration handover
//
// The destination acquires with Request.Expect set to the token from the
// source's state string. Shared-write handover: both sides hold the disk
// shared (shared never conflicts with shared), the destination's grant is
// refused only if someone else was granted the disk since the state string
// was made. Exclusive handover: the source releases, then the destination
// acquires with Expect; the token key still holds the source's token, so the
// grant succeeds unless a third party took the disk in between (stale state).
// While the source still holds the disk exclusively the destination gets a
// busy error; so vmlockd's handover first converts the source's exclusive
// hold to a shared one in place (Convert: one transaction deletes the
// holder key and puts the new one, the token key untouched, so the token
// and a state string made before stay current), and the destination
// converts its shared hold back to exclusive once the source released (or
// the source does, when the handover is cancelled). An upgrade is a new
// grant: its token is its transaction's revision, which the token key takes
// too, so it is greater than the other side's shared grant's. A downgraded
// grant's record carries its token, since its key's CreateRevision is no
// longer the token; re-attach and Adopt use it. An upgrade's record carries
// the token of the shared grant it replaced ("replaced"): a daemon killed
// after etcd made a conversion and before it recorded it restarts with a
// record of the grant as it was, and Adopt finds the grant by that token
// and takes it back as etcd has it. A conversion's transaction
// compares the old holder key's ModRevision, so that when etcd's answer is
// lost Convert can settle the outcome for sure: it rewrites the old key in
// place (a new ModRevision, which the lost transaction can no longer
// match) unless that key is gone, and then finds its own record in the new
// key (see Convert). WaitAlone sleeps on a watch until no other holder of
// a lease's resource is left: vmlockd's side of a handover that keeps the
// object waits with it for the other side to release before it upgrades.
//
// # Restarts
//
// A daemon killed while a request of its own was on its way may have that
// request applied after the next run re-attached to the session and read
// its keys: a grant would be a lock nobody knows of, refused to every other
// host until the session ends; a conversion would move an adopted lock to a
// key the next run does not know; a release would free a lock the next run
// adopted and believes held. So each run writes its host key (P hosts/HOST)
// when it starts a session or re-attaches to one, and every grant,
// conversion, release and clean-up deletion compares the key's ModRevision
// with the one its run wrote. A re-attach writes the key first and only then
// lists the session's keys, so a request of the previous run applied before
// the write is in the list and one applied after it fails. The write itself
// compares the key's ModRevision with the one its run read, so that the
// late claim of a run that died while re-attaching changes nothing. etcd's
// leader answers the listing from its own view once it has applied all it
// knows committed, which a leader elected just then may not have brought up
// to date: DropUnadopted therefore lists the session again, and deletes any
// holder key with a readable record that no lease of this run accounts for.
//
// A run that finds its request refused because the host key changed (the
// Else branch reads it) has had its session taken over, by a daemon started
// on a copy of its state directory if it is still alive: it fences itself,
// and neither revokes the lease nor deletes its keys, which are the other
// run's now.
//
// # Waiting
//
// AcquireWait retries a busy grant when the conflicting holder goes away. It
// watches the conflicting resource's holder keys for DELETE events (a watch
// created at the current revision, which etcd serves from its synced group
// and notifies at once), then re-reads the keys once so that a release that
// happened before the watch was created is not missed, and sleeps on the
// watch: it never polls. etcd's concurrency.Mutex watches from an older
// revision, which the server only catches up on every 100 ms; that is its
// hand-off quantum.
//
// # Self-fencing
//
// Let t be the local monotonic time at which a renewal (or the grant) of the
// lease was sent, for the newest renewal whose reply confirmed the lease. The
// etcd leader received that request after t and then set the lease to expire
// TTL later on its own clock; a leader change only extends leases (the new
// leader restarts every lease at its full TTL) and expiry is checked every
// 500 ms, which only delays it. (This assumes etcd's lease checkpointing
// stays off, its default: with it, a leader that dies right after a renewal
// may hand the lease on with the remaining TTL of an older checkpoint.)
// Another host can be granted one of our
// resources only after the revocation that follows expiry is committed. So
// no other host is granted a resource before t + TTL in server time.
//
// The driver calls OnFence at t + (TTL − FenceMargin) on its monotonic clock
// if no later renewal was confirmed (and at once when the server says the
// lease is gone), and refuses from then on to return grants: a grant whose
// reply arrives after the fence deadline is withdrawn (a conversion of a
// held lease is kept: its holder runs already and is fenced with the
// others). OnFence must kill
// every process holding the host's locks (SIGKILL, no grace period) before it
// returns. Safety needs, with r the rate of the client's clock relative to
// the server's (r < 1: the client's clock runs slow) and k the time OnFence
// takes:
//
//	(TTL − FenceMargin) / r + k  <  TTL
//
// With the defaults (TTL 10 s, margin 2 s) and k ≤ 0.5 s, that is r > 0.84:
// the client's clock may run up to 15 % slower than the server's. Real clock
// rates differ by parts per million (NTP slews by at most 0.05 %), so the
// margin is there for k, timer and scheduling latency, and GC pauses. It does
// not cover a vmlockd that is stopped as a whole (SIGSTOP, a suspended host:
// Linux's monotonic clock does not count suspend), nor a daemon that is down
// for longer than the TTL: holders of a host whose daemon is gone must be
// fenced by the process that keeps them (the daemon's lock holder).
//
// OnDeadline hears every new fence deadline (after each confirmed renewal,
// and before a new or re-attached session grants anything); vmlockd passes
// it to its lock-holder process, which kills the holders itself if the
// deadline passes while vmlockd is down. Renewals do not wait for it: a
// slow call (vmlockd replacing its lock-holder) must not make the host
// fence itself; the next call brings the newest deadline.
//
// After fencing, the driver's leases are lost: Release of them returns nil,
// Acquire fails with a timeout-class error wrapping ErrFenced, and once
// OnFence has returned the driver keeps trying to revoke the old lease and
// start a new session, after which it grants again.
package etcdlock
