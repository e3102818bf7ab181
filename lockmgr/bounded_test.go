package lockmgr

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// A call whose time is up before the driver is asked says so, and does not
// blame the driver; one whose time runs out while the driver works blames
// it. Both are timeouts, and the late result is undone.
func TestBoundedSaysWhoseTimeRanOut(t *testing.T) {
	expired, cancel := context.WithTimeout(context.Background(), 0)
	defer cancel()
	called := false
	_, err := Bounded(expired, func() (int, error) { called = true; return 1, nil }, nil)
	if called || !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "before the lock driver was asked") {
		t.Fatalf("with no time left: called %v, %v; want a timeout before the driver was asked", called, err)
	}

	ctx, cancel2 := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel2()
	release, undone := make(chan struct{}), make(chan int, 1)
	_, err = Bounded(ctx, func() (int, error) { <-ctx.Done(); <-release; return 7, nil }, func(v int) { undone <- v })
	close(release)
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "the lock driver did not answer in time") {
		t.Fatalf("with the time running out in the driver: %v; want a timeout blaming the driver", err)
	}
	if v := <-undone; v != 7 {
		t.Fatalf("the late result undone was %d, want 7", v)
	}
}

// The NopDriver is called directly, without a goroutine to bound it: a
// call whose time is up still fails before it is asked, changing nothing,
// and a release with its time up still releases.
func TestNopDriverCallsAreBoundedAllTheSame(t *testing.T) {
	m := NewManager(NopDriver{}, Options{})
	if !m.immediate {
		t.Fatal("the NopDriver is not called directly")
	}
	register(t, m, uuidA, "web1")
	expired, cancel := context.WithTimeout(context.Background(), 0)
	defer cancel()
	err := m.AcquireResource(expired, uuidA, DiskResource("/img/a", Exclusive))
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "before the lock driver was asked") {
		t.Fatalf("AcquireResource with no time left: %v; want a timeout before the driver was asked", err)
	}
	if n := m.HeldCount(); n != 0 {
		t.Fatalf("%d resources held after a grant that timed out", n)
	}
	if err := m.AcquireResource(context.Background(), uuidA, DiskResource("/img/a", Exclusive)); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Release(expired, uuidA, nil); err != nil {
		t.Fatalf("Release with no time left: %v", err)
	}
	if n := m.HeldCount(); n != 0 {
		t.Fatalf("%d resources held after the release", n)
	}
	if m := NewManager(&gateDriver{}, Options{}); m.immediate {
		t.Fatal("a driver that embeds the NopDriver is called directly")
	}
}
