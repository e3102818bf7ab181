package lockspace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

var ctx = context.Background()

// holdIn starts a helper process holding reqs and waits until it does.
func holdIn(t *testing.T, e *env, reqs ...lockmgr.Request) *helper {
	t.Helper()
	h := spawn(t, helperArgs{Mode: "hold", Cfg: e.cfg, Reqs: reqs})
	h.expect("ok")
	return h
}

func wantCode(t *testing.T, err error, c lockmgr.Code) {
	t.Helper()
	if got := lockmgr.CodeOf(err); got != c {
		t.Fatalf("error %v: code %v, want %v", err, got, c)
	}
}

// assertFree checks from another process that r is not locked; a lease
// file must even be gone.
func assertFree(t *testing.T, e *env, k kind, r lockmgr.Resource) {
	t.Helper()
	want := "free"
	if k.file {
		want = "absent"
	}
	if got := probe(t, e.lockPath(r)); got != want {
		t.Fatalf("%s: probe says %q, want %q", r, got, want)
	}
}

func TestConflicts(t *testing.T) {
	X, S := lockmgr.Exclusive, lockmgr.Shared
	modes := []struct {
		held, want lockmgr.Mode
		busy       bool
	}{
		{X, X, true},
		{S, S, false},
		{S, X, true},
		{X, S, true},
	}
	for _, k := range allKinds() {
		for _, m := range modes {
			t.Run(fmt.Sprintf("%s/%s-vs-%s", k.name, m.held, m.want), func(t *testing.T) {
				e := newEnv(t, k.indirect)
				d := e.driver(t)
				held := k.res(t, e, 0, m.held)
				h := holdIn(t, e, lockmgr.Request{Resource: held, Holder: otherHolder(m.held)})
				r := held
				r.Mode = m.want
				ls, err := d.Acquire(ctx, reqsOf(myHolder(m.want), r))
				if !m.busy {
					if err != nil {
						t.Fatalf("%s while another process holds it %s: %v", m.want, m.held, err)
					}
					if err := d.Release(ctx, ls); err != nil {
						t.Fatal(err)
					}
					h.release()
					if k.file { // the helper was the last holder
						assertFree(t, e, k, r)
					}
					return
				}
				var be *lockmgr.BusyError
				if !errors.As(err, &be) || !errors.Is(err, lockmgr.ErrBusy) {
					t.Fatalf("got %v (%T), want a BusyError", err, err)
				}
				want := otherHolder(m.held)
				want.PID = h.pid()
				got := be.Holder
				if got.Name != want.Name || got.UUID != want.UUID || got.Host != want.Host || got.PID != want.PID ||
					got.Mode != m.held || got.Foreign || got.Since.IsZero() {
					t.Fatalf("busy error names %+v, want %+v (with a grant time)", got, want)
				}
				if be.Resource.Key() != r.Key() {
					t.Fatalf("busy error names %s, want %s", be.Resource, r)
				}
				if !strings.Contains(err.Error(), want.UUID) {
					t.Fatalf("busy message %q does not name the holder", err)
				}
				h.release()
				ls, err = d.Acquire(ctx, reqsOf(myHolder(m.want), r))
				if err != nil {
					t.Fatalf("after the holder released: %v", err)
				}
				if err := d.Release(ctx, ls); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestForeignPOSIXLock(t *testing.T) {
	for _, k := range allKinds()[:3] {
		for _, m := range []lockmgr.Mode{lockmgr.Exclusive, lockmgr.Shared} {
			t.Run(k.name+"/"+m.String(), func(t *testing.T) {
				e := newEnv(t, k.indirect)
				d := e.driver(t)
				r := k.res(t, e, 0, m)
				p := e.lockPath(r)
				if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
					t.Fatal(err)
				}
				h := spawn(t, helperArgs{Mode: "posix", Path: p})
				h.expect("ok")
				_, err := d.Acquire(ctx, reqsOf(myHolder(m), r))
				var be *lockmgr.BusyError
				if !errors.As(err, &be) {
					t.Fatalf("got %v, want a BusyError", err)
				}
				if !be.Holder.Foreign || be.Holder.PID != h.pid() || be.Holder.Mode != lockmgr.Exclusive {
					t.Fatalf("busy error names %+v, want the foreign pid %d holding it exclusively", be.Holder, h.pid())
				}
				if !strings.Contains(err.Error(), "pid "+strconv.Itoa(h.pid())) {
					t.Fatalf("busy message %q does not name pid %d", err, h.pid())
				}
				h.stop(false)
				ls, err := d.Acquire(ctx, reqsOf(myHolder(m), r))
				if err != nil {
					t.Fatalf("after the foreign lock went away: %v", err)
				}
				if err := d.Release(ctx, ls); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestAllOrNothing(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d := e.driver(t)
			rs := []lockmgr.Resource{k.res(t, e, 0, lockmgr.Exclusive), k.res(t, e, 1, lockmgr.Shared), k.res(t, e, 2, lockmgr.Exclusive)}
			h := holdIn(t, e, lockmgr.Request{Resource: rs[2], Holder: otherHolder(lockmgr.Exclusive)})
			_, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), rs...))
			var be *lockmgr.BusyError
			if !errors.As(err, &be) || be.Resource.Key() != rs[2].Key() {
				t.Fatalf("got %v, want a BusyError naming %s", err, rs[2])
			}
			for _, r := range rs[:2] {
				assertFree(t, e, k, r)
			}
			h.release()
		})
	}
}

// errAfter is a context whose Err starts failing after n calls: it expires
// between two resources of one Acquire.
type errAfter struct {
	context.Context
	n int
}

func (c *errAfter) Err() error {
	if c.n--; c.n < 0 {
		return context.DeadlineExceeded
	}
	return nil
}

func TestContextDoneBetweenResources(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d := e.driver(t)
			rs := []lockmgr.Resource{k.res(t, e, 0, lockmgr.Exclusive), k.res(t, e, 1, lockmgr.Exclusive)}
			_, err := d.Acquire(&errAfter{Context: ctx, n: 1}, reqsOf(myHolder(lockmgr.Exclusive), rs...))
			wantCode(t, err, lockmgr.CodeTimeout)
			var le *lockmgr.Error
			if !errors.As(err, &le) || le.Resource != rs[1].String() {
				t.Fatalf("timeout %v does not name %s", err, rs[1])
			}
			assertFree(t, e, k, rs[0])
		})
	}
}

