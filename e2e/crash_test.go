package e2e

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockmgr"
)

// The crash test: vmlockd is killed (SIGKILL) at a random moment of a
// stream of operations by concurrent clients, restarted, and what it
// acknowledged before the kill is checked against what it holds after.
const (
	crashRounds  = 100 // kills and restarts
	crashClients = 3   // concurrent clients, each with its own objects
	crashSlots   = 2   // objects per client
	crashDisks   = 6   // disk images, shared by every client
	crashOwners  = 3   // owner processes the objects are registered for
	crashMaxOps  = 40  // operations before the kill, at most (a random number up to it)
	crashHost    = "crash-src"
	crashPeer    = "crash-dst" // a migration's destination (no vmlockd: the source's side is tested)
	crashSeedEnv = "VMLOCK_CRASH_SEED"
)

// crashHold is one resource as vmlockd acknowledged it for an object.
type crashHold struct {
	mode  lockmgr.Mode
	token uint64
}

// crashObject is what vmlockd acknowledged of one object. Only its client
// changes it while a round runs; the test reads it between rounds.
type crashObject struct {
	uuid    string
	owner   *exec.Cmd            // nil: not registered
	holds   map[string]crashHold // by disk path
	mark    bool                 // a source mark of `migrate prepare`
	pending map[string]bool      // what the mark takes back exclusively
	flight  *crashOp             // the call vmlockd was killed in, whose outcome is unknown
}

func (o *crashObject) clone() crashObject {
	c := *o
	c.holds = maps.Clone(o.holds)
	c.pending = maps.Clone(o.pending)
	c.flight = nil
	return c
}

type crashKind int

const (
	opAcquire  crashKind = iota // a new object, several disks, all or nothing
	opHotplug                   // more disks for a registered object, all or nothing
	opUnplug                    // a list of its disks
	opRelease                   // everything
	opPrepare                   // migrate prepare: exclusive holds become shared, pending
	opComplete                  // migrate complete on the source: release everything
	opCancel                    // migrate complete --cancel on the source: pending become exclusive
)

var crashKindNames = [...]string{"acquire", "hotplug", "unplug", "release", "migrate prepare", "migrate complete", "migrate cancel"}

func (k crashKind) String() string { return crashKindNames[k] }

// crashOp is one call: what it asked, and the object as it was before.
type crashOp struct {
	kind   crashKind
	disks  []lockmgr.Resource // acquire, hotplug, unplug
	owner  *exec.Cmd          // acquire
	before crashObject
	floor  map[string]uint64 // the greatest token acknowledged for each disk when the call began
}

func (op *crashOp) String() string {
	var b strings.Builder
	b.WriteString(op.kind.String())
	for _, r := range op.disks {
		fmt.Fprintf(&b, " %s:%s", r.Name, r.Mode)
	}
	return b.String()
}

// crashWorld is the test's model of vmlockd's table: the objects, the
// greatest token acknowledged for each disk, and which disks clients may
// ask for.
type crashWorld struct {
	t     *testing.T
	seed  uint64
	disks []string
	objs  []*crashObject

	mu        sync.Mutex
	owners    []*exec.Cmd
	maxToken  map[string]uint64
	reserved  map[string]string // disk -> uuid of the object handing it over (prepare .. complete)
	acquiring map[string]int    // disks in acquire calls in progress
	failures  []string
	round     int
	stats     map[string]int // what the test went through, logged at the end

	killing atomic.Bool // the kill is coming: errors may be the kill's
}

// failf records a violation; the round ends in a test failure.
func (w *crashWorld) failf(format string, args ...any) {
	w.failures = append(w.failures, fmt.Sprintf("round %d: ", w.round)+fmt.Sprintf(format, args...))
}

func (w *crashWorld) flush() {
	w.t.Helper()
	w.mu.Lock()
	fs := w.failures
	w.failures = nil
	w.mu.Unlock()
	if len(fs) > 0 {
		w.t.Fatalf("%s\n(seed %d: replay with %s=%d)", strings.Join(fs, "\n"), w.seed, crashSeedEnv, w.seed)
	}
}

