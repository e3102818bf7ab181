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
	if up.Resource().Mode != lockmgr.Exclusive || up.Token() != tok {
		t.Fatalf("converted lease %v token %d, want exclusive with token %d", up.Resource(), up.Token(), tok)
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
