package virtlockd

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// dispatch handles one message and says whether and what to reply. The
// order of the checks is libvirt's: message type, program, status,
// procedure, payload; then each procedure's own checks.
func (s *Server) dispatch(ctx context.Context, c *conn, h Header, payload []byte) (*RemoteError, bool) {
	if h.Type != TypeCall && h.Type != TypeCallWithFDs {
		// Nothing waits for a reply to these; libvirt drops them too.
		s.log.Debug("dropping a message that is not a call", "type", h.Type, "pid", c.peer.PID)
		return nil, false
	}
	if h.Program != Program || h.Version != ProgramVersion {
		return newRemoteError(CodeRPC, DomainRPC, fmt.Sprintf("Cannot find program %d version %d", h.Program, h.Version)), true
	}
	if h.Type != TypeCall {
		return newRemoteError(CodeRPC, DomainRPC, fmt.Sprintf("Unexpected message type %d", h.Type)), true
	}
	if h.Status != StatusOK {
		return newRemoteError(CodeRPC, DomainRPC, fmt.Sprintf("Unexpected message status %d", h.Status)), true
	}
	if !h.Procedure.valid() {
		return newRemoteError(CodeRPC, DomainRPC, fmt.Sprintf("unknown procedure: %d", h.Procedure)), true
	}
	args, err := c.args.decode(h.Procedure, payload)
	if err != nil {
		return newRemoteError(CodeRPC, DomainRPC, fmt.Sprintf("Unable to decode message payload: %v", err)), true
	}
	if h.Procedure == ProcAcquireResource || h.Procedure == ProcReleaseResource {
		// Only these wait on the lock table and its driver; a deadline
		// costs a timer, which libvirt's REGISTER before each need not pay.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.callTimeout)
		defer cancel()
	}
	return s.call(ctx, c, args), true
}

// cFunc is the name of virtlockd's dispatch function of p, which its
// unknown-flags message names.
func cFunc(p Procedure) string {
	switch p {
	case ProcCreateLockspace:
		return "virLockSpaceProtocolDispatchCreateLockSpace"
	case ProcNew:
		return "virLockSpaceProtocolDispatchNew"
	}
	// REGISTER → virLockSpaceProtocolDispatchRegister, and so on.
	var b strings.Builder
	b.WriteString("virLockSpaceProtocolDispatch")
	for _, w := range strings.Split(strings.ToLower(p.String()), "_") {
		b.WriteString(strings.ToUpper(w[:1]) + w[1:])
	}
	return b.String()
}

// The dispatcher's own errors (domain RPC, as virtlockd's dispatcher).
func errFlags(p Procedure, unsupported uint32) *RemoteError {
	return newRemoteError(CodeInvalidArg, DomainRPC, fmt.Sprintf("unsupported flags (0x%x) in function %s", unsupported, cFunc(p)))
}

func errRestricted() *RemoteError {
	return newRemoteError(CodeOperationDenied, DomainRPC, "lock manager connection has been restricted")
}

func errNotRegistered() *RemoteError {
	return newRemoteError(CodeOperationInvalid, DomainRPC, "lock owner details have not been registered")
}

func errNoLockspace(path string) *RemoteError {
	return newRemoteError(CodeInternalError, DomainRPC, fmt.Sprintf("Lockspace for path %s does not exist", path))
}

// call applies virtlockd's checks in its order (unknown flags, restricted
// connection, unregistered owner, unknown lockspace) and runs the procedure.
func (s *Server) call(ctx context.Context, c *conn, args Args) *RemoteError {
	p := args.Procedure()
	var flags, allowed uint32
	switch a := args.(type) {
	case *RegisterArgs:
		flags = a.Flags
	case *RestrictArgs:
		flags = a.Flags
	case *NewArgs:
		flags = a.Flags
	case *CreateResourceArgs:
		flags = a.Flags
	case *DeleteResourceArgs:
		flags = a.Flags
	case *AcquireResourceArgs:
		flags, allowed = a.Flags, AcquireShared|AcquireAutoCreate
	case *ReleaseResourceArgs:
		flags = a.Flags
	}
	if bad := flags &^ allowed; bad != 0 {
		return errFlags(p, bad)
	}
	if c.restricted {
		return errRestricted()
	}
	switch a := args.(type) {
	case *RegisterArgs:
		return s.register(c, a)
	case *CreateLockspaceArgs:
		return s.createLockspace(a.Path, false)
	}
	if c.owner == nil {
		return errNotRegistered()
	}
	switch a := args.(type) {
	case *RestrictArgs:
		c.restricted = true
		return nil
	case *NewArgs:
		if a.Path == "" {
			return newRemoteError(CodeOperationInvalid, DomainRPC, "the default lockspace already exists")
		}
		return s.createLockspace(a.Path, true)
	}
	var path, name string
	switch a := args.(type) {
	case *CreateResourceArgs:
		path, name = a.Path, a.Name
	case *DeleteResourceArgs:
		path, name = a.Path, a.Name
	case *AcquireResourceArgs:
		path, name = a.Path, a.Name
	case *ReleaseResourceArgs:
		path, name = a.Path, a.Name
	}
	s.lsMu.Lock()
	ls := s.lockspaces[path]
	s.lsMu.Unlock()
	if ls == nil {
		return errNoLockspace(path)
	}
	switch p {
	case ProcCreateResource:
		return s.createResource(ls, name)
	case ProcDeleteResource:
		return s.deleteResource(ls, name)
	case ProcAcquireResource:
		return s.acquire(ctx, c, ls, name, flags)
	case ProcReleaseResource:
		return s.release(ctx, c, ls, name)
	}
	return newRemoteError(CodeInternalError, DomainRPC, "unhandled procedure "+p.String())
}

