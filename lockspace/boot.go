package lockspace

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// Host crashes.
//
// Tokens and records go to the page cache, unsynced: a sync per grant
// would cost more than the grant. A crash of the host can therefore take
// back the last grants made before it: a record comes back older than it
// was. Two rules keep fencing tokens meaningful across that.
//
//   - Epochs. StateDir/boot records the boot of the host (its boot_id) in
//     which a Driver last started, and a counter, the epoch, raised (and
//     synced) when a Driver first starts in a new boot. A grant in epoch e
//     takes a token above e<<epochShift, so the tokens this host grants
//     after a reboot are greater than any it granted before, whatever the
//     crash took back.
//   - Trust. Close syncs the file systems the Driver writes to and records
//     that the epoch ended cleanly. A new boot that finds the last epoch
//     not ended so knows the host went down with writes that may be lost:
//     every record of that epoch or an earlier one may have lost a later
//     grant, so a state string whose token matches such a record on a
//     local file system is refused as stale (a conservative error, never a
//     false grant). Records on network file systems are another host's as
//     much as this one's, and such file systems flush on unlock; they are
//     trusted as before.
//
// StateDir/boot is one line, replaced whole (written to a temporary file,
// synced, renamed):
//
//	vmlock.boot.v1 BOOT_ID EPOCH TRUST_FROM running|clean

// epochShift places the epoch above the counts of grants: 2^40 grants of
// one resource in one boot would be needed to reach the next epoch.
const epochShift = 40

const (
	bootFileName = "boot"
	bootMagic    = "vmlock.boot.v1"
)

// bootState is the content of StateDir/boot.
type bootState struct {
	bootID    string // the boot of the host of the last start
	epoch     uint64
	trustFrom uint64 // records of an earlier epoch, on local file systems, may have lost grants
	clean     bool   // the epoch ended with Close: everything written was synced
}

func (s bootState) String() string {
	run := "running"
	if s.clean {
		run = "clean"
	}
	return fmt.Sprintf("%s %s %d %d %s\n", bootMagic, s.bootID, s.epoch, s.trustFrom, run)
}

// parseBootState decodes StateDir/boot; any deviation is an error.
func parseBootState(b []byte) (bootState, error) {
	f := strings.Fields(string(b))
	if len(f) != 5 || f[0] != bootMagic {
		return bootState{}, errors.New("not one line " + bootMagic + " BOOT_ID EPOCH TRUST_FROM running|clean")
	}
	s := bootState{bootID: f[1], clean: f[4] == "clean"}
	var err error
	if s.epoch, err = strconv.ParseUint(f[2], 10, 64); err != nil {
		return bootState{}, fmt.Errorf("epoch: %w", err)
	}
	if s.trustFrom, err = strconv.ParseUint(f[3], 10, 64); err != nil {
		return bootState{}, fmt.Errorf("trust-from epoch: %w", err)
	}
	switch {
	case !validBootID(s.bootID):
		return bootState{}, fmt.Errorf("boot id %q", s.bootID)
	case f[4] != "clean" && f[4] != "running":
		return bootState{}, fmt.Errorf("state %q, want running or clean", f[4])
	case s.trustFrom > s.epoch:
		return bootState{}, fmt.Errorf("trust-from epoch %d is after epoch %d", s.trustFrom, s.epoch)
	case s.epoch >= 1<<(64-epochShift)-1:
		return bootState{}, fmt.Errorf("epoch %d is too large", s.epoch)
	case s.String() != string(b):
		return bootState{}, errors.New("not written by vmlock (spaces or numbers not as vmlock writes them)")
	}
	return s, nil
}

// validBootID accepts what /proc/sys/kernel/random/boot_id holds (a UUID),
// and any other single word of letters, digits and dashes.
func validBootID(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-') {
			return false
		}
	}
	return true
}

// hostBootID returns the kernel's identity of the current boot.
func hostBootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "lockspace: cannot read the boot id of the host", Err: err}
	}
	id := strings.TrimSpace(string(b))
	if !validBootID(id) {
		return "", lockmgr.Errorf(lockmgr.CodeInternal, "lockspace: the host's boot id %q (/proc/sys/kernel/random/boot_id) is not one word of letters, digits and dashes", id)
	}
	return id, nil
}

