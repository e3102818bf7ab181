package lockmgr

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestResourceValidateRejectsMalformed(t *testing.T) {
	long := strings.Repeat("a", MaxNameLen+1)
	cases := []struct {
		name string
		r    Resource
	}{
		{"empty disk path", DiskResource("", Exclusive)},
		{"NUL in disk path", DiskResource("/a\x00b", Exclusive)},
		{"disk path invalid UTF-8", DiskResource("/images/caf\xe9.img", Exclusive)},
		{"custom name invalid UTF-8", Resource{Type: "vnc-port", Name: "\xff"}},
		{"over-long disk path", DiskResource("/"+strings.Repeat("a", MaxPathLen), Exclusive)},
		{"lease without slash", Resource{Type: TypeLease, Name: "nokey"}},
		{"lease lockspace ..", LeaseResource("..", "k", Exclusive)},
		{"lease key ..", LeaseResource("ls", "..", Exclusive)},
		{"lease key .", LeaseResource("ls", ".", Exclusive)},
		{"lease key with slash", Resource{Type: TypeLease, Name: "ls/a/b"}},
		{"lease empty lockspace", LeaseResource("", "k", Exclusive)},
		{"lease empty key", LeaseResource("ls", "", Exclusive)},
		{"lease NUL key", LeaseResource("ls", "a\x00", Exclusive)},
		{"lease control char", LeaseResource("ls", "a\nb", Exclusive)},
		{"lease over-long key", LeaseResource("ls", long, Exclusive)},
		{"lease invalid UTF-8", LeaseResource("ls", "\xff", Exclusive)},
		{"empty type", Resource{Name: "x"}},
		{"upper-case type", Resource{Type: "Disk2", Name: "x"}},
		{"type with slash", Resource{Type: "a/b", Name: "x"}},
		{"custom empty name", Resource{Type: "vnc-port", Name: ""}},
		{"unknown mode", Resource{Type: TypeDisk, Name: "/a", Mode: 7}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.r.Validate()
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("Validate(%+v) = %v, want an invalid-argument error", c.r, err)
			}
			if _, err := Canonical(c.r); CodeOf(err) != CodeInvalidArgument {
				t.Fatalf("Canonical(%+v) = %v, want code %v", c.r, err, CodeInvalidArgument)
			}
		})
	}
}

func TestResourceValidateAccepts(t *testing.T) {
	for _, r := range []Resource{
		DiskResource("/var/lib/images/a b:c.qcow2", Shared),
		LeaseResource("cluster", "vm-42", Exclusive),
		{Type: "vnc-port", Name: "5901", Mode: ReadOnly},
	} {
		if err := r.Validate(); err != nil {
			t.Errorf("Validate(%v) = %v", r, err)
		}
	}
}

func TestCanonicalResolvesSymlinks(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.img")
	if err := os.Symlink(img, link); err != nil {
		t.Fatal(err)
	}
	linkDir := filepath.Join(dir, "linkdir")
	if err := os.Symlink(dir, linkDir); err != nil {
		t.Fatal(err)
	}
	real, _ := filepath.EvalSymlinks(img)
	for _, p := range []string{img, real, link, filepath.Join(linkDir, "a.img"), filepath.Join(linkDir, "link.img"), filepath.Join(dir, ".", "sub", "..", "a.img")} {
		if p == filepath.Join(dir, ".", "sub", "..", "a.img") {
			os.Mkdir(filepath.Join(dir, "sub"), 0o700)
		}
		c, err := Canonical(DiskResource(p, Exclusive))
		if err != nil {
			t.Fatal(err)
		}
		if c.Name != real {
			t.Errorf("Canonical(%q) = %q, want %q", p, c.Name, real)
		}
	}
	// A missing file keeps its name under its resolved directory.
	c, err := Canonical(DiskResource(filepath.Join(dir, "new.img"), Exclusive))
	if err != nil || c.Name != filepath.Join(filepath.Dir(real), "new.img") {
		t.Errorf("Canonical(missing) = %q, %v", c.Name, err)
	}
	// A dangling symlink is an error: its target is what would be opened.
	dangling := filepath.Join(dir, "dangling")
	os.Symlink(filepath.Join(dir, "nowhere", "x"), dangling)
	if _, err := Canonical(DiskResource(dangling, Exclusive)); CodeOf(err) != CodeInvalidArgument {
		t.Errorf("Canonical(dangling) = %v, want invalid argument", err)
	}
}

func TestObjectSetAndValidate(t *testing.T) {
	var o Object
	for _, kv := range [][2]string{{"uuid", "0A0B0C0D-1111-2222-3333-444455556666"}, {"name", "web1"}, {"pid", "42"}, {"id", "3"}, {"host", "h1"}, {"uri", "qemu:///system"}} {
		if err := o.Set(kv[0], kv[1]); err != nil {
			t.Fatalf("Set(%q): %v", kv[0], err)
		}
	}
	want := Object{UUID: "0a0b0c0d-1111-2222-3333-444455556666", Name: "web1", PID: 42, ID: 3, Host: "h1", URI: "qemu:///system"}
	if o != want {
		t.Fatalf("object = %+v, want %+v", o, want)
	}
	for _, kv := range [][2]string{{"owner", "x"}, {"pid", "-1"}, {"pid", "x"}, {"uuid", "not-a-uuid"}} {
		if err := o.Set(kv[0], kv[1]); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("Set(%q, %q) = %v, want invalid argument", kv[0], kv[1], err)
		}
	}
	for _, bad := range []Object{{UUID: ""}, {UUID: "0a0b0c0d-1111-2222-3333-44445555666g"}, {UUID: want.UUID, Name: "a\x00"}, {UUID: want.UUID, PID: -2}} {
		if err := bad.Validate(); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("Validate(%+v) = %v, want invalid argument", bad, err)
		}
	}
}

