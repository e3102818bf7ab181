package lockholder

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// Every message encode accepts decodes to what was encoded, and decode
// takes any bytes (a message cut short, or garbage) without a panic and
// accepts only what encode writes: a key or record over its limit would
// be kept, and then no List could send it back.
func FuzzMessage(f *testing.F) {
	f.Add(byte(opPut), "obj/6f0e2c4c/0", []byte(`{"leases":[]}`), []byte{})
	f.Add(byte(opDropPrefix), "", []byte{}, []byte{0xff, 0xff, 0x01})
	long := binary.LittleEndian.AppendUint16([]byte{opPut}, maxKey+1)
	f.Add(byte(opPut), "", []byte{}, append(long, make([]byte, maxKey+1)...))
	f.Add(byte(opPut), "", []byte{}, append([]byte{opPut, 0, 0}, make([]byte, MaxMeta+1)...))
	f.Fuzz(func(t *testing.T, op byte, key string, meta, raw []byte) {
		if op, key, meta, err := decode(raw); err == nil {
			if b, err := encode(op, key, meta); err != nil || !bytes.Equal(b, raw) {
				t.Fatalf("decode(% .32x...) = (%d, %d-byte key, %d-byte record), which encodes as % .32x... (%v)", raw, op, len(key), len(meta), b, err)
			}
		}

		b, err := encode(op, key, meta)
		if err != nil {
			if len(key) <= maxKey && len(meta) <= MaxMeta {
				t.Fatalf("encode of a %d-byte key and %d-byte record failed: %v", len(key), len(meta), err)
			}
			return
		}
		gop, gkey, gmeta, err := decode(b)
		if err != nil || gop != op || gkey != key || !bytes.Equal(gmeta, meta) {
			t.Fatalf("encode(%d, %q, %q) decodes as (%d, %q, %q, %v)", op, key, meta, gop, gkey, gmeta, err)
		}
	})
}
