package virtlockd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// ObjectURI is the URI of every lockmgr.Object the server registers. It
// marks the objects that the server may forget by itself once they hold
// nothing; objects registered otherwise (the native API) are only released.
const ObjectURI = "virtlockd:"

// Owners registers and forgets the objects (domains) the server creates.
// The daemon implements it to pin each object's owner process and to record
// the object so that its locks survive a restart or crash of vmlockd. Both
// methods are called while the server serialises the calls about that uuid;
// they must not call back into the Server.
type Owners interface {
	// Register adds o to the lock table. o.PID is the owner process (QEMU);
	// o.URI is ObjectURI.
	Register(ctx context.Context, o lockmgr.Object) error
	// Unregister releases every lock of the object and forgets it.
	Unregister(ctx context.Context, uuid string) error
}

// managerOwners is the default Owners: the Manager itself.
type managerOwners struct{ m *lockmgr.Manager }

func (o managerOwners) Register(_ context.Context, obj lockmgr.Object) error {
	return o.m.Register(obj)
}

func (o managerOwners) Unregister(ctx context.Context, uuid string) error {
	return o.m.Unregister(ctx, uuid)
}

// Config configures a Server. Zero fields take the defaults documented on
// each.
type Config struct {
	// Manager is the lock table. Required.
	Manager *lockmgr.Manager
	// Owners registers and forgets objects; nil means the Manager directly
	// (no pid tracking, nothing recorded across restarts).
	Owners Owners
	// Kill asks the process of an owner whose connection closed while it
	// held locks to die. The server releases the locks only once the process
	// has exited (its pidfd is readable), however it dies, and keeps them
	// while it lives. nil means SIGKILL through the peer's pidfd at once:
	// a QEMU that lost its lock connection must not go on writing, and a
	// grace period would only delay the release.
	Kill func(ctx context.Context, p *Peer) error
	// Authorize admits or refuses a connection; a refused one is closed at
	// once, as virtlockd does. nil admits only peers whose uid is this
	// process's effective uid (virtlockd's rule: root when privileged).
	Authorize func(p *Peer) error
	// Store persists the lockspaces that clients create; nil keeps them in
	// memory only. If its Load fails with a *CorruptStoreError, the error
	// is logged and the server starts without the stored lockspaces; any
	// other error of Load fails NewServer.
	Store LockspaceStore
	// Grants persists which files go with their resource's last holder
	// and the paths by which disks were acquired through symlinks, so that
	// a restarted server still removes those files and releases disks by
	// those paths (see GrantStore); nil keeps that in memory only. Records
	// it cannot load are logged, not fatal.
	Grants GrantStore
	// Lockspaces are directories served from the start (for example
	// qemu-lockd.conf's file_lockspace_dir), created (mode 0700) if missing.
	Lockspaces []string
	// Host is recorded in the objects the server registers, so that busy
	// errors on other hosts name it.
	Host string
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
	// MaxClients bounds the open connections (virtlockd's max_clients);
	// 0 means 1024. Connections beyond it are closed at once.
	MaxClients int
	// CallTimeout bounds every call's work in the lock table (a lock driver
	// that hangs on a dead NFS server); 0 means 30 s.
	CallTimeout time.Duration
	// Observe, if set, is called after every call that was decoded and
	// answered: its procedure, how long it took, and its error (nil for
	// success). For metrics; it must not block.
	Observe func(p Procedure, took time.Duration, err *RemoteError)
}

// Server serves virtlockd's protocol on top of a lockmgr.Manager. Create it
// with NewServer; it is safe for concurrent use, and one Server may Serve
// several listeners.
type Server struct {
	mgr         *lockmgr.Manager
	owners      Owners
	kill        func(ctx context.Context, p *Peer) error
	authorize   func(p *Peer) error
	store       LockspaceStore
	grantStore  GrantStore
	host        string
	log         *slog.Logger
	maxClients  int64
	callTimeout time.Duration
	euid        int
	observe     func(Procedure, time.Duration, *RemoteError)

	ownerLocks keyedMutex // by object uuid; taken before keyLocks
	keyLocks   keyedMutex // by resource key
	storeLocks keyedMutex // by resource key: one write of its record at a time; taken last
	clients    atomic.Int64

	mu     sync.Mutex
	grants map[string]*grant // by resource key: resources granted through this server
	// spelled keeps, by object uuid, the disk paths of the default
	// lockspace that the owner acquired by a name other than the disk's
	// canonical path (a symlink), with the key of the disk granted:
	// libvirt releases by the path it acquired by, and the link may have
	// been retargeted since. It is kept in the grant store too, for a
	// restart.
	spelled map[string]map[string]string
	// stored holds the resource keys that have a record in the grant store.
	stored map[string]bool

	lsMu       sync.Mutex
	lockspaces map[string]*lockspace // by path as clients name it
	persisted  []string              // the paths in the store, sorted

	// connDone, if set (tests), is called after a connection has been
	// closed and the close rule applied.
	connDone func(peer *Peer, owner *Owner)
}

