package etcdlock

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/internal/syncbuf"
	"github.com/vmlock/vmlock/lockmgr"
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

// A driver that starts just after its previous session expired finds the
// lease expired while etcd has not yet deleted its keys (it does so at its
// lessor's next look, up to half a second later), the host name's among
// them. It starts a new session all the same instead of failing on its own
// host name as taken by another vmlockd.
func TestStartJustAfterThePreviousSessionExpiredClaimsTheHostName(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	raw := rawClient(t, c.Endpoints())
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.TTL, cfg.StateDir = 2*time.Second, t.TempDir()
	old := newDriver(t, cfg)
	oldLease := old.Status().LeaseID
	old.Close() // a crash: no more renewals, nothing revoked

	eventually(t, 10*time.Second, "the old lease to expire", func() bool {
		ttl, err := raw.TimeToLive(ctxT(t, 5*time.Second), clientv3.LeaseID(oldLease))
		return err == nil && ttl.TTL <= 0
	})
	d := newDriver(t, cfg)
	st := d.Status()
	if st.Reattached || st.LeaseID == oldLease {
		t.Fatalf("start after expiry: %+v, want a new session, not lease %x", st, oldLease)
	}
	resp, err := raw.Get(ctxT(t, 5*time.Second), keyspace{prefix: DefaultPrefix}.host("host-a"))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || resp.Kvs[0].Lease != st.LeaseID {
		t.Fatalf("host name key after the start: %v, want it on the new lease %x", resp.Kvs, st.LeaseID)
	}
}

// A second driver with a host name that has a live session is refused at
// its start, busy, naming the session that holds the name: its lease and
// the pid of the daemon that claimed it.
func TestAHostNameWithALiveSessionIsRefusedNamingItsHolder(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	first := newDriver(t, hostConfig(c.Endpoints(), "host-a"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	second, err := New(ctx, hostConfig(c.Endpoints(), "host-a"))
	if err == nil {
		second.Close()
		t.Fatal("a second driver with host-a's name started")
	}
	want := fmt.Sprintf("lease %x, written at revision", first.Status().LeaseID)
	if lockmgr.CodeOf(err) != lockmgr.CodeBusy || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), fmt.Sprintf("by pid %d", os.Getpid())) {
		t.Fatalf("second start with host-a's name: %v, want busy naming %q and pid %d", err, want, os.Getpid())
	}
}
