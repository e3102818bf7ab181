package qemu

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// A filename given the legacy way goes through QEMU's protocol detection;
// one given to a named file driver is taken as it is. Either way the local
// file QEMU opens is the one vmlock locks before QEMU starts.
func TestParseCommandLineFilenames(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want []string // local paths, in order
	}{
		{"a plain path", []string{"-drive", "if=none,file=/img/a.qcow2"}, []string{"/img/a.qcow2"}},
		{"file: is the local file protocol", []string{"-drive", "if=none,file=file:/img/a.qcow2"}, []string{"/img/a.qcow2"}},
		{"host_device: is local too", []string{"-drive", "if=none,file=host_device:/dev/sdz"}, []string{"/dev/sdz"}},
		{"host_cdrom: is local too", []string{"-cdrom", "host_cdrom:/dev/sr9"}, []string{"/dev/sr9"}},
		{"a network protocol names no local file", []string{"-drive", "if=none,file=nbd:localhost:10809"}, nil},
		{"json: names no local file here", []string{"-drive", `if=none,file=json:{"driver":"file","filename":"/img/j"}`}, nil},
		{"a colon after a slash is part of the path", []string{"-drive", "if=none,file=/img/a:b.qcow2"}, []string{"/img/a:b.qcow2"}},
		{"a named driver strips only its own prefix", []string{"-drive", "if=none,file=file:/img/a.qcow2,file.driver=file"}, []string{"/img/a.qcow2"}},
		{"a named driver takes any other colon literally", []string{"-drive", "if=none,file=nbd:x,file.driver=file"}, []string{"nbd:x"}},
		{"file.filename is taken as it is", []string{"-drive", "if=none,file.driver=file,file.filename=file:x"}, []string{"file:x"}},
		{"a named network driver is not local", []string{"-drive", "if=none,file.driver=nbd,file.host=h,file.filename=/x"}, nil},
		{"-blockdev filenames are taken as they are", []string{"-blockdev", "driver=file,node-name=f0,filename=nbd:x"}, []string{"nbd:x"}},
		{"-hda goes through protocol detection", []string{"-hda", "file:/img/h.raw", "-hdb", "rbd:pool/img"}, []string{"/img/h.raw"}},
		{"the positional image too", []string{"file:/img/p.raw"}, []string{"/img/p.raw"}},
		{"an empty filename is an empty drive", []string{"-hda", "", "-drive", "if=none,file=file:", ""}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl, err := ParseCommandLine(c.args)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, d := range cl.Drives {
				got = append(got, d.Path)
			}
			if !slices.Equal(got, c.want) {
				t.Fatalf("ParseCommandLine(%q) drives %q, want %q", c.args, got, c.want)
			}
		})
	}
}

// The same rules, checked against QEMU itself: the files a real QEMU opens
// for a command line are the ones ParseCommandLine lists.
func TestParseCommandLineAgreesWithQEMU(t *testing.T) {
	cases := [][]string{
		{"-drive", "if=none,id=d0,file=file:DIR/a.qcow2"},
		{"-drive", "if=none,id=d0,file=file:DIR/a.qcow2,file.driver=file"},
		{"-drive", "if=none,id=d0,file=nbd:x,file.driver=file"},
		{"-drive", "if=none,id=d0,file.driver=file,file.filename=nbd:x"},
		{"-blockdev", "driver=file,node-name=f0,filename=nbd:x"},
		{"-blockdev", `{"driver":"qcow2","node-name":"q0","file":{"driver":"file","filename":"nbd:x"}}`},
		{"-drive", "if=none,id=d0,readonly=off,readonly=on,file=DIR/a.qcow2"},
		{"-drive", "if=none,id=d0,readonly=on,readonly=off,file=DIR/a.qcow2"},
		{"-drive", "if=none,id=d0,media=cdrom,file=DIR/a.qcow2"},
	}
	need(t, "qemu-img")
	for _, tmpl := range cases {
		t.Run(strings.Join(tmpl, " "), func(t *testing.T) {
			dir, err := os.MkdirTemp("", "vqf") // t.TempDir's name has the subtest's commas
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			for _, f := range []string{"a.qcow2", "nbd:x"} {
				run(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, f), "1M")
			}
			args := make([]string, len(tmpl))
			for i, a := range tmpl {
				args[i] = strings.ReplaceAll(a, "DIR", dir)
			}
			cl, err := ParseCommandLine(args)
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			readOnly := map[string]bool{}
			for _, d := range cl.Drives {
				want = append(want, abs(dir, d.Path))
				readOnly[abs(dir, d.Path)] = d.ReadOnly
			}
			c, _ := startQEMUIn(t, dir, args...)
			nodes, err := QueryNodes(testCtx(t), c)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, n := range nodes {
				if isLocalDriver(n.Driver) {
					got = append(got, abs(dir, n.Filename))
					if readOnly[abs(dir, n.Filename)] && !n.ReadOnly {
						t.Errorf("QEMU opened %s read-write; ParseCommandLine said read-only", n.Filename)
					}
				}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("QEMU opened %q; ParseCommandLine listed %q", got, want)
			}
		})
	}
}

func abs(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// parseOpts splits options where QEMU's own parser does.
func TestParseOptsLikeQEMU(t *testing.T) {
	cases := []struct {
		in, implied string
		want        options
	}{
		{"if=none,file=/a,,b.qcow2", "", options{{"if", "none"}, {"file", "/a,b.qcow2"}}},
		{"readonly,noshare-rw", "", options{{"readonly", "on"}, {"share-rw", "off"}}},
		// A key ends at a comma: ",," does not escape it.
		{"x,,file=/a", "", options{{"x", "on"}, {"", "on"}, {"file", "/a"}}},
		{"a=b=c,,d,", "", options{{"a", "b=c,d"}}},
		{"web,,1,debug-threads=on", "guest", options{{"guest", "web,1"}, {"debug-threads", "on"}}},
		{"guest=web", "guest", options{{"guest", "web"}}},
		{"", "guest", nil},
	}
	for _, c := range cases {
		if got := parseOpts(c.in, c.implied); !slices.Equal(got, c.want) {
			t.Errorf("parseOpts(%q, %q) = %q, want %q", c.in, c.implied, got, c.want)
		}
	}
}

// A flag that makes vmlock lock less (readonly, share-rw, snapshot) counts
// only if every value given agrees: QEMU reads -drive's readonly from its
// first value, other options from their last.
func TestRepeatedFlagsLockTheSaferWay(t *testing.T) {
	for _, args := range [][]string{
		{"-drive", "if=none,id=d0,readonly=off,readonly=on,file=/a"},
		{"-drive", "if=none,id=d0,readonly=on,readonly=off,file=/a"},
		{"-drive", "if=none,id=d0,readonly=on,noreadonly,file=/a"},
		{"-drive", "if=none,id=d0,media=cdrom,media=disk,file=/a"},
		{"-drive", "if=none,id=d0,snapshot=on,snapshot=off,file=/a"},
		{"-drive", "if=none,id=d0,file=/a", "-device", "virtio-blk-pci,drive=d0,share-rw=on,share-rw=off"},
	} {
		cl, err := ParseCommandLine(args)
		if err != nil {
			t.Fatal(err)
		}
		if d := cl.Drives[0]; d.ReadOnly || d.Backing || d.Shared {
			t.Errorf("%q: %+v, want an exclusive lock (not read-only, backing or shared)", args, d)
		}
	}
}
