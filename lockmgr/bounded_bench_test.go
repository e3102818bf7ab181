package lockmgr

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The cost of bounding a driver call by its deadline (a goroutine per call)
// against calling it inline, around a cheap system call.
func BenchmarkBounded(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	f := func() (int, error) { return unix.Getpid(), nil }
	b.Run("inline", func(b *testing.B) {
		for b.Loop() {
			f()
		}
	})
	b.Run("bounded", func(b *testing.B) {
		for b.Loop() {
			Bounded(ctx, f, nil)
		}
	})
}

// The cost of canonicalising a disk path: one without a symlink (checked in
// one openat2) and one through a symlink (resolved through /proc).
func BenchmarkCanonical(b *testing.B) {
	dir := b.TempDir()
	img := filepath.Join(dir, "a.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	link := filepath.Join(dir, "link.img")
	if err := os.Symlink(img, link); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct{ name, path string }{{"plain", img}, {"symlink", link}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := Canonical(DiskResource(c.path, Exclusive)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
