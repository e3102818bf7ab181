package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/qemu"
	"github.com/vmlock/vmlock/qmp"
)

// The QEMU commands: `run --qemu`, the virsh-like block job commands,
// disk hotplug, and the VM list. vmlockd supervises QEMU; these are its
// clients.

// runQEMU is `vmlock run --qemu -- qemu-system-… ARGS`: vmlockd locks the
// backing chain of every image on the command line for this process, then
// this process becomes QEMU, with -S (unless given) and vmlockd's QMP
// monitor added; vmlockd checks the chains against QEMU's graph and
// continues the guest.
func runQEMU(cmd *cobra.Command, g *globals, of *objectFlags, rf *resourceFlags, args []string) error {
	cl, err := qemu.ParseCommandLine(args[1:])
	if err != nil {
		return usageError{err}
	}
	if cl.Daemonize {
		return usageError{fmt.Errorf("-daemonize: QEMU would fork and this process, which owns the locks, would exit and release them; run QEMU in the foreground")}
	}
	if slices.Contains(cl.ChardevIDs, qmp.MonitorChardevID) {
		return usageError{fmt.Errorf("the QEMU command line already has a chardev with id %s, which vmlock adds itself", qmp.MonitorChardevID)}
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		return usageError{fmt.Errorf("command %q: %w", args[0], err)}
	}
	extra, err := rf.resources()
	if err != nil {
		return err
	}
	o := of.object()
	o.PID = os.Getpid()
	o.UUID = cmp.Or(o.UUID, newUUID())
	o.Name = cmp.Or(o.Name, cl.Name, filepath.Base(args[0]))
	if err := o.Validate(); err != nil {
		return err
	}
	req := &vmlockpb.QEMUStartRequest{Object: api.ObjectToPB(o), Resume: !cl.Paused}
	for _, d := range cl.Drives {
		p, err := filepath.Abs(d.Path)
		if err != nil {
			return err
		}
		req.Drives = append(req.Drives, &vmlockpb.QEMUDrive{Path: p, Format: d.Format, ReadOnly: d.ReadOnly, Shared: d.Shared, Backing: d.Backing, Id: d.ID})
	}
	for _, r := range extra {
		req.Resources = append(req.Resources, api.ResourceToPB(r))
	}
	if os.Geteuid() != 0 {
		// vmlockd's state directory is not ours to create a socket in.
		req.Monitor = filepath.Join(cmp.Or(os.Getenv("XDG_RUNTIME_DIR"), os.TempDir()), "vmlock-"+o.UUID+".qmp")
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), callTimeout)
	defer cancel()
	c, err := g.dial(ctx)
	if err != nil {
		return err
	}
	rep, err := c.StartQEMU(ctx, req)
	c.Close()
	if err != nil {
		return err
	}
	argv := append(slices.Clone(args),
		"-chardev", "socket,id="+qmp.MonitorChardevID+",path="+strings.ReplaceAll(rep.Monitor, ",", ",,")+",server=on,wait=off",
		"-mon", "chardev="+qmp.MonitorChardevID+",mode=control")
	if !cl.Paused {
		argv = append(argv, "-S") // vmlockd continues the guest once the chains are verified
	}
	return g.execHolding(path, argv, o.UUID)
}

// imageArg returns an image argument (DISK, --top, --base) as vmlockd
// must get it. vmlockd cannot know this process's working directory, so a
// relative path is made absolute here: a name with a slash is a path; a
// name without one is a path if such a file exists here, else a disk or
// node name, sent as it is.
func imageArg(s string) (string, error) {
	if s == "" || filepath.IsAbs(s) {
		return s, nil
	}
	if !strings.ContainsRune(s, '/') {
		if _, err := os.Stat(s); err != nil {
			return s, nil
		}
	}
	return filepath.Abs(s)
}

// imageArgs applies imageArg to each of ps.
func imageArgs(ps ...*string) error {
	for _, p := range ps {
		v, err := imageArg(*p)
		if err != nil {
			return err
		}
		*p = v
	}
	return nil
}

// bandwidthFlags are virsh's --bandwidth and --bytes.
type bandwidthFlags struct {
	n     int64
	bytes bool
}

func (b *bandwidthFlags) add(c *cobra.Command) {
	c.Flags().Int64Var(&b.n, "bandwidth", 0, "limit the job to this many MiB/s (bytes/s with --bytes); 0 is unlimited, a negative one is refused")
	c.Flags().BoolVar(&b.bytes, "bytes", false, "--bandwidth is in bytes per second")
}

