package lockmgr

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Mode is how a resource is held.
type Mode uint8

const (
	// Exclusive is read-write use by one holder. It is the zero value, so a
	// Resource that does not say otherwise is locked exclusively.
	Exclusive Mode = iota
	// Shared is shared-write use: many holders, and it excludes Exclusive.
	Shared
	// ReadOnly takes no lock at all; the use is recorded and shown.
	ReadOnly
)

var modeNames = [...]string{Exclusive: "exclusive", Shared: "shared", ReadOnly: "readonly"}

func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return "mode(" + strconv.Itoa(int(m)) + ")"
}

// Adverb is the mode as it reads in "locked exclusively".
func (m Mode) Adverb() string {
	switch m {
	case Exclusive:
		return "exclusively"
	case Shared:
		return "shared"
	case ReadOnly:
		return "read-only"
	}
	return m.String()
}

// Conflicts reports whether a holder in mode m excludes a request in mode o.
func (m Mode) Conflicts(o Mode) bool {
	if m == ReadOnly || o == ReadOnly {
		return false
	}
	return m == Exclusive || o == Exclusive
}

// ParseMode parses a mode name. The empty string is Exclusive, the default.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "", "exclusive", "excl", "rw":
		return Exclusive, nil
	case "shared", "share", "shareable":
		return Shared, nil
	case "readonly", "ro", "read-only":
		return ReadOnly, nil
	}
	return 0, invalid("unknown mode %q (want exclusive, shared or readonly)", s)
}

