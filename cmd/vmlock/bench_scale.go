package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/lockmgr"
)

func newBenchScaleCmd() *cobra.Command {
	var owners, perOwner int
	c := &cobra.Command{
		Use:   "scale --json",
		Short: "10,000 resources held by 1,000 owners: memory, lock listing time, crash-restart time",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return benchScale(cmd.Context(), owners, perOwner)
		},
	}
	c.Flags().Bool("json", true, "print the JSON report (always on)")
	c.Flags().IntVar(&owners, "owners", 1000, "owner processes")
	c.Flags().IntVar(&perOwner, "disks-per-owner", 10, "disks each owner holds")
	return c
}

func benchScale(ctx context.Context, owners, perOwner int) error {
	e, err := newBenchEnv()
	if err != nil {
		return err
	}
	defer e.close()
	if _, err := e.start(ctx); err != nil {
		return err
	}
	c, err := api.Dial(ctx, e.socket)
	if err != nil {
		return err
	}
	defer c.Close()
	total := owners * perOwner
	fmt.Fprintf(os.Stderr, "bench scale: %d owners acquiring %d disks each\n", owners, perOwner)
	t0 := time.Now()
	for i := range owners {
		pid, err := e.owner()
		if err != nil {
			return err
		}
		rs := make([]lockmgr.Resource, perOwner)
		for j := range rs {
			p, err := e.image(fmt.Sprintf("o%d-d%d.img", i, j))
			if err != nil {
				return err
			}
			rs[j] = lockmgr.DiskResource(p, lockmgr.Exclusive)
		}
		o := lockmgr.Object{UUID: fmt.Sprintf("5ca1e000-0000-4000-8000-%012d", i), Name: fmt.Sprintf("vm%d", i), PID: pid}
		if _, err := c.Acquire(ctx, o, rs, ""); err != nil {
			return err
		}
	}
	fill := time.Since(t0)
	r := bench.NewReport("scale")
	r.Metric("resources", float64(total))
	r.Metric("owners", float64(owners))
	r.Metric("fill_s", fill.Seconds())
	daemonRSS, holderRSS := rssMiB(e.cmd.Process.Pid), rssMiB(e.holderPID())
	r.Metric("daemon_rss_mib", daemonRSS)
	r.Metric("holder_rss_mib", holderRSS)

	// The lock monitor through the CLI, as an operator runs it.
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	var list time.Duration
	for range 3 {
		t := time.Now()
		out, err := exec.Command(exe, "--socket", e.socket, "locks", "-o", "json").Output()
		if err != nil {
			return fmt.Errorf("vmlock locks: %w", err)
		}
		if d := time.Since(t); list == 0 || d < list {
			list = d
		}
		if len(out) == 0 {
			return fmt.Errorf("vmlock locks printed nothing")
		}
	}
	r.Metric("locks_list_s", list.Seconds())

	// SIGKILL, restart, and count: serving again with every lock held.
	fmt.Fprintf(os.Stderr, "bench scale: SIGKILL of the daemon and restart\n")
	e.kill9()
	t1 := time.Now()
	if _, err := e.start(ctx); err != nil {
		return err
	}
	c2, err := api.Dial(ctx, e.socket)
	if err != nil {
		return err
	}
	defer c2.Close()
	st, err := c2.Status(ctx)
	if err != nil {
		return err
	}
	restart := time.Since(t1)
	if int(st.Locks) != total {
		return fmt.Errorf("after restart the daemon holds %d locks, want %d", st.Locks, total)
	}
	r.Metric("restart_s", restart.Seconds())
	r.Metric("held_after_restart", float64(st.Locks))
	r.Goal("scale_rss_mib_10k", daemonRSS+holderRSS, 150, bench.Lower)
	r.Goal("scale_locks_list_s_10k", list.Seconds(), 1, bench.Lower)
	r.Goal("scale_restart_s_10k", restart.Seconds(), 2, bench.Lower)
	return r.WriteStdout()
}
