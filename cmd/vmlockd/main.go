// Command vmlockd is the vmlock daemon: it serves the lock table on a unix
// socket and keeps every lock through its own restart or crash.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/daemon"
	"github.com/vmlock/vmlock/etcdlock"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// Environment variables that carry descriptors across a reload's exec.
const (
	envListenFD  = "VMLOCKD_LISTEN_FD"
	envLockFD    = "VMLOCKD_LOCK_FD"
	envReloads   = "VMLOCKD_RELOADS"
	envLibvirtFD = "VMLOCKD_LIBVIRT_FD"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "vmlockd:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "vmlockd",
		Short:         "vmlockd: the lock manager daemon for virtual machines",
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configure(cmd)
			if err != nil {
				return err
			}
			return serve(cfg)
		},
	}
	f := root.Flags()
	f.String("config", "", "configuration file (TOML; keys in docs/operations.md)")
	f.String("socket", "", "API socket (default /run/vmlock/vmlockd.sock as root, $XDG_RUNTIME_DIR/vmlock/vmlockd.sock otherwise)")
	f.String("state-dir", "", "state directory (default /var/lib/vmlock as root, $XDG_STATE_HOME/vmlock otherwise)")
	f.String("driver", "", "lock driver: lockspace (default), etcd or nop")
	f.String("metrics-addr", "", "serve Prometheus metrics on this address (host:port); off if empty")
	f.String("host", "", "this host's name in lock records (default: the hostname)")
	f.String("socket-group", "", "group whose members may use the API besides root")
	f.String("log-level", "", "debug, info (default), warn or error")
	f.String("disk-lease-dir", "", "lockspace driver: take indirect disk leases in this directory instead of locking images directly")
	f.String("libvirt-socket", "", "serve virtlockd's protocol for libvirt's lockd plugin on this socket (libvirt uses /run/libvirt/virtlockd-sock); off if empty")

	holder := &cobra.Command{
		Use:    "lock-holder",
		Short:  "the lock-holder process (started by vmlockd itself)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, _ := cmd.Flags().GetString("state-dir")
			// The holder only waits on one socket: keep it small.
			debug.SetGCPercent(50)
			runtime.GOMAXPROCS(1)
			signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGPIPE)
			return lockholder.Serve(context.Background(), dir)
		},
	}
	holder.Flags().String("state-dir", "", "state directory")
	root.AddCommand(holder)
	return root
}

// setMaxProcs applies max_procs unless GOMAXPROCS is set in the
// environment. One P is the default because every request is a few
// microseconds of work between two socket operations: on one P the
// goroutines serving a call hand over on one thread, where with more each
// hand-over may wake another thread, which costs more than the call itself
// on small VMs (docs/benchmarks.md). Raise it for hundreds of busy clients.
func setMaxProcs(c Config) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	n := 1
	if c.MaxProcs != nil {
		n = *c.MaxProcs
	}
	if n == 0 {
		n = runtime.NumCPU()
	}
	runtime.GOMAXPROCS(n)
}

// configure returns the configuration of the command line cmd: the file of
// --config (if any) over the defaults, the flags that were set over both,
// checked as a whole only then, so that a flag can correct a value of the
// file.
func configure(cmd *cobra.Command) (Config, error) {
	path, _ := cmd.Flags().GetString("config")
	cfg, err := readConfig(path)
	if err != nil {
		return cfg, err
	}
	override(cmd, &cfg)
	return cfg, cfg.validate()
}

// override copies the flags that were set over the file's values.
func override(cmd *cobra.Command, c *Config) {
	for name, dst := range map[string]*string{
		"socket": &c.Socket, "state-dir": &c.StateDir, "driver": &c.Driver, "metrics-addr": &c.MetricsAddr,
		"host": &c.Host, "socket-group": &c.SocketGroup, "log-level": &c.LogLevel,
		"disk-lease-dir": &c.Lockspace.DiskLeaseDir, "libvirt-socket": &c.LibvirtSocket,
	} {
		if cmd.Flags().Changed(name) {
			*dst, _ = cmd.Flags().GetString(name)
		}
	}
}

