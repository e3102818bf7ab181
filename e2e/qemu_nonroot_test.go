package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// QEMU run by a user other than root (nonRoot: nobody), a member of
// vmlockd's socket group.

var nonRoot = &syscall.Credential{Uid: 65534, Gid: 65534}

// nobodysVM is a daemon whose socket group is nobody's, and a VM that
// nobody runs on its own chain, in its own directory.
func nobodysVM(t *testing.T) (*daemon, *vchain, *vm) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run QEMU as another uid")
	}
	needQEMU(t)
	d := startDaemon(t, "--socket-group", "65534")
	ch := makeVChain(t)
	for _, p := range []string{ch.dir, ch.base, ch.mid, ch.top, ch.ref} {
		if err := os.Chown(p, int(nonRoot.Uid), int(nonRoot.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	return d, ch, d.startVMAs(nonRoot, "vm1", ch.dir, driveArg(ch.top)...)
}

// wantOwnImage checks that p is owned by nobody with the mode qemu-img
// gives a new image (0644 under vmlockd's umask, 022).
func wantOwnImage(t *testing.T, p string) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != nonRoot.Uid || st.Gid != nonRoot.Gid || fi.Mode().Perm() != 0o644 {
		t.Fatalf("%s: owner %d:%d mode %v, want %d:%d -rw-r--r--", p, st.Uid, st.Gid, fi.Mode().Perm(), nonRoot.Uid, nonRoot.Gid)
	}
}

// Root copies the disk of nobody's VM into a new image: vmlockd creates it
// as the VM's user would, so that QEMU can open it, and the copy pivots.
func TestQEMUBlockCopyByRootOfANonRootVMCreatesTheTargetAsTheVMsUser(t *testing.T) {
	d, ch, v := nobodysVM(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	mustContain(t, "blockcopy --wait", d.mustRun("blockcopy", "vm1", "drive0", dest, "--wait"), "Now in mirroring phase")
	wantOwnImage(t, dest)
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared, dest: lockmgr.Exclusive})
	d.mustRun("blockjob", "vm1", "drive0", "--pivot")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, dest)
}

// The VM's user copies its disk into a new image in its own directory: the
// image is its own, and the copy pivots.
func TestQEMUBlockCopyByANonRootUserCreatesItsTargetInItsOwnDirectory(t *testing.T) {
	d, ch, v := nobodysVM(t)
	dest := filepath.Join(ch.dir, "copy.qcow2")
	if r := d.vmlockAs(nonRoot, "blockcopy", "vm1", "drive0", dest, "--pivot"); r.code != 0 {
		t.Fatalf("nobody's blockcopy --pivot: exit %d: %s", r.code, r.stderr)
	}
	wantOwnImage(t, dest)
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, dest)
}

// vmlockd creates a copy target as root: for a non-root user it creates
// one only where that user could create it itself.
func TestQEMUBlockCopyByANonRootUserIntoADirectoryItMayNotWriteIsRefused(t *testing.T) {
	d, ch, v := nobodysVM(t)
	rootsDir := t.TempDir()
	for _, dir := range []string{filepath.Dir(rootsDir), rootsDir} { // searchable, root's to write
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	dest := filepath.Join(rootsDir, "copy.qcow2")
	r := d.vmlockAs(nonRoot, "blockcopy", "vm1", "drive0", dest)
	if r.code != int(lockmgr.CodePermission) || !strings.Contains(r.stderr, "may not create files in "+rootsDir) {
		t.Fatalf("nobody's blockcopy into root's directory: exit %d (%s), want %d saying it may not create files there", r.code, r.stderr, lockmgr.CodePermission)
	}
	if _, err := os.Lstat(dest); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after the refused blockcopy: %v, want no file", err)
	}
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	if got := d.jobInfo("vm1", "drive0")["phase"]; got != "none" {
		t.Fatalf("the refused copy left a job: %v", got)
	}
}
