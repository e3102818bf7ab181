package lockspace

import (
	"encoding/binary"
	"errors"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

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

// A token record or high-water mark may have been left torn or zeroed by a
// crash, or written by another host: whatever its bytes, readToken gives a
// token greater than 0 or says the file is new (empty) or damaged, never
// token 0 of a file that is not empty (the next grant's token would go
// back); and every record appendRecord writes reads back with its token.
func FuzzTokenRecord(f *testing.F) {
	f.Add([]byte{}, uint64(1))
	f.Add([]byte("\x07\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00{}"), uint64(7))
	f.Add(make([]byte, recHeader), uint64(1<<63))
	f.Add([]byte("\x01\x00\x00\x00"), uint64(0))
	f.Fuzz(func(t *testing.T, raw []byte, tok uint64) {
		read := func(b []byte) (uint64, bool, uint64, error, error) {
			fd, err := unix.MemfdCreate("rec", unix.MFD_CLOEXEC)
			if err != nil {
				t.Skip(err)
			}
			defer unix.Close(fd)
			if err := pwriteAll(fd, b, 0); err != nil {
				t.Fatal(err)
			}
			tok, fresh, terr := readToken(fd)
			mark, merr := readMark(fd)
			return tok, fresh, mark, terr, merr
		}
		got, fresh, mark, terr, merr := read(raw)
		var de *damagedError
		switch {
		case len(raw) == 0:
			if terr != nil || !fresh || got != 0 || merr != nil || mark != 0 {
				t.Fatalf("empty file: token %d fresh %v (%v), mark %d (%v)", got, fresh, terr, mark, merr)
			}
		case terr == nil:
			if fresh || got == 0 || len(raw) < recHeader || got != binary.LittleEndian.Uint64(raw) {
				t.Fatalf("% x reads as token %d (fresh %v)", raw, got, fresh)
			}
		case !errors.As(terr, &de):
			t.Fatalf("% x: error %v is not a damaged record", raw, terr)
		case len(raw) >= recHeader && binary.LittleEndian.Uint64(raw) != 0:
			t.Fatalf("record % x with token %d refused: %v", raw, binary.LittleEndian.Uint64(raw), terr)
		}
		switch {
		case len(raw) == 0:
		case merr == nil:
			if len(raw) < 8 || mark != binary.LittleEndian.Uint64(raw) {
				t.Fatalf("% x reads as mark %d", raw, mark)
			}
		case !errors.As(merr, &de) || len(raw) >= 8:
			t.Fatalf("mark % x: %v", raw, merr)
		}

		if tok == 0 {
			return // never granted
		}
		var cache holderCache
		rec := appendRecord(nil, tok, lockmgr.Holder{Name: string(raw)}, time.Unix(0, 0), &cache)
		if got, fresh, _, err, _ := read(rec); err != nil || fresh || got != tok {
			t.Fatalf("record of token %d reads as %d (fresh %v, %v)", tok, got, fresh, err)
		}
	})
}

// FuzzBootState: StateDir/boot either parses into a state that encodes
// back to the same bytes, or is refused; nothing panics.
func FuzzBootState(f *testing.F) {
	f.Add([]byte("vmlock.boot.v1 1fd0f689-4cac-4f3b-b69e-6424bec19d51 3 2 running\n"))
	f.Add([]byte("vmlock.boot.v1 b 0 0 clean\n"))
	f.Add([]byte("vmlock.boot.v1 b +1 0 clean\n"))
	f.Add([]byte("vmlock.boot.v1  b 01 0 clean \n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		s, err := parseBootState(raw)
		if err != nil {
			return
		}
		if s.String() != string(raw) {
			t.Fatalf("%q parses as %+v, which encodes as %q", raw, s, s.String())
		}
	})
}
