package lockspace

import (
	"encoding/binary"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/vmlock/vmlock/lockmgr"
)

// A lease file's record is written by appendRecord (its holder's JSON built
// partly by hand) and read by parseHolder, possibly on another host: every
// holder comes back as it was written, and any bytes at all (a torn or
// foreign file) parse without a panic.
func FuzzRecord(f *testing.F) {
	f.Add("vm1", "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", "host1", 4242, uint8(0), uint64(7), []byte{})
	f.Add("a \"quoted\" \\ name\n", "", "h\u00e9", 0, uint8(1), uint64(1<<63), []byte("\x07\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00{}"))
	f.Add("", "", "", -1, uint8(2), uint64(0), []byte("\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, name, uuid, host string, pid int, mode uint8, tok uint64, raw []byte) {
		parseHolder(raw) // must not panic

		h := lockmgr.Holder{Name: name, UUID: uuid, PID: pid, Host: host, Mode: lockmgr.Mode(mode % 3)}
		now := time.Date(2026, 11, 22, 1, 2, 3, 456789, time.UTC)
		var cache holderCache
		for range 2 { // the second time from the cache
			rec := appendRecord(nil, tok, h, now, &cache)
			if got := binary.LittleEndian.Uint64(rec); got != tok {
				t.Fatalf("token %d written as %d", tok, got)
			}
			got, named := parseHolder(rec)
			if len(rec) == recHeader { // too long to record: nobody is named
				if named {
					t.Fatalf("an empty record names %+v", got)
				}
				continue
			}
			if !utf8.ValidString(name) || !utf8.ValidString(uuid) || !utf8.ValidString(host) {
				continue // JSON replaces invalid UTF-8
			}
			want := h
			want.Since = now
			if got != want || named != isNamed(h) {
				t.Fatalf("record of %+v reads back as %+v (named %v)", want, got, named)
			}
		}
	})
}
