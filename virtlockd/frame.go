package virtlockd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// Reader reads framed messages from a stream. It is not safe for concurrent
// use.
type Reader struct {
	r     *bufio.Reader
	limit int
	hdr   [MinMessageSize]byte
	buf   []byte
}

// growStep is how much a payload buffer grows at a time beyond its current
// size, so that memory follows the bytes that actually arrive.
const growStep = 64 << 10

// keepBuf is the largest payload buffer a Reader keeps between messages.
const keepBuf = 2 * MaxCallSize

// NewReader returns a Reader of the messages in r. limit bounds the length
// word of the messages it returns (clamped to [MinMessageSize,
// MaxMessageSize]): a server passes MaxCallSize, a client MaxMessageSize.
func NewReader(r io.Reader, limit int) *Reader {
	limit = max(min(limit, MaxMessageSize), MinMessageSize)
	return &Reader{r: bufio.NewReaderSize(r, 4096), limit: limit}
}

// Next reads the next message and returns its header and payload; the
// payload is valid until the next call. Errors:
//   - io.EOF: the stream ended cleanly between two messages;
//   - io.ErrUnexpectedEOF or a read error: it ended or failed inside one;
//   - a *DecodeError wrapping ErrMessageSize: the length word is outside
//     [MinMessageSize, MaxMessageSize], and the stream cannot be used further;
//   - a *DecodeError wrapping ErrMessageTooLarge, with the message's header:
//     the message is valid but over the Reader's limit; it was read and
//     dropped without being buffered, and the stream can be used further.
func (r *Reader) Next() (Header, []byte, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:4]); err != nil {
		return Header{}, nil, err
	}
	n := binary.BigEndian.Uint32(r.hdr[:4])
	if n < MinMessageSize || n > MaxMessageSize {
		return Header{}, nil, &DecodeError{Field: "length", Offset: 0,
			Err: fmt.Errorf("%w: %d bytes (want %d to %d)", ErrMessageSize, n, MinMessageSize, MaxMessageSize)}
	}
	if _, err := io.ReadFull(r.r, r.hdr[4:]); err != nil {
		return Header{}, nil, noEOF(err)
	}
	h := decodeHeader(r.hdr[4:])
	size := int(n) - MinMessageSize
	if int(n) > r.limit {
		if _, err := io.CopyN(io.Discard, r.r, int64(size)); err != nil {
			return h, nil, noEOF(err)
		}
		return h, nil, &DecodeError{Field: "length", Offset: 0,
			Err: fmt.Errorf("%w: %d bytes (at most %d)", ErrMessageTooLarge, n, r.limit)}
	}
	buf := r.buf[:0]
	for len(buf) < size {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(size-len(buf), max(cap(buf), growStep)))
		}
		m := min(size, cap(buf))
		if _, err := io.ReadFull(r.r, buf[len(buf):m]); err != nil {
			return h, nil, noEOF(err)
		}
		buf = buf[:m]
	}
	if cap(buf) <= keepBuf {
		r.buf = buf
	} else {
		r.buf = nil
	}
	return h, buf, nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
