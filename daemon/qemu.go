package daemon

// The QEMU supervisor (service vmlock.v1.QEMU).
//
// `vmlock run --qemu` calls Start before it executes QEMU in its own place
// (same pid): vmlockd reads every drive's backing chain from the image
// headers (qemu-img) and takes the chain's locks for that pid, so the
// locks are held before QEMU opens any image, and QEMU's exit releases
// them like any owner's. QEMU is started with -S (unless the user asked
// for it already) and an extra QMP monitor on a unix socket that vmlockd
// names. vmlockd connects to it, checks that the peer is the VM's own
// process (SO_PEERCRED), reads QEMU's block graph, fixes the locks up to
// exactly what QEMU uses (reconcile), and only then continues the guest.
// If an image QEMU opened cannot be locked, the guest is never started:
// QEMU is killed, and the reason (the image, who holds it) is written on
// its stderr.
//
// Lock modes follow the graph: a disk's active image exclusive (shared
// for a share-rw device), every backing image shared, every image of a
// read-only disk recorded only; a running commit job's base exclusive,
// a stream job's top exclusive, and a copy or backup job's target (a disk
// of its own) exclusive; a qcow2 image's
// external data file in its image's mode. Every change —
// hotplug, a job starting or ending — ends with a reconcile, which takes
// what is missing first, then changes modes (lockmgr.Manager.ChangeMode,
// atomic), then releases the images QEMU has closed.
//
// Each VM has a record, STATE_DIR/qemu/<uuid>.json: the monitor's path,
// the images vmlockd manages for it, and its jobs. A restarted vmlockd has
// its locks back from the lock-holder; it reads the records and
// reconnects to every VM whose owner is still registered. Jobs are started
// with auto-dismiss off, so a job that ended while vmlockd was down is
// still listed by query-jobs with its outcome.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/qemu"
	"github.com/vmlock/vmlock/qmp"
)

// qemuSupervisor supervises the QEMU processes of the daemon's VMs.
type qemuSupervisor struct {
	d   *Daemon
	dir string // records and default monitor sockets
	log *slog.Logger
	// ctx bounds the supervisor's own goroutines; it lives as long as the
	// daemon's process (a reload re-executes it, a crash kills it).
	ctx context.Context
	// copyHook, if set, is called by blockcopy at each step on a target
	// image it created: "created" (the empty file, before it locks it, with
	// direct leases), "formatted" (locked and written by qemu-img, before
	// QEMU opens it) and "remove" (before it removes it). Tests step in
	// there.
	copyHook func(step, path string)

	mu  sync.Mutex
	vms map[string]*qemuVM // by uuid
}

// vmRecord is what survives a restart of vmlockd about a VM.
type vmRecord struct {
	UUID    string `json:"uuid"`
	PID     int    `json:"pid"`
	Monitor string `json:"monitor"`
	// Resume is set until vmlockd continued the guest (vmlock added -S).
	Resume bool `json:"resume,omitempty"`
	// Verified is set once QEMU's images were all locked: until then the
	// guest has not run, and QEMU is made to quit if one cannot be.
	Verified bool `json:"verified,omitempty"`
	// Managed lists the canonical paths of the images locked for QEMU;
	// other resources of the object are left as they were acquired.
	Managed []string    `json:"managed"`
	Jobs    []jobRecord `json:"jobs,omitempty"`
	Seq     int         `json:"seq"` // numbers job ids and node names
}

// qemuVM is one supervised QEMU.
type qemuVM struct {
	s    *qemuSupervisor
	uuid string
	name string
	pid  int

	// lk serialises every change to the VM (graph, locks, jobs, record);
	// a channel, so that waiting for it honours contexts.
	lk chan struct{}
	// Guarded by lk:
	rec  vmRecord
	c    *qmp.Client          // nil while not connected
	jobs map[string]*blockJob // each disk's current or last job, by disk name
	// stale is set while QEMU's graph could not be read safely
	// (qemu.ErrGraphUnreadable): the locks stay as they are, and are
	// settled again when a job is dismissed (adoptOnEvents).
	stale bool
	// errMsg says why the VM is not (fully) supervised; guarded by mu.
	mu     sync.Mutex
	errMsg string
	// attached is closed once the first connection was made and checked.
	attached chan struct{}
}

