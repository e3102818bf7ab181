package lockmgr

import (
	"errors"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

func TestStateRoundTrip(t *testing.T) {
	st := State{
		{Resource: DiskResource("/var/lib/images/a,b:c d%.qcow2", Exclusive), Token: 17},
		{Resource: LeaseResource("cluster", "vm:1", Shared), Token: 3},
		{Resource: Resource{Type: "vnc-port", Name: "5901", Mode: ReadOnly}, Token: 0},
	}
	s := st.String()
	if !strings.HasPrefix(s, "v1:") {
		t.Fatalf("state %q lacks the version prefix", s)
	}
	for _, r := range s {
		if r < 0x21 || r > 0x7e {
			t.Fatalf("state %q has an unprintable or space character %q", s, r)
		}
	}
	got, err := ParseState(s)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, st) {
		t.Fatalf("ParseState(String()) = %+v, want %+v", got, st)
	}
	if empty, err := ParseState(State{}.String()); err != nil || len(empty) != 0 {
		t.Fatalf("empty state: %v %v", empty, err)
	}
}

// A name is written in a state string as url.PathEscape writes it, with
// ',' and ':' escaped too, as it always was: state strings made by an older
// vmlockd (kept by management applications) stay the same.
func TestStateEscapesNamesAsPathEscape(t *testing.T) {
	var all []byte
	for c := range 256 {
		all = append(all, byte(c))
	}
	old := strings.NewReplacer(",", "%2C", ":", "%3A")
	for _, name := range []string{string(all), "/var/lib/images/a,b:c d%.qcow2", "vm:1", "ä€/x?y;z#w", ""} {
		st := State{{Resource: Resource{Type: "custom", Name: name}, Token: 1 << 40}}
		want := "v1:custom:exclusive:1099511627776:" + old.Replace(url.PathEscape(name))
		if got := st.String(); got != want {
			t.Errorf("State.String() of %q = %q, want %q", name, got, want)
		}
	}
}

func TestParseStateRejects(t *testing.T) {
	for _, s := range []string{
		"v2:disk:exclusive:1:%2Fa",
		"disk:exclusive:1:/a",
		"v1:disk:exclusive:1",
		"v1:disk:bogus:1:%2Fa",
		"v1:disk::1:%2Fa",
		"v1:disk:exclusive:-1:%2Fa",
		"v1:disk:exclusive:01:%2Fa",
		"v1:disk:exclusive:99999999999999999999:%2Fa",
		"v1:disk:exclusive:1:%zz",
		"v1:disk:exclusive:1:",
		"v1:lease:exclusive:1:..%2Fk",
		"v1:disk:exclusive:1:%2Fa,disk:shared:2:%2Fa",
		"v1:Disk:exclusive:1:%2Fa",
		"v1:disk:exclusive:1:%2Fa%00",
		"v1:" + strings.Repeat("x", MaxStateLen),
	} {
		if _, err := ParseState(s); !errors.Is(err, ErrInvalidArgument) {
			short := s
			if len(short) > 60 {
				short = short[:60]
			}
			t.Errorf("ParseState(%q) = %v, want invalid argument", short, err)
		}
	}
}

func FuzzParseState(f *testing.F) {
	f.Add("v1:disk:exclusive:17:%2Fvar%2Flib%2Fa.qcow2,lease:shared:3:ls%2Fk")
	f.Add("v1:")
	f.Add("v1:vnc-port:readonly:0:5901")
	f.Add("v1:disk:exclusive:1:%2Fa,disk:shared:2:%2Fa")
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseState(s)
		if err != nil {
			if CodeOf(err) != CodeInvalidArgument {
				t.Fatalf("ParseState(%q): error of class %v, want invalid argument", s, CodeOf(err))
			}
			return
		}
		// What parses must survive a round trip unchanged.
		again, err := ParseState(st.String())
		if err != nil {
			t.Fatalf("re-parse of %q (from %q): %v", st.String(), s, err)
		}
		if len(st) != len(again) || (len(st) > 0 && !reflect.DeepEqual(st, again)) {
			t.Fatalf("round trip changed %q: %+v != %+v", s, st, again)
		}
	})
}
