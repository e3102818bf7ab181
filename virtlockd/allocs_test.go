//go:build !race

// The race detector allocates on its own: these counts hold without it.

package virtlockd

import (
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
func TestRegisterIsCheap(t *testing.T) {
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

// formatUUID writes libvirt's uuid form, as lockmgr parses it.
func TestFormatUUID(t *testing.T) {
	u := [16]byte{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10}
	const want = "01234567-89ab-cdef-fedc-ba9876543210"
	if got := formatUUID(u); got != want {
		t.Fatalf("formatUUID = %q, want %q", got, want)
	}
	if got, err := lockmgr.ParseUUID(want); err != nil || got != want {
		t.Fatalf("lockmgr.ParseUUID(%q) = %q, %v", want, got, err)
	}
}

type testLease struct{ r lockmgr.Resource }

func (l testLease) Resource() lockmgr.Resource { return l.r }
func (l testLease) Token() uint64              { return 1 }

// Finding a resource among an owner's leases, which every ACQUIRE and
// RELEASE does, compares keys without building them, and finds the same.
func TestLeasesAreFoundWithoutBuildingKeys(t *testing.T) {
	disk := lockmgr.DiskResource("/var/lib/libvirt/images/a-long-enough-name.qcow2", lockmgr.Exclusive)
	other := lockmgr.DiskResource("/var/lib/libvirt/images/another-long-name.qcow2", lockmgr.Exclusive)
	lease := lockmgr.LeaseResource("libvirt", "disk", lockmgr.Exclusive)
	leases := []lockmgr.Lease{testLease{other}, testLease{lease}, testLease{disk}}
	for _, r := range []lockmgr.Resource{disk, other, lease} {
		if h, ok := heldAs(leases, r); !ok || h != r {
			t.Fatalf("heldAs(%v) = %v, %v", r, h, ok)
		}
		if h, ok := heldKey(leases, r.Key()); !ok || h != r {
			t.Fatalf("heldKey(%q) = %v, %v", r.Key(), h, ok)
		}
	}
	for _, key := range []string{"disk:/var", "lease:" + disk.Name, "disk" + disk.Name, "disk:" + disk.Name + "x", ""} {
		if h, ok := heldKey(leases, key); ok {
			t.Fatalf("heldKey(%q) = %v", key, h)
		}
	}
	key := disk.Key()
	if n := testing.AllocsPerRun(100, func() {
		heldAs(leases, disk)
		heldKey(leases, key)
	}); n != 0 {
		t.Fatalf("%v allocations to find a lease, want 0", n)
	}
}
