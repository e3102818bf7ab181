package virtlockd

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

// A record written by the store's first version (a key and a file, no
// version) still loads.
func TestGrantStoreLoadsARecordOfTheFirstVersion(t *testing.T) {
	st := DirGrantStore{Dir: t.TempDir()}
	key := "lease:libvirt:var-lib-libvirt-lockd-files/k"
	first := `{"key":"lease:libvirt:var-lib-libvirt-lockd-files/k","file":"/var/lib/libvirt/lockd/files/k"}`
	if err := os.WriteFile(st.path(key), []byte(first), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := st.Load()
	want := map[string]GrantRecord{key: {File: "/var/lib/libvirt/lockd/files/k"}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("Load = %+v, %v; want %+v", got, err, want)
	}
}

// A record keeps the paths by which objects acquired a disk, with or
// without a file.
func TestGrantStoreKeepsSpelledPaths(t *testing.T) {
	st := DirGrantStore{Dir: t.TempDir()}
	recs := map[string]GrantRecord{
		"disk:/images/a.img": {Spelled: map[string][]string{"u1": {"/links/a.img", "/other/a.img"}, "u2": {"/links/a.img"}}},
		"disk:/images/b.img": {File: "/images/b.img", Spelled: map[string][]string{"u1": {"/links/b.img"}}},
	}
	for k, r := range recs {
		if err := st.Put(k, r); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := st.Load(); err != nil || !reflect.DeepEqual(got, recs) {
		t.Fatalf("Load = %+v, %v; want %+v", got, err, recs)
	}
}

// Records a crash of the host tore, and files that are no records, are
// reported one by one, naming each file; the others load. Files that can
// never be read are removed; a record of a later version and a directory
// are left alone. A temporary file that a crash left before its rename is
// removed without a word: the record it was to replace stands.
func TestGrantStoreReportsUnusableRecordsAndLoadsTheOthers(t *testing.T) {
	st := DirGrantStore{Dir: t.TempDir()}
	good := GrantRecord{File: "/leases/good", Spelled: map[string][]string{"u": {"/links/good"}}}
	if err := st.Put("lease:ls/good", good); err != nil {
		t.Fatal(err)
	}
	whole, err := os.ReadFile(st.path("lease:ls/good"))
	if err != nil {
		t.Fatal(err)
	}
	write := func(p string, b []byte) string {
		t.Helper()
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	torn := write(st.path("lease:ls/torn"), whole[:len(whole)/2])
	empty := write(st.path("lease:ls/empty"), nil)
	garbage := write(st.path("lease:ls/garbage"), []byte("\x00\x17 not json"))
	foreign := write(st.path("lease:ls/foreign"), []byte(`{"version":2,"key":"lease:ls/other","file":"/leases/other"}`))
	later := write(st.path("lease:ls/later"), []byte(`{"version":3,"key":"lease:ls/later","file":"/leases/later"}`))
	dir := filepath.Join(st.Dir, "not-a-record")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	write(filepath.Join(dir, "x"), nil)
	tmp := write(filepath.Join(st.Dir, ".grant.12345"), whole[:3])

	got, err := st.Load()
	if want := map[string]GrantRecord{"lease:ls/good": good}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Load = %+v, want %+v", got, want)
	}
	reported := map[string]bool{} // path: removed
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var re *GrantRecordError
		if !errors.As(e, &re) || !strings.Contains(e.Error(), re.Path) {
			t.Fatalf("reported %v, want a *GrantRecordError naming its file", e)
		}
		reported[re.Path] = re.Removed
	}
	want := map[string]bool{torn: true, empty: true, garbage: true, foreign: true, later: false, dir: false}
	if !reflect.DeepEqual(reported, want) {
		t.Fatalf("reported (path: removed) %v, want %v", reported, want)
	}
	for p, removed := range want {
		if _, err := os.Stat(p); removed != errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: stat %v, want removed %v", p, err, removed)
		}
	}
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary file: stat %v, want it removed", err)
	}
}

// A restarted server whose grant store holds unusable files (a record torn
// by a crash, a directory) starts all the same, logs each of them, and
// keeps the other grants: an auto-created lease file still goes with its
// last holder.
func TestServerStartsWithUnusableGrantRecordsAndKeepsTheOthers(t *testing.T) {
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	dir := t.TempDir()
	grants := DirGrantStore{Dir: filepath.Join(t.TempDir(), "grants")}
	ctx := testCtx(t)
	before := startServer(t, Config{Manager: m, Lockspaces: []string{dir}, Grants: grants})
	a := before.registered("a", fakePID)
	wantOK(t, "a acquires", a.AcquireResource(ctx, dir, "k", AcquireAutoCreate))
	torn := filepath.Join(grants.Dir, strings.Repeat("0", 64)+".json")
	if err := os.WriteFile(torn, []byte(`{"version":2,"ke`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(grants.Dir, "junk", "deeper"), 0o700); err != nil {
		t.Fatal(err)
	}

	var logs syncbuf.Buffer
	ts := startServer(t, Config{Manager: m, Lockspaces: []string{dir}, Grants: grants,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	for _, p := range []string{torn, filepath.Join(grants.Dir, "junk")} {
		if !strings.Contains(logs.String(), p) {
			t.Errorf("the log does not name %s:\n%s", p, logs.String())
		}
	}
	c := ts.registered("a", fakePID)
	wantOK(t, "a releases after the restart", c.ReleaseResource(ctx, dir, "k", 0))
	if _, err := os.Stat(filepath.Join(dir, "k")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lease file after its last holder released it: %v, want it removed", err)
	}
	if got, _ := grants.Load(); len(got) != 0 {
		t.Fatalf("records left: %+v", got)
	}
}
