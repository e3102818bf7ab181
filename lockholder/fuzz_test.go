package lockholder

import (
	"bytes"
	"testing"
)

// Every message encode accepts decodes to what was encoded, and decode
// takes any bytes (a message cut short, or garbage) without a panic.
func FuzzMessage(f *testing.F) {
	f.Add(byte(opPut), "obj/6f0e2c4c/0", []byte(`{"leases":[]}`), []byte{})
	f.Add(byte(opDropPrefix), "", []byte{}, []byte{0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, op byte, key string, meta, raw []byte) {
		_, _, _, _ = decode(raw)

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
