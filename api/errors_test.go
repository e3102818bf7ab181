package api

import (
	"errors"
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
