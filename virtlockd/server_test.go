package virtlockd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
	lsdriver "github.com/vmlock/vmlock/lockspace"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

type closedConn struct {
	pid   int
	owner *Owner
}

type testServer struct {
	t      *testing.T
	s      *Server
	m      *lockmgr.Manager
	sock   string
	closed chan closedConn
}

// socketDir returns a short directory for sockets (t.TempDir's paths can
// exceed the 108 bytes of a unix socket address).
func socketDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "vlk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startServer serves cfg (a NopDriver Manager if none) on a fresh socket
// until the test ends.
func startServer(t *testing.T, cfg Config) *testServer {
	t.Helper()
	if cfg.Manager == nil {
		cfg.Manager = lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	sock := filepath.Join(socketDir(t), "sock")
	l, err := Listen(t.Context(), sock)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{t: t, s: s, m: cfg.Manager, sock: sock, closed: make(chan closedConn, 64)}
	s.connDone = func(p *Peer, o *Owner) {
		select {
		case ts.closed <- closedConn{p.PID, o}:
		default:
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func (ts *testServer) dial() *Client {
	ts.t.Helper()
	c, err := Dial(testCtx(ts.t), ts.sock)
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.t.Cleanup(func() { c.Close() })
	return c
}

// owner returns an owner named name whose uuid derives from the name.
func owner(name string, pid int) Owner {
	sum := sha256.Sum256([]byte(name))
	var u [16]byte
	copy(u[:], sum[:])
	return Owner{UUID: u, Name: name, ID: 1, PID: uint32(pid)}
}

// registered dials and registers owner name with pid.
func (ts *testServer) registered(name string, pid int) *Client {
	ts.t.Helper()
	c := ts.dial()
	if err := c.Register(testCtx(ts.t), owner(name, pid), 0); err != nil {
		ts.t.Fatal(err)
	}
	return c
}

// waitClosed waits until the server has handled the close of the
// connection whose peer is pid.
func (ts *testServer) waitClosed(pid int) closedConn {
	ts.t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case cc := <-ts.closed:
			if cc.pid == pid {
				return cc
			}
		case <-timeout:
			ts.t.Fatalf("the server did not report the close of a connection of pid %d", pid)
		}
	}
}

// holders returns the uuids of the holders of the resource key, from the
// lock table.
func (ts *testServer) holders(key string) []string {
	var out []string
	for _, li := range ts.m.Locks() {
		if li.Resource.Key() == key {
			for _, h := range li.Holders {
				out = append(out, h.UUID)
			}
		}
	}
	slices.Sort(out)
	return out
}

func uuidOf(name string) string { o := owner(name, 0); return formatUUID(o.UUID) }

func diskKey(t *testing.T, path string) string {
	r, err := lockmgr.Canonical(lockmgr.DiskResource(path, lockmgr.Exclusive))
	if err != nil {
		t.Fatal(err)
	}
	return r.Key()
}

// wantRemote checks that err is a refusal with code, domain and a message
// containing every substring.
func wantRemote(t *testing.T, what string, err error, code ErrorCode, domain ErrorDomain, substr ...string) {
	t.Helper()
	var re *RemoteError
	if !errors.As(err, &re) {
		t.Fatalf("%s: got %v (%T), want a RemoteError code %d domain %d", what, err, err, code, domain)
	}
	if re.Code != code || re.Domain != domain {
		t.Fatalf("%s: got code %d domain %d (%q), want code %d domain %d", what, re.Code, re.Domain, re.Error(), code, domain)
	}
	for _, s := range substr {
		if !strings.Contains(re.Error(), s) {
			t.Fatalf("%s: message %q does not contain %q", what, re.Error(), s)
		}
	}
	if re.Level != LevelError {
		t.Fatalf("%s: level %d", what, re.Level)
	}
}

func wantOK(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// image creates an empty disk image file.
func image(t *testing.T, name string) string {
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Fake owner pids: no such process exists (pid_max is at most 2^22).
const fakePID = 1 << 23

// The checks of every call, in virtlockd's order.
func TestCheckOrder(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "a.img")

	// Unregistered: everything but REGISTER and CREATE_LOCKSPACE.
	c := ts.dial()
	for _, call := range []struct {
		name string
		err  error
	}{
		{"acquire", c.AcquireResource(ctx, "", img, 0)},
		{"release", c.ReleaseResource(ctx, "", img, 0)},
		{"restrict", c.Restrict(ctx, 0)},
		{"new", c.New(ctx, "/nonexistent/x", 0)},
		{"create resource", c.CreateResource(ctx, "", img, 0)},
		{"delete resource", c.DeleteResource(ctx, "", img, 0)},
	} {
		wantRemote(t, "unregistered "+call.name, call.err, CodeOperationInvalid, DomainRPC, "lock owner details have not been registered")
	}
	wantOK(t, "create lockspace unregistered", c.CreateLockspace(ctx, filepath.Join(t.TempDir(), "ls")))
	// Unregistered but with unknown flags: the flags check comes first.
	wantRemote(t, "flags before registration", c.AcquireResource(ctx, "", img, 4), CodeInvalidArg, DomainRPC,
		"unsupported flags (0x4) in function virLockSpaceProtocolDispatchAcquireResource")
	// An owner id of 0 is refused, with virtlockd's odd message.
	o := owner("zero", fakePID)
	o.ID = 0
	wantRemote(t, "owner id 0", c.Register(ctx, o, 0), CodeOperationInvalid, DomainRPC, "have not been registered")
	wantRemote(t, "still unregistered", c.AcquireResource(ctx, "", img, 0), CodeOperationInvalid, DomainRPC)

	// Unknown flags on every procedure that has flags.
	c = ts.registered("flags", fakePID)
	wantRemote(t, "register flags", c.Register(ctx, owner("flags", fakePID), 1), CodeInvalidArg, DomainRPC, "0x1")
	wantRemote(t, "restrict flags", c.Restrict(ctx, 8), CodeInvalidArg, DomainRPC, "0x8")
	wantRemote(t, "new flags", c.New(ctx, "/x", 2), CodeInvalidArg, DomainRPC)
	wantRemote(t, "create flags", c.CreateResource(ctx, "", img, 1), CodeInvalidArg, DomainRPC)
	wantRemote(t, "delete flags", c.DeleteResource(ctx, "", img, 1), CodeInvalidArg, DomainRPC)
	wantRemote(t, "release flags", c.ReleaseResource(ctx, "", img, AcquireShared), CodeInvalidArg, DomainRPC, "0x1")
	wantRemote(t, "acquire flags", c.AcquireResource(ctx, "", img, AcquireShared|8), CodeInvalidArg, DomainRPC, "(0x8)")

	// Unknown lockspace.
	wantRemote(t, "unknown lockspace", c.AcquireResource(ctx, "/no/such/ls", "k", 0), CodeInternalError, DomainRPC,
		"Lockspace for path /no/such/ls does not exist")
	wantRemote(t, "unknown lockspace release", c.ReleaseResource(ctx, "/no/such/ls", "k", 0), CodeInternalError, DomainRPC, "does not exist")
	// Flags before lockspace.
	wantRemote(t, "flags before lockspace", c.AcquireResource(ctx, "/no/such/ls", "k", 16), CodeInvalidArg, DomainRPC)

	// Restricted: every call, REGISTER and CREATE_LOCKSPACE included, but
	// unknown flags are still reported first.
	wantOK(t, "restrict", c.Restrict(ctx, 0))
	for _, call := range []struct {
		name string
		err  error
	}{
		{"register", c.Register(ctx, owner("flags", fakePID), 0)},
		{"restrict", c.Restrict(ctx, 0)},
		{"create lockspace", c.CreateLockspace(ctx, t.TempDir())},
		{"acquire", c.AcquireResource(ctx, "", img, 0)},
		{"acquire unknown lockspace", c.AcquireResource(ctx, "/no/such/ls", "k", 0)},
		{"release", c.ReleaseResource(ctx, "", img, 0)},
		{"new", c.New(ctx, "/x", 0)},
	} {
		wantRemote(t, "restricted "+call.name, call.err, CodeOperationDenied, DomainRPC, "lock manager connection has been restricted")
	}
	wantRemote(t, "restricted with bad flags", c.AcquireResource(ctx, "", img, 4), CodeInvalidArg, DomainRPC)
	if h := ts.holders(diskKey(t, img)); len(h) != 0 {
		t.Fatalf("refused calls left holders %v", h)
	}
}

func TestRegisterOverwrites(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "a.img")
	c := ts.registered("first", fakePID)
	wantOK(t, "second register", c.Register(ctx, owner("second", fakePID+1), 0))
	wantOK(t, "acquire", c.AcquireResource(ctx, "", img, 0))
	if got, want := ts.holders(diskKey(t, img)), []string{uuidOf("second")}; !slices.Equal(got, want) {
		t.Fatalf("holders %v, want the second owner %v", got, want)
	}
	obj, err := ts.m.Object(uuidOf("second"))
	if err != nil || obj.PID != fakePID+1 || obj.Name != "second" || obj.URI != ObjectURI {
		t.Fatalf("object %+v %v", obj, err)
	}
}

// Any domain name registers, as with virtlockd: one libvirt allows (a tab,
// an escape sequence) or not (a newline, invalid UTF-8, 5000 bytes) is
// recorded escaped and cut, and its locks work as any other's.
func TestRegisterTakesAnyOwnerName(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	for i, c := range []struct{ name, want string }{
		{"web\t1", `web\t1`},
		{"\x1b[2Jbad\nname\xff", `\x1b[2Jbad\nname\xff`},
		{strings.Repeat("é", 2500), strings.Repeat("é", 512)},
	} {
		o := owner(c.name, fakePID+i)
		cl := ts.dial()
		wantOK(t, "register "+strconv.Quote(c.name), cl.Register(ctx, o, 0))
		img := image(t, fmt.Sprintf("n%d.img", i))
		wantOK(t, "acquire", cl.AcquireResource(ctx, "", img, 0))
		obj, err := ts.m.Object(uuidOf(c.name))
		if err != nil || obj.Name != c.want {
			t.Fatalf("owner %q registered as %q (%v); want %q", c.name, obj.Name, err, c.want)
		}
		if got := ts.holders(diskKey(t, img)); !slices.Equal(got, []string{uuidOf(c.name)}) {
			t.Fatalf("holders of %s: %v; want the owner named %q", img, got, c.name)
		}
	}
}

func TestSharedExclusive(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "shared.img")
	key := diskKey(t, img)
	a := ts.registered("vm-a", fakePID+1)
	b := ts.registered("vm-b", fakePID+2)
	x := ts.registered("vm-x", fakePID+3)

	wantOK(t, "a shared", a.AcquireResource(ctx, "", img, AcquireShared))
	wantOK(t, "b shared", b.AcquireResource(ctx, "", img, AcquireShared))
	if got, want := ts.holders(key), []string{uuidOf("vm-a"), uuidOf("vm-b")}; !slices.Equal(got, want) {
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("holders %v, want %v", got, want)
		}
	}
	wantRemote(t, "x exclusive on shared", x.AcquireResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace,
		"resource busy: disk "+img+" is locked shared by vm")
	// No re-entrancy: the holder itself is refused exclusive, named as holder.
	wantRemote(t, "a exclusive again", a.AcquireResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace,
		`by vm "vm-a"`, uuidOf("vm-a"), fmt.Sprintf("pid %d", fakePID+1))
	// Shared again by the same owner counts twice.
	wantOK(t, "a shared again", a.AcquireResource(ctx, "", img, AcquireShared))
	wantOK(t, "a release 1", a.ReleaseResource(ctx, "", img, 0))
	wantOK(t, "b release", b.ReleaseResource(ctx, "", img, 0))
	if got := ts.holders(key); !slices.Equal(got, []string{uuidOf("vm-a")}) {
		t.Fatalf("after one of a's two releases and b's: holders %v, want a", got)
	}
	wantRemote(t, "x exclusive while a holds", x.AcquireResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace, `"vm-a"`)
	wantOK(t, "a release 2", a.ReleaseResource(ctx, "", img, 0))
	wantOK(t, "x exclusive", x.AcquireResource(ctx, "", img, 0))
	wantRemote(t, "a shared on exclusive", a.AcquireResource(ctx, "", img, AcquireShared), CodeResourceBusy, DomainLockspace,
		"locked exclusively", `"vm-x"`)
	// An owner that holds nothing is forgotten; one that holds is kept.
	if _, err := ts.m.Object(uuidOf("vm-a")); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Fatalf("owner a holds nothing but is still an object: %v", err)
	}
	if obj, err := ts.m.Object(uuidOf("vm-x")); err != nil || obj.Name != "vm-x" {
		t.Fatalf("owner x: %+v %v", obj, err)
	}
}