func newLogger(c Config) *slog.Logger {
	lvl, _ := c.logLevel() // checked by validate
	opts := &slog.HandlerOptions{Level: lvl}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

func newDriver(c Config, log *slog.Logger, fencer *daemon.Fencer) (lockmgr.Driver, error) {
	warnUnusedEtcd(c, log)
	switch c.Driver {
	case "etcd":
		return newEtcdDriver(c, log, fencer)
	case "nop":
		return lockmgr.NopDriver{}, nil
	case "lockspace":
		leaseDir := c.Lockspace.LeaseDir
		if leaseDir == "" {
			leaseDir = filepath.Join(c.StateDir, "lockspaces")
		}
		return lockspace.New(lockspace.Config{StateDir: c.StateDir, LeaseDir: leaseDir, DiskLeaseDir: c.Lockspace.DiskLeaseDir})
	}
	return nil, fmt.Errorf("unknown driver %q", c.Driver)
}

// closeDriver closes the driver on a stop or reload, keeping every lock.
// The lockspace driver syncs what it wrote and records a clean end (so
// state strings stay good across a reboot that follows). The etcd driver
// keeps its lease (Close, not Shutdown): a vmlockd that is back within the
// TTL re-attaches to every lock; the lock-holder fences the holders if it
// is not back before the fence deadline.
func closeDriver(drv lockmgr.Driver, log *slog.Logger) {
	switch d := drv.(type) {
	case *lockspace.Driver:
		if err := d.Close(); err != nil {
			log.Error("closing the lockspace driver: after a crash of the host, state strings of grants made until now will be refused as stale", "err", err)
		}
	case *etcdlock.Driver:
		if st := d.Status(); !st.Fenced {
			log.Warn("etcd lease kept for the next start: unless a vmlockd re-attaches to it in time, the lock-holder kills the holders of this host's locks",
				"in", time.Until(st.FenceDeadline).Round(time.Millisecond), "locks", st.Held)
		}
		if err := d.Close(); err != nil {
			log.Warn("closing the etcd driver", "err", err)
		}
	}
}

func serve(c Config) error {
	log := newLogger(c)
	setMaxProcs(c)
	fencer := daemon.NewFencer()
	drv, err := newDriver(c, log, fencer)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	lockF, ln, err := inherited()
	if err != nil {
		return err
	}
	reloads, _ := strconv.Atoi(os.Getenv(envReloads))
	os.Unsetenv(envReloads)
	metrics := daemon.NewMetrics()
	dcfg := daemon.Config{
		Socket: c.Socket, SocketGroup: c.SocketGroup, StateDir: c.StateDir, Driver: drv, Host: c.Host,
		RequestTimeout: c.RequestTimeout.Duration, KillGrace: c.Revoke.Grace.Duration, KillCommand: c.Revoke.KillCommand,
		Logger: log, Version: version, Listener: ln, Metrics: metrics, Reloads: reloads, HierLevels: c.hierLevels(),
		HolderCommand: func() error {
			return lockholder.StartDetached(lockholder.Command(exe, "lock-holder", "--state-dir", c.StateDir))
		},
	}
	if isCluster(drv) {
		dcfg.Fencer = fencer
	}
	if dcfg.Libvirt, err = libvirtConfig(c); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Caught before New, which may take a while (it takes back every lock):
	// a SIGHUP meanwhile is a reload once we serve, not the default death.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	// The metrics address is taken first: a busy one fails the start
	// before New creates the socket and takes back the locks.
	var ml net.Listener
	if c.MetricsAddr != "" {
		if ml, err = net.Listen("tcp", c.MetricsAddr); err != nil {
			return fmt.Errorf("metrics_addr: %w", err)
		}
	}
	d, err := daemon.New(ctx, dcfg, lockF)
	if err != nil {
		if ml != nil {
			ml.Close()
		}
		return err
	}
	if ml != nil {
		go func() {
			srv := &http.Server{Handler: promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}), ReadHeaderTimeout: 5 * time.Second}
			_ = srv.Serve(ml)
		}()
	}
	go func() {
		<-hup
		d.Reload()
	}()
	err = d.Run(ctx)
	closeDriver(drv, log)
	if !errors.Is(err, daemon.ErrReload) {
		return err
	}
	return reexec(exe, d, reloads+1)
}

