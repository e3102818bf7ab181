package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockmgr"
)

// The crash test of the cluster: two hosts (two vmlockd with the etcd
// driver on one embedded etcd) serve concurrent clients that acquire,
// hotplug, unplug, release and migrate objects from one host to the other;
// one host's vmlockd is killed (SIGKILL) at a random moment and restarted
// within the session TTL, and what both hosts acknowledged before is
// checked against what they hold after, with etcd's holder keys as the
// independent view. It shares crash_test.go's model of one object's holds.
const (
	clusterRounds  = 150 // kills and restarts
	clusterClients = 3   // concurrent clients, each with its own objects
	clusterSlots   = 2   // objects per client
	clusterDisks   = 6   // disk images, shared by every client
	clusterOwners  = 2   // owner processes per host
	clusterMaxOps  = 30  // operations before the kill, at most
	clusterPrefix  = "/vmlock/"
)

var clusterHostNames = [2]string{"crash-a", "crash-b"}

// Roles of a side in a handover, as vmlockd names them.
const (
	sideSource = "source"
	sideTarget = "target"
)

// clusterSide is what one host acknowledged of an object.
type clusterSide struct {
	owner   *exec.Cmd
	holds   map[string]crashHold
	role    string          // "", sideSource or sideTarget
	pending map[string]bool // what the side that keeps the object takes back exclusively
}

func (s *clusterSide) clone() *clusterSide {
	if s == nil {
		return nil
	}
	c := *s
	c.holds = maps.Clone(s.holds)
	c.pending = maps.Clone(s.pending)
	return &c
}

func (s *clusterSide) ownerOrNil() *exec.Cmd {
	if s == nil {
		return nil
	}
	return s.owner
}

func (s *clusterSide) heldOrNil() map[string]crashHold {
	if s == nil {
		return nil
	}
	return s.holds
}

// clusterObject is one object (VM) as the hosts acknowledged it: on one
// host, or on both during a migration. Only its client changes it while a
// round runs.
type clusterObject struct {
	uuid     string
	sides    [2]*clusterSide
	from     int             // the source host of a migration in progress
	state    string          // the source's handover state
	handover map[string]bool // what the migration hands over exclusively
	flight   *clusterOp      // the call cut short by the kill
}

type clusterKind int

const (
	cAcquire     clusterKind = iota // a new object on one host
	cHotplug                        // more disks, all or nothing
	cUnplug                         // a list of its disks
	cRelease                        // everything
	cPrepare                        // migrate prepare on the source
	cJoin                           // acquire with the handover state on the destination
	cCompleteSrc                    // migrate complete on the source: it releases
	cCompleteDst                    // migrate complete on the destination: it takes the disks exclusively
	cCancelDst                      // migrate complete --cancel on the destination: it releases
	cCancelSrc                      // migrate complete --cancel on the source: it takes the disks back
)

var clusterKindNames = [...]string{"acquire", "hotplug", "unplug", "release", "migrate prepare", "acquire with the handover state",
	"migrate complete on the source", "migrate complete on the destination", "migrate cancel on the destination", "migrate cancel on the source"}

func (k clusterKind) String() string { return clusterKindNames[k] }

func (k clusterKind) migration() bool { return k >= cPrepare }

// clusterOp is one call on one host, and the object as it was before.
type clusterOp struct {
	kind   clusterKind
	host   int
	disks  []lockmgr.Resource // acquire, hotplug, unplug; join: what the state lists, as the destination takes it
	owner  *exec.Cmd          // acquire, join
	state  string             // join
	before [2]*clusterSide
	floor  map[string]uint64
}

func (op *clusterOp) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s on %s", op.kind, clusterHostNames[op.host])
	for _, r := range op.disks {
		fmt.Fprintf(&b, " %s:%s", r.Name, r.Mode)
	}
	return b.String()
}

// crashOp is the call as crash_test.go's checkFlight knows it: a join is
// an acquire of what it takes, a side that gives the object up releases,
// one that keeps it converts its pending disks as a cancel does.
func (op *clusterOp) crashOp() *crashOp {
	b := op.before[op.host]
	c := &crashOp{disks: op.disks, floor: op.floor}
	if b != nil {
		c.before = crashObject{holds: b.holds, pending: b.pending}
	}
	switch op.kind {
	case cAcquire, cJoin:
		c.kind = opAcquire
	case cHotplug:
		c.kind = opHotplug
	case cUnplug:
		c.kind = opUnplug
	case cRelease, cCompleteSrc, cCancelDst:
		c.kind = opRelease
	case cPrepare:
		c.kind = opPrepare
	case cCompleteDst, cCancelSrc:
		c.kind = opCancel
	}
	return c
}

