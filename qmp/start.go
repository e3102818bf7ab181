package qmp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// MonitorChardevID is the chardev id Start gives the QMP monitor it adds
// to QEMU's command line; the caller's own arguments must not use it.
const MonitorChardevID = "vmlock-qmp"

// Start starts cmd, a QEMU system emulator command that has not been
// started yet, with an extra QMP monitor on one end of a socketpair that
// QEMU inherits, and returns a Client connected to that monitor after the
// handshake. No socket path is involved, so path length limits and stale
// sockets do not arise.
//
// Start appends the other end of the socketpair to cmd.ExtraFiles and
// "-chardev socket,id=vmlock-qmp,fd=N -mon chardev=vmlock-qmp,mode=control"
// to cmd.Args. If cmd.Stderr is nil, Start sets it to a small buffer
// keeping the last 4 KiB of QEMU's standard error, which is quoted in the
// error if QEMU exits before the handshake completes.
//
// ctx bounds the handshake only, not QEMU's lifetime; the caller owns the
// started process and must Wait for it. If Start fails after QEMU was
// started, it kills QEMU and waits for it before returning.
func Start(ctx context.Context, cmd *exec.Cmd, opts ...Option) (*Client, error) {
	if cmd.Process != nil {
		return nil, errors.New("qmp: Start: command already started")
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("qmp: Start: socketpair: %w", os.NewSyscallError("socketpair", err))
	}
	ours := os.NewFile(uintptr(fds[0]), "qmp")
	theirs := os.NewFile(uintptr(fds[1]), "qmp-qemu")
	defer ours.Close()
	conn, err := net.FileConn(ours) // dups the fd
	if err != nil {
		theirs.Close()
		return nil, fmt.Errorf("qmp: Start: %w", err)
	}

	fd := 3 + len(cmd.ExtraFiles)
	cmd.ExtraFiles = append(cmd.ExtraFiles, theirs)
	cmd.Args = append(cmd.Args,
		"-chardev", fmt.Sprintf("socket,id=%s,fd=%d", MonitorChardevID, fd),
		"-mon", "chardev="+MonitorChardevID+",mode=control")
	var stderr *tailBuffer
	if cmd.Stderr == nil {
		stderr = &tailBuffer{max: 4 << 10}
		cmd.Stderr = stderr
	}
	err = cmd.Start()
	theirs.Close() // QEMU has its copy
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: starting %s: %w", cmd.Path, err)
	}
	c, err := New(ctx, conn, opts...)
	if err != nil {
		cmd.Process.Kill()
		werr := cmd.Wait()
		msg := ""
		if stderr != nil {
			if s := strings.TrimSpace(stderr.String()); s != "" {
				msg = " (stderr: " + s + ")"
			}
		}
		if werr != nil {
			msg += " (" + werr.Error() + ")"
		}
		return nil, fmt.Errorf("qmp: starting %s%s: %w", cmd.Path, msg, err)
	}
	return c, nil
}

// StartQEMU runs binary (e.g. "qemu-system-x86_64") with args plus a QMP
// monitor, as Start does, and returns the connected client and the running
// command. The caller must Close the client and Wait for the command.
func StartQEMU(ctx context.Context, binary string, args []string, opts ...Option) (*Client, *exec.Cmd, error) {
	cmd := exec.Command(binary, args...)
	c, err := Start(ctx, cmd, opts...)
	if err != nil {
		return nil, nil, err
	}
	return c, cmd, nil
}

// tailBuffer is an io.Writer that keeps the last max bytes written.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = bytes.Clone(t.buf[over:])
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}
