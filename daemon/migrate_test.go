package daemon

import (
	"errors"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// The destination reads a handover state: the marker names it, every
// resource listed exclusive is taken shared pending an upgrade, and the
// state handed to the Manager no longer has the marker.
func TestHandoverStateOnTheDestination(t *testing.T) {
	d := &Daemon{cfg: Config{Host: "dst"}}
	st := lockmgr.State{
		{Resource: lockmgr.DiskResource("/img/a", lockmgr.Exclusive), Token: 7},
		{Resource: lockmgr.DiskResource("/img/b", lockmgr.Shared), Token: 9},
		{Resource: lockmgr.DiskResource("/img/c", lockmgr.ReadOnly)},
	}
	plain := st.String()
	rs, out, mig, err := d.handoverIn(nil, plain)
	if err != nil || mig != nil || out != plain || rs != nil {
		t.Fatalf("a plain state: %v %q %+v %v, want it unchanged", rs, out, mig, err)
	}

	marked := append(st, lockmgr.StateEntry{Resource: lockmgr.Resource{Type: migrationType, Name: "dst", Mode: lockmgr.ReadOnly}})
	rs, out, mig, err = d.handoverIn(nil, marked.String())
	if err != nil {
		t.Fatal(err)
	}
	if out != plain || strings.Contains(out, string(migrationType)) {
		t.Fatalf("state for the Manager %q, want %q", out, plain)
	}
	want := []lockmgr.Mode{lockmgr.Shared, lockmgr.Shared, lockmgr.ReadOnly}
	if len(rs) != 3 {
		t.Fatalf("resources from the state: %v", rs)
	}
	for i, r := range rs {
		if r.Mode != want[i] {
			t.Fatalf("resource %s taken %v, want %v", r, r.Mode, want[i])
		}
	}
	if mig == nil || mig.Role != roleTarget || len(mig.Pending) != 1 || mig.Pending[0].Name != "/img/a" || mig.Pending[0].Mode != lockmgr.Exclusive {
		t.Fatalf("mark %+v, want a target with /img/a pending exclusive", mig)
	}

	// Resources given by the caller decide the modes; those the state does
	// not list are taken as asked.
	rs, _, mig, err = d.handoverIn([]lockmgr.Resource{lockmgr.DiskResource("/img/a", lockmgr.Exclusive), lockmgr.DiskResource("/img/new", lockmgr.Exclusive)}, marked.String())
	if err != nil || rs[0].Mode != lockmgr.Shared || rs[1].Mode != lockmgr.Exclusive || len(mig.Pending) != 1 {
		t.Fatalf("given resources: %v %+v %v", rs, mig, err)
	}

	other := append(st, lockmgr.StateEntry{Resource: lockmgr.Resource{Type: migrationType, Name: "elsewhere", Mode: lockmgr.ReadOnly}})
	if _, _, _, err := d.handoverIn(nil, other.String()); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), `"elsewhere"`) {
		t.Fatalf("a state for another host: %v, want invalid argument naming it", err)
	}
}

func TestRestoredMigrationMarks(t *testing.T) {
	done := &migration{Role: roleTarget}
	if restoredMigration(done) != nil {
		t.Fatal("a finished handover's mark was kept")
	}
	pending := &migration{Role: roleTarget, Pending: []lockmgr.Resource{lockmgr.DiskResource("/a", lockmgr.Exclusive)}}
	src := &migration{Role: roleSource, Peer: "dst"}
	if restoredMigration(pending) != pending || restoredMigration(src) != src || restoredMigration(nil) != nil {
		t.Fatal("an unfinished handover's mark was dropped")
	}
}