// register records the owner on the connection; a second REGISTER
// overwrites the first. The owner is checked as a lockmgr.Object here, so
// that a bad owner fails at REGISTER rather than at its first ACQUIRE.
func (s *Server) register(c *conn, a *RegisterArgs) *RemoteError {
	if a.Owner.ID == 0 {
		return errNotRegistered() // sic: virtlockd's message for an owner id of 0
	}
	if c.owner != nil && *c.owner == a.Owner {
		return nil // libvirt registers again before each call: checked already
	}
	// Any domain name is taken, as virtlockd takes it (libvirt forbids
	// only a newline in one): it is recorded and shown escaped and cut.
	o := lockmgr.Object{
		UUID: formatUUID(a.Owner.UUID), Name: lockmgr.SafeField(a.Owner.Name), ID: int(a.Owner.ID), PID: int(a.Owner.PID),
		URI: ObjectURI, Host: s.host,
	}
	if err := o.Validate(); err != nil {
		return newRemoteError(CodeInvalidArg, DomainRPC, "lock owner: "+err.Error())
	}
	owner := a.Owner
	c.owner, c.obj = &owner, o
	return nil
}

// formatUUID returns u in the 8-4-4-4-12 lowercase hex form.
func formatUUID(u [16]byte) string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:], u[10:16])
	return string(b[:])
}

// createLockspace serves the directory path (CREATE_LOCKSPACE, or NEW when
// isNew): it creates the directory (mode 0700) if needed and records the
// path in the store. CREATE_LOCKSPACE of a served path succeeds; NEW fails.
// A served path that is not in the store yet (a configured lockspace) is
// recorded too, so that it is served after a restart even if the
// configuration no longer lists it.
func (s *Server) createLockspace(path string, isNew bool) *RemoteError {
	s.lsMu.Lock()
	defer s.lsMu.Unlock()
	if _, ok := s.lockspaces[path]; ok {
		if isNew {
			return newRemoteError(CodeInternalError, DomainRPC, fmt.Sprintf("Lockspace for path %s already exists", path))
		}
		if err := s.persistLocked(path); err != nil {
			// It is served all the same: refusing would fail libvirtd's start.
			s.log.Error("cannot record a configured lockspace", "path", path, "err", err)
		}
		return nil
	}
	if !filepath.IsAbs(path) {
		return newRemoteError(CodeInvalidArg, DomainLockspace, fmt.Sprintf("lockspace path %q is not absolute", path))
	}
	if rerr := makeLockspaceDir(path); rerr != nil {
		return rerr
	}
	if err := s.persistLocked(path); err != nil {
		s.log.Error("cannot record a lockspace; refusing it", "path", path, "err", err)
		return systemError(fmt.Sprintf("Unable to record lockspace %s", path), err)
	}
	s.lockspaces[path] = &lockspace{path: path, dir: filepath.Clean(path), name: LockspaceName(path)}
	s.log.Info("lockspace created", "path", path, "lockspace", LockspaceName(path))
	return nil
}

// persistLocked adds path to the store unless it is there already, is the
// default lockspace (always served, and not a directory the store could
// name), or there is no store. Called with lsMu held.
func (s *Server) persistLocked(path string) error {
	if s.store == nil || path == "" || slices.Contains(s.persisted, path) {
		return nil
	}
	all := append(slices.Clone(s.persisted), path)
	slices.Sort(all)
	if err := s.store.Save(all); err != nil {
		return err
	}
	s.persisted = all
	return nil
}

// resource maps a resource of a lockspace onto the lock table: in the
// default lockspace, name is a disk image's absolute path and the resource
// is that disk; in a directory lockspace, name is a lease file's name and
// the resource is the lease LockspaceName(dir)/name. It also returns the
// file the name stands for. A disk's path is only cleaned here: the
// Manager resolves symlinks itself, and canonical does it where the server
// needs the resource's key (each resolution costs a system call per path
// component).
func resource(ls *lockspace, name string, m lockmgr.Mode) (lockmgr.Resource, string, *RemoteError) {
	var r lockmgr.Resource
	if ls.path == "" {
		if !filepath.IsAbs(name) {
			return r, "", newRemoteError(CodeInvalidArg, DomainLockspace,
				fmt.Sprintf("resource %q of the default lockspace is not an absolute file path", name))
		}
		r = lockmgr.DiskResource(filepath.Clean(name), m)
	} else {
		if err := lockmgr.ValidName("lease", name); err != nil {
			return r, "", remoteError(err)
		}
		r = lockmgr.LeaseResource(ls.name, name, m)
	}
	if err := r.Validate(); err != nil {
		return r, "", remoteError(err)
	}
	return r, ls.file(name), nil
}

