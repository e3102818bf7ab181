package virtlockd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzDecodeMessage feeds arbitrary streams to the framing reader and every
// message to the payload decoders. Nothing may panic; a read error must be
// one of the documented kinds; whatever decodes must re-encode to exactly
// the bytes it came from (the decoder accepts only canonical XDR), and
// decode the same into a connection's reused arguments as into new ones.
func FuzzDecodeMessage(f *testing.F) {
	f.Add(unhex(f, "00 00 00 1c 11 22 33 44 00 00 00 01 00 00 06 66 00 00 00 00 00 00 00 99 00 00 00 00"))
	var stream []byte // every call on one connection
	for i, a := range sampleArgs() {
		if b, err := AppendCall(nil, uint32(i), a); err == nil && len(b) < 1024 {
			f.Add(b)
			stream = append(stream, b...)
		}
	}
	f.Add(stream)
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
		var conn argsBuf // as a server's connection decodes its calls, one after another
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
			args, err := DecodeArgs(h.Procedure, payload)
			// The connection's arguments, reused from its earlier calls,
			// decode to the same as new ones: nothing of an earlier call
			// is left in them.
			if cargs, cerr := conn.decode(h.Procedure, payload); (err == nil) != (cerr == nil) ||
				err != nil && err.Error() != cerr.Error() || err == nil && !reflect.DeepEqual(cargs, args) {
				t.Fatalf("procedure %v: the connection decodes %+v (%v), a new decoder %+v (%v)", h.Procedure, cargs, cerr, args, err)
			}
			if err == nil {
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

// A grant record is read back after a restart, possibly torn by a crash of
// the host: any bytes in a record file are an error or a record that
// satisfies what Load promises (absolute paths, something recorded, the
// key of its file name) and that Put writes back unchanged; and every
// record Put writes reads back as it was.
func FuzzGrantRecord(f *testing.F) {
	f.Add([]byte(`{"version":2,"key":"disk:/a","file":"/a","spelled":{"u":["/l/a"]}}`), "disk:/a", "/a", "u", "/l/a\x00/m/a")
	f.Add([]byte(`{"key":"lease:ls/k","file":"/f/k"}`), "lease:ls/k", "", "u", "/l")
	f.Add([]byte(`{"version":2,"key":"k","file":"/f","spelled":{}}`), "k", "/f", "", "")
	f.Add([]byte(`{"version":2,"key":"k","file":"","spelled":{"u":null}}`), "k", "rel", "u", "rel")
	f.Fuzz(func(t *testing.T, raw []byte, key, file, uuid, paths string) {
		st := DirGrantStore{Dir: t.TempDir()}
		check := func(what string, p string) (string, GrantRecord, bool) {
			t.Helper()
			k, rec, err := st.read(p)
			if err != nil {
				return "", GrantRecord{}, false
			}
			switch {
			case k == "" || st.path(k) != p:
				t.Fatalf("%s: record of key %q read from %s", what, k, p)
			case rec.empty():
				t.Fatalf("%s: empty record of %q", what, k)
			case rec.File != "" && !filepath.IsAbs(rec.File):
				t.Fatalf("%s: relative file %q", what, rec.File)
			}
			for u, ps := range rec.Spelled {
				if u == "" || len(ps) == 0 || slices.ContainsFunc(ps, func(s string) bool { return !filepath.IsAbs(s) }) {
					t.Fatalf("%s: bad paths of %q: %q", what, u, ps)
				}
			}
			if len(rec.Spelled) == 0 {
				rec.Spelled = nil // "spelled":{} records nothing, as does none
			}
			return k, rec, true
		}

		p := st.path(key)
		if err := os.WriteFile(p, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		if k, rec, ok := check(fmt.Sprintf("bytes %q", raw), p); ok {
			if err := st.Put(k, rec); err != nil {
				t.Fatal(err)
			}
			if k2, again, ok := check("rewritten", p); !ok || k2 != k || !reflect.DeepEqual(again, rec) {
				t.Fatalf("record %q %+v read from %q is written back as %+v (%v)", k, rec, raw, again, ok)
			}
		}

		rec := GrantRecord{File: file}
		if uuid != "" {
			rec.Spelled = map[string][]string{uuid: strings.Split(paths, "\x00")}
		}
		valid := key != "" && !rec.empty() && (file == "" || filepath.IsAbs(file))
		for _, s := range append([]string{key, file, uuid}, rec.Spelled[uuid]...) {
			valid = valid && utf8.ValidString(s) // JSON replaces invalid UTF-8
		}
		for _, s := range rec.Spelled[uuid] {
			valid = valid && filepath.IsAbs(s)
		}
		if !valid {
			return
		}
		if err := st.Put(key, rec); err != nil {
			t.Fatal(err)
		}
		if k, got, ok := check("written", p); !ok || k != key || !reflect.DeepEqual(got, rec) {
			t.Fatalf("Put(%q, %+v) reads back as %q %+v (%v)", key, rec, k, got, ok)
		}
	})
}

// The lockspace store is read back when vmlockd starts: any bytes in it
// are lockspaces that Save writes back as they were, a newer vmlockd's
// store (an error naming the file, which is left alone), or a corrupt one
// (a *CorruptStoreError naming the file and where it was moved with its
// bytes); never a panic, and never a lockspace the server cannot serve
// under the name libvirt gave it. Every list Save accepts reads back as it
// was; what it refuses leaves the file as it was.
func FuzzLockspaceStore(f *testing.F) {
	seed := FileStore{Path: filepath.Join(f.TempDir(), "seed.json")}
	if err := seed.Save([]string{"/srv/lockd/a b", "/var/lib/libvirt/lockd/files"}); err != nil {
		f.Fatal(err)
	}
	valid, err := os.ReadFile(seed.Path)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid, "/srv/lockd/a b\x00/var/lib/libvirt/lockd/files")
	f.Add(valid[:len(valid)/2], "/a")                                              // truncated
	f.Add([]byte(`{"version":"1","lockspaces":["/a"]}`), "/a//b/../c/")            // wrong type
	f.Add([]byte(`{"version":1e30,"lockspaces":[]}`), "")                          // huge number
	f.Add([]byte(`{"version":2,"lockspaces":["/a"],"more":{}}`), "/")              // a newer vmlockd's
	f.Add([]byte(`{"version":1,"lockspaces":["/a"],"lockspaces":["rel"]}`), "rel") // duplicate keys
	f.Add([]byte("{\"version\":1,\"lockspaces\":[\"/a\xff\"]}"), "/a\xff")         // not UTF-8
	f.Add([]byte(`{"version":1,"lockspaces":["/a\u0000b",null]}`), "/a\x00")       // NUL, null
	f.Add([]byte(`{"lockspaces":["/a"]}`), "/a")                                   // no version
	f.Add([]byte(`null`), "/a")
	f.Add([]byte{}, "")
	f.Fuzz(func(t *testing.T, raw []byte, list string) {
		storable := func(p string) bool {
			return filepath.IsAbs(p) && !strings.Contains(p, "\x00") && utf8.ValidString(p)
		}
		dir := t.TempDir()
		st := FileStore{Path: filepath.Join(dir, "store.json")}
		if err := os.WriteFile(st.Path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		dirs, err := st.Load()
		var corrupt *CorruptStoreError
		switch {
		case err == nil:
			for _, p := range dirs {
				if !storable(p) {
					t.Fatalf("%q loads as lockspace %q", raw, p)
				}
			}
			if b, _ := os.ReadFile(st.Path); !bytes.Equal(b, raw) {
				t.Fatalf("loading %q changed the file to %q", raw, b)
			}
			if err := st.Save(dirs); err != nil {
				t.Fatalf("lockspaces %q loaded from %q cannot be saved: %v", dirs, raw, err)
			}
			if again, err := st.Load(); err != nil || !slices.Equal(again, dirs) {
				t.Fatalf("lockspaces %q loaded from %q are saved and load as %q (%v)", dirs, raw, again, err)
			}
		case errors.As(err, &corrupt):
			if b, rerr := os.ReadFile(corrupt.Aside); corrupt.Path != st.Path || rerr != nil || !bytes.Equal(b, raw) {
				t.Fatalf("corrupt store %q: %v; its copy aside: %q (%v)", raw, err, b, rerr)
			}
			if _, serr := os.Stat(st.Path); !errors.Is(serr, os.ErrNotExist) {
				t.Fatalf("corrupt store %q: %v; still in place (%v)", raw, err, serr)
			}
		default:
			b, _ := os.ReadFile(st.Path)
			if !strings.Contains(err.Error(), st.Path) || !bytes.Equal(b, raw) {
				t.Fatalf("store %q: error %v does not name it, or the file changed to %q", raw, err, b)
			}
		}

		st.Path = filepath.Join(dir, "saved.json")
		var want []string
		if list != "" {
			want = strings.Split(list, "\x00")
		}
		err = st.Save(want)
		if !slices.ContainsFunc(want, func(p string) bool { return !storable(p) }) {
			if err != nil {
				t.Fatalf("Save(%q): %v", want, err)
			}
			if got, err := st.Load(); err != nil || !slices.Equal(got, want) {
				t.Fatalf("Save(%q) loads as %q (%v)", want, got, err)
			}
		} else if _, serr := os.Stat(st.Path); err == nil || !errors.Is(serr, os.ErrNotExist) {
			t.Fatalf("Save(%q) of a path that cannot be stored: %v; file: %v", want, err, serr)
		}
	})
}
