// Package daemon is vmlockd: it serves a lockmgr.Manager over the native
// gRPC API on a unix socket, ties every object's locks to its owner process,
// revokes locks by killing their holders, and keeps every lock through its
// own restart or crash.
//
// # Owners
//
// An object's locks belong to its pid. The daemon pins each owner with a
// pidfd (never a bare pid number, which the kernel reuses) and learns of its
// exit from the runtime poller; the exit releases every lock of every object
// the process owned.
//
// # Surviving a crash
//
// Every lock descriptor is duplicated into the lock-holder process (package
// lockholder) before the client is told it holds the lock, together with a
// record of the grant. The holder keeps the OFD locks alive while vmlockd is
// down, whether it was reloaded, stopped or killed. On start, vmlockd lists
// the holder's entries and rebuilds its table from them; owners that exited
// meanwhile have their locks released then. An object whose owner vmlockd
// cannot tell to be gone, but cannot take back either (a record it cannot
// read, liveness unknown), is left in the holder untouched (see restore):
// its locks stay held. The records are keyed
//
//	O/<uuid>/<n>  chunk n of the object's record (see objectRecord): chunk 0
//	              has the identity, owner start time, registrant uid and
//	              migration mark; the chunks share out the leases (with
//	              their lease files) and the read-only uses
//
//	O/<uuid>/L<n> the descriptors of leases a restore could not take back
//	              (the driver's Adopt failed: the image renamed or replaced
//	              while vmlockd was down, its token changed) from an object
//	              whose owner runs; see keepUnadopted
//
// Chunks without their chunk 0 are released on restart if their owner is
// gone, and kept otherwise. A lease that cannot be taken back from a
// running owner is not in the lock table, but its lock stays held, by an
// L entry, until the object's records go (the owner exits, or the object
// releases everything): a lock never goes while its owner may still use
// the disk.
//
// # Reload
//
// Reload (SIGHUP, or the Reload call) stops accepting, lets in-flight calls
// finish, and re-executes the binary in place with the listening socket and
// the state-directory lock inherited, so that clients queue in the socket's
// backlog instead of failing, and no second daemon can slip in.
package daemon

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/vmlock/vmlock/hierlock"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
)

// Config configures a Daemon. Zero fields take the defaults documented on
// each.
type Config struct {
	// Socket is the API socket's path.
	Socket string
	// SocketGroup, if set, is the group (name or number) whose members may
	// use the API besides root; the socket is made group-accessible to it.
	SocketGroup string
	// StateDir holds the daemon's lock file and the lock-holder's socket.
	StateDir string
	// Driver takes the real locks; required.
	Driver lockmgr.Driver
	// Host names this host in holder records; os.Hostname() if empty.
	Host string
	// RequestTimeout bounds every call; 10 s if zero.
	RequestTimeout time.Duration
	// KillGrace is how long a revoked holder has between SIGTERM and
	// SIGKILL; 5 s if zero.
	KillGrace time.Duration
	// KillCommand, if set, is run instead of sending SIGTERM to a revoked
	// holder of an object registered by root or vmlockd's uid; "{pid}",
	// "{uuid}" and "{name}" in its arguments are replaced.
	// SIGKILL still follows KillGrace after it started if the process
	// survives it (a command still running then is stopped).
	KillCommand []string
	// HolderCommand starts the lock-holder process (see lockholder.Connect).
	HolderCommand func() error
	// Logger receives the daemon's structured logs; slog.Default() if nil.
	Logger *slog.Logger
	// Version is reported by Status.
	Version string
	// Listener, if set, is used instead of creating Socket (socket
	// activation, or a listener inherited across a reload).
	Listener *net.UnixListener
	// Metrics, if set, receives the daemon's metrics.
	Metrics *Metrics
	// Reloads is how many times this daemon re-executed itself, for Status.
	Reloads int
	// Fencer, if set, is the self-fencing hook of a cluster driver (see
	// Fencer): the daemon attaches to it, and its lock-holder records carry
	// owner pidfds so that the holder can fence while vmlockd is down.
	Fencer *Fencer
	// HierLevels are the levels of the hierarchical locks served to
	// clients; nil means hierlock.DefaultLevels().
	HierLevels []hierlock.LevelConfig
	// Libvirt, if set, also serves the lock table over virtlockd's protocol
	// for libvirt's lockd plugin (libvirt.go).
	Libvirt *LibvirtConfig

	// openProcess, if set, replaces openProcess where restore pins the
	// owners of the lock-holder's records (tests).
	openProcess func(pid int, start uint64) (*process, error)
}