// grant is the server's record of a resource it granted: how many times
// each owner took it (virtlockd lets an owner take a shared resource more
// than once), and the lease file to remove when the last holder releases it.
type grant struct {
	file    string
	holders map[string]int // by object uuid
}

// NewServer returns a Server for cfg. It loads the stored lockspaces (a
// corrupt store is logged and served as empty: see Config.Store) and
// creates the directories of stored and configured lockspaces that are
// missing; a directory that cannot be created is logged and still served
// (its calls fail with the system error), so that one bad path does not stop
// the daemon. It loads the stored grants and removes the files of those
// that nobody holds any more: cfg.Manager must hold every lock it will
// keep (a restarted daemon's, taken back from its lock-holder). Grant
// records that cannot be loaded are logged and do not fail it.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Manager == nil {
		return nil, errors.New("virtlockd: Config.Manager is required")
	}
	s := &Server{
		mgr: cfg.Manager, owners: cfg.Owners, kill: cfg.Kill, authorize: cfg.Authorize,
		store: cfg.Store, grantStore: cfg.Grants, host: cfg.Host, log: cfg.Logger,
		maxClients: int64(cfg.MaxClients), callTimeout: cfg.CallTimeout, euid: os.Geteuid(), observe: cfg.Observe,
		grants:     make(map[string]*grant),
		spelled:    make(map[string]map[string]string),
		stored:     make(map[string]bool),
		lockspaces: map[string]*lockspace{"": {}},
	}
	if s.owners == nil {
		s.owners = managerOwners{cfg.Manager}
	}
	if s.kill == nil {
		s.kill = func(_ context.Context, p *Peer) error { return p.Signal(unix.SIGKILL) }
	}
	if s.authorize == nil {
		s.authorize = s.sameUID
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.maxClients <= 0 {
		s.maxClients = 1024
	}
	if s.callTimeout <= 0 {
		s.callTimeout = 30 * time.Second
	}
	var stored []string
	if s.store != nil {
		var err error
		var corrupt *CorruptStoreError
		switch stored, err = s.store.Load(); {
		case errors.As(err, &corrupt):
			// Served without them, no resource can be granted twice: calls
			// in a lockspace not served fail.
			s.log.Error("starting without the stored lockspaces", "err", err)
		case err != nil:
			return nil, fmt.Errorf("virtlockd: %w", err)
		}
	}
	for _, p := range stored {
		if err := s.addLockspace(p); err != nil {
			s.log.Error("cannot serve a stored lockspace", "path", p, "err", err)
			continue
		}
		s.persisted = append(s.persisted, p)
	}
	slices.Sort(s.persisted)
	s.persisted = slices.Compact(s.persisted)
	for _, p := range cfg.Lockspaces {
		if _, ok := s.lockspaces[p]; ok {
			continue
		}
		if err := s.addLockspace(p); err != nil {
			return nil, fmt.Errorf("virtlockd: configured lockspace: %w", err)
		}
	}
	s.loadGrants()
	return s, nil
}

// loadGrants rebuilds the server's records from the grant store: each
// holder of a resource with a file counted once, and the paths by which
// its holders acquired a disk. A file whose resource nobody holds (its
// owners exited while the daemon was down) is removed, and the paths of
// objects that no longer hold the disk are forgotten. Records the store
// cannot read are logged: their resources lose only what they recorded.
func (s *Server) loadGrants() {
	if s.grantStore == nil {
		return
	}
	recs, err := s.grantStore.Load()
	if err != nil {
		s.log.Error("cannot load every libvirt grant record; the others are kept", "err", err)
	}
	holders := make(map[string]map[string]bool, len(recs))
	for _, li := range s.mgr.Locks() {
		if _, ok := recs[li.Resource.Key()]; ok {
			hs := make(map[string]bool, len(li.Holders))
			for _, h := range li.Holders {
				hs[h.UUID] = true
			}
			holders[li.Resource.Key()] = hs
		}
	}
	for key, rec := range recs {
		s.stored[key] = true
		hs := holders[key]
		stale := false
		for uuid, paths := range rec.Spelled {
			if !hs[uuid] {
				stale = true
				continue
			}
			m := s.spelled[uuid]
			if m == nil {
				m = make(map[string]string, len(paths))
				s.spelled[uuid] = m
			}
			for _, p := range paths {
				m[p] = key
			}
		}
		switch {
		case rec.File != "" && len(hs) == 0:
			s.removeFile(key, rec.File)
		case rec.File != "":
			g := seededGrant(hs, "")
			g.file = rec.File
			s.grants[key] = g
		}
		if stale {
			s.persist(key)
		}
	}
}

