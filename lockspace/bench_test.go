package lockspace

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// BenchmarkAcquireRelease measures one Acquire+Release of the driver, next
// to the floor: an OFD lock+unlock of one byte of an open file.
func BenchmarkAcquireRelease(b *testing.B) {
	ctx := context.Background()
	holder := lockmgr.Holder{Name: "vm1", UUID: "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", PID: os.Getpid(), Host: "host1"}
	b.Run("ofd-floor", func(b *testing.B) {
		p := filepath.Join(b.TempDir(), "raw")
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		fd := int(f.Fd())
		for b.Loop() {
			if err := tryLock(fd, unix.F_WRLCK, 0); err != nil {
				b.Fatal(err)
			}
			if err := unlock(fd, 0, 1); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("open-lock-close-floor", func(b *testing.B) {
		p := filepath.Join(b.TempDir(), "image")
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			fd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			if err := tryLock(fd, unix.F_WRLCK, 0); err != nil {
				b.Fatal(err)
			}
			_ = unix.Close(fd)
		}
	})
	cases := []struct {
		name     string
		indirect bool
		n        int
		mode     lockmgr.Mode
		lease    bool
	}{
		{name: "direct", n: 1},
		{name: "direct-shared", n: 1, mode: lockmgr.Shared},
		{name: "indirect", n: 1, indirect: true},
		{name: "lease", n: 1, lease: true},
		{name: "direct-grant8", n: 8},
		{name: "indirect-grant8", n: 8, indirect: true},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			dir := b.TempDir()
			cfg := Config{StateDir: filepath.Join(dir, "state"), LeaseDir: filepath.Join(dir, "leases")}
			if c.indirect {
				cfg.DiskLeaseDir = filepath.Join(dir, "disks")
			}
			d, err := New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			reqs := make([]lockmgr.Request, c.n)
			for i := range reqs {
				var r lockmgr.Resource
				if c.lease {
					r = lockmgr.LeaseResource("ls", fmt.Sprintf("key%d", i), c.mode)
				} else {
					p := filepath.Join(dir, fmt.Sprintf("disk%d.qcow2", i))
					if err := os.WriteFile(p, nil, 0o600); err != nil {
						b.Fatal(err)
					}
					r = lockmgr.DiskResource(p, c.mode)
				}
				h := holder
				h.Mode = c.mode
				reqs[i] = lockmgr.Request{Resource: r, Holder: h}
			}
			b.ReportAllocs()
			for b.Loop() {
				ls, err := d.Acquire(ctx, reqs)
				if err != nil {
					b.Fatal(err)
				}
				if err := d.Release(ctx, ls); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
