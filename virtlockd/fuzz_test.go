package virtlockd

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"
)

// FuzzDecodeMessage feeds arbitrary streams to the framing reader and every
// message to the payload decoders. Nothing may panic; a read error must be
// one of the documented kinds; whatever decodes must re-encode to exactly
// the bytes it came from (the decoder accepts only canonical XDR).
func FuzzDecodeMessage(f *testing.F) {
	f.Add(unhex(f, "00 00 00 1c 11 22 33 44 00 00 00 01 00 00 06 66 00 00 00 00 00 00 00 99 00 00 00 00"))
	for i, a := range sampleArgs() {
		if b, err := AppendCall(nil, uint32(i), a); err == nil && len(b) < 1024 {
			f.Add(b)
		}
	}
	call := Header{Program: Program, Version: ProgramVersion, Procedure: ProcAcquireResource, Serial: 5}
	for _, e := range []*RemoteError{
		newRemoteError(CodeResourceBusy, DomainLockspace, "busy"),
		{Code: 1, Domain: 7, Dom: &RemoteDomain{Name: "d", ID: 3}, Net: &RemoteNetwork{Name: "n"}, Str3: strp("s")},
	} {
		b, _ := AppendReply(nil, call, e)
		f.Add(b)
	}
	ok, _ := AppendReply(nil, call, nil)
	f.Add(ok)
	f.Add([]byte{0, 0, 0, 0})
	f.Add(unhex(f, "02000004 0ea7beef 00000001 00000001 00000000 00000000 00000000"))

	f.Fuzz(func(t *testing.T, data []byte) {
		rd := NewReader(bytes.NewReader(data), MaxCallSize)
		for range 32 {
			h, payload, err := rd.Next()
			if err != nil {
				var de *DecodeError
				if errors.Is(err, ErrMessageTooLarge) {
					continue
				}
				if err != io.EOF && err != io.ErrUnexpectedEOF && !(errors.As(err, &de) && errors.Is(err, ErrMessageSize)) {
					t.Fatalf("unexpected read error %v (%T)", err, err)
				}
				return
			}
			re, err := AppendMessage(nil, h, payload)
			if err != nil || len(re) != MinMessageSize+len(payload) {
				t.Fatalf("re-framing: %v", err)
			}
			if args, err := DecodeArgs(h.Procedure, payload); err == nil {
				if args.Procedure() != h.Procedure {
					t.Fatalf("procedure %v decoded as %v", h.Procedure, args.Procedure())
				}
				back, err := AppendArgs(nil, args)
				if err != nil {
					t.Fatalf("re-encoding %+v: %v", args, err)
				}
				if !bytes.Equal(back, payload) {
					t.Fatalf("args %+v re-encode to\n%x\nnot\n%x", args, back, payload)
				}
			} else if de := (*DecodeError)(nil); !errors.As(err, &de) {
				t.Fatalf("DecodeArgs error %v is not a *DecodeError", err)
			}
			if e, err := DecodeRemoteError(payload); err == nil {
				back, err := AppendRemoteError(nil, e)
				if err != nil {
					t.Fatalf("re-encoding %+v: %v", e, err)
				}
				if !bytes.Equal(back, payload) {
					t.Fatalf("error re-encodes to\n%x\nnot\n%x", back, payload)
				}
				again, err := DecodeRemoteError(back)
				if err != nil || !reflect.DeepEqual(again, e) {
					t.Fatalf("error round trip: %+v %v", again, err)
				}
			} else if de := (*DecodeError)(nil); !errors.As(err, &de) {
				t.Fatalf("DecodeRemoteError error %v is not a *DecodeError", err)
			}
		}
	})
}