// A disk named through a symlink is the same lock.
func TestDiskCanonical(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "real.img")
	link := filepath.Join(t.TempDir(), "link.img")
	if err := os.Symlink(img, link); err != nil {
		t.Fatal(err)
	}
	a := ts.registered("a", fakePID+1)
	b := ts.registered("b", fakePID+2)
	wantOK(t, "a", a.AcquireResource(ctx, "", img, 0))
	wantRemote(t, "b through a symlink", b.AcquireResource(ctx, "", link, 0), CodeResourceBusy, DomainLockspace, `"a"`)
	wantRemote(t, "a again through a symlink", a.AcquireResource(ctx, "", link, 0), CodeResourceBusy, DomainLockspace, `"a"`)
	wantRemote(t, "a shared through a symlink", a.AcquireResource(ctx, "", link, AcquireShared), CodeResourceBusy, DomainLockspace, `"a"`)
	wantOK(t, "a releases through the symlink", a.ReleaseResource(ctx, "", link, 0))
	wantOK(t, "b through the symlink once free", b.AcquireResource(ctx, "", link, 0))
	wantRemote(t, "a through the real path", a.AcquireResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace, `"b"`)
	wantOK(t, "b releases through the real path", b.ReleaseResource(ctx, "", img, 0))
	if h := ts.holders(diskKey(t, img)); len(h) != 0 {
		t.Fatalf("holders %v", h)
	}
	wantRemote(t, "relative path", b.AcquireResource(ctx, "", "rel.img", 0), CodeInvalidArg, DomainLockspace, "not an absolute file path")
	wantRemote(t, "missing file", b.AcquireResource(ctx, "", img+".missing", 0), CodeSystemError, DomainLockspace,
		"Unable to open resource "+img+".missing: No such file or directory")
}

