package etcdlock

import (
	"encoding/json"
	"reflect"
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