func (c *Config) setDefaults() error {
	if c.Driver == nil {
		return errors.New("daemon: no driver")
	}
	if c.StateDir == "" {
		return errors.New("daemon: no state directory")
	}
	if c.Socket == "" && c.Listener == nil {
		return errors.New("daemon: no socket")
	}
	if c.Host == "" {
		c.Host, _ = os.Hostname()
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 10 * time.Second
	}
	if c.KillGrace == 0 {
		c.KillGrace = 5 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Metrics == nil {
		c.Metrics = NewMetrics()
	}
	return nil
}

// ErrReload is returned by Run when the daemon stopped to re-execute itself.
var ErrReload = errors.New("daemon: reload requested")

// Daemon is a running vmlockd. Create it with New, then call Run.
type Daemon struct {
	cfg     Config
	log     *slog.Logger
	mgr     *lockmgr.Manager
	holder  *lockholder.Client // see holderClient; replaced by resyncHolder
	lockF   *os.File           // the state directory's lock, held while we run
	ln      *net.UnixListener
	srv     *grpc.Server
	started time.Time
	reloads int
	gid     int // the socket group, or -1

	reloadOnce sync.Once
	reloadCh   chan struct{}
	stopping   chan struct{} // closed when Run stops serving: sessions end between calls
	inheritLn  *os.File      // the listening socket kept for a reload

	fenceMu sync.Mutex // held by restore and by fenceAll (fence.go)

	// recordMu orders the lock-holder's records: every record write holds it
	// shared, and resyncHolder holds it exclusively while it replaces a
	// lost holder and rewrites every record, so that no older record can
	// overwrite a newer one.
	recordMu     sync.RWMutex
	holderClosed bool // Run is over: the holder keeps what it has, nothing is resynced

	// killMu orders killing a lock-holder that stopped answering against
	// the end of Run: once holderKept is set, no holder is killed, since
	// after vmlockd exits its holder keeps the locks, even one that is
	// only paused now.
	killMu     sync.Mutex
	holderKept bool
	killed     *lockholder.Client // the last client whose holder was killed

	mu     sync.Mutex
	owners map[string]*owner    // by uuid
	procs  map[int]*processRefs // by pid
	// kept are the objects whose lock-holder records restore left
	// untouched (see keep), by uuid; until the holder is replaced.
	kept map[string]keptObject
	// unadopted are the leases restore could not take back from running
	// owners, by uuid, with vmlockd's own copies of their descriptors: the
	// lock-holder's L entries hold the locks, and these let resyncHolder
	// give a new holder the same (see keepUnadopted).
	unadopted map[string][]unadoptedLease

	hier *hierService
	lv   *libvirtEndpoint // the libvirt drop-in, or nil (libvirt.go)
	// qemu supervises `vmlock run --qemu` VMs; set by Run before it serves.
	qemu *qemuSupervisor
}

// owner is the daemon's record of an object beyond the lock table.
type owner struct {
	obj    lockmgr.Object
	uid    int // the uid that registered it
	proc   *process
	since  time.Time
	chunks int        // how many holder records the object spans now
	mig    *migration // its part in a migration handover (migrate.go), or nil
}

type processRefs struct {
	p     *process
	uuids map[string]bool
}

// objectRecord is what the lock-holder keeps for an object, one per chunk
// of at most lockholder.MaxFiles lease files and lockholder.MaxMeta bytes.
// Chunk 0 has the identity and the migration mark. A mark's pending
// resources are recorded with their leases, in whichever chunk holds them
// (leaseRecord.Pending), so that a mark costs chunk 0 a few bytes however
// many disks it covers; the mark itself lists only pending resources the
// object holds read-only.
type objectRecord struct {
	Object    lockmgr.Object     `json:"object"`
	UID       int                `json:"uid"`
	Start     uint64             `json:"start"`
	Since     time.Time          `json:"since"`
	ReadOnly  []lockmgr.Resource `json:"readonly,omitempty"`
	Leases    []leaseRecord      `json:"leases,omitempty"`
	Migration *migration         `json:"migration,omitempty"`
}

// leaseRecord is one lease of an object record. File indexes the record's
// descriptors, or is -1 for a driver that keeps no file.
type leaseRecord struct {
	Resource lockmgr.Resource `json:"resource"`
	Token    uint64           `json:"token"`
	File     int              `json:"file"`
	// Pending: the resource is pending in the object's migration mark
	// (held exclusively again by the side that keeps the object).
	Pending bool `json:"pending,omitempty"`
}

func recordKey(uuid string, chunk int) string { return "O/" + uuid + "/" + strconv.Itoa(chunk) }

// unadoptedKey is the key of an object's n-th entry of leases restore
// could not take back (see keepUnadopted).
func unadoptedKey(uuid string, n int) string { return "O/" + uuid + "/L" + strconv.Itoa(n) }

// parseUnadoptedKey returns the object of an unadoptedKey, and its n.
func parseUnadoptedKey(k string) (uuid string, n int, ok bool) {
	rest, ok := strings.CutPrefix(k, "O/")
	if !ok {
		return "", 0, false
	}
	uuid, c, ok := strings.Cut(rest, "/L")
	if !ok || strings.Contains(uuid, "/") {
		return "", 0, false
	}
	n, err := strconv.Atoi(c)
	return uuid, n, err == nil && n >= 0 && strconv.Itoa(n) == c
}

// New prepares a daemon: it takes the state directory's lock (failing with a
// clear message if another vmlockd runs there), connects to the lock-holder,
// takes back every lock the holder kept, and opens the API socket. lockFile,
// if not nil, is an already-locked state-directory lock inherited across a
// reload.
func New(ctx context.Context, cfg Config, lockFile *os.File) (*Daemon, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, started: time.Now(), gid: -1, reloads: cfg.Reloads, reloadCh: make(chan struct{}), stopping: make(chan struct{}),
		owners: make(map[string]*owner), procs: make(map[int]*processRefs)}
	d.mgr = lockmgr.NewManager(cfg.Driver, lockmgr.Options{Observer: (*observer)(d)})
	cfg.Metrics.register(d)
	var err error
	if d.hier, err = newHierService(d, cfg.HierLevels); err != nil {
		return nil, err
	}
	if lockFile == nil {
		if lockFile, err = LockStateDir(cfg.StateDir); err != nil {
			return nil, err
		}
	}
	d.lockF = lockFile
	if cfg.SocketGroup != "" {
		g, err := lookupGroup(cfg.SocketGroup)
		if err != nil {
			d.lockF.Close()
			return nil, err
		}
		d.gid = g
	}
	startHolder := cfg.HolderCommand
	if startHolder == nil {
		startHolder = func() error { return errors.New("no way to start the lock-holder configured") }
	}
	started := false
	start := func() error { started = true; return startHolder() }
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	h, kept, err := lockholder.Open(hctx, cfg.StateDir, start)
	if err != nil {
		d.lockF.Close()
		return nil, err
	}
	if !started {
		h.ReapIfChild() // a holder from before a reload: our child, which nothing here waits for
	}
	d.holder = h
	restored := d.startFencing()
	err = d.restore(ctx, kept)
	if err == nil && d.keptCount() == 0 {
		d.dropUnadopted(ctx)
	} else if err == nil {
		// The driver's grants that no record claims may be those of the
		// kept records, which could not be read or taken back.
		d.log.Error("restore: the driver's grants that no record claims are kept too, as some records are kept")
	}
	restored()
	if err != nil {
		d.holder.Close()
		d.lockF.Close()
		return nil, err
	}
	if err := d.listen(); err != nil {
		d.holder.Close()
		d.lockF.Close()
		return nil, err
	}
	if err := d.listenLibvirt(ctx); err != nil {
		d.ln.Close()
		d.holder.Close()
		d.lockF.Close()
		return nil, err
	}
	return d, nil
}

