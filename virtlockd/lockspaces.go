package virtlockd

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/vmlock/vmlock/lockmgr"
)

// LockspaceStore keeps the lockspace directories that clients created
// (CREATE_LOCKSPACE, NEW) across restarts of the daemon, so that libvirtd,
// which sends CREATE_LOCKSPACE only when it starts, keeps working after
// vmlockd restarts.
type LockspaceStore interface {
	// Load returns the saved directories; none (and no error) if nothing
	// was ever saved.
	Load() ([]string, error)
	// Save replaces the saved directories with dirs, durably.
	Save(dirs []string) error
}

// FileStore is a LockspaceStore in one JSON file (for example
// STATEDIR/libvirt-lockspaces.json), replaced atomically on every Save.
// A file that Load cannot read as a store (a disk that corrupted it) is
// moved aside, and Load reports it as a *CorruptStoreError.
type FileStore struct{ Path string }

// CorruptStoreError reports a lockspace store file whose content is not a
// store: Load moved it aside, to Aside, and returned no lockspaces, so
// that a later Save does not overwrite what it names.
type CorruptStoreError struct {
	Path  string
	Aside string
	// Offset is the byte offset of a JSON syntax or type error; -1 if the
	// error has none.
	Offset int64
	Err    error
}

func (e *CorruptStoreError) Error() string {
	what := e.Err.Error()
	if e.Offset >= 0 {
		what += fmt.Sprintf(" (at byte %d)", e.Offset)
	}
	return fmt.Sprintf("lockspace store %s is corrupt: %s; moved it aside to %s. "+
		"The lockspace directories it lists are not served, so libvirt's calls in them fail (nothing is granted twice), "+
		"until libvirtd (virtqemud) is restarted, which creates them again, or they are listed in libvirt_lockspace_dirs; "+
		"locks held in them stay held until their QEMU exits",
		e.Path, what, e.Aside)
}

func (e *CorruptStoreError) Unwrap() error { return e.Err }

type storeFile struct {
	Version    int      `json:"version"`
	Lockspaces []string `json:"lockspaces"`
}

// maxStoreFile bounds what Load reads.
const maxStoreFile = 16 << 20

// Load reads the file; a missing file is an empty store.
func (f FileStore) Load() ([]string, error) {
	fh, err := os.Open(f.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("lockspace store: %w", err)
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxStoreFile+1))
	if err != nil {
		return nil, fmt.Errorf("lockspace store: %w", err)
	}
	dirs, err := decodeStore(b)
	var se *storeError
	if !errors.As(err, &se) {
		return dirs, err
	}
	if se.Newer {
		// Not corrupt but a newer vmlockd's: moving it aside would lose
		// its lockspaces.
		return nil, fmt.Errorf("lockspace store %s: %w", f.Path, err)
	}
	aside, merr := f.moveAside()
	if merr != nil {
		return nil, fmt.Errorf("lockspace store %s is corrupt: %v; it cannot be moved aside (%w): "+
			"move it aside yourself, and vmlockd starts without the lockspaces it lists", f.Path, err, merr)
	}
	return nil, &CorruptStoreError{Path: f.Path, Aside: aside, Offset: se.Offset, Err: se.Err}
}

// storeError is what decodeStore finds wrong with a store file's content.
type storeError struct {
	// Newer: the file is a store of a later version (a newer vmlockd's).
	Newer bool
	// Offset is the byte offset of a JSON syntax or type error; -1 if none.
	Offset int64
	Err    error
}

func (e *storeError) Error() string { return e.Err.Error() }
func (e *storeError) Unwrap() error { return e.Err }

