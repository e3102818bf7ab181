package hierlock

import (
	"context"
	"math"
	"testing"
	"time"
)

func TestAttemptTimeoutsGanetiDefaults(t *testing.T) {
	seq := AttemptTimeouts(0, 0, 0)
	if len(seq) != 28 {
		t.Fatalf("%d attempts, want 28: %v", len(seq), seq)
	}
	want := []float64{5, 7.95, 14.18, 29.25, 72.31}
	for i, w := range want {
		if got := seq[i].Seconds(); math.Abs(got-w) > 0.01 {
			t.Errorf("attempt %d = %.3f s, want %.2f s", i, got, w)
		}
	}
	var sum time.Duration
	for i, d := range seq {
		if i >= 5 && d != DefaultAttemptMax {
			t.Errorf("attempt %d = %v, want %v", i, d, DefaultAttemptMax)
		}
		sum += d
	}
	if sum < DefaultAttemptTotal || sum-seq[len(seq)-1] >= DefaultAttemptTotal {
		t.Fatalf("sum %v: the sequence must end as soon as it reaches %v", sum, DefaultAttemptTotal)
	}
}

func TestAttemptTimeoutsClamp(t *testing.T) {
	for _, tc := range []struct{ lo, hi, total time.Duration }{
		{time.Second, 2 * time.Second, 10 * time.Second},
		{time.Millisecond, time.Millisecond, time.Second},     // max = min
		{time.Second, time.Millisecond, 5 * time.Second},      // max below min: raised
		{time.Nanosecond, time.Nanosecond, time.Hour},         // bounded count
		{100 * time.Millisecond, time.Hour, 30 * time.Second}, // growth below 1 s clamps to min
	} {
		seq := AttemptTimeouts(tc.lo, tc.hi, tc.total)
		if len(seq) == 0 || len(seq) > maxAttempts || seq[0] != tc.lo {
			t.Fatalf("%+v: %d attempts, first %v", tc, len(seq), seq[0])
		}
		for _, d := range seq {
			if d < tc.lo || d > max(tc.hi, tc.lo) {
				t.Fatalf("%+v: attempt %v out of bounds", tc, d)
			}
		}
	}
}

func TestTimeoutStrategy(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    float64
		f    float64 // expected factor on the nominal timeout
	}{{"low", 0, 0.95}, {"mid", 0.5, 1}, {"high", 0.999999, 1.05}} {
		t.Run(tc.name, func(t *testing.T) {
			s := TimeoutStrategy{Min: time.Second, Max: 3 * time.Second, Total: 10 * time.Second, Rand: func() float64 { return tc.r }}
			nominal := AttemptTimeouts(time.Second, 3*time.Second, 10*time.Second)
			for i, n := range nominal {
				d, ok := s.NextAttempt()
				if !ok {
					t.Fatalf("exhausted after %d", i)
				}
				if want := float64(n) * tc.f; math.Abs(float64(d)-want) > float64(time.Microsecond) {
					t.Fatalf("attempt %d = %v, want %v", i, d, time.Duration(want))
				}
			}
			// Exhausted: block (no timeout), and keep saying so.
			for range 2 {
				if d, ok := s.NextAttempt(); ok || d != 0 {
					t.Fatalf("after exhaustion: %v %v", d, ok)
				}
			}
			ctx, cancel, exhausted := s.NextContext(context.Background())
			defer cancel()
			if _, has := ctx.Deadline(); has || !exhausted {
				t.Fatal("exhausted strategy gave a deadline")
			}
			s.Reset()
			ctx2, cancel2, exhausted := s.NextContext(context.Background())
			defer cancel2()
			if _, has := ctx2.Deadline(); !has || exhausted {
				t.Fatal("after Reset no deadline")
			}
		})
	}
	var zero TimeoutStrategy // Ganeti's defaults, real randomness
	d, ok := zero.NextAttempt()
	if !ok || d < 4750*time.Millisecond || d > 5250*time.Millisecond {
		t.Fatalf("zero strategy first attempt %v", d)
	}
}
