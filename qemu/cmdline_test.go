package qemu

import (
	"fmt"
	"slices"
	"testing"
)

func TestParseCommandLine(t *testing.T) {
	args := []string{
		"-machine", "none", "-nodefaults", "-S", "-name", "guest=web1,debug-threads=on",
		"-drive", "if=none,id=drive0,format=qcow2,file=/img/a,,b.qcow2",
		"-drive", "if=none,id=cd,media=cdrom,file=/img/cd.iso",
		"-drive", "file=nbd://host/export,if=none,id=net0",
		"-drive", "id=ro0,file.driver=file,file.filename=/img/ro.raw,readonly",
		"-hdb", "rel.img",
		"-cdrom", "/img/install.iso",
		"-blockdev", `{"driver":"qcow2","node-name":"base","backing":null,"file":{"driver":"blkdebug","image":{"driver":"file","filename":"/img/base.qcow2"}}}`,
		"-blockdev", "driver=qcow2,node-name=top,backing=base,file.driver=file,file.filename=/img/top.qcow2",
		"-blockdev", `{"driver":"qcow2","node-name":"ov","file":{"driver":"file","filename":"/img/ov.qcow2"},"backing":{"driver":"raw","file":{"driver":"file","filename":"/img/bk.raw"}}}`,
		"-device", "virtio-blk-pci,drive=drive0,share-rw=on",
		"-chardev", "socket,id=mon0,path=/x",
		"-nographic", "/img/positional.img",
	}
	cl, err := ParseCommandLine(args)
	if err != nil {
		t.Fatal(err)
	}
	if cl.Name != "web1" || !cl.Paused || !slices.Equal(cl.ChardevIDs, []string{"mon0"}) {
		t.Fatalf("name %q paused %v chardevs %q", cl.Name, cl.Paused, cl.ChardevIDs)
	}
	var got []string
	for _, d := range cl.Drives {
		got = append(got, fmt.Sprintf("%s id=%s fmt=%s ro=%v shared=%v backing=%v", d.Path, d.ID, d.Format, d.ReadOnly, d.Shared, d.Backing))
	}
	want := []string{
		"/img/a,b.qcow2 id=drive0 fmt=qcow2 ro=false shared=true backing=false",
		"/img/cd.iso id=cd fmt= ro=true shared=false backing=false",
		"/img/ro.raw id=ro0 fmt= ro=true shared=false backing=false",
		"rel.img id= fmt= ro=false shared=false backing=false",
		"/img/install.iso id= fmt= ro=true shared=false backing=false",
		"/img/base.qcow2 id=base fmt=qcow2 ro=false shared=false backing=false",
		"/img/top.qcow2 id=top fmt=qcow2 ro=false shared=false backing=false",
		"/img/bk.raw id=ov fmt=raw ro=false shared=false backing=true",
		"/img/ov.qcow2 id=ov fmt=qcow2 ro=false shared=false backing=false",
		"/img/positional.img id= fmt= ro=false shared=false backing=false",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("drives:\n%q\nwant\n%q", got, want)
	}
}

func TestParseCommandLineSnapshotAndErrors(t *testing.T) {
	cl, err := ParseCommandLine([]string{"-snapshot", "-drive", "file=/a.qcow2", "-daemonize", "-blockdev", "driver=file,node-name=f,filename=/b.raw"})
	if err != nil {
		t.Fatal(err)
	}
	if !cl.Daemonize || cl.Paused {
		t.Fatalf("daemonize %v paused %v", cl.Daemonize, cl.Paused)
	}
	// Under -snapshot QEMU reads a -drive's image through a temporary
	// overlay: the image is a backing file. A -blockdev is not affected.
	if len(cl.Drives) != 2 || !cl.Drives[0].Backing || cl.Drives[0].ReadOnly || cl.Drives[1].Backing {
		t.Fatalf("-snapshot makes -drive a backing file, not -blockdev: %+v", cl.Drives)
	}
	cl, err = ParseCommandLine([]string{"-drive", "file=/a.qcow2,snapshot=on", "-drive", "file=/b.qcow2,snapshot=on,readonly=on"})
	if err != nil {
		t.Fatal(err)
	}
	if len(cl.Drives) != 2 || !cl.Drives[0].Backing || cl.Drives[0].ReadOnly || !cl.Drives[1].ReadOnly {
		t.Fatalf("snapshot=on: %+v", cl.Drives)
	}
	if _, err := ParseCommandLine([]string{"-drive"}); err == nil {
		t.Fatal("an option without its argument was accepted")
	}
	if _, err := ParseCommandLine([]string{"-blockdev", "{not json"}); err == nil {
		t.Fatal("malformed -blockdev JSON was accepted")
	}
}

// QEMU 7.2's options without an argument must not swallow the image that
// follows them: that image would not be locked before QEMU opens it.
func TestParseCommandLineOptionsWithoutArgument(t *testing.T) {
	for _, opt := range []string{"-mem-prealloc", "-singlestep", "-async-teardown", "-audio-help"} {
		cl, err := ParseCommandLine([]string{"-m", "64", opt, "/img/positional.img"})
		if err != nil {
			t.Fatalf("%s: %v", opt, err)
		}
		if len(cl.Drives) != 1 || cl.Drives[0].Path != "/img/positional.img" {
			t.Errorf("%s /img/positional.img: drives %+v, want the positional image", opt, cl.Drives)
		}
	}
}
