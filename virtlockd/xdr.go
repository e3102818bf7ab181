package virtlockd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Sentinels for errors.Is. Every decoding failure is a *DecodeError wrapping
// one of them; encoding failures wrap them with fmt.Errorf.
var (
	// ErrMessageSize: a length word outside [MinMessageSize, MaxMessageSize].
	// The stream cannot be resynchronised after it.
	ErrMessageSize = errors.New("message length out of bounds")
	// ErrMessageTooLarge: a message within the protocol's bound but larger
	// than the reader's limit; it was skipped without being buffered.
	ErrMessageTooLarge = errors.New("message larger than the limit of this endpoint")
	// ErrTruncated: the payload ends inside a field.
	ErrTruncated = errors.New("payload truncated")
	// ErrTrailingBytes: bytes left after the last field of a payload.
	ErrTrailingBytes = errors.New("trailing bytes after the payload")
	// ErrStringTooLong: a string longer than its declared maximum.
	ErrStringTooLong = errors.New("string longer than its maximum")
	// ErrStringNUL: a string containing a NUL byte, which libvirt's C strings
	// cannot carry.
	ErrStringNUL = errors.New("string contains a NUL byte")
	// ErrBadPadding: non-zero XDR padding bytes.
	ErrBadPadding = errors.New("non-zero XDR padding")
	// ErrBadOptional: an optional field whose discriminant is neither 0 nor 1.
	ErrBadOptional = errors.New("optional-field discriminant is neither 0 nor 1")
	// ErrUnknownProcedure: a procedure number this program does not have.
	ErrUnknownProcedure = errors.New("unknown procedure")
	// ErrUnexpectedReply: a reply that does not answer the call made.
	ErrUnexpectedReply = errors.New("reply does not match the call")
)

// DecodeError says which field of a message could not be decoded, at which
// byte offset of the payload (or of the frame, for framing errors), and why.
// It wraps one of the Err sentinels above.
type DecodeError struct {
	Field  string
	Offset int
	Err    error
}

func (e *DecodeError) Error() string {
	return fmt.Sprintf("virtlockd protocol: decoding %s at offset %d: %v", e.Field, e.Offset, e.Err)
}

func (e *DecodeError) Unwrap() error { return e.Err }

// encoder appends XDR to a byte slice. It never fails: callers check string
// bounds before encoding (see checkString).
type encoder struct{ b []byte }

func (e *encoder) u32(v uint32) { e.b = binary.BigEndian.AppendUint32(e.b, v) }
func (e *encoder) i32(v int32)  { e.u32(uint32(v)) }

func (e *encoder) str(s string) {
	e.u32(uint32(len(s)))
	e.b = append(e.b, s...)
	for range pad(len(s)) {
		e.b = append(e.b, 0)
	}
}

func (e *encoder) optStr(s *string) {
	if s == nil {
		e.u32(0)
		return
	}
	e.u32(1)
	e.str(*s)
}

func (e *encoder) uuid(u [16]byte) { e.b = append(e.b, u[:]...) }

func pad(n int) int { return (4 - n%4) % 4 }

// checkString reports whether s can be encoded as an XDR string<max> that
// libvirt accepts.
func checkString(field, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("virtlockd protocol: encoding %s: %w (%d bytes, at most %d)", field, ErrStringTooLong, len(s), max)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return fmt.Errorf("virtlockd protocol: encoding %s: %w", field, ErrStringNUL)
	}
	return nil
}

// decoder reads XDR from a payload. Every method checks bounds before it
// reads or allocates, so no input can make it panic or allocate more than
// the payload's own size.
type decoder struct {
	b   []byte
	off int
}

func (d *decoder) fail(field string, err error) error {
	return &DecodeError{Field: field, Offset: d.off, Err: err}
}

func (d *decoder) u32(field string) (uint32, error) {
	if len(d.b)-d.off < 4 {
		return 0, d.fail(field, ErrTruncated)
	}
	v := binary.BigEndian.Uint32(d.b[d.off:])
	d.off += 4
	return v, nil
}

func (d *decoder) i32(field string) (int32, error) {
	v, err := d.u32(field)
	return int32(v), err
}

// str decodes a string<max>: the length is checked against max and against
// the bytes actually present before anything is copied.
func (d *decoder) str(field string, max int) (string, error) {
	start := d.off
	n, err := d.u32(field)
	if err != nil {
		return "", err
	}
	if uint64(n) > uint64(max) {
		d.off = start
		return "", d.fail(field, fmt.Errorf("%w (%d bytes, at most %d)", ErrStringTooLong, n, max))
	}
	l := int(n)
	if len(d.b)-d.off < l+pad(l) {
		d.off = start
		return "", d.fail(field, ErrTruncated)
	}
	raw := d.b[d.off : d.off+l]
	for _, c := range d.b[d.off+l : d.off+l+pad(l)] {
		if c != 0 {
			return "", d.fail(field, ErrBadPadding)
		}
	}
	for i, c := range raw {
		if c == 0 {
			d.off += i
			return "", d.fail(field, ErrStringNUL)
		}
	}
	d.off += l + pad(l)
	return string(raw), nil
}

// present decodes the discriminant of an optional field.
func (d *decoder) present(field string) (bool, error) {
	v, err := d.u32(field)
	if err != nil {
		return false, err
	}
	switch v {
	case 0:
		return false, nil
	case 1:
		return true, nil
	}
	d.off -= 4
	return false, d.fail(field, ErrBadOptional)
}

func (d *decoder) optStr(field string, max int) (*string, error) {
	ok, err := d.present(field)
	if err != nil || !ok {
		return nil, err
	}
	s, err := d.str(field, max)
	if err != nil {
		return nil, err
	}
	return &s, nil
}

func (d *decoder) uuid(field string) ([16]byte, error) {
	var u [16]byte
	if len(d.b)-d.off < 16 {
		return u, d.fail(field, ErrTruncated)
	}
	copy(u[:], d.b[d.off:])
	d.off += 16
	return u, nil
}

// end checks that the whole payload was consumed.
func (d *decoder) end() error {
	if d.off != len(d.b) {
		return d.fail("end of payload", fmt.Errorf("%w (%d bytes)", ErrTrailingBytes, len(d.b)-d.off))
	}
	return nil
}
