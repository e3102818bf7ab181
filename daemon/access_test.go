package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// A non-root client may lock only a disk it could use itself, as the kernel
// judges it for its uid, gid and groups; root may lock any.
func TestNonRootCallersMayUseOnlyTheirOwnFiles(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to check access as another uid")
	}
	const nobody, group = 65534, 4242
	top := t.TempDir()
	for _, d := range []string{filepath.Dir(top), top} { // both made 0700
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	file := func(rel string, mode os.FileMode, uid, gid int) string {
		p := filepath.Join(top, rel)
		if err := os.WriteFile(p, nil, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	dir := func(rel string, mode os.FileMode, uid int) string {
		p := filepath.Join(top, rel)
		if err := os.Mkdir(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, uid); err != nil {
			t.Fatal(err)
		}
		return p
	}
	rootsOnly := file("roots-only.img", 0o600, 0, 0)
	readable := file("readable.img", 0o644, 0, 0)
	nobodys := file("nobodys.img", 0o600, nobody, nobody)
	groups := file("groups.img", 0o660, 0, group)
	closed := dir("closed", 0o700, 0)
	inClosed := file("closed/disk.img", 0o666, 0, 0)
	open := dir("open", 0o755, nobody)

	member := caller{uid: nobody, gid: nobody, groups: []uint32{group}}
	other := caller{uid: nobody, gid: nobody}
	tests := []struct {
		name string
		c    caller
		path string
		mode lockmgr.Mode
		ok   bool
	}{
		{"root may lock a file only root may open", caller{uid: 0}, rootsOnly, lockmgr.Exclusive, true},
		{"a file only root may open", other, rootsOnly, lockmgr.Exclusive, false},
		{"a file only root may open, read-only", other, rootsOnly, lockmgr.ReadOnly, false},
		{"a readable file, exclusive", other, readable, lockmgr.Exclusive, false},
		{"a readable file, shared (shared disks are written too)", other, readable, lockmgr.Shared, false},
		{"a readable file, read-only", other, readable, lockmgr.ReadOnly, true},
		{"the caller's own file", other, nobodys, lockmgr.Exclusive, true},
		{"a file of a supplementary group of the caller", member, groups, lockmgr.Exclusive, true},
		{"a file of a group the caller is not in", other, groups, lockmgr.Exclusive, false},
		{"a writable file in a directory the caller cannot search", other, inClosed, lockmgr.Exclusive, false},
		{"a new file in the caller's directory", other, filepath.Join(open, "new", "disk.img"), lockmgr.Exclusive, true},
		{"a new file in root's directory", other, filepath.Join(closed, "new.img"), lockmgr.Exclusive, false},
		{"a lease names no file", other, "", lockmgr.Exclusive, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := lockmgr.DiskResource(tc.path, tc.mode)
			if tc.path == "" {
				r = lockmgr.LeaseResource("ls", "key", tc.mode)
			}
			err := mayUse(context.Background(), tc.c, r)
			if tc.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, lockmgr.ErrPermission) {
				t.Fatalf("got %v, want a permission error", err)
			}
			if !strings.Contains(err.Error(), "uid 65534 may not") {
				t.Fatalf("error %q does not say which uid may not do what", err)
			}
		})
	}
	// The checks ran on threads of their own: this one is still root's.
	if _, err := os.ReadFile(rootsOnly); err != nil {
		t.Fatalf("root cannot read its own file after the checks: %v", err)
	}
}