// canonical returns r as the lock table keys it (see lockmgr.Canonical).
func canonical(r lockmgr.Resource) (lockmgr.Resource, *RemoteError) {
	if r.Type != lockmgr.TypeDisk {
		return r, nil
	}
	c, err := lockmgr.Canonical(r)
	if err != nil {
		return r, remoteError(err)
	}
	return c, nil
}

// heldAs returns the resource of leases whose key is r's, if any.
func heldAs(leases []lockmgr.Lease, r lockmgr.Resource) (lockmgr.Resource, bool) {
	for _, l := range leases {
		if h := l.Resource(); h.Type == r.Type && h.Name == r.Name { // the key, unbuilt
			return h, true
		}
	}
	return lockmgr.Resource{}, false
}

// heldKey returns the resource of leases whose key is key, if any.
func heldKey(leases []lockmgr.Lease, key string) (lockmgr.Resource, bool) {
	for _, l := range leases {
		if h := l.Resource(); hasKey(h, key) {
			return h, true
		}
	}
	return lockmgr.Resource{}, false
}

// hasKey reports whether r.Key() is key, without building it: the keys
// of a lock table's leases are compared on every ACQUIRE and RELEASE.
func hasKey(r lockmgr.Resource, key string) bool {
	t := string(r.Type)
	return len(key) == len(t)+1+len(r.Name) && key[:len(t)] == t && key[len(t)] == ':' && key[len(t)+1:] == r.Name
}

// acquire locks a resource for the connection's registered owner (the
// owner's pid, not the connection's). Shared on a shared-held resource adds
// the owner (again, if it holds it already); anything else on a held
// resource is busy, naming the holder, even for the same owner.
//
// libvirt's common case, an exclusive disk without AUTOCREATE, keeps no
// grant record in the server, and its path is resolved (symlinks) only by
// the Manager: the server locks it by its cleaned path, and records the
// path only if it named another disk path (see Server.spelled).
func (s *Server) acquire(ctx context.Context, c *conn, ls *lockspace, name string, flags uint32) *RemoteError {
	mode := lockmgr.Exclusive
	if flags&AcquireShared != 0 {
		mode = lockmgr.Shared
	}
	autocreate := flags&AcquireAutoCreate != 0
	r, file, rerr := resource(ls, name, mode)
	if rerr != nil {
		return rerr
	}
	sent := r.Name
	record := ls.path != "" || mode == lockmgr.Shared || autocreate
	if record {
		if r, rerr = canonical(r); rerr != nil {
			return rerr
		}
	}
	o := c.obj
	ownerLock := s.ownerLocks.lock(o.UUID)
	defer ownerLock.unlock()
	leases, rerr := s.ensureObject(ctx, o) // takes key locks: before ours
	if rerr != nil {
		return rerr
	}
	// The resource's lock also serialises concurrent grants of one resource:
	// the Manager checks conflicts and records grants in two steps, and
	// only a real lock driver closes the gap between them.
	keyLock := s.keyLocks.lock(r.Key())
	defer keyLock.unlock()

	if h, ok := heldAs(leases, r); ok {
		return s.acquireHeld(o, sent, r, h)
	}

	created, rerr := openResource(ls, file, autocreate)
	if rerr != nil {
		s.dropIfEmpty(ctx, o) // ensureObject may have registered it for this call
		return rerr
	}

	if err := s.mgr.AcquireResource(ctx, o.UUID, r); err != nil {
		if created && ls.path == "" {
			_ = os.Remove(file) // never leave a new file in an image directory
		}
		if !record && lockmgr.CodeOf(err) == lockmgr.CodeInvalidArgument {
			// The owner may hold this disk under another spelling.
			if cr, rerr := canonical(r); rerr == nil {
				if h, ok := heldAs(leases, cr); ok {
					return s.acquireHeld(o, sent, cr, h)
				}
			}
		}
		s.dropIfEmpty(ctx, o)
		return remoteError(err)
	}
	if r.Type == lockmgr.TypeDisk {
		granted := r
		if !record { // the Manager resolved the path itself
			granted = s.granted(o.UUID, r, leases)
		}
		s.spell(o.UUID, sent, granted)
	}
	if !record {
		return nil
	}
	var current map[string]bool
	if mode == lockmgr.Shared {
		current = s.currentHolders(r.Key())
	}
	s.mu.Lock()
	g := s.grants[r.Key()]
	hadFile := g != nil && g.file != ""
	if g != nil {
		// Forget holders that lost the resource behind the server's back
		// (the daemon released an exited owner), this owner included (it
		// held nothing before this grant); none remain after an exclusive
		// grant.
		for u := range g.holders {
			if u == o.UUID || !current[u] {
				delete(g.holders, u)
			}
		}
		if len(g.holders) == 0 {
			g = nil
		}
	}
	if g == nil {
		g = seededGrant(current, o.UUID)
		// The first holder decides whether the file goes with the last
		// one, as in virtlockd; in the default lockspace (disk images)
		// only a file this server created is ever removed.
		if autocreate && (ls.path != "" || created) {
			g.file = file
		}
		s.grants[r.Key()] = g
		if g.file != "" || hadFile {
			defer s.persist(r.Key()) // after s.mu
		}
	}
	g.holders[o.UUID]++
	s.mu.Unlock()
	return nil
}

