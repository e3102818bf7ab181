package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func loadString(t *testing.T, s string) (Config, error) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vmlockd.toml")
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return loadConfig(p)
}

func TestEtcdSectionIsParsedAndValidatedStrictly(t *testing.T) {
	c, err := loadString(t, `driver = "etcd"
[etcd]
endpoints = ["https://e1:2379", "http://127.0.0.1:2379"]
prefix = "/vm/"
ttl = "6s"
fence_margin = "1500ms"
dial_timeout = "3s"
`)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Etcd.Endpoints) != 2 || c.Etcd.TTL.Duration != 6*time.Second || c.Etcd.FenceMargin.Duration != 1500*time.Millisecond ||
		c.Etcd.DialTimeout.Duration != 3*time.Second || c.Etcd.Prefix != "/vm/" {
		t.Fatalf("parsed %+v", c.Etcd)
	}
	cert := filepath.Join(t.TempDir(), "c.pem")
	os.WriteFile(cert, []byte("x"), 0o600)
	for _, bad := range []struct{ conf, want string }{
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\nttl_seconds = 5\n", "etcd.ttl_seconds"},
		{"driver = \"etcd\"\n", "etcd.endpoints"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"e1:2379\"]\n", "not an etcd client URL"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\ncert_file = \"" + cert + "\"\n", "go together"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\ncert_file = \"" + cert + "\"\nkey_file = \"/nonexistent/k.pem\"\n", "etcd.key_file"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\nttl = \"1s\"\n", "at least 2s"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\nttl = \"2500ms\"\n", "whole seconds"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\nfence_margin = \"6s\"\n", "at most half the TTL"},
		{"driver = \"etcd\"\n[etcd]\nendpoints = [\"http://e:2379\"]\nprefix = \"vm\"\n", "etcd.prefix"},
	} {
		if _, err := loadString(t, bad.conf); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("config %q: error %v, want one mentioning %q", bad.conf, err, bad.want)
		}
	}
}
