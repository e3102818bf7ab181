// Package etcdtest runs a real etcd cluster inside the current process
// (go.etcd.io/etcd/server/v3/embed) on loopback, for the etcd driver's tests
// and for `vmlock bench etcd`. It is not for production: members listen on
// plain HTTP on 127.0.0.1 with no authentication.
//
// The embedded server's defaults are changed where they hurt in tests and
// benchmarks: its logger is silenced (zap Nop), the gRPC gateway (an
// unauthenticated HTTP JSON API on the client port) is off, auto-compaction
// is on, and every member gets its own ports and data directory, which Close
// removes. Note that the etcd server registers its metrics on Prometheus's
// default registry when its packages are initialised; nothing here adds to
// that registry.
package etcdtest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Options configure a cluster. The zero value is a 3-member cluster with
// etcd's default timing (heartbeat 100 ms, election 1 s) and fsync on.
type Options struct {
	Members    int    // default 3
	TickMs     uint   // heartbeat interval; default 100
	ElectionMs uint   // election timeout; default 1000
	NoFsync    bool   // skip fsync (fast tests on a busy disk; never in a benchmark of fsync'd etcd)
	Dir        string // parent of the data directories; default a new temporary directory
}

// Member is one etcd server of the cluster.
type Member struct {
	Name      string
	ClientURL string // http://127.0.0.1:PORT
	PeerURL   string
	Etcd      *embed.Etcd

	cfg     *embed.Config // to restart the member with the same data
	mu      sync.Mutex
	stopped bool
}

// Cluster is a running embedded cluster.
type Cluster struct {
	Members []*Member
	dir     string
	ownDir  bool
}

// Start starts a cluster and waits until every member is ready (has joined
// and a leader is elected), or ctx is done. Ports are picked in advance
// (a multi-member cluster needs every peer URL before any member starts);
// if another process takes one of them first, Start tries again with new
// ports, up to three times.
func Start(ctx context.Context, opt Options) (*Cluster, error) {
	var err error
	for range 3 {
		var c *Cluster
		c, err = start(ctx, opt)
		if err == nil {
			return c, nil
		}
		if !strings.Contains(err.Error(), "address already in use") || ctx.Err() != nil {
			break
		}
	}
	return nil, err
}

func start(ctx context.Context, opt Options) (*Cluster, error) {
	n := opt.Members
	if n <= 0 {
		n = 3
	}
	c := &Cluster{dir: opt.Dir}
	if c.dir == "" {
		d, err := os.MkdirTemp("", "vmlock-etcd-")
		if err != nil {
			return nil, err
		}
		c.dir, c.ownDir = d, true
	}
	ports, err := freePorts(2 * n)
	if err != nil {
		c.removeDir()
		return nil, err
	}
	token := fmt.Sprintf("vmlock-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	var initial []string
	for i := range n {
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		cfg := embed.NewConfig()
		cfg.Name = m.Name
		cfg.Dir = filepath.Join(c.dir, m.Name)
		cu, _ := url.Parse(m.ClientURL)
		pu, _ := url.Parse(m.PeerURL)
		cfg.ListenClientUrls = []url.URL{*cu}
		cfg.AdvertiseClientUrls = []url.URL{*cu}
		cfg.ListenPeerUrls = []url.URL{*pu}
		cfg.AdvertisePeerUrls = []url.URL{*pu}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = token
		cfg.ClusterState = embed.ClusterStateFlagNew
		cfg.TickMs, cfg.ElectionMs = 100, 1000
		if opt.TickMs > 0 {
			cfg.TickMs = opt.TickMs
		}
		if opt.ElectionMs > 0 {
			cfg.ElectionMs = opt.ElectionMs
		}
		cfg.UnsafeNoFsync = opt.NoFsync
		cfg.EnableGRPCGateway = false
		cfg.AutoCompactionMode = "revision"
		cfg.AutoCompactionRetention = "10000"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("start etcd member %s: %w", m.Name, err)
		}
		m.Etcd, m.cfg = e, cfg
	}
	for _, m := range c.Members {
		select {
		case <-m.Etcd.Server.ReadyNotify():
		case err := <-m.Etcd.Err():
			c.Close()
			return nil, fmt.Errorf("etcd member %s: %w", m.Name, err)
		case <-ctx.Done():
			c.Close()
			return nil, fmt.Errorf("etcd cluster not ready: %w", ctx.Err())
		}
	}
	return c, nil
}

// freePorts reserves n distinct loopback ports at once and releases them.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Endpoints returns the client URLs of every member (stopped ones too).
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.Members))
	for i, m := range c.Members {
		out[i] = m.ClientURL
	}
	return out
}

// Leader returns the index of the member that is the leader as the running
// members see it, or -1.
func (c *Cluster) Leader() int {
	for _, m := range c.Members {
		if m.isStopped() {
			continue
		}
		lead := m.Etcd.Server.Leader()
		for j, o := range c.Members {
			if !o.isStopped() && o.Etcd.Server.MemberID() == lead {
				return j
			}
		}
	}
	return -1
}

// WaitLeader waits until the running members agree on a leader and returns
// its index.
func (c *Cluster) WaitLeader(ctx context.Context) (int, error) {
	for {
		if l := c.Leader(); l >= 0 {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("no etcd leader: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (m *Member) isStopped() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stopped || m.Etcd == nil
}

// Stop stops member i (as if its host died; its data stays).
func (c *Cluster) Stop(i int) {
	m := c.Members[i]
	m.mu.Lock()
	if m.stopped || m.Etcd == nil {
		m.mu.Unlock()
		return
	}
	m.stopped = true
	m.mu.Unlock()
	m.Etcd.Close()
}

// Restart starts stopped member i again on its URLs with its data (as its
// host coming back), and waits until it has rejoined the cluster and a
// leader is elected, or ctx is done. A member of a cluster that has lost
// its quorum is ready only once enough members are back: restart them
// concurrently. Restarting a running member does nothing.
func (c *Cluster) Restart(ctx context.Context, i int) error {
	m := c.Members[i]
	m.mu.Lock()
	if !m.stopped {
		m.mu.Unlock()
		return nil
	}
	e, err := embed.StartEtcd(m.cfg)
	if err != nil {
		m.mu.Unlock()
		return fmt.Errorf("restart etcd member %s: %w", m.Name, err)
	}
	m.Etcd, m.stopped = e, false
	m.mu.Unlock()
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case err := <-e.Err():
		return fmt.Errorf("etcd member %s: %w", m.Name, err)
	case <-ctx.Done():
		return fmt.Errorf("etcd member %s not ready: %w", m.Name, ctx.Err())
	}
}

// Close stops every member, followers first in parallel and then the
// leader (closing them all at once makes each wait for the others' peer
// timeouts), and removes the data directories.
func (c *Cluster) Close() {
	lead := c.Leader()
	var wg sync.WaitGroup
	for i := range c.Members {
		if i == lead {
			continue
		}
		wg.Go(func() { c.Stop(i) })
	}
	wg.Wait()
	if lead >= 0 {
		c.Stop(lead)
	}
	c.removeDir()
}

func (c *Cluster) removeDir() {
	if c.ownDir {
		_ = os.RemoveAll(c.dir)
		return
	}
	for _, m := range c.Members {
		_ = os.RemoveAll(filepath.Join(c.dir, m.Name))
	}
}