type clusterWorld struct {
	*crashWorld // seed, failures, tokens, reservations, stats
	hosts       [2]*clusterHost
	etcd        *clientv3.Client
	cobjs       []*clusterObject
	leases      [2]string      // each host's session lease
	owners      [2][]*exec.Cmd // by host
	victim      int            // the host killed in this round

	// What watchExclusive found, which flush reports.
	watchMu       sync.Mutex
	watchFailures []string
	revisions     atomic.Int64 // revisions checked
}

// flush ends the test with every violation found so far.
func (w *clusterWorld) flush() {
	w.t.Helper()
	w.watchMu.Lock()
	fs := w.watchFailures
	w.watchFailures = nil
	w.watchMu.Unlock()
	w.mu.Lock()
	w.failures = append(w.failures, fs...)
	w.mu.Unlock()
	w.crashWorld.flush()
}

// Every grant that either host acknowledged and did not release is held
// after a SIGKILL of one host's vmlockd at any moment and its restart within
// the TTL, with the same mode and token, in its table and in etcd; nothing
// is held in etcd that no host lists; a disk is never held exclusively and
// by anybody else at once (checked at every etcd revision); a call cut short
// was made wholly or not at all; the restarted host keeps its session (not
// fenced); a migration cut short can be completed or cancelled and ends
// with its disks held exclusively by exactly one side; owners that exited
// while their vmlockd was down (reaped or not) are released.
func TestAKillOfAnEtcdHostAtAnyMomentLosesNoAcknowledgedLock(t *testing.T) {
	seed := crashSeed(t)
	c := startEtcd(t)
	// The default TTL (10 s): every restart is well within it.
	hc := hostConfig{endpoints: c.Endpoints()}
	w := &clusterWorld{crashWorld: &crashWorld{t: t, seed: seed, disks: diskPaths(t, clusterDisks),
		maxToken: map[string]uint64{}, reserved: map[string]string{}, acquiring: map[string]int{}, stats: map[string]int{}}}
	for i, n := range clusterHostNames {
		w.hosts[i] = startHost(t, n, hc)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	w.etcd = cli
	for i := range w.hosts {
		w.leases[i] = w.sessionLease(i)
	}
	for c := range clusterClients {
		for s := range clusterSlots {
			w.cobjs = append(w.cobjs, &clusterObject{uuid: fmt.Sprintf("c1a55e00-0000-4000-8000-%06d%06d", c, s)})
		}
	}
	for h := range w.owners {
		for range clusterOwners {
			w.owners[h] = append(w.owners[h], w.newOwner())
		}
	}
	stopWatch := w.watchExclusive()
	rng := rand.New(rand.NewPCG(seed, 0))
	for round := range clusterRounds {
		w.round = round
		w.victim = rng.IntN(2)
		w.runRound(rng.IntN(clusterMaxOps + 1))
		w.flush()
		w.checkEtcd("while "+clusterHostNames[w.victim]+"'s vmlockd was down", false)
		w.flush()
		killed, zombies := w.killOwners(rng)
		w.hosts[w.victim].start()
		for _, z := range zombies {
			z.Wait()
		}
		w.checkAfterRestart(killed, rng)
		w.flush()
	}
	stopWatch()
	w.flush()
	t.Logf("%d rounds, exclusion checked at %d etcd revisions: %v", clusterRounds, w.revisions.Load(), w.stats)
}

// sessionLease returns the lease that host h's session key names.
func (w *clusterWorld) sessionLease(h int) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := w.etcd.Get(ctx, clusterPrefix+"hosts/"+clusterHostNames[h])
	if err != nil {
		w.t.Fatal(err)
	}
	if len(resp.Kvs) != 1 {
		return "(no session)"
	}
	var rec struct {
		Lease string `json:"lease"`
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, &rec); err != nil {
		w.t.Fatalf("session key of %s: %q: %v", clusterHostNames[h], resp.Kvs[0].Value, err)
	}
	return rec.Lease
}

// runRound runs the clients until they have made kill operations between
// them, then kills the victim's vmlockd and waits for the clients to stop.
// Calls to the other host go on to their answer.
func (w *clusterWorld) runRound(kill int) {
	var ctxs [2]context.Context
	var cancels [2]context.CancelFunc
	for h := range ctxs {
		ctxs[h], cancels[h] = context.WithCancel(context.Background())
		defer cancels[h]()
	}
	w.runClients(clusterClients, kill, func(c int) (func() bool, func()) {
		cls := [2]*api.Client{w.hosts[0].client(), w.hosts[1].client()}
		rng := rand.New(rand.NewPCG(w.seed, uint64(1+w.round*clusterClients+c)))
		return func() bool { return w.step(ctxs, cls, rng, w.cobjs[c*clusterSlots+rng.IntN(clusterSlots)]) },
			func() { cls[0].Close(); cls[1].Close() }
	}, func() {
		w.hosts[w.victim].kill9()
		cancels[w.victim]()
	})
}

