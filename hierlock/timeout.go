package hierlock

import (
	"context"
	"math"
	"math/rand/v2"
	"sync"
	"time"
)

// Ganeti's lock-attempt parameters (constants.LOCK_ATTEMPTS_*).
const (
	DefaultAttemptMin   = 5 * time.Second    // the first attempt
	DefaultAttemptMax   = 75 * time.Second   // no attempt is longer
	DefaultAttemptTotal = 1800 * time.Second // attempts until their sum reaches this
)

// maxAttempts bounds a sequence whatever its parameters (a tiny Min would
// otherwise make billions of attempts).
const maxAttempts = 10000

// AttemptTimeouts returns Ganeti's sequence of lock-attempt timeouts,
// without jitter: t0 = lo, then t = clamp((previous·1.05)^1.25, lo, hi),
// with t in seconds, until their sum reaches total. Zero or negative
// arguments take the defaults; hi below lo is raised to lo. The defaults
// give 28 attempts: 5 s, 7.95 s, 14.18 s, 29.25 s, 72.31 s, then 75 s 23
// times.
func AttemptTimeouts(lo, hi, total time.Duration) []time.Duration {
	if lo <= 0 {
		lo = DefaultAttemptMin
	}
	if hi <= 0 {
		hi = DefaultAttemptMax
	}
	hi = max(hi, lo)
	if total <= 0 {
		total = DefaultAttemptTotal
	}
	out := []time.Duration{lo}
	sum := lo
	for sum < total && len(out) < maxAttempts {
		prev := out[len(out)-1].Seconds()
		t := time.Duration(math.Pow(prev*1.05, 1.25) * float64(time.Second))
		t = max(min(t, hi), lo)
		out = append(out, t)
		sum += t
	}
	return out
}

// TimeoutStrategy is Ganeti's LockAttemptTimeoutStrategy: each call to
// NextAttempt returns the next timeout of AttemptTimeouts(Min, Max, Total)
// with ±5 % jitter (so that jobs fighting over the same locks drift apart),
// and once the sequence is exhausted it says to block. Ganeti's job
// processor then raises the job's priority by one (towards -20), calls
// Reset and starts over, and acquires without timeout only at the highest
// priority; a caller does the same with Reset.
//
// The zero value uses Ganeti's defaults and math/rand/v2. It is safe for
// concurrent use, though one strategy normally serves one job.
type TimeoutStrategy struct {
	Min, Max, Total time.Duration
	// Rand returns a float in [0, 1) for the jitter; nil uses math/rand/v2.
	Rand func() float64

	mu   sync.Mutex
	seq  []time.Duration
	next int
}

// NextAttempt returns the next attempt's timeout and true, or 0 and false
// once the attempts are exhausted: then the caller should acquire without
// timeout (block).
func (s *TimeoutStrategy) NextAttempt() (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seq == nil {
		s.seq = AttemptTimeouts(s.Min, s.Max, s.Total)
	}
	if s.next >= len(s.seq) {
		return 0, false
	}
	t := s.seq[s.next]
	s.next++
	r := s.Rand
	if r == nil {
		r = rand.Float64
	}
	spread := float64(t) * 0.1
	return t + time.Duration(r()*spread-spread/2), true
}

// Reset starts the sequence over.
func (s *TimeoutStrategy) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.next = 0
}

// NextContext derives the context for the next attempt: parent with the
// next timeout, or, once exhausted, parent unchanged (block) and exhausted
// true. The caller must call cancel.
func (s *TimeoutStrategy) NextContext(parent context.Context) (ctx context.Context, cancel context.CancelFunc, exhausted bool) {
	if t, ok := s.NextAttempt(); ok {
		ctx, cancel = context.WithTimeout(parent, t)
		return ctx, cancel, false
	}
	ctx, cancel = context.WithCancel(parent)
	return ctx, cancel, true
}