// persist writes the grant store's record of the resource key as the
// server's records now are (its file, the paths its holders acquired it
// by), or deletes it once nothing is left to keep. The writes of one key
// are serialised and each writes the state of its own time, so the last
// one stands for the latest state. A failure is logged: the grant stands,
// only its file might stay, or a path not release it, after a restart.
func (s *Server) persist(key string) {
	if s.grantStore == nil {
		return
	}
	l := s.storeLocks.lock(key)
	defer l.unlock()
	s.mu.Lock()
	var rec GrantRecord
	if g := s.grants[key]; g != nil {
		rec.File = g.file
	}
	for uuid, m := range s.spelled {
		for p, k := range m {
			if k == key {
				if rec.Spelled == nil {
					rec.Spelled = make(map[string][]string)
				}
				rec.Spelled[uuid] = append(rec.Spelled[uuid], p)
			}
		}
	}
	had := s.stored[key]
	s.mu.Unlock()
	for _, ps := range rec.Spelled {
		slices.Sort(ps)
	}
	var err error
	switch {
	case !rec.empty():
		err = s.grantStore.Put(key, rec)
	case had:
		err = s.grantStore.Delete(key)
	default:
		return
	}
	if err != nil {
		s.log.Warn("cannot record a grant for a restart", "resource", key, "err", err)
		return
	}
	s.mu.Lock()
	s.stored[key] = !rec.empty()
	s.mu.Unlock()
}

// removeFile removes the file of the resource key, which its last holder
// released, and then updates its record in the grant store. Called with
// key's lock held, or before serving.
func (s *Server) removeFile(key, file string) {
	if err := os.Remove(file); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Warn("cannot remove an auto-created lease file", "file", file, "err", err)
		return // the record stays: the next start tries again
	}
	s.persist(key)
}

// openResource checks that the file of a resource exists (without
// AUTOCREATE) or creates it (with it); created says whether it did.
func openResource(ls *lockspace, file string, autocreate bool) (created bool, rerr *RemoteError) {
	if !autocreate {
		if fi, err := os.Stat(file); err != nil {
			return false, systemError(fmt.Sprintf("Unable to open resource %s", file), err)
		} else if fi.IsDir() {
			return false, systemError(fmt.Sprintf("Unable to open resource %s", file), syscall.EISDIR)
		}
		return false, nil
	}
	f, err := openFile(ls, file, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL)
	switch {
	case err == nil:
		created = true
	case errors.Is(err, fs.ErrExist):
		if f, err = openFile(ls, file, unix.O_RDWR); err != nil {
			return false, systemError(fmt.Sprintf("Unable to open/create resource %s", file), err)
		}
	default:
		return false, systemError(fmt.Sprintf("Unable to open/create resource %s", file), err)
	}
	f.Close()
	return created, nil
}

// seededGrant returns a new grant record of a resource, with every holder
// in current (from the lock table) but except holding it once: they were
// granted it before a restart of the server, which lost its records, and
// the file goes with the last of them.
func seededGrant(current map[string]bool, except string) *grant {
	g := &grant{holders: make(map[string]int, len(current)+1)}
	for u := range current {
		if u != except {
			g.holders[u] = 1
		}
	}
	return g
}

// acquireHeld answers an ACQUIRE of r (sent as the name sent) by an owner
// that holds it already (as h): shared on shared counts once more,
// anything else is busy, naming the owner itself. Called with the owner's
// lock held.
func (s *Server) acquireHeld(o lockmgr.Object, sent string, r, h lockmgr.Resource) *RemoteError {
	if h.Mode != lockmgr.Shared || r.Mode != lockmgr.Shared {
		return remoteError(&lockmgr.BusyError{Resource: h, Holder: lockmgr.Holder{
			Name: o.Name, UUID: o.UUID, PID: o.PID, Host: o.Host, Mode: h.Mode}})
	}
	if h.Type == lockmgr.TypeDisk {
		s.spell(o.UUID, sent, h)
	}
	current := s.currentHolders(h.Key())
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.grants[h.Key()]
	if g == nil { // granted before a restart of the server, maybe to others too
		g = seededGrant(current, "")
		s.grants[h.Key()] = g
	}
	if g.holders[o.UUID] == 0 {
		g.holders[o.UUID] = 1
	}
	g.holders[o.UUID]++
	return nil
}

