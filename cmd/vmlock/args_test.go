package main

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockmgr"
)

func TestSplitMode(t *testing.T) {
	cases := []struct {
		in   string
		path string
		mode lockmgr.Mode
	}{
		{"/a.img", "/a.img", lockmgr.Exclusive},
		{"/a.img:shared", "/a.img", lockmgr.Shared},
		{"/a.img:readonly", "/a.img", lockmgr.ReadOnly},
		{"/a:b.img", "/a:b.img", lockmgr.Exclusive}, // a colon in a path is not a mode
		{"/a:b.img:shared", "/a:b.img", lockmgr.Shared},
	}
	for _, c := range cases {
		p, m := splitMode(c.in)
		if p != c.path || m != c.mode {
			t.Errorf("splitMode(%q) = %q, %v; want %q, %v", c.in, p, m, c.path, c.mode)
		}
	}
}

func TestParseHoldSpecs(t *testing.T) {
	req, err := parseHoldSpecs([]string{"node/n1", "instance/b:shared", "instance/a:shared", "node/n1", "network/*"})
	if err != nil {
		t.Fatal(err)
	}
	if len(req.Levels) != 3 {
		t.Fatalf("levels = %v", req.Levels)
	}
	if l := req.Levels[0]; l.Level != "node" || len(l.Names) != 1 || l.Shared {
		t.Errorf("node level = %v (duplicates must collapse)", l)
	}
	if l := req.Levels[1]; l.Level != "instance" || !l.Shared || len(l.Names) != 2 {
		t.Errorf("instance level = %v", l)
	}
	if l := req.Levels[2]; !l.All || len(l.Names) != 0 {
		t.Errorf("network level = %v", l)
	}
	for _, bad := range [][]string{{"node"}, {"/n1"}, {"node/"}, {"node/a", "node/b:shared"}, {"node/*", "node/a"}} {
		_, err := parseHoldSpecs(bad)
		var ue usageError
		if !errors.As(err, &ue) {
			t.Errorf("parseHoldSpecs(%q) = %v, want a usage error", bad, err)
		}
	}
}