// LockStateDir takes the exclusive lock that makes a state directory one
// daemon's, and writes our pid into it.
func LockStateDir(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	path := filepath.Join(dir, "vmlockd.pid")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("state directory lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		other := strings.TrimSpace(string(b))
		if other == "" {
			other = "unknown"
		}
		return nil, fmt.Errorf("another vmlockd (pid %s) is running on state directory %s; stop it first, or use another --state-dir", other, dir)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

func (d *Daemon) listen() error {
	if d.cfg.Listener != nil {
		d.ln = d.cfg.Listener
		d.ln.SetUnlinkOnClose(false)
		return nil
	}
	path := d.cfg.Socket
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("socket directory: %w", err)
	}
	// We hold the state directory's lock, so a socket left at path is a dead
	// daemon's, unless another daemon with another state directory uses the
	// same path: refuse then.
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("another daemon already listens on %s (with another state directory); use another --socket", path)
	}
	_ = os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listening on %s: %w", path, err)
	}
	mode := os.FileMode(0o600)
	if d.gid >= 0 {
		mode = 0o660
		if err := os.Chown(path, -1, d.gid); err != nil {
			ln.Close()
			return fmt.Errorf("socket group: %w", err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return err
	}
	ln.SetUnlinkOnClose(false)
	d.ln = ln
	return nil
}

// Manager returns the daemon's lock table (for in-process endpoints such as
// the libvirt compatibility server).
func (d *Daemon) Manager() *lockmgr.Manager { return d.mgr }

// Run serves the API until ctx is done (a graceful stop: every lock of a
// running owner stays held by the lock-holder) or a reload is requested
// (ErrReload; the caller then calls Exec). A graceful stop waits at most
// RequestTimeout for calls in progress.
func (d *Daemon) Run(ctx context.Context) error {
	d.srv = grpc.NewServer(
		grpc.Creds(peerCredentials{gid: d.gid}),
		grpc.ChainUnaryInterceptor(d.intercept),
		grpc.ChainStreamInterceptor(d.interceptStream),
		// A fixed pool of stream workers instead of a goroutine per call.
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
		// Fixed flow-control windows: with gRPC's dynamic ones, the
		// receiver of almost every message sends a BDP-estimation ping
		// (and gets its ack), two frames more per call that a local
		// socket's bandwidth does not need. The client sets the same
		// (api.Dial).
		grpc.StaticStreamWindowSize(1<<20),
		grpc.StaticConnWindowSize(4<<20),
	)
	for _, register := range d.services() {
		register(d.srv)
	}
	errc := make(chan error, 2)
	watch, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go d.watchHolder(watch)
	go func() { errc <- d.srv.Serve(d.ln) }()
	stopLibvirt := d.serveLibvirt(errc)
	defer stopLibvirt()
	d.log.Info("vmlockd serving", "socket", d.ln.Addr().String(), "driver", d.cfg.Driver.Name(),
		"state_dir", d.cfg.StateDir, "objects", len(d.mgr.Objects()), "pid", os.Getpid())
	sdNotify("READY=1\nSTATUS=serving\nMAINPID=" + strconv.Itoa(os.Getpid()))
	var result error
	select {
	case err := <-errc:
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
		sdNotify("STOPPING=1")
		d.log.Info("stopping; locks of running owners stay held by the lock-holder")
	case <-d.reloadCh:
		sdNotify("RELOADING=1")
		d.log.Info("reloading: re-executing in place; every lock stays held")
		result = ErrReload
		// Keep the listening socket open across the stop and the exec, so
		// that clients wait in its backlog instead of being refused.
		f, err := d.ln.File()
		if err != nil {
			return fmt.Errorf("reload: keeping the listening socket: %w", err)
		}
		d.inheritLn = f
		if err := d.keepLibvirtListener(); err != nil {
			return err
		}
	}
	select {
	case <-d.stopping:
	default:
		close(d.stopping)
	}
	stopped := make(chan struct{})
	go func() { d.srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(d.cfg.RequestTimeout):
		d.srv.Stop()
	}
	stopLibvirt() // before the holder closes: its calls record grants there
	// Owner watches end with the process image: nothing is released. They
	// end here too, so that a Daemon whose Run returned (in a process that
	// goes on: tests, a library user) never releases what the next Daemon
	// on this state directory took back. Our own lock descriptors close
	// with the process image, so the holder must be there.
	stopWatch()
	d.mu.Lock()
	watched := make([]*process, 0, len(d.procs))
	for _, pr := range d.procs {
		pr.p.close() // onExit sees no exit and releases nothing
		watched = append(watched, pr.p)
	}
	d.mu.Unlock()
	for _, p := range watched {
		<-p.done
	}
	d.killMu.Lock()
	d.holderKept = true
	d.killMu.Unlock()
	d.ensureHolder()
	d.recordMu.Lock()
	d.holderClosed = true
	d.holder.Close()
	d.recordMu.Unlock()
	// The holder's L entries keep the unadopted leases' locks from now on.
	d.mu.Lock()
	for uuid := range d.unadopted {
		d.forgetUnadoptedLocked(uuid)
	}
	d.mu.Unlock()
	return result
}

// requestReload makes Run return ErrReload.
func (d *Daemon) requestReload() { d.reloadOnce.Do(func() { close(d.reloadCh) }) }

// Reload asks the running daemon to re-execute itself (SIGHUP).
func (d *Daemon) Reload() { d.requestReload() }

// InheritedFiles returns the listening socket and the state-directory lock
// after Run returned ErrReload, for the new process image to inherit.
func (d *Daemon) InheritedFiles() (listener, lock *os.File, err error) {
	if d.inheritLn == nil {
		return nil, nil, errors.New("daemon: no reload in progress")
	}
	return d.inheritLn, d.lockF, nil
}

// restore takes back what the lock-holder kept: entries, as it listed them.
//
// The rule it enforces: vmlockd frees an object's locks only once it knows
// that the owner is gone (its process exited, or its pid now names another
// process), since a lock freed under a running VM loses data. Every entry
// is decoded and grouped by the object its key names before anything is
// adopted, and an object is then
//   - released (through the driver, and dropped from the holder) if its
//     owner is gone, or was killed by killLost;
//   - taken back into the lock table, with the leases the driver could
//     adopt, if its owner runs (killLost kills an owner that lost leases
//     to a cluster driver);
//   - kept otherwise (see keep): an object with a record decodeRecord
//     refuses, without its chunk 0, whose owner's liveness cannot be told,
//     or that the lock table refuses. Its entries stay in the holder
//     untouched, so its locks stay held; no lease of it is adopted, since
//     a lease adopted and then released would unlock the description the
//     holder shares.
func (d *Daemon) restore(ctx context.Context, entries []lockholder.Entry) error {
	if len(entries) == 0 {
		return nil
	}
	t0 := time.Now()
	// Each object's chunks in order. writeRecord sends a record of several
	// chunks as one batch, which the holder applies whole or not at all;
	// a vmlockd before it wrote them one by one, and a crash in the middle
	// could leave a resource in two chunks, one it moved to (a lower chunk,
	// written) and one it left (not rewritten yet). It is taken from the
	// lower one only: a second use of one resource would be released
	// twice, and an unplug of one would unlock what the other still shows
	// held.
	slices.SortFunc(entries, func(a, b lockholder.Entry) int {
		ua, ca, _ := parseRecordKey(a.Key)
		ub, cb, _ := parseRecordKey(b.Key)
		return cmp.Or(strings.Compare(ua, ub), cmp.Compare(ca, cb), strings.Compare(a.Key, b.Key))
	})
	// An entry whose key names no object's record is a group of its own.
	type group struct{ uuid, odd string }
	var order []group
	objs := map[group][]restoredChunk{}
	unadopted := map[string][]*lockholder.Entry{} // L entries, by object
	for i := range entries {
		e := &entries[i]
		if uuid, _, ok := parseUnadoptedKey(e.Key); ok {
			g := group{uuid: uuid}
			if _, seen := objs[g]; !seen {
				order = append(order, g)
				objs[g] = nil
			}
			unadopted[uuid] = append(unadopted[uuid], e)
			continue
		}
		c := restoredChunk{e: e}
		var uuid string
		uuid, c.n, c.rec, c.err = decodeRecord(e.Key, e.Meta)
		g := group{uuid: uuid}
		if c.err != nil {
			var ok bool
			if uuid, c.n, ok = parseRecordKey(e.Key); ok {
				g = group{uuid: uuid}
			} else {
				g = group{odd: e.Key}
			}
		}
		if _, seen := objs[g]; !seen {
			order = append(order, g)
		}
		objs[g] = append(objs[g], c)
	}
	restored, released := 0, 0
	for _, g := range order {
		switch n, ok := d.restoreObject(ctx, g.uuid, objs[g], unadopted[g.uuid]); {
		case ok:
			restored++
		case n >= 0:
			released += n
		}
	}
	d.log.Info("took back the locks kept by the lock-holder", "objects", restored, "released_of_gone_owners", released,
		"kept_untouched", d.keptCount(), "took", time.Since(t0))
	return nil
}

// restoredChunk is one lock-holder entry of an object, as restore read it.
type restoredChunk struct {
	e   *lockholder.Entry
	n   int          // the chunk number
	rec objectRecord // if err is nil
	err error        // why decodeRecord refused it
}

// restoreObject restores, releases or keeps (see restore) the object uuid
// ("" if the key of its one entry names none) from its entries, sorted by
// chunk, and the L entries an earlier start left of it (see
// keepUnadopted). It reports whether it was restored, and else how many
// leases were released (-1 if it was kept).
func (d *Daemon) restoreObject(ctx context.Context, uuid string, chunks []restoredChunk, old []*lockholder.Entry) (released int, ok bool) {
	if len(chunks) == 0 {
		d.keep(uuid, 0, nil, old, "entries of leases an earlier start could not take back, without the object's record")
		return -1, false
	}
	var id *restoredChunk // the owner's identity: chunk 0, or else the lowest one readable
	var bad []string
	for i := range chunks {
		c := &chunks[i]
		if c.err != nil {
			bad = append(bad, c.err.Error())
		} else if id == nil {
			id = c
		}
	}
	pid := 0
	if id != nil {
		pid = id.rec.Object.PID
	} else {
		pid = recordPID(chunks[0].e.Meta)
	}
	if len(bad) > 0 {
		d.keep(uuid, pid, chunks, old, "unreadable record (written by another version of vmlockd, or damaged): "+strings.Join(bad, "; "))
		return -1, false
	}
	proc, err := d.pinOwner(ctx, id.rec.Object.PID, id.rec.Start)
	if err != nil && !errors.Is(err, errGone) {
		d.keep(uuid, pid, chunks, old, "cannot tell whether its owner still runs: "+err.Error())
		return -1, false
	}
	if err == nil && chunks[0].n != 0 {
		proc.close()
		d.keep(uuid, pid, chunks, old, "its chunk 0 (the object's identity and migration mark) is missing, and its owner still runs")
		return -1, false
	}
	t := d.adopt(uuid, chunks)
	if err == nil && d.killLost(uuid, proc, t.lost) {
		proc.close()
		err = errGone
	}
	if errors.Is(err, errGone) {
		// The owner exited while we were down: release its locks now.
		if rerr := d.cfg.Driver.Release(ctx, t.leases); rerr != nil {
			d.log.Error("releasing the locks of a gone owner", "uuid", uuid, "err", rerr)
		}
		_ = d.holder.DropPrefix(ctx, "O/"+uuid+"/") // the L entries too
		closeEntries(old)
		closeUnadopted(t.unadopted)
		return len(t.leases), false
	}
	rec := &id.rec
	if err := d.mgr.Restore(rec.Object, t.leases, t.ro, rec.Since); err != nil {
		// Not expected (the record was checked, and each uuid comes once):
		// the adopted leases are left unreleased, so their locks stay with
		// the holder's descriptors.
		proc.close()
		closeUnadopted(t.unadopted)
		d.keep(uuid, pid, chunks, old, "the lock table refuses it: "+err.Error())
		return -1, false
	}
	d.keepUnadopted(ctx, uuid, old, t.unadopted)
	d.mu.Lock()
	defer d.mu.Unlock()
	// A process that owns several objects is watched once: every owner
	// record refers to the watched process, never to a closed duplicate.
	proc = d.watchLocked(uuid, proc)
	mig := rec.Migration
	if mig != nil {
		for _, c := range slices.Sorted(maps.Keys(t.pending)) {
			mig.Pending = append(mig.Pending, t.pending[c]...)
		}
	}
	d.owners[uuid] = &owner{obj: rec.Object, uid: rec.UID, proc: proc, since: rec.Since, chunks: len(chunks), mig: restoredMigration(mig)}
	return 0, true
}

// taken is what adopt took back of an object.
type taken struct {
	leases  []lockmgr.Lease
	ro      []lockmgr.Resource
	pending map[int][]lockmgr.Resource // the mark's, recorded with the leases, by chunk
	lost    int                        // leases the driver could not take back
	// unadopted are those of lost (and, with a driver that cannot adopt,
	// every lease) that have a descriptor: a copy of it, which keeps the
	// lock (see keepUnadopted).
	unadopted []unadoptedLease
}

// adopt has the driver take back every lease of an object's chunks (each
// resource once, from the lowest chunk), and closes the descriptors no
// lease claimed.
func (d *Daemon) adopt(uuid string, chunks []restoredChunk) taken {
	var t taken
	adopter, _ := d.cfg.Driver.(lockmgr.Adopter)
	seen := map[string]bool{} // resource keys taken, from the lowest chunk
	for _, c := range chunks {
		e := c.e
		for _, ro := range c.rec.ReadOnly { // any chunk (older vmlockd: chunk 0 only)
			if !seen[ro.Key()] {
				seen[ro.Key()] = true
				t.ro = append(t.ro, ro)
			}
		}
		for _, lr := range c.rec.Leases {
			if seen[lr.Resource.Key()] {
				continue // its descriptor is closed with the entry's
			}
			seen[lr.Resource.Key()] = true
			if lr.Pending {
				if t.pending == nil {
					t.pending = map[int][]lockmgr.Resource{}
				}
				p := lr.Resource
				p.Mode = lockmgr.Exclusive // a mark's pending resources were all exclusive
				t.pending[c.n] = append(t.pending[c.n], p)
			}
			var f *os.File
			if lr.File >= 0 && lr.File < len(e.Files) {
				f = e.Files[lr.File]
				e.Files[lr.File] = nil
			}
			if adopter == nil {
				d.log.Error("lock-holder: the driver cannot take back a lease", "driver", d.cfg.Driver.Name(), "resource", lr.Resource.String())
				if f != nil {
					t.unadopted = append(t.unadopted, unadoptedLease{Resource: lr.Resource, Problem: "the driver cannot take back a lease", file: f})
				}
				continue
			}
			// Adopt closes f if it fails; a copy keeps the lock for the
			// owner all the same.
			var keep *os.File
			if f != nil {
				keep = dupFile(f)
			}
			l, err := adopter.Adopt(lr.Resource, lr.Token, f)
			if err != nil {
				d.log.Error("lock-holder: cannot take back a lease", "uuid", uuid, "resource", lr.Resource.String(), "err", err)
				t.lost++
				if keep != nil {
					t.unadopted = append(t.unadopted, unadoptedLease{Resource: lr.Resource, Problem: err.Error(), file: keep})
				}
				continue
			}
			if keep != nil {
				keep.Close()
			}
			t.leases = append(t.leases, l)
		}
		e.Close() // descriptors no lease claimed
	}
	return t
}

// keptObject is an object whose lock-holder entries restore left untouched
// (see restore).
type keptObject struct {
	uuid      string // "" if its one key names no object
	keys      []string
	pid       int                // 0 if unknown
	resources []lockmgr.Resource // those of its records that can be read
	problem   string
}

// keep leaves an object's entries in the lock-holder as they are, so that
// its locks stay held, and says so at error level (at every start, as long
// as the entries are there). Only vmlockd's copies of the descriptors are
// closed: the holder has its own, so no lock is freed.
func (d *Daemon) keep(uuid string, pid int, chunks []restoredChunk, unadopted []*lockholder.Entry, problem string) {
	keys := make([]string, 0, len(chunks)+len(unadopted))
	var resources []lockmgr.Resource
	for _, c := range chunks {
		keys = append(keys, c.e.Key)
		c.e.Close()
		if c.err == nil {
			for _, l := range c.rec.Leases {
				resources = append(resources, l.Resource)
			}
			resources = append(resources, c.rec.ReadOnly...)
		}
	}
	for _, e := range unadopted {
		keys = append(keys, e.Key)
		for _, l := range decodeUnadopted(e) {
			resources = append(resources, l.Resource)
			l.file.Close()
		}
	}
	d.log.Error("restore: keeping an object's lock-holder records and locks untouched: vmlockd cannot tell that its owner is gone (see docs/operations.md, \"Troubleshooting\")",
		"uuid", uuid, "pid", pid, "keys", keys, "problem", problem, "lock_holder_pid", d.holder.PID())
	d.mu.Lock()
	if d.kept == nil {
		d.kept = map[string]keptObject{}
	}
	id := uuid
	if id == "" {
		id = keys[0] // a key that names no object
	}
	d.kept[id] = keptObject{uuid: uuid, keys: keys, pid: pid, resources: resources, problem: problem}
	d.mu.Unlock()
}

func (d *Daemon) keptCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.kept)
}