// granted returns the disk that the Manager granted the object uuid for r,
// whose path it resolved itself: r if that is its canonical path, else the
// one lease the object holds now and did not hold before (leases). Called
// with the owner's lock held, right after the grant.
func (s *Server) granted(uuid string, r lockmgr.Resource, before []lockmgr.Lease) lockmgr.Resource {
	after, _, err := s.mgr.Held(uuid)
	if err != nil {
		return r
	}
	if h, ok := heldAs(after, r); ok {
		return h
	}
	for _, l := range after {
		if _, ok := heldAs(before, l.Resource()); !ok {
			return l.Resource()
		}
	}
	return r
}

// spell records that the object uuid was granted the disk d for the path
// sent, if that is not d's own path (see Server.spelled), and keeps the
// change in the grant store.
func (s *Server) spell(uuid, sent string, d lockmgr.Resource) {
	var changed []string
	s.mu.Lock()
	m := s.spelled[uuid]
	old, had := m[sent]
	if d.Name == sent && !had { // libvirt's common case: nothing to record
		s.mu.Unlock()
		return
	}
	key := d.Key()
	switch {
	case d.Name == sent && had: // the path names itself now
		delete(m, sent)
		if len(m) == 0 {
			delete(s.spelled, uuid)
		}
		changed = append(changed, old)
	case d.Name != sent && (!had || old != key):
		if m == nil {
			m = make(map[string]string)
			s.spelled[uuid] = m
		}
		m[sent] = key
		if had {
			changed = append(changed, old)
		}
		changed = append(changed, key)
	}
	s.mu.Unlock()
	for _, k := range changed {
		s.persist(k)
	}
}

// unspell forgets the paths by which the object uuid acquired the
// resource key (every path of it if key is ""), in the grant store too.
func (s *Server) unspell(uuid, key string) {
	var changed []string
	s.mu.Lock()
	m := s.spelled[uuid]
	for p, k := range m {
		if key == "" || k == key {
			delete(m, p)
			if !slices.Contains(changed, k) {
				changed = append(changed, k)
			}
		}
	}
	if len(m) == 0 {
		delete(s.spelled, uuid)
	}
	s.mu.Unlock()
	for _, k := range changed {
		s.persist(k)
	}
}

// openFile opens a resource's file; in a lockspace directory it never
// follows a symlink, so that lease names cannot lead outside it.
func openFile(ls *lockspace, file string, flags int) (*os.File, error) {
	if ls.path != "" {
		flags |= unix.O_NOFOLLOW
	}
	return os.OpenFile(file, flags|unix.O_CLOEXEC, 0o600)
}

// ensureObject makes sure the lock table has the owner's object with the
// owner's pid, and returns the leases it holds. An object of the same uuid
// with another pid is replaced if it holds nothing or its process is gone
// (a domain that was restarted); if its process still holds locks, the
// owner is refused. Called with the owner's lock held.
func (s *Server) ensureObject(ctx context.Context, o lockmgr.Object) ([]lockmgr.Lease, *RemoteError) {
	// One lookup: libvirt's REGISTER before each ACQUIRE finds no object
	// most of the time (dropIfEmpty forgot it at its last RELEASE).
	if cur, ok := s.mgr.HoldingOf(o.UUID); ok {
		if cur.Object.PID == o.PID {
			return cur.Leases, nil
		}
		if n := len(cur.Leases) + len(cur.ReadOnly); n > 0 && processAlive(cur.Object.PID) {
			return nil, newRemoteError(CodeResourceBusy, DomainLockspace, fmt.Sprintf(
				"domain %q (uuid %s) is registered with pid %d, which is alive and holds %d locks; pid %d cannot take locks for it",
				cur.Object.Name, cur.Object.UUID, cur.Object.PID, n, o.PID))
		}
		s.log.Info("replacing a stale owner", "uuid", o.UUID, "name", o.Name, "old_pid", cur.Object.PID, "pid", o.PID)
		if rerr := s.forget(ctx, cur.Object, cur.Leases); rerr != nil {
			return nil, rerr
		}
	}
	// An invalid uuid fails here as it would have in the lookup.
	if err := s.owners.Register(ctx, o); err != nil {
		return nil, remoteError(err)
	}
	return nil, nil // a new object holds nothing
}

// forget releases everything the object o holds (the leases given) and, if
// the server registered it, forgets it; then it updates the grant records
// and removes lease files whose last holder it was. Called with o's owner
// lock held and no key lock.
func (s *Server) forget(ctx context.Context, o lockmgr.Object, leases []lockmgr.Lease) *RemoteError {
	var err error
	if o.URI == ObjectURI {
		err = s.owners.Unregister(ctx, o.UUID)
		if errors.Is(err, lockmgr.ErrNotRegistered) {
			err = nil
		}
	} else if len(leases) > 0 {
		_, err = s.mgr.Release(ctx, o.UUID, nil)
	}
	for _, l := range leases {
		key := l.Resource().Key()
		l := s.keyLocks.lock(key)
		s.dropGrant(key, o.UUID)
		l.unlock()
	}
	s.unspell(o.UUID, "")
	if err != nil {
		return remoteError(err)
	}
	return nil
}