func TestSymlinkIsOneLock(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		t.Run(fmt.Sprint("indirect=", indirect), func(t *testing.T) {
			e := newEnv(t, indirect)
			d := e.driver(t)
			target := e.image(t, "target.qcow2", true)
			link := filepath.Join(e.root, "images", "link.qcow2")
			if err := os.Symlink("target.qcow2", link); err != nil {
				t.Fatal(err)
			}
			spellings := []string{target, link, filepath.Join(e.root, "images", ".", "..", "images", "link.qcow2")}
			ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), lockmgr.DiskResource(target, lockmgr.Exclusive)))
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range spellings[1:] {
				r, err := lockmgr.Canonical(lockmgr.DiskResource(p, lockmgr.Exclusive))
				if err != nil {
					t.Fatal(err)
				}
				if _, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r)); !errors.Is(err, lockmgr.ErrBusy) {
					t.Fatalf("%s while %s is held: %v, want busy", p, target, err)
				}
			}
			if err := d.Release(ctx, ls); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A direct lease opens the path it was given without following symlinks:
// if a directory of a canonical path was swapped for a symlink since it was
// resolved, the path no longer names the file that was keyed (or checked),
// and the acquire fails instead of locking whatever the symlink points to.
func TestDirectLeaseRefusesASymlinkSwappedIn(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	dir := filepath.Join(e.root, "images", "vm1")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	keyed := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(keyed, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := lockmgr.Canonical(lockmgr.DiskResource(keyed, lockmgr.Exclusive))
	if err != nil {
		t.Fatal(err)
	}
	// Now the directory becomes a symlink to another one, with a disk.img
	// of its own.
	elsewhere := filepath.Join(e.root, "elsewhere")
	if err := os.Mkdir(elsewhere, 0o700); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(elsewhere, "disk.img")
	if err := os.WriteFile(victim, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, dir+".old"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, dir); err != nil {
		t.Fatal(err)
	}
	_, err = d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
	wantCode(t, err, lockmgr.CodeInvalidArgument)
	if !errors.Is(err, unix.ELOOP) || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("acquire through a swapped-in symlink: %v, want an error saying the path has a symbolic link", err)
	}
	if got := probe(t, victim); got != "free" {
		t.Fatalf("the symlink's target is %s after the refused acquire, want free", got)
	}
}

// raceDuration is how long TestLeaseFileRace hammers one lease file.
const raceDuration = 10 * time.Second

// The same race on a direct lease, whose descriptors each Driver keeps
// between grants (images.go).
func TestDirectImageRace(t *testing.T) {
	e := newEnv(t, false)
	r := lockmgr.DiskResource(e.image(t, "raced.qcow2", true), lockmgr.Exclusive)
	race(t, e, r, raceDuration/2)
}

// race runs raceWorkers on r for d in this process (3 workers) and two
// others (2 each), and fails on any error they saw: two exclusive holders
// at once, a sharer beside one, a token that went back.
func race(t *testing.T, e *env, r lockmgr.Resource, d time.Duration) {
	t.Helper()
	a := helperArgs{Mode: "race", Cfg: e.cfg, Res: r, Marks: t.TempDir(), Seconds: d.Seconds(), Workers: 2}
	hs := []*helper{spawn(t, a), spawn(t, a)}
	a.Workers = 3
	results := []raceResult{raceWorkers(a)}
	for _, h := range hs {
		var res raceResult
		if err := jsonUnmarshal(h.next(), &res); err != nil {
			t.Fatal(err)
		}
		results = append(results, res)
	}
	for i, res := range results {
		t.Logf("process %d: %d exclusive, %d shared grants, %d busy", i, res.Exclusive, res.Shared, res.Busy)
		for _, msg := range res.Errors {
			t.Errorf("process %d: %s", i, msg)
		}
		if res.Exclusive == 0 || res.Shared == 0 {
			t.Errorf("process %d was never granted the lease both ways: %+v", i, res)
		}
	}
}

