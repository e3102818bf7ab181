package etcdlock

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/vmlock/vmlock/lockmgr"
)

// A holder key's record and a token key's record are written by any host
// of the cluster and read by the others: every record the driver writes
// reads back as it was, and any bytes at all (another version's record, a
// value put by hand) parse without a panic, to a record that reads back
// the same when written again.
func FuzzRecords(f *testing.F) {
	f.Add([]byte(`{"resource":{"type":"disk","name":"/a","mode":"shared"},"holder":{"uuid":"u","mode":"shared"},"token":7,"attempt":"ab"}`),
		"disk", "/img/a.qcow2", uint8(0), "vm1", "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", 4242, "host1", int64(1795292923123456789), uint64(7), "0123456789abcdef", true)
	f.Add([]byte(`{"host":"h","uuid":"u","attempt":"a","expect":3,"void":true}`),
		"lease", "ls/k", uint8(1), "", "", 0, "", int64(0), uint64(0), "", false)
	f.Add([]byte(`null`), "x", "", uint8(2), "a\"\\\n", "", -1, "h\u00e9", int64(-1), uint64(1<<63), "", false)
	f.Add([]byte(`{"resource":{"mode":""},"holder":{"mode":"rw"},"token":-1}`), "", "", uint8(0), "", "", 0, "", int64(0), uint64(0), "", false)
	f.Fuzz(func(t *testing.T, raw []byte, typ, name string, mode uint8, hname, uuid string, pid int, host string, since int64, tok uint64, attempt string, void bool) {
		if r, ok := parseRecord(raw); ok {
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatalf("record %+v parsed from %q cannot be written: %v", r, raw, err)
			}
			if again, ok := parseRecord(b); !ok || !sameRecord(again, r) {
				t.Fatalf("record %+v parsed from %q reads back as %+v (%v)", r, raw, again, ok)
			}
		}
		if r, ok := parseTokRecord(raw); ok {
			if again, ok := parseTokRecord([]byte(r.String())); !ok || again != r {
				t.Fatalf("token record %+v parsed from %q reads back as %+v (%v)", r, raw, again, ok)
			}
		}

		for _, s := range []string{typ, name, hname, uuid, host, attempt} {
			if !utf8.ValidString(s) {
				return // JSON replaces invalid UTF-8
			}
		}
		m := lockmgr.Mode(mode % 3)
		rec := record{
			Resource: lockmgr.Resource{Type: lockmgr.ResourceType(typ), Name: name, Mode: m},
			Holder:   lockmgr.Holder{Name: hname, UUID: uuid, PID: pid, Host: host, Mode: m, Since: time.Unix(0, since).UTC()},
			Token:    tok,
			Attempt:  attempt,
		}
		b, err := json.Marshal(rec)
		if err != nil {
			t.Fatalf("record %+v cannot be written: %v", rec, err)
		}
		if got, ok := parseRecord(b); !ok || !sameRecord(got, rec) {
			t.Fatalf("record %+v written as %s reads back as %+v (%v)", rec, b, got, ok)
		}
		tr := tokRecord{Host: host, UUID: uuid, Attempt: attempt, Expect: tok, Void: void}
		if got, ok := parseTokRecord([]byte(tr.String())); !ok || got != tr {
			t.Fatalf("token record %+v written as %s reads back as %+v (%v)", tr, tr.String(), got, ok)
		}
	})
}

// sameRecord compares records, their holders' grant times by instant.
func sameRecord(a, b record) bool {
	if !a.Holder.Since.Equal(b.Holder.Since) {
		return false
	}
	a.Holder.Since, b.Holder.Since = time.Time{}, time.Time{}
	return reflect.DeepEqual(a, b)
}

// The session file is read back when vmlockd starts, to re-attach to its
// lease: any bytes in it are a session or a *sessionFileError, never a
// panic; a session it reads names a lease etcd can have granted, a host
// and a prefix, and is written back (as writeState writes) and read again
// as the same; and every session writeState can write reads back as it
// was.
func FuzzSessionFile(f *testing.F) {
	valid, _ := json.Marshal(stateFile{Lease: 0x3fb2a201b736bb03, Host: "host1", Prefix: DefaultPrefix})
	f.Add(append(valid, '\n'), int64(0x3fb2a201b736bb03), "host1", DefaultPrefix)
	f.Add(valid[:len(valid)/2], int64(1), "h", "/")                                                // truncated
	f.Add([]byte(`{"lease":"7","host":"h","prefix":"/p/"}`), int64(-1), "h", "/p/")                // wrong type
	f.Add([]byte(`{"lease":1e30,"host":"h","prefix":"/p/"}`), int64(-1<<63), "", "/p/")            // huge number
	f.Add([]byte(`{"lease":9223372036854775808,"host":"h","prefix":"/"}`), int64(1<<62), "h", "p") // int64 overflow
	f.Add([]byte(`{"lease":0,"host":"h","prefix":"/"}`), int64(0), "h", "/")
	f.Add([]byte(`{"lease":-5,"host":"h","prefix":"/"}`), int64(-5), "h", "/")
	f.Add([]byte(`{"lease":5,"lease":6,"host":"h","host":"","prefix":"/"}`), int64(6), "h\u00e9", "/") // duplicate keys
	f.Add([]byte("{\"lease\":5,\"host\":\"h\xff\",\"prefix\":\"/\"}"), int64(5), "h\xff", "/\xfe/")    // not UTF-8
	f.Add([]byte(`{"lease":5}`), int64(5), "", "")
	f.Add([]byte(`null`), int64(5), "h", "/")
	f.Add([]byte{}, int64(1), "h", "/")
	f.Fuzz(func(t *testing.T, raw []byte, lease int64, host, prefix string) {
		st, err := decodeSession(raw)
		if err != nil {
			var se *sessionFileError
			if !errors.As(err, &se) || err.Error() == "" {
				t.Fatalf("decodeSession(%q) fails with %v (%T), not a *sessionFileError", raw, err, err)
			}
		} else {
			if st.Lease <= 0 || st.Host == "" || !strings.HasSuffix(st.Prefix, "/") {
				t.Fatalf("session %+v read from %q: no lease, host or prefix", st, raw)
			}
			b, err := json.Marshal(st)
			if err != nil {
				t.Fatalf("session %+v read from %q cannot be written: %v", st, raw, err)
			}
			if again, err := decodeSession(append(b, '\n')); err != nil || again != st {
				t.Fatalf("session %+v read from %q reads back as %+v (%v)", st, raw, again, err)
			}
		}

		if !utf8.ValidString(host) || !utf8.ValidString(prefix) {
			return // JSON replaces invalid UTF-8
		}
		want := stateFile{Lease: lease, Host: host, Prefix: prefix}
		b, err := json.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeSession(append(b, '\n'))
		switch valid := lease > 0 && host != "" && strings.HasSuffix(prefix, "/"); {
		case valid && (err != nil || got != want):
			t.Fatalf("session %+v written as %s reads back as %+v (%v)", want, b, got, err)
		case !valid && err == nil:
			t.Fatalf("session %+v written as %s is read as a session", want, b)
		}
	})
}