func (w *crashWorld) newOwner() *exec.Cmd {
	w.t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// Every grant vmlockd acknowledged and did not release is held after a
// SIGKILL of vmlockd at any moment and its restart, with the same mode and
// token, in its table and on the image; nothing is locked that it does not
// list; a call in progress at the kill took effect wholly or not at all;
// tokens never go backwards; owners that exited while it was down are
// released.
func TestAKillAtAnyMomentLosesNoAcknowledgedLock(t *testing.T) {
	seed := crashSeed(t)
	d := startDaemon(t, "--host", crashHost)
	w := &crashWorld{t: t, seed: seed, disks: diskPaths(t, crashDisks),
		maxToken: map[string]uint64{}, reserved: map[string]string{}, acquiring: map[string]int{}, stats: map[string]int{}}
	for c := range crashClients {
		for s := range crashSlots {
			w.objs = append(w.objs, &crashObject{uuid: fmt.Sprintf("c0ffee00-0000-4000-8000-%06d%06d", c, s)})
		}
	}
	for range crashOwners {
		w.owners = append(w.owners, w.newOwner())
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	for round := range crashRounds {
		w.round = round
		w.runRound(d, rng.IntN(crashMaxOps+1))
		w.flush()
		w.checkWhileDown()
		w.flush()
		killed := w.killOwners(rng)
		d.start()
		w.checkAfterRestart(d, killed)
		w.flush()
	}
	t.Logf("%d rounds: %v", crashRounds, w.stats)
}

// crashSeed returns the seed of a crash test's random choices: the time, or
// the one VMLOCK_CRASH_SEED gives to replay a failure.
func crashSeed(t *testing.T) uint64 {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", crashSeedEnv, s, err)
		}
	}
	t.Logf("seed %d", seed)
	return seed
}

// runRound runs the clients until they have made kill operations between
// them, then kills vmlockd and waits for the clients to stop.
func (w *crashWorld) runRound(d *daemon, kill int) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w.runClients(crashClients, kill, func(c int) (func() bool, func()) {
		cl := d.client()
		rng := rand.New(rand.NewPCG(w.seed, uint64(1+w.round*crashClients+c)))
		return func() bool { return w.step(ctx, cl, rng, w.objs[c*crashSlots+rng.IntN(crashSlots)]) }, func() { cl.Close() }
	}, func() {
		d.kill9()
		// Calls not sent yet would wait for the next vmlockd: they end
		// here, before it starts.
		cancel()
	})
}

// runClients runs n clients at once, each making its next operation until
// that says stop or the kill is coming, and calls killNow once they have
// made kill operations between them (or all stopped first): not a timing.
// It returns once every client has stopped.
func (w *crashWorld) runClients(n, kill int, client func(c int) (next func() bool, closeClient func()), killNow func()) {
	w.killing.Store(false)
	var ops atomic.Int64
	var wg sync.WaitGroup
	done := make(chan struct{})
	for c := range n {
		next, closeClient := client(c)
		wg.Go(func() {
			defer closeClient()
			for !w.killing.Load() && next() {
				ops.Add(1)
			}
		})
	}
	go func() { wg.Wait(); close(done) }()
	for ops.Load() < int64(kill) {
		select {
		case <-done:
			kill = 0
		case <-time.After(time.Millisecond):
		}
	}
	w.killing.Store(true)
	killNow()
	<-done
	w.mu.Lock()
	clear(w.acquiring)
	w.mu.Unlock()
}

// randomMode is exclusive, shared or read-only.
func randomMode(rng *rand.Rand) lockmgr.Mode {
	switch n := rng.IntN(20); {
	case n < 9:
		return lockmgr.Exclusive
	case n < 17:
		return lockmgr.Shared
	}
	return lockmgr.ReadOnly
}

