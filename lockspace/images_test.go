package lockspace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// rawBusy reports whether the file now at path is locked by somebody: an
// OFD lock from a new open file description conflicts with every other
// one, in this process too.
func rawBusy(t *testing.T, path string) bool {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	switch err := tryLock(fd, unix.F_WRLCK, lockByte); err {
	case nil:
		_ = unlock(fd, 0, 0)
		return false
	case unix.EAGAIN:
		return true
	default:
		t.Fatal(err)
		return false
	}
}

// isKept reports whether d keeps a descriptor of path.
func isKept(d *Driver, path string) bool {
	d.images.mu.Lock()
	defer d.images.mu.Unlock()
	return d.images.byPath[path] != nil
}

// openFdsOf lists this process's descriptors open on path (or on its
// removed file, "path (deleted)").
func openFdsOf(t *testing.T, path string) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []string
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && (l == path || l == path+" (deleted)") {
			fds = append(fds, e.Name())
		}
	}
	return fds
}

// A released direct lease's descriptor is kept for the next grant; what
// the path names may change meanwhile, and the next grant must lock what
// it names then.
func TestAKeptImageDescriptorIsNotUsedOnceThePathNamesAnotherFile(t *testing.T) {
	cases := []struct {
		name    string
		replace func(t *testing.T, path string)
		wantErr lockmgr.Code // the next acquire fails so, if set
	}{
		{name: "a file renamed over it", replace: func(t *testing.T, path string) {
			mustWrite(t, path+".new")
			must(t, os.Rename(path+".new", path))
		}},
		{name: "removed and made again", replace: func(t *testing.T, path string) {
			must(t, os.Remove(path))
			mustWrite(t, path)
		}},
		{name: "its directory renamed and made again", replace: func(t *testing.T, path string) {
			dir := filepath.Dir(path)
			must(t, os.Rename(dir, dir+".old"))
			must(t, os.Mkdir(dir, 0o700))
			mustWrite(t, path)
		}},
		{name: "a directory further up renamed and made again", replace: func(t *testing.T, path string) {
			up := filepath.Dir(filepath.Dir(path))
			must(t, os.Rename(up, up+".old"))
			must(t, os.MkdirAll(filepath.Dir(path), 0o700))
			mustWrite(t, path)
		}},
		{name: "its directory swapped for a symlink", wantErr: lockmgr.CodeInvalidArgument, replace: func(t *testing.T, path string) {
			dir := filepath.Dir(path)
			elsewhere := dir + ".elsewhere"
			must(t, os.Mkdir(elsewhere, 0o700))
			mustWrite(t, filepath.Join(elsewhere, filepath.Base(path)))
			must(t, os.Rename(dir, dir+".old"))
			must(t, os.Symlink(elsewhere, dir))
		}},
		{name: "a file system mounted over its directory", replace: func(t *testing.T, path string) {
			if os.Geteuid() != 0 {
				t.Skip("mounting needs root")
			}
			dir := filepath.Dir(path)
			must(t, unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"))
			t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
			mustWrite(t, path)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, false)
			d := e.driver(t)
			dir := filepath.Join(e.root, "images", "vm1", "disks")
			must(t, os.MkdirAll(dir, 0o700))
			path := filepath.Join(dir, "disk.img")
			mustWrite(t, path)
			r, err := lockmgr.Canonical(lockmgr.DiskResource(path, lockmgr.Exclusive))
			must(t, err)
			first := cycle(t, d, r)
			if !isKept(d, r.Name) {
				t.Fatal("the released lease's descriptor was not kept: this test tests nothing")
			}
			c.replace(t, r.Name)
			ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
			if c.wantErr != 0 {
				wantCode(t, err, c.wantErr)
				if rawBusy(t, r.Name) {
					t.Fatal("the file the path names now is locked after a refused acquire")
				}
				return
			}
			must(t, err)
			defer d.Release(ctx, ls)
			if !rawBusy(t, r.Name) {
				t.Fatal("granted, but the file the path names now is not locked: the kept descriptor of the old one was used")
			}
			if ls[0].Token() <= first {
				t.Fatalf("token %d after %d", ls[0].Token(), first)
			}
		})
	}
}

