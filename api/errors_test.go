package api

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmlock/vmlock/lockmgr"
)

func TestErrorsSurviveTheWire(t *testing.T) {
	since := time.Date(2026, 11, 21, 12, 3, 4, 5, time.UTC)
	busy := &lockmgr.BusyError{Resource: lockmgr.DiskResource("/a b.qcow2", lockmgr.Shared),
		Holder: lockmgr.Holder{Name: "web1", UUID: "u-1", PID: 4242, Host: "h1", Mode: lockmgr.Exclusive, Since: since}}
	got := FromStatus(ToStatus(busy))
	var be *lockmgr.BusyError
	if !errors.As(got, &be) || be.Resource != busy.Resource || !be.Holder.Since.Equal(since) {
		t.Fatalf("busy error came back as %#v", got)
	}
	be.Holder.Since = since
	if be.Holder != busy.Holder || got.Error() != busy.Error() {
		t.Fatalf("busy holder %+v / message %q, want %+v / %q", be.Holder, got.Error(), busy.Holder, busy.Error())
	}
	stale := &lockmgr.StaleStateError{Resource: lockmgr.LeaseResource("ls", "k", lockmgr.Exclusive), Want: 3, Current: 5}
	var se *lockmgr.StaleStateError
	if got := FromStatus(ToStatus(stale)); !errors.As(got, &se) || *se != *stale {
		t.Fatalf("stale error came back as %#v", got)
	}
}

func TestEveryCodeMapsOneToOne(t *testing.T) {
	seen := map[codes.Code]lockmgr.Code{}
	for c := lockmgr.CodeInternal; c <= lockmgr.CodeNotHeld; c++ {
		err := ToStatus(lockmgr.Errorf(c, "something about %v", c))
		gc := status.Code(err)
		if prev, dup := seen[gc]; dup {
			t.Errorf("%v and %v both map to gRPC %v", prev, c, gc)
		}
		seen[gc] = c
		back := FromStatus(err)
		if lockmgr.CodeOf(back) != c {
			t.Errorf("%v came back as %v", c, lockmgr.CodeOf(back))
		}
		if back.Error() != "something about "+c.String() {
			t.Errorf("%v: message came back as %q", c, back.Error())
		}
	}
	if ToStatus(nil) != nil || FromStatus(nil) != nil {
		t.Fatal("nil is not nil across the mapping")
	}
	// A status that vmlockd did not make (the connection failed) is still classified.
	if c := lockmgr.CodeOf(FromStatus(status.Error(codes.DeadlineExceeded, "x"))); c != lockmgr.CodeTimeout {
		t.Fatalf("a bare deadline status is %v, want timeout", c)
	}
}

// A busy or stale-state error the daemon wrapped with what it was doing
// comes back reading as the daemon's whole message, still carrying the
// holder or the tokens.
func TestWrappedErrorsKeepTheDaemonsWholeMessage(t *testing.T) {
	busy := &lockmgr.BusyError{Resource: lockmgr.DiskResource("/copy.qcow2", lockmgr.Exclusive),
		Holder: lockmgr.Holder{Name: "web1", UUID: "u-1", PID: 4242, Mode: lockmgr.Exclusive}}
	wrapped := fmt.Errorf("the copy cannot start: %w", busy)
	got := FromStatus(ToStatus(wrapped))
	var be *lockmgr.BusyError
	if got.Error() != wrapped.Error() || !errors.As(got, &be) || be.Holder.PID != 4242 || lockmgr.CodeOf(got) != lockmgr.CodeBusy {
		t.Fatalf("wrapped busy error came back as %q (%#v), want %q", got, got, wrapped)
	}
	stale := fmt.Errorf("acquiring: %w", &lockmgr.StaleStateError{Resource: lockmgr.LeaseResource("ls", "k", lockmgr.Exclusive), Want: 3, Current: 5})
	got = FromStatus(ToStatus(stale))
	var se *lockmgr.StaleStateError
	if got.Error() != stale.Error() || !errors.As(got, &se) || se.Current != 5 {
		t.Fatalf("wrapped stale error came back as %q, want %q", got, stale)
	}
}
