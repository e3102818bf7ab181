package api

import (
	"testing"
)

// The client looks where the daemon listens by default, for root and for
// other users with or without XDG_RUNTIME_DIR (vmlockd uses DefaultSocket).
func TestDefaultSocket(t *testing.T) {
	cases := []struct {
		euid int
		env  map[string]string
		want string
	}{
		{0, map[string]string{"XDG_RUNTIME_DIR": "/run/user/0"}, "/run/vmlock/vmlockd.sock"},
		{1000, map[string]string{"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/vmlock/vmlockd.sock"},
		{1000, nil, "/tmp/vmlock-1000/vmlock/vmlockd.sock"},
		{1000, map[string]string{"TMPDIR": "/var/tmp"}, "/var/tmp/vmlock-1000/vmlock/vmlockd.sock"},
	}
	for _, c := range cases {
		if got := defaultSocket(c.euid, func(k string) string { return c.env[k] }); got != c.want {
			t.Errorf("defaultSocket(%d, %v) = %q, want %q", c.euid, c.env, got, c.want)
		}
	}
}