// libvirt releases a disk by the path it acquired it by. When that path is
// a symlink retargeted while the domain runs, RELEASE releases the image
// that ACQUIRE locked (its real OFD lock included), and leaves the link's
// new target, held by another domain, alone.
func TestReleaseByASymlinkRetargetedSinceTheAcquire(t *testing.T) {
	drv, err := lsdriver.New(lsdriver.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{Manager: lockmgr.NewManager(drv, lockmgr.Options{})})
	ctx := testCtx(t)
	oldImg, newImg := image(t, "old.img"), image(t, "new.img")
	link := filepath.Join(t.TempDir(), "disk.img")
	if err := os.Symlink(oldImg, link); err != nil {
		t.Fatal(err)
	}
	a := ts.registered("a", fakePID+1)
	b := ts.registered("b", fakePID+2)
	wantOK(t, "a acquires the link", a.AcquireResource(ctx, "", link, 0))
	if err := os.Symlink(newImg, link+".new"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(link+".new", link); err != nil {
		t.Fatal(err)
	}
	wantOK(t, "b acquires the link's new target", b.AcquireResource(ctx, "", newImg, 0))

	wantOK(t, "a releases the link", a.ReleaseResource(ctx, "", link, 0))
	if h := ts.holders(diskKey(t, oldImg)); len(h) != 0 {
		t.Fatalf("the image a acquired is still held by %v", h)
	}
	if !ofdFree(t, oldImg) {
		t.Fatal("the image a acquired is still locked on disk")
	}
	if h := ts.holders(diskKey(t, newImg)); !slices.Equal(h, []string{uuidOf("b")}) {
		t.Fatalf("holders of the new target %v, want b", h)
	}
	if ofdFree(t, newImg) {
		t.Fatal("b's image is no longer locked on disk")
	}
	wantRemote(t, "a releases the link again", a.ReleaseResource(ctx, "", link, 0), CodeInternalError, DomainLockspace,
		fmt.Sprintf("owner %d does not hold the resource lock", fakePID+1))
	wantRemote(t, "a acquires the link, now b's image", a.AcquireResource(ctx, "", link, 0), CodeResourceBusy, DomainLockspace, `"b"`)
}

// virtlockd's locks belong to pids, and RELEASE acts on the pid that the
// connection registered last. So after a second REGISTER of the same pid
// (another domain uuid), RELEASE of a disk the first owner took releases
// it: in the lock table and on disk. The first owner, which then holds
// nothing, is forgotten.
func TestReleaseAfterASecondRegisterOfTheSamePidReleasesTheFirstOwnersLock(t *testing.T) {
	drv, err := lsdriver.New(lsdriver.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{Manager: lockmgr.NewManager(drv, lockmgr.Options{})})
	ctx := testCtx(t)
	img := image(t, "first.img")
	c := ts.registered("first", fakePID)
	wantOK(t, "the first owner acquires", c.AcquireResource(ctx, "", img, 0))
	wantOK(t, "second register, same pid", c.Register(ctx, owner("second", fakePID), 0))

	wantOK(t, "release by the second owner", c.ReleaseResource(ctx, "", img, 0))
	if h := ts.holders(diskKey(t, img)); len(h) != 0 {
		t.Fatalf("the image is still held by %v", h)
	}
	if !ofdFree(t, img) {
		t.Fatal("the image is still locked on disk")
	}
	if _, err := ts.m.Object(uuidOf("first")); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Errorf("the first owner, which holds nothing, is still an object: %v", err)
	}
	wantRemote(t, "release again", c.ReleaseResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace, "is not locked")
}

// After a second REGISTER of another pid, the first owner's lock belongs
// to a pid the connection no longer names: RELEASE is refused, naming the
// pid registered last, and the lock stays, as with virtlockd.
func TestReleaseAfterASecondRegisterOfAnotherPidLeavesTheFirstOwnersLock(t *testing.T) {
	drv, err := lsdriver.New(lsdriver.Config{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, Config{Manager: lockmgr.NewManager(drv, lockmgr.Options{})})
	ctx := testCtx(t)
	img := image(t, "first.img")
	c := ts.registered("first", fakePID)
	wantOK(t, "the first owner acquires", c.AcquireResource(ctx, "", img, 0))
	wantOK(t, "second register, another pid", c.Register(ctx, owner("second", fakePID+1), 0))

	wantRemote(t, "release by the second owner", c.ReleaseResource(ctx, "", img, 0), CodeInternalError, DomainLockspace,
		fmt.Sprintf("owner %d does not hold the resource lock", fakePID+1))
	if h := ts.holders(diskKey(t, img)); !slices.Equal(h, []string{uuidOf("first")}) {
		t.Fatalf("holders %v, want the first owner", h)
	}
	if ofdFree(t, img) {
		t.Fatal("the first owner's image is no longer locked on disk")
	}
}

// ofdFree reports whether a write lock on byte 0 of path could be taken
// now (the lockspace driver's lock).
func ofdFree(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 1}
	err = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES) {
		t.Fatal(err)
	}
	return err == nil
}

// An ACQUIRE refused before the lock table is asked (a missing file)
// leaves no object behind, as one the table refuses does not.
func TestRefusedAcquireLeavesNoObject(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	dir := t.TempDir()
	a := ts.registered("a", fakePID+1)
	wantOK(t, "lockspace", a.CreateLockspace(ctx, dir))
	wantRemote(t, "missing image", a.AcquireResource(ctx, "", filepath.Join(dir, "missing.img"), 0), CodeSystemError, DomainLockspace,
		"Unable to open resource")
	wantRemote(t, "missing lease", a.AcquireResource(ctx, dir, "missing", 0), CodeSystemError, DomainLockspace,
		"Unable to open resource")
	wantRemote(t, "directory", a.AcquireResource(ctx, "", dir, 0), CodeSystemError, DomainLockspace, "Is a directory")
	// A file name that is not UTF-8 exists, but vmlockd's records could
	// not bring it back after a restart.
	latin1 := filepath.Join(dir, "caf\xe9.img")
	if err := os.WriteFile(latin1, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	wantRemote(t, "non-UTF-8 path", a.AcquireResource(ctx, "", latin1, 0), CodeInvalidArg, DomainLockspace, "not valid UTF-8")
	if !ofdFree(t, latin1) {
		t.Fatal("the refused non-UTF-8 path is locked")
	}
	if objs := ts.m.Objects(); len(objs) != 0 {
		t.Fatalf("refused acquires left objects %+v", objs)
	}
}

// A system error reads as virtlockd's (virReportSystemError): the detail,
// then the system's message as C's strerror words it, which libvirt shows
// to the user.
func TestSystemErrorsReadAsStrerror(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.img")
	a := ts.registered("a", fakePID+1)
	for _, c := range []struct{ path, want string }{
		{missing, "Unable to open resource " + missing + ": No such file or directory"},
		{dir, "Unable to open resource " + dir + ": Is a directory"},
	} {
		err := a.AcquireResource(ctx, "", c.path, 0)
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeSystemError || re.Message == nil || *re.Message != c.want {
			t.Fatalf("acquire %s: got %v, want a system error %q", c.path, err, c.want)
		}
	}
	for errno, want := range map[syscall.Errno]string{
		syscall.EACCES: "Permission denied", syscall.EIO: "Input/output error", syscall.Errno(4000): "Unknown error 4000",
	} {
		if got := strerror(errno); got != want {
			t.Errorf("strerror(%d) = %q, want %q", int(errno), got, want)
		}
	}
}

func TestNotLockedWrongOwner(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "r.img")
	a := ts.registered("a", fakePID+1)
	b := ts.registered("b", fakePID+2)
	wantRemote(t, "release unheld", a.ReleaseResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace,
		fmt.Sprintf("Lockspace resource '%s' is not locked", img))
	wantOK(t, "a acquires", a.AcquireResource(ctx, "", img, 0))
	wantRemote(t, "b releases a's", b.ReleaseResource(ctx, "", img, 0), CodeInternalError, DomainLockspace,
		fmt.Sprintf("owner %d does not hold the resource lock", fakePID+2))
	// The same uuid registered with another pid is another owner.
	a2 := ts.registered("a", fakePID+3)
	wantRemote(t, "same uuid, other pid", a2.ReleaseResource(ctx, "", img, 0), CodeInternalError, DomainLockspace,
		fmt.Sprintf("owner %d does not hold", fakePID+3))
	if got := ts.holders(diskKey(t, img)); !slices.Equal(got, []string{uuidOf("a")}) {
		t.Fatalf("holders %v", got)
	}
	wantOK(t, "a releases", a.ReleaseResource(ctx, "", img, 0))
	wantRemote(t, "release twice", a.ReleaseResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace, "is not locked")
}

