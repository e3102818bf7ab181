package main

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmlockd.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigFileIsReadWhole(t *testing.T) {
	c, err := loadConfig(writeConfig(t, `
socket = "/run/x/vmlockd.sock"
socket_group = "kvm"
state_dir = "/var/lib/x"
driver = "nop"
host = "h1"
request_timeout = "3s"
max_procs = 2
[revoke]
grace = "2s"
kill_command = ["virsh", "destroy", "{uuid}"]
[lockspace]
lease_dir = "/srv/leases"
disk_lease_dir = "/srv/leases/disks"
[[hierlock.levels]]
name = "cluster"
members = ["BGL"]
[[hierlock.levels]]
name = "vm"
modifiable = true
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/run/x/vmlockd.sock" || c.SocketGroup != "kvm" || c.Driver != "nop" || c.Host != "h1" ||
		c.RequestTimeout.Duration != 3*time.Second || c.Revoke.Grace.Duration != 2*time.Second ||
		len(c.Revoke.KillCommand) != 3 || c.Lockspace.DiskLeaseDir != "/srv/leases/disks" || c.MaxProcs == nil || *c.MaxProcs != 2 {
		t.Fatalf("config = %+v", c)
	}
	levels := c.hierLevels()
	if len(levels) != 2 || levels[1].Name != "vm" || !levels[1].Modifiable || levels[0].Members[0] != "BGL" {
		t.Fatalf("levels = %+v", levels)
	}
}

func TestConfigErrorsNameTheProblem(t *testing.T) {
	cases := []struct{ name, body, want string }{
		{"unknown key", `sockett = "/x"`, "unknown key(s): sockett"},
		{"unknown nested key", "[revoke]\ngrase = \"1s\"", "revoke.grase"},
		{"unknown driver", `driver = "zookeeper"`, `driver "zookeeper"`},
		{"relative state dir", `state_dir = "var/lib"`, "state_dir must be an absolute path"},
		{"bad duration", `request_timeout = "soon"`, "soon"},
		{"negative duration", "[revoke]\ngrace = \"-1s\"", "negative"},
		{"grace too long", "[revoke]\ngrace = \"2h\"", "revoke.grace 2h0m0s: want at most 1h0m0s"},
		{"long socket path", `socket = "/` + strings.Repeat("s", 120) + `"`, "too long for a unix socket"},
		{"bad levels", "[[hierlock.levels]]\nname = \"a/b\"", "hierlock.levels"},
		{"not TOML", "socket = ", "vmlockd.toml"},
		{"negative max_procs", "max_procs = -1", "max_procs -1"},
		{"unknown log level", `log_level = "verbose"`, `log_level "verbose"`},
		{"unknown log format", `log_format = "xml"`, `log_format "xml"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := loadConfig(writeConfig(t, c.body))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("loadConfig: %v, want an error mentioning %q", err, c.want)
			}
		})
	}
}

func TestMaxProcsDefaultsToOneAndYieldsToTheEnvironment(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	zero, three := 0, 3
	cases := []struct {
		name string
		env  string
		keep *int
		want int
	}{
		{"default", "", nil, 1},
		{"every CPU", "", &zero, runtime.NumCPU()},
		{"three", "", &three, 3},
		{"environment wins", "5", &three, 7}, // left as it was
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("GOMAXPROCS", c.env)
			runtime.GOMAXPROCS(7)
			setMaxProcs(Config{MaxProcs: c.keep})
			if got := runtime.GOMAXPROCS(0); got != c.want {
				t.Fatalf("GOMAXPROCS = %d, want %d", got, c.want)
			}
		})
	}
}

// Flags override the file, and the result is checked as a whole: a flag can
// correct a value of the file, and a bad flag is refused like a bad key.
func TestFlagsOverrideTheFileBeforeItIsChecked(t *testing.T) {
	path := writeConfig(t, "state_dir = \"relative\"\nlog_level = \"debug\"\n")
	cases := []struct {
		args []string
		want string // an error mentioning this, or none
	}{
		{[]string{"--config", path, "--state-dir", "/var/lib/y"}, ""},
		{[]string{"--config", path}, "state_dir must be an absolute path"},
		{[]string{"--state-dir", "/var/lib/y", "--log-level", "loud"}, `log_level "loud"`},
	}
	for _, c := range cases {
		cmd := newRootCmd()
		if err := cmd.ParseFlags(c.args); err != nil {
			t.Fatal(err)
		}
		cfg, err := configure(cmd)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("%q: %v", c.args, err)
		case c.want == "" && (cfg.StateDir != "/var/lib/y" || cfg.LogLevel != "debug"):
			t.Errorf("%q: state_dir %q, log_level %q; want the flag's and the file's", c.args, cfg.StateDir, cfg.LogLevel)
		case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
			t.Errorf("%q: %v, want an error mentioning %q", c.args, err, c.want)
		}
	}
}

// A flag whose value has a default says which, since the flags' own
// defaults are empty (an empty flag leaves the file's value alone).
func TestFlagHelpNamesTheDefaults(t *testing.T) {
	d := defaults()
	for flag, want := range map[string][]string{
		"driver":    {d.Driver + " (default)"},
		"log-level": {d.LogLevel + " (default)"},
		"socket":    {"/run/vmlock/vmlockd.sock as root", "$XDG_RUNTIME_DIR/vmlock/vmlockd.sock otherwise"},
		"state-dir": {"/var/lib/vmlock as root", "$XDG_STATE_HOME/vmlock otherwise"},
	} {
		usage := newRootCmd().Flags().Lookup(flag).Usage
		for _, w := range want {
			if !strings.Contains(usage, w) {
				t.Errorf("--%s help %q does not say %q", flag, usage, w)
			}
		}
	}
}
