package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/qemu"
	"github.com/vmlock/vmlock/qmp"
)

// The block job benchmark: a 64 MiB active commit, run to ready and
// pivoted, through vmlock (QEMU under `vmlock run --qemu`, the job driven
// through vmlockd's API, locks moved as the job goes) and through raw QMP
// (the same QEMU, the same chain, the commands sent directly), alternated
// in one run. Each iteration starts a fresh QEMU on a fresh copy of the
// chain; only the job is timed, from the commit command to the end of the
// pivot.

func newBenchBlockjobCmd() *cobra.Command {
	var n, warm int
	c := &cobra.Command{
		Use:         "blockjob --json",
		Annotations: map[string]string{annotationParallel: ""},
		Short:       "64 MiB active commit to ready and pivot: through vmlock vs raw QMP",
		Args:        cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return benchBlockjob(cmd.Context(), n, warm)
		},
	}
	c.Flags().Bool("json", true, "print the JSON report (always on)")
	c.Flags().IntVar(&n, "iterations", 15, "timed commits on each path")
	c.Flags().IntVar(&warm, "warmup", 2, "untimed commits on each path first")
	return c
}

// commitMiB is the amount of data the commit moves.
const commitMiB = 64

var benchQEMUArgs = []string{"-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"}

func benchBlockjob(ctx context.Context, n, warm int) error {
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("bench blockjob needs %s: %w", tool, err)
		}
	}
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
	tmpl, err := makeCommitTemplate(e.dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "bench blockjob: %d+%d alternated %d MiB active commits through vmlock and through raw QMP\n", warm, n, commitMiB)
	var viaVmlock, viaQMP, readyVmlock, readyQMP bench.Samples
	for i := range warm + n {
		total, ready, err := commitThroughVmlock(ctx, e, c, tmpl, i)
		if err != nil {
			return fmt.Errorf("through vmlock: %w", err)
		}
		rtotal, rready, err := commitThroughQMP(ctx, e, tmpl, i)
		if err != nil {
			return fmt.Errorf("through raw QMP: %w", err)
		}
		if i >= warm {
			viaVmlock, readyVmlock = append(viaVmlock, total), append(readyVmlock, ready)
			viaQMP, readyQMP = append(viaQMP, rtotal), append(readyQMP, rready)
		}
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	r := bench.NewReport("blockjob")
	v50, q50 := viaVmlock.Percentile(50), viaQMP.Percentile(50)
	r.Metric("commit64_vmlock_p50_ms", ms(v50))
	r.Metric("commit64_raw_qmp_p50_ms", ms(q50))
	r.Metric("commit64_vmlock_ready_p50_ms", ms(readyVmlock.Percentile(50)))
	r.Metric("commit64_raw_qmp_ready_p50_ms", ms(readyQMP.Percentile(50)))
	r.Metric("commit64_vmlock_max_ms", ms(viaVmlock.Percentile(100)))
	r.Metric("commit64_raw_qmp_max_ms", ms(viaQMP.Percentile(100)))
	r.Goal("commit64_overhead_ratio", ms(v50)/ms(q50), 1.2, bench.Lower)
	return r.WriteStdout()
}

// makeCommitTemplate makes base.qcow2 (empty) and top.qcow2 (commitMiB of
// data), top naming its backing file relatively so that a copy of the
// directory is a chain of its own.
func makeCommitTemplate(dir string) (string, error) {
	tmpl := filepath.Join(dir, "template")
	if err := os.Mkdir(tmpl, 0o700); err != nil {
		return "", err
	}
	size := fmt.Sprintf("%dM", commitMiB)
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(tmpl, "base.qcow2"), size},
		{"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", filepath.Join(tmpl, "top.qcow2")},
		{"qemu-io", "-c", "write -P 0xab 0 " + size, filepath.Join(tmpl, "top.qcow2")},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return "", fmt.Errorf("%v: %w: %s", args, err, out)
		}
	}
	return tmpl, nil
}

