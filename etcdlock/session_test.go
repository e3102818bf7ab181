package etcdlock

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

// A session file that names a lease etcd cannot have granted (etcd's IDs
// are positive) is reported as a bad session file, naming the file, not
// looked up as a session that expired; the driver starts a new session and
// records it in the file.
func TestSessionFileWithImpossibleLeaseStartsNewSession(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.StateDir = t.TempDir()
	var logs syncbuf.Buffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	path := filepath.Join(cfg.StateDir, stateFileName)
	if err := os.WriteFile(path, []byte(`{"lease":-5,"host":"host-a","prefix":"`+DefaultPrefix+`"}`), 0o600); err != nil {
		t.Fatal(err)
	}

	d := newDriver(t, cfg)
	st := d.Status()
	if st.Reattached {
		t.Fatalf("re-attached to lease -5: %+v", st)
	}
	if l := logs.String(); !strings.Contains(l, "bad etcd session file") || !strings.Contains(l, path) || !strings.Contains(l, "lease -5") {
		t.Fatalf("logs do not report %s as a bad session file with lease -5:\n%s", path, l)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got stateFile
	if err := json.Unmarshal(b, &got); err != nil || got.Lease != int64(st.LeaseID) {
		t.Fatalf("session file %s after start: %s (%v), want lease %d", path, b, err, st.LeaseID)
	}
}