// keptLocked refuses a registration of uuid while restore kept its records:
// a registration's first record would replace the kept chunk 0, freeing
// its locks while their owner may run. Called with d.mu held.
func (d *Daemon) keptLocked(uuid string) error {
	k, ok := d.kept[uuid]
	if !ok {
		return nil
	}
	return lockmgr.Errorf(lockmgr.CodeBusy,
		"object %s still holds locks from before vmlockd's last start, kept by the lock-holder (records %s, pid %d) because vmlockd cannot tell that their owner is gone (%s); see docs/operations.md",
		uuid, strings.Join(k.keys, ", "), k.pid, k.problem)
}

// pinOwner is openProcess of a restored owner, tried a few times while it
// fails for another reason than errGone (too many open files, no memory,
// /proc unreadable: such errors say nothing about the owner, and may pass).
func (d *Daemon) pinOwner(ctx context.Context, pid int, start uint64) (*process, error) {
	open := d.cfg.openProcess
	if open == nil {
		open = openProcess
	}
	const tries = 4
	for try := 1; ; try++ {
		p, err := open(pid, start)
		if err == nil || errors.Is(err, errGone) || try == tries {
			return p, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(time.Duration(try) * 20 * time.Millisecond):
		}
	}
}

// recordPID is the owner pid of a record that decodeRecord refused, if it
// can be read at all (for the log), or 0.
func recordPID(meta []byte) int {
	var r struct {
		Object struct {
			PID int `json:"pid"`
		} `json:"object"`
	}
	_ = json.Unmarshal(meta, &r)
	return r.Object.PID
}