// freshChain copies the template into a new directory and returns the top.
func freshChain(e *benchEnv, tmpl, name string) (string, error) {
	dir := filepath.Join(e.dir, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	for _, f := range []string{"base.qcow2", "top.qcow2"} {
		if err := copyFile(filepath.Join(tmpl, f), filepath.Join(dir, f)); err != nil {
			return "", err
		}
	}
	return filepath.Join(dir, "top.qcow2"), nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// commitThroughVmlock starts QEMU under `vmlock run --qemu` and times an
// active commit to ready and its pivot through the API.
func commitThroughVmlock(ctx context.Context, e *benchEnv, c *api.Client, tmpl string, i int) (total, ready time.Duration, err error) {
	name := fmt.Sprintf("bench-v%d", i)
	top, err := freshChain(e, tmpl, name)
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(filepath.Dir(top))
	exe, err := os.Executable()
	if err != nil {
		return 0, 0, err
	}
	args := append([]string{"--socket", e.socket, "run", "--qemu", "--name", name, "--", "qemu-system-x86_64"}, benchQEMUArgs...)
	args = append(args, "-drive", "if=none,id=drive0,format=qcow2,file="+top)
	vm := exec.Command(exe, args...)
	vm.Stderr = os.Stderr
	if err := vm.Start(); err != nil {
		return 0, 0, err
	}
	defer func() {
		vm.Process.Signal(syscall.SIGTERM) // QEMU exits cleanly on SIGTERM
		vm.Wait()
	}()
	// Untimed: until vmlockd supervises the VM.
	for {
		vms, err := c.QEMUVMs(ctx, name)
		if err == nil && len(vms) == 1 && vms[0].Connected && len(vms[0].Disks) == 1 {
			break
		}
		if vm.ProcessState != nil || ctx.Err() != nil {
			return 0, 0, fmt.Errorf("QEMU under vmlock did not come up: %v", err)
		}
		time.Sleep(2 * time.Millisecond)
	}

	t0 := time.Now()
	if _, err := c.BlockCommit(ctx, &vmlockpb.BlockCommitRequest{Vm: name, Disk: "drive0", Active: true}); err != nil {
		return 0, 0, err
	}
	for {
		info, err := c.BlockJob(ctx, &vmlockpb.BlockJobRequest{Vm: name, Disk: "drive0", Action: vmlockpb.BlockJobAction_BLOCK_JOB_WAIT, WaitMs: 5000})
		if err != nil {
			return 0, 0, err
		}
		if info.Phase == "ready" {
			break
		}
		if info.Ended {
			return 0, 0, fmt.Errorf("the commit ended before it was ready: %s %s", info.Phase, info.Error)
		}
	}
	ready = time.Since(t0)
	info, err := c.BlockJob(ctx, &vmlockpb.BlockJobRequest{Vm: name, Disk: "drive0", Action: vmlockpb.BlockJobAction_BLOCK_JOB_PIVOT})
	if err != nil {
		return 0, 0, err
	}
	total = time.Since(t0)
	if info.Phase != "pivoted" {
		return 0, 0, fmt.Errorf("after the pivot the job is %s", info.Phase)
	}
	return total, ready, nil
}

// commitThroughQMP does the same with QEMU and QMP alone.
func commitThroughQMP(ctx context.Context, e *benchEnv, tmpl string, i int) (total, ready time.Duration, err error) {
	top, err := freshChain(e, tmpl, fmt.Sprintf("bench-q%d", i))
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(filepath.Dir(top))
	args := append(append([]string{}, benchQEMUArgs...), "-drive", "if=none,id=drive0,format=qcow2,file="+top)
	qc, cmd, err := qmp.StartQEMU(ctx, "qemu-system-x86_64", args)
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		qc.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()

	t0 := time.Now()
	job, err := qemu.StartCommit(ctx, qc, qemu.CommitOptions{JobID: "commit0", Device: "drive0"})
	if err != nil {
		return 0, 0, err
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, qemu.JobReady); err != nil {
		return 0, 0, err
	}
	ready = time.Since(t0)
	if err := job.Complete(ctx); err != nil {
		return 0, 0, err
	}
	res, err := job.Wait(ctx)
	if err != nil {
		return 0, 0, err
	}
	total = time.Since(t0)
	if !res.Pivoted {
		return 0, 0, errors.New("the raw commit did not pivot")
	}
	return total, ready, nil
}