// newQEMUSupervisor makes the supervisor and starts re-attaching to the
// VMs of the records of an earlier run.
func (d *Daemon) newQEMUSupervisor() *qemuSupervisor {
	s := &qemuSupervisor{d: d, dir: filepath.Join(d.cfg.StateDir, "qemu"), log: d.log.With("component", "qemu"),
		ctx: context.Background(), vms: map[string]*qemuVM{}}
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		s.log.Error("cannot create the QEMU state directory; QEMU supervision will fail", "dir", s.dir, "err", err)
	}
	s.reattachAll()
	return s
}

// reattachAll reads the records and resumes supervising every VM whose
// owner the daemon took back; other records are of VMs that exited. A
// damaged record of a VM that runs is left in place for the operator and
// logged naming the file: that VM keeps its locks until it exits, but is
// not supervised.
func (s *qemuSupervisor) reattachAll() {
	ents, _ := os.ReadDir(s.dir)
	for _, e := range ents {
		uuid, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		file := filepath.Join(s.dir, e.Name())
		o, err := s.d.mgr.Object(uuid)
		if err != nil {
			s.log.Info("dropping the record of a VM that is gone", "uuid", uuid, "err", err)
			s.removeRecord(uuid, s.defaultMonitor(uuid))
			continue
		}
		b, err := os.ReadFile(file)
		var rec vmRecord
		if err == nil {
			rec, err = decodeVMRecord(b)
		}
		if err != nil {
			s.log.Error("cannot re-attach to a running QEMU: its record is damaged; its locks stay until it exits, but vmlock cannot act on its disks or jobs",
				"uuid", uuid, "name", o.Name, "pid", o.PID, "file", file, "err", err)
			continue
		}
		if o.PID != rec.PID || rec.UUID != uuid {
			s.log.Info("dropping the record of a VM that is gone", "uuid", uuid, "pid", rec.PID)
			s.removeRecord(uuid, rec.Monitor)
			continue
		}
		vm := s.add(o, rec)
		s.log.Info("re-attaching to a running QEMU", "uuid", uuid, "name", o.Name, "pid", o.PID, "jobs", len(rec.Jobs))
		go vm.run()
	}
}

// errBadRecord is wrapped by decodeVMRecord's errors.
var errBadRecord = errors.New("not a VM record that vmlockd can re-attach with")

// decodeVMRecord reads a VM's record, as saveLocked writes it, and
// checks what re-attaching relies on: the VM's uuid, its QEMU's pid, the
// absolute path of a unix socket, canonical image paths, and jobs that
// can be followed (one a disk, each with its id, a known type and
// canonical paths). Whatever a crash, a full disk or another version of
// vmlockd left in the file is either that or an error wrapping
// errBadRecord.
func decodeVMRecord(b []byte) (vmRecord, error) {
	var rec vmRecord
	err := json.Unmarshal(b, &rec)
	if err == nil {
		err = rec.check()
	}
	if err != nil {
		return vmRecord{}, fmt.Errorf("%w: %w", errBadRecord, err)
	}
	return rec, nil
}