func parseRecordKey(k string) (uuid string, chunk int, ok bool) {
	rest, ok := strings.CutPrefix(k, "O/")
	if !ok {
		return "", 0, false
	}
	uuid, c, ok := strings.Cut(rest, "/")
	if !ok {
		return "", 0, false
	}
	chunk, err := strconv.Atoi(c)
	// Only the spelling recordKey writes: "00" or "+0" would be a second
	// record of one chunk.
	return uuid, chunk, err == nil && chunk >= 0 && strconv.Itoa(chunk) == c
}

// recordError is what decodeRecord finds wrong with a lock-holder record.
type recordError struct {
	Key string
	Err error
}

func (e *recordError) Error() string { return "lock-holder record " + e.Key + ": " + e.Err.Error() }
func (e *recordError) Unwrap() error { return e.Err }

// decodeRecord reads the lock-holder record meta, kept under key, as
// writeRecord writes it: the object's uuid and the chunk number (from the
// key) and the record, which is of that object. Anything else is a
// *recordError: restore puts what it accepts into the lock table as it is,
// so it accepts only what writeRecord can have written (a valid object
// with its canonical uuid, canonical resources, leases that are not
// read-only, read-only uses that are, a known migration role).
func decodeRecord(key string, meta []byte) (string, int, objectRecord, error) {
	uuid, chunk, ok := parseRecordKey(key)
	if !ok {
		return "", 0, objectRecord{}, &recordError{key, errors.New("not the key of an object's record")}
	}
	var rec objectRecord
	if err := json.Unmarshal(meta, &rec); err != nil {
		return "", 0, objectRecord{}, &recordError{key, err}
	}
	if err := checkRecord(uuid, &rec); err != nil {
		return "", 0, objectRecord{}, &recordError{key, err}
	}
	return uuid, chunk, rec, nil
}

