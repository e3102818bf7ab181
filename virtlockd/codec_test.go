package virtlockd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The header vector of the spec.
func TestHeaderVector(t *testing.T) {
	want := unhex(t, "00 00 00 1c 11 22 33 44 00 00 00 01 00 00 06 66 00 00 00 00 00 00 00 99 00 00 00 00")
	h := Header{Program: 0x11223344, Version: 1, Procedure: 0x666, Type: TypeCall, Serial: 0x99, Status: StatusOK}
	got, err := AppendMessage(nil, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("encoded\n%x\nwant\n%x", got, want)
	}
	gh, payload, err := NewReader(bytes.NewReader(want), MaxMessageSize).Next()
	if err != nil {
		t.Fatal(err)
	}
	if gh != h || len(payload) != 0 {
		t.Fatalf("decoded %+v payload %x, want %+v and none", gh, payload, h)
	}
}

// Calls and an error reply checked byte for byte against hand-made vectors.
func TestKnownVectors(t *testing.T) {
	uuid := [16]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
	cases := []struct {
		name string
		enc  func() ([]byte, error)
		want string
	}{
		{"acquire", func() ([]byte, error) {
			return AppendCall(nil, 7, &AcquireResourceArgs{Path: "", Name: "/a", Flags: AcquireShared | AcquireAutoCreate})
		}, "0000002c 0ea7beef 00000001 00000006 00000000 00000007 00000000" +
			"00000000 00000002 2f610000 00000003"},
		{"register", func() ([]byte, error) {
			return AppendCall(nil, 0, &RegisterArgs{Owner: Owner{UUID: uuid, Name: "vm1", ID: 5, PID: 1234}})
		}, "00000040 0ea7beef 00000001 00000001 00000000 00000000 00000000" +
			"00010203 04050607 08090a0b 0c0d0e0f 00000003 766d3100 00000005 000004d2 00000000"},
		{"create lockspace", func() ([]byte, error) {
			return AppendCall(nil, 1, &CreateLockspaceArgs{Path: "/ls/x"})
		}, "00000028 0ea7beef 00000001 00000008 00000000 00000001 00000000 00000005 2f6c732f 78000000"},
		{"error reply", func() ([]byte, error) {
			m := "m"
			call := Header{Program: Program, Version: 1, Procedure: ProcAcquireResource, Serial: 9}
			return AppendReply(nil, call, &RemoteError{Code: CodeResourceBusy, Domain: DomainLockspace, Message: &m, Level: LevelError, Int1: -1, Int2: -1})
		}, "00000050 0ea7beef 00000001 00000006 00000001 00000009 00000001" +
			"00000057 00000033 00000001 00000001 6d000000 00000002 00000000 00000000 00000000 00000000 ffffffff ffffffff 00000000"},
		{"ok reply", func() ([]byte, error) {
			return AppendReply(nil, Header{Program: Program, Version: 1, Procedure: ProcRestrict, Serial: 3}, nil)
		}, "0000001c 0ea7beef 00000001 00000002 00000001 00000003 00000000"},
	}
	for _, c := range cases {
		got, err := c.enc()
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if want := unhex(t, c.want); !bytes.Equal(got, want) {
			t.Errorf("%s: encoded\n%x\nwant\n%x", c.name, got, want)
		}
	}
}

func sampleArgs() []Args {
	long := strings.Repeat("x", StringMax)
	return []Args{
		&RegisterArgs{Owner: Owner{UUID: [16]byte{0xde, 0xad, 15: 0xff}, Name: "guest-ü", ID: 42, PID: 4242}, Flags: 0},
		&RegisterArgs{Owner: Owner{Name: long, ID: 1, PID: 0xffffffff}, Flags: 0xffffffff},
		&RestrictArgs{Flags: 0},
		&NewArgs{Path: "/var/lib/libvirt/lockd/files", Flags: 1},
		&CreateResourceArgs{Path: "/ls", Name: "abc", Flags: 0},
		&DeleteResourceArgs{Path: "/ls", Name: "abcd", Flags: 0},
		&AcquireResourceArgs{Path: "", Name: "/var/lib/images/a.qcow2", Flags: AcquireShared},
		&AcquireResourceArgs{Path: long, Name: long, Flags: AcquireAutoCreate},
		&ReleaseResourceArgs{Path: "/ls", Name: "k", Flags: 0},
		&CreateLockspaceArgs{Path: ""},
		&CreateLockspaceArgs{Path: "/p"},
	}
}

