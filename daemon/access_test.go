package daemon

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
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
		{"a readable file, shared (a backing file)", other, readable, lockmgr.Shared, true},
		{"a file only root may open, shared", other, rootsOnly, lockmgr.Shared, false},
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

// A QEMU's images are checked against the identity of its process: what
// it could open itself, whatever it reports on its monitor.
func TestQEMUImagesAreCheckedAsTheVMsProcess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another uid")
	}
	start := func(cred *syscall.Credential) int {
		cmd := exec.Command("sleep", "300")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd.Process.Pid
	}
	nobodys := start(&syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{4242, 4243}})
	roots := start(nil)

	c, err := processCaller(nobodys)
	if err != nil {
		t.Fatal(err)
	}
	if c.uid != 65534 || c.gid != 65534 || !slices.Equal(c.groups, []uint32{4242, 4243}) || c.pid != nobodys {
		t.Fatalf("processCaller of nobody's sleep: %+v", c)
	}
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	secret := filepath.Join(dir, "secret.img")
	if err := os.WriteFile(secret, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r := lockmgr.DiskResource(secret, lockmgr.Exclusive)
	if err := (&qemuVM{pid: nobodys}).mayUse(context.Background(), r); !errors.Is(err, lockmgr.ErrPermission) {
		t.Fatalf("nobody's QEMU reporting root's file: %v, want a permission error", err)
	}
	if err := (&qemuVM{pid: roots}).mayUse(context.Background(), r); err != nil {
		t.Fatalf("root's QEMU: %v", err)
	}
	if err := (&qemuVM{pid: 1 << 30}).mayUse(context.Background(), r); !errors.Is(err, lockmgr.ErrPermission) {
		t.Fatalf("a QEMU that is gone: %v, want a permission error", err)
	}
}

func TestCallerCredentialIsForNonRootOnly(t *testing.T) {
	if cred := (caller{uid: 0}).credential(); cred != nil {
		t.Fatalf("root's credential %+v, want nil (vmlockd's own)", cred)
	}
	if cred := (caller{uid: os.Geteuid()}).credential(); cred != nil {
		t.Fatalf("the daemon's own uid: credential %+v, want nil", cred)
	}
	other := os.Geteuid() + 1000
	cred := (caller{uid: other, gid: 7, groups: []uint32{8, 9}}).credential()
	if cred == nil || cred.Uid != uint32(other) || cred.Gid != 7 || !slices.Equal(cred.Groups, []uint32{8, 9}) {
		t.Fatalf("credential %+v", cred)
	}
}

// An identity the kernel does not take (here an invalid uid, which setfsuid
// ignores, as it ignores any uid from a vmlockd without CAP_SETUID) fails
// the check closed, and the error says it is vmlockd's failure.
func TestMayUseFailsClosedWhenTheIdentityIsNotTaken(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	err := mayUse(context.Background(), caller{uid: -1, gid: os.Getegid()}, lockmgr.DiskResource(p, lockmgr.Exclusive))
	if !errors.Is(err, lockmgr.ErrPermission) || !errors.Is(err, errNoIdentity) || !strings.Contains(err.Error(), "cannot check whether") {
		t.Fatalf("got %v, want a permission error saying vmlockd cannot check", err)
	}
}
