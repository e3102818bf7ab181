package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// Access of non-root clients to files.
//
// vmlockd runs as root, and a member of the socket group is not: yet the
// daemon opens the images a client names (direct leases), reads their
// headers (qemu-img info) and connects to its QEMU monitor. Unchecked, any
// group member could have root open any file of the host, and an open alone
// can have effects (a watchdog device starts counting down). So a non-root
// client may name only files it could use itself: read and write access for
// a disk it locks exclusively, read access for a shared or read-only one.
// Whether it could is the
// kernel's judgement, not vmlockd's: faccessat2 runs on a thread that has
// taken the client's file-system uid, gid and groups (mode bits, ACLs,
// search permission on every directory, read-only mounts, LSMs).
//
// What is checked is the canonical path (symlinks resolved). Drivers that
// open the image open that path without following symlinks (the lockspace
// driver uses RESOLVE_NO_SYMLINKS), so a symlink that a client swaps in
// between the check and the open makes the open fail instead of reaching
// another file. A directory renamed in between can only lead to files the
// client reaches through its own directories, which it could use anyway as
// long as protected_hardlinks is on (the default of every distribution).

// peerGroups returns the supplementary groups of the process that connected
// the socket fd, as of its connect (SO_PEERGROUPS, Linux 4.13).
func peerGroups(fd int) ([]uint32, error) {
	n := 32
	for {
		buf := make([]uint32, n)
		size := uint32(4 * n)
		_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		switch {
		case e == unix.ERANGE && int(size)/4 > n:
			n = int(size) / 4 // the kernel said how many there are
		case e != 0:
			return nil, fmt.Errorf("SO_PEERGROUPS: %w", e)
		default:
			return buf[:size/4], nil
		}
	}
}

// credential is the identity of a child that vmlockd runs on c's behalf
// (qemu-img reading c's images): nil, vmlockd's own, for root and for a
// caller of vmlockd's uid.
func (c caller) credential() *syscall.Credential {
	if c.root() || c.uid == os.Geteuid() {
		return nil
	}
	return &syscall.Credential{Uid: uint32(c.uid), Gid: uint32(c.gid), Groups: c.groups}
}

// processCaller is the file-system identity of process pid (fs uid, fs gid
// and supplementary groups, from /proc/PID/status): what vmlockd checks
// against for a QEMU whose images it locks as QEMU reports them, since any
// process of the VM's owner can speak QMP on its monitor.
func processCaller(pid int) (caller, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return caller{}, err
	}
	c := caller{uid: -1, gid: -1, pid: pid}
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		switch {
		case k == "Uid" && len(f) == 4: // real, effective, saved, fs
			c.uid, err = strconv.Atoi(f[3])
		case k == "Gid" && len(f) == 4:
			c.gid, err = strconv.Atoi(f[3])
		case k == "Groups":
			for _, g := range f {
				n, gerr := strconv.ParseUint(g, 10, 32)
				err = cmp.Or(err, gerr)
				c.groups = append(c.groups, uint32(n))
			}
		}
		if err != nil {
			return caller{}, fmt.Errorf("/proc/%d/status: %w", pid, err)
		}
	}
	if c.uid < 0 || c.gid < 0 {
		return caller{}, fmt.Errorf("/proc/%d/status: no Uid or Gid line", pid)
	}
	return c, nil
}

// mayUse checks that the non-root caller c could use the file of the disk
// resource r (already canonical) in r's mode: read and write it if
// exclusive, read it if shared or read-only. Root, and a caller of the
// daemon's own uid, may use any. A disk that does not exist yet needs write
// and search access to the deepest directory that does, where it would be
// created. Other resource types name no file of the host and need nothing.
func mayUse(ctx context.Context, c caller, r lockmgr.Resource) error {
	if r.Type != lockmgr.TypeDisk || c.root() || c.uid == os.Geteuid() {
		return nil
	}
	// A shared lock says "I read this, nobody may write it": a backing
	// file of many VMs' overlays, which their owners may only read.
	want, what := uint32(unix.R_OK), "read"
	if r.Mode == lockmgr.Exclusive {
		want, what = unix.R_OK|unix.W_OK, "read and write"
	}
	p := r.Name
	err := accessAs(ctx, c, p, want)
	for errors.Is(err, unix.ENOENT) && p != "/" {
		p = filepath.Dir(p)
		want, what = unix.W_OK|unix.X_OK, "create files in"
		err = accessAs(ctx, c, p, want)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errNoIdentity):
		// vmlockd's failure, not the client's: fail closed, and say so.
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM), errors.Is(err, unix.EROFS):
		return &lockmgr.Error{Code: lockmgr.CodePermission, Resource: r.String(),
			Msg: fmt.Sprintf("uid %d may not %s %s (vmlockd locks for a non-root client only what it could use itself): give uid %d that access, or lock it as root", c.uid, what, p, c.uid), Err: err}
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	}
	return &lockmgr.Error{Code: lockmgr.CodePermission, Resource: r.String(),
		Msg: fmt.Sprintf("cannot check whether uid %d may %s %s", c.uid, what, p), Err: err}
}

// errNoIdentity: vmlockd could not take a client's identity for a check
// (it lacks CAP_SETUID or CAP_SETGID).
var errNoIdentity = errors.New("vmlockd cannot take the identity of the client (it needs CAP_SETUID and CAP_SETGID)")

// accessAs runs faccessat2(path, mode, AT_EACCESS) with c's file-system
// identity (see asFSIdentity).
func accessAs(ctx context.Context, c caller, path string, mode uint32) error {
	return asFSIdentity(ctx, c, func() error {
		// faccessat2 itself, never x/sys's fallback for old kernels: it
		// emulates the check in user space with the process's ids, which
		// are root's.
		return unix.Faccessat2(unix.AT_FDCWD, path, mode, unix.AT_EACCESS)
	})
}

// asFSIdentity runs fn with c's file-system identity, so that the kernel
// judges fn's file operations as c's. fn runs on an OS thread of its own
// that takes c's fs uid, fs gid and groups (all three are per thread in the
// kernel, and x/sys sets them with plain system calls, not on every thread
// as package syscall does); the thread is never unlocked, so the Go runtime
// ends it with its goroutine and no other goroutine ever runs with c's
// identity. Changing the fs uid away from 0 drops the thread's file-system
// capabilities, so root's CAP_DAC_OVERRIDE does not leak into fn. A vmlockd
// without CAP_SETUID cannot take another identity: fn then does not run and
// the error wraps errNoIdentity. If ctx ends first, fn may still run to its
// end, unobserved.
func asFSIdentity(ctx context.Context, c caller, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // and never unlocked: see above
		done <- func() error {
			gids := make([]int, len(c.groups))
			for i, g := range c.groups {
				gids[i] = int(g)
			}
			if err := unix.Setgroups(gids); err != nil {
				return fmt.Errorf("%w: setgroups: %w", errNoIdentity, err)
			}
			unix.Setfsgid(c.gid)
			unix.Setfsuid(c.uid)
			// setfsuid and setfsgid report no error: ask back (an invalid
			// id, -1, changes nothing and returns the current one).
			if g, _ := unix.SetfsgidRetGid(-1); g != c.gid {
				return fmt.Errorf("%w: setfsgid(%d): still %d", errNoIdentity, c.gid, g)
			}
			if u, _ := unix.SetfsuidRetUid(-1); u != c.uid {
				return fmt.Errorf("%w: setfsuid(%d): still %d", errNoIdentity, c.uid, u)
			}
			return fn()
		}()
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err() // the thread ends on its own, after a hung file system
	}
}