func (rec *vmRecord) check() error {
	if u, err := lockmgr.ParseUUID(rec.UUID); err != nil || u != rec.UUID {
		return fmt.Errorf("uuid %q is not a uuid in canonical form", rec.UUID)
	}
	if rec.PID <= 0 {
		return fmt.Errorf("pid %d is not a process id", rec.PID)
	}
	if !filepath.IsAbs(rec.Monitor) || len(rec.Monitor) > maxSocketPath || strings.ContainsRune(rec.Monitor, 0) {
		return fmt.Errorf("monitor %q is not an absolute path of at most %d bytes", rec.Monitor, maxSocketPath)
	}
	for _, p := range rec.Managed {
		if !lockmgr.InCanonicalForm(p) {
			return fmt.Errorf("managed image %q is not a canonical path", p)
		}
	}
	if rec.Seq < 0 {
		return fmt.Errorf("seq %d is negative", rec.Seq)
	}
	disks, ids := map[string]bool{}, map[string]bool{}
	for _, j := range rec.Jobs {
		switch {
		case j.Disk == "" || disks[j.Disk]:
			return fmt.Errorf("job %q: no disk, or a second job on disk %q", j.ID, j.Disk)
		case j.ID == "" || ids[j.ID]:
			return fmt.Errorf("job on disk %q: no id, or a second job %q", j.Disk, j.ID)
		case !slices.Contains([]string{jobCommit, jobActiveCommit, jobCopy, jobBackup, jobStream}, j.Type):
			return fmt.Errorf("job %q: unknown type %q", j.ID, j.Type)
		case j.UID < 0:
			return fmt.Errorf("job %q: uid %d", j.ID, j.UID)
		}
		for _, p := range append([]string{j.Top, j.Base, j.Target}, j.Delete...) {
			if p != "" && !lockmgr.InCanonicalForm(p) || p == "" && slices.Contains(j.Delete, p) {
				return fmt.Errorf("job %q: image %q is not a canonical path", j.ID, p)
			}
		}
		disks[j.Disk], ids[j.ID] = true, true
	}
	return nil
}

func (s *qemuSupervisor) add(o lockmgr.Object, rec vmRecord) *qemuVM {
	vm := &qemuVM{s: s, uuid: o.UUID, name: o.Name, pid: o.PID, lk: make(chan struct{}, 1), rec: rec,
		jobs: map[string]*blockJob{}, attached: make(chan struct{})}
	s.mu.Lock()
	s.vms[o.UUID] = vm
	s.mu.Unlock()
	return vm
}

func (s *qemuSupervisor) recordPath(uuid string) string { return filepath.Join(s.dir, uuid+".json") }

// defaultMonitor is the socket a VM's monitor listens on unless the
// client names another.
func (s *qemuSupervisor) defaultMonitor(uuid string) string { return filepath.Join(s.dir, uuid+".qmp") }

// removeRecord forgets a VM on disk, with its socket if it is ours.
func (s *qemuSupervisor) removeRecord(uuid, monitor string) {
	_ = os.Remove(s.recordPath(uuid))
	if monitor == s.defaultMonitor(uuid) {
		_ = os.Remove(monitor)
	}
}

// lookup finds a VM by uuid or name.
// supervises reports whether the object uuid is a VM of this supervisor
// (nil: none is).
func (s *qemuSupervisor) supervises(uuid string) bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.vms[uuid] != nil
}

func (s *qemuSupervisor) lookup(vm string) (*qemuVM, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if u, err := lockmgr.ParseUUID(vm); err == nil {
		if v := s.vms[u]; v != nil {
			return v, nil
		}
	}
	var found *qemuVM
	for _, v := range s.vms {
		if v.name == vm {
			if found != nil {
				return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "two VMs are named %q: name one by its uuid", vm)
			}
			found = v
		}
	}
	if found == nil {
		return nil, lockmgr.Errorf(lockmgr.CodeNotRegistered, "no QEMU VM %q is supervised by this vmlockd (start it with vmlock run --qemu)", vm)
	}
	return found, nil
}

func (vm *qemuVM) lock(ctx context.Context) error {
	select {
	case vm.lk <- struct{}{}:
		return nil
	case <-ctx.Done():
		return lockmgr.Errorf(lockmgr.CodeTimeout, "VM %s is busy with another operation: %v", vm.label(), ctx.Err())
	}
}

func (vm *qemuVM) unlock() { <-vm.lk }

func (vm *qemuVM) label() string { return cmp.Or(vm.name, vm.uuid) }

func (vm *qemuVM) setErr(msg string) {
	vm.mu.Lock()
	vm.errMsg = msg
	vm.mu.Unlock()
}

func (vm *qemuVM) errText() string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.errMsg
}

// saveLocked writes the record. Called with lk held.
func (vm *qemuVM) saveLocked() {
	b, err := json.Marshal(vm.rec)
	if err == nil {
		tmp := vm.s.recordPath(vm.uuid) + ".tmp"
		if err = os.WriteFile(tmp, b, 0o600); err == nil {
			err = os.Rename(tmp, vm.s.recordPath(vm.uuid))
		}
	}
	if err != nil {
		vm.s.log.Error("cannot write a VM's record; a restart of vmlockd would not re-attach to it", "uuid", vm.uuid, "err", err)
	}
}