// dropGrant records that the object uuid no longer holds key and removes
// the lease file if that was the last holder. Called with key's lock held.
func (s *Server) dropGrant(key, uuid string) {
	s.mu.Lock()
	g := s.grants[key]
	if g == nil {
		s.mu.Unlock()
		return
	}
	if _, ok := g.holders[uuid]; !ok { // an exclusive grant the server does not record
		s.mu.Unlock()
		return
	}
	delete(g.holders, uuid)
	if len(g.holders) > 0 {
		// Other holders remain, unless they lost the resource behind the
		// server's back (the daemon released an exited owner).
		s.mu.Unlock()
		current := s.currentHolders(key)
		s.mu.Lock()
		for u := range g.holders {
			if !current[u] {
				delete(g.holders, u)
			}
		}
		if len(g.holders) > 0 || s.grants[key] != g {
			s.mu.Unlock()
			return
		}
	}
	delete(s.grants, key)
	s.mu.Unlock()
	if g.file != "" {
		s.removeFile(key, g.file)
	}
}

// dropIfEmpty forgets an object of the server that holds nothing, so that
// objects do not pile up (a paused domain holds nothing; its next ACQUIRE
// registers it again). Called with the owner's lock held.
func (s *Server) dropIfEmpty(ctx context.Context, o lockmgr.Object) {
	cur, ok := s.mgr.HoldingOf(o.UUID)
	if !ok || len(cur.Leases)+len(cur.ReadOnly) > 0 || cur.Object.URI != ObjectURI || cur.Object.PID != o.PID {
		return
	}
	if err := s.owners.Unregister(ctx, o.UUID); err != nil && !errors.Is(err, lockmgr.ErrNotRegistered) {
		s.log.Warn("cannot forget an object that holds nothing", "uuid", o.UUID, "err", err)
	}
}

// release unlocks a resource of the connection's registered owner. As
// virtlockd's locks belong to pids, that is the resource held by the owner
// or, failing that, by another owner the server registered with the same
// pid (a first REGISTER on the connection). A resource nobody holds is
// "not locked" (busy, as virtlockd says); one held by others only is an
// internal error naming the owner's pid.
func (s *Server) release(ctx context.Context, c *conn, ls *lockspace, name string) *RemoteError {
	r, _, rerr := resource(ls, name, lockmgr.Exclusive)
	if rerr != nil {
		return rerr
	}
	o := c.obj
	if found, rerr := s.releaseOf(ctx, o.UUID, o.PID, r); found {
		return rerr
	}
	for _, uuid := range s.objectsOf(o.PID, o.UUID)[1:] {
		if found, rerr := s.releaseOf(ctx, uuid, o.PID, r); found {
			return rerr
		}
	}
	cr, rerr := canonical(r)
	if rerr != nil {
		return rerr
	}
	if _, ok := s.holderOf(cr.Key()); ok {
		return newRemoteError(CodeInternalError, DomainLockspace, fmt.Sprintf("owner %d does not hold the resource lock", o.PID))
	}
	return newRemoteError(CodeResourceBusy, DomainLockspace, fmt.Sprintf("Lockspace resource '%s' is not locked", name))
}

// releaseOf releases r (as named in a RELEASE) from the object uuid if it
// is registered with pid and holds r; found says whether it did, and rerr
// is then the result of the release.
func (s *Server) releaseOf(ctx context.Context, uuid string, pid int, r lockmgr.Resource) (found bool, rerr *RemoteError) {
	ownerLock := s.ownerLocks.lock(uuid)
	defer ownerLock.unlock()

	cur, ok := s.mgr.HoldingOf(uuid)
	if !ok || cur.Object.PID != pid {
		return false, nil
	}
	o, leases := cur.Object, cur.Leases
	var held lockmgr.Resource
	s.mu.Lock()
	key, spelled := s.spelled[uuid][r.Name]
	s.mu.Unlock()
	if spelled { // what this path named when it was acquired
		held, found = heldKey(leases, key)
	}
	if !found {
		held, found = heldAs(leases, r)
	}
	if !found && r.Type == lockmgr.TypeDisk {
		if cr, rerr := canonical(r); rerr == nil { // held under another spelling?
			held, found = heldAs(leases, cr)
		}
	}
	if !found {
		return false, nil
	}
	key = held.Key()
	keyLock := s.keyLocks.lock(key)
	defer keyLock.unlock()
	s.mu.Lock()
	if g := s.grants[key]; g != nil && g.holders[uuid] > 1 {
		g.holders[uuid]--
		s.mu.Unlock()
		return true, nil
	}
	s.mu.Unlock()
	// The table no longer holds it for o even if this fails (the driver
	// did, or ctx ended: see lockmgr.Manager.Release), so neither do the
	// server's records.
	_, err := s.mgr.Release(ctx, uuid, &held)
	s.unspell(uuid, key)
	s.dropGrant(key, uuid)
	s.dropIfEmpty(ctx, o)
	if err != nil {
		return true, remoteError(err)
	}
	return true, nil
}

