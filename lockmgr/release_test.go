package lockmgr_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// These tests run the Manager on the lockspace driver: real OFD locks on
// real files, checked from an independent open file description.

const vmUUID = "cccccccc-0000-4000-8000-000000000003"

// releaseSignal is the lockspace driver, saying each time a Release has
// returned: a release made in the background can be waited for.
type releaseSignal struct {
	*lockspace.Driver
	released chan error
}

func (d releaseSignal) Release(ctx context.Context, ls []lockmgr.Lease) error {
	err := d.Driver.Release(ctx, ls)
	d.released <- err
	return err
}

// lockspaceManager returns a Manager on a lockspace driver with direct disk
// leases, a VM registered with one disk image, and the image's path.
func lockspaceManager(t *testing.T, obs lockmgr.Observer, mode lockmgr.Mode) (*lockmgr.Manager, releaseSignal, string) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "vm.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ls, err := lockspace.New(lockspace.Config{StateDir: filepath.Join(dir, "state")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ls.Close() })
	d := releaseSignal{Driver: ls, released: make(chan error, 16)}
	m := lockmgr.NewManager(d, lockmgr.Options{Observer: obs})
	if err := m.Register(lockmgr.Object{UUID: vmUUID, Name: "vm", PID: os.Getpid(), Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	if err := m.AddResource(vmUUID, lockmgr.DiskResource(img, mode)); err != nil {
		t.Fatal(err)
	}
	if err := m.Acquire(context.Background(), vmUUID, ""); err != nil {
		t.Fatal(err)
	}
	if !locked(t, img) {
		t.Fatal("the granted disk is not locked")
	}
	return m, d, img
}

// locked reports whether anyone holds an OFD or POSIX lock on byte 0 of
// path, as another process taking it exclusively would see.
func locked(t *testing.T, path string) bool {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	l := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: 1}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &l); err != nil {
		t.Fatal(err)
	}
	return l.Type != unix.F_UNLCK
}

// waitReleased waits until the driver has released a lease: a release
// that is never made fails the test instead of hanging it.
func waitReleased(t *testing.T, d releaseSignal) {
	t.Helper()
	select {
	case err := <-d.released:
		if err != nil {
			t.Fatalf("the driver's release: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the driver was never asked to release the lease")
	}
}

// A change to read-only whose context ends just as the change is recorded
// still releases the old lease: the lock-holder no longer lists it, so a
// lock left behind would be held by nobody. The change stands, and the
// call says so.
func TestAChangeToReadOnlyWhoseContextEndsAsItIsRecordedReleasesTheLock(t *testing.T) {
	for _, from := range []lockmgr.Mode{lockmgr.Exclusive, lockmgr.Shared} {
		t.Run(from.String(), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			obs := observerFunc(func(_ context.Context, _ lockmgr.Object, ls []lockmgr.Lease, ro []lockmgr.Resource) error {
				if len(ls) == 0 && len(ro) == 1 {
					cancel() // the change is recorded; the caller gives up now
				}
				return nil
			})
			m, d, img := lockspaceManager(t, obs, from)
			err := m.ChangeMode(ctx, vmUUID, lockmgr.DiskResource(img, lockmgr.ReadOnly))
			waitReleased(t, d)
			if locked(t, img) {
				t.Fatalf("the %s lock is still held after the change to read-only", from)
			}
			if err != nil {
				t.Fatalf("ChangeMode to read-only, recorded before its context ended: %v, want nil (the change is made)", err)
			}
			ls, ro, err := m.Held(vmUUID)
			if err != nil || len(ls) != 0 || len(ro) != 1 {
				t.Fatalf("after the change the object holds leases %v, read-only %v (%v); want the disk read-only", ls, ro, err)
			}
		})
	}
}

// A release whose context has already ended (a client that gave up while
// its request waited) still unlocks what it takes out of the table and the
// lock-holder's record.
func TestAReleaseWhoseContextHasEndedStillUnlocks(t *testing.T) {
	for _, how := range []string{"release", "unregister"} {
		t.Run(how, func(t *testing.T) {
			m, d, img := lockspaceManager(t, nil, lockmgr.Exclusive)
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			var err error
			if how == "release" {
				_, err = m.Release(ctx, vmUUID, nil)
			} else {
				err = m.Unregister(ctx, vmUUID)
			}
			if err != nil && !errors.Is(err, lockmgr.ErrTimeout) {
				t.Fatalf("%s with an ended context: %v, want nil or a timeout", how, err)
			}
			waitReleased(t, d)
			if locked(t, img) {
				t.Fatal("the disk is still locked after its release")
			}
			if n := m.HeldCount(); n != 0 {
				t.Fatalf("the table lists %d held resources after the release", n)
			}
		})
	}
}

type observerFunc func(ctx context.Context, o lockmgr.Object, ls []lockmgr.Lease, ro []lockmgr.Resource) error

func (f observerFunc) Changed(ctx context.Context, o lockmgr.Object, ls []lockmgr.Lease, ro []lockmgr.Resource) error {
	return f(ctx, o, ls, ro)
}