// choose picks the next call on ob, and reserves what it needs; nil if
// there is nothing to do. Called with w.mu held.
func (w *clusterWorld) choose(rng *rand.Rand, ob *clusterObject) *clusterOp {
	op := &clusterOp{before: [2]*clusterSide{ob.sides[0].clone(), ob.sides[1].clone()}, floor: maps.Clone(w.maxToken)}
	pick := func(held map[string]crashHold, max int) []lockmgr.Resource {
		var free []string
		for _, p := range w.disks {
			if _, used := held[p]; !used && w.reserved[p] == "" {
				free = append(free, p)
			}
		}
		rng.Shuffle(len(free), func(i, j int) { free[i], free[j] = free[j], free[i] })
		free = free[:min(len(free), 1+rng.IntN(max))]
		rs := make([]lockmgr.Resource, len(free))
		for i, p := range free {
			rs[i] = lockmgr.DiskResource(p, randomMode(rng))
			w.acquiring[p]++
		}
		return rs
	}
	s0, s1 := ob.sides[0], ob.sides[1]
	switch {
	case s0 == nil && s1 == nil:
		op.kind, op.host = cAcquire, rng.IntN(2)
		op.owner = w.owners[op.host][rng.IntN(clusterOwners)]
		if op.disks = pick(nil, 3); len(op.disks) == 0 {
			return nil
		}
		return op
	case s0 != nil && s1 != nil:
		// The destination joined: complete (the source releases first),
		// or cancel (the destination releases first).
		src, dst := ob.from, 1-ob.from
		if rng.IntN(2) == 0 {
			op.kind, op.host = cCompleteSrc, src
		} else {
			op.kind, op.host = cCancelDst, dst
		}
		return op
	}
	h := 0
	if s0 == nil {
		h = 1
	}
	s := ob.sides[h]
	op.host = h
	switch s.role {
	case sideTarget: // the source is gone
		op.kind = cCompleteDst
		return op
	case sideSource:
		switch n := rng.IntN(10); {
		case n < 6:
			op.kind, op.host = cJoin, 1-h
			op.owner = w.owners[1-h][rng.IntN(clusterOwners)]
			op.state = ob.state
			st, _, err := parseHolds(ob.state)
			if err != nil {
				w.failf("handover state %q of %s: %v", ob.state, ob.uuid, err)
				return nil
			}
			for _, p := range slices.Sorted(maps.Keys(st)) {
				m := st[p].mode
				if m == lockmgr.Exclusive {
					m = lockmgr.Shared
				}
				op.disks = append(op.disks, lockmgr.DiskResource(p, m))
			}
		case n < 8:
			op.kind = cCancelSrc
		default:
			op.kind = cCompleteSrc
		}
		return op
	}
	switch n := rng.IntN(100); {
	case n < 30:
		op.kind = cHotplug
		if op.disks = pick(s.holds, 2); len(op.disks) == 0 {
			return nil
		}
	case n < 50:
		op.kind = cUnplug
		held := slices.Sorted(maps.Keys(s.holds))
		rng.Shuffle(len(held), func(i, j int) { held[i], held[j] = held[j], held[i] })
		for _, p := range held[:1+rng.IntN(len(held))] {
			op.disks = append(op.disks, lockmgr.DiskResource(p, s.holds[p].mode))
		}
	case n < 65:
		op.kind = cRelease
	default:
		// As in crash_test.go: the handover of each disk is the object's
		// alone, so that the side that keeps it finds nobody else.
		var excl []string
		for p, hd := range s.holds {
			if hd.mode == lockmgr.Exclusive {
				if w.acquiring[p] > 0 {
					return nil
				}
				excl = append(excl, p)
			}
		}
		op.kind = cPrepare
		for _, p := range excl {
			w.reserved[p] = ob.uuid
		}
	}
	return op
}

