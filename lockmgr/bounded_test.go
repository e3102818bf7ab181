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