// Leases in a lockspace directory, auto-created and removed with the last
// holder, as libvirt's file_lockspace_dir uses them.
func TestAutoCreateLease(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	dir := filepath.Join(t.TempDir(), "lockd", "files")
	a := ts.registered("a", fakePID+1)
	b := ts.registered("b", fakePID+2)
	wantOK(t, "create lockspace", a.CreateLockspace(ctx, dir))
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("lockspace directory: %v %v", fi, err)
	}
	sum := sha256.Sum256([]byte("/var/lib/images/vm.qcow2"))
	name := fmt.Sprintf("%x", sum)
	file := filepath.Join(dir, name)
	leaseKey := lockmgr.LeaseResource(LockspaceName(dir), name, 0).Key()

	wantRemote(t, "without autocreate", a.AcquireResource(ctx, dir, name, 0), CodeSystemError, DomainLockspace, "Unable to open resource "+file)
	wantOK(t, "a shared autocreate", a.AcquireResource(ctx, dir, name, AcquireShared|AcquireAutoCreate))
	fi, err := os.Stat(file)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("lease file after auto-create: %v %v", fi, err)
	}
	wantOK(t, "b shared, file exists", b.AcquireResource(ctx, dir, name, AcquireShared))
	if got := ts.holders(leaseKey); len(got) != 2 {
		t.Fatalf("lease holders %v (key %s; locks %+v)", got, leaseKey, ts.m.Locks())
	}
	wantOK(t, "a releases", a.ReleaseResource(ctx, dir, name, 0))
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("lease file removed while b holds it: %v", err)
	}
	wantOK(t, "b releases", b.ReleaseResource(ctx, dir, name, 0))
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lease file after the last release: %v, want it removed", err)
	}
	// Exclusive, then a second owner is refused with the holder named.
	wantOK(t, "a exclusive autocreate", a.AcquireResource(ctx, dir, name, AcquireAutoCreate))
	wantRemote(t, "b exclusive", b.AcquireResource(ctx, dir, name, AcquireAutoCreate), CodeResourceBusy, DomainLockspace,
		"lease "+LockspaceName(dir)+"/"+name+" is locked exclusively", `"a"`)
	wantOK(t, "a releases", a.ReleaseResource(ctx, dir, name, 0))
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lease file after exclusive release: %v", err)
	}
	// A file not auto-created by its first holder stays.
	wantOK(t, "create resource", a.CreateResource(ctx, dir, "kept", 0))
	wantOK(t, "acquire plain", a.AcquireResource(ctx, dir, "kept", 0))
	wantOK(t, "release plain", a.ReleaseResource(ctx, dir, "kept", 0))
	if _, err := os.Stat(filepath.Join(dir, "kept")); err != nil {
		t.Fatalf("a lease file that was not auto-created was removed: %v", err)
	}
	// Names cannot leave the directory.
	for _, bad := range []string{"../escape", "a/b", "..", ""} {
		wantRemote(t, "lease name "+bad, a.AcquireResource(ctx, dir, bad, AcquireAutoCreate), CodeInvalidArg, DomainLockspace)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "escape")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a lease name escaped its directory")
	}
}

// AUTOCREATE in the default lockspace never removes an image that existed.
func TestAutoCreateDefaultLockspace(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	a := ts.registered("a", fakePID+1)
	existing := image(t, "existing.img")
	wantOK(t, "acquire existing", a.AcquireResource(ctx, "", existing, AcquireAutoCreate))
	wantOK(t, "release existing", a.ReleaseResource(ctx, "", existing, 0))
	if _, err := os.Stat(existing); err != nil {
		t.Fatalf("an existing image was removed: %v", err)
	}
	fresh := filepath.Join(t.TempDir(), "fresh.img")
	wantOK(t, "acquire new", a.AcquireResource(ctx, "", fresh, AcquireAutoCreate))
	if _, err := os.Stat(fresh); err != nil {
		t.Fatalf("auto-created file: %v", err)
	}
	wantOK(t, "release new", a.ReleaseResource(ctx, "", fresh, 0))
	if _, err := os.Stat(fresh); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a file the server created was not removed: %v", err)
	}
}

func TestCreateDeleteResource(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	dir := t.TempDir()
	a := ts.registered("a", fakePID+1)
	b := ts.registered("b", fakePID+2)
	wantOK(t, "create lockspace", a.CreateLockspace(ctx, dir))
	wantOK(t, "create", a.CreateResource(ctx, dir, "r1", 0))
	if fi, err := os.Stat(filepath.Join(dir, "r1")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("created file: %v %v", fi, err)
	}
	wantOK(t, "acquire", a.AcquireResource(ctx, dir, "r1", 0))
	wantRemote(t, "delete held", b.DeleteResource(ctx, dir, "r1", 0), CodeResourceBusy, DomainLockspace, `"a"`)
	wantRemote(t, "create held", b.CreateResource(ctx, dir, "r1", 0), CodeResourceBusy, DomainLockspace, `"a"`)
	wantOK(t, "release", a.ReleaseResource(ctx, dir, "r1", 0))
	wantOK(t, "delete", b.DeleteResource(ctx, dir, "r1", 0))
	if _, err := os.Stat(filepath.Join(dir, "r1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("deleted file: %v", err)
	}
	wantOK(t, "delete missing", b.DeleteResource(ctx, dir, "r1", 0))
	img := image(t, "disk.img")
	wantRemote(t, "delete in the default lockspace", b.DeleteResource(ctx, "", img, 0), CodeOperationDenied, DomainLockspace, "does not delete")
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("image deleted: %v", err)
	}
}

func TestLockspacesPersist(t *testing.T) {
	state := t.TempDir()
	store := FileStore{Path: filepath.Join(state, "libvirt-lockspaces.json")}
	root := t.TempDir()
	configured := filepath.Join(root, "configured")
	created := filepath.Join(root, "created")
	viaNew := filepath.Join(root, "new")

	ts := startServer(t, Config{Store: store, Lockspaces: []string{configured}})
	ctx := testCtx(t)
	if fi, err := os.Stat(configured); err != nil || !fi.IsDir() {
		t.Fatalf("configured lockspace not created: %v", err)
	}
	c := ts.dial()
	wantOK(t, "create lockspace", c.CreateLockspace(ctx, created))
	wantOK(t, "create lockspace again", c.CreateLockspace(ctx, created))
	wantRemote(t, "relative lockspace", c.CreateLockspace(ctx, "rel/dir"), CodeInvalidArg, DomainLockspace, "not absolute")
	if err := os.WriteFile(filepath.Join(root, "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	wantRemote(t, "lockspace on a file", c.CreateLockspace(ctx, filepath.Join(root, "file")), CodeInternalError, DomainLockspace,
		"exists, but is not a directory")
	wantOK(t, "register", c.Register(ctx, owner("n", fakePID), 0))
	wantRemote(t, "new default", c.New(ctx, "", 0), CodeOperationInvalid, DomainRPC, "the default lockspace already exists")
	wantRemote(t, "new existing", c.New(ctx, created, 0), CodeInternalError, DomainRPC, "Lockspace for path "+created+" already exists")
	wantOK(t, "new", c.New(ctx, viaNew, 0))

	got, err := store.Load()
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{created, viaNew}; !slices.Equal(got, want) {
		t.Fatalf("stored %v, want %v (configured ones are not stored)", got, want)
	}
	// A new server on the same store serves them without CREATE_LOCKSPACE.
	if err := os.RemoveAll(created); err != nil {
		t.Fatal(err)
	}
	ts2 := startServer(t, Config{Store: store})
	if got, want := ts2.s.Lockspaces(), []string{"", created, viaNew}; !slices.Equal(got, want) {
		t.Fatalf("restarted server serves %v, want %v", got, want)
	}
	c2 := ts2.registered("m", fakePID)
	wantOK(t, "acquire after restart", c2.AcquireResource(ctx, created, "k", AcquireAutoCreate))
	if _, err := os.Stat(filepath.Join(created, "k")); err != nil {
		t.Fatalf("lockspace directory not re-created: %v", err)
	}
}

// A configured lockspace that libvirtd asks for is kept in the store too:
// the daemon serves it after a restart whose configuration no longer
// lists it, as libvirtd (which sent CREATE_LOCKSPACE only when it started)
// still expects.
func TestConfiguredLockspaceAskedForIsKept(t *testing.T) {
	store := FileStore{Path: filepath.Join(t.TempDir(), "libvirt-lockspaces.json")}
	dir := filepath.Join(t.TempDir(), "files")
	ts := startServer(t, Config{Store: store, Lockspaces: []string{dir}})
	c := ts.dial()
	wantOK(t, "libvirtd creates the configured lockspace", c.CreateLockspace(testCtx(t), dir))
	if got, err := store.Load(); err != nil || !slices.Equal(got, []string{dir}) {
		t.Fatalf("stored %v (%v), want %v", got, err, []string{dir})
	}

	// Restarted without it in the configuration.
	ts2 := startServer(t, Config{Store: store})
	if got, want := ts2.s.Lockspaces(), []string{"", dir}; !slices.Equal(got, want) {
		t.Fatalf("restarted server serves %v, want %v", got, want)
	}
	c2 := ts2.registered("d", fakePID)
	wantOK(t, "acquire in it after the restart", c2.AcquireResource(testCtx(t), dir, "k", AcquireAutoCreate))
}

// rawCall writes b on a new raw connection and returns the reader of its
// replies.
func (ts *testServer) raw() (net.Conn, *Reader) {
	ts.t.Helper()
	nc, err := net.Dial("unix", ts.sock)
	if err != nil {
		ts.t.Fatal(err)
	}
	ts.t.Cleanup(func() { nc.Close() })
	if err := nc.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		ts.t.Fatal(err)
	}
	return nc, NewReader(nc, MaxMessageSize)
}