// ParseUUID lowers any upper-case digit, returns a lower-case UUID as it
// is, and refuses anything that is not 8-4-4-4-12 hex digits.
func TestParseUUID(t *testing.T) {
	const lower = "0a0b0c0d-1111-2222-3333-44445555666f"
	for _, in := range []string{lower, "0A0B0C0D-1111-2222-3333-44445555666F", "0a0B0c0D-1111-2222-3333-44445555666F"} {
		if got, err := ParseUUID(in); err != nil || got != lower {
			t.Errorf("ParseUUID(%q) = %q, %v; want %q", in, got, err, lower)
		}
	}
	for _, bad := range []string{"", lower[:35], lower + "0", "0a0b0c0d-1111-2222-3333-44445555666g", "0a0b0c0d_1111-2222-3333-44445555666f",
		"0a0b0c0d-1111-2222-3333-4444555566-6f", "0a0b0c0d-1111-2222-3333-444455556\u212a", "0a0b0c0d-1111-2222-3333-4444555566\xff\xff"} {
		if got, err := ParseUUID(bad); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("ParseUUID(%q) = %q, %v; want invalid argument", bad, got, err)
		}
	}
}

func TestModeConflicts(t *testing.T) {
	cases := []struct {
		a, b Mode
		want bool
	}{
		{Exclusive, Exclusive, true}, {Exclusive, Shared, true}, {Shared, Exclusive, true},
		{Shared, Shared, false}, {ReadOnly, Exclusive, false}, {Exclusive, ReadOnly, false}, {ReadOnly, ReadOnly, false},
	}
	for _, c := range cases {
		if got := c.a.Conflicts(c.b); got != c.want {
			t.Errorf("%v.Conflicts(%v) = %v, want %v", c.a, c.b, got, c.want)
		}
	}
}

func TestCodeOfAndSentinels(t *testing.T) {
	be := &BusyError{Resource: DiskResource("/a", Exclusive), Holder: Holder{Name: "web1", UUID: "u", PID: 7, Host: "h1", Mode: Exclusive}}
	wrapped := errors.Join(errors.New("ctx"), be)
	if CodeOf(wrapped) != CodeBusy || !errors.Is(wrapped, ErrBusy) || errors.Is(wrapped, ErrStaleState) {
		t.Fatalf("busy error misclassified: code %v", CodeOf(wrapped))
	}
	msg := be.Error()
	for _, want := range []string{"disk /a is locked exclusively", `vm "web1"`, "pid 7", "host h1"} {
		if !strings.Contains(msg, want) {
			t.Errorf("busy message %q lacks %q", msg, want)
		}
	}
	if CodeOf(nil) != CodeOK || CodeOf(errors.New("x")) != CodeInternal {
		t.Fatal("CodeOf(nil/plain) wrong")
	}
	if errors.Is(Errorf(CodeTimeout, "x"), ErrBusy) || !errors.Is(Errorf(CodeTimeout, "x"), ErrTimeout) {
		t.Fatal("Errorf sentinel matching wrong")
	}
}

// SafeField makes any name one an Object may hold, keeping what it can
// show: printable text as it is, control characters and invalid bytes as
// escapes, cut at the limit on a whole character.
func TestSafeFieldKeepsWhatItCanShow(t *testing.T) {
	cases := []struct{ in, want string }{
		{"web1", "web1"},
		{"web é 1", "web é 1"},
		{"a\tb\nc", `a\tb\nc`},
		{"\x1b[31mred\x7f", `\x1b[31mred\x7f`},
		{"bad\xffbyte", `bad\xffbyte`},
		{strings.Repeat("a", 2000), strings.Repeat("a", 1024)},
		{strings.Repeat("a", 1023) + "é", strings.Repeat("a", 1023)},
		{strings.Repeat("a", 1022) + "\t", strings.Repeat("a", 1022) + `\t`},
		{strings.Repeat("a", 1023) + "\t", strings.Repeat("a", 1023)},
	}
	for _, c := range cases {
		got := SafeField(c.in)
		if got != c.want {
			t.Errorf("SafeField(%q) = %q, want %q", c.in, got, c.want)
		}
		o := Object{UUID: "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", Name: got, URI: got, Host: got}
		if err := o.Validate(); err != nil {
			t.Errorf("SafeField(%q) = %q, which an Object refuses: %v", c.in, got, err)
		}
	}
}

var canonicalFormCases = []string{"", "/", "//", "/a", "/a/", "/a//b", "/a/./b", "/a/../b", "/..", "/.", "/a/.", "/a/..",
	"a", "./a", "/a/b.c", "/a/.b", "/a/..b", "/a/b..", "/a/b/c.qcow2", "/ /x", "/a\x00b", "/a/\x00"}

// canonicalForm is InCanonicalForm's definition.
func canonicalForm(p string) bool {
	return filepath.IsAbs(p) && filepath.Clean(p) == p && !strings.Contains(p, "\x00")
}

func TestInCanonicalForm(t *testing.T) {
	for _, p := range canonicalFormCases {
		if got, want := InCanonicalForm(p), canonicalForm(p); got != want {
			t.Errorf("InCanonicalForm(%q) = %v, want %v", p, got, want)
		}
	}
}

func FuzzInCanonicalForm(f *testing.F) {
	for _, p := range canonicalFormCases {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if got, want := InCanonicalForm(p), canonicalForm(p); got != want {
			t.Errorf("InCanonicalForm(%q) = %v, want %v", p, got, want)
		}
	})
}
