package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

// The lock-holder's keys are read back after a restart or a crash: every
// key recordKey (or unadoptedKey) writes parses to its uuid and chunk (or
// n), a key it cannot write ("O/u/00", "O/u/+1") is no record, never a
// second spelling of one chunk, and no key is both a record and an L
// entry.
func FuzzRecordKey(f *testing.F) {
	f.Add("O/6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f/0", "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", 3)
	f.Add("O/u/00", "u", 0)
	f.Add("O/u/+1", "", -1)
	f.Add("L/u/disk:/a", "u/v", 1<<40)
	f.Add("O/u/L0", "u", 0)
	f.Add("O/u/L01", "u/L", 1)
	f.Fuzz(func(t *testing.T, k, uuid string, chunk int) {
		u, c, isRecord := parseRecordKey(k)
		if isRecord && recordKey(u, c) != k {
			t.Fatalf("parseRecordKey(%q) = %q, %d: the key of that is %q", k, u, c, recordKey(u, c))
		}
		u, c, isL := parseUnadoptedKey(k)
		if isL && unadoptedKey(u, c) != k {
			t.Fatalf("parseUnadoptedKey(%q) = %q, %d: the key of that is %q", k, u, c, unadoptedKey(u, c))
		}
		if isRecord && isL {
			t.Fatalf("%q is both a record and an L entry", k)
		}
		if chunk < 0 || strings.Contains(uuid, "/") {
			return
		}
		if u, c, ok := parseRecordKey(recordKey(uuid, chunk)); !ok || u != uuid || c != chunk {
			t.Fatalf("recordKey(%q, %d) = %q parses as %q, %d, %v", uuid, chunk, recordKey(uuid, chunk), u, c, ok)
		}
		if u, c, ok := parseUnadoptedKey(unadoptedKey(uuid, chunk)); !ok || u != uuid || c != chunk {
			t.Fatalf("unadoptedKey(%q, %d) = %q parses as %q, %d, %v", uuid, chunk, unadoptedKey(uuid, chunk), u, c, ok)
		}
	})
}