// checkRecord checks that rec is what writeRecord writes for object uuid.
func checkRecord(uuid string, rec *objectRecord) error {
	if o := rec.Object; o.UUID != uuid {
		return fmt.Errorf("the record is of object %q", o.UUID)
	} else if err := o.Validate(); err != nil {
		return err
	} else if o.UUID != uuid {
		return fmt.Errorf("uuid %q is not in lower case", uuid)
	}
	if rec.UID < -1 {
		return fmt.Errorf("uid %d", rec.UID)
	}
	canonical := func(r lockmgr.Resource) error {
		if err := r.Validate(); err != nil {
			return err
		}
		if r.Type == lockmgr.TypeDisk && !lockmgr.InCanonicalForm(r.Name) {
			return fmt.Errorf("disk path %q is not canonical", r.Name)
		}
		return nil
	}
	for _, l := range rec.Leases {
		switch err := canonical(l.Resource); {
		case err != nil:
			return fmt.Errorf("lease: %w", err)
		case l.Resource.Mode == lockmgr.ReadOnly:
			return fmt.Errorf("lease of %s is read-only", l.Resource)
		case l.File < -1:
			return fmt.Errorf("lease of %s: file %d", l.Resource, l.File)
		}
	}
	for _, r := range rec.ReadOnly {
		if err := canonical(r); err != nil {
			return fmt.Errorf("read-only use: %w", err)
		}
		if r.Mode != lockmgr.ReadOnly {
			return fmt.Errorf("read-only use of %s is %s", r, r.Mode)
		}
	}
	if m := rec.Migration; m != nil {
		if m.Role != roleSource && m.Role != roleTarget {
			return fmt.Errorf("migration role %q", m.Role)
		}
		for _, r := range m.Pending {
			if err := canonical(r); err != nil {
				return fmt.Errorf("migration: %w", err)
			}
		}
	}
	return nil
}

// watchLocked ties uuid's locks to p's life and returns the process that is
// watched: p, or the one already watched for its pid (p is then closed).
// Called with d.mu held.
func (d *Daemon) watchLocked(uuid string, p *process) *process {
	pr := d.procs[p.pid]
	if pr == nil {
		pr = &processRefs{p: p, uuids: map[string]bool{}}
		d.procs[p.pid] = pr
		go d.onExit(pr)
	} else if pr.p != p {
		p.close() // we already watch this process
	}
	pr.uuids[uuid] = true
	return pr.p
}

// pinLocked returns the watched process pid, opening a pidfd only if it is
// not watched yet. Watches are kept until the process exits, so an owner
// that locks and releases in a loop costs one pidfd_open, not one a call.
// Called with d.mu held.
func (d *Daemon) pinLocked(pid int) (*process, error) {
	// A watched process that still answers signal 0 is alive, so its pid
	// cannot have been reused.
	if pr := d.procs[pid]; pr != nil && pr.p.alive() {
		return pr.p, nil
	}
	return openProcess(pid, 0)
}

// onExit releases every object of a process when it exits.
func (d *Daemon) onExit(pr *processRefs) {
	<-pr.p.done
	if !pr.p.dead {
		return // we stopped watching it: not an exit
	}
	d.mu.Lock()
	if d.procs[pr.p.pid] == pr {
		delete(d.procs, pr.p.pid)
	}
	uuids := make([]string, 0, len(pr.uuids))
	for u := range pr.uuids {
		uuids = append(uuids, u)
	}
	d.mu.Unlock()
	pr.p.close()
	for _, u := range uuids {
		ctx, cancel := context.WithTimeout(context.Background(), d.cfg.RequestTimeout)
		// Only the object this process owned: it may have been released
		// since and registered again, by another process.
		err := d.forgetOf(ctx, u, pr.p.pid)
		cancel()
		if err != nil && !errors.Is(err, lockmgr.ErrNotRegistered) {
			d.log.Error("releasing the locks of an exited owner", "uuid", u, "pid", pr.p.pid, "err", err)
			continue
		}
		if err == nil {
			d.log.Info("owner exited; its locks are released", "uuid", u, "pid", pr.p.pid)
		}
		d.libvirtForgotten(u)
	}
}