// bytesPerSecond returns the limit in bytes per second; a negative one, or
// one in MiB/s too large to count in bytes, is a usage error.
func (b *bandwidthFlags) bytesPerSecond() (int64, error) {
	switch {
	case b.n < 0:
		return 0, usageError{fmt.Errorf("--bandwidth %d: want 0 (unlimited) or more", b.n)}
	case b.bytes:
		return b.n, nil
	case b.n > math.MaxInt64>>20:
		return 0, usageError{fmt.Errorf("--bandwidth %d MiB/s is too large (at most %d; --bytes for bytes per second)", b.n, int64(math.MaxInt64>>20))}
	}
	return b.n << 20, nil
}

func newBlockCommitCmd(g *globals) *cobra.Command {
	var req vmlockpb.BlockCommitRequest
	var bw bandwidthFlags
	var wait, verbose, pivot, keep, async bool
	c := &cobra.Command{
		Use:   "blockcommit VM DISK [--top IMG] [--base IMG] [--shallow] [--active] [--delete] [--wait] [--verbose] [--pivot|--keep-overlay] [--async]",
		Short: "commit a disk's images into a lower one (virsh blockcommit); the base is locked exclusively while it is written",
		Long: `blockcommit merges the images from --top (default: the active layer) down to
just above --base (default: the bottom of the chain; --shallow: top's own
backing image) into the base. The base is locked exclusively before the job
writes it; the job refuses to start if it cannot be.

Committing the active layer needs --active: such a job runs until it is ready
(every write of the guest is mirrored into the base), then waits for a pivot
(--pivot, or vmlock blockjob --pivot: the base becomes the active image, the
images above it are released) or an abort (--keep-overlay, or blockjob
--abort: the top stays active; the base, which has its data, is shared
again). An intermediate commit ends by itself. --delete unlinks the
committed images once the job has succeeded.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if pivot && keep {
				return usageError{fmt.Errorf("--pivot and --keep-overlay exclude each other")}
			}
			if (pivot || keep) && !req.Active {
				return usageError{fmt.Errorf("--pivot and --keep-overlay apply to an active commit (--active)")}
			}
			wait = wait || pivot || keep
			if err := checkWaitFlags(wait, verbose, async, pivot || keep); err != nil {
				return err
			}
			bps, err := bw.bytesPerSecond()
			if err != nil {
				return err
			}
			req.Vm, req.Disk, req.Bandwidth = args[0], args[1], bps
			if err := imageArgs(&req.Disk, &req.Top, &req.Base); err != nil {
				return err
			}
			if err := g.call(cmd, func(ctx context.Context, c *api.Client) error {
				_, err := c.BlockCommit(ctx, &req)
				return err
			}); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if !wait {
				fmt.Fprintln(out, "Block Commit started")
				return nil
			}
			action, done := vmlockpb.BlockJobAction_BLOCK_JOB_INFO, "Now in synchronized phase"
			switch {
			case pivot:
				action, done = vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT, "Successfully pivoted"
			case keep:
				action, done = vmlockpb.BlockJobAction_BLOCK_JOB_ABORT, "Commit complete, overlay image kept"
			}
			return waitAndFinish(cmd, g, req.Vm, req.Disk, verbose, async, action, done)
		},
	}
	f := c.Flags()
	f.StringVar(&req.Top, "top", "", "the top image to commit (path, relative to this directory, or node; default: the active layer)")
	f.StringVar(&req.Base, "base", "", "the image to commit into (path, relative to this directory, or node; default: the bottom of the chain)")
	f.BoolVar(&req.Shallow, "shallow", false, "commit into the top image's own backing image")
	f.BoolVar(&req.Active, "active", false, "commit the active layer (a two-phase job)")
	f.BoolVar(&req.Delete, "delete", false, "unlink the committed images once the job has succeeded")
	f.BoolVar(&wait, "wait", false, "wait until the job is ready (active) or done (intermediate)")
	f.BoolVar(&verbose, "verbose", false, "show progress while waiting")
	f.BoolVar(&pivot, "pivot", false, "once ready, pivot: the base becomes the active image (implies --wait)")
	f.BoolVar(&keep, "keep-overlay", false, "once ready, abort: the top stays the active image (implies --wait)")
	f.BoolVar(&async, "async", false, "with --pivot or --keep-overlay, return once QEMU accepted it")
	bw.add(c)
	return c
}

func checkWaitFlags(wait, verbose, async, finisher bool) error {
	if verbose && !wait {
		return usageError{fmt.Errorf("--verbose requires --wait")}
	}
	if async && !finisher {
		return usageError{fmt.Errorf("--async applies to a pivot or an abort")}
	}
	return nil
}

func newBlockCopyCmd(g *globals) *cobra.Command {
	var req vmlockpb.BlockCopyRequest
	var bw bandwidthFlags
	var wait, verbose, pivot, finish, async bool
	c := &cobra.Command{
		Use:   "blockcopy VM DISK DEST [--format F] [--reuse-external] [--wait] [--verbose] [--pivot|--finish] [--async]",
		Short: "copy a disk's whole chain into a new standalone image (virsh blockcopy); DEST is locked exclusively",
		Long: `blockcopy creates DEST as the VM's user (the uid and gid of its QEMU process;
qcow2 unless --format), or with --reuse-external copies into an existing
image; it locks DEST exclusively and mirrors the disk into it. The job runs
until it is ready, then waits for a pivot (--pivot, or vmlock blockjob
--pivot: DEST becomes the disk's active image and the old chain is released)
or an abort (--finish, or blockjob --abort: the disk keeps its chain; DEST, a
complete copy, is released).`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			if pivot && finish {
				return usageError{fmt.Errorf("--pivot and --finish exclude each other")}
			}
			wait = wait || pivot || finish
			if err := checkWaitFlags(wait, verbose, async, pivot || finish); err != nil {
				return err
			}
			dest, err := filepath.Abs(args[2])
			if err != nil {
				return err
			}
			bps, err := bw.bytesPerSecond()
			if err != nil {
				return err
			}
			req.Vm, req.Disk, req.Dest, req.Bandwidth = args[0], args[1], dest, bps
			if err := imageArgs(&req.Disk); err != nil {
				return err
			}
			if err := g.call(cmd, func(ctx context.Context, c *api.Client) error {
				_, err := c.BlockCopy(ctx, &req)
				return err
			}); err != nil {
				return err
			}
			if !wait {
				fmt.Fprintln(cmd.OutOrStdout(), "Block Copy started")
				return nil
			}
			action, done := vmlockpb.BlockJobAction_BLOCK_JOB_INFO, "Now in mirroring phase"
			switch {
			case pivot:
				action, done = vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT, "Successfully pivoted"
			case finish:
				action, done = vmlockpb.BlockJobAction_BLOCK_JOB_ABORT, "Successfully copied"
			}
			return waitAndFinish(cmd, g, req.Vm, req.Disk, verbose, async, action, done)
		},
	}
	f := c.Flags()
	f.StringVar(&req.Format, "format", "", "DEST's format (default qcow2)")
	f.BoolVar(&req.ReuseExternal, "reuse-external", false, "copy into the existing image DEST")
	f.BoolVar(&wait, "wait", false, "wait until the copy is ready")
	f.BoolVar(&verbose, "verbose", false, "show progress while waiting")
	f.BoolVar(&pivot, "pivot", false, "once ready, pivot to DEST (implies --wait)")
	f.BoolVar(&finish, "finish", false, "once ready, end the job keeping the disk's chain, DEST a complete copy (implies --wait)")
	f.BoolVar(&async, "async", false, "with --pivot or --finish, return once QEMU accepted it")
	bw.add(c)
	return c
}

// waitAndFinish waits until the job is ready or ends, then pivots or
// aborts it (action), and prints done, as virsh does.
func waitAndFinish(cmd *cobra.Command, g *globals, vm, disk string, verbose, async bool, action vmlockpb.BlockJobAction, done string) error {
	out := cmd.OutOrStdout()
	ctx := cmd.Context()
	dctx, cancel := context.WithTimeout(ctx, callTimeout)
	c, err := g.dial(dctx)
	cancel()
	if err != nil {
		return err
	}
	defer c.Close()
	waitMs := int64(callTimeout.Milliseconds() / 3)
	if verbose {
		waitMs = 500
	}
	var info *vmlockpb.BlockJobInfo
	for info == nil || !info.Ended && info.Phase != "ready" {
		rctx, cancel := context.WithTimeout(ctx, callTimeout)
		info, err = c.BlockJob(rctx, &vmlockpb.BlockJobRequest{Vm: vm, Disk: disk, Action: vmlockpb.BlockJobAction_BLOCK_JOB_WAIT, WaitMs: waitMs})
		cancel()
		if err != nil {
			return err
		}
		if verbose {
			fmt.Fprintf(out, "\r%s: [%3d %%]", jobLabel(info), pct(info))
		}
	}
	if verbose {
		fmt.Fprintln(out)
	}
	if info.Ended {
		if err := jobError(info); err != nil {
			return err
		}
		if info.Type == "commit" {
			done = "Commit complete"
		}
		fmt.Fprintln(out, done)
		return nil
	}
	if action != vmlockpb.BlockJobAction_BLOCK_JOB_INFO {
		rctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		if _, err := c.BlockJob(rctx, &vmlockpb.BlockJobRequest{Vm: vm, Disk: disk, Action: action, Async: async}); err != nil {
			return err
		}
		if async {
			done = "Requested; see vmlock blockjob " + vm + " " + disk + " for its end"
		}
	}
	fmt.Fprintln(out, done)
	return nil
}

// jobError is the error of a job that ended badly.
func jobError(info *vmlockpb.BlockJobInfo) error {
	switch info.Phase {
	case "failed":
		return lockmgr.Errorf(lockmgr.CodeInternal, "%s on disk %s failed: %s; its locks are back as before the job", jobLabel(info), info.Disk, info.Error)
	case "cancelled":
		return lockmgr.Errorf(lockmgr.CodeInternal, "%s on disk %s was cancelled", jobLabel(info), info.Disk)
	}
	return nil
}

func jobLabel(info *vmlockpb.BlockJobInfo) string {
	switch info.Type {
	case "active-commit":
		return "Active Block Commit"
	case "copy":
		return "Block Copy"
	case "backup":
		return "Block Backup"
	case "stream":
		return "Block Pull"
	}
	return "Block Commit"
}

func pct(info *vmlockpb.BlockJobInfo) int64 {
	if info.End <= 0 {
		return 0
	}
	return info.Cur * 100 / info.End
}

func newBlockJobCmd(g *globals) *cobra.Command {
	var info, abort, pivot, async bool
	c := &cobra.Command{
		Use:   "blockjob VM DISK [--info] [--abort] [--pivot] [--async]",
		Short: "show a disk's block job (default), or pivot or abort it (virsh blockjob)",
		Long: `blockjob --info shows the disk's job, its phase as QEMU reports it (running,
ready, ...) and its progress, or how its last job ended; a commit or mirror
started through another QMP monitor is shown and controlled too, and so are a
backup and a stream (block-stream, virsh's blockpull), which have no ready
phase: they end by themselves or are aborted. vmlockd does not dismiss such a
job: one started with auto-dismiss=false shows as concluded once it ends, and
keeps its locks, until its creator dismisses it (job-dismiss). --pivot
makes the base or the copy the active image of a ready job (refused before it
is ready, and on a disk nothing in QEMU uses, with no device, drive or export:
abort instead); --abort ends the job keeping the top (a ready active commit's
data is in the base all the same) and puts the locks back. Both wait until
the locks have moved unless --async.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if abort && pivot {
				return usageError{fmt.Errorf("--abort and --pivot exclude each other")}
			}
			if info && (abort || pivot) {
				return usageError{fmt.Errorf("--info excludes --abort and --pivot")}
			}
			if async && !abort && !pivot {
				return usageError{fmt.Errorf("--async applies to --abort or --pivot")}
			}
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			req := &vmlockpb.BlockJobRequest{Vm: args[0], Disk: args[1], Async: async}
			if err := imageArgs(&req.Disk); err != nil {
				return err
			}
			switch {
			case abort:
				req.Action = vmlockpb.BlockJobAction_BLOCK_JOB_ABORT
			case pivot:
				req.Action = vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT
			}
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				ji, err := c.BlockJob(ctx, req)
				if err != nil {
					return err
				}
				if req.Action != vmlockpb.BlockJobAction_BLOCK_JOB_INFO {
					return nil
				}
				if asJSON {
					return writeJSON(cmd.OutOrStdout(), ji)
				}
				fmt.Fprintln(cmd.OutOrStdout(), describeJob(ji))
				return nil
			})
		},
	}
	c.Flags().BoolVar(&info, "info", false, "show the job (the default)")
	c.Flags().BoolVar(&abort, "abort", false, "abort the job")
	c.Flags().BoolVar(&pivot, "pivot", false, "pivot a ready job")
	c.Flags().BoolVar(&async, "async", false, "return once QEMU accepted the abort or pivot")
	return c
}

