package hierlock

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestErrorMessagesAndMatching(t *testing.T) {
	for _, tc := range []struct {
		err   error
		kind  Kind
		parts []string
	}{
		{&Error{Kind: ErrNotFound, Lock: "node/n1", Owner: "job1"}, ErrNotFound, []string{"node/n1", "not found, it may have been removed", `"job1"`}},
		{&Error{Kind: ErrExists, Lock: "node", Names: []string{"a", "b"}}, ErrExists, []string{"already exists", `["a" "b"]`}},
		{timeoutError("l", "o", "busy"), ErrTimeout, []string{"l: timeout: busy"}},
		{&OrderViolationError{Op: "acquire", Owner: "o", Lock: "instance/i1", Held: "node/n1", Rule: RuleLevelOrder}, ErrOrderViolation,
			[]string{`owner "o" cannot acquire instance/i1 while holding node/n1`, "levels are acquired in order"}},
		{ErrDeleted, ErrDeleted, []string{"hierlock: deleted lock"}},
	} {
		if !errors.Is(tc.err, tc.kind) {
			t.Errorf("%v does not match %v", tc.err, tc.kind)
		}
		for _, k := range []Kind{ErrInvalid, ErrCanceled} {
			if errors.Is(tc.err, k) {
				t.Errorf("%v matches %v", tc.err, k)
			}
		}
		for _, p := range tc.parts {
			if !strings.Contains(tc.err.Error(), p) {
				t.Errorf("%q lacks %q", tc.err.Error(), p)
			}
		}
	}
	if !errors.Is(timeoutError("l", "o", ""), context.DeadlineExceeded) {
		t.Error("timeout does not match context.DeadlineExceeded")
	}
	if Kind(200).String() != "kind(200)" || Rule(200).String() != "rule(200)" || Mode(9).String() != "mode(9)" || State(9).String() != "state(9)" {
		t.Error("unknown values not printed as such")
	}
}

// An explicitly injected RealClock behaves like the default.
func TestInjectedRealClock(t *testing.T) {
	l := NewSharedLock("l", RealClock{})
	must(t, l.Acquire(bg, "a", Exclusive, 0))
	wantKind(t, l.Acquire(timeoutCtx(10*time.Millisecond), "b", Exclusive, 0), ErrTimeout)
	w := async(func() error { return l.Acquire(timeoutCtx(time.Minute), "b", Exclusive, 0) })
	waitQueued(t, l, "b")
	must(t, l.Release("a"))
	must(t, result(t, w))
}