// forget releases everything of uuid and forgets it. The Manager's
// observer drops its holder records.
func (d *Daemon) forget(ctx context.Context, uuid string) error {
	return d.forgetOf(ctx, uuid, 0)
}

// forgetOf is forget of the object uuid only if it is registered for
// process pid (any, if pid is 0); otherwise it changes nothing and returns
// a not-registered error. The owner record goes only if it is the
// forgotten object's: a new registration of the uuid may have made its own
// since the object was unregistered.
func (d *Daemon) forgetOf(ctx context.Context, uuid string, pid int) error {
	var gone lockmgr.Object
	err := d.mgr.UnregisterIf(ctx, uuid, func(o lockmgr.Object) bool {
		gone = o
		return pid == 0 || o.PID == pid
	})
	if err != nil && errors.Is(err, lockmgr.ErrNotRegistered) {
		return err
	}
	d.mu.Lock()
	if o := d.owners[uuid]; o != nil && o.obj.PID == gone.PID {
		delete(d.owners, uuid)
		if pr := d.procs[o.proc.pid]; pr != nil {
			delete(pr.uuids, uuid)
		}
	}
	d.mu.Unlock()
	return err
}

func (d *Daemon) ownerCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.owners)
}

// observer keeps the lock-holder's records in step with the lock table:
// after every change of an object it rewrites the object's record, with
// every lease file attached, before the call that made the change returns.
//
// A write that fails has the holder replaced (resyncHolder), which records
// every object again from the table as it is after the change, so the
// change is recorded all the same. Only a holder that did not answer
// within the call's deadline (ctx, or lockholder.DefaultTimeout) fails the
// call: its caller has given up, so a grant or a change of mode is undone
// (lockmgr releases it, or changes it back) rather than left held by a
// call that failed.
type observer Daemon

func (ob *observer) Changed(ctx context.Context, o lockmgr.Object, leases []lockmgr.Lease, ro []lockmgr.Resource) error {
	d := (*Daemon)(ob)
	d.recordMu.RLock()
	h := d.holder
	err := d.writeRecord(ctx, h, o, leases, ro)
	d.recordMu.RUnlock()
	if err == nil {
		return nil
	}
	d.resyncHolder(h, err)
	if errors.As(err, new(*lockholder.NotAnsweringError)) {
		return &lockmgr.Error{Code: lockmgr.CodeTimeout, Msg: "the lock-holder did not record it in time and was replaced", Err: err}
	}
	return nil
}

// writeRecord writes o's record to h: what it holds now, with every lease
// file attached. It returns the first error of h (the holder is gone, or
// did not answer in time: after either, every write to h fails).
func (d *Daemon) writeRecord(ctx context.Context, h *lockholder.Client, o lockmgr.Object, leases []lockmgr.Lease, ro []lockmgr.Resource) error {
	d.mu.Lock()
	ow := d.owners[o.UUID]
	var rec objectRecord
	var pidfd *os.File // the owner, for the lock-holder's fencing
	prev := 1
	if ow != nil {
		if len(leases) > 0 || len(ro) > 0 {
			ow.mig.keepHeld(leases, ro)
		}
		rec = objectRecord{Object: o, UID: ow.uid, Start: ow.proc.start, Since: ow.since, ReadOnly: ro, Migration: ow.mig.clone()}
		prev = ow.chunks
		if d.cfg.Fencer != nil && len(leases) > 0 {
			pidfd = ow.proc.file
		}
	} else {
		rec = objectRecord{Object: o, UID: -1, Since: time.Now(), ReadOnly: ro}
	}
	d.mu.Unlock()
	if len(leases) == 0 && len(ro) == 0 {
		d.setChunks(o.UUID, 0)
		err := h.DropPrefix(ctx, "O/"+o.UUID+"/") // the L entries too
		d.mu.Lock()
		d.forgetUnadoptedLocked(o.UUID)
		d.mu.Unlock()
		return err
	}
	// The mark's pending resources go with their leases (see objectRecord);
	// the mark keeps those held read-only.
	var pending map[string]bool
	if mig := rec.Migration; mig != nil && len(mig.Pending) > 0 {
		pending = make(map[string]bool, len(mig.Pending))
		for _, p := range mig.Pending {
			pending[p.Key()] = true
		}
		readonly := make(map[string]bool)
		for _, r := range ro {
			if pending[r.Key()] {
				readonly[r.Key()] = true
			}
		}
		mig.Pending = slices.DeleteFunc(mig.Pending, func(p lockmgr.Resource) bool { return !readonly[p.Key()] })
		if len(mig.Pending) == 0 {
			mig.Pending = nil
		}
	}
	// The new chunks, then drops of the chunks no longer used, applied by
	// the holder as one (lockholder.Client.Apply): a crash of vmlockd in
	// the middle of a record of several chunks leaves the old record whole.
	var ops []lockholder.Op
	var first error
	// Each chunk takes up to MaxFiles of the leases and then the read-only
	// resources, fewer where their names make the record longer than
	// MaxMeta (the holder takes no longer one): halved until it fits.
	// Chunk 0 also carries the object's migration mark (without the
	// pending resources that are leases).
	chunks := 0
	for ls, rs := 0, 0; chunks == 0 || ls < len(leases) || rs < len(ro); chunks++ {
		n, m := min(lockholder.MaxFiles, len(leases)-ls), len(ro)-rs
		var b []byte
		var files []*os.File
		var err error
		for {
			r := rec
			r.ReadOnly = ro[rs : rs+m]
			if chunks > 0 {
				r.Migration = nil
			}
			r.Leases = make([]leaseRecord, 0, n)
			files = nil
			for _, l := range leases[ls : ls+n] {
				lr := leaseRecord{Resource: l.Resource(), Token: l.Token(), File: -1}
				lr.Pending = pending[lr.Resource.Key()]
				if fl, ok := l.(lockmgr.FileLease); ok && fl.File() != nil {
					lr.File = len(files)
					files = append(files, fl.File())
				}
				r.Leases = append(r.Leases, lr)
			}
			b, err = json.Marshal(r)
			if err != nil || len(b) <= lockholder.MaxMeta || n+m <= 1 {
				break
			}
			if m >= n {
				m /= 2
			} else {
				n /= 2
			}
		}
		if err == nil {
			op := lockholder.Op{Key: recordKey(o.UUID, chunks), Meta: b, Files: files}
			if chunks == 0 {
				op.Owner = pidfd
			}
			ops = append(ops, op)
		} else if first == nil {
			first = err
		}
		ls, rs = ls+n, rs+m
	}
	for c := chunks; c < prev; c++ {
		ops = append(ops, lockholder.Op{Key: recordKey(o.UUID, c), Drop: true})
	}
	if err := h.Apply(ctx, ops); err != nil && first == nil {
		first = err
	}
	d.setChunks(o.UUID, chunks)
	return first
}