// Every call survives encode → frame → decode unchanged.
func TestCallRoundTrip(t *testing.T) {
	var stream []byte
	args := sampleArgs()
	for i, a := range args {
		var err error
		if stream, err = AppendCall(stream, uint32(i), a); err != nil {
			t.Fatalf("%T: %v", a, err)
		}
	}
	if len(stream) > 0 && MaxCallSize < MinMessageSize+4+StringMax+4+StringMax+4 {
		t.Fatal("MaxCallSize is below the largest call")
	}
	rd := NewReader(bytes.NewReader(stream), MaxCallSize)
	for i, a := range args {
		h, payload, err := rd.Next()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		want := Header{Program: Program, Version: ProgramVersion, Procedure: a.Procedure(), Type: TypeCall, Serial: uint32(i)}
		if h != want {
			t.Fatalf("message %d: header %+v, want %+v", i, h, want)
		}
		got, err := DecodeArgs(h.Procedure, payload)
		if err != nil {
			t.Fatalf("message %d (%s): %v", i, h.Procedure, err)
		}
		if !reflect.DeepEqual(got, a) {
			t.Fatalf("message %d: decoded %+v, want %+v", i, got, a)
		}
	}
	if _, _, err := rd.Next(); err != io.EOF {
		t.Fatalf("after the last message: %v, want io.EOF", err)
	}
}

func strp(s string) *string { return &s }

// Error replies, with every optional member present or absent.
func TestErrorReplyRoundTrip(t *testing.T) {
	errs := []*RemoteError{
		newRemoteError(CodeResourceBusy, DomainLockspace, "disk /a is locked exclusively by vm \"x\""),
		{Code: CodeRPC, Domain: DomainRPC, Level: LevelError},
		{Code: -5, Domain: 999, Message: strp(""), Level: 1, Dom: &RemoteDomain{Name: "d", UUID: [16]byte{1}, ID: -1},
			Str1: strp("a"), Str2: strp("bb"), Str3: strp("ccc"), Int1: 7, Int2: -7, Net: &RemoteNetwork{Name: "net0", UUID: [16]byte{15: 2}}},
	}
	for i, e := range errs {
		call := Header{Program: Program, Version: ProgramVersion, Procedure: ProcReleaseResource, Type: TypeCall, Serial: uint32(100 + i)}
		b, err := AppendReply(nil, call, e)
		if err != nil {
			t.Fatal(err)
		}
		h, payload, err := NewReader(bytes.NewReader(b), MaxMessageSize).Next()
		if err != nil {
			t.Fatal(err)
		}
		if h.Type != TypeReply || h.Status != StatusError || h.Serial != call.Serial || h.Procedure != call.Procedure {
			t.Fatalf("reply header %+v", h)
		}
		got, err := DecodeRemoteError(payload)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, e) {
			t.Fatalf("decoded %+v, want %+v", got, e)
		}
	}
	if got := errs[0].Error(); got != `resource busy: disk /a is locked exclusively by vm "x"` {
		t.Errorf("message %q", got)
	}
	if lockmgr.CodeOf(errs[0]) != lockmgr.CodeBusy || lockmgr.CodeOf(errs[1]) != lockmgr.CodeInternal {
		t.Errorf("lockmgr codes %v %v", lockmgr.CodeOf(errs[0]), lockmgr.CodeOf(errs[1]))
	}
}

func wantDecodeErr(t *testing.T, what string, err, sentinel error) {
	t.Helper()
	var de *DecodeError
	if !errors.As(err, &de) || !errors.Is(err, sentinel) {
		t.Fatalf("%s: got %v (%T), want a *DecodeError wrapping %v", what, err, err, sentinel)
	}
}