// choose picks the next call on ob, and reserves what it needs; nil if
// there is nothing to do. Called with w.mu held.
func (w *crashWorld) choose(rng *rand.Rand, ob *crashObject) *crashOp {
	op := &crashOp{before: ob.clone(), floor: maps.Clone(w.maxToken)}
	pick := func(max int) []lockmgr.Resource {
		var free []string
		for _, p := range w.disks {
			if _, used := ob.holds[p]; !used && w.reserved[p] == "" {
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
	if ob.owner == nil {
		op.kind, op.owner = opAcquire, w.owners[rng.IntN(len(w.owners))]
		if op.disks = pick(3); len(op.disks) == 0 {
			return nil
		}
		return op
	}
	switch n := rng.IntN(100); {
	case n < 30:
		op.kind = opHotplug
		if op.disks = pick(2); len(op.disks) == 0 {
			return nil
		}
	case n < 50:
		op.kind = opUnplug
		held := slices.Sorted(maps.Keys(ob.holds))
		rng.Shuffle(len(held), func(i, j int) { held[i], held[j] = held[j], held[i] })
		for _, p := range held[:1+rng.IntN(len(held))] {
			op.disks = append(op.disks, lockmgr.DiskResource(p, ob.holds[p].mode))
		}
	case n < 62:
		op.kind = opRelease
	case n < 80:
		// A disk being acquired by another object could be granted it
		// shared once the prepare made it shared: the handover of each
		// disk is the object's alone, so that the cancel finds nobody
		// else to wait for.
		var excl []string
		for p, h := range ob.holds {
			if h.mode == lockmgr.Exclusive {
				if w.acquiring[p] > 0 {
					return nil
				}
				excl = append(excl, p)
			}
		}
		op.kind = opPrepare
		for _, p := range excl {
			w.reserved[p] = ob.uuid
		}
	case !ob.mark:
		return nil
	case n < 88:
		op.kind = opComplete
	default:
		op.kind = opCancel
	}
	return op
}

// step makes one call on ob and records its outcome; false ends the
// client (an unexpected failure, recorded).
func (w *crashWorld) step(ctx context.Context, c *api.Client, rng *rand.Rand, ob *crashObject) bool {
	w.mu.Lock()
	op := w.choose(rng, ob)
	w.mu.Unlock()
	if op == nil {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var reply string
	var err error
	switch op.kind {
	case opAcquire:
		o := lockmgr.Object{UUID: ob.uuid, Name: "crash-" + ob.uuid[len(ob.uuid)-4:], PID: op.owner.Process.Pid}
		reply, err = c.Acquire(ctx, o, op.disks, "")
	case opHotplug:
		o := lockmgr.Object{UUID: ob.uuid, Name: "crash-" + ob.uuid[len(ob.uuid)-4:], PID: ob.owner.Process.Pid}
		reply, err = c.Acquire(ctx, o, op.disks, "")
	case opUnplug:
		reply, err = c.Release(ctx, ob.uuid, op.disks...)
	case opRelease:
		reply, err = c.Release(ctx, ob.uuid)
	case opPrepare:
		reply, err = c.MigratePrepare(ctx, ob.uuid, crashPeer)
	case opComplete, opCancel:
		var res api.MigrateResult
		res, err = c.MigrateComplete(ctx, ob.uuid, op.kind == opCancel)
		reply = res.State
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range op.disks {
		if op.kind == opAcquire || op.kind == opHotplug {
			w.acquiring[r.Name]--
		}
	}
	switch {
	case err == nil:
		w.stats[op.kind.String()]++
		w.acknowledged(ob, op, reply)
	case errors.Is(err, lockmgr.ErrBusy) && (op.kind == opAcquire || op.kind == opHotplug):
		// Refused: nothing changed (checked after the next restart).
		w.stats["busy"]++
	case w.killing.Load():
		ob.flight = op // the kill's, perhaps: it may or may not have been made
	default:
		w.failf("%s of %s: %v", op, ob.uuid, err)
		return false
	}
	return true
}

// parseHolds reads a state string as the holds it lists; marker entries
// (a handover's destination) are returned apart.
func parseHolds(s string) (map[string]crashHold, []lockmgr.StateEntry, error) {
	st, err := lockmgr.ParseState(strings.TrimSpace(s))
	if err != nil {
		return nil, nil, err
	}
	hs := map[string]crashHold{}
	var other []lockmgr.StateEntry
	for _, e := range st {
		if e.Resource.Type != lockmgr.TypeDisk {
			other = append(other, e)
			continue
		}
		if _, twice := hs[e.Resource.Name]; twice {
			return nil, nil, fmt.Errorf("%s is listed twice", e.Resource.Name)
		}
		hs[e.Resource.Name] = crashHold{e.Resource.Mode, e.Token}
	}
	return hs, other, nil
}

func holdsString(hs map[string]crashHold) string {
	if hs == nil {
		return "(not registered)"
	}
	var b strings.Builder
	for _, p := range slices.Sorted(maps.Keys(hs)) {
		fmt.Fprintf(&b, " %s:%s:%d", p, hs[p].mode, hs[p].token)
	}
	return "[" + strings.TrimSpace(b.String()) + "]"
}

// checkGrant checks that h, a new grant of disk (or an upgrade), has the
// token a new grant must have: above every token acknowledged for the disk
// before the call began; read-only uses have none.
func checkGrant(floor map[string]uint64, disk string, h crashHold) error {
	if h.mode == lockmgr.ReadOnly {
		if h.token != 0 {
			return fmt.Errorf("%s is read-only with token %d", disk, h.token)
		}
		return nil
	}
	if h.token <= floor[disk] {
		return fmt.Errorf("%s was granted token %d, not above %d, acknowledged before", disk, h.token, floor[disk])
	}
	return nil
}

// acknowledged applies a call vmlockd answered to ob, checking the reply.
// Called with w.mu held.
func (w *crashWorld) acknowledged(ob *crashObject, op *crashOp, reply string) {
	got, markers, err := parseHolds(reply)
	if err != nil {
		w.failf("%s of %s: reply %q: %v", op, ob.uuid, reply, err)
		return
	}
	want := maps.Clone(ob.holds)
	if want == nil {
		want = map[string]crashHold{}
	}
	var problems []string
	switch op.kind {
	case opAcquire, opHotplug:
		for _, r := range op.disks {
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
		if op.kind == opAcquire {
			ob.owner = op.owner
		}
	case opUnplug:
		want = map[string]crashHold{}
		for _, r := range op.disks {
			want[r.Name] = ob.holds[r.Name]
		}
	case opRelease, opComplete:
	case opPrepare:
		// The handover state: every hold with its token, the pending ones
		// in their original mode, exclusive, and the destination.
		if len(markers) != 1 || markers[0].Resource.Name != crashPeer {
			problems = append(problems, fmt.Sprintf("the handover state names no destination %s", crashPeer))
		}
	case opCancel:
		for p := range ob.pending {
			h, ok := ob.holds[p]
			if !ok || h.mode == lockmgr.Exclusive {
				continue
			}
			if g := got[p]; g.mode != lockmgr.Exclusive {
				problems = append(problems, fmt.Sprintf("%s is %s after the cancel, want exclusive", p, g.mode))
			} else if err := checkGrant(op.floor, p, g); err != nil {
				problems = append(problems, err.Error())
			} else {
				want[p] = g
			}
		}
	}
	if op.kind != opPrepare && !maps.Equal(got, want) {
		problems = append(problems, fmt.Sprintf("replied %s, want %s", holdsString(got), holdsString(want)))
	}
	if op.kind == opPrepare {
		shown := maps.Clone(want)
		for p, h := range shown {
			if h.mode == lockmgr.Exclusive || ob.pending[p] {
				shown[p] = crashHold{lockmgr.Exclusive, h.token}
			}
		}
		if !maps.Equal(got, shown) {
			problems = append(problems, fmt.Sprintf("handover state %s, want %s", holdsString(got), holdsString(shown)))
		}
	}
	if len(problems) > 0 {
		w.failf("%s of %s (before: %s): %s", op, ob.uuid, holdsString(ob.holds), strings.Join(problems, "; "))
	}
	// The model follows what vmlockd answered.
	switch op.kind {
	case opAcquire, opHotplug:
		ob.holds = want
	case opUnplug:
		for _, r := range op.disks {
			delete(ob.holds, r.Name)
			delete(ob.pending, r.Name)
			w.unreserve(ob, r.Name)
		}
		if len(ob.holds) == 0 {
			w.forget(ob)
		}
	case opRelease, opComplete:
		w.forget(ob)
	case opPrepare:
		ob.mark = true
		if ob.pending == nil {
			ob.pending = map[string]bool{}
		}
		for p, h := range ob.holds {
			if h.mode == lockmgr.Exclusive {
				ob.pending[p] = true
				ob.holds[p] = crashHold{lockmgr.Shared, h.token}
			}
		}
	case opCancel:
		ob.holds = want
		for p := range ob.pending {
			w.unreserve(ob, p)
		}
		ob.mark, ob.pending = false, nil
	}
	for p, h := range ob.holds {
		w.maxToken[p] = max(w.maxToken[p], h.token)
	}
}

func (w *crashWorld) unreserve(ob *crashObject, p string) {
	if w.reserved[p] == ob.uuid {
		delete(w.reserved, p)
	}
}

// forget records that ob is no longer registered.
func (w *crashWorld) forget(ob *crashObject) {
	for p, u := range w.reserved {
		if u == ob.uuid {
			delete(w.reserved, p)
		}
	}
	ob.owner, ob.holds, ob.mark, ob.pending = nil, nil, false, nil
}

// checkLocked checks what another process sees of disk, held in mode
// (exclusive or shared; read-only: not locked), and says what is wrong.
func checkLocked(t *testing.T, disk string, mode lockmgr.Mode) string {
	read, write := probe(t, disk, unix.F_RDLCK), probe(t, disk, unix.F_WRLCK)
	switch {
	case mode == lockmgr.Exclusive && (read || write):
		return fmt.Sprintf("%s is held exclusively, yet another process could take a read lock %v, a write lock %v", disk, read, write)
	case mode == lockmgr.Shared && (!read || write):
		return fmt.Sprintf("%s is held shared, yet another process could take a read lock %v, a write lock %v", disk, read, write)
	case mode == lockmgr.ReadOnly && !write:
		return fmt.Sprintf("%s is held by nobody (or read-only), yet another process cannot take a write lock on it: an orphan lock", disk)
	}
	return ""
}

// checkWhileDown checks, with vmlockd dead, that every acknowledged hold of
// an object whose call was not cut short is still locked.
func (w *crashWorld) checkWhileDown() {
	strongest := map[string]lockmgr.Mode{}
	for _, ob := range w.objs {
		if ob.flight != nil {
			continue
		}
		for p, h := range ob.holds {
			if m, ok := strongest[p]; !ok || h.mode < m {
				strongest[p] = h.mode
			}
		}
	}
	for p, m := range strongest {
		if m == lockmgr.ReadOnly {
			continue
		}
		if msg := checkLocked(w.t, p, m); msg != "" {
			w.failf("while vmlockd was down: %s", msg)
		}
	}
}

// killOwners kills (and reaps) one owner process, or none, while vmlockd
// is down; it returns those killed.
func (w *crashWorld) killOwners(rng *rand.Rand) map[*exec.Cmd]bool {
	killed := map[*exec.Cmd]bool{}
	if rng.IntN(2) == 0 {
		return killed
	}
	i := rng.IntN(len(w.owners))
	o := w.owners[i]
	o.Process.Kill()
	o.Wait()
	killed[o] = true
	w.stats["owners killed while down"]++
	w.owners[i] = w.newOwner()
	return killed
}

// checkAfterRestart checks the restarted vmlockd against the model, then
// makes the model what vmlockd holds (calls cut short by the kill are
// settled one way or the other).
func (w *crashWorld) checkAfterRestart(d *daemon, killed map[*exec.Cmd]bool) {
	t := w.t
	c := d.client()
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, ob := range w.objs {
		st, err := c.Inquire(ctx, ob.uuid)
		var got map[string]crashHold
		switch {
		case errors.Is(err, lockmgr.ErrNotRegistered):
		case err != nil:
			t.Fatalf("inquire %s after the restart: %v", ob.uuid, err)
		default:
			if got, _, err = parseHolds(st); err != nil {
				t.Fatalf("inquire %s after the restart: %q: %v", ob.uuid, st, err)
			}
		}
		w.checkObject(ctx, c, ob, got, killed)
	}
	w.checkTable(ctx, c)
}

// checkObject checks what vmlockd holds for ob after the restart, got (nil:
// not registered), and makes it the model.
func (w *crashWorld) checkObject(ctx context.Context, c *api.Client, ob *crashObject, got map[string]crashHold, killed map[*exec.Cmd]bool) {
	op := ob.flight
	ob.flight = nil
	ownerGone := ob.owner != nil && killed[ob.owner] || op != nil && op.kind == opAcquire && killed[op.owner]
	var problem string
	switch {
	case ownerGone:
		if got != nil {
			problem = "its owner exited while vmlockd was down, yet it is registered"
		}
	case op == nil:
		if !sameHolds(got, ob.holds) {
			problem = "acknowledged " + holdsString(ob.holds)
		}
	default:
		problem = w.checkFlight(op, got)
		made := "not made"
		if !sameHolds(got, op.before.holds) {
			made = "made"
		}
		w.stats[fmt.Sprintf("cut short, %s: %s", made, op.kind)]++
	}
	if problem != "" {
		w.failf("after the restart %s holds %s: %s", ob.uuid, holdsString(got), problem)
	}
	if got == nil {
		w.forget(ob)
		return
	}
	if op != nil && op.kind == opAcquire {
		ob.owner = op.owner
	}
	ob.holds = got
	for p := range ob.pending {
		if _, ok := got[p]; !ok {
			delete(ob.pending, p)
		}
	}
	for p, h := range got {
		w.maxToken[p] = max(w.maxToken[p], h.token)
	}
	if op != nil && (op.kind == opPrepare || op.kind == opCancel) {
		w.settleMark(ctx, c, ob, op)
	}
}

// sameHolds compares holds, nil (not registered) with nil only.
func sameHolds(a, b map[string]crashHold) bool {
	return (a == nil) == (b == nil) && maps.Equal(a, b)
}

// checkFlight checks that got is what vmlockd may hold after a call cut
// short by the kill: the call made wholly or not at all (a handover's
// conversions one disk at a time), and says what is wrong.
func (w *crashWorld) checkFlight(op *crashOp, got map[string]crashHold) string {
	before := op.before.holds
	what := fmt.Sprintf("the call %s cut short by the kill was made in part (before it: %s)", op, holdsString(before))
	if sameHolds(got, before) {
		return ""
	}
	switch op.kind {
	case opAcquire, opHotplug:
		if got == nil {
			return what
		}
		after := maps.Clone(before)
		if after == nil {
			after = map[string]crashHold{}
		}
		for _, r := range op.disks {
			h, ok := got[r.Name]
			if !ok || h.mode != r.Mode {
				return what
			}
			if err := checkGrant(op.floor, r.Name, h); err != nil {
				return err.Error()
			}
			after[r.Name] = h
		}
		if !maps.Equal(got, after) {
			return what
		}
	case opUnplug:
		after := maps.Clone(before)
		for _, r := range op.disks {
			delete(after, r.Name)
		}
		if len(after) == 0 {
			after = nil
		}
		if !sameHolds(got, after) {
			return what
		}
	case opRelease, opComplete:
		if got != nil {
			return what
		}
	case opPrepare, opCancel:
		// Each disk of the handover converted or not.
		if got == nil || len(got) != len(before) {
			return what
		}
		for p, b := range before {
			g, ok := got[p]
			switch {
			case !ok:
				return what
			case g == b:
			case op.kind == opPrepare && b.mode == lockmgr.Exclusive && g == crashHold{lockmgr.Shared, b.token}:
			case op.kind == opCancel && op.before.pending[p] && b.mode == lockmgr.Shared && g.mode == lockmgr.Exclusive:
				if err := checkGrant(op.floor, p, g); err != nil {
					return err.Error()
				}
			default:
				return what
			}
		}
	}
	return ""
}

// settleMark settles the mark of an object whose prepare or cancel was cut
// short: whether vmlockd kept a mark is not known, so the test cancels the
// handover. Either the cancel takes every disk of the handover back
// exclusively, or there is no mark and every one is exclusive already: a
// disk left shared with no mark to take it back would be handed over
// shared by the next prepare.
func (w *crashWorld) settleMark(ctx context.Context, c *api.Client, ob *crashObject, op *crashOp) {
	handover := maps.Clone(op.before.pending)
	if handover == nil {
		handover = map[string]bool{}
	}
	if op.kind == opPrepare {
		for p, h := range op.before.holds {
			if h.mode == lockmgr.Exclusive {
				handover[p] = true
			}
		}
	}
	floor := maps.Clone(w.maxToken)
	res, err := c.MigrateComplete(ctx, ob.uuid, true)
	switch {
	case errors.Is(err, lockmgr.ErrNotRegistered):
		for p := range handover {
			if h, ok := ob.holds[p]; ok && h.mode != lockmgr.Exclusive {
				w.failf("after the restart %s holds %s %s, part of the handover of the call %s cut short by the kill, with no migration mark to take it back",
					ob.uuid, p, h.mode, op)
			}
		}
	case err != nil:
		w.failf("migrate cancel of %s after the restart (its %s was cut short by the kill): %v", ob.uuid, op, err)
	default:
		got, _, err := parseHolds(res.State)
		if err != nil {
			w.failf("migrate cancel of %s after the restart: %q: %v", ob.uuid, res.State, err)
			break
		}
		want := maps.Clone(ob.holds)
		for p := range handover {
			h, ok := ob.holds[p]
			if !ok || h.mode == lockmgr.Exclusive {
				continue
			}
			g := got[p]
			if g.mode != lockmgr.Exclusive {
				w.failf("migrate cancel of %s after the restart left %s %s", ob.uuid, p, g.mode)
			} else if err := checkGrant(floor, p, g); err != nil {
				w.failf("migrate cancel of %s after the restart: %v", ob.uuid, err)
			}
			want[p] = g
		}
		if !maps.Equal(got, want) {
			w.failf("migrate cancel of %s after the restart: holds %s, want %s", ob.uuid, holdsString(got), holdsString(want))
		}
		ob.holds = got
		for p, h := range got {
			w.maxToken[p] = max(w.maxToken[p], h.token)
		}
	}
	for p := range handover {
		w.unreserve(ob, p)
	}
	ob.mark, ob.pending = false, nil
}

// checkTable checks vmlockd's lock monitor against the model, and every
// disk as another process sees it against both: nothing listed is free,
// nothing free is listed, nothing locked is unlisted.
func (w *crashWorld) checkTable(ctx context.Context, c *api.Client) {
	t := w.t
	locks, err := c.Locks(ctx)
	if err != nil {
		t.Fatalf("locks after the restart: %v", err)
	}
	type holder struct {
		mode lockmgr.Mode
		pid  int
	}
	want := map[string]map[string]holder{}
	tokens := map[string]uint64{}
	for _, ob := range w.objs {
		for p, h := range ob.holds {
			if want[p] == nil {
				want[p] = map[string]holder{}
			}
			want[p][ob.uuid] = holder{h.mode, ob.owner.Process.Pid}
			tokens[p] = max(tokens[p], h.token)
		}
	}
	listed := map[string]bool{}
	for _, l := range locks {
		p := l.Resource.Name
		listed[p] = true
		got := map[string]holder{}
		for _, h := range l.Holders {
			got[h.UUID] = holder{h.Mode, h.PID}
		}
		if l.Resource.Type != lockmgr.TypeDisk || !maps.Equal(got, want[p]) {
			w.failf("vmlock locks shows %s %s held by %v, want %v", l.Resource.Type, p, got, want[p])
		}
		if l.Token != tokens[p] {
			w.failf("vmlock locks shows %s with token %d, want %d", p, l.Token, tokens[p])
		}
	}
	for p := range want {
		if !listed[p] {
			w.failf("vmlock locks does not show %s, held by %v", p, want[p])
		}
	}
	for _, p := range w.disks {
		m := lockmgr.ReadOnly
		for _, h := range want[p] {
			m = min(m, h.mode)
		}
		if msg := checkLocked(t, p, m); msg != "" {
			w.failf("after the restart: %s", msg)
		}
	}
}