func TestAKeptImageDescriptorStillExcludesOthers(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.DiskResource(e.image(t, "disk.img", true), lockmgr.Exclusive)
	cycle(t, d, r)
	if !isKept(d, r.Name) {
		t.Fatal("the released lease's descriptor was not kept: this test tests nothing")
	}
	h := spawn(t, helperArgs{Mode: "hold", Cfg: e.cfg, Reqs: reqsOf(otherHolder(lockmgr.Exclusive), r)})
	h.expect("ok")
	_, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
	var be *lockmgr.BusyError
	if !errors.As(err, &be) || be.Holder.Name != otherHolder(lockmgr.Exclusive).Name {
		t.Fatalf("acquire while another process holds it: %v, want busy naming %q", err, otherHolder(lockmgr.Exclusive).Name)
	}
	h.release()
	h.stop(false)
	cycle(t, d, r)
}

// The daemon passes each lease's file to its lock-holder: such a
// descriptor has copies elsewhere and is closed, never kept.
func TestADescriptorPassedOutIsNotKept(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.DiskResource(e.image(t, "disk.img", true), lockmgr.Exclusive)
	cycle(t, d, r) // kept
	for range 2 {
		ls, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r))
		must(t, err)
		if ls[0].(lockmgr.FileLease).File() == nil {
			t.Fatal("no file")
		}
		must(t, d.Release(ctx, ls))
		if isKept(d, r.Name) {
			t.Fatal("a descriptor passed out by File is kept after release")
		}
		if fds := openFdsOf(t, r.Name); len(fds) != 0 {
			t.Fatalf("descriptors %v still open on the image", fds)
		}
		if rawBusy(t, r.Name) {
			t.Fatal("the image is still locked after release")
		}
	}
}

// A kept descriptor keeps its file: one of a removed image is closed soon,
// so that the image's space is freed, and so is one unused for the TTL.
func TestKeptImageDescriptorsAreClosed(t *testing.T) {
	cases := []struct {
		name string
		ttl  time.Duration
		then func(t *testing.T, path string)
	}{
		{name: "when the image is removed", ttl: time.Hour, then: func(t *testing.T, path string) { must(t, os.Remove(path)) }},
		{name: "when unused for the TTL", ttl: 50 * time.Millisecond, then: func(*testing.T, string) {}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, false)
			d := e.driver(t)
			d.images.ttl, d.images.sweepEvery = c.ttl, 10*time.Millisecond
			r := lockmgr.DiskResource(e.image(t, "disk.img", true), lockmgr.Exclusive)
			cycle(t, d, r)
			if len(openFdsOf(t, r.Name)) != 1 {
				t.Fatal("the released lease's descriptor was not kept: this test tests nothing")
			}
			c.then(t, r.Name)
			deadline := time.Now().Add(10 * time.Second)
			for len(openFdsOf(t, r.Name)) != 0 || isKept(d, r.Name) {
				if time.Now().After(deadline) {
					t.Fatalf("descriptors %v still open after 10 s", openFdsOf(t, r.Name))
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}

func TestClosingTheDriverClosesKeptDescriptors(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.DiskResource(e.image(t, "disk.img", true), lockmgr.Exclusive)
	cycle(t, d, r)
	held, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), r)) // lent the kept one
	must(t, err)
	must(t, d.Close())
	if !rawBusy(t, r.Name) {
		t.Fatal("Close released a held lease")
	}
	must(t, d.Release(ctx, held))
	if fds := openFdsOf(t, r.Name); len(fds) != 0 {
		t.Fatalf("descriptors %v still open after Close and Release", fds)
	}
	if rawBusy(t, r.Name) {
		t.Fatal("still locked after Release")
	}
}

// A direct lease's token file is mapped once it holds a record; the
// mapping sees what other programs write, and a file cut short under it
// does not crash the driver.
func TestAMappedTokenFile(t *testing.T) {
	if !littleEndian() {
		t.Skip("token files are mapped on little-endian hosts only")
	}
	e := newEnv(t, false)
	d := e.driver(t)
	r := lockmgr.DiskResource(e.image(t, "disk.img", true), lockmgr.Exclusive)
	cycle(t, d, r)
	cycle(t, d, r)
	tf := e.recordPath(r)
	b, err := os.ReadFile(tf)
	must(t, err)
	if len(b) != mapSize || !strings.HasSuffix(string(b), mapSentinel) {
		t.Fatalf("token file is %d bytes ending %q, want %d ending with the sentinel", len(b), b[max(0, len(b)-16):], mapSize)
	}

	t.Run("a token written in place is continued from", func(t *testing.T) {
		f, err := os.OpenFile(tf, os.O_WRONLY, 0)
		must(t, err)
		_, err = f.WriteAt(binary.LittleEndian.AppendUint64(nil, 1000), 0)
		must(t, err)
		must(t, f.Close())
		if got := cycle(t, d, r); got != 1001 {
			t.Fatalf("token %d after 1000 was written in place, want 1001", got)
		}
	})
	t.Run("a file truncated to nothing reads as new, without a crash", func(t *testing.T) {
		// As with pread: an empty record file cannot be told from a new one
		// (docs/operations.md).
		must(t, os.Truncate(tf, 0))
		if got := cycle(t, d, r); got != 1 {
			t.Fatalf("token %d after the file was emptied, want 1", got)
		}
		if got := cycle(t, d, r); got != 2 {
			t.Fatalf("token %d next, want 2", got)
		}
		if b, _ := os.ReadFile(tf); len(b) != mapSize {
			t.Fatalf("the token file is %d bytes after the next grants, want it mapped again (%d)", len(b), mapSize)
		}
	})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func mustWrite(t *testing.T, path string) {
	t.Helper()
	must(t, os.WriteFile(path, []byte("QFI\xfb"), 0o600))
}

// A direct lease may lock a block device (an LVM volume, a LUN). A kept
// descriptor would hold the device open, and a device that is open cannot
// be removed (lvremove and dmsetup remove say it is in use; a loop device's
// detach waits for the last close): released, its descriptor is closed.
func TestABlockDeviceIsFreeToBeRemovedOnceItsLeaseIsReleased(t *testing.T) {
	dev := loopDevice(t)
	e := newEnv(t, false)
	d := e.driver(t)
	r, err := lockmgr.Canonical(lockmgr.DiskResource(dev, lockmgr.Exclusive))
	must(t, err)
	cycle(t, d, r)
	if fds := openFdsOf(t, r.Name); len(fds) != 0 {
		t.Errorf("descriptors %v still open on the device after release", fds)
	}
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	must(t, err)
	err = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
	_ = unix.Close(fd)
	must(t, err)
	fd, err = unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	must(t, err)
	defer unix.Close(fd)
	if _, err := unix.IoctlLoopGetStatus64(fd); err != unix.ENXIO {
		t.Fatalf("the loop device is still attached after its detach (%v): something still has it open", err)
	}
}

// loopDevice attaches a new loop device to a small file and returns its
// path; it is detached at the end of the test. It skips the test where
// loop devices cannot be made (not root, a container without them).
func loopDevice(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("attaching a loop device needs root")
	}
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no loop devices: %v", err)
	}
	defer unix.Close(ctl)
	backing := filepath.Join(t.TempDir(), "backing.img")
	must(t, os.WriteFile(backing, make([]byte, 1<<20), 0o600))
	bfd, err := unix.Open(backing, unix.O_RDWR|unix.O_CLOEXEC, 0)
	must(t, err)
	defer unix.Close(bfd)
	for range 10 { // another process may take the free device first
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			t.Skipf("no free loop device: %v", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		fd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Skipf("cannot open %s: %v", dev, err)
		}
		err = unix.IoctlSetInt(fd, unix.LOOP_SET_FD, bfd)
		if err == unix.EBUSY {
			_ = unix.Close(fd)
			continue
		}
		if err != nil {
			_ = unix.Close(fd)
			t.Skipf("cannot attach %s: %v", dev, err)
		}
		_ = unix.Close(fd) // the device stays attached until detached
		t.Cleanup(func() {
			if fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
				_ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0) // ENXIO if detached already
				_ = unix.Close(fd)
			}
		})
		return dev
	}
	t.Skip("no loop device stayed free")
	return ""
}

// Only a Release adds a kept descriptor: an Acquire that fails closes what
// it opened, so a program whose grants all pass their files out (vmlockd)
// keeps nothing open.
func TestAFailedAcquireKeepsNoDescriptor(t *testing.T) {
	e := newEnv(t, false)
	d := e.driver(t)
	free := lockmgr.DiskResource(e.image(t, "free.img", true), lockmgr.Exclusive)
	taken := lockmgr.DiskResource(e.image(t, "taken.img", true), lockmgr.Exclusive)
	h := spawn(t, helperArgs{Mode: "hold", Cfg: e.cfg, Reqs: reqsOf(otherHolder(lockmgr.Exclusive), taken)})
	h.expect("ok")
	defer h.stop(false)
	for _, rs := range [][]lockmgr.Resource{{taken}, {free, taken}} {
		_, err := d.Acquire(ctx, reqsOf(myHolder(lockmgr.Exclusive), rs...))
		if !errors.Is(err, lockmgr.ErrBusy) {
			t.Fatalf("acquire of %v: %v, want busy", rs, err)
		}
		for _, r := range rs {
			if isKept(d, r.Name) || len(openFdsOf(t, r.Name)) != 0 {
				t.Fatalf("%s is still open after the failed acquire of %v", r.Name, rs)
			}
		}
	}
}
