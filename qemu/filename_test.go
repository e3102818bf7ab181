package qemu

import (
	"fmt"
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
	cases = append(cases, pseudoFilenameCases...)
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

// Filenames that QEMU reads as options: json:{...} (the options of the
// drive's nodes, nested or with dotted keys, merged under the -drive's
// own) and the blkdebug:/blkverify: filters over the images they name.
// What vmlock does not understand it leaves to QEMU's graph: it never
// guesses a path.
var pseudoFilenameCases = []struct {
	name string
	args []string
	want []string
}{
	{"json: holds the options of the drive's nodes", []string{"-drive", `if=none,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/j.qcow2"}}`}, []string{"/img/j.qcow2"}},
	{"json: may give them as dotted keys", []string{"-drive", `if=none,file=json:{"driver":"qcow2",,"file.driver":"file",,"file.filename":"/img/j.qcow2"}`}, []string{"/img/j.qcow2"}},
	{"json: names backing and data files too", []string{"-drive", `if=none,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/j.qcow2"},,"backing":{"driver":"raw",,"file":{"driver":"file",,"filename":"/img/b.raw"}},,"data-file":{"driver":"file",,"filename":"/img/d.raw"}}`},
		[]string{"/img/b.raw", "/img/d.raw", "/img/j.qcow2"}},
	{"json: a probed format's file", []string{"-drive", `if=none,format=qcow2,file=json:{"file":{"driver":"host_device",,"filename":"/dev/vdz"}}`}, []string{"/dev/vdz"}},
	{"json: a filename of a named file driver is taken as it is", []string{"-drive", `if=none,file=json:{"driver":"file",,"filename":"nbd:x"}`}, []string{"nbd:x"}},
	{"the -drive's own options win over json:'s", []string{"-drive", `if=none,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/a"}},file.filename=/img/b`}, []string{"/img/b"}},
	{"json: whatever file.driver says", []string{"-drive", `if=none,file.driver=file,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/a"}}`}, []string{"/img/a"}},
	{"-hda json: needs no doubled commas", []string{"-hda", `json:{"driver":"raw","file":{"driver":"file","filename":"/img/h"}}`}, []string{"/img/h"}},
	{"json: of a network driver names no local file", []string{"-drive", `if=none,file=json:{"driver":"nbd",,"path":"/run/nbd.sock"}`}, nil},
	{"json: with no driver for a filename is not guessed", []string{"-drive", `if=none,file=json:{"driver":"qcow2",,"file":{"filename":"/img/a"}}`}, nil},
	{"json: naming an option twice is not guessed", []string{"-drive", `if=none,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/a"},,"file.filename":"/img/b"}`}, nil},
	{"json: that encoding/json cannot read is left to QEMU", []string{"-drive", `if=none,file=json:{'driver':'file',,'filename':'/img/a'}`}, nil},
	{"blkdebug: names its image after the config file", []string{"-drive", "if=none,format=qcow2,file=blkdebug:/etc/bd.conf:/img/a:b.qcow2"}, []string{"/img/a:b.qcow2"}},
	{"blkdebug: image goes through protocol detection", []string{"-drive", "if=none,file=blkdebug::file:/img/a"}, []string{"/img/a"}},
	{"blkdebug: over json:", []string{"-drive", `if=none,file=blkdebug::json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/a"}}`}, []string{"/img/a"}},
	{"blkdebug: over blkdebug:", []string{"-hda", "blkdebug::blkdebug:/x.conf:/img/a"}, []string{"/img/a"}},
	{"blkdebug: over a network image", []string{"-drive", "if=none,file=blkdebug::nbd:localhost:10809"}, nil},
	{"blkdebug: without an image is not understood", []string{"-drive", "if=none,file=blkdebug:/img/a"}, nil},
	{"blkverify: names the raw image and the test image", []string{"-drive", "if=none,format=raw,file=blkverify:/img/r.raw:/img/t.qcow2"}, []string{"/img/r.raw", "/img/t.qcow2"}},
	{"a named file driver takes blkdebug: literally", []string{"-drive", "if=none,file.driver=file,file=blkdebug::/img/a"}, []string{"blkdebug::/img/a"}},
}

// The formats and modes of the files a json: or blkdebug: filename names
// follow QEMU's reading: the -drive's read-only flag is the top node's
// (json:'s own is overridden), backing files are backing files, the
// format is the one above each file (probed: "").
func TestParseCommandLinePseudoFilenameModes(t *testing.T) {
	cl, err := ParseCommandLine([]string{
		"-drive", `if=none,id=d0,readonly=on,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/a"},,"backing":{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/b"}}}`,
		"-drive", `if=none,id=d1,file=json:{"driver":"qcow2",,"read-only":true,,"node-name":"n1",,"file":{"driver":"file",,"filename":"/img/c"}}`,
		"-device", "virtio-blk-pci,drive=d1,share-rw=on",
		"-drive", `if=none,node-name=n2,snapshot=on,format=qcow2,file=blkdebug::/img/d`,
		"-cdrom", `json:{"file":{"driver":"file","filename":"/img/e"}}`,
	})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range cl.Drives {
		got = append(got, fmt.Sprintf("%s id=%s fmt=%s ro=%v shared=%v backing=%v", d.Path, d.ID, d.Format, d.ReadOnly, d.Shared, d.Backing))
	}
	want := []string{
		"/img/b id=d0 fmt=qcow2 ro=true shared=false backing=true",
		"/img/a id=d0 fmt=qcow2 ro=true shared=false backing=false",
		"/img/c id=d1 fmt=qcow2 ro=false shared=true backing=false",
		"/img/d id=n2 fmt=qcow2 ro=false shared=false backing=true",
		"/img/e id= fmt= ro=true shared=false backing=false",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("drives:\n%q\nwant\n%q", got, want)
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
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"DIR/a.qcow2"}}`},
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"file.driver":"file",,"file.filename":"DIR/a.qcow2"}`},
		{"-drive", `if=none,id=d0,format=qcow2,file=json:{"file":{"driver":"file",,"filename":"DIR/a.qcow2"}}`},
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"DIR/a.qcow2"},,"backing":{"driver":"qcow2",,"file":{"driver":"file",,"filename":"DIR/nbd:x"}}}`},
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"DIR/d.qcow2"},,"data-file":{"driver":"file",,"filename":"DIR/d.raw"}}`},
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"DIR/a.qcow2"}},file.filename=DIR/nbd:x`},
		{"-drive", `if=none,id=d0,readonly=on,file=json:{"driver":"qcow2",,"read-only":false,,"file":{"driver":"file",,"filename":"DIR/a.qcow2"}}`},
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"read-only":true,,"file":{"driver":"file",,"filename":"DIR/a.qcow2"}}`},
		{"-hda", `json:{"driver":"qcow2","file":{"driver":"file","filename":"DIR/a.qcow2"}}`},
		{"-cdrom", `json:{"file":{"driver":"file","filename":"DIR/a.qcow2"}}`},
		{"-drive", "if=none,id=d0,format=qcow2,file=blkdebug:DIR/bd.conf:DIR/a.qcow2"},
		{"-drive", "if=none,id=d0,file=blkdebug::file:DIR/nbd:x"},
		{"-drive", `if=none,id=d0,file=blkdebug::json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"DIR/a.qcow2"}}`},
		{"-drive", "if=none,id=d0,format=raw,file=blkverify:DIR/r.raw:DIR/a.qcow2"},
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
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "d.raw"), filepath.Join(dir, "d.qcow2"), "1M")
			run(t, "qemu-img", "create", "-q", "-f", "raw", filepath.Join(dir, "r.raw"), "1M")
			if err := os.WriteFile(filepath.Join(dir, "bd.conf"), nil, 0o644); err != nil {
				t.Fatal(err)
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
			// In any order: QEMU lists its nodes newest first.
			slices.Sort(got)
			slices.Sort(want)
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

// The format a file is read in: the one named above it, none (QEMU
// probes) below a node that names no driver, and raw where the file itself
// is the node a format would sit on (QEMU reads it as it is).
func TestParseCommandLineFormats(t *testing.T) {
	cases := []struct {
		args []string
		want []string // path=format
	}{
		{[]string{"-drive", "if=none,file=/img/a"}, []string{"/img/a="}},
		{[]string{"-drive", "if=none,file=/img/a,format=qcow2"}, []string{"/img/a=qcow2"}},
		{[]string{"-drive", "if=none,file=/img/a,driver=file"}, []string{"/img/a=raw"}},
		{[]string{"-drive", "if=none,file=/img/a,format=host_device"}, []string{"/img/a=raw"}},
		{[]string{"-blockdev", "driver=file,node-name=f0,filename=/img/a"}, []string{"/img/a=raw"}},
		{[]string{"-blockdev", `{"driver":"qcow2","node-name":"q0","file":{"driver":"file","filename":"/img/a"}}`}, []string{"/img/a=qcow2"}},
		{[]string{"-blockdev", `{"driver":"qcow2","node-name":"q0","file":{"driver":"file","filename":"/img/a"},"data-file":{"driver":"file","filename":"/img/d"}}`},
			[]string{"/img/a=qcow2", "/img/d=raw"}},
		{[]string{"-blockdev", `{"driver":"qcow2","node-name":"q0","file":{"driver":"file","filename":"/img/a"},"backing":{"driver":"file","filename":"/img/b"}}`},
			[]string{"/img/a=qcow2", "/img/b=raw"}},
		{[]string{"-blockdev", `{"driver":"blkdebug","node-name":"b0","image":{"driver":"file","filename":"/img/a"}}`}, []string{"/img/a=raw"}},
		{[]string{"-drive", `if=none,file=json:{"driver":"file",,"filename":"/img/a"}`}, []string{"/img/a=raw"}},
		{[]string{"-drive", `if=none,file=json:{"file":{"driver":"file",,"filename":"/img/a"}}`}, []string{"/img/a="}},
		{[]string{"-drive", "if=none,file=blkdebug::/img/a"}, []string{"/img/a="}},
		{[]string{"-drive", "if=none,format=qcow2,file=blkdebug::/img/a"}, []string{"/img/a=qcow2"}},
	}
	for _, c := range cases {
		cl, err := ParseCommandLine(c.args)
		if err != nil {
			t.Fatalf("%q: %v", c.args, err)
		}
		var got []string
		for _, d := range cl.Drives {
			got = append(got, d.Path+"="+d.Format)
		}
		slices.Sort(got)
		if !slices.Equal(got, c.want) {
			t.Errorf("%q: formats %q, want %q", c.args, got, c.want)
		}
	}
}

// A file QEMU reads as it is (here a -blockdev file node) may hold
// anything the guest wrote, such as a qcow2 header naming a backing file
// that does not exist. vmlock must read it as QEMU does, raw: probing it
// would refuse a VM that QEMU runs, or lock a file the guest chose.
func TestAFileNodeIsReadRawNotProbed(t *testing.T) {
	need(t, "qemu-img")
	dir := t.TempDir()
	img := filepath.Join(dir, "guest-data")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", filepath.Join(dir, "chosen-by-the-guest"), "-F", "qcow2", img, "1M")
	args := []string{"-blockdev", "driver=file,node-name=f0,filename=" + img}
	cl, err := ParseCommandLine(args)
	if err != nil {
		t.Fatal(err)
	}
	if len(cl.Drives) != 1 {
		t.Fatalf("drives %+v; want the file", cl.Drives)
	}
	chain, err := BackingChain(testCtx(t), nil, cl.Drives[0].Path, cl.Drives[0].Format)
	if err != nil {
		t.Fatalf("the image chain of a file node: %v", err)
	}
	if len(chain) != 1 || chain[0].Format != "raw" {
		t.Fatalf("the image chain of a file node is %+v; want the file alone, raw", chain)
	}
	// QEMU itself opens it, as a file node.
	c, _ := startQEMUIn(t, dir, args...)
	nodes, err := QueryNodes(testCtx(t), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 1 || nodes[0].Filename != img {
		t.Fatalf("QEMU's nodes %+v; want the file node of %s", nodes, img)
	}
}
