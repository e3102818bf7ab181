package virtlockd

import (
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

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

// testLeases returns leases of r among others, as an owner holds them.
func testLeases(r lockmgr.Resource) []lockmgr.Lease {
	other := lockmgr.DiskResource("/var/lib/libvirt/images/another-long-name.qcow2", lockmgr.Exclusive)
	lease := lockmgr.LeaseResource("libvirt", "disk", lockmgr.Exclusive)
	return []lockmgr.Lease{testLease{other}, testLease{lease}, testLease{r}}
}

// A resource is found among an owner's leases by its key, whatever its
// type, and a key that only resembles one is not found.
func TestLeasesAreFoundByTheirKey(t *testing.T) {
	disk := lockmgr.DiskResource("/var/lib/libvirt/images/a-long-enough-name.qcow2", lockmgr.Exclusive)
	leases := testLeases(disk)
	for _, l := range leases {
		r := l.Resource()
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
}