// describeJob is blockjob --info's line, virsh's with the phase added.
func describeJob(ji *vmlockpb.BlockJobInfo) string {
	switch {
	case ji.Id == "":
		return "No current block job for " + ji.Disk
	case ji.Ended && ji.Error != "":
		return fmt.Sprintf("%s: %s: %s", jobLabel(ji), ji.Phase, ji.Error)
	case ji.Ended:
		return fmt.Sprintf("%s: %s", jobLabel(ji), ji.Phase)
	case ji.Phase == "ready":
		return fmt.Sprintf("%s: [%3d %%] ready: pivot (--pivot) or abort (--abort)", jobLabel(ji), pct(ji))
	}
	return fmt.Sprintf("%s: [%3d %%] %s", jobLabel(ji), pct(ji), ji.Phase)
}

func newDiskCmd(g *globals) *cobra.Command {
	d := &cobra.Command{Use: "disk", Short: "hotplug: attach or detach a disk of a QEMU VM, with its chain's locks"}
	var req vmlockpb.QEMUAttachDiskRequest
	attach := &cobra.Command{
		Use:   "attach VM PATH [--node NAME] [--format F] [--readonly]",
		Short: "lock PATH's backing chain, then add it to QEMU (blockdev-add)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := filepath.Abs(args[1])
			if err != nil {
				return err
			}
			req.Vm, req.Path = args[0], p
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				disk, err := c.AttachDisk(ctx, &req)
				if err == nil {
					fmt.Fprintf(cmd.OutOrStdout(), "attached %s as %s\n", p, disk.Name)
				}
				return err
			})
		},
	}
	attach.Flags().StringVar(&req.Node, "node", "", "the node name to give it (default: generated)")
	attach.Flags().StringVar(&req.Format, "format", "", "the image format (default: probed)")
	attach.Flags().BoolVar(&req.ReadOnly, "readonly", false, "attach read-only (recorded, not locked)")
	detach := &cobra.Command{
		Use:   "detach VM DISK",
		Short: "remove a disk from QEMU (blockdev-del), then release its chain's locks",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, err := imageArg(args[1])
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				disk, err := c.DetachDisk(ctx, args[0], name)
				if err == nil {
					fmt.Fprintf(cmd.OutOrStdout(), "detached %s\n", disk.Name)
				}
				return err
			})
		},
	}
	d.AddCommand(attach, detach)
	return d
}

func newVMsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "vms [VM]",
		Short: "the QEMU VMs vmlockd supervises: disks, backing chains, lock modes, block jobs",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				vms, err := c.QEMUVMs(ctx, strings.Join(args, ""))
				if err != nil {
					return err
				}
				if asJSON {
					return writeJSON(cmd.OutOrStdout(), vms)
				}
				return printVMs(cmd.OutOrStdout(), vms)
			})
		},
	}
}

func printVMs(w io.Writer, vms []*vmlockpb.QEMUVM) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tPID\tDISK\tIMAGE\tMODE\tJOB")
	for _, vm := range vms {
		name := cmp.Or(vm.Name, vm.Uuid)
		if vm.Error != "" {
			fmt.Fprintf(tw, "%s\t%d\t-\t-\t-\t%s\n", name, vm.Pid, vm.Error)
		}
		for _, d := range vm.Disks {
			job := "-"
			if d.Job != nil {
				job = describeJob(d.Job)
			}
			for i, img := range d.Images {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", name, vm.Pid, d.Name, cmp.Or(img.Path, img.Node), img.Mode, job)
				if i == 0 {
					name, job = "", ""
				}
				if img.DataFile != "" {
					// Locked with its image, in its mode.
					fmt.Fprintf(tw, "\t%d\t%s\t  data file %s\t%s\t\n", vm.Pid, d.Name, img.DataFile, img.Mode)
				}
			}
		}
	}
	return tw.Flush()
}