// currentHolders returns the uuids of the holders of the resource key,
// from the lock table.
func (s *Server) currentHolders(key string) map[string]bool {
	out := make(map[string]bool)
	for _, li := range s.mgr.Locks() {
		if li.Resource.Key() == key {
			for _, h := range li.Holders {
				out[h.UUID] = true
			}
		}
	}
	return out
}

// holderOf returns a holder of the resource key, from the lock table.
func (s *Server) holderOf(key string) (lockmgr.Holder, bool) {
	for _, li := range s.mgr.Locks() {
		if li.Resource.Key() == key && len(li.Holders) > 0 {
			return li.Holders[0], true
		}
	}
	return lockmgr.Holder{}, false
}

// busyIfHeld returns a busy error naming the holder if anybody holds r.
func (s *Server) busyIfHeld(r lockmgr.Resource) *RemoteError {
	if h, ok := s.holderOf(r.Key()); ok {
		r.Mode = h.Mode
		return remoteError(&lockmgr.BusyError{Resource: r, Holder: h})
	}
	return nil
}

// whileFree resolves a resource's file and runs f on it with the
// resource's key lock held, unless somebody holds the resource (a busy
// error naming the holder).
func (s *Server) whileFree(ls *lockspace, name string, f func(file string) *RemoteError) *RemoteError {
	r, file, rerr := resource(ls, name, lockmgr.Exclusive)
	if rerr == nil {
		r, rerr = canonical(r)
	}
	if rerr != nil {
		return rerr
	}
	l := s.keyLocks.lock(r.Key())
	defer l.unlock()
	if rerr := s.busyIfHeld(r); rerr != nil {
		return rerr
	}
	return f(file)
}

// createResource creates a resource's file (mode 0600) unless it is held.
func (s *Server) createResource(ls *lockspace, name string) *RemoteError {
	return s.whileFree(ls, name, func(file string) *RemoteError {
		f, err := openFile(ls, file, unix.O_WRONLY|unix.O_CREAT)
		if err != nil {
			return systemError(fmt.Sprintf("Failed to create file '%s'", file), err)
		}
		f.Close()
		return nil
	})
}

// deleteResource removes a resource's lease file unless it is held. In the
// default lockspace, whose names are disk images, it refuses: vmlockd never
// deletes a disk image.
func (s *Server) deleteResource(ls *lockspace, name string) *RemoteError {
	return s.whileFree(ls, name, func(file string) *RemoteError {
		if ls.path == "" {
			return newRemoteError(CodeOperationDenied, DomainLockspace,
				fmt.Sprintf("vmlockd does not delete %s: the default lockspace names disk images", file))
		}
		if err := os.Remove(file); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return systemError(fmt.Sprintf("Unable to delete lockspace resource %s", file), err)
		}
		return nil
	})
}

// closeRule applies virtlockd's rule when a client closes its connection:
// if the peer is the registered owner's process (the connection QEMU
// inherited), every lock of that process is released, whichever owner
// registered on the server with its pid took it (virtlockd's locks belong
// to pids), and if it held any, the process is killed. vmlockd kills first
// and releases once the process is gone, so that no other domain can be
// granted a resource while the old holder may still write to it. It takes
// ownership of c.peer.
func (s *Server) closeRule(ctx context.Context, c *conn) {
	defer c.peer.Close()
	if c.owner == nil || c.peer.PID <= 0 || int(c.owner.PID) != c.peer.PID {
		return
	}
	pid := c.peer.PID
	var holding []lockmgr.Object
	locks := 0
	for _, uuid := range s.objectsOf(pid, c.obj.UUID) {
		l := s.ownerLocks.lock(uuid)
		cur, err := s.mgr.Object(uuid)
		if err != nil || cur.PID != pid {
			s.dropGrantsOfGone(uuid, err)
			l.unlock()
			continue
		}
		leases, ro, err := s.mgr.Held(uuid)
		if err == nil && len(leases)+len(ro) == 0 {
			s.forget(ctx, cur, nil)
		}
		l.unlock()
		if err == nil && len(leases)+len(ro) > 0 {
			holding = append(holding, cur)
			locks += len(leases) + len(ro)
		}
	}
	if len(holding) == 0 {
		return
	}
	o := c.obj
	if !c.peer.Exited() {
		s.log.Warn("the connection of a lock owner closed while its process holds locks; killing it",
			"uuid", o.UUID, "name", o.Name, "pid", pid, "locks", locks)
		if err := s.kill(ctx, c.peer); err != nil {
			s.log.Error("cannot kill a lock owner", "uuid", o.UUID, "pid", pid, "err", err)
		}
	}
	if err := c.peer.Wait(ctx); err != nil {
		if ctx.Err() != nil {
			s.log.Info("stopping while a lock owner is being killed; its locks stay held", "uuid", o.UUID, "pid", pid)
		} else {
			s.log.Error("a lock owner did not exit; its locks stay held", "uuid", o.UUID, "pid", pid, "err", err)
		}
		return
	}
	for _, h := range holding {
		s.forgetExited(context.WithoutCancel(ctx), h)
	}
}