// addLockspace registers the lockspace directory p, creating it if needed.
// It fails only for a path that is not absolute; a directory it cannot
// create is logged.
func (s *Server) addLockspace(p string) error {
	if !filepath.IsAbs(p) {
		return fmt.Errorf("lockspace path %q is not absolute", p)
	}
	if err := makeLockspaceDir(p); err != nil {
		s.log.Error("lockspace directory unusable", "path", p, "err", err)
	}
	s.lockspaces[p] = &lockspace{path: p, dir: filepath.Clean(p), name: LockspaceName(p)}
	return nil
}

// makeLockspaceDir creates p (mode 0700) unless it is a directory already.
func makeLockspaceDir(p string) *RemoteError {
	fi, err := os.Stat(p)
	switch {
	case err == nil && !fi.IsDir():
		return newRemoteError(CodeInternalError, DomainLockspace, fmt.Sprintf("Lockspace location %s exists, but is not a directory", p))
	case err == nil:
		return nil
	}
	if err := os.MkdirAll(p, 0o700); err != nil {
		return systemError(fmt.Sprintf("Unable to create lockspace %s", p), err)
	}
	return nil
}

func (s *Server) sameUID(p *Peer) error {
	if p.UID != s.euid {
		return fmt.Errorf("uid %d is not this daemon's uid %d", p.UID, s.euid)
	}
	return nil
}

// Lockspaces returns the paths of every lockspace served, sorted; "" is the
// default lockspace.
func (s *Server) Lockspaces() []string {
	s.lsMu.Lock()
	defer s.lsMu.Unlock()
	out := make([]string, 0, len(s.lockspaces))
	for p := range s.lockspaces {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// Listen creates a unix socket at path for Serve, mode 0600 (its directory
// 0755 if missing). A socket file
// left by a dead daemon (connecting is refused) is replaced; a live one
// (something answers on it, or connecting fails otherwise, as with a full
// backlog) is an error, so that vmlockd never steals a running virtlockd's
// socket.
func Listen(ctx context.Context, path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("virtlockd: %s exists and is not a socket", path)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		switch {
		case err == nil:
			c.Close()
			return nil, fmt.Errorf("virtlockd: %s is in use by another daemon", path)
		case errors.Is(err, syscall.ECONNREFUSED): // nobody listens: stale
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("virtlockd: removing a stale socket: %w", err)
			}
		case !errors.Is(err, syscall.ENOENT):
			// EAGAIN: a live daemon with a full backlog; anything else
			// cannot tell a live socket from a stale one either.
			return nil, fmt.Errorf("virtlockd: %s may be in use by another daemon: %w", path, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("virtlockd: %w", err)
	}
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("virtlockd: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("virtlockd: %w", err)
	}
	return l, nil
}

// Serve accepts connections on l and serves each until ctx is done or
// Accept fails for good; it then closes l and every connection and returns
// once all of them are finished: nil if ctx ended it, else the Accept error.
// A shutdown releases no lock: the close rule (see the package comment)
// applies only to connections that their peers close.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: ends every connection
	backoff := time.Duration(0)
	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if isTemporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "in", backoff)
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(backoff):
				}
				continue
			}
			return fmt.Errorf("virtlockd: accept: %w", err)
		}
		backoff = 0
		if s.clients.Add(1) > s.maxClients {
			s.clients.Add(-1)
			s.log.Warn("too many clients; refusing a connection", "max", s.maxClients)
			nc.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.clients.Add(-1)
			s.serveConn(ctx, nc)
		}()
	}
}

func isTemporary(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EINTR)
}