// step makes one call on ob and records its outcome; false ends the
// client (an unexpected failure, recorded).
func (w *clusterWorld) step(ctxs [2]context.Context, cls [2]*api.Client, rng *rand.Rand, ob *clusterObject) bool {
	w.mu.Lock()
	op := w.choose(rng, ob)
	w.mu.Unlock()
	if op == nil {
		return true
	}
	ctx, cancel := context.WithTimeout(ctxs[op.host], 30*time.Second)
	defer cancel()
	c := cls[op.host]
	name := "crash-" + ob.uuid[len(ob.uuid)-4:]
	var reply string
	var err error
	switch op.kind {
	case cAcquire:
		reply, err = c.Acquire(ctx, lockmgr.Object{UUID: ob.uuid, Name: name, PID: op.owner.Process.Pid}, op.disks, "")
	case cHotplug:
		reply, err = c.Acquire(ctx, lockmgr.Object{UUID: ob.uuid, Name: name, PID: ob.sides[op.host].owner.Process.Pid}, op.disks, "")
	case cJoin:
		reply, err = c.Acquire(ctx, lockmgr.Object{UUID: ob.uuid, Name: name, PID: op.owner.Process.Pid}, nil, op.state)
	case cUnplug:
		reply, err = c.Release(ctx, ob.uuid, op.disks...)
	case cRelease:
		reply, err = c.Release(ctx, ob.uuid)
	case cPrepare:
		reply, err = c.MigratePrepare(ctx, ob.uuid, clusterHostNames[1-op.host])
	default:
		var res api.MigrateResult
		res, err = c.MigrateComplete(ctx, ob.uuid, op.kind == cCancelDst || op.kind == cCancelSrc)
		reply = res.State
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if op.kind == cAcquire || op.kind == cHotplug {
		for _, r := range op.disks {
			w.acquiring[r.Name]--
		}
	}
	switch {
	case err == nil:
		w.stats[op.kind.String()]++
		w.acknowledged(ob, op, reply)
	case errors.Is(err, lockmgr.ErrBusy) && (op.kind == cAcquire || op.kind == cHotplug || op.kind == cJoin):
		// Refused: nothing changed (checked after the next restart). A
		// join is refused busy while another object's exclusive request
		// for one of its shared disks is on its way on the same host.
		w.stats["busy"]++
	case errors.Is(err, lockmgr.ErrStaleState) && op.kind == cJoin:
		w.stats["stale handover state"]++ // another object was granted a disk of it since
	case w.killing.Load() && op.host == w.victim:
		ob.flight = op
	default:
		w.failf("%s of %s: %v", op, ob.uuid, err)
		return false
	}
	return true
}

// acknowledged applies a call a host answered to ob, checking the reply.
// Called with w.mu held.
func (w *clusterWorld) acknowledged(ob *clusterObject, op *clusterOp, reply string) {
	got, markers, err := parseHolds(reply)
	if err != nil {
		w.failf("%s of %s: reply %q: %v", op, ob.uuid, reply, err)
		return
	}
	side := ob.sides[op.host]
	before := map[string]crashHold{}
	if side != nil {
		before = maps.Clone(side.holds)
	}
	want := maps.Clone(before)
	var problems []string
	granted := func(rs []lockmgr.Resource) {
		for _, r := range rs {
			h, ok := got[r.Name]
			if !ok || h.mode != r.Mode {
				problems = append(problems, fmt.Sprintf("%s:%s not granted as asked", r.Name, r.Mode))
				continue
			}
			if err := checkGrant(op.floor, r.Name, h); err != nil {
				problems = append(problems, err.Error())
			}
			want[r.Name] = h
		}
	}
	switch op.kind {
	case cAcquire, cHotplug, cJoin:
		granted(op.disks)
	case cUnplug:
		want = map[string]crashHold{}
		for _, r := range op.disks {
			want[r.Name] = before[r.Name]
		}
	case cRelease, cCompleteSrc, cCancelDst:
		// The reply lists what was released.
	case cPrepare:
		// The handover state lists every hold as it was, and the destination.
		if len(markers) != 1 || markers[0].Resource.Name != clusterHostNames[1-op.host] {
			problems = append(problems, fmt.Sprintf("the handover state names no destination %s", clusterHostNames[1-op.host]))
		}
	case cCompleteDst, cCancelSrc:
		for p := range side.pending {
			g := got[p]
			if g.mode != lockmgr.Exclusive {
				problems = append(problems, fmt.Sprintf("%s is %s after the call, want exclusive", p, g.mode))
			} else if err := checkGrant(op.floor, p, g); err != nil {
				problems = append(problems, err.Error())
			}
			want[p] = g
		}
	}
	if !maps.Equal(got, want) {
		problems = append(problems, fmt.Sprintf("replied %s, want %s", holdsString(got), holdsString(want)))
	}
	if len(problems) > 0 {
		w.failf("%s of %s (before: %s): %s", op, ob.uuid, holdsString(before), strings.Join(problems, "; "))
	}
	// The model follows what the host answered.
	switch op.kind {
	case cAcquire:
		ob.sides[op.host] = &clusterSide{owner: op.owner, holds: want}
	case cHotplug:
		side.holds = want
	case cJoin:
		ob.sides[op.host] = &clusterSide{owner: op.owner, holds: want, role: sideTarget, pending: maps.Clone(ob.handover)}
	case cUnplug:
		for _, r := range op.disks {
			delete(side.holds, r.Name)
		}
		if len(side.holds) == 0 {
			ob.sides[op.host] = nil
		}
	case cRelease, cCompleteSrc, cCancelDst:
		ob.sides[op.host] = nil
	case cPrepare:
		side.role, side.pending = sideSource, map[string]bool{}
		for p, h := range side.holds {
			if h.mode == lockmgr.Exclusive {
				side.pending[p] = true
				side.holds[p] = crashHold{lockmgr.Shared, h.token}
			}
		}
		ob.from, ob.state, ob.handover = op.host, strings.TrimSpace(reply), maps.Clone(side.pending)
	case cCompleteDst, cCancelSrc:
		side.holds, side.role, side.pending = want, "", nil
	}
	for _, s := range ob.sides {
		if s != nil {
			for p, h := range s.holds {
				w.maxToken[p] = max(w.maxToken[p], h.token)
			}
		}
	}
	if (ob.sides[0] == nil || ob.sides[0].role == "") && (ob.sides[1] == nil || ob.sides[1].role == "") {
		w.endHandover(ob)
	}
}

// endHandover records that no handover of ob is in progress.
func (w *clusterWorld) endHandover(ob *clusterObject) {
	for p, u := range w.reserved {
		if u == ob.uuid {
			delete(w.reserved, p)
		}
	}
	ob.state, ob.handover = "", nil
}

// etcdHold is one holder key of a disk.
type etcdHold struct {
	disk, host, uuid string
}

// etcdHolds reads every holder key under the prefix at one revision, and
// says what is wrong with the exclusion they show: a disk with an
// exclusive holder and any other.
func (w *clusterWorld) etcdHolds(ctx context.Context) (map[etcdHold]crashHold, []string) {
	resp, err := w.etcd.Get(ctx, clusterPrefix+"res/", clientv3.WithPrefix())
	if err != nil {
		w.t.Fatalf("read the holder keys: %v", err)
	}
	holds := map[etcdHold]crashHold{}
	base := map[string][]string{}
	var problems []string
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		h, ok := parseHolderKey(k, kv.Value, kv.CreateRevision)
		if !ok {
			problems = append(problems, fmt.Sprintf("holder key %s: unreadable value %q", k, kv.Value))
			continue
		}
		if _, twice := holds[h.etcdHold]; twice {
			problems = append(problems, fmt.Sprintf("%s holds %s twice in etcd", h.uuid, h.disk))
		}
		holds[h.etcdHold] = h.crashHold
		base[h.disk] = append(base[h.disk], fmt.Sprintf("%s:%s:%d by %s on %s", k[strings.LastIndexByte(k[:len(k)-1], '/')+1:], h.mode, h.token, h.uuid, h.host))
	}
	for disk, ks := range base {
		if msg := exclusionBroken(ks); msg != "" {
			problems = append(problems, fmt.Sprintf("etcd at revision %d: %s is held %s", resp.Header.Revision, disk, msg))
		}
	}
	return holds, problems
}

