package etcdlock

import (
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

// etcd stopped as a whole (its only member) and started again with its
// data before a host's fence deadline: the host reconnects and renews in
// time, so it is not fenced and still holds what it was granted (etcd kept
// its lease); another host is refused the disk, told who holds it.
func TestEtcdRestartedBeforeTheFenceDeadlineFencesNoHost(t *testing.T) {
	t.Parallel()
	c := fastCluster(t)
	cfg := hostConfig(c.Endpoints(), "host-a")
	cfg.TTL, cfg.FenceMargin = 12*time.Second, 4*time.Second // renewals every 4 s, fence 8 s after one
	fenced := make(chan string, 1)
	cfg.OnFence = func(reason string) { fenced <- reason }
	a := newDriver(t, cfg)
	const disk = "/img/outage"
	la := mustAcquire(t, a, req(disk, lockmgr.Exclusive, uuidA))

	n := a.Status().Renewals
	eventually(t, 15*time.Second, "a renewal", func() bool { return a.Status().Renewals > n })
	c.Stop(0)
	// Back 2 s before the deadline: gRPC's default reconnect backoff
	// (1 s growing by 1.6x) would try again only after it.
	time.Sleep(time.Until(a.Status().FenceDeadline.Add(-2 * time.Second)))
	if err := c.Restart(ctxT(t, 10*time.Second), 0); err != nil {
		t.Fatal(err)
	}
	n = a.Status().Renewals
	eventually(t, 15*time.Second, "a renewal after etcd came back", func() bool {
		select {
		case reason := <-fenced:
			t.Fatalf("host-a fenced itself although etcd was back before its deadline: %s", reason)
		default:
		}
		return a.Status().Renewals > n
	})
	if !a.Holds(la[0]) {
		t.Fatal("host-a no longer holds its disk")
	}
	b := newDriver(t, hostConfig(c.Endpoints(), "host-b"))
	_, err := b.Acquire(ctxT(t, 5*time.Second), []lockmgr.Request{req(disk, lockmgr.Exclusive, uuidB)})
	wantBusy(t, err, disk, "host-a", uuidA, lockmgr.Exclusive)
}
