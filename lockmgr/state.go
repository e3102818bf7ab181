package lockmgr

import (
	"net/url"
	"strconv"
	"strings"
)

// StateEntry is one resource in a state string.
type StateEntry struct {
	Resource Resource `json:"resource"`
	Token    uint64   `json:"token"`
}

// State is what release and inquire return: every resource an object holds,
// with its mode and fencing token. Handing it to acquire on another host
// makes that grant conditional on the tokens being unchanged, which is the
// migration handover check.
type State []StateEntry

// The state string format, version 1:
//
//	v1:TYPE:MODE:TOKEN:NAME,TYPE:MODE:TOKEN:NAME,...
//
// NAME is percent-encoded (url.PathEscape, plus ',' and ':') so the string
// is printable and splits unambiguously. "v1:" alone is the empty state.
const stateV1 = "v1:"

// MaxStateLen bounds a state string; longer input is rejected before parsing.
const MaxStateLen = 1 << 20

// maxStateEntries bounds the number of resources in one state string.
const maxStateEntries = 4096

// String encodes s in the v1 format, in one allocation.
func (s State) String() string {
	n := len(stateV1)
	for _, e := range s {
		n += len(e.Resource.Type) + len(e.Resource.Mode.String()) + 20 + escapedLen(e.Resource.Name) + 4
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteString(stateV1)
	var tok [20]byte
	for i, e := range s {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(string(e.Resource.Type))
		b.WriteByte(':')
		b.WriteString(e.Resource.Mode.String())
		b.WriteByte(':')
		b.Write(strconv.AppendUint(tok[:0], e.Token, 10))
		b.WriteByte(':')
		writeEscaped(&b, e.Resource.Name)
	}
	return b.String()
}

// stateKeeps reports whether a name's byte c stands for itself in a state
// string: what url.PathEscape keeps, except ':' (',' it escapes itself).
func stateKeeps(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '-', '_', '.', '~', '$', '&', '+', '=', '@':
		return true
	}
	return false
}

// escapedLen is the length of name in a state string.
func escapedLen(name string) int {
	n := len(name)
	for i := 0; i < len(name); i++ {
		if !stateKeeps(name[i]) {
			n += 2
		}
	}
	return n
}

// writeEscaped writes name as a state string carries it: every byte that
// does not stand for itself as %XX, as url.PathEscape writes it.
func writeEscaped(b *strings.Builder, name string) {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(name); i++ {
		if c := name[i]; stateKeeps(c) {
			b.WriteByte(c)
		} else {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
}

// ParseState decodes a state string. The empty string is the empty state
// (a caller that has none). Every error is of class CodeInvalidArgument and
// says what is wrong; ParseState never panics, whatever the input.
func ParseState(s string) (State, error) {
	if s == "" {
		return nil, nil
	}
	if len(s) > MaxStateLen {
		return nil, invalid("state string is %d bytes long (at most %d)", len(s), MaxStateLen)
	}
	body, ok := strings.CutPrefix(s, stateV1)
	if !ok {
		v, _, _ := strings.Cut(s, ":")
		if len(v) > 8 {
			v = v[:8] + "…"
		}
		return nil, invalid("state string: unknown version %q (this vmlock reads v1)", v)
	}
	if body == "" {
		return State{}, nil
	}
	parts := strings.Split(body, ",")
	if len(parts) > maxStateEntries {
		return nil, invalid("state string lists %d resources (at most %d)", len(parts), maxStateEntries)
	}
	st := make(State, 0, len(parts))
	seen := make(map[string]bool, len(parts))
	for i, p := range parts {
		f := strings.SplitN(p, ":", 4)
		if len(f) != 4 {
			return nil, invalid("state string entry %d: want TYPE:MODE:TOKEN:NAME", i+1)
		}
		mode, err := ParseMode(f[1])
		if err != nil || f[1] == "" {
			return nil, invalid("state string entry %d: unknown mode %q", i+1, f[1])
		}
		tok, err := strconv.ParseUint(f[2], 10, 64)
		if err != nil || f[2] != strconv.FormatUint(tok, 10) {
			return nil, invalid("state string entry %d: token %q is not a decimal number", i+1, f[2])
		}
		name, err := url.PathUnescape(f[3])
		if err != nil {
			return nil, invalid("state string entry %d: bad escape in name: %v", i+1, err)
		}
		r := Resource{Type: ResourceType(f[0]), Name: name, Mode: mode}
		if err := r.Validate(); err != nil {
			return nil, invalid("state string entry %d: %v", i+1, err)
		}
		if seen[r.Key()] {
			return nil, invalid("state string names %s twice", r)
		}
		seen[r.Key()] = true
		st = append(st, StateEntry{Resource: r, Token: tok})
	}
	return st, nil
}
