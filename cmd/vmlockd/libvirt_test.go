package main

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestLibvirtKeysAreParsedAndValidated(t *testing.T) {
	c, err := loadString(t, `libvirt_socket = "/run/libvirt/virtlockd-sock"
libvirt_lockspace_dirs = ["/var/lib/libvirt/lockd/files"]
`)
	if err != nil {
		t.Fatal(err)
	}
	if c.LibvirtSocket != "/run/libvirt/virtlockd-sock" || len(c.LibvirtLockspaceDirs) != 1 {
		t.Fatalf("parsed %q %q", c.LibvirtSocket, c.LibvirtLockspaceDirs)
	}
	lc, err := libvirtConfig(c)
	if err != nil || lc == nil || lc.Socket != c.LibvirtSocket || lc.Lockspaces[0] != "/var/lib/libvirt/lockd/files" || lc.Listener != nil {
		t.Fatalf("libvirtConfig = %+v, %v", lc, err)
	}
	if lc, err := libvirtConfig(defaults()); lc != nil || err != nil {
		t.Fatalf("libvirtConfig without libvirt_socket = %+v, %v; want the drop-in off", lc, err)
	}
	for _, bad := range []struct{ conf, want string }{
		{`libvirt_socket = "run/virtlockd-sock"`, "libvirt_socket"},
		{`libvirt_socket = "/` + strings.Repeat("x", 120) + `"`, "at most 107 bytes"},
		{"libvirt_socket = \"/run/libvirt/virtlockd-sock\"\nlibvirt_lockspace_dirs = [\"files\"]\n", "not an absolute path"},
		{"libvirt_lockspace_dirs = [\"/var/lib/libvirt/lockd/files\"]\n", "libvirt_socket is not"},
		{"libvirt_sock = \"/run/libvirt/virtlockd-sock\"\n", "libvirt_sock"},
	} {
		if _, err := loadString(t, bad.conf); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("config %q: error %v, want one mentioning %q", bad.conf, err, bad.want)
		}
	}
}

func TestInheritedLibvirtListenerIsTakenOverOrClosed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "virtlockd-sock")
	inherit := func() {
		t.Helper()
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		f, err := l.File()
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
		t.Setenv(envLibvirtFD, strconv.Itoa(int(f.Fd())))
		t.Cleanup(func() { f.Close() })
	}
	inherit()
	c := defaults()
	c.LibvirtSocket = path
	lc, err := libvirtConfig(c)
	if err != nil || lc.Listener == nil || lc.Listener.Addr().String() != path {
		t.Fatalf("libvirtConfig with an inherited socket = %+v, %v; want it taken over", lc, err)
	}
	if os.Getenv(envLibvirtFD) != "" {
		t.Fatalf("%s is still set", envLibvirtFD)
	}
	lc.Listener.Close()

	// The drop-in was turned off across the reload: the socket is closed.
	os.Remove(path)
	inherit()
	if lc, err := libvirtConfig(defaults()); lc != nil || err != nil {
		t.Fatalf("libvirtConfig, drop-in off, socket inherited = %+v, %v", lc, err)
	}
}
