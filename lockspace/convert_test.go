package lockspace

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

func TestConvertInPlace(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "base.img")
	if err := os.WriteFile(img, make([]byte, 512), 0o600); err != nil {
		t.Fatal(err)
	}
	newDriver := func(name string) *Driver {
		d, err := New(Config{StateDir: filepath.Join(dir, name), LeaseDir: filepath.Join(dir, "leases")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}
	a, b := newDriver("a"), newDriver("b") // two daemons on one image
	shared := lockmgr.Request{Resource: lockmgr.DiskResource(img, lockmgr.Shared)}
	ls, err := a.Acquire(ctx, []lockmgr.Request{shared})
	if err != nil {
		t.Fatal(err)
	}
	tok := ls[0].Token()
	up, err := a.Convert(ctx, ls[0], lockmgr.Exclusive)
	if err != nil {
		t.Fatal(err)
	}
	if up.Resource().Mode != lockmgr.Exclusive || up.Token() <= tok {
		t.Fatalf("converted lease %v token %d, want exclusive with a token above %d", up.Resource(), up.Token(), tok)
	}
	if _, err := b.Acquire(ctx, []lockmgr.Request{shared}); !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("shared acquire during the exclusive hold: %v, want busy", err)
	}
	if _, err := a.Convert(ctx, up, lockmgr.Shared); err != nil {
		t.Fatal(err)
	}
	other, err := b.Acquire(ctx, []lockmgr.Request{shared})
	if err != nil {
		t.Fatalf("shared acquire after the downgrade: %v", err)
	}
	// Another sharer: the upgrade is refused and the lease stays shared.
	_, err = a.Convert(ctx, up, lockmgr.Exclusive)
	var be *lockmgr.BusyError
	if !errors.As(err, &be) || be.Holder.Mode != lockmgr.Shared {
		t.Fatalf("upgrade with another sharer: %v, want busy naming a shared holder", err)
	}
	if up.Resource().Mode != lockmgr.Shared {
		t.Fatalf("mode after a refused upgrade: %v", up.Resource().Mode)
	}
	if _, err := b.Acquire(ctx, []lockmgr.Request{{Resource: lockmgr.DiskResource(img, lockmgr.Exclusive)}}); !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("exclusive acquire while a still shares: %v, want busy", err)
	}
	if err := b.Release(ctx, other); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, []lockmgr.Lease{up}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Convert(ctx, up, lockmgr.Exclusive); !errors.Is(err, lockmgr.ErrNotHeld) {
		t.Fatalf("convert after release: %v, want not held", err)
	}
}

func TestConvertAndResourceDoNotRace(t *testing.T) {
	e := newEnv(t, true)
	d := e.driver(t)
	r := allKinds()[1].res(t, e, 0, lockmgr.Shared)
	ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Shared), r))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Release(ctx, ls)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 100 {
			_ = ls[0].Resource() // the daemon reads leases without the object's lock
		}
	}()
	for i := range 100 {
		m := lockmgr.Exclusive
		if i%2 == 1 {
			m = lockmgr.Shared
		}
		if _, err := d.Convert(ctx, ls[0], m); err != nil {
			t.Fatal(err)
		}
	}
	<-done
}

// holderNamed is a distinct holder for each name.
func holderNamed(name, uuid string) lockmgr.Holder {
	return lockmgr.Holder{Name: name, UUID: uuid, PID: os.Getpid(), Host: "host-a"}
}