// holderKey is one holder key as the test reads it.
type holderKey struct {
	etcdHold
	crashHold
}

// parseHolderKey reads a holder key's value (etcdlock/keys.go, record): the
// resource, the holder and, for a converted grant, its token; the mode is
// the key's ("e" exclusive, "s/..." shared).
func parseHolderKey(key string, value []byte, createRev int64) (holderKey, bool) {
	var rec struct {
		Resource lockmgr.Resource `json:"resource"`
		Holder   lockmgr.Holder   `json:"holder"`
		Token    uint64           `json:"token"`
	}
	if err := json.Unmarshal(value, &rec); err != nil {
		return holderKey{}, false
	}
	mode := lockmgr.Shared
	if strings.HasSuffix(key, "/e") {
		mode = lockmgr.Exclusive
	}
	tok := rec.Token
	if tok == 0 {
		tok = uint64(createRev)
	}
	if rec.Resource.Mode != mode {
		mode = lockmgr.Mode(99) // a record that disagrees with its key: matches nothing
	}
	return holderKey{etcdHold{rec.Resource.Name, rec.Holder.Host, rec.Holder.UUID}, crashHold{mode, tok}}, true
}

// exclusionBroken says how a disk's holder keys (each "e:..." or
// "s/...") break exclusion, or "".
func exclusionBroken(keys []string) string {
	excl := slices.ContainsFunc(keys, func(k string) bool { return strings.HasPrefix(k, "e:") })
	if excl && len(keys) > 1 {
		slices.Sort(keys)
		return "exclusively and by another at once: " + strings.Join(keys, ", ")
	}
	return ""
}