func TestLeaseFileRace(t *testing.T) {
	e := newEnv(t, true)
	r := lockmgr.DiskResource(e.image(t, "raced.qcow2", false), lockmgr.Exclusive)
	race(t, e, r, raceDuration)
	if _, err := os.Lstat(e.lockPath(r)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the lease file is still there after the last release (%v)", err)
	}
	ents, err := os.ReadDir(e.cfg.DiskLeaseDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range ents {
		if ent.Name() != hwmFileName {
			t.Errorf("left behind in the lease directory: %s", ent.Name())
		}
	}
}

func TestTokensIncrease(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d := e.driver(t)
			r := k.res(t, e, 0, lockmgr.Exclusive)
			other := k.res(t, e, 1, lockmgr.Exclusive)
			var last uint64
			grant := func(d *Driver, m lockmgr.Mode, n int) {
				t.Helper()
				r.Mode = m
				var held []lockmgr.Lease
				for range n { // n concurrent grants: sharers
					ls, err := d.Acquire(ctx, reqsOf(myHolder(m), r))
					if err != nil {
						t.Fatal(err)
					}
					if tok := ls[0].Token(); tok <= last {
						t.Fatalf("%s grant got token %d after %d", m, tok, last)
					}
					last = ls[0].Token()
					held = append(held, ls...)
				}
				if err := d.Release(ctx, held); err != nil {
					t.Fatal(err)
				}
				if k.file {
					if _, err := os.Lstat(e.lockPath(r)); !errors.Is(err, os.ErrNotExist) {
						t.Fatalf("lease file not removed by the last holder: %v", err)
					}
				}
			}
			grant(d, lockmgr.Exclusive, 1)
			grant(d, lockmgr.Shared, 3)
			grant(d, lockmgr.Exclusive, 1)
			// Another resource of the same directory moves the high-water mark
			// past r's token; r must still never go back.
			for range 3 {
				cycle(t, d, other)
			}
			// A restart: a new driver on the same directories.
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			grant(e.driver(t), lockmgr.Exclusive, 1)
			grant(e.driver(t), lockmgr.Shared, 2)
		})
	}
}

// recordPath is the file that holds r's token record: its lease file, or a
// direct lease's token file.
func (e *env) recordPath(r lockmgr.Resource) string {
	if r.Type == lockmgr.TypeDisk && e.cfg.DiskLeaseDir == "" {
		return filepath.Join(e.cfg.StateDir, "tokens", hashName(r.Name))
	}
	return e.lockPath(r)
}

// A token record that another host or a torn write left damaged does not
// tell the greatest token granted: granting on it could hand out a token
// lower than one already granted, so nothing is granted and the record is
// left as it is.
func TestDamagedTokenRecordRefusesGrants(t *testing.T) {
	damages := map[string][]byte{
		"torn token":  {7, 0, 0},
		"torn header": {7, 0, 0, 0, 0, 0, 0, 0, 2},
		"zeroed":      make([]byte, 64),
	}
	for _, k := range allKinds() {
		for what, damage := range damages {
			t.Run(k.name+"/"+what, func(t *testing.T) {
				e := newEnv(t, k.indirect)
				d := e.driver(t)
				r := k.res(t, e, 0, lockmgr.Exclusive)
				for range 5 {
					cycle(t, d, r)
				}
				// A sharer keeps the lease file while the record is damaged.
				r.Mode = lockmgr.Shared
				held, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Shared), r))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(e.recordPath(r), damage, 0o600); err != nil {
					t.Fatal(err)
				}
				ls, err := d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Shared), r))
				if err == nil {
					t.Fatalf("granted with token %d after token %d on a damaged record", ls[0].Token(), held[0].Token())
				}
				wantCode(t, err, lockmgr.CodeInternal)
				var de *damagedError
				if !errors.As(err, &de) {
					t.Fatalf("error %v does not say the record is damaged", err)
				}
				if !strings.Contains(err.Error(), e.recordPath(r)) {
					t.Fatalf("error %v does not name the damaged file %s", err, e.recordPath(r))
				}
				if got, _ := os.ReadFile(e.recordPath(r)); string(got) != string(damage) {
					t.Fatalf("the damaged record was rewritten: % x", got)
				}
				if err := d.Release(ctx, held); err != nil {
					t.Fatal(err)
				}
				r.Mode = lockmgr.Exclusive
				if _, err := d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), r)); !errors.As(err, &de) {
					t.Fatalf("exclusive acquire after the last release: %v, want the damaged record refused", err)
				}
			})
		}
	}
}

// The high-water mark is where a new lease file's tokens continue from; a
// damaged one refuses new lease files' grants for the same reason.
func TestDamagedHighWaterMarkRefusesGrants(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.LeaseResource("cluster-a", "key", lockmgr.Exclusive)
	cycle(t, d, r)
	if err := os.WriteFile(filepath.Join(e.cfg.LeaseDir, "cluster-a", hwmFileName), []byte{1, 0, 0}, 0o600); err != nil {
		t.Fatal(err)
	}
	var de *damagedError
	if _, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r)); !errors.As(err, &de) {
		t.Fatalf("acquire on a damaged high-water mark: %v, want it refused", err)
	}
	if _, err := os.Lstat(e.lockPath(r)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused acquire left its lease file behind (%v)", err)
	}
}