func TestDecodeBounds(t *testing.T) {
	// A payload for ACQUIRE_RESOURCE, then broken in each way.
	good, _ := AppendArgs(nil, &AcquireResourceArgs{Path: "", Name: "/ab", Flags: 1})
	if _, err := DecodeArgs(ProcAcquireResource, good); err != nil {
		t.Fatal(err)
	}
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := []struct {
		name     string
		proc     Procedure
		payload  []byte
		sentinel error
	}{
		{"truncated flags", ProcAcquireResource, good[:len(good)-1], ErrTruncated},
		{"truncated string", ProcAcquireResource, good[:9], ErrTruncated},
		{"empty", ProcAcquireResource, nil, ErrTruncated},
		{"trailing", ProcAcquireResource, append(bytes.Clone(good), 0, 0, 0, 0), ErrTrailingBytes},
		{"padding", ProcAcquireResource, mod(func(b []byte) []byte { b[11] = 1; return b }), ErrBadPadding},
		{"nul", ProcAcquireResource, mod(func(b []byte) []byte { b[9] = 0; return b }), ErrStringNUL},
		{"string over max", ProcAcquireResource, unhex(t, "00010001"), ErrStringTooLong},
		{"huge length claim", ProcAcquireResource, unhex(t, "ffffffff 00000000"), ErrStringTooLong},
		{"length claim beyond payload", ProcAcquireResource, unhex(t, "00000100 00000000"), ErrTruncated},
		{"unknown procedure", 9, good, ErrUnknownProcedure},
		{"negative procedure", -1, good, ErrUnknownProcedure},
		{"short uuid", ProcRegister, make([]byte, 10), ErrTruncated},
	}
	for _, c := range cases {
		_, err := DecodeArgs(c.proc, c.payload)
		wantDecodeErr(t, c.name, err, c.sentinel)
	}

	// Error bodies: a bad optional discriminant, a string over its bound.
	m := "x"
	body, _ := AppendRemoteError(nil, &RemoteError{Code: 1, Domain: 7, Message: &m, Level: 2})
	bad := bytes.Clone(body)
	bad[11] = 2 // message discriminant
	_, err := DecodeRemoteError(bad)
	wantDecodeErr(t, "optional discriminant", err, ErrBadOptional)
	over := unhex(t, "00000001 00000007 00000001 00400001")
	_, err = DecodeRemoteError(over)
	wantDecodeErr(t, "error string over max", err, ErrStringTooLong)
	_, err = DecodeRemoteError(body[:len(body)-2])
	wantDecodeErr(t, "truncated error", err, ErrTruncated)
}

func TestEncodeBounds(t *testing.T) {
	long := strings.Repeat("y", StringMax+1)
	for _, a := range []Args{
		&RegisterArgs{Owner: Owner{Name: long, ID: 1}},
		&AcquireResourceArgs{Name: long},
		&CreateLockspaceArgs{Path: long},
	} {
		if _, err := AppendCall(nil, 0, a); !errors.Is(err, ErrStringTooLong) {
			t.Errorf("%T with a long string: %v, want ErrStringTooLong", a, err)
		}
	}
	if _, err := AppendCall(nil, 0, &ReleaseResourceArgs{Name: "a\x00b"}); !errors.Is(err, ErrStringNUL) {
		t.Errorf("NUL: %v", err)
	}
	if _, err := AppendMessage(nil, Header{}, make([]byte, MaxMessageSize)); !errors.Is(err, ErrMessageSize) {
		t.Errorf("huge message: %v", err)
	}
}

