package etcdlock

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/vmlock/vmlock/lockmgr"
)

// Defaults of Config.
const (
	DefaultPrefix      = "/vmlock/"
	DefaultTTL         = 10 * time.Second
	DefaultFenceMargin = 2 * time.Second
	DefaultDialTimeout = 5 * time.Second
	DefaultOpTimeout   = 5 * time.Second
	DefaultMaxTxnOps   = 128 // etcd's default --max-txn-ops
)

// Config configures a Driver.
type Config struct {
	// Endpoints are the etcd client URLs (https://host:2379, ...).
	Endpoints []string
	// TLS client certificate, key and CA bundle (PEM file paths). Empty
	// fields leave TLS off, unless an endpoint is https, in which case the
	// system roots are used.
	CertFile, KeyFile, CAFile string
	// Prefix of every key (default "/vmlock/"); it must end with "/".
	Prefix string
	// Host is this host's name, as busy errors on other hosts show it.
	// Required; two live drivers cannot share one.
	Host string
	// TTL of the host's etcd lease (default 10 s). etcd counts whole
	// seconds, so it is rounded up.
	TTL time.Duration
	// FenceMargin (default 2 s, or TTL/4 if less): OnFence is called TTL − FenceMargin after
	// the last confirmed renewal request was sent. It must be below the TTL
	// and leave room for renewals every TTL/3.
	FenceMargin time.Duration
	// DialTimeout bounds connecting to etcd (default 5 s).
	DialTimeout time.Duration
	// OpTimeout bounds one etcd call when the caller's context has no
	// earlier deadline (default 5 s).
	OpTimeout time.Duration
	// StateDir, if set, keeps the session's lease ID (file etcd-session.json)
	// so that a restarted daemon re-attaches to its locks.
	StateDir string
	// MaxTxnOps is the cluster's --max-txn-ops (default 128). A grant holds
	// at most (MaxTxnOps−2)/2 resources.
	MaxTxnOps int
	// Logger for session events; slog.Default() if nil.
	Logger *slog.Logger
	// OnFence is called, from the driver's own goroutine, when the host must
	// kill every process that holds one of its locks because its lease can
	// no longer be confirmed in time. It must return only once they are
	// killed (SIGKILL). Nil is allowed only in tests and benchmarks.
	OnFence func(reason string)
	// OnDeadline, if set, is told each new fence deadline (on the local
	// monotonic clock): after every confirmed renewal that moves it, and
	// when a session starts or is re-attached — then before the session
	// grants anything. Calls never overlap and come in order. The daemon
	// passes the deadline on to its lock-holder process, which kills the
	// holders itself if the daemon is gone when it passes. It must not
	// call the driver. It may block: renewals go on meanwhile, and the
	// next call brings the newest deadline (those set in between are
	// skipped).
	OnDeadline func(deadline time.Time)
}

func (c Config) withDefaults() (Config, error) {
	if len(c.Endpoints) == 0 {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: no endpoints configured")
	}
	if c.Host == "" {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: host name is required")
	}
	if strings.ContainsFunc(c.Host, func(r rune) bool { return r < 0x20 || r == 0x7f }) || len(c.Host) > 255 {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: host name %q is invalid", c.Host)
	}
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(c.Prefix, "/") {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: prefix %q must end with /", c.Prefix)
	}
	if c.TTL == 0 {
		c.TTL = DefaultTTL
	}
	c.TTL = (c.TTL + time.Second - 1).Truncate(time.Second)
	if c.FenceMargin == 0 {
		c.FenceMargin = min(DefaultFenceMargin, c.TTL/4)
	}
	if c.TTL < 2*time.Second {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: TTL %s is below etcd's minimum (2 s)", c.TTL)
	}
	// The fence must come after at least one renewal period plus a retry.
	if c.FenceMargin < 0 || c.TTL-c.FenceMargin < c.TTL/3+c.TTL/6 {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument,
			"etcd driver: fence margin %s leaves no time for renewals within TTL %s (want 0 ≤ margin ≤ TTL/2)", c.FenceMargin, c.TTL)
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.OpTimeout == 0 {
		c.OpTimeout = DefaultOpTimeout
	}
	if c.MaxTxnOps == 0 {
		c.MaxTxnOps = DefaultMaxTxnOps
	}
	if c.MaxTxnOps < 4 {
		return c, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: MaxTxnOps %d is too small", c.MaxTxnOps)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

func (c Config) tlsConfig() (*tls.Config, error) {
	if c.CertFile == "" && c.KeyFile == "" && c.CAFile == "" {
		for _, e := range c.Endpoints {
			if strings.HasPrefix(e, "https://") {
				return &tls.Config{MinVersion: tls.VersionTLS12}, nil
			}
		}
		return nil, nil
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "etcd driver: TLS needs both a client certificate and its key")
	}
	info := transport.TLSInfo{CertFile: c.CertFile, KeyFile: c.KeyFile, TrustedCAFile: c.CAFile}
	tc, err := info.ClientConfig()
	if err != nil {
		return nil, &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "etcd driver: TLS configuration", Err: fmt.Errorf("%w", err)}
	}
	return tc, nil
}