func writeAll(t *testing.T, nc net.Conn, b []byte) {
	t.Helper()
	if _, err := nc.Write(b); err != nil {
		t.Fatal(err)
	}
}

func readError(t *testing.T, rd *Reader, serial uint32) *RemoteError {
	t.Helper()
	h, payload, err := rd.Next()
	if err != nil {
		t.Fatal(err)
	}
	if h.Type != TypeReply || h.Status != StatusError || h.Serial != serial {
		t.Fatalf("reply header %+v, want an error reply to serial %d", h, serial)
	}
	e, err := DecodeRemoteError(payload)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// Protocol errors are answered and the connection stays usable; framing
// errors and vanishing clients end their connection only.
func TestProtocolErrorsAndGarbage(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	nc, rd := ts.raw()

	send := func(h Header, payload []byte) {
		b, err := AppendMessage(nil, h, payload)
		if err != nil {
			t.Fatal(err)
		}
		writeAll(t, nc, b)
	}
	call := func(proc Procedure, serial uint32) Header {
		return Header{Program: Program, Version: ProgramVersion, Procedure: proc, Type: TypeCall, Serial: serial}
	}
	h := call(ProcRegister, 1)
	h.Program = 0x20008086
	send(h, nil)
	wantRemote(t, "unknown program", readError(t, rd, 1), CodeRPC, DomainRPC, fmt.Sprintf("Cannot find program %d version 1", 0x20008086))
	h = call(ProcRegister, 2)
	h.Version = 2
	send(h, nil)
	wantRemote(t, "unknown version", readError(t, rd, 2), CodeRPC, DomainRPC, "version 2")
	send(call(99, 3), nil)
	wantRemote(t, "unknown procedure", readError(t, rd, 3), CodeRPC, DomainRPC, "unknown procedure: 99")
	send(call(ProcAcquireResource, 4), []byte{0, 0, 0, 9, 1})
	wantRemote(t, "bad payload", readError(t, rd, 4), CodeRPC, DomainRPC, "Unable to decode message payload")
	h = call(ProcRestrict, 5)
	h.Status = StatusError
	send(h, []byte{0, 0, 0, 0})
	wantRemote(t, "bad status", readError(t, rd, 5), CodeRPC, DomainRPC, "Unexpected message status 1")
	h = call(ProcRestrict, 6)
	h.Type = TypeCallWithFDs
	send(h, []byte{0, 0, 0, 0})
	wantRemote(t, "call with fds", readError(t, rd, 6), CodeRPC, DomainRPC, "Unexpected message type 4")
	// A message that wants no reply gets none: the next reply is serial 8's.
	h = call(ProcRestrict, 7)
	h.Type = TypeMessage
	send(h, []byte{0, 0, 0, 0})
	// A call larger than any of this program is skipped, not buffered.
	send(call(ProcCreateLockspace, 8), make([]byte, MaxCallSize))
	wantRemote(t, "oversized call", readError(t, rd, 8), CodeRPC, DomainRPC, "larger than the limit")
	// Still a working connection.
	b, _ := AppendCall(nil, 9, &CreateLockspaceArgs{Path: ""})
	writeAll(t, nc, b)
	if h, payload, err := rd.Next(); err != nil || h.Serial != 9 || h.Status != StatusOK || len(payload) != 0 {
		t.Fatalf("after protocol errors: %+v %x %v", h, payload, err)
	}

	// Garbage framing: the server drops that connection only.
	g, grd := ts.raw()
	writeAll(t, g, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	if _, _, err := grd.Next(); !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("garbage connection: %v, want it closed", err)
	}
	ts.waitClosed(os.Getpid())

	// A client that vanishes halfway through a message.
	half, _ := ts.raw()
	writeAll(t, half, b[:10])
	half.Close()
	ts.waitClosed(os.Getpid())

	// A client that sends a call and vanishes before the reply: the call
	// is carried out, its close releases nothing (its peer is not the owner).
	img := image(t, "v.img")
	gone := ts.registered("vanisher", fakePID)
	msg, _ := AppendCall(nil, 1, &AcquireResourceArgs{Name: img})
	writeAll(t, gone.Conn(), msg)
	gone.Close()
	ts.waitClosed(os.Getpid())
	if got := ts.holders(diskKey(t, img)); !slices.Equal(got, []string{uuidOf("vanisher")}) {
		t.Fatalf("holders after the vanished call %v", got)
	}

	// The server still serves.
	c := ts.registered("after", fakePID+1)
	wantRemote(t, "after garbage", c.AcquireResource(ctx, "", img, 0), CodeResourceBusy, DomainLockspace, `"vanisher"`)
}

// The client gives up at its context's deadline and its connection is
// unusable afterwards.
func TestClientDeadline(t *testing.T) {
	sock := filepath.Join(socketDir(t), "mute")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		nc, err := l.Accept()
		if err == nil {
			accepted <- nc
		}
	}()
	c, err := Dial(testCtx(t), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(testCtx(t), 50*time.Millisecond)
	defer cancel()
	err = c.CreateLockspace(ctx, "")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call to a mute server: %v, want context.DeadlineExceeded", err)
	}
	if err := c.CreateLockspace(testCtx(t), ""); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("call after a timeout: %v, want ErrClientClosed", err)
	}
	(<-accepted).Close()

	// A cancelled (not timed out) call ends too.
	ts := startServer(t, Config{})
	c2 := ts.dial()
	cctx, ccancel := context.WithCancel(testCtx(t))
	ccancel()
	if err := c2.CreateLockspace(cctx, ""); !errors.Is(err, context.Canceled) {
		t.Fatalf("call with a cancelled context: %v", err)
	}
	// The encoding of an invalid call fails before anything is sent.
	if err := c2.AcquireResource(testCtx(t), "", "a\x00b", 0); !errors.Is(err, ErrStringNUL) {
		t.Fatalf("NUL: %v", err)
	}
	wantOK(t, "the connection still works", c2.CreateLockspace(testCtx(t), ""))
}