// MarshalText implements encoding.TextMarshaler.
func (m Mode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (m *Mode) UnmarshalText(b []byte) error {
	v, err := ParseMode(string(b))
	if err == nil {
		*m = v
	}
	return err
}

// ResourceType names what kind of thing a resource is. Disk and Lease are
// built in (TypeDisk, TypeLease); any other valid name is a custom type chosen by the management
// application, locked like a lease in the driver's "custom" namespace.
type ResourceType string

const (
	// TypeDisk is a disk image, named by its path.
	TypeDisk ResourceType = "disk"
	// TypeLease is a named lease, "LOCKSPACE/KEY".
	TypeLease ResourceType = "lease"
)

// Limits on names. They bound what a state string or a request can make the
// daemon allocate, and keep lease file names within NAME_MAX.
const (
	MaxNameLen     = 255  // a lockspace, a lease key, a custom type
	MaxPathLen     = 4096 // a disk path, a custom resource name
	maxTypeLen     = 32
	maxObjectField = 1024
)

// Resource is one thing an object uses. Name is a disk's path, a lease's
// "LOCKSPACE/KEY", or a custom type's name.
type Resource struct {
	Type ResourceType `json:"type"`
	Name string       `json:"name"`
	Mode Mode         `json:"mode"`
}

// DiskResource returns the disk resource for path.
func DiskResource(path string, m Mode) Resource { return Resource{Type: TypeDisk, Name: path, Mode: m} }

// LeaseResource returns the lease resource lockspace/key.
func LeaseResource(lockspace, key string, m Mode) Resource {
	return Resource{Type: TypeLease, Name: lockspace + "/" + key, Mode: m}
}

// Key identifies the locked thing independently of the mode: two resources
// with one Key are one lock.
func (r Resource) Key() string { return string(r.Type) + ":" + r.Name }

// String is how errors and the monitor name a resource: "disk /a.qcow2".
func (r Resource) String() string { return string(r.Type) + " " + r.Name }

// SplitLease returns a lease's lockspace and key. It fails for a name that
// is not exactly two valid names joined by a slash.
func (r Resource) SplitLease() (lockspace, key string, err error) {
	ls, k, ok := strings.Cut(r.Name, "/")
	if !ok {
		return "", "", invalid("lease %q: want LOCKSPACE/KEY", r.Name)
	}
	if err := ValidName("lockspace", ls); err != nil {
		return "", "", err
	}
	if err := ValidName("lease key", k); err != nil {
		return "", "", err
	}
	return ls, k, nil
}

// ValidName checks a name that becomes one path component (a lockspace or a
// lease key): non-empty, at most MaxNameLen bytes, valid UTF-8, no slash, no
// NUL or other control character, and not "." or "..". What names say about
// themselves ("what") appears in the error.
func ValidName(what, s string) error {
	switch {
	case s == "":
		return invalid("%s name is empty", what)
	case len(s) > MaxNameLen:
		return invalid("%s name is %d bytes long (at most %d)", what, len(s), MaxNameLen)
	case s == "." || s == "..":
		return invalid("%s name %q would escape its directory", what, s)
	case strings.ContainsRune(s, '/'):
		return invalid("%s name %q contains a slash", what, s)
	case !utf8.ValidString(s):
		return invalid("%s name %q is not valid UTF-8", what, s)
	case strings.ContainsFunc(s, isControl):
		return invalid("%s name %q contains a control character", what, s)
	}
	return nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// SafeField returns s as an Object's Name, URI or Host may hold it: each
// control character and invalid byte written as a Go escape (\t, \x1b),
// cut to the field's limit (1024 bytes) at a whole character. It is for
// names that must be taken as they come (libvirt's lock protocol accepts
// any domain name), where Validate would refuse them. A valid field is
// returned as it is.
func SafeField(s string) string {
	if len(s) <= maxObjectField && utf8.ValidString(s) && !strings.ContainsFunc(s, isControl) {
		return s
	}
	var b strings.Builder
	for len(s) > 0 {
		r, n := utf8.DecodeRuneInString(s)
		piece := s[:n]
		if r == utf8.RuneError && n == 1 || isControl(r) {
			q := strconv.Quote(piece) // "\t", "\x1b", "\xff"
			piece = q[1 : len(q)-1]
		}
		if b.Len()+len(piece) > maxObjectField {
			break
		}
		b.WriteString(piece)
		s = s[n:]
	}
	return b.String()
}

func validType(t ResourceType) error {
	s := string(t)
	if s == "" {
		return invalid("resource type is empty")
	}
	if len(s) > maxTypeLen {
		return invalid("resource type %q is longer than %d bytes", s, maxTypeLen)
	}
	for i, c := range s {
		ok := c >= 'a' && c <= 'z' || i > 0 && (c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.')
		if !ok {
			return invalid("resource type %q: want lowercase letters, digits, '-', '_' or '.', starting with a letter", s)
		}
	}
	return nil
}

// Validate checks r without touching the file system.
func (r Resource) Validate() error {
	if err := validType(r.Type); err != nil {
		return err
	}
	if r.Mode > ReadOnly {
		return invalid("%s: unknown mode %d", r, r.Mode)
	}
	switch r.Type {
	case TypeDisk:
		switch {
		case r.Name == "":
			return invalid("disk path is empty")
		case len(r.Name) > MaxPathLen:
			return invalid("disk path is %d bytes long (at most %d)", len(r.Name), MaxPathLen)
		case strings.IndexByte(r.Name, 0) >= 0:
			return invalid("disk path %q contains a NUL byte", r.Name)
		case !utf8.ValidString(r.Name):
			// The API, the lock-holder's records and the state string carry
			// text: such a path would come back under another name.
			return invalid("disk path %q is not valid UTF-8", r.Name)
		}
	case TypeLease:
		if _, _, err := r.SplitLease(); err != nil {
			return err
		}
	default:
		switch {
		case r.Name == "":
			return invalid("%s resource name is empty", r.Type)
		case len(r.Name) > MaxPathLen:
			return invalid("%s resource name is %d bytes long (at most %d)", r.Type, len(r.Name), MaxPathLen)
		case strings.IndexByte(r.Name, 0) >= 0:
			return invalid("%s resource name %q contains a NUL byte", r.Type, r.Name)
		case !utf8.ValidString(r.Name):
			return invalid("%s resource name %q is not valid UTF-8", r.Type, r.Name)
		}
	}
	return nil
}

// Canonical validates r and returns it in the form that is keyed: a disk path
// made absolute with every symlink resolved, so that two spellings of one
// file are one lock. A disk that does not exist yet is keyed by its cleaned
// absolute path (the symlinks of its deepest existing ancestor resolved),
// because a management
// application may lock an image before it creates it (and the etcd driver
// locks paths that live on other hosts' storage).
func Canonical(r Resource) (Resource, error) {
	if err := r.Validate(); err != nil {
		return Resource{}, err
	}
	if r.Type != TypeDisk {
		return r, nil
	}
	p, err := canonicalPath(r.Name)
	if err != nil {
		return Resource{}, &Error{Code: CodeInvalidArgument, Resource: r.String(), Msg: "cannot resolve path", Err: err}
	}
	r.Name = p
	return r, nil
}

// InCanonicalForm reports whether p has the form of a disk path that
// Canonical returns: absolute and clean (equal to filepath.Clean(p)), with
// no NUL byte. It does not look at the file system, so it cannot tell
// whether symlinks were resolved; it does not allocate.
func InCanonicalForm(p string) bool {
	if p == "" || p[0] != '/' || strings.IndexByte(p, 0) >= 0 {
		return false
	}
	if p == "/" {
		return true
	}
	for rest := p[1:]; ; {
		elem, tail, more := strings.Cut(rest, "/")
		if elem == "" || elem == "." || elem == ".." {
			return false
		}
		if !more {
			return true
		}
		rest = tail
	}
}

func canonicalPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	// Fastest path: a path without a symlink is its own canonical form, and
	// the kernel checks that in one open (openat2 RESOLVE_NO_SYMLINKS, Linux
	// 5.6; an older kernel or a seccomp filter just fails it).
	if fd, err := unix.Openat2(unix.AT_FDCWD, abs, &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_NO_SYMLINKS}); err == nil {
		unix.Close(fd)
		return abs, nil
	}
	// Fast path: let the kernel resolve the whole path in one open, and read
	// the result back from /proc (three system calls, instead of one lstat
	// per component).
	if fd, err := unix.Open(abs, unix.O_PATH|unix.O_CLOEXEC, 0); err == nil {
		var buf [unix.PathMax]byte
		n, rerr := unix.Readlink("/proc/self/fd/"+strconv.Itoa(fd), buf[:])
		unix.Close(fd)
		if rerr == nil && n > 0 && n < len(buf) && buf[0] == '/' && !bytes.HasSuffix(buf[:n], []byte(" (deleted)")) {
			return string(buf[:n]), nil
		}
	}
	real, err := filepath.EvalSymlinks(abs)
	if err == nil {
		return real, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	// The file does not exist: resolve the deepest ancestor that does, keep
	// the rest as written (cleaned). A dangling symlink is an error, not a
	// new file, since its target is what would be opened.
	if _, lerr := os.Lstat(abs); lerr == nil {
		return "", err
	}
	rest := filepath.Base(abs)
	for dir := filepath.Dir(abs); ; dir = filepath.Dir(dir) {
		real, err := filepath.EvalSymlinks(dir)
		if err == nil {
			return filepath.Join(real, rest), nil
		}
		if !errors.Is(err, fs.ErrNotExist) || dir == "/" {
			return "", err
		}
		if _, lerr := os.Lstat(dir); lerr == nil {
			return "", err // a dangling symlink in the middle
		}
		rest = filepath.Join(filepath.Base(dir), rest)
	}
}

// Object is what holds locks, usually a domain (a VM). UUID is its identity;
// the other fields describe it. PID is the process that uses the resources:
// its locks live as long as it does.
type Object struct {
	UUID string `json:"uuid"`
	Name string `json:"name,omitempty"`
	ID   int    `json:"id,omitempty"`
	PID  int    `json:"pid,omitempty"`
	URI  string `json:"uri,omitempty"`
	Host string `json:"host,omitempty"`
}

// ObjectKeys are the keys Set accepts.
var objectKeys = []string{"uuid", "name", "id", "pid", "uri", "host"}

// Set sets the field named key from its text form, as management APIs pass
// identity as key/value parameters. An unknown key is an invalid-argument
// error, never silently ignored.
func (o *Object) Set(key, value string) error {
	switch key {
	case "uuid":
		u, err := ParseUUID(value)
		if err != nil {
			return err
		}
		o.UUID = u
	case "name":
		o.Name = value
	case "id", "pid":
		n, err := strconv.Atoi(value)
		if err != nil || n < 0 {
			return invalid("object %s %q: want a non-negative integer", key, value)
		}
		if key == "id" {
			o.ID = n
		} else {
			o.PID = n
		}
	case "uri":
		o.URI = value
	case "host":
		o.Host = value
	default:
		return invalid("unknown object key %q (known: %s)", key, strings.Join(objectKeys, ", "))
	}
	return nil
}

// Validate checks o and canonicalises its UUID in place.
func (o *Object) Validate() error {
	u, err := ParseUUID(o.UUID)
	if err != nil {
		return err
	}
	o.UUID = u
	if o.ID < 0 || o.PID < 0 {
		return invalid("object %s: negative id or pid", u)
	}
	for _, f := range [...]struct{ k, v string }{{"name", o.Name}, {"uri", o.URI}, {"host", o.Host}} {
		if len(f.v) > maxObjectField {
			return invalid("object %s: %s is longer than %d bytes", u, f.k, maxObjectField)
		}
		if !utf8.ValidString(f.v) || strings.ContainsFunc(f.v, isControl) {
			return invalid("object %s: %s %q contains a control character or invalid UTF-8", u, f.k, f.v)
		}
	}
	return nil
}

// ParseUUID validates a UUID in the 8-4-4-4-12 hex form and returns it in
// lower case: s itself when it is in that form already, as every lookup of
// a registered object passes a UUID this returned.
func ParseUUID(s string) (string, error) {
	if len(s) != 36 {
		return "", invalid("uuid %q: want 8-4-4-4-12 hex digits", s)
	}
	upper := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return "", invalid("uuid %q: want 8-4-4-4-12 hex digits", s)
			}
		default:
			switch {
			case c >= '0' && c <= '9' || c >= 'a' && c <= 'f':
			case c >= 'A' && c <= 'F':
				upper = true
			default:
				return "", invalid("uuid %q: want 8-4-4-4-12 hex digits", s)
			}
		}
	}
	if upper {
		return strings.ToLower(s), nil
	}
	return s, nil
}
