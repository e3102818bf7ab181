package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/hierlock"
)

// Config is vmlockd's configuration file (TOML). Every key is documented in
// docs/operations.md; an unknown key is an error, never ignored. Command-line
// flags override the file.
type Config struct {
	Socket         string   `toml:"socket"`
	SocketGroup    string   `toml:"socket_group"`
	StateDir       string   `toml:"state_dir"`
	Driver         string   `toml:"driver"`
	Host           string   `toml:"host"`
	MetricsAddr    string   `toml:"metrics_addr"`
	RequestTimeout Duration `toml:"request_timeout"`
	LogLevel       string   `toml:"log_level"`
	LogFormat      string   `toml:"log_format"`
	// MaxProcs is GOMAXPROCS for the daemon: 1 by default, 0 for Go's
	// default (every CPU). The GOMAXPROCS environment variable wins.
	MaxProcs *int `toml:"max_procs"`

	// LibvirtSocket, if set, serves virtlockd's protocol there for libvirt's
	// lockd plugin (libvirt uses /run/libvirt/virtlockd-sock); off if empty.
	LibvirtSocket string `toml:"libvirt_socket"`
	// LibvirtLockspaceDirs are lockspace directories served from the start
	// (qemu-lockd.conf's file_lockspace_dir and its lvm/scsi peers).
	LibvirtLockspaceDirs []string `toml:"libvirt_lockspace_dirs"`

	Revoke struct {
		Grace       Duration `toml:"grace"`
		KillCommand []string `toml:"kill_command"`
	} `toml:"revoke"`

	Lockspace struct {
		LeaseDir     string `toml:"lease_dir"`
		DiskLeaseDir string `toml:"disk_lease_dir"`
	} `toml:"lockspace"`

	Etcd EtcdConfig `toml:"etcd"` // the etcd driver (etcd.go)

	Hierlock struct {
		Levels []struct {
			Name       string   `toml:"name"`
			Modifiable bool     `toml:"modifiable"`
			Members    []string `toml:"members"`
		} `toml:"levels"`
	} `toml:"hierlock"`
}

// hierLevels returns the configured hierarchical lock levels, or nil for
// the defaults.
func (c *Config) hierLevels() []hierlock.LevelConfig {
	var out []hierlock.LevelConfig
	for _, l := range c.Hierlock.Levels {
		out = append(out, hierlock.LevelConfig{Name: l.Name, Modifiable: l.Modifiable, Members: l.Members})
	}
	return out
}

// Duration is a time.Duration written as "5s" in the file.
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	if v < 0 {
		return fmt.Errorf("negative duration %s", v)
	}
	d.Duration = v
	return nil
}

// defaults returns the configuration used without a file: paths under /run
// and /var/lib for root, under the user's runtime and state directories
// otherwise.
func defaults() Config {
	var c Config
	c.Driver = "lockspace"
	c.LogLevel = "info"
	c.LogFormat = "text"
	c.Socket = api.DefaultSocket() // where vmlock looks for it
	if os.Geteuid() == 0 {
		c.StateDir = "/var/lib/vmlock"
	} else {
		state := os.Getenv("XDG_STATE_HOME")
		if state == "" {
			home, _ := os.UserHomeDir()
			state = filepath.Join(home, ".local", "state")
		}
		c.StateDir = filepath.Join(state, "vmlock")
	}
	return c
}

// loadConfig reads path over the defaults and checks the result. Unknown
// keys are an error.
func loadConfig(path string) (Config, error) {
	c, err := readConfig(path)
	if err != nil {
		return c, err
	}
	return c, c.validate()
}

// readConfig reads path over the defaults, without checking the values (the
// command line may still override them). Unknown keys are an error.
func readConfig(path string) (Config, error) {
	c := defaults()
	if path == "" {
		return c, nil
	}
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		sort.Strings(keys)
		return c, fmt.Errorf("config %s: unknown key(s): %s (see docs/operations.md)", path, strings.Join(keys, ", "))
	}
	return c, nil
}

func (c *Config) validate() error {
	switch c.Driver {
	case "lockspace", "nop":
	case "etcd":
		if err := c.Etcd.validate(); err != nil {
			return err
		}
	default:
		return fmt.Errorf("driver %q: want lockspace, etcd or nop", c.Driver)
	}
	if _, err := c.logLevel(); err != nil {
		return fmt.Errorf("log_level %q: want debug, info, warn or error", c.LogLevel)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return fmt.Errorf("log_format %q: want text or json", c.LogFormat)
	}
	if c.MaxProcs != nil && *c.MaxProcs < 0 {
		return fmt.Errorf("max_procs %d: want 0 (every CPU) or more", *c.MaxProcs)
	}
	if g := c.Revoke.Grace.Duration; g > api.MaxGrace {
		return fmt.Errorf("revoke.grace %v: want at most %v", g, api.MaxGrace)
	}
	if c.StateDir == "" || !filepath.IsAbs(c.StateDir) {
		return errors.New("state_dir must be an absolute path")
	}
	if c.Socket == "" {
		return errors.New("socket must not be empty")
	}
	if _, err := hierlock.NewManager(hierlock.Config{Levels: c.hierLevels()}); err != nil {
		return fmt.Errorf("hierlock.levels: %w", err)
	}
	if len(c.Socket) >= 108 {
		return fmt.Errorf("socket path %q is too long for a unix socket (at most 107 bytes)", c.Socket)
	}
	return c.validateLibvirt()
}

func (c *Config) validateLibvirt() error {
	if c.LibvirtSocket != "" && (!filepath.IsAbs(c.LibvirtSocket) || len(c.LibvirtSocket) >= 108) {
		return fmt.Errorf("libvirt_socket %q: want an absolute path of at most 107 bytes (libvirt uses /run/libvirt/virtlockd-sock)", c.LibvirtSocket)
	}
	for _, d := range c.LibvirtLockspaceDirs {
		if !filepath.IsAbs(d) {
			return fmt.Errorf("libvirt_lockspace_dirs: %q is not an absolute path", d)
		}
	}
	if len(c.LibvirtLockspaceDirs) > 0 && c.LibvirtSocket == "" {
		return errors.New("libvirt_lockspace_dirs is set but libvirt_socket is not: the libvirt drop-in is off")
	}
	return nil
}

// logLevel parses log_level as log/slog does (case-insensitive, "warn+1"
// too).
func (c *Config) logLevel() (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(c.LogLevel))
	return l, err
}
