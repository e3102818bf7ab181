package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// benchDriverOpts are the flags of `vmlock bench driver`.
type benchDriverOpts struct {
	json       bool
	iterations int
	warmup     int
	dir        string
}

func newBenchDriverCmd() *cobra.Command {
	o := &benchDriverOpts{}
	c := &cobra.Command{
		Use:   "driver",
		Short: "the lockspace driver against a raw OFD lock: acquire+release of 1 and of 8 resources",
		Long: `Measures, interleaved in one run, the p50 (and p99) of:
  - ofd_lock_unlock: fcntl F_OFD_SETLK lock + unlock of byte 0 of an open file (the floor);
  - open_lock_close: open O_RDWR + OFD lock + close of an image (the least any direct lease costs);
  - driver_acquire_release: lockspace Acquire+Release of one exclusive disk, direct lease (the default);
  - driver_shared_acquire_release: the same, shared;
  - driver_grant8_acquire_release: one all-or-nothing Acquire+Release of 8 exclusive disks, direct;
  - driver_indirect_acquire_release: one exclusive disk through an indirect lease file, which is
    created and removed on every grant (its cost is the file system's create+unlink).
Goals: driver_acquire_release_vs_ofd_floor (≤ 3) and driver_grant8_vs_ofd_floor (≤ 10).
The output is always one JSON object (shared/specs/bench-output.md); progress goes to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBenchDriver(cmd.Context(), o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := c.Flags()
	f.BoolVar(&o.json, "json", false, "print the report as one JSON object (the only output format; accepted for uniformity)")
	f.IntVar(&o.iterations, "iterations", 10000, "timed rounds (each runs every measured operation once)")
	f.IntVar(&o.warmup, "warmup", 500, "untimed rounds first")
	f.StringVar(&o.dir, "dir", "", "directory for the files (default: a new directory in $TMPDIR, removed afterwards); the file system matters")
	return c
}

func runBenchDriver(ctx context.Context, o *benchDriverOpts, stdout, stderr io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	if o.iterations < 1 || o.warmup < 0 {
		return usageError{errors.New("--iterations must be at least 1 and --warmup at least 0")}
	}
	progress := func(format string, args ...any) { fmt.Fprintf(stderr, "bench driver: "+format+"\n", args...) }

	dir := o.dir
	if dir == "" {
		d, err := os.MkdirTemp("", "vmlock-bench-driver-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	images := filepath.Join(dir, "images")
	if err := os.MkdirAll(images, 0o700); err != nil {
		return err
	}
	image := func(name string) (string, error) {
		p := filepath.Join(images, name)
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			return "", err
		}
		r, err := lockmgr.Canonical(lockmgr.DiskResource(p, lockmgr.Exclusive))
		return r.Name, err
	}

	direct, err := lockspace.New(lockspace.Config{StateDir: filepath.Join(dir, "state-direct")})
	if err != nil {
		return err
	}
	defer direct.Close()
	indirect, err := lockspace.New(lockspace.Config{StateDir: filepath.Join(dir, "state-indirect"), DiskLeaseDir: filepath.Join(dir, "disk-leases")})
	if err != nil {
		return err
	}
	defer indirect.Close()

	host, _ := os.Hostname()
	holder := lockmgr.Holder{Name: "bench-vm", UUID: "00000000-0000-4000-8000-00000000beef", PID: os.Getpid(), Host: host}
	var one, shared, eight []lockmgr.Request
	for i := range 8 {
		p, err := image(fmt.Sprintf("disk%d.qcow2", i))
		if err != nil {
			return err
		}
		eight = append(eight, lockmgr.Request{Resource: lockmgr.DiskResource(p, lockmgr.Exclusive), Holder: holder})
	}
	one = eight[:1]
	sh := holder
	sh.Mode = lockmgr.Shared
	shared = []lockmgr.Request{{Resource: lockmgr.DiskResource(eight[0].Resource.Name, lockmgr.Shared), Holder: sh}}

	// The floors: a raw file locked and unlocked, and an image opened,
	// locked and closed.
	rawPath, err := image("raw")
	if err != nil {
		return err
	}
	rawFd, err := unix.Open(rawPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(rawFd)
	floorImage, err := image("floor.qcow2")
	if err != nil {
		return err
	}
	var failed error
	fail := func(err error) {
		if err != nil && failed == nil {
			failed = err
		}
	}
	wr := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: 1}
	un := unix.Flock_t{Type: unix.F_UNLCK, Whence: io.SeekStart, Start: 0, Len: 1}
	raw := func() {
		fail(unix.FcntlFlock(uintptr(rawFd), unix.F_OFD_SETLK, &wr))
		fail(unix.FcntlFlock(uintptr(rawFd), unix.F_OFD_SETLK, &un))
	}
	openLockClose := func() {
		fd, err := unix.Open(floorImage, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			fail(err)
			return
		}
		fail(unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &wr))
		fail(unix.Close(fd))
	}
	cycle := func(d *lockspace.Driver, reqs []lockmgr.Request) func() {
		return func() {
			ls, err := d.Acquire(ctx, reqs)
			if err != nil {
				fail(err)
				return
			}
			fail(d.Release(ctx, ls))
		}
	}

	progress("%d warm-up + %d timed rounds in %s", o.warmup, o.iterations, dir)
	start := time.Now()
	s := bench.Interleave(o.warmup, o.iterations,
		raw, openLockClose, cycle(direct, one), cycle(direct, shared), cycle(direct, eight), cycle(indirect, one))
	if failed != nil {
		return fmt.Errorf("bench driver: %w", failed)
	}
	progress("done in %v", time.Since(start).Round(time.Millisecond))

	p50 := func(i int) float64 { return bench.Micros(s[i].Percentile(50)) }
	p99 := func(i int) float64 { return bench.Micros(s[i].Percentile(99)) }
	rep := bench.NewReport("driver")
	rep.Metric("ofd_lock_unlock_p50_us", p50(0))
	rep.Metric("ofd_lock_unlock_p99_us", p99(0))
	rep.Metric("open_lock_close_p50_us", p50(1))
	rep.Metric("driver_acquire_release_p50_us", p50(2))
	rep.Metric("driver_acquire_release_p99_us", p99(2))
	rep.Metric("driver_shared_acquire_release_p50_us", p50(3))
	rep.Metric("driver_grant8_acquire_release_p50_us", p50(4))
	rep.Metric("driver_grant8_acquire_release_p99_us", p99(4))
	rep.Metric("driver_indirect_acquire_release_p50_us", p50(5))
	rep.Metric("driver_indirect_acquire_release_p99_us", p99(5))
	rep.Metric("open_lock_close_vs_ofd_floor", p50(1)/p50(0))
	rep.Metric("driver_acquire_release_vs_open_lock_close", p50(2)/p50(1))
	rep.Metric("driver_indirect_vs_ofd_floor", p50(5)/p50(0))
	rep.Goal("driver_acquire_release_vs_ofd_floor", p50(2)/p50(0), 3, bench.Lower)
	rep.Goal("driver_grant8_vs_ofd_floor", p50(4)/p50(0), 10, bench.Lower)
	return rep.Write(stdout)
}
