package lockholder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Serve runs the holder for stateDir until its controller has gone and it
// holds nothing, or ctx is done. It refuses to run (returning an error)
// while another holder serves the same directory.
func Serve(ctx context.Context, stateDir string) error {
	lock, err := os.OpenFile(filepath.Join(stateDir, LockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("lockholder: another lock-holder serves %s: %w", stateDir, err)
	}
	path := filepath.Join(stateDir, SocketName)
	_ = os.Remove(path) // stale: we hold the holder lock, so no holder listens there
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: path}); err != nil {
		return fmt.Errorf("lockholder: bind %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return err
	}
	if err := unix.Listen(lfd, 8); err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		unix.Shutdown(lfd, unix.SHUT_RDWR)
	}()
	h := &holder{entries: make(map[string]*Entry)}
	for {
		cfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
				continue
			}
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		// Only vmlockd (same uid as this process, which it started) may
		// control the holder.
		if cred, err := unix.GetsockoptUcred(cfd, unix.SOL_SOCKET, unix.SO_PEERCRED); err != nil || int(cred.Uid) != os.Geteuid() {
			unix.Close(cfd)
			continue
		}
		h.serve(cfd)
		unix.Close(cfd)
		if len(h.entries) == 0 {
			os.Remove(path)
			return nil
		}
	}
}

type holder struct {
	entries map[string]*Entry
}

func (h *holder) serve(fd int) {
	buf := make([]byte, maxMsg)
	oob := make([]byte, oobSize)
	for {
		msg, files, err := recvmsg(fd, buf, oob)
		if err != nil {
			return
		}
		op, key, meta, err := decode(msg)
		if err != nil {
			closeAll(files)
			return
		}
		switch op {
		case opPut:
			h.drop(key)
			h.entries[key] = &Entry{Key: key, Meta: append([]byte(nil), meta...), Files: files}
			continue
		case opDrop:
			h.drop(key)
		case opDropPrefix:
			for k := range h.entries {
				if strings.HasPrefix(k, key) {
					h.drop(k)
				}
			}
		case opList:
			if err := h.list(fd); err != nil {
				return
			}
		default:
			closeAll(files)
			return
		}
		closeAll(files) // only a put carries descriptors
	}
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

func (h *holder) drop(key string) {
	if e := h.entries[key]; e != nil {
		e.Close()
		delete(h.entries, key)
	}
}

func (h *holder) list(fd int) error {
	for _, e := range h.entries {
		msg, err := encode(opEntry, e.Key, e.Meta)
		if err != nil {
			return err
		}
		if err := sendmsg(fd, msg, e.Files); err != nil {
			return err
		}
	}
	msg, _ := encode(opEnd, "", nil)
	return sendmsg(fd, msg, nil)
}