// decodeStore reads a store file's content as Save writes it: the
// lockspace directories it returns are what Save was given, each absolute,
// valid UTF-8 and without a NUL byte. Anything else is a *storeError.
func decodeStore(b []byte) ([]string, error) {
	if len(b) > maxStoreFile {
		return nil, &storeError{Offset: -1, Err: fmt.Errorf("larger than %d bytes", maxStoreFile)}
	}
	var sf storeFile
	if err := json.Unmarshal(b, &sf); err != nil {
		offset := int64(-1)
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			offset = se.Offset
		case errors.As(err, &te):
			offset = te.Offset
		}
		return nil, &storeError{Offset: offset, Err: err}
	}
	switch {
	case sf.Version > 1:
		return nil, &storeError{Newer: true, Offset: -1, Err: fmt.Errorf("unknown version %d", sf.Version)}
	case sf.Version < 1: // no version ever wrote it: not a newer vmlockd's
		return nil, &storeError{Offset: -1, Err: fmt.Errorf("version %d, want 1", sf.Version)}
	}
	for i, p := range sf.Lockspaces {
		if err := storablePath(p); err != nil {
			return nil, &storeError{Offset: -1, Err: fmt.Errorf("lockspace %d: %w", i, err)}
		}
	}
	return sf.Lockspaces, nil
}

// storablePath checks a lockspace directory that Save writes and Load
// reads: JSON text carries it unchanged only if it is valid UTF-8.
func storablePath(p string) error {
	switch {
	case !filepath.IsAbs(p):
		return fmt.Errorf("path %q is not absolute", p)
	case strings.IndexByte(p, 0) >= 0:
		return fmt.Errorf("path %q contains a NUL byte", p)
	case !utf8.ValidString(p):
		return fmt.Errorf("path %q is not valid UTF-8", p)
	}
	return nil
}

// moveAside renames the file to a new name next to it and returns that.
func (f FileStore) moveAside() (string, error) {
	// A new empty file reserves a name that no earlier copy has.
	tmp, err := os.CreateTemp(filepath.Dir(f.Path), filepath.Base(f.Path)+".corrupt-*")
	if err != nil {
		return "", err
	}
	tmp.Close()
	if err := os.Rename(f.Path, tmp.Name()); err != nil {
		os.Remove(tmp.Name())
		return "", err
	}
	return tmp.Name(), nil
}

