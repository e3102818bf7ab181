package qmp

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"
	"unicode/utf8"
)

var fuzzSeeds = []string{
	fakeGreeting,
	`{"return": {}, "id": 1}`,
	`{"return": [1, "x", null], "id": 18446744073709551615}`,
	`{"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}, "id": 5}`,
	`{"timestamp": {"seconds": 1795292923, "microseconds": 495126}, "event": "STOP"}`,
	`{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "job0"}, "timestamp": {"seconds": -1, "microseconds": -1}}`,
	`{"return": {}, "error": {"class": "X", "desc": ""}, "id": 2}`,
	`{"error": "x", "id": -1}`,
	`{"event": ""}`,
	`{"QMP": 1}`,
	`[1]`,
	`garbage`,
	"{\"return\": \"\\u0000\\r\\n\"}\r\n",
	``,
}

// FuzzDecodeMessage checks that decodeMessage never panics and that what it
// accepts is consistent with its contract.
func FuzzDecodeMessage(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		m, err := decodeMessage(line)
		if err != nil {
			if m.kind == kindReturn {
				t.Fatalf("error %v with kindReturn", err)
			}
			return
		}
		if !json.Valid(line) {
			t.Fatalf("accepted invalid JSON %q", line)
		}
		switch m.kind {
		case kindEvent:
			if m.event.Name == "" {
				t.Fatalf("event without name from %q", line)
			}
			if m.event.Data != nil && !json.Valid(m.event.Data) {
				t.Fatalf("event data %q is not JSON", m.event.Data)
			}
		case kindError:
			if m.err == nil || m.err.Class == "" {
				t.Fatalf("error reply without class from %q", line)
			}
		case kindReturn:
			if !json.Valid(m.ret) {
				t.Fatalf("return value %q is not JSON", m.ret)
			}
		}
	})
}

// FuzzReplyRoundTrip checks that what QEMU writes decodes to what it
// wrote: any JSON value as a reply's return value or an event's data, and
// any string as an error's class and description, with the reply's id.
func FuzzReplyRoundTrip(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s), uint64(len(s)))
	}
	f.Fuzz(func(t *testing.T, v []byte, id uint64) {
		if !json.Valid(v) || !utf8.Valid(v) {
			return
		}
		v = trimJSONSpace(v)
		if bytes.IndexByte(v, '\n') >= 0 {
			return // QEMU writes one message a line
		}
		line := fmt.Appendf(nil, `{"return": %s, "id": %d}`, v, id)
		if m, err := decodeMessage(line); err != nil || m.kind != kindReturn || !m.hasID || m.id != id || !bytes.Equal(m.ret, v) {
			t.Fatalf("%s decodes as %+v (%v)", line, m, err)
		}
		line = fmt.Appendf(nil, `{"event": "X", "data": %s, "timestamp": {"seconds": 1, "microseconds": 2}}`, v)
		m, err := decodeMessage(line)
		if err != nil || m.kind != kindEvent || m.event.Name != "X" || !m.event.Time.Equal(time.Unix(1, 2000)) ||
			(string(v) == "null") != (m.event.Data == nil) || m.event.Data != nil && !bytes.Equal(m.event.Data, v) {
			t.Fatalf("%s decodes as %+v (%v)", line, m, err)
		}
		s := string(v)
		if s == "" {
			return
		}
		e, _ := json.Marshal(Error{Class: s, Desc: s})
		line = fmt.Appendf(nil, `{"error": %s, "id": %d}`, e, id)
		m, err = decodeMessage(line)
		if err != nil || m.kind != kindError || !m.hasID || m.id != id || m.err == nil || m.err.Class != s || m.err.Desc != s {
			t.Fatalf("%s decodes as %+v (%v)", line, m, err)
		}
	})
}

// FuzzReadLine checks that the line splitter returns exactly the input,
// split after each newline, whatever the buffer boundaries, and that it
// enforces its size limit.
func FuzzReadLine(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s+"\n"+s), uint8(16))
	}
	f.Fuzz(func(t *testing.T, data []byte, size uint8) {
		const max = 64
		r := bufio.NewReaderSize(bytes.NewReader(data), 16+int(size))
		var got []byte
		for {
			line, err := readLine(r, max)
			if err != nil {
				var pe *ProtocolError
				switch {
				case errors.Is(err, io.EOF):
					if !bytes.Equal(got, data) {
						t.Fatalf("lines %q != input %q", got, data)
					}
				case errors.Is(err, io.ErrUnexpectedEOF):
					rest := data[len(got):]
					if len(rest) == 0 || bytes.IndexByte(rest, '\n') >= 0 || len(rest) > max {
						t.Fatalf("unexpected EOF with rest %q", rest)
					}
				case errors.As(err, &pe):
					rest := data[len(got):]
					if i := bytes.IndexByte(rest, '\n'); i >= 0 && i < max {
						t.Fatalf("line of %d bytes refused", i+1)
					}
				default:
					t.Fatal(err)
				}
				return
			}
			if len(line) == 0 || line[len(line)-1] != '\n' || bytes.IndexByte(line, '\n') != len(line)-1 || len(line) > max {
				t.Fatalf("bad line %q", line)
			}
			got = append(got, line...)
		}
	})
}
