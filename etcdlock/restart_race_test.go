package etcdlock

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/internal/syncbuf"
	"github.com/vmlock/vmlock/lockmgr"
)

// restartRig is a daemon's run ("old") whose traffic to etcd goes through a
// proxy, so that a request it sent can be held back while the next run
// ("next", same host name and state directory) re-attaches to its session:
// the request of a daemon killed with it still on its way.
type restartRig struct {
	raw      *clientv3.Client
	proxy    *etcdtest.Proxy
	old      *Driver
	oldLogs  *syncbuf.Buffer
	oldFence chan string
	cfg      Config // next's
}

func newRestartRig(t *testing.T) *restartRig {
	t.Helper()
	c := fastCluster(t)
	r := &restartRig{raw: rawClient(t, c.Endpoints()), proxy: etcdtest.NewProxy(t, c.Endpoints()[0]), oldLogs: &syncbuf.Buffer{}, oldFence: make(chan string, 1)}
	stateDir := t.TempDir()
	cfg := hostConfig([]string{r.proxy.URL()}, "host-a")
	// Long enough that the held-back request is not given up on, and
	// that no renewal is due while it is held.
	cfg.StateDir, cfg.OpTimeout, cfg.TTL = stateDir, 20*time.Second, 30*time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(r.oldLogs, nil))
	cfg.OnFence = func(reason string) {
		select {
		case r.oldFence <- reason:
		default:
		}
	}
	r.old = newDriver(t, cfg)
	r.cfg = hostConfig(c.Endpoints(), "host-a")
	r.cfg.StateDir = stateDir
	return r
}

// holders returns the holder keys of disk in etcd.
func (r *restartRig) holders(t *testing.T, disk string) []string {
	t.Helper()
	resp, err := r.raw.Get(ctxT(t, 5*time.Second), r.old.ks.base("disk:"+disk), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	return keys
}

// oldFenced checks that the old run, which could not have known its
// session was taken over, fenced itself on its refused request, and that
// it left the session it lost to the next run alone: it did not revoke it.
func (r *restartRig) oldFenced(t *testing.T, next *Driver) {
	t.Helper()
	select {
	case reason := <-r.oldFence:
		if !strings.Contains(reason, "taken over") {
			t.Fatalf("old run fenced with reason %q, want it to say its session was taken over", reason)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the old run did not fence itself after its request was refused")
	}
	eventually(t, 10*time.Second, "the old run to give up starting a new session", func() bool {
		return strings.Contains(r.oldLogs.String(), "cannot start a new etcd session yet")
	})
	ttl, err := r.raw.TimeToLive(ctxT(t, 5*time.Second), clientv3.LeaseID(next.Status().LeaseID))
	if err != nil || ttl.TTL <= 0 {
		t.Fatalf("the next run's session after the old run fenced: TTL %v, %v; want it alive", ttl, err)
	}
}

// A grant that a daemon sent just before it was killed, and that etcd
// applies only after the restarted daemon re-attached to the session and
// read its locks, is refused. Granted, it would be a lock that the
// restarted daemon does not know: held for nobody until the session ends,
// and refused to every other host all that time.
func TestAGrantAppliedAfterTheNextRunReattachedIsRefused(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	r.proxy.SetBlocked(true)
	res := make(chan error, 1)
	go func() {
		_, err := r.old.Acquire(context.Background(), []lockmgr.Request{req("/img/late", lockmgr.Exclusive, uuidA)})
		res <- err
	}()
	eventually(t, 10*time.Second, "the old run to send its grant", func() bool { return r.old.attempts.Load() == 1 })

	next := newDriver(t, r.cfg)
	if !next.Status().Reattached {
		t.Fatalf("the next run did not re-attach: %+v", next.Status())
	}
	r.proxy.SetBlocked(false)
	if err := <-res; !errors.Is(err, ErrFenced) {
		t.Fatalf("the old run's grant, applied after the next run re-attached: %v, want it refused (fenced)", err)
	}
	if keys := r.holders(t, "/img/late"); len(keys) != 0 {
		t.Fatalf("holder keys of /img/late after the refused grant: %q, want none", keys)
	}
	if g := next.Recovered(); len(g) != 0 {
		t.Fatalf("the next run recovered %+v, want nothing", g)
	}
	b := newDriver(t, hostConfig(r.cfg.Endpoints, "host-b"))
	mustRelease(t, b, mustAcquire(t, b, req("/img/late", lockmgr.Exclusive, uuidB))...)
	r.oldFenced(t, next)
}

// A conversion that a daemon sent just before it was killed, and that etcd
// applies only after the restarted daemon re-attached and adopted the
// lock, is refused: applied, it would move the lock to a key the restarted
// daemon does not know, and the lease it adopted would point at nothing.
func TestAConversionAppliedAfterTheNextRunReattachedIsRefused(t *testing.T) {
	t.Parallel()
	r := newRestartRig(t)
	l := mustAcquire(t, r.old, req("/img/conv", lockmgr.Exclusive, uuidA))[0]
	before := r.holders(t, "/img/conv")
	r.proxy.SetBlocked(true)
	res := make(chan error, 1)
	sent := make(chan struct{})
	go func() {
		close(sent)
		_, err := r.old.Convert(context.Background(), l, lockmgr.Shared)
		res <- err
	}()
	<-sent

	next := newDriver(t, r.cfg)
	nl, err := next.Adopt(l.Resource(), l.Token(), nil)
	if err != nil {
		t.Fatalf("the next run adopts the exclusive grant: %v", err)
	}
	r.proxy.SetBlocked(false)
	if err := <-res; !errors.Is(err, ErrFenced) {
		t.Fatalf("the old run's conversion, applied after the next run re-attached: %v, want it refused (fenced)", err)
	}
	if after := r.holders(t, "/img/conv"); len(after) != 1 || after[0] != before[0] {
		t.Fatalf("holder keys of /img/conv after the refused conversion: %q, want %q as adopted", after, before)
	}
	if !next.Holds(nl) || nl.Resource().Mode != lockmgr.Exclusive {
		t.Fatalf("the adopted lease after the refused conversion: held %v, %v; want held exclusively", next.Holds(nl), nl.Resource())
	}
	r.oldFenced(t, next)
	if _, err := next.Convert(ctxT(t, 5*time.Second), nl, lockmgr.Shared); err != nil {
		t.Fatalf("the next run converts its adopted lease: %v", err)
	}
}
