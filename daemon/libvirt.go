package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/virtlockd"
)

// LibvirtSocket is where a privileged libvirtd looks for its lock daemon
// (compiled into libvirt; no libvirt setting moves it).
const LibvirtSocket = "/run/libvirt/virtlockd-sock"

// LibvirtStoreFile is the file in the state directory that keeps the
// lockspace directories libvirt asked for (CREATE_LOCKSPACE) across
// restarts of vmlockd.
const LibvirtStoreFile = "libvirt-lockspaces.json"

// LibvirtGrantsDir is the directory in the state directory that records
// which lease files go with their last holder and by which symlinks
// domains acquired disks (virtlockd.GrantStore), so that after a restart of
// vmlockd too those files are removed and RELEASE by those paths works.
const LibvirtGrantsDir = "libvirt-grants"

// LibvirtConfig enables the libvirt drop-in: the daemon serves its lock
// table over virtlockd's protocol (package virtlockd), so that libvirtd with
// lock_manager = "lockd" uses vmlockd in virtlockd's place.
type LibvirtConfig struct {
	// Socket is the path to serve, normally LibvirtSocket. A socket file
	// there that nobody answers on is replaced; a live one (a running
	// virtlockd) makes New fail. Ignored when Listener is set.
	Socket string
	// Listener, if set, is served instead of creating Socket (a listener
	// inherited across a reload).
	Listener *net.UnixListener
	// Lockspaces are lockspace directories served from the start even if
	// libvirtd never asks for them again (qemu-lockd.conf's
	// file_lockspace_dir); those it asks for are kept in the state directory
	// anyway.
	Lockspaces []string

	// Tests: created is called once the server has loaded its grant
	// records and before the daemon tells it of owner exits; forgotten
	// after the daemon has handled the exit of uuid's owner.
	created   func()
	forgotten func(uuid string)
}

// libvirtEndpoint is the running libvirt drop-in of a Daemon.
type libvirtEndpoint struct {
	srv    *virtlockd.Server
	ln     *net.UnixListener
	keep   *os.File           // the listening socket kept for a reload
	cancel context.CancelFunc // stops Serve
	done   chan struct{}      // closed when Serve returned

}

// libvirtOwners is the daemon as the libvirt server's virtlockd.Owners: an
// object registered over libvirt's protocol is an owner like any other, its
// QEMU pinned by a pidfd and its locks recorded in the lock-holder, so that
// they survive a crash of vmlockd and are released when QEMU exits even
// after a restart (when QEMU's libvirt connection is gone).
type libvirtOwners struct {
	d *Daemon
	// euid is the daemon's effective uid, read once: libvirt registers an
	// object before nearly every ACQUIRE.
	euid int
}

// Register adds o to the lock table and pins its owner process. The owner's
// uid is this daemon's effective uid: the libvirt server admits only peers
// of that uid (root for a privileged libvirtd). It fails with an invalid
// argument error if the process does not exist.
func (lo *libvirtOwners) Register(ctx context.Context, o lockmgr.Object) error {
	d := lo.d
	if err := d.mgr.Register(o); err != nil {
		return err
	}
	if err := d.own(ctx, o, lo.euid, nil); err != nil {
		return err
	}
	d.log.Debug("libvirt: domain registered", "uuid", o.UUID, "name", o.Name, "pid", o.PID)
	return nil
}

// libvirtForgotten tells the libvirt server that the daemon released the
// object uuid because its process exited. The server's close rule sees an
// exit only through a connection QEMU holds, and the domains that ran
// before a restart of vmlockd have none: without this, the lease files of
// their grants would stay on disk. The server drops only what the lock
// table no longer shows uuid holding, so telling it of any object is safe.
// Before the server exists, the call does nothing: listenLibvirt catches
// up with such exits itself.
func (d *Daemon) libvirtForgotten(uuid string) {
	d.mu.Lock()
	lv := d.lv
	d.mu.Unlock()
	if lv != nil {
		lv.srv.Forgotten(uuid)
	}
	if lc := d.cfg.Libvirt; lc != nil && lc.forgotten != nil {
		lc.forgotten(uuid)
	}
}