func TestConvertNamesHolders(t *testing.T) {
	const (
		uuidA = "aaaaaaaa-0000-4000-8000-000000000001"
		uuidB = "bbbbbbbb-0000-4000-8000-000000000002"
		uuidC = "cccccccc-0000-4000-8000-000000000003"
	)
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			a, b := e.driver(t), e.driver(t) // two daemons sharing the directories
			r := k.res(t, e, 0, lockmgr.Shared)
			acquire := func(d *Driver, name, uuid string) ([]lockmgr.Lease, error) {
				return d.Acquire(ctx, reqsOf(holderNamed(name, uuid), r))
			}
			// b shares first, a is the newest grant: a's upgrade is refused,
			// and the record (a's own) must not make a name itself.
			lb, err := acquire(b, "b", uuidB)
			if err != nil {
				t.Fatal(err)
			}
			la, err := acquire(a, "a", uuidA)
			if err != nil {
				t.Fatal(err)
			}
			_, err = a.Convert(ctx, la[0], lockmgr.Exclusive)
			var be *lockmgr.BusyError
			if !errors.As(err, &be) || be.Holder.UUID == uuidA {
				t.Fatalf("upgrade with another sharer: %v, want busy not naming the caller", err)
			}
			if err := a.Release(ctx, la); err != nil {
				t.Fatal(err)
			}
			// a shares again after b: the record names a. b's upgrade is
			// refused naming a.
			if la, err = acquire(a, "a", uuidA); err != nil {
				t.Fatal(err)
			}
			_, err = b.Convert(ctx, lb[0], lockmgr.Exclusive)
			if !errors.As(err, &be) || be.Holder.UUID != uuidA || be.Holder.Mode != lockmgr.Shared {
				t.Fatalf("upgrade while a shares: %v, want busy naming a sharing", err)
			}
			// b shares once more and leaves, and a upgrades: a newcomer is
			// refused naming a, who holds it exclusively now, not b, the last
			// sharer recorded.
			if err := b.Release(ctx, lb); err != nil {
				t.Fatal(err)
			}
			if lb, err = acquire(b, "b", uuidB); err != nil {
				t.Fatal(err)
			}
			newest := lb[0].Token()
			if err := b.Release(ctx, lb); err != nil {
				t.Fatal(err)
			}
			if _, err := a.Convert(ctx, la[0], lockmgr.Exclusive); err != nil {
				t.Fatal(err)
			}
			_, err = acquire(b, "c", uuidC)
			if !errors.As(err, &be) || be.Holder.UUID != uuidA || be.Holder.Mode != lockmgr.Exclusive {
				t.Fatalf("shared acquire after a's upgrade: %v, want busy naming a holding it exclusively", err)
			}
			if err := a.Release(ctx, la); err != nil {
				t.Fatal(err)
			}
			// The upgrade's token follows the file's (b's, newer than a's),
			// and the next grant goes on from there.
			if la[0].Token() <= newest {
				t.Fatalf("upgrade's token %d after a grant with token %d", la[0].Token(), newest)
			}
			lc, err := acquire(b, "c", uuidC)
			if err != nil {
				t.Fatal(err)
			}
			if lc[0].Token() <= la[0].Token() {
				t.Fatalf("token %d after a grant with token %d", lc[0].Token(), la[0].Token())
			}
			if err := b.Release(ctx, lc); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// An upgrade is a new exclusive grant: its token is greater than every
// token granted for the resource before, a sharer's since the lease's own
// grant included, and it is the resource's current token (a state string
// made with it is current). A downgrade keeps the token. This is the
// cancelled migration handover: the source downgrades, the destination
// joins and leaves, the source takes the disk back and hands it over again.
func TestUpgradeTakesANewToken(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			src, dst := e.driver(t), e.driver(t)
			r := k.res(t, e, 0, lockmgr.Exclusive)
			ls, err := src.Acquire(ctx, reqsOf(holderNamed("src", "aaaaaaaa-0000-4000-8000-000000000001"), r))
			if err != nil {
				t.Fatal(err)
			}
			t1 := ls[0].Token()
			down, err := src.Convert(ctx, ls[0], lockmgr.Shared)
			if err != nil {
				t.Fatal(err)
			}
			if down.Token() != t1 {
				t.Fatalf("downgrade changed the token from %d to %d", t1, down.Token())
			}
			shared := r
			shared.Mode = lockmgr.Shared
			join := func(want uint64) ([]lockmgr.Lease, error) {
				return dst.Acquire(ctx, []lockmgr.Request{{Resource: shared, Holder: holderNamed("dst", "bbbbbbbb-0000-4000-8000-000000000002"), Expect: want}})
			}
			ld, err := join(t1)
			if err != nil {
				t.Fatal(err)
			}
			t2 := ld[0].Token()
			if err := dst.Release(ctx, ld); err != nil {
				t.Fatal(err)
			}
			up, err := src.Convert(ctx, down, lockmgr.Exclusive)
			if err != nil {
				t.Fatal(err)
			}
			t3 := up.Token()
			if t3 <= t2 {
				t.Fatalf("upgrade after a sharer was granted token %d: token %d, want greater", t2, t3)
			}
			// Handed over again: the state's token is the current one.
			if down, err = src.Convert(ctx, up, lockmgr.Shared); err != nil {
				t.Fatal(err)
			}
			if down.Token() != t3 {
				t.Fatalf("downgrade changed the token from %d to %d", t3, down.Token())
			}
			if _, err := join(t1); !errors.Is(err, lockmgr.ErrStaleState) {
				t.Fatalf("join with the token before the upgrade: %v, want stale state", err)
			}
			if ld, err = join(t3); err != nil {
				t.Fatalf("join with the upgraded token: %v", err)
			}
			if ld[0].Token() <= t3 {
				t.Fatalf("sharer's token %d after the upgrade's %d", ld[0].Token(), t3)
			}
			if err := dst.Release(ctx, ld); err != nil {
				t.Fatal(err)
			}
			if err := src.Release(ctx, []lockmgr.Lease{down}); err != nil {
				t.Fatal(err)
			}
		})
	}
}