// startEpoch reads StateDir/boot and records a start in boot bootID: a new
// boot raises the epoch (and, if the last epoch did not end cleanly, the
// trust-from epoch with it); every start marks the epoch running. A
// missing file is a first start: epoch 0, every record trusted. A damaged
// one fails: the epoch it held is unknown, so a new one might not be
// greater.
func startEpoch(stateDir, bootID string) (bootState, error) {
	dir, err := lockStateDir(stateDir)
	if err != nil {
		return bootState{}, err
	}
	defer unix.Close(dir)
	p := filepath.Join(stateDir, bootFileName)
	b, err := os.ReadFile(p)
	s := bootState{bootID: bootID}
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return bootState{}, &lockmgr.Error{Code: codeOfErrno(err), Msg: "lockspace: cannot read " + p, Err: err}
	default:
		if s, err = parseBootState(b); err != nil {
			return bootState{}, &lockmgr.Error{Code: lockmgr.CodeInternal, Err: err,
				Msg: fmt.Sprintf("lockspace: %s is damaged: its epoch is unknown, so tokens granted now might not be greater than ones granted before the last boot (docs/operations.md says how to repair it)", p)}
		}
		if s.bootID != bootID {
			if !s.clean {
				s.trustFrom = s.epoch + 1
			}
			s.epoch++
			s.bootID = bootID
		} else if !s.clean {
			return s, nil // already running in this boot: nothing to record
		}
	}
	s.clean = false
	if err := writeBootState(stateDir, dir, s); err != nil {
		return bootState{}, err
	}
	return s, nil
}

// lockStateDir serialises the Drivers (of any process) that read and
// replace StateDir/boot, with a flock on the directory, and returns the
// directory's descriptor: closing it unlocks.
func lockStateDir(stateDir string) (int, error) {
	fd, err := unix.Open(stateDir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err == nil {
		for {
			if err = unix.Flock(fd, unix.LOCK_EX); err != unix.EINTR {
				break
			}
		}
		if err != nil {
			_ = unix.Close(fd)
		}
	}
	if err != nil {
		return -1, &lockmgr.Error{Code: codeOfErrno(err), Msg: "lockspace: cannot lock " + stateDir, Err: err}
	}
	return fd, nil
}

// writeBootState replaces StateDir/boot with s, durably. Called with the
// StateDir locked through dir, its descriptor.
func writeBootState(stateDir string, dir int, s bootState) error {
	p := filepath.Join(stateDir, bootFileName)
	tmp := p + ".new"
	fail := func(op string, err error) error {
		_ = os.Remove(tmp)
		return &lockmgr.Error{Code: codeOfErrno(err), Msg: "lockspace: cannot " + op + " " + p, Err: err}
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fail("write", err)
	}
	if _, err = f.WriteString(s.String()); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail("write", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fail("replace", err)
	}
	if err := unix.Fsync(dir); err != nil {
		return fail("sync the directory of", err)
	}
	return nil
}

// floor is the least token a grant in this Driver's epoch takes, less one.
func (d *Driver) floor() uint64 { return d.boot.epoch << epochShift }

// distrusted reports whether a record with token cur, in the file fd, may
// have lost later grants in a crash of the host (see "Host crashes").
func (d *Driver) distrusted(fd int, cur uint64) bool {
	if cur>>epochShift >= d.boot.trustFrom {
		return false
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return true // unknown: refusing is the safe answer
	}
	return localFS(st.Type)
}

// staleAfterCrash is the error for an expected token that matches a record
// that distrusted refuses.
func staleAfterCrash(r lockmgr.Resource, want, cur uint64) error {
	return &lockmgr.StaleStateError{Resource: r, Want: want, Current: cur,
		Reason: "the host went down without vmlockd's clean stop after this resource was last granted, so a later grant may have been lost with the page cache; acquire without the state once you know nobody else used it since"}
}

// syncAndMarkClean syncs the file systems the Driver writes to and records
// that its epoch ended cleanly. Called by Close.
func (d *Driver) syncAndMarkClean() error {
	for _, h := range []*handle{d.tokDir, d.leaseDir, d.diskDir} {
		if h == nil {
			continue
		}
		if err := unix.Syncfs(h.fd); err != nil {
			return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "lockspace: cannot sync the file system of the tokens and lease files", Err: err}
		}
	}
	dir, err := lockStateDir(d.cfg.StateDir)
	if err != nil {
		return err
	}
	defer unix.Close(dir)
	s := d.boot
	s.clean = true
	return writeBootState(d.cfg.StateDir, dir, s)
}
