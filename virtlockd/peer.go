package virtlockd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Peer is the process at the other end of a connection, as SO_PEERCRED
// recorded it when it connected. The server pins it with a pidfd taken at
// accept time (SO_PEERPIDFD, or pidfd_open on kernels before 6.5), so that
// signals and exit notifications reach that process and never another one
// that reused its pid.
type Peer struct {
	PID int // 0 if the peer is in a pid namespace where it has no pid here
	UID int
	GID int

	pidfd *os.File // nil if none could be had
	gone  bool     // the process had exited before the connection was accepted
}

// peerOf reads the credentials of a unix socket's peer and pins its process.
func peerOf(nc net.Conn) (*Peer, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("peer credentials: %T is not a unix socket", nc)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	pidfd, pidfdErr := -1, error(nil)
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil && cred.Pid > 0 {
			pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		}
	}); err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return nil, fmt.Errorf("peer credentials: SO_PEERCRED: %w", credErr)
	}
	p := &Peer{PID: int(cred.Pid), UID: int(cred.Uid), GID: int(cred.Gid)}
	if p.PID <= 0 {
		return p, nil
	}
	if pidfdErr != nil { // kernels before 6.5
		pidfd, pidfdErr = unix.PidfdOpen(p.PID, 0)
		if errors.Is(pidfdErr, unix.ESRCH) {
			p.gone = true
			return p, nil
		}
		if pidfdErr != nil {
			return p, nil // no pidfd: Signal and Wait fall back to the pid number
		}
	}
	// Non-blocking, so that os.NewFile registers it with the runtime poller
	// and Wait sleeps in the poller instead of a thread.
	if err := unix.SetNonblock(pidfd, true); err != nil {
		unix.Close(pidfd)
		return p, nil
	}
	p.pidfd = os.NewFile(uintptr(pidfd), fmt.Sprintf("pidfd:%d", p.PID))
	return p, nil
}

// Signal sends sig to the peer process. A process that has exited already is
// not an error. Without a pidfd (kernels before 5.3) it falls back to
// kill(2) on the pid number.
func (p *Peer) Signal(sig unix.Signal) error {
	if p.gone || p.PID <= 0 {
		return nil
	}
	var err error
	if p.pidfd != nil {
		raw, rerr := p.pidfd.SyscallConn()
		if rerr != nil {
			return fmt.Errorf("signal %v to pid %d: %w", sig, p.PID, rerr)
		}
		if cerr := raw.Control(func(fd uintptr) { err = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); cerr != nil {
			return fmt.Errorf("signal %v to pid %d: %w", sig, p.PID, cerr)
		}
	} else {
		err = unix.Kill(p.PID, sig)
	}
	if err == nil || errors.Is(err, unix.ESRCH) {
		return nil
	}
	return fmt.Errorf("signal %v to pid %d: %w", sig, p.PID, err)
}

// Exited reports whether the peer process has exited, without waiting.
func (p *Peer) Exited() bool {
	if p.gone || p.PID <= 0 {
		return true
	}
	if p.pidfd == nil {
		return errors.Is(unix.Kill(p.PID, 0), unix.ESRCH)
	}
	raw, err := p.pidfd.SyscallConn()
	if err != nil {
		return false
	}
	var exited bool
	_ = raw.Control(func(fd uintptr) { exited = pidfdReadable(fd) })
	return exited
}

func pidfdReadable(fd uintptr) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil && n > 0
	}
}

// Wait returns nil once the peer process has exited, or the context's error.
func (p *Peer) Wait(ctx context.Context) error {
	if p.gone || p.PID <= 0 {
		return nil
	}
	if p.pidfd == nil {
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for !errors.Is(unix.Kill(p.PID, 0), unix.ESRCH) {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-t.C:
			}
		}
		return nil
	}
	raw, err := p.pidfd.SyscallConn()
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = p.pidfd.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	err = raw.Read(pidfdReadable) // the poller waits until the pidfd is readable: the process exited
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// Close releases the pidfd.
func (p *Peer) Close() {
	if p.pidfd != nil {
		_ = p.pidfd.Close()
	}
}

// processAlive reports whether a process with this pid exists. It is used
// only to decide whether a previous owner's leases are stale; a reused pid
// makes it answer true, which errs on the safe side.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	return !errors.Is(unix.Kill(pid, 0), unix.ESRCH)
}