// Save writes a temporary file, syncs it, renames it over the file and
// syncs the directory. A directory that Load could not read back as it
// is (see decodeStore) is an error, and nothing is written.
func (f FileStore) Save(dirs []string) error {
	for _, p := range dirs {
		if err := storablePath(p); err != nil {
			return fmt.Errorf("lockspace store: cannot record lockspace: %w", err)
		}
	}
	b, err := json.MarshalIndent(storeFile{Version: 1, Lockspaces: dirs}, "", "  ")
	if err != nil {
		return fmt.Errorf("lockspace store: %w", err)
	}
	dir := filepath.Dir(f.Path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(f.Path)+".*")
	if err != nil {
		return fmt.Errorf("lockspace store: %w", err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("lockspace store: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("lockspace store: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("lockspace store: %w", err)
	}
	if err := os.Rename(tmp.Name(), f.Path); err != nil {
		return fmt.Errorf("lockspace store: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("lockspace store: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("lockspace store: %w", err)
	}
	return nil
}

// GrantStore keeps, across restarts of the daemon, what the server must
// know of its grants that the lock table does not say: the lock table
// survives a restart (the daemon's lock-holder keeps the locks) but the
// server's records would not. Per resource: the file that goes with its
// last holder (the first holder asked for AUTOCREATE), so that it is still
// removed, and the paths other than the disk's own (symlinks) by which
// holders acquired a disk, so that libvirt can still release it by them
// after a link was retargeted. Holders are not kept: the restarted server
// reads them from the lock table.
type GrantStore interface {
	// Load returns the records by resource key; none (and no error) if
	// nothing was ever recorded. It returns every record it could read even
	// when it reports others that it could not (each a *GrantRecordError).
	Load() (map[string]GrantRecord, error)
	// Put replaces the record of the resource key with rec.
	Put(key string, rec GrantRecord) error
	// Delete forgets the record of key; a missing record is no error.
	Delete(key string) error
}

// GrantRecord is what a GrantStore keeps of one resource.
type GrantRecord struct {
	// File goes with the resource's last holder; "" if none does.
	File string
	// Spelled lists, by object uuid, the paths other than the disk's own
	// by which that object acquired the disk.
	Spelled map[string][]string
}

func (r GrantRecord) empty() bool { return r.File == "" && len(r.Spelled) == 0 }

// GrantRecordError reports a record that a GrantStore's Load could not use
// (a file torn by a crash of the host, or not a record at all); Load loads
// the others.
type GrantRecordError struct {
	Path string
	// Removed says that Load removed the file, which can never be read; a
	// record of a later version, or a directory, is left in place.
	Removed bool
	Err     error
}

func (e *GrantRecordError) Error() string {
	what := "left in place"
	if e.Removed {
		what = "removed"
	}
	return fmt.Sprintf("grant store: unusable record %s (%s): %v", e.Path, what, e.Err)
}

func (e *GrantRecordError) Unwrap() error { return e.Err }

// DirGrantStore is a GrantStore in a directory (for example
// STATEDIR/libvirt-grants, created on demand, mode 0700): one small JSON
// file per resource, named by the SHA-256 of its key and replaced
// atomically (a temporary file renamed into place), so that a crash of the
// daemon leaves every record whole. Records are not synced to disk: they
// matter only while the lock-holder keeps locks, which a crash of the host
// ends too; a record torn by such a crash is reported and dropped by Load.
type DirGrantStore struct{ Dir string }

// grantVersion is the version of the records Put writes. Version 1 (no
// "version" member) has a key and a file only.
const grantVersion = 2

type grantFile struct {
	Version int                 `json:"version,omitempty"`
	Key     string              `json:"key"`
	File    string              `json:"file"`
	Spelled map[string][]string `json:"spelled,omitempty"`
}

// errGrantVersion marks a record of a version this code does not know.
var errGrantVersion = errors.New("unknown record version")

func (d DirGrantStore) path(key string) string {
	sum := sha256.Sum256([]byte(key))
	return filepath.Join(d.Dir, hex.EncodeToString(sum[:])+".json")
}

// Load reads every record. It removes temporary files that a crash left
// behind, and reports and removes records it cannot read.
func (d DirGrantStore) Load() (map[string]GrantRecord, error) {
	ents, err := os.ReadDir(d.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("grant store: %w", err)
	}
	out := make(map[string]GrantRecord, len(ents))
	var errs []error
	for _, e := range ents {
		p := filepath.Join(d.Dir, e.Name())
		if strings.HasPrefix(e.Name(), ".") && e.Type().IsRegular() { // never renamed into place
			_ = os.Remove(p)
			continue
		}
		key, rec, err := d.read(p)
		if err == nil {
			out[key] = rec
			continue
		}
		rerr := &GrantRecordError{Path: p, Err: err}
		if e.Type().IsRegular() && !errors.Is(err, errGrantVersion) {
			if err := os.Remove(p); err == nil || errors.Is(err, fs.ErrNotExist) {
				rerr.Removed = true
			}
		}
		errs = append(errs, rerr)
	}
	return out, errors.Join(errs...)
}

// read reads and checks the record file p.
func (d DirGrantStore) read(p string) (string, GrantRecord, error) {
	fh, err := os.Open(p)
	if err != nil {
		return "", GrantRecord{}, err
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxStoreFile+1))
	if err != nil {
		return "", GrantRecord{}, err
	}
	if len(b) > maxStoreFile {
		return "", GrantRecord{}, fmt.Errorf("larger than %d bytes", maxStoreFile)
	}
	var g grantFile
	if err := json.Unmarshal(b, &g); err != nil {
		return "", GrantRecord{}, err
	}
	rec := GrantRecord{File: g.File}
	switch g.Version {
	case 0: // version 1
		if g.File == "" {
			return "", GrantRecord{}, errors.New("no file")
		}
	case grantVersion:
		rec.Spelled = g.Spelled
	default:
		return "", GrantRecord{}, fmt.Errorf("%w %d", errGrantVersion, g.Version)
	}
	switch {
	case g.Key == "" || p != d.path(g.Key):
		return "", GrantRecord{}, fmt.Errorf("not the record of its key %q", g.Key)
	case rec.File != "" && !filepath.IsAbs(rec.File):
		return "", GrantRecord{}, fmt.Errorf("file %q is not absolute", rec.File)
	case rec.empty():
		return "", GrantRecord{}, errors.New("nothing recorded")
	}
	for uuid, paths := range rec.Spelled {
		if uuid == "" || len(paths) == 0 || slices.ContainsFunc(paths, func(s string) bool { return !filepath.IsAbs(s) }) {
			return "", GrantRecord{}, fmt.Errorf("bad paths of object %q: %q", uuid, paths)
		}
	}
	return g.Key, rec, nil
}

// Put writes the record to a temporary file and renames it into place.
func (d DirGrantStore) Put(key string, rec GrantRecord) error {
	b, err := json.Marshal(grantFile{Version: grantVersion, Key: key, File: rec.File, Spelled: rec.Spelled})
	if err != nil {
		return fmt.Errorf("grant store: %w", err)
	}
	if err := os.MkdirAll(d.Dir, 0o700); err != nil {
		return fmt.Errorf("grant store: %w", err)
	}
	tmp, err := os.CreateTemp(d.Dir, ".grant.*")
	if err != nil {
		return fmt.Errorf("grant store: %w", err)
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	_, err = tmp.Write(b)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), d.path(key))
	}
	if err != nil {
		return fmt.Errorf("grant store: %w", err)
	}
	return nil
}