// Unregister releases every lock of the object and forgets it.
func (lo *libvirtOwners) Unregister(ctx context.Context, uuid string) error {
	return lo.d.forget(ctx, uuid)
}

// listenLibvirt creates the libvirt server and its listening socket, if
// the drop-in is enabled. Called by New once the lock table is restored.
func (d *Daemon) listenLibvirt(ctx context.Context) error {
	lc := d.cfg.Libvirt
	if lc == nil {
		return nil
	}
	// The server reads the grants' holders from the lock table, but a
	// restored owner may exit before the server is published below, when
	// libvirtForgotten cannot tell it yet.
	var restored []string
	for _, o := range d.mgr.Objects() {
		restored = append(restored, o.UUID)
	}
	srv, err := virtlockd.NewServer(virtlockd.Config{
		Manager:    d.mgr,
		Owners:     &libvirtOwners{d: d, euid: os.Geteuid()},
		Store:      virtlockd.FileStore{Path: filepath.Join(d.cfg.StateDir, LibvirtStoreFile)},
		Grants:     virtlockd.DirGrantStore{Dir: filepath.Join(d.cfg.StateDir, LibvirtGrantsDir)},
		Lockspaces: lc.Lockspaces,
		Host:       d.cfg.Host,
		Logger:     d.log.With("endpoint", "libvirt"),
		// A libvirt call may wait on the lock driver (a dead NFS server):
		// bound it like the native API's calls.
		CallTimeout: d.cfg.RequestTimeout,
		Observe:     d.cfg.Metrics.observeLibvirt,
	})
	if err != nil {
		return err
	}
	ln := lc.Listener
	if ln == nil {
		l, err := virtlockd.Listen(ctx, lc.Socket)
		if err != nil {
			return fmt.Errorf("libvirt socket: %w", err)
		}
		ul, ok := l.(*net.UnixListener)
		if !ok {
			l.Close()
			return fmt.Errorf("libvirt socket %s: not a unix listener", lc.Socket)
		}
		ln = ul
	}
	// The path stays when the daemon stops: a reload keeps serving it, and
	// the next start replaces a stale socket file.
	ln.SetUnlinkOnClose(false)
	if lc.created != nil {
		lc.created()
	}
	// Under mu: the exits of restored owners are being watched already
	// (libvirtForgotten). Those that libvirtForgotten saw before this
	// have been released: the server learns of them here.
	d.mu.Lock()
	d.lv = &libvirtEndpoint{srv: srv, ln: ln}
	d.mu.Unlock()
	for _, u := range restored {
		if _, err := d.mgr.Object(u); errors.Is(err, lockmgr.ErrNotRegistered) {
			srv.Forgotten(u)
		}
	}
	return nil
}

// serveLibvirt starts serving the libvirt socket, if enabled; a failure of
// Serve is sent to errc. The returned function stops the server and waits
// for it: connections are closed, no lock is released.
func (d *Daemon) serveLibvirt(errc chan<- error) (stop func()) {
	lv := d.lv
	if lv == nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	lv.cancel, lv.done = cancel, make(chan struct{})
	go func() {
		defer close(lv.done)
		if err := lv.srv.Serve(ctx, lv.ln); err != nil {
			errc <- fmt.Errorf("libvirt endpoint: %w", err)
		}
	}()
	d.log.Info("serving libvirt's lock protocol (virtlockd drop-in)", "socket", lv.ln.Addr().String(),
		"lockspaces", len(lv.srv.Lockspaces())-1)
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			<-lv.done
		})
	}
}

// keepLibvirtListener duplicates the libvirt listening socket for the next
// process image, before Serve closes it; nothing if the drop-in is off.
func (d *Daemon) keepLibvirtListener() error {
	if d.lv == nil {
		return nil
	}
	f, err := d.lv.ln.File()
	if err != nil {
		return fmt.Errorf("reload: keeping the libvirt socket: %w", err)
	}
	d.lv.keep = f
	return nil
}

// InheritedLibvirtListener returns the libvirt listening socket after Run
// returned ErrReload, for the new process image to inherit; nil if the
// libvirt drop-in is off.
func (d *Daemon) InheritedLibvirtListener() *os.File {
	if d.lv == nil {
		return nil
	}
	return d.lv.keep
}