// blockJobsOf lists the block jobs of every supervised VM, for the lock
// monitor: a job's phase (ready!) is shown next to the locks it moves. The
// list is an addendum: if it cannot be had (a vmlockd without QEMU
// supervision), the monitor says so on stderr and shows the locks anyway.
func blockJobsOf(ctx context.Context, c *api.Client) []*vmlockpb.BlockJobInfo {
	vms, err := c.QEMUVMs(ctx, "")
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmlock: block jobs not shown:", err)
		return nil
	}
	var jobs []*vmlockpb.BlockJobInfo
	for _, vm := range vms {
		for _, d := range vm.Disks {
			if d.Job != nil && !d.Job.Ended {
				jobs = append(jobs, d.Job)
			}
		}
	}
	return jobs
}

// printBlockJobs prints the lock monitor's block job section, if any job
// runs.
func printBlockJobs(w io.Writer, jobs []*vmlockpb.BlockJobInfo) error {
	if len(jobs) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nVM\tDISK\tBLOCK JOB\tPHASE\tPROGRESS\tWRITES")
	for _, j := range jobs {
		writes := cmp.Or(j.Base, j.Target)
		if j.Type == "stream" { // pulls its backing images into its top
			writes = j.Top
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d%%\t%s\n", j.Vm, j.Disk, j.Type, j.Phase, pct(j), writes)
	}
	return tw.Flush()
}