// A lockspace directory removed (rm -rf) while this host holds leases in
// it takes their lease files along: a lease file made in a new directory
// would not conflict with their locks. So the directory is not made again
// while they are held, and every acquire in it fails saying why; once they
// are released it is made again on demand.
func TestRemovedLockspaceDirectoryIsNotRemadeWhileLeasesInItAreHeld(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.LeaseResource("cluster-a", "key", lockmgr.Exclusive)
	held, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(e.cfg.LeaseDir, "cluster-a")
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	for _, res := range []lockmgr.Resource{r, lockmgr.LeaseResource("cluster-a", "other", lockmgr.Exclusive)} {
		ls, err := d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), res))
		if err == nil {
			t.Fatalf("%s granted (token %d) while %s is held in the removed directory", res, ls[0].Token(), r)
		}
		wantCode(t, err, lockmgr.CodeInternal)
		if !strings.Contains(err.Error(), "was renamed or removed") {
			t.Fatalf("error %q does not say the lockspace directory was renamed or removed", err)
		}
	}
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the removed lockspace directory was made again (%v)", err)
	}
	if err := d.Release(ctx, held); err != nil {
		t.Fatal(err)
	}
	ls, err := d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), r))
	if err != nil {
		t.Fatalf("acquire after the last lease in the removed directory was released: %v", err)
	}
	if err := d.Release(ctx, ls); err != nil {
		t.Fatal(err)
	}
}

// A lockspace directory renamed (mv LS LS.old) while a driver has it
// cached must not be used under its new name: another driver (another host
// sharing LeaseDir, or this host's vmlockd after a restart) makes LS anew
// and locks LS/KEY there, so a lease file made in LS.old would not conflict
// with its lock. The renamed directory's leases all were released, so the
// driver makes LS again itself and meets the other one's lock there.
func TestRenamedLockspaceDirectoryIsNotUsedUnderItsNewName(t *testing.T) {
	for _, k := range allKinds() {
		if !k.file || k.indirect {
			continue // lockspace directories: leases and custom types
		}
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, false)
			a := e.driver(t)
			hostB := &env{root: e.root, cfg: e.cfg}
			hostB.cfg.StateDir = filepath.Join(e.root, "state-b")
			b := hostB.driver(t)
			k1, k2 := k.res(t, e, 1, lockmgr.Exclusive), k.res(t, e, 2, lockmgr.Exclusive)
			cycle(t, a, k1)
			dir := filepath.Dir(e.lockPath(k2))
			if err := os.Rename(dir, dir+".old"); err != nil {
				t.Fatal(err)
			}
			heldB, err := b.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), k2))
			if err != nil {
				t.Fatal(err)
			}
			heldA, err := a.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), k2))
			var be *lockmgr.BusyError
			if err == nil {
				if err := b.Release(ctx, heldB); err != nil {
					t.Fatal(err)
				}
				t.Fatalf("%s granted to A (token %d) while B holds it; with B's lease released, %s is %s",
					k2, heldA[0].Token(), e.lockPath(k2), probe(t, e.lockPath(k2)))
			}
			if !errors.As(err, &be) || be.Holder.Name != otherHolder(lockmgr.Exclusive).Name {
				t.Fatalf("A's acquire of %s: %v, want busy naming B's holder", k2, err)
			}
			if err := b.Release(ctx, heldB); err != nil {
				t.Fatal(err)
			}
			if heldA, err = a.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), k2)); err != nil {
				t.Fatalf("A's acquire of %s once B released it: %v", k2, err)
			}
			if got := probe(t, e.lockPath(k2)); got != "busy" {
				t.Fatalf("A holds %s, yet %s is %s", k2, e.lockPath(k2), got)
			}
			if err := a.Release(ctx, heldA); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A lockspace directory renamed while this host holds leases in it takes
// their lease files along, as a removal does: the directory is not made
// again under its name while they are held, and every acquire in it fails
// saying why; once they are released it is made again, and what is granted
// then is locked at the lockspace's path.
func TestRenamedLockspaceDirectoryIsNotRemadeWhileLeasesInItAreHeld(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.LeaseResource("cluster-a", "key", lockmgr.Exclusive)
	held, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(e.cfg.LeaseDir, "cluster-a")
	if err := os.Rename(dir, dir+".old"); err != nil {
		t.Fatal(err)
	}
	// The held lease itself is busy, its holder named (its file is still
	// reached through the cached directory).
	var be *lockmgr.BusyError
	if _, err := d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), r)); !errors.As(err, &be) || be.Holder.Name != myHolder(lockmgr.Exclusive).Name {
		t.Fatalf("acquire of the held %s: %v, want busy naming its holder", r, err)
	}
	other := lockmgr.LeaseResource("cluster-a", "other", lockmgr.Exclusive)
	ls, err := d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), other))
	if err == nil {
		t.Fatalf("%s granted (token %d) while %s is held in the renamed directory", other, ls[0].Token(), r)
	}
	wantCode(t, err, lockmgr.CodeInternal)
	if !strings.Contains(err.Error(), "was renamed or removed") || !strings.Contains(err.Error(), dir) {
		t.Fatalf("error %q does not say that the lockspace directory %s was renamed or removed", err, dir)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the renamed lockspace directory was made again (%v)", err)
	}
	if ents, _ := os.ReadDir(dir + ".old"); hasPrefix(ents, "other") {
		t.Fatal("the refused acquire left a lease file in the renamed directory")
	}
	if err := d.Release(ctx, held); err != nil {
		t.Fatal(err)
	}
	ls, err = d.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), r))
	if err != nil {
		t.Fatalf("acquire after the last lease in the renamed directory was released: %v", err)
	}
	if got := probe(t, e.lockPath(r)); got != "busy" {
		t.Fatalf("%s is granted, yet %s is %s", r, e.lockPath(r), got)
	}
	if err := d.Release(ctx, ls); err != nil {
		t.Fatal(err)
	}
}