// checkEtcd checks the holder keys in etcd against the model: exclusion,
// every acknowledged hold (but read-only ones, which take no key) with its
// mode and token, and no key of a hold that no host acknowledged. The
// holds of an object whose call was cut short are left out unless exact.
func (w *clusterWorld) checkEtcd(when string, exact bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	holds, problems := w.etcdHolds(ctx)
	for _, p := range problems {
		w.failf("%s: %s", when, p)
	}
	uncertain := map[string]bool{}
	want := map[etcdHold]crashHold{}
	for _, ob := range w.cobjs {
		if ob.flight != nil && !exact {
			uncertain[ob.uuid] = true
			continue
		}
		for h, s := range ob.sides {
			for p, hd := range s.heldOrNil() {
				if hd.mode != lockmgr.ReadOnly {
					want[etcdHold{p, clusterHostNames[h], ob.uuid}] = hd
				}
			}
		}
	}
	for k, g := range holds {
		if uncertain[k.uuid] {
			continue
		}
		if wh, ok := want[k]; !ok {
			w.failf("%s: etcd has a holder key of %s for %s on %s (%s, token %d) that no host acknowledged", when, k.disk, k.uuid, k.host, g.mode, g.token)
		} else if wh != g {
			w.failf("%s: etcd holds %s for %s on %s %s with token %d, acknowledged %s with token %d", when, k.disk, k.uuid, k.host, g.mode, g.token, wh.mode, wh.token)
		}
	}
	for k, wh := range want {
		if _, ok := holds[k]; !ok {
			w.failf("%s: etcd has no holder key of %s for %s on %s, acknowledged %s with token %d", when, k.disk, k.uuid, k.host, wh.mode, wh.token)
		}
	}
}

// watchExclusive checks exclusion at every revision of etcd from now on,
// by a watch of the holder keys, until stop is called.
func (w *clusterWorld) watchExclusive() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	prefix := clusterPrefix + "res/"
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			resp, err := w.etcd.Get(ctx, prefix, clientv3.WithPrefix())
			if err != nil {
				continue
			}
			keys := map[string]holderKey{}
			for _, kv := range resp.Kvs {
				h, _ := parseHolderKey(string(kv.Key), kv.Value, kv.CreateRevision)
				keys[string(kv.Key)] = h
			}
			w.followWatch(ctx, prefix, resp.Header.Revision, keys)
		}
	}()
	return func() { cancel(); <-done }
}

// followWatch applies the watch's events to keys one revision at a time,
// checking exclusion after each; it returns when the watch ends (a
// compaction makes the caller read the keys again).
func (w *clusterWorld) followWatch(ctx context.Context, prefix string, rev int64, keys map[string]holderKey) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	check := func(rev int64, touched map[string]bool) {
		byDisk := map[string][]string{}
		for k, h := range keys {
			if d := diskBase(k); touched[d] {
				byDisk[d] = append(byDisk[d], fmt.Sprintf("%s:%s:%d by %s on %s", k[len(d):], h.mode, h.token, h.uuid, h.host))
			}
		}
		for d, ks := range byDisk {
			if msg := exclusionBroken(ks); msg != "" {
				w.watchMu.Lock()
				w.watchFailures = append(w.watchFailures, fmt.Sprintf("etcd at revision %d: %s is held %s", rev, d, msg))
				w.watchMu.Unlock()
			}
		}
		w.revisions.Add(1)
	}
	for wr := range w.etcd.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
		if wr.Err() != nil {
			return
		}
		touched := map[string]bool{}
		cur := int64(0)
		for _, ev := range wr.Events {
			if ev.Kv.ModRevision != cur && cur != 0 {
				check(cur, touched)
				touched = map[string]bool{}
			}
			cur = ev.Kv.ModRevision
			k := string(ev.Kv.Key)
			touched[diskBase(k)] = true
			if ev.Type == clientv3.EventTypeDelete {
				delete(keys, k)
			} else {
				h, _ := parseHolderKey(k, ev.Kv.Value, ev.Kv.CreateRevision)
				keys[k] = h
			}
		}
		if cur != 0 {
			check(cur, touched)
		}
	}
}

// diskBase returns the prefix of a holder key that all holder keys of its
// resource share: P res/K/.
func diskBase(key string) string {
	if strings.HasSuffix(key, "/e") {
		return key[:len(key)-1]
	}
	if i := strings.LastIndex(key, "/s/"); i >= 0 {
		return key[:i+1]
	}
	return key
}

// killOwners kills one owner process of the victim host, or none, while its
// vmlockd is down: reaped at once, or (a zombie) only once vmlockd is back.
func (w *clusterWorld) killOwners(rng *rand.Rand) (killed map[*exec.Cmd]bool, zombies []*exec.Cmd) {
	killed = map[*exec.Cmd]bool{}
	if rng.IntN(2) == 0 {
		return killed, nil
	}
	i := rng.IntN(clusterOwners)
	o := w.owners[w.victim][i]
	o.Process.Kill()
	if rng.IntN(2) == 0 {
		o.Wait()
		w.stats["owners killed while down"]++
	} else {
		// Dead, not reaped: its pid and /proc entry stay until after the
		// restart.
		zombies = append(zombies, o)
		w.stats["owners killed while down, zombies at the restart"]++
	}
	killed[o] = true
	w.owners[w.victim][i] = w.newOwner()
	return killed, zombies
}

