package lockmgr

import (
	"context"
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