// A held lease file that an operator moved away (mv, or a copy put in its
// place) no longer excludes anyone: another host makes the lease file anew
// and is granted the lease. When the first holder then releases, the file
// at the lease's path is the other host's, held: it must stay, or a third
// holder would be granted the lease too.
func TestReleaseLeavesALeaseFileItDoesNotHold(t *testing.T) {
	for _, k := range allKinds() {
		if !k.file {
			continue
		}
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			a := e.driver(t)
			hostB := &env{root: e.root, cfg: e.cfg}
			hostB.cfg.StateDir = filepath.Join(e.root, "state-b")
			b := hostB.driver(t)
			r := k.res(t, e, 0, lockmgr.Exclusive)
			heldA, err := a.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
			if err != nil {
				t.Fatal(err)
			}
			p := e.lockPath(r)
			if err := os.Rename(p, p+".bak"); err != nil {
				t.Fatal(err)
			}
			heldB, err := b.Acquire(ctx, reqsOf(otherHolder(lockmgr.Exclusive), r))
			if err != nil {
				t.Fatal(err)
			}
			if err := a.Release(ctx, heldA); err != nil {
				t.Fatal(err)
			}
			if got := probe(t, p); got != "busy" {
				t.Fatalf("B holds %s, yet after A's release %s is %s", r, p, got)
			}
			var be *lockmgr.BusyError
			if _, err := a.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r)); !errors.As(err, &be) || be.Holder.Name != otherHolder(lockmgr.Exclusive).Name {
				t.Fatalf("acquire of %s while B holds it: %v, want busy naming B's holder", r, err)
			}
			if err := b.Release(ctx, heldB); err != nil {
				t.Fatal(err)
			}
			if got := probe(t, p); got != "absent" {
				t.Fatalf("after B, the last holder, released %s, %s is %s", r, p, got)
			}
		})
	}
}

func TestStaleExpect(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d := e.driver(t)
			r0, r1 := k.res(t, e, 0, lockmgr.Exclusive), k.res(t, e, 1, lockmgr.Shared)
			acquire := func(expect ...uint64) ([]lockmgr.Lease, error) {
				reqs := reqsOf(myHolder(lockmgr.Exclusive), r0, r1)
				for i := range reqs {
					reqs[i].Expect = expect[i]
				}
				return d.Acquire(ctx, reqs)
			}
			release := func(ls []lockmgr.Lease) (t0, t1 uint64) {
				t.Helper()
				if err := d.Release(ctx, ls); err != nil {
					t.Fatal(err)
				}
				return ls[0].Token(), ls[1].Token()
			}
			ls, err := acquire(0, 0)
			if err != nil {
				t.Fatal(err)
			}
			t0, t1 := release(ls)
			// The current tokens are accepted: a handover.
			if ls, err = acquire(t0, t1); err != nil {
				t.Fatalf("acquire with the current tokens: %v", err)
			}
			n0, n1 := release(ls)
			for _, c := range []struct {
				name       string
				e0, e1     uint64
				stale      lockmgr.Resource
				want, curr uint64
			}{
				{"second-stale", n0, t1, r1, t1, n1},
				{"first-stale", t0, n1, r0, t0, n0},
			} {
				_, err := acquire(c.e0, c.e1)
				var se *lockmgr.StaleStateError
				if !errors.As(err, &se) || !errors.Is(err, lockmgr.ErrStaleState) {
					t.Fatalf("%s: got %v, want a StaleStateError", c.name, err)
				}
				if se.Resource.Key() != c.stale.Key() || se.Want != c.want || se.Current != c.curr {
					t.Fatalf("%s: got %+v, want %s want=%d current=%d", c.name, se, c.stale, c.want, c.curr)
				}
				assertFree(t, e, k, r0)
				assertFree(t, e, k, r1)
			}
			// Nothing changed: the tokens are still the current ones.
			ls, err = acquire(n0, n1)
			if err != nil {
				t.Fatalf("after the stale attempts, the current tokens were refused: %v", err)
			}
			release(ls)
		})
	}
}

