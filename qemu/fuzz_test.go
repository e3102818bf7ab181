package qemu

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

// encodeOpts writes o in QEMU's option syntax, every option as
// key=value, doubling the commas of values.
func encodeOpts(o options) string {
	var elems []string
	for _, e := range o {
		elems = append(elems, e.key+"="+strings.ReplaceAll(e.value, ",", ",,"))
	}
	return strings.Join(elems, ",")
}

// Whatever parseOpts reads, writing it back in QEMU's syntax and reading
// that again gives the same options: commas inside keys and values survive.
func FuzzParseOpts(f *testing.F) {
	for _, s := range []string{"if=none,file=/a,,b.qcow2", "readonly", "guest=x,,y,debug-threads=on", ",,,", "a=b=c,,d,", "=v"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, implied := range []string{"", "guest"} {
			o := parseOpts(s, implied)
			for _, e := range o {
				if strings.ContainsAny(e.key, "=,") {
					t.Fatalf("parseOpts(%q) has key %q: '=' and ',' end a key", s, e.key)
				}
			}
			enc := encodeOpts(o)
			if again := parseOpts(enc, implied); !slices.Equal(again, o) {
				t.Fatalf("parseOpts(%q) = %q; written back as %q it reads %q", s, o, enc, again)
			}
		}
	})
}

// ParseCommandLine never panics, gives the same answer every time (it
// walks maps), and lists no empty path.
func FuzzParseCommandLine(f *testing.F) {
	for _, args := range [][]string{
		{"-drive", "if=none,id=d0,format=qcow2,file=/img/a,,b.qcow2", "-device", "virtio-blk-pci,drive=d0,share-rw=on"},
		{"-blockdev", `{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"/img/q"},"backing":{"driver":"raw","file":{"driver":"file","filename":"/b"}}}`},
		{"-blockdev", "driver=qcow2,file=node0,file.driver=file,file.filename=/x"},
		{"-snapshot", "-hda", "file:/img/h", "-cdrom", "nbd:h:1", "pos.img", "-S", "-name", "guest=g"},
		{"-drive", `if=none,id=d0,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"/img/j"},,"backing":{"driver":"raw",,"file.driver":"file",,"file.filename":"/b"}},file.filename=/o`},
		{"-hda", `json:{"driver":"qcow2","file":{"driver":"file","filename":"/img/a"},"file.filename":"/img/b","data-file":{"driver":"file","filename":"/d"},"x":[{"a":1},[]]}`},
		{"-drive", "if=none,format=qcow2,file=blkdebug:/etc/bd.conf:blkverify:/img/r.raw:json:{\"driver\":\"file\",,\"filename\":\"/t\"}", "-cdrom", "blkdebug::nbd:h:1"},
	} {
		f.Add(strings.Join(args, "\x00"))
	}
	f.Fuzz(func(t *testing.T, s string) {
		args := strings.Split(s, "\x00")
		cl, err := ParseCommandLine(args)
		if err != nil {
			return
		}
		for i := 0; i < 3; i++ {
			again, err := ParseCommandLine(args)
			if err != nil || !reflect.DeepEqual(again, cl) {
				t.Fatalf("ParseCommandLine(%q) changed between calls: %+v, then %+v (%v)", args, cl, again, err)
			}
		}
		for _, d := range cl.Drives {
			if d.Path == "" {
				t.Fatalf("ParseCommandLine(%q) lists an empty path: %+v", args, cl.Drives)
			}
		}
	})
}