// watchHolder checks every second that the lock-holder is alive, so that
// one that died is replaced even if no lock changes meanwhile.
func (d *Daemon) watchHolder(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.ensureHolder()
		}
	}
}

// ensureHolder replaces the lock-holder if it is gone.
func (d *Daemon) ensureHolder() {
	d.recordMu.RLock()
	h := d.holder
	alive := h.Alive()
	d.recordMu.RUnlock()
	if !alive {
		cause := h.Err() // why the client gave up on it, if it did
		if cause == nil {
			cause = errors.New("the lock-holder closed its connection")
		}
		d.resyncHolder(h, cause)
	}
}

// resyncHolder replaces a lock-holder that failed (it was killed, its
// socket broke, or it did not answer in time) while vmlockd runs: until
// then every lock is still held by vmlockd's own descriptors, but a crash
// of vmlockd would lose those the holder no longer keeps. It kills a
// holder that did not answer in time (killHolder), starts a new one and
// records every object again, with its lease files, and re-arms the fence
// deadline. Several calls for one failure do the work once.
func (d *Daemon) resyncHolder(failed *lockholder.Client, cause error) {
	d.killHolder(failed)
	d.recordMu.Lock()
	defer d.recordMu.Unlock()
	if d.holder != failed || d.holderClosed {
		return // replaced already (every record rewritten since), or we are stopping
	}
	d.log.Error("lock-holder: lost; starting a new one and recording every lock again", "err", cause)
	start := d.cfg.HolderCommand
	if start == nil {
		start = func() error { return errors.New("no way to start the lock-holder configured") }
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h, err := lockholder.Connect(ctx, d.cfg.StateDir, start)
	if err != nil {
		d.log.Error("lock-holder: cannot start a new one; locks will not survive a crash of vmlockd", "err", err)
		return
	}
	failed.Close()
	d.holder = h
	// Another holder serves only once the failed one exited (the holder
	// lock), and the records restore kept untouched went with it: their
	// locks are free. The same one (it had only closed our connection)
	// still keeps them.
	d.mu.Lock()
	if pid := h.PID(); len(d.kept) > 0 && pid != 0 && failed.PID() != 0 && pid != failed.PID() {
		d.log.Warn("lock-holder: the records restore kept untouched went with the lost one; their locks are free", "objects", len(d.kept))
		d.kept = nil
	}
	d.mu.Unlock()
	if f := d.cfg.Fencer; f != nil {
		if t := f.latest(); !t.IsZero() {
			d.armHolderWith(context.Background(), h, t)
		}
	}
	n := 0
	for _, hd := range d.mgr.Holdings() {
		// Each write has its own bound (lockholder.DefaultTimeout): a
		// long table takes as long as it takes with a holder that reads.
		if err := d.writeRecord(context.Background(), h, hd.Object, hd.Leases, hd.ReadOnly); err != nil {
			d.log.Error("lock-holder: the new one failed too; locks will not survive a crash of vmlockd", "err", err)
			return
		}
		n++
	}
	d.mu.Lock()
	unadopted := maps.Clone(d.unadopted)
	d.mu.Unlock()
	for uuid, ls := range unadopted {
		if err := putUnadopted(context.Background(), h, uuid, ls, 0); err != nil {
			d.log.Error("lock-holder: the new one failed too; locks will not survive a crash of vmlockd", "err", err)
			return
		}
	}
	d.log.Info("lock-holder: replaced; every lock is recorded again", "objects", n)
}

// killHolder ends the process of a holder that did not answer in time
// (SIGKILL) and waits for its exit, before resyncHolder starts another.
// Such a holder (stopped, stuck) still owns the state directory's holder
// lock and socket, so no replacement could serve while it lives, and it
// would apply stale records if it ran again; the descriptors queued for it
// unread (each keeps its lock's open file description) are closed with it. Killing
// loses no lock: vmlockd's own descriptors hold them all, and the
// replacement gets every record. It is done before resyncHolder takes
// recordMu, so that writes still waiting on the failed holder end at once
// (EPIPE) instead of at their deadlines. A holder that failed otherwise
// (it closed its end: it is dead or going) is left alone, and so is one
// this process serves itself (tests); after Run, no holder is killed
// (holderKept).
func (d *Daemon) killHolder(h *lockholder.Client) {
	if !errors.As(h.Err(), new(*lockholder.NotAnsweringError)) {
		return
	}
	d.killMu.Lock()
	defer d.killMu.Unlock()
	if d.holderKept || d.killed == h {
		return
	}
	d.killed = h
	d.log.Error("lock-holder: did not answer in time; killing it", "pid", h.PID(), "err", h.Err())
	ctx, cancel := context.WithTimeout(context.Background(), lockholder.DefaultTimeout)
	defer cancel()
	if err := h.Kill(ctx); err != nil {
		d.log.Warn("lock-holder: cannot kill the failed one", "pid", h.PID(), "err", err)
	}
}

func (d *Daemon) setChunks(uuid string, n int) {
	d.mu.Lock()
	if ow := d.owners[uuid]; ow != nil {
		ow.chunks = n
	}
	d.mu.Unlock()
}

// sdNotify tells systemd about our state when it runs us as Type=notify.
func sdNotify(state string) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	_, _ = c.Write([]byte(state))
}