// A shutdown of the server closes connections without applying the close
// rule, even for the owner's own connection: the daemon keeps its locks.
func TestShutdownKeepsLocks(t *testing.T) {
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	killed := make(chan int, 1)
	s, err := NewServer(Config{Manager: m, Kill: func(_ context.Context, p *Peer) error {
		killed <- p.PID
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(socketDir(t), "sock")
	l, err := Listen(t.Context(), sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	c, err := Dial(testCtx(t), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	img := image(t, "keep.img")
	wantOK(t, "register self", c.Register(testCtx(t), owner("self", os.Getpid()), 0))
	wantOK(t, "acquire", c.AcquireResource(testCtx(t), "", img, 0))
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	select {
	case pid := <-killed:
		t.Fatalf("shutdown killed pid %d", pid)
	default:
	}
	if locks := m.Locks(); len(locks) != 1 || locks[0].Holders[0].PID != os.Getpid() {
		t.Fatalf("locks after shutdown: %+v", locks)
	}
	if err := c.CreateLockspace(testCtx(t), ""); err == nil {
		t.Fatal("the connection survived the shutdown")
	}
}

func TestNewServerConfig(t *testing.T) {
	if _, err := NewServer(Config{}); err == nil {
		t.Fatal("no Manager accepted")
	}
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	if _, err := NewServer(Config{Manager: m, Lockspaces: []string{"relative"}}); err == nil {
		t.Fatal("relative configured lockspace accepted")
	}
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"version":2}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewServer(Config{Manager: m, Store: FileStore{Path: bad}}); err == nil {
		t.Fatal("unknown store version accepted")
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	ts := startServer(t, Config{})
	if l, err := Listen(t.Context(), ts.sock); err == nil {
		l.Close()
		t.Fatal("Listen took over a live socket")
	}
	// A stale socket file is replaced.
	stale := filepath.Join(socketDir(t), "stale")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	l2, err := Listen(t.Context(), stale)
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	l2.Close()

}

// A live daemon whose backlog is full (connecting fails with EAGAIN, not
// ECONNREFUSED) keeps its socket: only a refused connection means stale.
func TestListenKeepsASocketWithAFullBacklog(t *testing.T) {
	busy := filepath.Join(socketDir(t), "busy")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: busy}); err != nil {
		t.Fatal(err)
	}
	// Backlog 0: the kernel queues one connection, so a few fill it.
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	full := false
	for range 8 {
		c, err := net.Dial("unix", busy)
		if errors.Is(err, syscall.EAGAIN) {
			full = true
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	if !full {
		t.Fatal("8 connections did not fill a backlog of 0")
	}
	if l, err := Listen(t.Context(), busy); err == nil {
		l.Close()
		t.Fatal("Listen took over a live socket whose backlog is full")
	}
	if _, err := os.Lstat(busy); err != nil {
		t.Fatalf("the live socket was removed: %v", err)
	}
}

// The server's records follow the lock table when the daemon releases an
// owner behind its back (an exited QEMU noticed through its pidfd).
func TestGrantsFollowTheTable(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	dir := t.TempDir()
	a := ts.registered("a", fakePID+1)
	b := ts.registered("b", fakePID+2)
	wantOK(t, "lockspace", a.CreateLockspace(ctx, dir))
	wantOK(t, "a shared", a.AcquireResource(ctx, dir, "k", AcquireShared|AcquireAutoCreate))
	wantOK(t, "b shared", b.AcquireResource(ctx, dir, "k", AcquireShared|AcquireAutoCreate))
	if err := ts.m.Unregister(ctx, uuidOf("b")); err != nil {
		t.Fatal(err)
	}
	wantOK(t, "a releases", a.ReleaseResource(ctx, dir, "k", 0))
	if _, err := os.Stat(filepath.Join(dir, "k")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lease file after its last real holder released it: %v", err)
	}
	wantRemote(t, "b released behind the server's back", b.ReleaseResource(ctx, dir, "k", 0), CodeResourceBusy, DomainLockspace, "is not locked")
}

// After a restart of the server (the daemon's lock table kept, the
// server's records lost), a lease shared with an owner granted before the
// restart is not the new holder's alone: its file stays until the last
// holder releases it.
func TestGrantsAcrossARestart(t *testing.T) {
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	dir := t.TempDir()
	file := filepath.Join(dir, "k")
	ctx := testCtx(t)
	before := startServer(t, Config{Manager: m, Lockspaces: []string{dir}})
	a := before.registered("a", fakePID+1)
	wantOK(t, "a shared before the restart", a.AcquireResource(ctx, dir, "k", AcquireShared|AcquireAutoCreate))

	ts := startServer(t, Config{Manager: m, Lockspaces: []string{dir}})
	b := ts.registered("b", fakePID+2)
	wantOK(t, "b shared after the restart", b.AcquireResource(ctx, dir, "k", AcquireShared|AcquireAutoCreate))
	wantOK(t, "b releases", b.ReleaseResource(ctx, dir, "k", 0))
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("lease file removed while a still holds it: %v", err)
	}
	a2 := ts.registered("a", fakePID+1)
	wantOK(t, "a releases after the restart", a2.ReleaseResource(ctx, dir, "k", 0))
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lease file after its last holder released it: %v, want it removed", err)
	}
	if locks := m.Locks(); len(locks) != 0 {
		t.Fatalf("locks left: %+v", locks)
	}
}

// Lease files auto-created before a restart of the server (the lock table
// kept, as the daemon's lock-holder keeps it) still go with their last
// holder after it: released over the protocol, released by the daemon
// behind the server's back (Forgotten), or gone while the server was down.
// A file that was not auto-created stays.
func TestAutoCreatedLeaseFilesGoWithTheirLastHolderAfterARestart(t *testing.T) {
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	dir := t.TempDir()
	grants := DirGrantStore{Dir: filepath.Join(t.TempDir(), "grants")}
	ctx := testCtx(t)
	before := startServer(t, Config{Manager: m, Lockspaces: []string{dir}, Grants: grants})
	owners := map[string]*Client{}
	for _, name := range []string{"released", "forgotten", "gone"} {
		owners[name] = before.registered(name, fakePID+len(owners))
		wantOK(t, name+" acquires", owners[name].AcquireResource(ctx, dir, name, AcquireAutoCreate))
	}
	wantOK(t, "create kept", owners["released"].CreateResource(ctx, dir, "kept", 0))
	wantOK(t, "acquire kept", owners["released"].AcquireResource(ctx, dir, "kept", 0))
	if err := m.Unregister(ctx, uuidOf("gone")); err != nil { // its owner exits while the server is down
		t.Fatal(err)
	}

	ts := startServer(t, Config{Manager: m, Lockspaces: []string{dir}, Grants: grants})
	wantGone := func(name string) {
		t.Helper()
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("lease file %s after its last holder went: %v, want it removed", name, err)
		}
	}
	wantGone("gone")
	if _, err := os.Stat(filepath.Join(dir, "forgotten")); err != nil {
		t.Fatalf("lease file removed while its holder holds it: %v", err)
	}
	c := ts.registered("released", fakePID)
	wantOK(t, "release after the restart", c.ReleaseResource(ctx, dir, "released", 0))
	wantGone("released")
	wantOK(t, "release kept after the restart", c.ReleaseResource(ctx, dir, "kept", 0))
	if _, err := os.Stat(filepath.Join(dir, "kept")); err != nil {
		t.Fatalf("a lease file that was not auto-created was removed: %v", err)
	}
	if err := m.Unregister(ctx, uuidOf("forgotten")); err != nil {
		t.Fatal(err)
	}
	ts.s.Forgotten(uuidOf("forgotten"))
	wantGone("forgotten")
	if got, err := grants.Load(); err != nil || len(got) != 0 {
		t.Fatalf("grant records left: %v %v", got, err)
	}
}

// BenchmarkCycle is libvirt's hot path: REGISTER, ACQUIRE, RELEASE of one
// disk on one connection (NopDriver: the protocol and the table only).
func BenchmarkCycle(b *testing.B) {
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	s, err := NewServer(Config{Manager: m})
	if err != nil {
		b.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "vlk")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "bench.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	l, err := Listen(b.Context(), filepath.Join(dir, "sock"))
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	defer func() { cancel(); <-done }()
	c, err := Dial(ctx, filepath.Join(dir, "sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	o := owner("bench", fakePID)
	for b.Loop() {
		if err := c.Register(ctx, o, 0); err != nil {
			b.Fatal(err)
		}
		if err := c.AcquireResource(ctx, "", img, 0); err != nil {
			b.Fatal(err)
		}
		if err := c.ReleaseResource(ctx, "", img, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkServerCycle is BenchmarkCycle with a client that allocates
// nothing (it sends encoded calls and reads the replies raw), so that its
// allocs/op are the server's (and the lock table's) alone.
func BenchmarkServerCycle(b *testing.B) {
	benchServerCycle(b, func(string) lockmgr.Driver { return lockmgr.NopDriver{} })
}

// BenchmarkServerCycleLockspace is BenchmarkServerCycle with the lockspace
// driver (direct disk leases: an OFD lock on the image itself), which
// vmlock bench libvirt runs vmlockd with.
func BenchmarkServerCycleLockspace(b *testing.B) {
	benchServerCycle(b, func(dir string) lockmgr.Driver {
		d, err := lsdriver.New(lsdriver.Config{StateDir: filepath.Join(dir, "state")})
		if err != nil {
			b.Fatal(err)
		}
		return d
	})
}

// benchServerCycle runs the cycle of BenchmarkServerCycle on a Manager
// with the driver that newDriver returns for a temporary directory.
func benchServerCycle(b *testing.B, newDriver func(dir string) lockmgr.Driver) {
	dir, err := os.MkdirTemp("", "vlk")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	d := newDriver(dir)
	defer d.Close()
	m := lockmgr.NewManager(d, lockmgr.Options{})
	s, err := NewServer(Config{Manager: m})
	if err != nil {
		b.Fatal(err)
	}
	// Longer than 32 bytes as a key, as image paths are, whatever the
	// length of dir: shorter strings are built without allocating.
	img := filepath.Join(dir, "bench-images", "bench.qcow2")
	if err := os.Mkdir(filepath.Dir(img), 0o700); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	l, err := Listen(b.Context(), filepath.Join(dir, "sock"))
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	defer func() { cancel(); <-done }()
	nc, err := net.Dial("unix", filepath.Join(dir, "sock"))
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	var calls [][]byte
	for i, a := range []Args{
		&RegisterArgs{Owner: owner("bench", fakePID)},
		&AcquireResourceArgs{Name: img},
		&ReleaseResourceArgs{Name: img},
	} {
		c, err := AppendCall(nil, uint32(i), a)
		if err != nil {
			b.Fatal(err)
		}
		calls = append(calls, c)
	}
	rd := NewReader(nc, MaxMessageSize)
	for b.Loop() {
		for _, c := range calls {
			if _, err := nc.Write(c); err != nil {
				b.Fatal(err)
			}
			h, payload, err := rd.Next()
			if err != nil || h.Status != StatusOK {
				b.Fatalf("reply %+v %v: %q", h, err, payload)
			}
		}
	}
}

// Many connections at once: one exclusive winner; all sharers admitted;
// nothing left behind.
func TestConcurrentClients(t *testing.T) {
	ts := startServer(t, Config{})
	ctx := testCtx(t)
	img := image(t, "c.img")
	dir := t.TempDir()
	const n = 8
	clients := make([]*Client, n)
	for i := range clients {
		clients[i] = ts.registered(fmt.Sprintf("vm%d", i), fakePID+i)
	}
	wantOK(t, "lockspace", clients[0].CreateLockspace(ctx, dir))
	run := func(f func(i int, c *Client) error) []error {
		errs := make([]error, n)
		done := make(chan struct{})
		for i, c := range clients {
			go func() {
				errs[i] = f(i, c)
				done <- struct{}{}
			}()
		}
		for range clients {
			<-done
		}
		return errs
	}
	wins := 0
	for i, err := range run(func(_ int, c *Client) error { return c.AcquireResource(ctx, "", img, 0) }) {
		if err == nil {
			wins++
			wantOK(t, "winner releases", clients[i].ReleaseResource(ctx, "", img, 0))
		} else {
			wantRemote(t, "loser", err, CodeResourceBusy, DomainLockspace, "locked exclusively")
		}
	}
	if wins != 1 {
		t.Fatalf("%d exclusive winners", wins)
	}
	for _, err := range run(func(_ int, c *Client) error {
		return c.AcquireResource(ctx, dir, "lease", AcquireShared|AcquireAutoCreate)
	}) {
		wantOK(t, "sharer", err)
	}
	for _, err := range run(func(_ int, c *Client) error { return c.ReleaseResource(ctx, dir, "lease", 0) }) {
		wantOK(t, "sharer releases", err)
	}
	if locks := ts.m.Locks(); len(locks) != 0 {
		t.Fatalf("locks left: %+v", locks)
	}
	if objs := ts.m.Objects(); len(objs) != 0 {
		t.Fatalf("objects left: %+v", objs)
	}
	if _, err := os.Stat(filepath.Join(dir, "lease")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lease file after the last sharer: %v", err)
	}
}

// corruptStoreRestart serves two lockspaces from store and holds a lease in
// the second, then corrupts the store file with corrupt and starts a new
// server on the same lock table. It returns the two lockspaces, the new
// server and its log.
func corruptStoreRestart(t *testing.T, corrupt func(b []byte) []byte) (a, b string, ts *testServer, logs *syncbuf.Buffer) {
	t.Helper()
	store := FileStore{Path: filepath.Join(t.TempDir(), "libvirt-lockspaces.json")}
	root := t.TempDir()
	a, b = filepath.Join(root, "a"), filepath.Join(root, "b")
	m := lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{})
	before := startServer(t, Config{Manager: m, Store: store})
	c := before.registered("holder", fakePID)
	wantOK(t, "create a", c.CreateLockspace(testCtx(t), a))
	wantOK(t, "create b", c.CreateLockspace(testCtx(t), b))
	wantOK(t, "acquire in b", c.AcquireResource(testCtx(t), b, "k", 0|AcquireAutoCreate))
	data, err := os.ReadFile(store.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(store.Path, corrupt(data), 0o600); err != nil {
		t.Fatal(err)
	}
	logs = &syncbuf.Buffer{}
	ts = startServer(t, Config{Manager: m, Store: store, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	return a, b, ts, logs
}

// wantKeptAside checks that the log names the store file, says what is
// wrong with it and what to do, and that the file was moved aside whole,
// where the log says.
func wantKeptAside(t *testing.T, dir string, content []byte, wrong string, logs *syncbuf.Buffer) {
	t.Helper()
	path := filepath.Join(dir, "libvirt-lockspaces.json")
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the corrupt store is still at %s: %v", path, err)
	}
	asides, _ := filepath.Glob(path + ".corrupt-*")
	if len(asides) != 1 {
		t.Fatalf("copies aside: %q, want one", asides)
	}
	if got, err := os.ReadFile(asides[0]); err != nil || !bytes.Equal(got, content) {
		t.Errorf("the copy aside holds %q (%v), want %q", got, err, content)
	}
	var logged string
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec struct{ Level, Err string }
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Level == "ERROR" {
			logged = rec.Err
		}
	}
	for _, s := range []string{path + " is corrupt: " + wrong, "moved it aside to " + asides[0],
		"libvirtd (virtqemud) is restarted", "libvirt_lockspace_dirs"} {
		if !strings.Contains(logged, s) {
			t.Errorf("the error logged does not say %q:\n%s", s, logs.String())
		}
	}
}

// A store file cut short (a disk that lost its end) does not stop the
// server: it starts without the lockspaces the file listed, logs what is
// wrong with which file and what to do, and keeps the file aside. A lease
// held in a lockspace it no longer serves is granted to nobody else once
// libvirtd creates that lockspace again.
func TestServerStartsWithATruncatedLockspaceStoreAndKeepsItAside(t *testing.T) {
	var cut []byte
	a, b, ts, logs := corruptStoreRestart(t, func(data []byte) []byte { cut = data[:len(data)-5]; return cut })
	wantKeptAside(t, filepath.Dir(ts.s.store.(FileStore).Path), cut,
		fmt.Sprintf("unexpected end of JSON input (at byte %d)", len(cut)), logs)
	if got := ts.s.Lockspaces(); !slices.Equal(got, []string{""}) {
		t.Fatalf("served %q, want the default lockspace only", got)
	}
	c := ts.registered("other", fakePID)
	wantRemote(t, "acquire in a lockspace no longer served", c.AcquireResource(testCtx(t), a, "k", AcquireAutoCreate),
		CodeInternalError, DomainRPC, "Lockspace for path "+a+" does not exist")
	// libvirtd restarted: it creates its lockspaces again.
	wantOK(t, "create b again", c.CreateLockspace(testCtx(t), b))
	wantRemote(t, "acquire the lease held in b", c.AcquireResource(testCtx(t), b, "k", AcquireAutoCreate),
		CodeResourceBusy, DomainLockspace, `"holder"`)
	if got, err := ts.s.store.Load(); err != nil || !slices.Equal(got, []string{b}) {
		t.Fatalf("store after the restart of libvirtd: %q (%v), want %q", got, err, []string{b})
	}
}

// A store file overwritten with something else does not stop the server
// either: it starts without the stored lockspaces, logs where the garbage
// starts, and keeps the file aside.
func TestServerStartsWithAGarbageLockspaceStoreAndKeepsItAside(t *testing.T) {
	garbage := []byte("\x7fELF\x02\x01\x01\x00")
	_, _, ts, logs := corruptStoreRestart(t, func([]byte) []byte { return garbage })
	wantKeptAside(t, filepath.Dir(ts.s.store.(FileStore).Path), garbage,
		`invalid character '\x7f' looking for beginning of value (at byte 1)`, logs)
	if got := ts.s.Lockspaces(); !slices.Equal(got, []string{""}) {
		t.Fatalf("served %q, want the default lockspace only", got)
	}
}

// A store file whose version is gone (a disk that damaged its key) is
// corrupt, not a newer vmlockd's: the server starts without the stored
// lockspaces and keeps the file aside, as for any other damage.
func TestServerStartsWithALockspaceStoreWithoutAVersionAndKeepsItAside(t *testing.T) {
	var damaged []byte
	_, _, ts, logs := corruptStoreRestart(t, func(data []byte) []byte {
		damaged = bytes.Replace(data, []byte(`"version"`), []byte(`"versiom"`), 1)
		return damaged
	})
	wantKeptAside(t, filepath.Dir(ts.s.store.(FileStore).Path), damaged, "version 0, want 1", logs)
	if got := ts.s.Lockspaces(); !slices.Equal(got, []string{""}) {
		t.Fatalf("served %q, want the default lockspace only", got)
	}
}

// A store file that lists a relative path (a disk that turned a '/' into
// a '.') is corrupt: the server keeps it aside, whole, instead of serving
// the other lockspaces and writing over the damaged one with the next
// lockspace created.
func TestServerStartsWithALockspaceStoreListingARelativePathAndKeepsItAside(t *testing.T) {
	var damaged []byte
	a, _, ts, logs := corruptStoreRestart(t, func(data []byte) []byte {
		damaged = bytes.Replace(data, []byte(`"/`), []byte(`".`), 1)
		return damaged
	})
	wantKeptAside(t, filepath.Dir(ts.s.store.(FileStore).Path), damaged,
		fmt.Sprintf("lockspace 0: path %q is not absolute", "."+a[1:]), logs)
	if got := ts.s.Lockspaces(); !slices.Equal(got, []string{""}) {
		t.Fatalf("served %q, want the default lockspace only", got)
	}
}

// A lockspace path that the store cannot keep as it is (JSON text would
// replace its invalid UTF-8, so that a restarted server would serve
// another path) is refused, and the store keeps what it had.
func TestCreateLockspaceThatTheStoreCannotKeepIsRefused(t *testing.T) {
	store := FileStore{Path: filepath.Join(t.TempDir(), "libvirt-lockspaces.json")}
	ts := startServer(t, Config{Store: store})
	c := ts.registered("holder", fakePID)
	good, bad := filepath.Join(t.TempDir(), "files"), filepath.Join(t.TempDir(), "caf\xe9")
	wantOK(t, "create", c.CreateLockspace(testCtx(t), good))
	wantRemote(t, "create with invalid UTF-8", c.CreateLockspace(testCtx(t), bad),
		CodeSystemError, DomainLockspace, "Unable to record lockspace", "not valid UTF-8")
	if got := ts.s.Lockspaces(); slices.Contains(got, bad) {
		t.Fatalf("served %q after the refusal", got)
	}
	if got, err := store.Load(); err != nil || !slices.Equal(got, []string{good}) {
		t.Fatalf("store after the refusal: %q (%v), want %q", got, err, []string{good})
	}
}

// releaseFails is a lock driver whose releases fail (an unreachable NFS
// server): the lock table forgets the lease all the same.
type releaseFails struct{ lockmgr.NopDriver }

func (releaseFails) Release(context.Context, []lockmgr.Lease) error {
	return errors.New("the lease server does not answer")
}

// A RELEASE that the lock driver fails still ends the owner's hold, as the
// lock table does: the auto-created lease file goes with its last holder,
// its grant record too, and the owner, which holds nothing now, is
// forgotten. The caller is told of the driver's failure.
func TestReleaseThatTheDriverFailsEndsTheGrant(t *testing.T) {
	grants := DirGrantStore{Dir: filepath.Join(t.TempDir(), "grants")}
	m := lockmgr.NewManager(releaseFails{}, lockmgr.Options{})
	ts := startServer(t, Config{Manager: m, Grants: grants})
	ctx := testCtx(t)
	dir := filepath.Join(t.TempDir(), "files")
	a := ts.registered("a", fakePID)
	wantOK(t, "create lockspace", a.CreateLockspace(ctx, dir))
	wantOK(t, "acquire", a.AcquireResource(ctx, dir, "k", AcquireAutoCreate))
	if got, err := grants.Load(); err != nil || len(got) != 1 {
		t.Fatalf("grant records after the acquire: %+v (%v), want one", got, err)
	}

	wantRemote(t, "release", a.ReleaseResource(ctx, dir, "k", 0), CodeInternalError, DomainLockspace, "does not answer")
	if got := ts.holders(lockmgr.LeaseResource(LockspaceName(dir), "k", 0).Key()); len(got) != 0 {
		t.Fatalf("holders after the release: %v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "k")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lease file after its last holder's release: %v, want it removed", err)
	}
	if got, err := grants.Load(); err != nil || len(got) != 0 {
		t.Errorf("grant records after the release: %+v (%v), want none", got, err)
	}
	if _, err := m.Object(uuidOf("a")); !errors.Is(err, lockmgr.ErrNotRegistered) {
		t.Errorf("the owner, which holds nothing, is still an object: %v", err)
	}
	wantRemote(t, "release again", a.ReleaseResource(ctx, dir, "k", 0), CodeResourceBusy, DomainLockspace, "is not locked")
}

// Locking a resource's or an owner's mutex, which every ACQUIRE and
// RELEASE does, allocates nothing once the mutex set is warm.
func TestKeyedMutexLocksWithoutAllocating(t *testing.T) {
	var k keyedMutex
	key := strings.Repeat("k", 64)
	k.lock(key).unlock()
	if n := testing.AllocsPerRun(100, func() { k.lock(key).unlock() }); n != 0 {
		t.Fatalf("%v allocations per lock and unlock, want 0", n)
	}
}

// CREATE_LOCKSPACE of the default lockspace ("", always served) succeeds
// and records nothing: the store holds directories only, and an attempt to
// add "" to it used to be logged as an error on every such call.
func TestCreatingTheDefaultLockspaceRecordsNothing(t *testing.T) {
	store := FileStore{Path: filepath.Join(t.TempDir(), "libvirt-lockspaces.json")}
	logs := &syncbuf.Buffer{}
	ts := startServer(t, Config{Manager: lockmgr.NewManager(lockmgr.NopDriver{}, lockmgr.Options{}), Store: store,
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	c := ts.dial()
	wantOK(t, "create the default lockspace", c.CreateLockspace(testCtx(t), ""))
	if _, err := os.Stat(store.Path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the store was written: %v", err)
	}
	if strings.Contains(logs.String(), `"level":"ERROR"`) {
		t.Errorf("an error was logged:\n%s", logs.String())
	}
	if got := ts.s.Lockspaces(); !slices.Equal(got, []string{""}) {
		t.Errorf("served %q, want the default lockspace only", got)
	}
}
