package hierlock

import "time"

// Clock is the source of time for deadlines. The nil Clock is the real one
// (package time). Tests inject their own to drive deadlines and to fire
// timers early ("spurious wake-ups"), which must never fail an acquire
// before its deadline.
type Clock interface {
	Now() time.Time
	// NewTimer returns a timer that sends on its channel once, after d (or
	// whenever the clock decides: an early fire is tolerated).
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer that the package uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

// RealClock is the Clock of package time.
type RealClock struct{}

// Now returns time.Now().
func (RealClock) Now() time.Time { return time.Now() }

// NewTimer returns a time.Timer.
func (RealClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }
