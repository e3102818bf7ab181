package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
	"github.com/vmlock/vmlock/qemu"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

// The QEMU supervisor runs against real QEMU in the e2e tests; these test
// its lock policy on fixed graphs.

func images(paths ...string) []qemu.Image {
	var out []qemu.Image
	for i, p := range paths {
		out = append(out, qemu.Image{Node: fmt.Sprint("n", i), Path: p})
	}
	return out
}

func TestWantedModes(t *testing.T) {
	disks := []qemu.Disk{
		{Name: "vda", Images: images("/a/top", "/a/mid", "/base")},
		{Name: "vdb", Images: images("/b/top", "/base")},                   // another overlay of the same base
		{Name: "vdc", ShareRW: true, Images: images("/c/shared", "/c/bk")}, // a cluster disk
		{Name: "cd", ReadOnly: true, Images: images("/iso", "/iso-base")},
		{Name: "nbd", Images: images("")}, // not a local file
	}
	vm := &qemuVM{jobs: map[string]*blockJob{}}
	want := vm.wanted(disks)
	exp := map[string]lockmgr.Mode{
		"/a/top": lockmgr.Exclusive, "/a/mid": lockmgr.Shared, "/base": lockmgr.Shared,
		"/b/top": lockmgr.Exclusive, "/c/shared": lockmgr.Shared, "/c/bk": lockmgr.Shared,
		"/iso": lockmgr.ReadOnly, "/iso-base": lockmgr.ReadOnly,
	}
	if fmt.Sprint(want) != fmt.Sprint(exp) {
		t.Fatalf("wanted\n got %v\nwant %v", want, exp)
	}

	// A live commit job's base is exclusive; an ended one's is not; a
	// copy's target is exclusive even before QEMU lists it.
	vm.jobs["vda"] = &blockJob{rec: jobRecord{Type: jobActiveCommit, Top: "/a/top", Base: "/base"}}
	vm.jobs["vdb"] = &blockJob{rec: jobRecord{Type: jobCopy, Top: "/b/top", Target: "/b/copy"}}
	vm.jobs["vdc"] = &blockJob{rec: jobRecord{Type: jobCommit, Top: "/c/shared", Base: "/c/bk"}, ended: true}
	want = vm.wanted(disks)
	if want["/base"] != lockmgr.Exclusive || want["/b/copy"] != lockmgr.Exclusive || want["/c/bk"] != lockmgr.Shared {
		t.Fatalf("with jobs: %v", want)
	}
}

func TestFindDisk(t *testing.T) {
	disks := []qemu.Disk{
		{Name: "drive0", Device: "drive0", Root: "#block1", Node: "#block2", Images: images("/img/top", "/img/base")},
		{Name: "vd1", QDev: "vd1", Root: "data", Node: "data", Images: images("/img/data")},
	}
	for _, name := range []string{"drive0", "#block1", "#block2", "/img/top", "/img//top"} {
		if d, err := findDisk(disks, name); err != nil || d.Name != "drive0" {
			t.Errorf("findDisk(%q) = %v, %v", name, d, err)
		}
	}
	if d, err := findDisk(disks, "data"); err != nil || d.Name != "vd1" {
		t.Errorf("findDisk(data) = %v, %v", d, err)
	}
	_, err := findDisk(disks, "/img/base") // a backing image is not a disk
	var le *lockmgr.Error
	if !errors.As(err, &le) || le.Code != lockmgr.CodeInvalidArgument {
		t.Fatalf("findDisk of a backing image: %v", err)
	}
}

func TestImageIndex(t *testing.T) {
	imgs := images("/img/top", "/img/mid", "/img/base")
	if i, err := imageIndex(imgs, "base", "/img/base"); err != nil || i != 2 {
		t.Fatalf("by path: %d %v", i, err)
	}
	if i, err := imageIndex(imgs, "top", "n1"); err != nil || i != 1 {
		t.Fatalf("by node: %d %v", i, err)
	}
	if _, err := imageIndex(imgs, "base", "/img/other"); !errors.Is(err, lockmgr.ErrInvalidArgument) {
		t.Fatalf("an image not in the chain: %v", err)
	}
}

// vmlockd cannot know the working directory of the client a relative path
// is relative to: such a path is refused, not resolved in vmlockd's.
func TestRelativeImagePathsAreRefused(t *testing.T) {
	imgs := images("/img/top", "/img/base")
	disks := []qemu.Disk{{Name: "drive0", Node: "n0", Images: imgs}}
	for _, name := range []string{"img/base", "./base", "../img/base"} {
		if _, err := imageIndex(imgs, "base", name); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "relative path") {
			t.Errorf("imageIndex(%q): %v, want an invalid argument naming the relative path", name, err)
		}
		if _, err := findDisk(disks, name); !errors.Is(err, lockmgr.ErrInvalidArgument) || !strings.Contains(err.Error(), "relative path") {
			t.Errorf("findDisk(%q): %v, want an invalid argument naming the relative path", name, err)
		}
	}
}

// A qcow2 image's external data file is written whenever the image is: it
// gets the image's mode, a commit base's exclusive mode included.
func TestWantedModesLockDataFilesLikeTheirImages(t *testing.T) {
	vda := images("/a/top", "/a/base")
	vda[0].DataFile, vda[1].DataFile = "/a/top.data", "/a/base.data"
	cd := images("/iso")
	cd[0].DataFile = "/iso.data"
	disks := []qemu.Disk{{Name: "vda", Images: vda}, {Name: "cd", ReadOnly: true, Images: cd}}
	vm := &qemuVM{jobs: map[string]*blockJob{}}
	exp := map[string]lockmgr.Mode{
		"/a/top": lockmgr.Exclusive, "/a/top.data": lockmgr.Exclusive,
		"/a/base": lockmgr.Shared, "/a/base.data": lockmgr.Shared,
		"/iso": lockmgr.ReadOnly, "/iso.data": lockmgr.ReadOnly,
	}
	if want := vm.wanted(disks); fmt.Sprint(want) != fmt.Sprint(exp) {
		t.Fatalf("wanted\n got %v\nwant %v", want, exp)
	}
	vm.jobs["vda"] = &blockJob{rec: jobRecord{Type: jobActiveCommit, Top: "/a/top", Base: "/a/base"}}
	if want := vm.wanted(disks); want["/a/base"] != lockmgr.Exclusive || want["/a/base.data"] != lockmgr.Exclusive {
		t.Fatalf("during a commit into /a/base: %v", want)
	}
}

// A VM's record that vmlockd cannot have written (here: its monitor is a
// relative path) is not re-attached with at start: vmlockd logs an error
// naming the file, and leaves the file in place; that VM keeps its locks
// (until its process exits). The other VMs are re-attached.
func TestDamagedVMRecordIsLoggedByItsFileAndTheOtherVMsAreReattached(t *testing.T) {
	dir, err := os.MkdirTemp("", "vqr") // short: it holds sockets
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	state := filepath.Join(dir, "state")
	os.MkdirAll(filepath.Join(state, "qemu"), 0o700)
	drv, err := lockspace.New(lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go lockholder.Serve(ctx, state)
	var logs syncbuf.Buffer
	d, err := New(ctx, Config{Driver: drv, Socket: filepath.Join(dir, "s.sock"), StateDir: state,
		Logger: slog.New(slog.NewJSONHandler(&logs, nil)), HolderCommand: func() error { return nil }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	good, bad := "5e550000-0000-4000-8000-00000000000a", "5e550000-0000-4000-8000-00000000000b"
	records := map[string]string{}
	for _, u := range []string{good, bad} {
		disk := filepath.Join(dir, u[len(u)-1:]+".img")
		os.WriteFile(disk, nil, 0o600)
		pid := sleeper(t)
		if _, err := d.acquire(ctx, caller{uid: os.Getuid(), pid: os.Getpid()}, &vmlockpb.AcquireRequest{
			Object:    api.ObjectToPB(lockmgr.Object{UUID: u, Name: "vm-" + u[len(u)-1:], PID: pid}),
			Resources: []*vmlockpb.Resource{api.ResourceToPB(lockmgr.DiskResource(disk, lockmgr.Exclusive))}}); err != nil {
			t.Fatal(err)
		}
		monitor := filepath.Join(dir, "m.qmp") // nothing listens there
		if u == bad {
			monitor = "m.qmp"
		}
		b, _ := json.Marshal(vmRecord{UUID: u, PID: pid, Monitor: monitor, Verified: true, Managed: []string{disk}})
		records[u] = filepath.Join(state, "qemu", u+".json")
		if err := os.WriteFile(records[u], b, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	sup := d.newQEMUSupervisor()
	if !sup.supervises(good) || sup.supervises(bad) {
		t.Fatalf("after start: supervises the good VM %v, the one whose record is damaged %v; want true, false", sup.supervises(good), sup.supervises(bad))
	}
	var logged bool
	for line := range strings.Lines(logs.String()) {
		var l struct{ Level, UUID, File, Err string }
		if json.Unmarshal([]byte(line), &l) == nil && l.Level == "ERROR" && l.UUID == bad && l.File == records[bad] && strings.Contains(l.Err, `monitor "m.qmp"`) {
			logged = true
		}
	}
	if !logged {
		t.Fatalf("no error logged naming %s and what is wrong in it; log:\n%s", records[bad], logs.String())
	}
	if _, err := os.Stat(records[bad]); err != nil {
		t.Fatalf("the damaged record: %v, want it left in place", err)
	}
	if ls, _, err := d.mgr.Held(bad); err != nil || len(ls) != 1 {
		t.Fatalf("the locks of the VM whose record is damaged: %v, %v; want its disk", ls, err)
	}
}
