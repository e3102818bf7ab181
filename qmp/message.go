package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Version is QEMU's version as reported in the greeting and by the
// query-version command.
type Version struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	// Package is the distribution's package version string, e.g.
	// "Debian 1:7.2+dfsg-7".
	Package string `json:"package"`
}

// String returns the version as "major.minor.micro".
func (v Version) String() string {
	return fmt.Sprintf("%d.%d.%d", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro)
}

// Greeting is the first message a QMP server sends on a new connection.
type Greeting struct {
	Version Version `json:"version"`
	// Capabilities lists the optional protocol capabilities the server
	// offers (e.g. "oob"). The client enables none of them.
	Capabilities []string `json:"capabilities"`
}

// Event is an asynchronous QMP event.
type Event struct {
	// Name is the event's name, e.g. "STOP" or "JOB_STATUS_CHANGE".
	Name string
	// Data is the event's "data" member as raw JSON, or nil if the event
	// has none.
	Data json.RawMessage
	// Time is the server's timestamp of the event; the zero Time if the
	// event carries no timestamp.
	Time time.Time
}

// DecodeData unmarshals the event's data into v. An event without data
// leaves v unchanged and returns nil.
func (e Event) DecodeData(v any) error {
	if len(e.Data) == 0 {
		return nil
	}
	if err := json.Unmarshal(e.Data, v); err != nil {
		return fmt.Errorf("qmp: event %s: decoding data: %w", e.Name, err)
	}
	return nil
}

// Error is an error reply from the QMP server: the command reached QEMU
// and QEMU refused or failed it.
type Error struct {
	// Command is the command that failed (filled in by the client).
	Command string `json:"-"`
	// Class is QEMU's error class: "GenericError", "CommandNotFound",
	// "DeviceNotActive", "DeviceNotFound", "KVMMissingCap".
	Class string `json:"class"`
	// Desc is QEMU's human-readable description.
	Desc string `json:"desc"`
}

// Error implements error.
func (e *Error) Error() string {
	if e.Command == "" {
		return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc)
	}
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}

// ProtocolError reports a message that does not follow the QMP protocol:
// a missing or malformed greeting, a malformed reply to a command, or a
// message too large to accept. It matches [ErrProtocol] with errors.Is.
type ProtocolError struct {
	// Msg is a prefix of the offending message (at most 256 bytes).
	Msg []byte
	// Err says what is wrong with it.
	Err error
}

// Error implements error.
func (e *ProtocolError) Error() string {
	return fmt.Sprintf("qmp: protocol error: %v (message %q)", e.Err, e.Msg)
}

// Unwrap returns the underlying cause.
func (e *ProtocolError) Unwrap() error { return e.Err }

// Is reports whether target is ErrProtocol.
func (e *ProtocolError) Is(target error) bool { return target == ErrProtocol }

func newProtocolError(msg []byte, err error) *ProtocolError {
	const max = 256
	if len(msg) > max {
		msg = msg[:max]
	}
	return &ProtocolError{Msg: bytes.Clone(msg), Err: err}
}

// msgKind is what a decoded line is.
type msgKind int

const (
	kindUnknown  msgKind = iota // a JSON object of no known shape
	kindGreeting                // {"QMP": {...}}
	kindEvent                   // {"event": ..., "data": ..., "timestamp": ...}
	kindReturn                  // {"return": ..., "id": ...}
	kindError                   // {"error": {...}, "id": ...}
)

// message is one decoded line of the QMP stream.
type message struct {
	kind     msgKind
	greeting Greeting
	event    Event
	// id is the reply's id when hasID is set: only ids this client
	// generates (unsigned integers) are recognised.
	id    uint64
	hasID bool
	ret   json.RawMessage
	err   *Error
}

var (
	errNotObject   = errors.New("message is not a JSON object")
	errBothReplies = errors.New(`message has both "return" and "error"`)
)

// decodeMessage decodes one line of the QMP stream. It returns an error
// only for a line that is not a JSON object, or for a message of a known
// shape whose members have the wrong types; in the latter case the
// returned message still carries the id (if any) so that the reply can be
// failed rather than lost. Unknown members are ignored, and an object of
// no known shape decodes as kindUnknown without error.
func decodeMessage(line []byte) (message, error) {
	var m message
	trimmed := trimJSONSpace(line)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return m, errNotObject
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(trimmed, &fields); err != nil {
		return m, fmt.Errorf("invalid JSON: %w", err)
	}
	if raw, ok := fields["id"]; ok {
		if id, err := strconv.ParseUint(string(raw), 10, 64); err == nil {
			m.id, m.hasID = id, true
		}
	}
	if raw, ok := fields["QMP"]; ok {
		m.kind = kindGreeting
		if err := json.Unmarshal(raw, &m.greeting); err != nil || !isObject(raw) {
			return m, fmt.Errorf("malformed greeting: %s", describe(err, "not an object"))
		}
		return m, nil
	}
	if raw, ok := fields["event"]; ok {
		m.kind = kindEvent
		if err := json.Unmarshal(raw, &m.event.Name); err != nil || m.event.Name == "" {
			return m, fmt.Errorf("malformed event name: %s", describe(err, "empty"))
		}
		if data, ok := fields["data"]; ok && !bytes.Equal(data, []byte("null")) {
			m.event.Data = data
		}
		if raw, ok := fields["timestamp"]; ok {
			var ts struct {
				Seconds      int64 `json:"seconds"`
				Microseconds int64 `json:"microseconds"`
			}
			if err := json.Unmarshal(raw, &ts); err != nil {
				return m, fmt.Errorf("malformed event timestamp: %w", err)
			}
			// QEMU uses -1/-1 when it has no clock; keep the zero Time then.
			if ts.Seconds >= 0 && ts.Microseconds >= 0 && ts.Microseconds < 1e6 {
				m.event.Time = time.Unix(ts.Seconds, ts.Microseconds*1000)
			}
		}
		return m, nil
	}
	ret, hasRet := fields["return"]
	errRaw, hasErr := fields["error"]
	switch {
	case hasRet && hasErr:
		m.kind = kindError
		return m, errBothReplies
	case hasRet:
		m.kind = kindReturn
		m.ret = ret
		return m, nil
	case hasErr:
		m.kind = kindError
		var e Error
		if err := json.Unmarshal(errRaw, &e); err != nil || !isObject(errRaw) || e.Class == "" {
			return m, fmt.Errorf("malformed error reply: %s", describe(err, `not an object with a "class"`))
		}
		m.err = &e
		return m, nil
	}
	return m, nil
}

func isObject(raw json.RawMessage) bool {
	t := trimJSONSpace(raw)
	return len(t) > 0 && t[0] == '{'
}

// trimJSONSpace trims the whitespace JSON allows around a value (which is
// narrower than bytes.TrimSpace's).
func trimJSONSpace(b []byte) []byte { return bytes.Trim(b, " \t\r\n") }

func describe(err error, otherwise string) string {
	if err != nil {
		return err.Error()
	}
	return otherwise
}