// Delete removes the record of key.
func (d DirGrantStore) Delete(key string) error {
	if err := os.Remove(d.path(key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("grant store: %w", err)
	}
	return nil
}

// lockspace is one lockspace the server knows.
type lockspace struct {
	path string // as clients name it; "" is the default lockspace
	dir  string // the cleaned directory ("" for the default)
	name string // the lockmgr lockspace of its leases (LockspaceName)
}

// file returns the file of the resource name in ls.
func (ls *lockspace) file(name string) string {
	if ls.path == "" {
		return name
	}
	return filepath.Join(ls.dir, name)
}

// LockspaceNamePrefix starts the lockmgr lockspace name of every lockspace
// directory served over the libvirt protocol.
const LockspaceNamePrefix = "libvirt:"

// LockspaceName returns the lockmgr lockspace under which the leases of the
// lockspace directory dir are locked: LockspaceNamePrefix followed by the
// cleaned absolute path escaped as systemd-escape --path does ("/" becomes
// "-"; bytes other than ASCII letters, digits, ':', '_' and a non-leading
// '.' become \xNN). "/var/lib/libvirt/lockd/files" becomes
// "libvirt:var-lib-libvirt-lockd-files". The mapping is injective and the
// same on every host, so the cluster backend sees one lock for one
// directory. A name over lockmgr.MaxNameLen bytes is cut and ends with a
// hash of the whole path.
func LockspaceName(dir string) string {
	p := strings.Trim(filepath.Clean(dir), "/")
	var b strings.Builder
	b.WriteString(LockspaceNamePrefix)
	if p == "" {
		b.WriteByte('-')
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '/':
			b.WriteByte('-')
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == ':', c == '_',
			c == '.' && i > 0:
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, `\x%02x`, c)
		}
	}
	s := b.String()
	if len(s) > lockmgr.MaxNameLen {
		sum := sha256.Sum256([]byte(filepath.Clean(dir)))
		h := hex.EncodeToString(sum[:16])
		s = s[:lockmgr.MaxNameLen-len(h)-1] + "~" + h
	}
	return s
}