func TestInvalidResources(t *testing.T) {
	disk := lockmgr.TypeDisk
	lease := lockmgr.TypeLease
	long := strings.Repeat("k", lockmgr.MaxNameLen+1)
	cases := []struct {
		name string
		r    lockmgr.Resource
	}{
		{"lease-no-slash", lockmgr.Resource{Type: lease, Name: ".."}},
		{"lease-dotdot-lockspace", lockmgr.Resource{Type: lease, Name: "../escape"}},
		{"lease-dotdot-key", lockmgr.Resource{Type: lease, Name: "ls/.."}},
		{"lease-dot-key", lockmgr.Resource{Type: lease, Name: "ls/."}},
		{"lease-key-slash", lockmgr.Resource{Type: lease, Name: "ls/a/../../b"}},
		{"lease-empty-key", lockmgr.Resource{Type: lease, Name: "ls/"}},
		{"lease-empty-lockspace", lockmgr.Resource{Type: lease, Name: "/key"}},
		{"lease-absolute", lockmgr.Resource{Type: lease, Name: "/etc/passwd"}},
		{"lease-nul", lockmgr.Resource{Type: lease, Name: "ls/ke\x00y"}},
		{"lease-control", lockmgr.Resource{Type: lease, Name: "ls/ke\ny"}},
		{"lease-long-key", lockmgr.Resource{Type: lease, Name: "ls/" + long}},
		{"lease-bad-utf8", lockmgr.Resource{Type: lease, Name: "ls/\xff"}},
		{"lease-reserved-key", lockmgr.Resource{Type: lease, Name: "ls/.hwm"}},
		{"lease-reserved-lockspace", lockmgr.Resource{Type: lease, Name: "custom.iscsi/key"}},
		{"disk-relative", lockmgr.Resource{Type: disk, Name: "images/disk.qcow2"}},
		{"disk-unclean", lockmgr.Resource{Type: disk, Name: "/var/../etc/passwd"}},
		{"disk-empty", lockmgr.Resource{Type: disk, Name: ""}},
		{"disk-nul", lockmgr.Resource{Type: disk, Name: "/tmp/a\x00b"}},
		{"disk-readonly", lockmgr.Resource{Type: disk, Name: "/tmp/x", Mode: lockmgr.ReadOnly}},
		{"disk-bad-mode", lockmgr.Resource{Type: disk, Name: "/tmp/x", Mode: 7}},
		{"custom-bad-type", lockmgr.Resource{Type: "../x", Name: "n"}},
		{"custom-upper-type", lockmgr.Resource{Type: "ISCSI", Name: "n"}},
		{"custom-empty-name", lockmgr.Resource{Type: "iscsi", Name: ""}},
		{"empty-type", lockmgr.Resource{Type: "", Name: "n"}},
	}
	for _, indirect := range []bool{false, true} {
		e := newEnv(t, indirect)
		d := e.driver(t)
		for _, c := range cases {
			t.Run(fmt.Sprintf("%s/indirect=%v", c.name, indirect), func(t *testing.T) {
				_, err := d.Acquire(ctx, reqsOf(myHolder(c.r.Mode), c.r))
				wantCode(t, err, lockmgr.CodeInvalidArgument)
				var le *lockmgr.Error
				if !errors.As(err, &le) || le.Resource == "" {
					t.Fatalf("error %v does not name the resource", err)
				}
				if _, err := d.Adopt(c.r, 1, os.NewFile(uintptr(mustOpen(t, e.root)), "x")); lockmgr.CodeOf(err) != lockmgr.CodeInvalidArgument {
					t.Fatalf("Adopt: %v, want invalid argument", err)
				}
			})
		}
		// Nothing was created anywhere.
		if ents, _ := os.ReadDir(e.cfg.LeaseDir); len(ents) != 0 {
			t.Errorf("invalid names created %v in the lease directory", ents)
		}
		if ents, _ := os.ReadDir(filepath.Dir(e.root)); len(ents) != 1 {
			t.Errorf("invalid names created %v next to the test root", ents)
		}
	}
}

func mustOpen(t *testing.T, p string) int {
	t.Helper()
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func TestMissingImage(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	here := lockmgr.DiskResource(e.image(t, "here.qcow2", true), lockmgr.Exclusive)
	gone := lockmgr.DiskResource(e.image(t, "gone.qcow2", false), lockmgr.Exclusive)
	_, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), here, gone))
	wantCode(t, err, lockmgr.CodeInvalidArgument)
	if !strings.Contains(err.Error(), "does not exist") || !strings.Contains(err.Error(), gone.Name) || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("error %q should say that %s does not exist", err, gone.Name)
	}
	assertFree(t, e, allKinds()[0], here)
}

func TestReleaseTwice(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d := e.driver(t)
			ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), k.res(t, e, 0, lockmgr.Exclusive)))
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Release(ctx, ls); err != nil {
				t.Fatal(err)
			}
			err = d.Release(ctx, ls)
			wantCode(t, err, lockmgr.CodeNotHeld)
			if !errors.Is(err, lockmgr.ErrNotHeld) {
				t.Fatalf("%v is not ErrNotHeld", err)
			}
			if f := ls[0].(lockmgr.FileLease).File(); f != nil {
				t.Fatalf("File of a released lease = %v, want nil", f)
			}
		})
	}
}

