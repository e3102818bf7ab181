package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/vmlock/vmlock/daemon"
	"github.com/vmlock/vmlock/etcdlock"
	"github.com/vmlock/vmlock/lockmgr"
)

// EtcdConfig is the [etcd] section: the cluster driver's settings (see
// docs/operations.md). Zero values take etcdlock's defaults.
type EtcdConfig struct {
	Endpoints   []string `toml:"endpoints"`
	CertFile    string   `toml:"cert_file"`
	KeyFile     string   `toml:"key_file"`
	CAFile      string   `toml:"ca_file"`
	Prefix      string   `toml:"prefix"`
	TTL         Duration `toml:"ttl"`
	FenceMargin Duration `toml:"fence_margin"`
	DialTimeout Duration `toml:"dial_timeout"`
}

func (e *EtcdConfig) configured() bool {
	return len(e.Endpoints) > 0 || e.CertFile != "" || e.KeyFile != "" || e.CAFile != "" || e.Prefix != "" ||
		e.TTL.Duration != 0 || e.FenceMargin.Duration != 0 || e.DialTimeout.Duration != 0
}

// validate checks the section for driver "etcd", with the same rules the
// driver applies, so that a bad file is refused before vmlockd starts.
func (e *EtcdConfig) validate() error {
	if len(e.Endpoints) == 0 {
		return errors.New("etcd.endpoints: the etcd driver needs at least one endpoint (https://HOST:2379)")
	}
	for _, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
			return fmt.Errorf("etcd.endpoints: %q is not an etcd client URL (want http://HOST:PORT or https://HOST:PORT)", ep)
		}
	}
	if (e.CertFile == "") != (e.KeyFile == "") {
		return errors.New("etcd.cert_file and etcd.key_file go together: set both for TLS client authentication, or neither")
	}
	for _, f := range [...]struct{ key, path string }{{"cert_file", e.CertFile}, {"key_file", e.KeyFile}, {"ca_file", e.CAFile}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return fmt.Errorf("etcd.%s: %w", f.key, err)
		}
	}
	if e.Prefix != "" && (!strings.HasPrefix(e.Prefix, "/") || !strings.HasSuffix(e.Prefix, "/")) {
		return fmt.Errorf("etcd.prefix %q: want a key prefix that starts and ends with /", e.Prefix)
	}
	ttl := e.TTL.Duration
	if ttl == 0 {
		ttl = etcdlock.DefaultTTL
	}
	if ttl < 2*time.Second || ttl%time.Second != 0 {
		return fmt.Errorf("etcd.ttl %s: want whole seconds, at least 2s (etcd's minimum lease)", ttl)
	}
	if m := e.FenceMargin.Duration; m != 0 && m > ttl/2 {
		return fmt.Errorf("etcd.fence_margin %s: at most half the TTL (%s), so that renewals every TTL/3 can keep the lease", m, ttl/2)
	}
	return nil
}

// warnUnusedEtcd says so when an [etcd] section is set but another driver
// runs: a cluster host that silently locks only locally is what an operator
// least expects.
func warnUnusedEtcd(c Config, log *slog.Logger) {
	if c.Driver != "etcd" && c.Etcd.configured() {
		log.Warn("an [etcd] section is configured but the driver is not etcd: locks are NOT shared with other hosts", "driver", c.Driver)
	}
}

// newEtcdDriver connects to etcd and starts (or re-attaches to) this
// host's session. Fencing goes through fencer: OnFence kills every holder,
// and each fence deadline reaches the lock-holder.
func newEtcdDriver(c Config, log *slog.Logger, fencer *daemon.Fencer) (lockmgr.Driver, error) {
	host := c.Host
	if host == "" {
		var err error
		if host, err = os.Hostname(); err != nil {
			return nil, fmt.Errorf("etcd driver: this host's name: %w", err)
		}
	}
	e := c.Etcd
	wait := max(e.DialTimeout.Duration, etcdlock.DefaultDialTimeout) + etcdlock.DefaultOpTimeout
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return etcdlock.New(ctx, etcdlock.Config{
		Endpoints: e.Endpoints, CertFile: e.CertFile, KeyFile: e.KeyFile, CAFile: e.CAFile, Prefix: e.Prefix,
		Host: host, TTL: e.TTL.Duration, FenceMargin: e.FenceMargin.Duration, DialTimeout: e.DialTimeout.Duration,
		StateDir: c.StateDir, Logger: log,
		OnFence: fencer.Fence, OnDeadline: fencer.Deadline,
	})
}

// isCluster reports whether drv needs the daemon's fencing.
func isCluster(drv lockmgr.Driver) bool {
	_, ok := drv.(*etcdlock.Driver)
	return ok
}
