//go:build !race

// The race detector allocates on its own: these counts hold without it.

package virtlockd

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// registerAllocs returns the allocations of a REGISTER of o on the
// connection c, which libvirt sends before every ACQUIRE and RELEASE.
func registerAllocs(t *testing.T, s *Server, c *conn, o Owner) float64 {
	t.Helper()
	msg, err := AppendCall(nil, 1, &RegisterArgs{Owner: o})
	if err != nil {
		t.Fatal(err)
	}
	h := decodeHeader(msg[4:MinMessageSize])
	payload := msg[MinMessageSize:]
	return testing.AllocsPerRun(100, func() {
		if rerr, _ := s.dispatch(t.Context(), c, h, payload); rerr != nil {
			t.Fatal(rerr)
		}
	})
}

// REGISTER, which libvirt sends before every ACQUIRE and RELEASE, waits on
// nothing: it is served without a deadline timer, decoded into the
// connection's own arguments (only the owner's name is a new string), and
// registering the connection's owner again checks nothing again; a new
// owner is checked once.
func TestAllocsOfARegister(t *testing.T) {
	s, err := NewServer(Config{Manager: lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})})
	if err != nil {
		t.Fatal(err)
	}
	c := &conn{peer: &Peer{}}
	o := owner("register", fakePID)
	if n := registerAllocs(t, s, c, o); n > 1 {
		t.Fatalf("%v allocations per REGISTER of the connection's owner, want at most 1 (its name)", n)
	}
	o.PID++
	if n := registerAllocs(t, s, c, o); n > 1 {
		t.Fatalf("%v allocations per REGISTER of the connection's owner, want at most 1 (its name)", n)
	}
}

// Finding a resource among an owner's leases, which every ACQUIRE and
// RELEASE does, compares keys without building them.
func TestAllocsOfFindingALease(t *testing.T) {
	disk := lockmgr.DiskResource("/var/lib/libvirt/images/a-long-enough-name.qcow2", lockmgr.Exclusive)
	leases := testLeases(disk)
	key := disk.Key()
	if n := testing.AllocsPerRun(100, func() {
		heldAs(leases, disk)
		heldKey(leases, key)
	}); n != 0 {
		t.Fatalf("%v allocations to find a lease, want 0", n)
	}
}

// Every Manager call looks its object up by a UUID that is canonical
// already (lower case): it is taken as it is.
func TestAllocsOfParsingACanonicalUUID(t *testing.T) {
	u := formatUUID([16]byte{0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
	if n := testing.AllocsPerRun(100, func() {
		if _, err := lockmgr.ParseUUID(u); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("%v allocations to parse a canonical UUID, want 0", n)
	}
}

// Every RELEASE builds the state string of what it released (the Manager
// returns it; the server has no use for it): it costs the string only.
func TestAllocsOfAStateString(t *testing.T) {
	st := lockmgr.State{
		{Resource: lockmgr.DiskResource("/var/lib/libvirt/images/a-long-enough-name,with:escapes.qcow2", lockmgr.Exclusive), Token: 1 << 40},
		{Resource: lockmgr.LeaseResource("cluster", "vm1", lockmgr.Shared), Token: 7},
	}
	if n := testing.AllocsPerRun(100, func() { _ = st.String() }); n != 1 {
		t.Fatalf("%v allocations per state string, want 1", n)
	}
}

// A cycle of REGISTER, ACQUIRE and RELEASE of a disk, as libvirt sends
// for a domain with one disk that starts and pauses, on the NopDriver: the
// lock table and the server allocate what the count below allows, no more.
func TestAllocsOfACycle(t *testing.T) {
	s, err := NewServer(Config{Manager: lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})})
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "a-long-enough-image-name.qcow2")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := &conn{peer: &Peer{}}
	type call struct {
		h       Header
		payload []byte
	}
	var calls []call
	for i, a := range []Args{&RegisterArgs{Owner: owner("cycle", fakePID)}, &AcquireResourceArgs{Name: img}, &ReleaseResourceArgs{Name: img}} {
		msg, err := AppendCall(nil, uint32(i), a)
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, call{decodeHeader(msg[4:MinMessageSize]), msg[MinMessageSize:]})
	}
	const want = 34
	if n := testing.AllocsPerRun(100, func() {
		for _, cl := range calls {
			if rerr, _ := s.dispatch(t.Context(), c, cl.h, cl.payload); rerr != nil {
				t.Fatal(rerr)
			}
		}
	}); n > want {
		t.Fatalf("%v allocations per cycle, want at most %d", n, want)
	}
}