func TestParseResource(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]lockmgr.Resource{
		"/x/a.img":       lockmgr.DiskResource("/x/a.img", lockmgr.Exclusive),
		"disk:/x/a.img":  lockmgr.DiskResource("/x/a.img", lockmgr.Exclusive),
		"lease:ls/k":     lockmgr.LeaseResource("ls", "k", lockmgr.Exclusive),
		"vnc-port:5901":  {Type: "vnc-port", Name: "5901"},
		"relative/a.img": lockmgr.DiskResource(filepath.Join(wd, "relative/a.img"), lockmgr.Exclusive),
		"./relative.img": lockmgr.DiskResource(filepath.Join(wd, "relative.img"), lockmgr.Exclusive),
		"disk:rel.img":   lockmgr.DiskResource(filepath.Join(wd, "rel.img"), lockmgr.Exclusive),
	}
	for in, want := range cases {
		got, err := parseResource(in)
		if err != nil || got != want {
			t.Errorf("parseResource(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	if _, err := parseResource("lease:nokey"); !errors.Is(err, lockmgr.ErrInvalidArgument) {
		t.Errorf("parseResource(lease without key) = %v", err)
	}
}

// A relative disk path is the client's: the daemon, whose working directory
// is another, must get it absolute.
func TestDiskPathsAreMadeAbsolute(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	rf := resourceFlags{disks: []string{"a.img", "sub/b.img:shared", "/abs/c.img:readonly"}}
	rs, err := rf.resources()
	if err != nil {
		t.Fatal(err)
	}
	want := []lockmgr.Resource{
		lockmgr.DiskResource(filepath.Join(wd, "a.img"), lockmgr.Exclusive),
		lockmgr.DiskResource(filepath.Join(wd, "sub/b.img"), lockmgr.Shared),
		lockmgr.DiskResource("/abs/c.img", lockmgr.ReadOnly),
	}
	if !slices.Equal(rs, want) {
		t.Fatalf("resources() = %+v, want %+v", rs, want)
	}
}

// A --grace the daemon would take as its default (under 1 ms) or cannot
// use (negative, over api.MaxGrace) is a usage error, found before the
// daemon is asked.
func TestRevokeRefusesABadGrace(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, g := range []string{"-1s", "500us", "61m", "2562047h"} {
		if code := run([]string{"--socket", sock, "revoke", "--grace", g, "/a.img"}); code != int(lockmgr.CodeInvalidArgument) {
			t.Errorf("revoke --grace %s: exit %d, want %d", g, code, lockmgr.CodeInvalidArgument)
		}
	}
	// A good one gets as far as the (missing) daemon.
	if code := run([]string{"--socket", sock, "revoke", "--grace", "1s", "/a.img"}); code == int(lockmgr.CodeInvalidArgument) {
		t.Errorf("revoke --grace 1s: exit %d, a usage error", code)
	}
}

// A --bandwidth that is negative, or in MiB/s too large to count in bytes
// (it would wrap to some other limit), is a usage error, found before the
// daemon is asked.
func TestBlockJobsRefuseABadBandwidth(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	dest := filepath.Join(t.TempDir(), "copy.qcow2")
	for _, bw := range [][]string{{"--bandwidth", "-1"}, {"--bandwidth", "-1", "--bytes"}, {"--bandwidth", "8796093022208"}, {"--bandwidth", "9223372036854775807"}} {
		for _, cmd := range [][]string{{"blockcommit", "vm", "vda"}, {"blockcopy", "vm", "vda", dest}} {
			args := append(append([]string{"--socket", sock}, cmd...), bw...)
			if code := run(args); code != int(lockmgr.CodeInvalidArgument) {
				t.Errorf("%v: exit %d, want %d", args[2:], code, lockmgr.CodeInvalidArgument)
			}
		}
	}
	// The largest that fits gets as far as the (missing) daemon.
	for _, bw := range [][]string{{"--bandwidth", "8796093022207"}, {"--bandwidth", "9223372036854775807", "--bytes"}} {
		args := append([]string{"--socket", sock, "blockcommit", "vm", "vda"}, bw...)
		if code := run(args); code == int(lockmgr.CodeInvalidArgument) {
			t.Errorf("%v: exit %d, a usage error", args[2:], code)
		}
	}
}

// An object the daemon would refuse (a name that is not UTF-8, which gRPC
// could not even carry, or has a control character) is a usage error,
// found before the daemon is asked.
func TestAcquireAndRunRefuseABadObjectName(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	disk := filepath.Join(t.TempDir(), "a.img")
	for _, name := range []string{"caf\xe9", "a\nb"} {
		for _, args := range [][]string{
			{"acquire", "--uuid", "0a0b0c0d-1111-2222-3333-444455556666", "--pid", "1", "--name", name, "--disk", disk},
			{"run", "--name", name, "--disk", disk, "--", "true"},
			{"run", "--qemu", "--name", name, "--", "qemu-system-x86_64", "-machine", "none"},
		} {
			if code := run(append([]string{"--socket", sock}, args...)); code != int(lockmgr.CodeInvalidArgument) {
				t.Errorf("%q: exit %d, want %d", args, code, lockmgr.CodeInvalidArgument)
			}
		}
	}
}

// The --grace help states the longest grace revoke takes (api.MaxGrace),
// and that without it the daemon's revoke.grace applies.
func TestRevokeGraceHelpStatesItsRange(t *testing.T) {
	var usage string
	for _, c := range newRootCmd().Commands() {
		if c.Name() == "revoke" {
			usage = c.Flags().Lookup("grace").Usage
		}
	}
	_, after, _ := strings.Cut(usage, "up to ")
	max, err := time.ParseDuration(strings.TrimRight(strings.SplitN(after, " ", 2)[0], ",;"))
	if err != nil || max != api.MaxGrace {
		t.Errorf("--grace help %q does not say \"up to %v\"", usage, api.MaxGrace)
	}
	if !strings.Contains(usage, "revoke.grace") {
		t.Errorf("--grace help %q does not name the daemon's revoke.grace as the default", usage)
	}
}
