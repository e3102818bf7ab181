//go:build !race

// The race detector allocates on its own: these counts hold without it.

package virtlockd

import (
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// registerAllocs returns the allocations of a REGISTER of o on the
// connection c, which libvirt sends before every ACQUIRE and RELEASE.
func registerAllocs(t *testing.T, s *Server, c *conn, o Owner) float64 {
	t.Helper()
	msg, err := AppendCall(nil, 1, &RegisterArgs{Owner: o})
	if err != nil {
		t.Fatal(err)
	}
	h := decodeHeader(msg[4:MinMessageSize])
	payload := msg[MinMessageSize:]
	return testing.AllocsPerRun(100, func() {
		if rerr, _ := s.dispatch(t.Context(), c, h, payload); rerr != nil {
			t.Fatal(rerr)
		}
	})
}

// REGISTER, which libvirt sends before every ACQUIRE and RELEASE, waits on
// nothing: it is served without a deadline timer.
func TestRegisterIsCheap(t *testing.T) {
	s, err := NewServer(Config{Manager: lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})})
	if err != nil {
		t.Fatal(err)
	}
	c := &conn{peer: &Peer{}}
	if n := registerAllocs(t, s, c, owner("register", fakePID)); n > 12 {
		t.Fatalf("%v allocations per REGISTER, want at most 12", n)
	}
}