// gone reports whether the VM's owner has exited (QEMU is gone) or is
// no longer the daemon's (its locks were released through the API).
func (vm *qemuVM) gone() bool {
	d := vm.s.d
	d.mu.Lock()
	o := d.owners[vm.uuid]
	d.mu.Unlock()
	if o == nil || o.obj.PID != vm.pid {
		return true
	}
	select {
	case <-o.proc.done:
		return o.proc.dead
	default:
		return false
	}
}

// ownerExit returns a channel closed when the VM's owner process exits
// (or the daemon stops watching it); nil if it has no owner.
func (vm *qemuVM) ownerExit() <-chan struct{} {
	d := vm.s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if o := d.owners[vm.uuid]; o != nil {
		return o.proc.done
	}
	return nil
}

// run keeps the VM connected until it is gone: it connects, checks and
// fixes the locks, resumes the guest if vmlock paused it, tracks the jobs,
// and reconnects if the connection is lost while QEMU lives.
func (vm *qemuVM) run() {
	defer func() {
		vm.s.mu.Lock()
		if vm.s.vms[vm.uuid] == vm {
			delete(vm.s.vms, vm.uuid)
			vm.s.removeRecord(vm.uuid, vm.rec.Monitor)
		}
		vm.s.mu.Unlock()
		vm.s.log.Info("QEMU is gone; stopped supervising it", "uuid", vm.uuid, "name", vm.name)
	}()
	first := true
	for {
		c, err := vm.dial()
		if err != nil {
			return // gone
		}
		// Before attach: a job started meanwhile is seen by one or the other.
		sub := c.Subscribe(qemu.EventJobStatusChange)
		if err := vm.attach(c); err != nil {
			vm.s.log.Error("supervising QEMU", "uuid", vm.uuid, "name", vm.name, "err", err)
			vm.setErr(err.Error())
		} else {
			vm.setErr("")
		}
		go vm.adoptOnEvents(c, sub)
		if first {
			close(vm.attached)
			first = false
		}
		<-c.Done()
		if err := vm.lock(vm.s.ctx); err == nil {
			vm.c = nil
			vm.unlock()
		}
		c.Close()
		// QEMU closes its monitor as it exits: give the exit a moment to
		// show before taking the loss for a broken connection.
		select {
		case <-vm.ownerExit():
		case <-time.After(time.Second):
		}
		if vm.gone() {
			return
		}
		vm.s.log.Warn("lost the connection to QEMU's monitor; reconnecting", "uuid", vm.uuid, "err", c.Err())
	}
}

// disconnect closes the VM's connection, if any, so that run notices the
// VM is gone.
func (vm *qemuVM) disconnect() {
	select {
	case vm.lk <- struct{}{}:
		if vm.c != nil {
			vm.c.Close()
		}
		vm.unlock()
	default: // busy: its operation fails without locks, and run ends later
	}
}

// dial connects to the VM's monitor, retrying while QEMU starts (or until
// it is gone: errVMGone). The peer must be the VM's own process.
func (vm *qemuVM) dial() (*qmp.Client, error) {
	wait := 5 * time.Millisecond
	for {
		if vm.gone() {
			return nil, errVMGone
		}
		c, err := vm.dialOnce()
		if err == nil {
			return c, nil
		}
		vm.setErr(err.Error())
		select {
		case <-time.After(wait):
		case <-vm.s.ctx.Done():
			return nil, vm.s.ctx.Err()
		}
		wait = min(2*wait, 500*time.Millisecond)
	}
}

var errVMGone = errors.New("the VM is gone")

