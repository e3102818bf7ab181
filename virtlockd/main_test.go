package virtlockd

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"testing"
	"time"
)

// The environment variables that make the test binary a helper process.
const (
	envChild  = "VIRTLOCKD_TEST_CHILD"
	envSocket = "VIRTLOCKD_TEST_SOCKET"
	envUUID   = "VIRTLOCKD_TEST_UUID"
	// envEarlier, if set, is the uuid of an owner that "owner" registers
	// first, before the one of envUUID (a second REGISTER overwrites it).
	envEarlier = "VIRTLOCKD_TEST_EARLIER_UUID"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(envChild); mode != "" {
		os.Exit(childMain(mode))
	}
	os.Exit(m.Run())
}

// Exit statuses of the helper process.
const (
	childOK       = 0
	childRefused  = 3 // the daemon closed the connection
	childFailed   = 4
	childBadUsage = 5
)

// childMain runs a helper process:
//   - "owner": connection A of a domain whose QEMU is this process. It
//     registers an owner whose pid is its own (after another one of that
//     pid, if envEarlier is set), restricts the connection,
//     prints "ready", then obeys stdin: "close" closes the connection and
//     prints "closed"; end of input exits (which closes the connection).
//   - "nobody": switches to uid/gid 65534, connects and tries to register.
func childMain(mode string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sock := os.Getenv(envSocket)
	switch mode {
	case "owner":
		var uuid [16]byte
		if _, err := hex.Decode(uuid[:], []byte(os.Getenv(envUUID))); err != nil {
			return childBadUsage
		}
		c, err := Dial(ctx, sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return childFailed
		}
		if e := os.Getenv(envEarlier); e != "" {
			var earlier [16]byte
			if _, err := hex.Decode(earlier[:], []byte(e)); err != nil {
				return childBadUsage
			}
			if err := c.Register(ctx, Owner{UUID: earlier, Name: "child-vm-earlier", ID: 6, PID: uint32(os.Getpid())}, 0); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return childFailed
			}
		}
		owner := Owner{UUID: uuid, Name: "child-vm", ID: 7, PID: uint32(os.Getpid())}
		if err := c.Register(ctx, owner, 0); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return childFailed
		}
		if err := c.Restrict(ctx, 0); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return childFailed
		}
		fmt.Println("ready")
		in := bufio.NewScanner(os.Stdin)
		for in.Scan() {
			if in.Text() == "close" {
				c.Close()
				fmt.Println("closed")
			}
		}
		return childOK
	case "nobody":
		if err := syscall.Setgid(65534); err != nil {
			return childBadUsage
		}
		if err := syscall.Setuid(65534); err != nil {
			return childBadUsage
		}
		c, err := Dial(ctx, sock)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return childFailed
		}
		err = c.Register(ctx, Owner{UUID: [16]byte{1}, Name: "x", ID: 1, PID: 1}, 0)
		switch {
		case err == nil:
			return childOK
		case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
			return childRefused
		}
		fmt.Fprintln(os.Stderr, err)
		return childFailed
	}
	return childBadUsage
}