// objectsOf returns the uuids of the objects the server registered for
// the process pid, and also uuid, first.
func (s *Server) objectsOf(pid int, uuid string) []string {
	out := []string{uuid}
	for _, o := range s.mgr.Objects() {
		if o.PID == pid && o.URI == ObjectURI && o.UUID != uuid {
			out = append(out, o.UUID)
		}
	}
	return out
}

// forgetExited releases every lock of the object o, whose process has
// exited, unless the object is registered for another process by now.
func (s *Server) forgetExited(ctx context.Context, o lockmgr.Object) {
	l := s.ownerLocks.lock(o.UUID)
	defer l.unlock()
	cur, err := s.mgr.Object(o.UUID)
	if err != nil || cur.PID != o.PID {
		s.dropGrantsOfGone(o.UUID, err) // released meanwhile (the daemon saw the exit too)
		return
	}
	leases, _, err := s.mgr.Held(o.UUID)
	if err != nil {
		return
	}
	if rerr := s.forget(ctx, cur, leases); rerr != nil {
		s.log.Error("cannot release the locks of an exited owner", "uuid", o.UUID, "pid", o.PID, "err", rerr)
		return
	}
	s.log.Info("lock owner exited; its locks are released", "uuid", o.UUID, "name", o.Name, "pid", o.PID, "locks", len(leases))
}

// dropGrantsOfGone forgets the grants of the object uuid if the lock table
// no longer has it (err, from looking it up, says it is not registered):
// the daemon released it behind the server's back. Lease files whose last
// holder it was are removed, as if the server had released them. Called
// with the owner's lock held, so that no new grant of the uuid interferes.
func (s *Server) dropGrantsOfGone(uuid string, err error) {
	if errors.Is(err, lockmgr.ErrNotRegistered) {
		s.pruneGrants(uuid)
	}
}

// Forgotten tells the server that the lock table released the object uuid
// behind the server's back: the daemon saw its owner process exit, and the
// server may have no connection that tells it (the daemon restarted since
// the object's connections were made). The server then drops its records
// of what the table no longer shows the object holding, and removes the
// lease files whose last holder it was. It must not be called from an
// Owners method.
func (s *Server) Forgotten(uuid string) {
	l := s.ownerLocks.lock(uuid)
	defer l.unlock()
	s.pruneGrants(uuid)
}

// pruneGrants drops the object uuid from every grant record of a resource
// that the lock table no longer shows it holding, removing the files whose
// last holder it was. Called with the owner's lock held.
func (s *Server) pruneGrants(uuid string) {
	if _, err := s.mgr.Object(uuid); errors.Is(err, lockmgr.ErrNotRegistered) {
		s.unspell(uuid, "")
	}
	var keys []string
	s.mu.Lock()
	for key, g := range s.grants {
		if _, ok := g.holders[uuid]; ok {
			keys = append(keys, key)
		}
	}
	s.mu.Unlock()
	for _, key := range keys {
		l := s.keyLocks.lock(key)
		if !s.currentHolders(key)[uuid] {
			s.dropGrant(key, uuid)
		}
		l.unlock()
	}
}

// remoteError maps an error of the lock table onto libvirt's codes, in the
// lockspace domain. A busy error keeps libvirt's code 87 and carries the
// message that names the holder.
func remoteError(err error) *RemoteError {
	var re *RemoteError
	if errors.As(err, &re) {
		return re
	}
	var be *lockmgr.BusyError
	if errors.As(err, &be) {
		return newRemoteError(CodeResourceBusy, DomainLockspace, be.Error())
	}
	code := CodeInternalError
	switch lockmgr.CodeOf(err) {
	case lockmgr.CodeInvalidArgument:
		code = CodeInvalidArg
	case lockmgr.CodeNotRegistered:
		code = CodeOperationInvalid
	case lockmgr.CodePermission:
		code = CodeOperationDenied
	case lockmgr.CodeTimeout:
		code = CodeOperationTimeout
	case lockmgr.CodeUnsupported:
		code = CodeConfigUnsupported
	case lockmgr.CodeBusy:
		code = CodeResourceBusy
	}
	return newRemoteError(code, DomainLockspace, err.Error())
}

// systemError is virReportSystemError: the detail and the system's message.
func systemError(detail string, err error) *RemoteError {
	var errno syscall.Errno
	msg := err.Error()
	if errors.As(err, &errno) {
		msg = strerror(errno)
	}
	return newRemoteError(CodeSystemError, DomainLockspace, detail+": "+msg)
}

// strerror is e's text as glibc's strerror(3) words it, which virtlockd
// sends and libvirt shows: Go's texts are glibc's with the first letter
// lowered.
func strerror(e syscall.Errno) string {
	s := e.Error()
	if n, ok := strings.CutPrefix(s, "errno "); ok {
		return "Unknown error " + n
	}
	if s != "" && 'a' <= s[0] && s[0] <= 'z' {
		s = string(s[0]-'a'+'A') + s[1:]
	}
	return s
}
