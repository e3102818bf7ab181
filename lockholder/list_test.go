package lockholder

import (
	"context"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// A List that fails half-way (here on a malformed message) closes every
// descriptor it had received: nothing leaks into the daemon.
func TestListThatFailsLeaksNoDescriptor(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	c, err := newClient(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	before := openFDs(t)
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		buf := make([]byte, 64)
		if _, _, err := recvmsg(fds[1], buf, nil, 0); err != nil {
			return
		}
		msg, _ := encode(opEntry, "k", nil)
		_ = sendmsg(fds[1], msg, []*os.File{f, f})
		_ = sendmsg(fds[1], []byte{'E'}, []*os.File{f}) // too short to decode, with a descriptor
	}()
	_, err = c.List(context.Background())
	<-sent
	f.Close()
	before--
	if err == nil {
		t.Fatal("List of a malformed answer succeeded")
	}
	if after := openFDs(t); after > before {
		t.Fatalf("%d descriptors open after the failed List, %d before", after, before)
	}
}
