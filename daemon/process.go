package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// process is a live process pinned by a pidfd: signals and exit detection go
// to the process that was meant even if its pid number is reused.
type process struct {
	pid   int
	start uint64   // start time in clock ticks since boot (/proc/PID/stat field 22)
	file  *os.File // the pidfd, registered with the runtime's poller
	done  chan struct{}
	// dead is set before done is closed if the process really exited; done
	// also closes when we stop watching (close), and that must never be
	// taken for an exit, or a reload would release every lock.
	dead bool
}

// openProcess pins pid. If start is non-zero (a record from before a
// restart) the process must still have that start time, otherwise the pid
// now names another process and errGone is returned. errGone means that
// the process is known to be gone; any other error says nothing about it
// (restore then keeps its owner's locks).
func openProcess(pid int, start uint64) (*process, error) {
	if pid <= 0 {
		return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "pid %d: locks are owned by a process, give its pid", pid)
	}
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, errGone
		}
		return nil, fmt.Errorf("pidfd_open(%d): %w", pid, err)
	}
	return pinned(os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid)), pid, start, startTime)
}

// pinned is openProcess once pidfd f pins pid: readStart reads its start
// time. f is closed on failure.
func pinned(f *os.File, pid int, start uint64, readStart func(pid int) (uint64, error)) (*process, error) {
	// The pidfd pins the process, so the start time read now is its own.
	got, err := readStart(pid)
	if err != nil {
		// It may have exited (and been reaped) since it was pinned;
		// otherwise /proc could not be read (EMFILE, EACCES, hidepid=).
		var serr error
		if rc, cerr := f.SyscallConn(); cerr != nil {
			serr = cerr
		} else if cerr := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), 0, nil, 0) }); cerr != nil {
			serr = cerr
		}
		f.Close()
		if errors.Is(serr, unix.ESRCH) {
			return nil, errGone
		}
		return nil, fmt.Errorf("process %d: reading its start time: %w", pid, err)
	}
	if start != 0 && got != start {
		f.Close()
		return nil, errGone
	}
	p := &process{pid: pid, start: got, file: f, done: make(chan struct{})}
	go p.wait()
	return p, nil
}

var errGone = errors.New("process is gone")

// wait closes done when the process exits. A pidfd becomes readable when
// its process exits; the runtime poller tells us without a thread per pid.
// The poller's edge-triggered readiness is reset before each check, so an
// exit that came before this goroutine first ran (it may start late on a
// busy host) is seen by asking the pidfd itself (poll, no wait), never by
// waiting for an edge that has passed.
func (p *process) wait() {
	defer close(p.done)
	rc, err := p.file.SyscallConn()
	if err != nil {
		return
	}
	err = rc.Read(func(fd uintptr) bool {
		n, perr := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return perr == nil && n > 0 // else: wait for readability
	})
	p.dead = err == nil
}

// signal sends sig to the process (not to whatever now has its pid).
func (p *process) signal(sig syscall.Signal) error {
	rc, err := p.file.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return err
	}
	if errors.Is(serr, unix.ESRCH) {
		return nil // already exited
	}
	return serr
}

// alive reports whether the process still runs (or is a zombie not yet
// reaped: its pid is still its own either way).
func (p *process) alive() bool {
	rc, err := p.file.SyscallConn()
	if err != nil {
		return false
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), 0, nil, 0) }); err != nil {
		return false
	}
	return serr == nil
}

// waitExit waits for the process to exit or ctx to end.
func (p *process) waitExit(ctx context.Context) error {
	select {
	case <-p.done:
		if !p.dead {
			return errors.New("no longer watching the process")
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *process) close() { p.file.Close() }

// startTime reads a process's start time from /proc/PID/stat.
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces and parentheses: fields
	// are counted from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command field", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field 22 is f[19].
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// procIDs returns the real uid, and the primary and supplementary gids, of
// a process.
func procIDs(pid int) (uid int, gids []int, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, nil, err
	}
	uid = -1
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		switch k {
		case "Uid":
			if len(f) > 0 {
				uid, _ = strconv.Atoi(f[0])
			}
		case "Gid":
			if len(f) > 0 {
				g, _ := strconv.Atoi(f[0])
				gids = append(gids, g)
			}
		case "Groups":
			for _, s := range f {
				g, _ := strconv.Atoi(s)
				gids = append(gids, g)
			}
		}
	}
	if uid < 0 {
		return 0, nil, fmt.Errorf("/proc/%d/status: no Uid line", pid)
	}
	return uid, gids, nil
}