// An object's lock-holder record is read back after a restart or a crash
// of vmlockd: any key and bytes are a *recordError naming the key, or a
// record that satisfies what restore relies on (the object of the key,
// valid and with its canonical uuid; canonical resources; leases that are
// not read-only, read-only uses that are; a known migration role) and that
// is written back and read again as the same.
func FuzzObjectRecord(f *testing.F) {
	const u = "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f"
	since := time.Date(2025, 5, 1, 12, 3, 4, 5, time.UTC)
	chunk0 := objectRecord{
		Object: lockmgr.Object{UUID: u, Name: "web1", PID: 4242, Host: "h1"}, UID: 0, Start: 123456, Since: since,
		ReadOnly: []lockmgr.Resource{lockmgr.DiskResource("/iso/a.iso", lockmgr.ReadOnly)},
		Leases: []leaseRecord{
			{Resource: lockmgr.DiskResource("/img/a.qcow2", lockmgr.Exclusive), Token: 7, File: 0},
			{Resource: lockmgr.LeaseResource("ls", "k", lockmgr.Shared), Token: 1, File: -1, Pending: true},
		},
		Migration: &migration{Role: roleSource, Peer: "h2", Pending: []lockmgr.Resource{lockmgr.DiskResource("/iso/a.iso", lockmgr.ReadOnly)}},
	}
	chunk1 := objectRecord{Object: chunk0.Object, UID: -1, Since: since,
		Leases: []leaseRecord{{Resource: lockmgr.Resource{Type: "vnc", Name: "port 5900"}, Token: 3, File: 0}}}
	for c, rec := range []objectRecord{chunk0, chunk1} {
		b, err := json.Marshal(rec)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(recordKey(u, c), b)
		f.Add(recordKey(u, c), b[:len(b)/2]) // truncated
	}
	f.Add("O/"+u+"/0", []byte(`{"object":{"uuid":"`+u+`"},"uid":"0"}`))                                  // wrong type
	f.Add("O/"+u+"/0", []byte(`{"object":{"uuid":"`+u+`"},"uid":1e30,"start":1e30}`))                    // huge numbers
	f.Add("O/"+u+"/0", []byte(`{"object":{"uuid":"`+u+`"},"object":{"uuid":"`+strings.ToUpper(u)+`"}}`)) // duplicate keys
	f.Add("O/"+strings.ToUpper(u)+"/0", []byte(`{"object":{"uuid":"`+strings.ToUpper(u)+`"},"uid":0}`))  // not canonical
	f.Add("O/"+u+"/0", []byte("{\"object\":{\"uuid\":\""+u+"\",\"name\":\"\xff\"},\"uid\":0}"))          // not UTF-8
	f.Add("O/"+u+"/0", []byte(`{"object":{"uuid":"`+u+`"},"readonly":[{"type":"disk","name":"a.img","mode":"readonly"}]}`))
	f.Add("O/"+u+"/0", []byte(`{"object":{"uuid":"`+u+`"},"readonly":[{"type":"disk","name":"/a.img"}]}`))
	f.Add("O/"+u+"/1", []byte(`{"object":{"uuid":"`+u+`"},"leases":[{"resource":{"type":"","name":""},"file":-2}]}`))
	f.Add("O/"+u+"/0", []byte(`{"object":{"uuid":"`+u+`"},"migration":{"role":"sideways"}}`))
	f.Add("O//0", []byte(`{"object":{}}`))
	f.Add("O/"+u+"/0", []byte(`null`))
	f.Add("O/"+u+"/0", []byte{})
	f.Fuzz(func(t *testing.T, key string, meta []byte) {
		uuid, chunk, rec, err := decodeRecord(key, meta)
		if err != nil {
			var re *recordError
			if !errors.As(err, &re) || re.Key != key || !strings.Contains(err.Error(), key) {
				t.Fatalf("decodeRecord(%q, %q): %v (%T) does not name the record", key, meta, err, err)
			}
			return
		}
		what := fmt.Sprintf("record %q %q", key, meta)
		if recordKey(uuid, chunk) != key || rec.Object.UUID != uuid {
			t.Fatalf("%s: read as chunk %d of %q, of object %q", what, chunk, uuid, rec.Object.UUID)
		}
		if o := rec.Object; o.Validate() != nil || o.UUID != uuid {
			t.Fatalf("%s: object %+v is not valid, or its uuid not canonical", what, rec.Object)
		}
		canonical := func(r lockmgr.Resource) bool {
			return r.Validate() == nil && (r.Type != lockmgr.TypeDisk || filepath.IsAbs(r.Name) && filepath.Clean(r.Name) == r.Name)
		}
		for _, l := range rec.Leases {
			if !canonical(l.Resource) || l.Resource.Mode == lockmgr.ReadOnly || l.File < -1 {
				t.Fatalf("%s: lease %+v", what, l)
			}
		}
		for _, r := range rec.ReadOnly {
			if !canonical(r) || r.Mode != lockmgr.ReadOnly {
				t.Fatalf("%s: read-only use of %+v", what, r)
			}
		}
		if m := rec.Migration; m != nil && (m.Role != roleSource && m.Role != roleTarget || slices.ContainsFunc(m.Pending, func(r lockmgr.Resource) bool { return !canonical(r) })) {
			t.Fatalf("%s: migration mark %+v", what, m)
		}
		if rec.UID < -1 {
			t.Fatalf("%s: uid %d", what, rec.UID)
		}

		b, err := json.Marshal(rec)
		if err != nil {
			t.Fatalf("%s cannot be written back: %v", what, err)
		}
		u2, c2, again, err := decodeRecord(key, b)
		if err != nil || u2 != uuid || c2 != chunk || !again.Since.Equal(rec.Since) {
			t.Fatalf("%s is written back as %s and read as %q %d %+v (%v)", what, b, u2, c2, again, err)
		}
		again.Since, rec.Since = time.Time{}, time.Time{}
		// omitempty writes no empty list: none reads back.
		if len(rec.ReadOnly) == 0 {
			rec.ReadOnly = nil
		}
		if len(rec.Leases) == 0 {
			rec.Leases = nil
		}
		if m := rec.Migration; m != nil && len(m.Pending) == 0 {
			m.Pending = nil
		}
		if !reflect.DeepEqual(again, rec) {
			t.Fatalf("%s is written back as %s and read as %+v, not %+v", what, b, again, rec)
		}
	})
}