// conn is the state of one connection: the protocol's per-client state.
type conn struct {
	nc         net.Conn
	peer       *Peer
	owner      *Owner         // nil until REGISTER
	obj        lockmgr.Object // owner as a lockmgr object
	restricted bool
	wbuf       []byte
	args       argsBuf // the call being served
}

func (s *Server) serveConn(ctx context.Context, nc net.Conn) {
	peer, err := peerOf(nc)
	if err != nil {
		s.log.Error("refusing a client", "err", err)
		nc.Close()
		return
	}
	if err := s.authorize(peer); err != nil {
		s.log.Warn("refusing a client", "pid", peer.PID, "uid", peer.UID, "err", err)
		peer.Close()
		nc.Close()
		return
	}
	c := &conn{nc: nc, peer: peer}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	rd := NewReader(nc, MaxCallSize)
	for {
		h, payload, err := rd.Next()
		var rerr *RemoteError
		reply := false
		switch {
		case err == nil:
			t0 := time.Now()
			rerr, reply = s.dispatch(ctx, c, h, payload)
			if reply && s.observe != nil && h.Procedure.valid() {
				s.observe(h.Procedure, time.Since(t0), rerr)
			}
		case errors.Is(err, ErrMessageTooLarge):
			rerr = newRemoteError(CodeRPC, DomainRPC, fmt.Sprintf("Unable to decode message payload: %v", err))
			reply = h.Type == TypeCall || h.Type == TypeCallWithFDs
		default:
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				s.log.Debug("client connection ends", "pid", peer.PID, "err", err)
			}
		}
		if err != nil && !errors.Is(err, ErrMessageTooLarge) {
			break
		}
		if rerr != nil {
			level := slog.LevelDebug
			if rerr.Code == CodeResourceBusy {
				level = slog.LevelInfo
			}
			s.log.Log(ctx, level, "call refused", "proc", h.Procedure, "pid", peer.PID, "code", rerr.Code, "err", rerr.Error())
		}
		if reply && !s.reply(c, h, rerr) {
			break
		}
	}
	stop()
	nc.Close()
	if ctx.Err() != nil { // shutdown: keep every lock
		peer.Close()
		return
	}
	s.closeRule(ctx, c)
	if s.connDone != nil {
		s.connDone(peer, c.owner)
	}
}

// reply writes the reply to the call h; false if the connection failed.
func (s *Server) reply(c *conn, h Header, rerr *RemoteError) bool {
	b, err := AppendReply(c.wbuf[:0], h, rerr)
	if err != nil {
		s.log.Error("cannot encode a reply", "err", err)
		b, _ = AppendReply(c.wbuf[:0], h, newRemoteError(CodeInternalError, DomainRPC, "the error reply could not be encoded"))
	}
	c.wbuf = b
	if err := c.nc.SetWriteDeadline(time.Now().Add(s.callTimeout)); err != nil {
		return false
	}
	if _, err := c.nc.Write(b); err != nil {
		s.log.Debug("cannot write a reply", "pid", c.peer.PID, "err", err)
		return false
	}
	return true
}

// keyedMutex is a set of mutexes by name, created on demand. Entries are
// reused, so that locking allocates nothing on the hot path.
type keyedMutex struct {
	mu   sync.Mutex
	m    map[string]*keyedEntry
	free []*keyedEntry // entries nobody uses, for reuse
}

type keyedEntry struct {
	sync.Mutex
	refs int
}

// keepFree bounds the entries a keyedMutex keeps for reuse.
const keepFree = 64

// keyedLock is a held mutex of a keyedMutex.
type keyedLock struct {
	k   *keyedMutex
	key string
	e   *keyedEntry
}

// lock locks the mutex of key; the caller unlocks it with unlock.
func (k *keyedMutex) lock(key string) keyedLock {
	k.mu.Lock()
	if k.m == nil {
		k.m = make(map[string]*keyedEntry)
	}
	e := k.m[key]
	if e == nil {
		if n := len(k.free); n > 0 {
			e, k.free = k.free[n-1], k.free[:n-1]
		} else {
			e = &keyedEntry{}
		}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.Lock()
	return keyedLock{k, key, e}
}

// unlock unlocks the mutex.
func (l keyedLock) unlock() {
	l.e.Unlock()
	k := l.k
	k.mu.Lock()
	if l.e.refs--; l.e.refs == 0 {
		delete(k.m, l.key)
		if len(k.free) < keepFree {
			k.free = append(k.free, l.e)
		}
	}
	k.mu.Unlock()
}