// checkAfterRestart checks both hosts and etcd against the model after the
// victim's restart, settles the migrations whose call was cut short, and
// makes the model what the hosts hold.
func (w *clusterWorld) checkAfterRestart(killed map[*exec.Cmd]bool, rng *rand.Rand) {
	t := w.t
	v := w.victim
	if l := w.sessionLease(v); l != w.leases[v] {
		w.failf("%s restarted within the TTL with session lease %s, not its own %s", clusterHostNames[v], l, w.leases[v])
	}
	if w.hosts[v].fenced() {
		w.failf("%s fenced itself across a restart within the TTL", clusterHostNames[v])
	}
	for h := range w.owners {
		for _, o := range w.owners[h] {
			if syscall.Kill(o.Process.Pid, 0) != nil || isZombie(o.Process.Pid) {
				w.failf("owner %d of %s died across the restart of %s, not killed by the test", o.Process.Pid, clusterHostNames[h], clusterHostNames[v])
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cls := [2]*api.Client{w.hosts[0].client(), w.hosts[1].client()}
	defer cls[0].Close()
	defer cls[1].Close()
	inquire := func(h int, uuid string) map[string]crashHold {
		st, err := cls[h].Inquire(ctx, uuid)
		switch {
		case errors.Is(err, lockmgr.ErrNotRegistered):
			return nil
		case err != nil:
			t.Fatalf("inquire %s on %s after the restart: %v", uuid, clusterHostNames[h], err)
		}
		got, _, err := parseHolds(st)
		if err != nil {
			t.Fatalf("inquire %s on %s after the restart: %q: %v", uuid, clusterHostNames[h], st, err)
		}
		return got
	}
	for _, ob := range w.cobjs {
		var got [2]map[string]crashHold
		for h := range got {
			got[h] = inquire(h, ob.uuid)
			owner := ob.sides[h].ownerOrNil()
			if op := ob.flight; op != nil && op.host == h && owner == nil {
				owner = op.owner // an acquire or join cut short
			}
			if got[h] != nil && owner != nil && killed[owner] {
				// A zombie at the restart: its pidfd says it exited.
				waitUntil(t, 10*time.Second, ob.uuid+" of a killed owner released", func() bool { return inquire(h, ob.uuid) == nil })
				got[h] = nil
			}
		}
		w.checkObject(ob, got, killed)
	}
	for _, ob := range w.cobjs {
		if op := ob.flight; op != nil {
			ob.flight = nil
			if op.kind.migration() {
				w.settle(ctx, cls, ob, op, rng, inquire)
			}
		}
	}
	w.checkTables(ctx, cls)
	w.checkEtcd("after the restart of "+clusterHostNames[v], true)
}

// checkObject checks what both hosts hold of ob after the restart, got (nil:
// not registered), and makes it the model (ob.flight is settled later).
func (w *clusterWorld) checkObject(ob *clusterObject, got [2]map[string]crashHold, killed map[*exec.Cmd]bool) {
	op := ob.flight
	for h := range got {
		s := ob.sides[h]
		mine := op != nil && op.host == h
		gone := s != nil && killed[s.owner] || mine && (op.kind == cAcquire || op.kind == cJoin) && killed[op.owner]
		var problem string
		switch {
		case gone:
			if got[h] != nil {
				problem = "its owner exited while vmlockd was down, yet it is registered"
			}
		case !mine:
			if !sameHolds(got[h], s.heldOrNil()) {
				problem = "acknowledged " + holdsString(s.heldOrNil())
			}
		default:
			problem = w.checkFlight(op.crashOp(), got[h])
			made := "not made"
			if !sameHolds(got[h], s.heldOrNil()) {
				made = "made"
			}
			w.stats[fmt.Sprintf("cut short, %s: %s", made, op.kind)]++
		}
		if problem != "" {
			w.failf("after the restart %s holds %s on %s: %s", ob.uuid, holdsString(got[h]), clusterHostNames[h], problem)
		}
		if got[h] == nil {
			ob.sides[h] = nil
			continue
		}
		if s == nil {
			if !mine {
				continue // recorded above
			}
			s = &clusterSide{owner: op.owner} // the call cut short made it
			ob.sides[h] = s
		}
		s.holds = got[h]
		for p, hd := range got[h] {
			w.maxToken[p] = max(w.maxToken[p], hd.token)
		}
	}
	if (ob.sides[0] == nil || ob.sides[0].role == "") && (ob.sides[1] == nil || ob.sides[1].role == "") && op == nil {
		w.endHandover(ob)
	}
}

// settle ends a migration whose call was cut short by the kill: what marks
// the hosts kept is not known, so the test completes it if the destination
// holds the object and the source released or a coin says so, else cancels
// it. Either way every disk of the handover ends held exclusively by the
// side that keeps the object, and the other side holds nothing.
func (w *clusterWorld) settle(ctx context.Context, cls [2]*api.Client, ob *clusterObject, op *clusterOp, rng *rand.Rand,
	inquire func(int, string) map[string]crashHold) {
	src := op.host
	if op.kind == cJoin || op.kind == cCompleteDst || op.kind == cCancelDst {
		src = 1 - op.host
	}
	dst := 1 - src
	handover := maps.Clone(ob.handover)
	if op.kind == cPrepare {
		handover = map[string]bool{}
		for p, h := range op.before[src].heldOrNil() {
			if h.mode == lockmgr.Exclusive {
				handover[p] = true
			}
		}
	}
	floor := maps.Clone(w.maxToken)
	type call struct {
		host   int
		cancel bool
	}
	var calls []call
	keep := src
	switch regS, regD := ob.sides[src] != nil, ob.sides[dst] != nil; {
	case regS && regD && rng.IntN(2) == 0, !regS && regD:
		calls, keep = []call{{src, false}, {dst, false}}, dst
	case regS:
		calls = []call{{dst, true}, {src, true}}
	}
	what := "migration cut short by the kill (" + op.String() + ")"
	for _, c := range calls {
		_, err := cls[c.host].MigrateComplete(ctx, ob.uuid, c.cancel)
		if err != nil && !errors.Is(err, lockmgr.ErrNotRegistered) { // no mark (kept) or no object (released) there
			w.failf("%s of %s: migrate complete (cancel %v) on %s: %v", what, ob.uuid, c.cancel, clusterHostNames[c.host], err)
		}
	}
	var got [2]map[string]crashHold
	for h := range got {
		got[h] = inquire(h, ob.uuid)
	}
	if calls != nil {
		w.stats[fmt.Sprintf("%s cut short, then ended on %s's side", op.kind, map[bool]string{true: "the source", false: "the destination"}[keep == src])]++
		if got[1-keep] != nil {
			w.failf("%s of %s: ended, yet %s, which gave it up, holds %s", what, ob.uuid, clusterHostNames[1-keep], holdsString(got[1-keep]))
		}
		for p := range handover {
			g, ok := got[keep][p]
			switch {
			case !ok || g.mode != lockmgr.Exclusive:
				w.failf("%s of %s: ended on %s, which holds %s %v (%s), want exclusive", what, ob.uuid, clusterHostNames[keep], p, ok, g.mode)
			case ob.sides[keep].holds[p].mode != lockmgr.Exclusive:
				if err := checkGrant(floor, p, g); err != nil {
					w.failf("%s of %s: %v", what, ob.uuid, err)
				}
			}
		}
	}
	for h := range got {
		if got[h] == nil {
			ob.sides[h] = nil
			continue
		}
		ob.sides[h].holds, ob.sides[h].role, ob.sides[h].pending = got[h], "", nil
		for p, hd := range got[h] {
			w.maxToken[p] = max(w.maxToken[p], hd.token)
		}
	}
	w.endHandover(ob)
}

// checkTables checks each host's lock monitor against the model.
func (w *clusterWorld) checkTables(ctx context.Context, cls [2]*api.Client) {
	type holder struct {
		mode lockmgr.Mode
		pid  int
	}
	for h, c := range cls {
		locks, err := c.Locks(ctx)
		if err != nil {
			w.t.Fatalf("locks on %s after the restart: %v", clusterHostNames[h], err)
		}
		want := map[string]map[string]holder{}
		tokens := map[string]uint64{}
		for _, ob := range w.cobjs {
			s := ob.sides[h]
			for p, hd := range s.heldOrNil() {
				if want[p] == nil {
					want[p] = map[string]holder{}
				}
				want[p][ob.uuid] = holder{hd.mode, s.owner.Process.Pid}
				tokens[p] = max(tokens[p], hd.token)
			}
		}
		listed := map[string]bool{}
		for _, l := range locks {
			p := l.Resource.Name
			listed[p] = true
			got := map[string]holder{}
			for _, x := range l.Holders {
				got[x.UUID] = holder{x.Mode, x.PID}
			}
			if l.Resource.Type != lockmgr.TypeDisk || !maps.Equal(got, want[p]) {
				w.failf("vmlock locks on %s shows %s %s held by %v, want %v", clusterHostNames[h], l.Resource.Type, p, got, want[p])
			}
			if l.Token != tokens[p] {
				w.failf("vmlock locks on %s shows %s with token %d, want %d", clusterHostNames[h], p, l.Token, tokens[p])
			}
		}
		for p := range want {
			if !listed[p] {
				w.failf("vmlock locks on %s does not show %s, held by %v", clusterHostNames[h], p, want[p])
			}
		}
	}
}