func (vm *qemuVM) dialOnce() (*qmp.Client, error) {
	ctx, cancel := context.WithTimeout(vm.s.ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", vm.rec.Monitor)
	if err != nil {
		return nil, fmt.Errorf("waiting for QEMU's monitor at %s: %w", vm.rec.Monitor, err)
	}
	uc := conn.(*net.UnixConn)
	rc, err := uc.SyscallConn()
	var cred *unix.Ucred
	if err == nil {
		cerr := rc.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
		err = cmp.Or(cerr, err)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("monitor %s: peer credentials: %w", vm.rec.Monitor, err)
	}
	if int(cred.Pid) != vm.pid {
		conn.Close()
		return nil, fmt.Errorf("monitor %s is served by pid %d, not by the VM's process %d; not trusting it", vm.rec.Monitor, cred.Pid, vm.pid)
	}
	c, err := qmp.New(ctx, conn, qmp.WithLogger(vm.s.log))
	if err != nil {
		return nil, fmt.Errorf("monitor %s: %w", vm.rec.Monitor, err)
	}
	return c, nil
}

// attach takes a new connection into use: it re-attaches to the recorded
// jobs, adopts the jobs started through other monitors, and settles the
// locks (settleLocked).
func (vm *qemuVM) attach(c *qmp.Client) error {
	ctx, cancel := context.WithTimeout(vm.s.ctx, time.Minute)
	defer cancel()
	if err := vm.lock(ctx); err != nil {
		return err
	}
	defer vm.unlock()
	vm.c = c
	var vanished []*blockJob
	for _, jr := range vm.rec.Jobs {
		j := vm.jobs[jr.Disk]
		if j == nil || j.rec.ID != jr.ID {
			j = newBlockJob(jr)
			vm.jobs[jr.Disk] = j
		}
		q, err := qemu.Attach(ctx, c, jr.ID)
		switch {
		case errors.Is(err, qemu.ErrNoSuchJob):
			vanished = append(vanished, j)
		case err != nil:
			return err
		default:
			j.q = q
			if info, err := q.Info(ctx); err == nil && (info.Status == qemu.JobReady || info.Status == qemu.JobStandby) && j.phase == phaseRunning {
				vm.setPhaseLocked(j, phaseReady)
			}
			go vm.watch(j, q)
		}
	}
	for _, j := range vanished {
		vm.finishLocked(ctx, j, qemu.Result{})
	}
	vm.adoptLocked(ctx)
	return vm.settleLocked(ctx)
}

// settleLocked reconciles the locks with QEMU's graph and, the first time
// that succeeds, lets the guest run: it continues the guest that vmlock
// paused, or kills QEMU (see refuse) if its images cannot all be locked.
// While the graph cannot be read safely (qemu.ErrGraphUnreadable) it
// changes nothing: the locks stay, an unverified guest stays paused, and
// adoptOnEvents settles again once a job is dismissed.
func (vm *qemuVM) settleLocked(ctx context.Context) error {
	c := vm.c
	err := vm.reconcileLocked(ctx)
	if errors.Is(err, qemu.ErrGraphUnreadable) {
		return err
	}
	if err != nil && !vm.rec.Verified {
		// The guest never ran: it must not run with an image unlocked.
		err = fmt.Errorf("QEMU was stopped before its guest started: %w", err)
		vm.s.log.Error("QEMU opened an image that cannot be locked; killing it before the guest starts", "uuid", vm.uuid, "name", vm.name, "err", err)
		vm.refuse(err)
		return err
	}
	if err != nil {
		return err
	}
	if !vm.rec.Verified {
		vm.rec.Verified = true
		vm.saveLocked()
	}
	if vm.rec.Resume {
		if err := c.Execute(ctx, "cont", nil, nil); err != nil {
			return fmt.Errorf("continuing the guest: %w", err)
		}
		vm.rec.Resume = false
		vm.saveLocked()
	}
	return nil
}

// refuse ends a QEMU whose guest must not run, saying why on QEMU's
// stderr. QEMU's quit would exit 0, and vmlock, which QEMU replaced, can
// no longer speak: so vmlockd writes the reason on the stderr QEMU
// inherited from vmlock (through a duplicate of QEMU's own descriptor, so
// it writes nowhere QEMU could not) and kills QEMU, whose process then
// fails (killed by SIGKILL). The guest never ran, so nothing is lost.
func (vm *qemuVM) refuse(reason error) {
	d := vm.s.d
	d.mu.Lock()
	o := d.owners[vm.uuid]
	d.mu.Unlock()
	if o == nil || o.obj.PID != vm.pid {
		return // gone already
	}
	if err := writeStderrOf(o.proc, "vmlock: "+reason.Error()+"\n"); err != nil {
		vm.s.log.Warn("cannot tell QEMU's user why it is stopped (see this log)", "uuid", vm.uuid, "err", err)
	}
	if err := o.proc.signal(unix.SIGKILL); err != nil {
		vm.s.log.Error("cannot kill QEMU", "uuid", vm.uuid, "pid", vm.pid, "err", err)
	}
}

// writeStderrOf writes msg (truncated to one atomic pipe write) on p's
// stderr, waiting at most a second for room: a reader that does not read
// must not hold up the daemon.
func writeStderrOf(p *process, msg string) error {
	rc, err := p.file.SyscallConn()
	if err != nil {
		return err
	}
	fd := -1
	if cerr := rc.Control(func(pidfd uintptr) { fd, err = unix.PidfdGetfd(int(pidfd), 2, 0) }); cerr != nil {
		return cerr
	}
	if err != nil {
		return fmt.Errorf("pidfd_getfd: %w", err)
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	if n, err := unix.Poll(fds, 1000); err != nil || n == 0 {
		return cmp.Or(err, errors.New("stderr not writable"))
	}
	const pipeBuf = 4096 // PIPE_BUF: a pipe with room takes this much at once
	if len(msg) > pipeBuf {
		msg = msg[:pipeBuf-1] + "\n"
	}
	_, err = unix.Write(fd, []byte(msg))
	return err
}

// waitAttached waits until the VM's first connection was made and
// checked, and fails if the VM is not connected now.
func (vm *qemuVM) waitAttached(ctx context.Context) error {
	select {
	case <-vm.attached:
		return nil
	case <-ctx.Done():
		return lockmgr.Errorf(lockmgr.CodeTimeout, "VM %s: not connected to QEMU's monitor yet (%s)", vm.label(), cmp.Or(vm.errText(), ctx.Err().Error()))
	}
}

// connectedLocked returns the VM's connection. Called with lk held.
func (vm *qemuVM) connectedLocked() (*qmp.Client, error) {
	if vm.c == nil {
		return nil, lockmgr.Errorf(lockmgr.CodeNotRegistered, "VM %s: not connected to QEMU's monitor (%s)", vm.label(), cmp.Or(vm.errText(), "reconnecting"))
	}
	return vm.c, nil
}

// canon returns the canonical path of an image QEMU names: relative names
// are relative to QEMU's working directory.
func (vm *qemuVM) canon(p string) (string, error) { return canonAt(vm.pid, p) }

// canonAt returns the canonical path of p, a path relative to the working
// directory of process pid if it is relative.
func canonAt(pid int, p string) (string, error) {
	if !filepath.IsAbs(p) {
		cwd, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/cwd")
		if err != nil {
			return "", fmt.Errorf("resolving %s against QEMU's working directory: %w", p, err)
		}
		p = filepath.Join(cwd, p)
	}
	r, err := lockmgr.Canonical(lockmgr.DiskResource(p, lockmgr.Exclusive))
	return r.Name, err
}

// disksLocked reads QEMU's disks with canonical image paths. An image
// whose file QEMU holds open but which no longer has a name (the
// temporary overlay of -snapshot, which QEMU unlinks at once) has no
// path: nobody else can open it, and there is nothing to lock. Called with
// lk held.
func (vm *qemuVM) disksLocked(ctx context.Context) ([]qemu.Disk, error) {
	c, err := vm.connectedLocked()
	if err != nil {
		return nil, err
	}
	disks, err := qemu.Disks(ctx, c)
	if errors.Is(err, qemu.ErrGraphUnreadable) {
		vm.stale = true
		return nil, &lockmgr.Error{Code: lockmgr.CodeNotRegistered, Msg: fmt.Sprintf("VM %s: its locks stay as they are until QEMU's block graph can be read", vm.label()), Err: err}
	}
	if err != nil {
		return nil, err
	}
	for i := range disks {
		for k := range disks[i].Images {
			img := &disks[i].Images[k]
			for _, p := range []*string{&img.Path, &img.DataFile} {
				if *p == "" {
					continue
				}
				if *p, err = vm.canon(*p); err != nil {
					return nil, err
				}
				if vm.unlinked(*p) {
					*p = ""
				}
			}
		}
	}
	return disks, nil
}

// unlinked reports whether the file QEMU opened as path has no name left:
// nothing is at path, and QEMU holds a file that was there and whose link
// count is 0. A file merely renamed (moved elsewhere) is not unlinked: it
// can still be opened under its new name, and keeps its lock.
func (vm *qemuVM) unlinked(path string) bool {
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		return false
	}
	fds := "/proc/" + strconv.Itoa(vm.pid) + "/fd"
	ents, err := os.ReadDir(fds)
	if err != nil {
		return false
	}
	for _, e := range ents {
		fd := filepath.Join(fds, e.Name())
		if target, err := os.Readlink(fd); err != nil || target != path+" (deleted)" {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(fd, &st) == nil && st.Nlink == 0 {
			return true
		}
	}
	return false
}

// wanted is the lock policy: the mode of every image QEMU uses, from its
// disks and the live jobs. An image used by two disks gets the stronger
// mode. A qcow2 image's external data file gets its image's mode: it is
// written whenever the image is.
func (vm *qemuVM) wanted(disks []qemu.Disk) map[string]lockmgr.Mode {
	want := map[string]lockmgr.Mode{}
	dataFile := map[string]string{} // image path → its data file
	put := func(img qemu.Image, m lockmgr.Mode) {
		for _, p := range []string{img.Path, img.DataFile} {
			if p == "" {
				continue // not a local file: nothing vmlock can lock
			}
			if cur, ok := want[p]; !ok || m < cur { // Exclusive < Shared < ReadOnly
				want[p] = m
			}
		}
	}
	for _, d := range disks {
		for i, img := range d.Images {
			if img.Path != "" {
				dataFile[img.Path] = img.DataFile
			}
			switch {
			case d.ReadOnly:
				put(img, lockmgr.ReadOnly)
			case i > 0:
				put(img, lockmgr.Shared)
			case d.ShareRW:
				put(img, lockmgr.Shared)
			default:
				put(img, lockmgr.Exclusive)
			}
		}
	}
	for _, j := range vm.jobs {
		if j.ended {
			continue
		}
		// The image a job writes: a commit's base, a copy's or backup's
		// target, a stream's top.
		img := j.rec.written()
		if _, used := want[img]; used || j.rec.Type == jobCopy || j.rec.Type == jobBackup {
			put(qemu.Image{Path: img, DataFile: dataFile[img]}, lockmgr.Exclusive)
		}
	}
	return want
}

// reconcileLocked makes the locks of the images vmlockd manages for the VM
// exactly what the lock policy wants for what QEMU uses now: it takes what
// is missing, changes modes, and releases what QEMU closed, in that order.
// It returns the first failures; what could be done is done. Called with
// lk held.
func (vm *qemuVM) reconcileLocked(ctx context.Context) error {
	disks, err := vm.disksLocked(ctx)
	if err != nil {
		return err
	}
	return vm.applyLocked(ctx, vm.wanted(disks))
}

// mayUse checks that the VM's QEMU could use the image r itself, before
// vmlockd locks it (opens it, as root) because QEMU reported it or a caller
// asked for it: any process of the VM's owner can speak QMP on the monitor
// (see access.go).
func (vm *qemuVM) mayUse(ctx context.Context, r lockmgr.Resource) error {
	c, err := processCaller(vm.pid)
	if err != nil {
		return &lockmgr.Error{Code: lockmgr.CodePermission, Resource: r.String(), Msg: fmt.Sprintf("cannot tell whose the VM's process %d is", vm.pid), Err: err}
	}
	return mayUse(ctx, c, r)
}

func (vm *qemuVM) applyLocked(ctx context.Context, want map[string]lockmgr.Mode) error {
	vm.stale = false // want comes from a graph just read
	mgr := vm.s.d.mgr
	ls, ro, err := mgr.Held(vm.uuid)
	if err != nil {
		return fmt.Errorf("VM %s holds no locks any more (released through the API?): %w", vm.label(), err)
	}
	held := map[string]lockmgr.Mode{}
	for _, l := range ls {
		if r := l.Resource(); r.Type == lockmgr.TypeDisk {
			held[r.Name] = r.Mode
		}
	}
	for _, r := range ro {
		if r.Type == lockmgr.TypeDisk {
			held[r.Name] = lockmgr.ReadOnly
		}
	}
	managed := map[string]bool{}
	for _, p := range vm.rec.Managed {
		managed[p] = true
	}
	var errs []error
	paths := make([]string, 0, len(want))
	for p := range want {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	for _, p := range paths {
		m := want[p]
		cur, ok := held[p]
		r := lockmgr.DiskResource(p, m)
		switch {
		case !ok:
			if err = vm.mayUse(ctx, r); err == nil {
				err = mgr.AcquireResource(ctx, vm.uuid, r)
			}
		case cur != m:
			err = mgr.ChangeMode(ctx, vm.uuid, r)
		default:
			err = nil
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("locking %s %s: %w", p, m.Adverb(), err))
			continue
		}
		if !ok || cur != m {
			vm.s.log.Info("QEMU lock", "uuid", vm.uuid, "name", vm.name, "image", p, "mode", m.String(), "was", modeName(cur, ok))
		}
		managed[p] = true
	}
	for p := range managed {
		if _, ok := want[p]; ok {
			continue
		}
		if _, ok := held[p]; ok {
			r := lockmgr.DiskResource(p, held[p])
			if _, err := mgr.Release(ctx, vm.uuid, &r); err != nil {
				errs = append(errs, fmt.Errorf("releasing %s: %w", p, err))
				continue
			}
			vm.s.log.Info("QEMU lock released", "uuid", vm.uuid, "name", vm.name, "image", p)
		}
		delete(managed, p)
	}
	vm.rec.Managed = vm.rec.Managed[:0]
	for p := range managed {
		vm.rec.Managed = append(vm.rec.Managed, p)
	}
	slices.Sort(vm.rec.Managed)
	vm.saveLocked()
	return errors.Join(errs...)
}

func modeName(m lockmgr.Mode, held bool) string {
	if !held {
		return "unlocked"
	}
	return m.String()
}

// heldModes returns the mode in which the VM holds each disk path.
func (vm *qemuVM) heldModes() map[string]lockmgr.Mode {
	out := map[string]lockmgr.Mode{}
	ls, ro, err := vm.s.d.mgr.Held(vm.uuid)
	if err != nil {
		return out
	}
	for _, l := range ls {
		out[l.Resource().Name] = l.Resource().Mode
	}
	for _, r := range ro {
		out[r.Name] = lockmgr.ReadOnly
	}
	return out
}

// relativePath refuses a relative path (a name with a slash that is not
// absolute) where an image is named: vmlockd cannot know the working
// directory of the client it is relative to.
func relativePath(what, name string) error {
	if strings.ContainsRune(name, '/') && !filepath.IsAbs(name) {
		return lockmgr.Errorf(lockmgr.CodeInvalidArgument, "%s %q is a relative path: give an absolute path or a name (vmlock makes relative paths absolute itself)", what, name)
	}
	return nil
}

// findDisk finds a disk by its name, backend, device, node, or active
// image path (canonical; a relative path is refused).
func findDisk(disks []qemu.Disk, name string) (*qemu.Disk, error) {
	if err := relativePath("disk", name); err != nil {
		return nil, err
	}
	canonical := ""
	if strings.ContainsRune(name, '/') {
		if r, err := lockmgr.Canonical(lockmgr.DiskResource(name, lockmgr.Exclusive)); err == nil {
			canonical = r.Name
		}
	}
	for i := range disks {
		d := &disks[i]
		if d.Name == name || d.Device == name || d.QDev == name || d.Node == name || d.Root == name ||
			canonical != "" && d.Images[0].Path == canonical {
			return d, nil
		}
	}
	var names []string
	for _, d := range disks {
		names = append(names, d.Name)
	}
	return nil, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "no disk %q (disks: %s)", name, strings.Join(names, ", "))
}