func TestAdoptRoundTrip(t *testing.T) {
	for _, k := range allKinds() {
		for _, m := range []lockmgr.Mode{lockmgr.Exclusive, lockmgr.Shared} {
			t.Run(k.name+"/"+m.String(), func(t *testing.T) {
				e := newEnv(t, k.indirect)
				d1, err := New(e.cfg)
				if err != nil {
					t.Fatal(err)
				}
				r := k.res(t, e, 0, m)
				ls, err := d1.Acquire(ctx, reqsOf(myHolder(m), r))
				if err != nil {
					t.Fatal(err)
				}
				tok := ls[0].Token()
				f := ls[0].(lockmgr.FileLease).File()
				dupFd, err := unix.Dup(int(f.Fd()))
				if err != nil {
					t.Fatal(err)
				}
				unix.CloseOnExec(dupFd)
				kept := os.NewFile(uintptr(dupFd), "kept")
				// The lock-holder process keeps its own copy all along: Release
				// must free the lock all the same.
				holderFd, err := unix.Dup(dupFd)
				if err != nil {
					t.Fatal(err)
				}
				unix.CloseOnExec(holderFd)
				defer unix.Close(holderFd)
				// The daemon dies: its files close, its lease objects are gone.
				_ = f.Close()
				ls = nil
				_ = d1.Close()
				runtime.GC()
				if got := probe(t, e.lockPath(r)); got != "busy" {
					t.Fatalf("with only the kept copy open, probe says %q, want busy", got)
				}

				d2 := e.driver(t)
				l, err := d2.Adopt(r, tok, kept)
				if err != nil {
					t.Fatal(err)
				}
				if l.Token() != tok || l.Resource() != r || l.(lockmgr.FileLease).File() != kept {
					t.Fatalf("adopted lease %v has token %d, resource %v", l, l.Token(), l.Resource())
				}
				if got := probe(t, e.lockPath(r)); got != "busy" {
					t.Fatalf("after Adopt, probe says %q, want busy", got)
				}
				if err := d2.Release(ctx, []lockmgr.Lease{l}); err != nil {
					t.Fatal(err)
				}
				assertFree(t, e, k, r)
				if err := d2.Release(ctx, []lockmgr.Lease{l}); !errors.Is(err, lockmgr.ErrNotHeld) {
					t.Fatalf("second release of an adopted lease: %v", err)
				}
				// The next grant continues after the adopted token.
				ls, err = d2.Acquire(ctx, reqsOf(myHolder(m), r))
				if err != nil {
					t.Fatal(err)
				}
				if ls[0].Token() <= tok {
					t.Fatalf("token %d after adopted token %d", ls[0].Token(), tok)
				}
				if err := d2.Release(ctx, ls); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestAdoptRefuses(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.DiskResource(e.image(t, "a.qcow2", true), lockmgr.Exclusive)
	other := lockmgr.DiskResource(e.image(t, "b.qcow2", true), lockmgr.Exclusive)
	ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Release(ctx, ls)
	dup := func() *os.File {
		fd, err := unix.Dup(int(ls[0].(lockmgr.FileLease).File().Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return os.NewFile(uintptr(fd), "dup")
	}
	cases := []struct {
		name string
		r    lockmgr.Resource
		tok  uint64
		code lockmgr.Code
	}{
		{"wrong-token", r, ls[0].Token() + 1, lockmgr.CodeStaleState},
		{"other-file", other, 0, lockmgr.CodeInternal},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := d.Adopt(c.r, c.tok, dup())
			wantCode(t, err, c.code)
		})
	}
	// A lock someone else holds cannot be adopted.
	h := holdIn(t, e, lockmgr.Request{Resource: other, Holder: otherHolder(lockmgr.Exclusive)})
	f, err := os.OpenFile(other.Name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Adopt(other, 1, f); !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("adopting a file without its lock, held elsewhere: %v, want busy", err)
	}
	h.release()
}

// TestManager runs the lock manager on the driver: a handover between two
// managers (two hosts) by state string, and a stale state refused.
func TestManager(t *testing.T) {
	e := newEnv(t, true)
	disk := e.image(t, "vm.qcow2", true)
	m1 := lockmgr.NewManager(e.driver(t), lockmgr.Options{})
	m2 := lockmgr.NewManager(e.driver(t), lockmgr.Options{})
	vm := lockmgr.Object{UUID: "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", Name: "vm1", PID: os.Getpid()}
	for _, m := range []*lockmgr.Manager{m1, m2} {
		if err := m.Register(vm); err != nil {
			t.Fatal(err)
		}
		if err := m.AddResource(vm.UUID, lockmgr.DiskResource(disk, lockmgr.Exclusive)); err != nil {
			t.Fatal(err)
		}
		if err := m.AddResource(vm.UUID, lockmgr.LeaseResource("ls", "vm1", lockmgr.Exclusive)); err != nil {
			t.Fatal(err)
		}
	}
	if err := m1.Acquire(ctx, vm.UUID, ""); err != nil {
		t.Fatal(err)
	}
	if err := m2.Acquire(ctx, vm.UUID, ""); !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("second manager: %v, want busy", err)
	}
	state, err := m1.Release(ctx, vm.UUID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := m2.Acquire(ctx, vm.UUID, state); err != nil {
		t.Fatalf("handover with %q: %v", state, err)
	}
	if _, err := m2.Release(ctx, vm.UUID, nil); err != nil {
		t.Fatal(err)
	}
	if err := m1.Acquire(ctx, vm.UUID, state); !errors.Is(err, lockmgr.ErrStaleState) {
		t.Fatalf("acquire with a used state: %v, want stale", err)
	}
}

func TestReleaseAfterFileClosed(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.DiskResource(e.image(t, "a.qcow2", true), lockmgr.Exclusive)
	ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
	if err != nil {
		t.Fatal(err)
	}
	// Closing the lease's own file is a misuse; Release must say so and not
	// touch whatever file now has that descriptor number.
	if err := ls[0].(lockmgr.FileLease).File().Close(); err != nil {
		t.Fatal(err)
	}
	other, err := os.Open(e.root) // likely to reuse the descriptor number
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	wantCode(t, d.Release(ctx, ls), lockmgr.CodeInternal)
	if _, err := other.Stat(); err != nil {
		t.Fatalf("Release touched another file: %v", err)
	}
}

func TestAcquireAfterCloseNamesTheResource(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d := e.driver(t)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			r := k.res(t, e, 0, lockmgr.Exclusive)
			_, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
			var le *lockmgr.Error
			if !errors.As(err, &le) || le.Resource != r.String() {
				t.Fatalf("Acquire after Close: %v, want an error naming %s", err, r)
			}
		})
	}
}

// A handover of several shared resources in which one turns stale between
// the two phases (another sharer was granted it) fails as a whole without
// moving any token: the handover can be retried with the tokens that are
// still current.
func TestSharedHandoverStaleBetweenPhasesMovesNoToken(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d, other, third := e.driver(t), e.driver(t), e.driver(t)
			rs := []lockmgr.Resource{k.res(t, e, 0, lockmgr.Shared), k.res(t, e, 1, lockmgr.Shared), k.res(t, e, 2, lockmgr.Shared)}
			// Another host keeps all three shared, so their files and tokens stay.
			held, err := other.Acquire(ctx, reqsOf(otherHolder(lockmgr.Shared), rs...))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { other.Release(ctx, held) })
			handover := func() ([]lockmgr.Lease, error) {
				reqs := reqsOf(myHolder(lockmgr.Shared), rs...)
				for i := range reqs {
					reqs[i].Expect = held[i].Token()
				}
				return d.Acquire(ctx, reqs)
			}
			// Between the phases a third sharer is granted the last resource.
			var late []lockmgr.Lease
			d.testHookLocked = func() {
				if late, err = third.Acquire(ctx, reqsOf(otherHolder(lockmgr.Shared), rs[2])); err != nil {
					t.Errorf("the third sharer: %v", err)
				}
			}
			_, err = handover()
			var se *lockmgr.StaleStateError
			if !errors.As(err, &se) || se.Resource.Key() != rs[2].Key() {
				t.Fatalf("handover with %s granted again meanwhile: %v, want stale on it", rs[2], err)
			}
			d.testHookLocked = nil
			if err := third.Release(ctx, late); err != nil {
				t.Fatal(err)
			}
			// The first two tokens did not move: only the third is stale.
			held[2] = late[0]
			ls, err := handover()
			if err != nil {
				t.Fatalf("retry with the tokens still current: %v", err)
			}
			if err := d.Release(ctx, ls); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A failed Adopt closes its own copy of the description and nothing more:
// the lock-holder keeps another copy, and the owner may still run, so the
// lock stays until the caller releases that copy (after killing the owner,
// or dropping a record of an owner that is gone).
func TestAFailedAdoptLeavesTheLockToTheOtherCopies(t *testing.T) {
	cases := []struct {
		name   string
		damage func(t *testing.T, e *env, r lockmgr.Resource)
		tok    func(granted uint64) uint64
		code   lockmgr.Code
	}{
		{"stale token", func(*testing.T, *env, lockmgr.Resource) {}, func(g uint64) uint64 { return g + 1 }, lockmgr.CodeStaleState},
		{"damaged token record", func(t *testing.T, e *env, r lockmgr.Resource) {
			// A torn record: the token's 8 bytes cut to 3.
			if err := os.Truncate(filepath.Join(e.cfg.StateDir, "tokens", hashName(r.Name)), 3); err != nil {
				t.Fatal(err)
			}
		}, func(g uint64) uint64 { return g }, lockmgr.CodeInternal},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, false)
			d1 := e.driver(t)
			r := lockmgr.DiskResource(e.image(t, "a.qcow2", true), lockmgr.Exclusive)
			ls, err := d1.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
			if err != nil {
				t.Fatal(err)
			}
			f := ls[0].(lockmgr.FileLease).File()
			holderFd, err := unix.Dup(int(f.Fd())) // the lock-holder's copy
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(holderFd)
			adoptFd, err := unix.Dup(holderFd) // what it hands back at restart
			if err != nil {
				t.Fatal(err)
			}
			// The daemon dies.
			_ = f.Close()
			_ = d1.Close()
			c.damage(t, e, r)

			d2 := e.driver(t)
			_, err = d2.Adopt(r, c.tok(ls[0].Token()), os.NewFile(uintptr(adoptFd), "adopted"))
			wantCode(t, err, c.code)
			if got := probe(t, r.Name); got != "busy" {
				t.Fatalf("after a failed Adopt, with the lock-holder's copy open, probe says %q, want busy", got)
			}
		})
	}
}