func TestFrameBounds(t *testing.T) {
	for _, n := range []string{"00000000", "00000003", "0000001b", "02000005", "ffffffff"} {
		_, _, err := NewReader(bytes.NewReader(unhex(t, n+"0ea7beef 00000001 00000001 00000000 00000000 00000000")), MaxMessageSize).Next()
		wantDecodeErr(t, "length "+n, err, ErrMessageSize)
	}
	// A message over the reader's limit is skipped; the next one is read.
	call := Header{Program: Program, Version: 1, Procedure: ProcCreateLockspace, Type: TypeCall, Serial: 1}
	big, _ := AppendMessage(nil, call, make([]byte, MaxCallSize))
	next, _ := AppendCall(nil, 2, &CreateLockspaceArgs{Path: "/x"})
	rd := NewReader(bytes.NewReader(append(big, next...)), MaxCallSize)
	h, _, err := rd.Next()
	wantDecodeErr(t, "over the limit", err, ErrMessageTooLarge)
	if h != call {
		t.Fatalf("skipped message's header %+v, want %+v", h, call)
	}
	h, payload, err := rd.Next()
	if err != nil || h.Serial != 2 {
		t.Fatalf("after a skipped message: %+v %v", h, err)
	}
	if a, err := DecodeArgs(h.Procedure, payload); err != nil || a.(*CreateLockspaceArgs).Path != "/x" {
		t.Fatalf("after a skipped message: %+v %v", a, err)
	}
	// Ends inside a message.
	for _, cut := range []int{2, 10, len(next) - 1} {
		if _, _, err := NewReader(bytes.NewReader(next[:cut]), MaxCallSize).Next(); err != io.ErrUnexpectedEOF {
			t.Errorf("cut at %d: %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
}

// A length word that claims the protocol's maximum, followed by a few bytes,
// must not make the reader allocate the claimed size.
func TestFrameNoUpfrontAllocation(t *testing.T) {
	b := unhex(t, "02000004 0ea7beef 00000001 00000001 00000001 00000000 00000000 0000")
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, _, err := NewReader(bytes.NewReader(b), MaxMessageSize).Next()
	runtime.ReadMemStats(&after)
	if err != io.ErrUnexpectedEOF {
		t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
	}
	if d := after.TotalAlloc - before.TotalAlloc; d > 4<<20 {
		t.Fatalf("reading a 32 MiB claim with 2 bytes of payload allocated %d bytes", d)
	}
}

func TestLockspaceName(t *testing.T) {
	cases := map[string]string{
		"/var/lib/libvirt/lockd/files":  "libvirt:var-lib-libvirt-lockd-files",
		"/var/lib/libvirt/lockd/files/": "libvirt:var-lib-libvirt-lockd-files",
		"/":                             "libvirt:-",
		"/a-b/c d/.e/é":                 `libvirt:a\x2db-c\x20d-.e-\xc3\xa9`,
		"/.hidden":                      `libvirt:\x2ehidden`,
	}
	for in, want := range cases {
		if got := LockspaceName(in); got != want {
			t.Errorf("LockspaceName(%q) = %q, want %q", in, got, want)
		}
		if err := lockmgr.ValidName("lockspace", LockspaceName(in)); err != nil {
			t.Errorf("LockspaceName(%q): %v", in, err)
		}
	}
	long1 := "/" + strings.Repeat("a", 300)
	long2 := long1 + "b"
	n1, n2 := LockspaceName(long1), LockspaceName(long2)
	if n1 == n2 || len(n1) > lockmgr.MaxNameLen || lockmgr.ValidName("lockspace", n1) != nil {
		t.Errorf("long names %q %q", n1, n2)
	}
}

func TestRemoteErrorCodes(t *testing.T) {
	for code, want := range map[ErrorCode]lockmgr.Code{
		CodeResourceBusy: lockmgr.CodeBusy, CodeOperationDenied: lockmgr.CodePermission,
		CodeOperationInvalid: lockmgr.CodeNotRegistered, CodeInvalidArg: lockmgr.CodeInvalidArgument,
		CodeOperationTimeout: lockmgr.CodeTimeout, CodeRPC: lockmgr.CodeInternal,
	} {
		if got := lockmgr.CodeOf(&RemoteError{Code: code}); got != want {
			t.Errorf("code %d: %v, want %v", code, got, want)
		}
	}
	if got := (&RemoteError{Code: 39, Domain: 7}).Error(); got != "libvirt error code 39 (domain 7)" {
		t.Errorf("no message: %q", got)
	}
}

func TestProcedureNames(t *testing.T) {
	want := map[Procedure][2]string{
		ProcRegister:        {"REGISTER", "virLockSpaceProtocolDispatchRegister"},
		ProcRestrict:        {"RESTRICT", "virLockSpaceProtocolDispatchRestrict"},
		ProcNew:             {"NEW", "virLockSpaceProtocolDispatchNew"},
		ProcCreateResource:  {"CREATE_RESOURCE", "virLockSpaceProtocolDispatchCreateResource"},
		ProcDeleteResource:  {"DELETE_RESOURCE", "virLockSpaceProtocolDispatchDeleteResource"},
		ProcAcquireResource: {"ACQUIRE_RESOURCE", "virLockSpaceProtocolDispatchAcquireResource"},
		ProcReleaseResource: {"RELEASE_RESOURCE", "virLockSpaceProtocolDispatchReleaseResource"},
		ProcCreateLockspace: {"CREATE_LOCKSPACE", "virLockSpaceProtocolDispatchCreateLockSpace"},
	}
	for p, w := range want {
		if p.String() != w[0] || cFunc(p) != w[1] {
			t.Errorf("procedure %d: %q %q, want %q %q", int32(p), p.String(), cFunc(p), w[0], w[1])
		}
		if a, err := NewArgsFor(p); err != nil || a.Procedure() != p {
			t.Errorf("NewArgsFor(%v) = %T, %v", p, a, err)
		}
	}
	if got := Procedure(42).String(); got != "procedure(42)" {
		t.Errorf("unknown procedure: %q", got)
	}
}
