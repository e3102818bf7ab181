package main

import (
	"os"
	"path/filepath"
	"testing"
)

// Whatever the configuration file holds, loading it gives a configuration
// or an error, never a panic at the daemon's start; and a file that loads
// loads the same again.
func FuzzConfig(f *testing.F) {
	for _, s := range []string{
		"socket = \"/run/x.sock\"\nstate_dir = \"/var/lib/x\"\ndriver = \"nop\"\nrequest_timeout = \"3s\"\nmax_procs = 2\n" +
			"[revoke]\ngrace = \"2s\"\nkill_command = [\"virsh\", \"destroy\", \"{uuid}\"]\n" +
			"[[hierlock.levels]]\nname = \"cluster\"\nmembers = [\"BGL\"]\n[[hierlock.levels]]\nname = \"vm\"\nmodifiable = true\n",
		"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nttl = \"10s\"\n",
		"libvirt_socket = \"/run/libvirt/virtlockd-sock\"\nlibvirt_lockspace_dirs = [\"/var/lib/libvirt/lockd/files\"]\n",
		"max_procs = -1\nrevoke.grace = \"-1s\"\n",
		"[[hierlock.levels]]\n[[hierlock.levels]]\nname = \"\"\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		p := filepath.Join(t.TempDir(), "vmlockd.toml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := loadConfig(p)
		if err != nil {
			return
		}
		again, err := loadConfig(p)
		if err != nil {
			t.Fatalf("%q loads, then fails: %v", body, err)
		}
		if c.Socket != again.Socket || c.StateDir != again.StateDir || c.Driver != again.Driver {
			t.Fatalf("%q loads as %+v, then as %+v", body, c, again)
		}
	})
}