// inherited returns the state-directory lock and the listening socket handed
// over by the process image we replaced, or by systemd's socket activation.
func inherited() (*os.File, *net.UnixListener, error) {
	var lockF *os.File
	var ln *net.UnixListener
	if s := os.Getenv(envLockFD); s != "" {
		fd, err := strconv.Atoi(s)
		if err != nil {
			return nil, nil, fmt.Errorf("%s=%q: %w", envLockFD, s, err)
		}
		unix.CloseOnExec(fd)
		lockF = os.NewFile(uintptr(fd), "vmlockd.pid")
	}
	fd := -1
	if s := os.Getenv(envListenFD); s != "" {
		fd, _ = strconv.Atoi(s)
	} else if os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) && os.Getenv("LISTEN_FDS") != "" {
		fd = 3 // systemd socket activation: SD_LISTEN_FDS_START
	}
	os.Unsetenv(envLockFD)
	os.Unsetenv(envListenFD)
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	if fd >= 0 {
		f := os.NewFile(uintptr(fd), "listener")
		l, err := net.FileListener(f) // a duplicate: f is closed below
		f.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("inherited listener: %w", err)
		}
		ul, ok := l.(*net.UnixListener)
		if !ok {
			return nil, nil, errors.New("inherited listener is not a unix socket")
		}
		ln = ul
	}
	return lockF, ln, nil
}

// reexec replaces this process image with a fresh one of the same binary,
// handing over the listening socket and the state-directory lock. The pid
// stays the same, so systemd and the lock-holder see one daemon.
func reexec(exe string, d *daemon.Daemon, reloads int) error {
	lf, lockF, err := d.InheritedFiles()
	if err != nil {
		return err
	}
	for _, f := range []*os.File{lf, lockF} {
		if _, err := unix.FcntlInt(f.Fd(), unix.F_SETFD, 0); err != nil {
			return err
		}
	}
	env := append(os.Environ(),
		envListenFD+"="+strconv.Itoa(int(lf.Fd())),
		envLockFD+"="+strconv.Itoa(int(lockF.Fd())),
		envReloads+"="+strconv.Itoa(reloads))
	if lv := d.InheritedLibvirtListener(); lv != nil {
		if _, err := unix.FcntlInt(lv.Fd(), unix.F_SETFD, 0); err != nil {
			return err
		}
		env = append(env, envLibvirtFD+"="+strconv.Itoa(int(lv.Fd())))
	}
	return syscall.Exec(exe, os.Args, env)
}

// libvirtConfig returns the libvirt drop-in's configuration, with the
// listening socket inherited across a reload if there is one; nil if the
// drop-in is off. A socket inherited while the drop-in is now off is closed.
func libvirtConfig(c Config) (*daemon.LibvirtConfig, error) {
	s := os.Getenv(envLibvirtFD)
	os.Unsetenv(envLibvirtFD)
	var ln *net.UnixListener
	if s != "" {
		fd, err := strconv.Atoi(s)
		if err != nil {
			return nil, fmt.Errorf("%s=%q: %w", envLibvirtFD, s, err)
		}
		f := os.NewFile(uintptr(fd), "libvirt-listener")
		l, err := net.FileListener(f) // a duplicate: f is closed below
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("inherited libvirt listener: %w", err)
		}
		ul, ok := l.(*net.UnixListener)
		if !ok {
			l.Close()
			return nil, errors.New("inherited libvirt listener is not a unix socket")
		}
		ln = ul
	}
	if c.LibvirtSocket == "" {
		if ln != nil {
			ln.Close()
		}
		return nil, nil
	}
	if ln != nil && ln.Addr().String() != c.LibvirtSocket {
		ln.Close() // the configured path changed across the reload
		ln = nil
	}
	return &daemon.LibvirtConfig{Socket: c.LibvirtSocket, Listener: ln, Lockspaces: c.LibvirtLockspaceDirs}, nil
}
