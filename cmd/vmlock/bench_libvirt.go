package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/virtlockd"
)

// benchLibvirtOpts are the flags of `vmlock bench libvirt`.
type benchLibvirtOpts struct {
	iterations int
	warmup     int
	duration   time.Duration
	virtlockd  string
	cpuProfile string
}

func newBenchLibvirtCmd() *cobra.Command {
	o := &benchLibvirtOpts{}
	c := &cobra.Command{
		Use:   "libvirt --json",
		Short: "vmlockd's libvirt endpoint against real virtlockd: REGISTER+ACQUIRE+RELEASE cycles, 1 and 8 connections",
		Long: `Drives, in one run and with one Go client of virtlockd's protocol, Debian's virtlockd
(run as root in a private mount namespace, so that its socket /run/libvirt/virtlockd-sock is a
directory of the benchmark's own) and vmlockd's libvirt endpoint (vmlockd's daemon code with the
lockspace driver and its lock-holder, in a child process). A cycle is REGISTER + ACQUIRE_RESOURCE
(an exclusive direct lease on an image file, as libvirt's default) + RELEASE_RESOURCE on one
connection; every connection has its own owner (a sleeping child process) and image.

Measured: the p50/p99 latency of a cycle with 1 connection, the two daemons interleaved cycle by
cycle; cycles per second with 1 and with 8 connections, in alternating rounds; p99 with 8.
Goals: throughput_vs_virtlockd_1conn (≥ 1.5), throughput_vs_virtlockd_8conn (≥ 1.5),
p99_vs_virtlockd (≤ 1.0; the 1-connection p99s). Progress goes to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return benchLibvirt(cmd.Context(), o, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.Bool("json", true, "print the JSON report (always on)")
	f.IntVar(&o.iterations, "iterations", 5000, "timed cycles of each daemon in the latency measurement")
	f.IntVar(&o.warmup, "warmup", 500, "untimed cycles of each daemon first")
	f.DurationVar(&o.duration, "duration", 2*time.Second, "how long each daemon runs in each throughput measurement (in 4 alternating rounds)")
	f.StringVar(&o.virtlockd, "virtlockd", "", "the virtlockd binary (default: virtlockd in $PATH or /usr/sbin)")
	f.StringVar(&o.cpuProfile, "cpuprofile", "", "write the CPU profile of vmlockd's side to this file (go tool pprof)")
	return c
}

// lvBenchEnv is the scratch directory, both daemons and the owner
// processes of one run.
type lvBenchEnv struct {
	dir        string
	vl         *exec.Cmd // virtlockd (in its own mount namespace)
	vlSock     string
	vm         *exec.Cmd // vmlockd's daemon code
	vmSock     string
	vmState    string
	owners     []*exec.Cmd
	cpuProfile string
	cpu        [2]float64 // CPU µs per cycle of the last lvRate: virtlockd, vmlockd (with its lock-holder)
	clientCPU  float64    // the benchmark's own CPU µs per cycle in the last lvRate's virtlockd rounds
	processes  sync.WaitGroup
}

func (e *lvBenchEnv) close() {
	for _, c := range []*exec.Cmd{e.vm, e.vl} {
		if c != nil && c.Process != nil {
			c.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, o := range e.owners {
		o.Process.Kill()
	}
	e.processes.Wait()
	if e.vmState != "" {
		killHolder(e.vmState)
	}
	os.RemoveAll(e.dir)
}

// vmPIDs returns the processes of vmlockd's side: the daemon and its
// lock-holder.
func (e *lvBenchEnv) vmPIDs() []int {
	return append([]int{e.vm.Process.Pid}, holderPIDs(e.vmState)...)
}

// spawn starts cmd and reaps it in the background.
func (e *lvBenchEnv) spawn(cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	e.processes.Add(1)
	go func() { defer e.processes.Done(); cmd.Wait() }()
	return nil
}

// startVirtlockd runs Debian's virtlockd in a private mount namespace in
// which /run/libvirt is the benchmark's directory: a root virtlockd always
// serves /run/libvirt/virtlockd-sock, and the host's must stay untouched.
func (e *lvBenchEnv) startVirtlockd(ctx context.Context, bin string) error {
	if os.Geteuid() != 0 {
		return errors.New("bench libvirt: runs as root (virtlockd serves /run/libvirt only as root; it runs in a private mount namespace)")
	}
	run := filepath.Join(e.dir, "virtlockd-run")
	if err := os.MkdirAll(run, 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll("/run/libvirt", 0o755); err != nil { // an empty mount point, if missing
		return err
	}
	conf := filepath.Join(e.dir, "virtlockd.conf")
	logf := filepath.Join(e.dir, "virtlockd.log")
	if err := os.WriteFile(conf, fmt.Appendf(nil, "log_level = 3\nlog_outputs = \"3:file:%s\"\n", logf), 0o644); err != nil {
		return err
	}
	script := fmt.Sprintf("set -e\nmount --bind %q /run/libvirt\nexec %q -f %q -p %q\n", run, bin, conf, filepath.Join(e.dir, "virtlockd.pid"))
	e.vl = exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", script)
	e.vl.Stderr = os.Stderr
	if err := e.spawn(e.vl); err != nil {
		return fmt.Errorf("bench libvirt: starting virtlockd (unshare from util-linux): %w", err)
	}
	e.vlSock = filepath.Join(run, "virtlockd-sock")
	return waitDial(ctx, e.vlSock, "virtlockd")
}

// startVmlockd runs vmlockd's daemon code with the libvirt endpoint.
func (e *lvBenchEnv) startVmlockd(ctx context.Context) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	e.vmState = filepath.Join(e.dir, "state")
	e.vmSock = filepath.Join(e.dir, "virtlockd-sock")
	e.vm = exec.Command(exe, "bench", "_daemon", "--socket", filepath.Join(e.dir, "vmlockd.sock"),
		"--libvirt-socket", e.vmSock, "--state-dir", e.vmState, "--cpuprofile", e.cpuProfile)
	e.vm.Stderr = os.Stderr
	if err := e.spawn(e.vm); err != nil {
		return err
	}
	return waitDial(ctx, e.vmSock, "vmlockd")
}

// waitDial waits until a REGISTER-less call on sock is answered.
func waitDial(ctx context.Context, sock, what string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		c, err := virtlockd.Dial(ctx, sock)
		if err == nil {
			err = c.CreateLockspace(ctx, "") // the default lockspace: answered, changes nothing
			c.Close()
			var re *virtlockd.RemoteError
			if err == nil || errors.As(err, &re) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("bench libvirt: %s does not answer on %s: %w (last: %v)", what, sock, ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// lvConn is one benchmark connection: its owner and image.
type lvConn struct {
	c     *virtlockd.Client
	owner virtlockd.Owner
	image string
	// calls, if not nil, collects each call's latency: REGISTER,
	// ACQUIRE_RESOURCE, RELEASE_RESOURCE.
	calls []bench.Samples
}

// newConns opens n connections to sock, each with its own owner process
// and image file (prefix distinguishes the two daemons' images: their
// locks would conflict).
func (e *lvBenchEnv) newConns(ctx context.Context, sock, prefix string, n int) ([]*lvConn, error) {
	var out []*lvConn
	for i := range n {
		o := exec.Command("sleep", "3600")
		if err := e.spawn(o); err != nil {
			return nil, err
		}
		e.owners = append(e.owners, o)
		img := filepath.Join(e.dir, fmt.Sprintf("%s-%d.img", prefix, i))
		if err := os.WriteFile(img, nil, 0o600); err != nil {
			return nil, err
		}
		c, err := virtlockd.Dial(ctx, sock)
		if err != nil {
			return nil, err
		}
		lc := &lvConn{c: c, image: img, owner: virtlockd.Owner{Name: fmt.Sprintf("bench-%s-%d", prefix, i), ID: uint32(i + 1), PID: uint32(o.Process.Pid)}}
		copy(lc.owner.UUID[:], fmt.Sprintf("%-8s%08d", prefix, i))
		out = append(out, lc)
	}
	return out, nil
}

// cycle is what libvirt does to start a domain's vCPUs with one disk, and
// then to pause it: REGISTER, ACQUIRE_RESOURCE, RELEASE_RESOURCE.
func (l *lvConn) cycle(ctx context.Context) error {
	t0 := time.Now()
	if err := l.c.Register(ctx, l.owner, 0); err != nil {
		return err
	}
	t1 := time.Now()
	if err := l.c.AcquireResource(ctx, "", l.image, 0); err != nil {
		return err
	}
	t2 := time.Now()
	if err := l.c.ReleaseResource(ctx, "", l.image, 0); err != nil {
		return err
	}
	if l.calls != nil {
		l.calls[0] = append(l.calls[0], t1.Sub(t0))
		l.calls[1] = append(l.calls[1], t2.Sub(t1))
		l.calls[2] = append(l.calls[2], time.Since(t2))
	}
	return nil
}

func closeConns(cs []*lvConn) {
	for _, c := range cs {
		c.c.Close()
	}
}

// lvThroughput runs every connection's cycle in a loop for d and returns the
// cycles done and every cycle's latency.
func lvThroughput(ctx context.Context, cs []*lvConn, d time.Duration) (int, bench.Samples, error) {
	var mu sync.Mutex
	var all bench.Samples
	var firstErr error
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	for _, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := make(bench.Samples, 0, 1024)
			var err error
			for time.Now().Before(end) {
				t := time.Now()
				if err = c.cycle(ctx); err != nil {
					break
				}
				s = append(s, time.Since(t))
			}
			mu.Lock()
			all = append(all, s...)
			if err != nil && firstErr == nil {
				firstErr = err
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	return len(all), all, firstErr
}

// cpuTicks returns the CPU time (user + system) the processes pids used so
// far; a pid that is gone counts nothing.
func cpuTicks(pids ...int) time.Duration {
	var total time.Duration
	for _, pid := range pids {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command name (which may hold spaces): state is
		// field 3, utime 14, stime 15, in clock ticks (USER_HZ, 100).
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		total += time.Duration(u+st) * 10 * time.Millisecond
	}
	return total
}

// lvRate measures both daemons' throughput with their connections, in
// alternating rounds (virtlockd first, then vmlockd first, ...), and returns
// cycles per second and the cycles' latencies of each.
func lvRate(ctx context.Context, e *lvBenchEnv, vl, vm []*lvConn, d time.Duration) (vlRate, vmRate float64, vlS, vmS bench.Samples, err error) {
	const rounds = 4
	var vlN, vmN int
	var vlT, vmT, vlCPU, vmCPU, ownCPU time.Duration
	for r := range rounds {
		for i := range 2 {
			isVL := (r+i)%2 == 0
			cs := vm
			if isVL {
				cs = vl
			}
			pids := e.vmPIDs()
			if isVL {
				pids = []int{e.vl.Process.Pid}
			}
			cpu0, own0 := cpuTicks(pids...), cpuTicks(os.Getpid())
			t0 := time.Now()
			n, s, err := lvThroughput(ctx, cs, d/rounds)
			if err != nil {
				return 0, 0, nil, nil, err
			}
			el := time.Since(t0)
			cpu := cpuTicks(pids...) - cpu0
			if isVL {
				ownCPU += cpuTicks(os.Getpid()) - own0
				vlN, vlT, vlCPU, vlS = vlN+n, vlT+el, vlCPU+cpu, append(vlS, s...)
			} else {
				vmN, vmT, vmCPU, vmS = vmN+n, vmT+el, vmCPU+cpu, append(vmS, s...)
			}
		}
	}
	e.cpu = [2]float64{bench.Micros(vlCPU) / float64(max(vlN, 1)), bench.Micros(vmCPU) / float64(max(vmN, 1))}
	e.clientCPU = bench.Micros(ownCPU) / float64(max(vlN, 1))
	return float64(vlN) / vlT.Seconds(), float64(vmN) / vmT.Seconds(), vlS, vmS, nil
}

func benchLibvirt(ctx context.Context, o *benchLibvirtOpts, stdout io.Writer) error {
	if o.iterations < 1 || o.warmup < 0 || o.duration <= 0 {
		return errors.New("bench libvirt: --iterations and --duration must be positive")
	}
	bin := o.virtlockd
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("virtlockd"); err != nil {
			bin = "/usr/sbin/virtlockd"
		}
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("bench libvirt: virtlockd not found (Debian package libvirt-daemon): %w", err)
	}
	// Bounds the whole run: a daemon that stops answering fails it.
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute+4*o.duration)
	defer cancel()
	dir, err := os.MkdirTemp("", "vmlock-bench-libvirt-")
	if err != nil {
		return err
	}
	e := &lvBenchEnv{dir: dir, cpuProfile: o.cpuProfile}
	defer e.close()
	if err := e.startVirtlockd(ctx, bin); err != nil {
		return err
	}
	if err := e.startVmlockd(ctx); err != nil {
		return err
	}

	vl, err := e.newConns(ctx, e.vlSock, "vl", 8)
	if err != nil {
		return err
	}
	defer closeConns(vl)
	vm, err := e.newConns(ctx, e.vmSock, "vm", 8)
	if err != nil {
		return err
	}
	defer closeConns(vm)

	var failed error
	one := func(c *lvConn) func() {
		return func() {
			if err := c.cycle(ctx); err != nil && failed == nil {
				failed = err
			}
		}
	}
	// The floor of any daemon: a process-to-process unix round trip.
	echo, err := startEcho(dir)
	if err != nil {
		return err
	}
	defer echo.close()
	vl[0].calls, vm[0].calls = make([]bench.Samples, 3), make([]bench.Samples, 3)
	fmt.Fprintf(os.Stderr, "bench libvirt: %d interleaved cycles on 1 connection to virtlockd and to vmlockd, and unix round trips\n", o.iterations)
	s := bench.Interleave(o.warmup, o.iterations, one(vl[0]), one(vm[0]), echo.roundTrip)
	if failed == nil {
		failed = echo.err
	}
	if failed != nil {
		return fmt.Errorf("bench libvirt: %w", failed)
	}
	r := bench.NewReport("libvirt")
	for _, c := range []struct {
		name string
		conn *lvConn
	}{{"virtlockd", vl[0]}, {"vmlockd", vm[0]}} {
		for i, call := range []string{"register", "acquire", "release"} {
			r.Metric(c.name+"_"+call+"_p50_us", bench.Micros(c.conn.calls[i][o.warmup:].Percentile(50)))
		}
		c.conn.calls = nil
	}
	vl50, vl99 := bench.Micros(s[0].Percentile(50)), bench.Micros(s[0].Percentile(99))
	vm50, vm99 := bench.Micros(s[1].Percentile(50)), bench.Micros(s[1].Percentile(99))
	r.Metric("virtlockd_cycle_p50_us", vl50)
	r.Metric("virtlockd_cycle_p99_us", vl99)
	r.Metric("vmlockd_cycle_p50_us", vm50)
	r.Metric("vmlockd_cycle_p99_us", vm99)
	// A cycle is 3 calls. What a daemon answering each call in exactly one
	// round trip would reach against virtlockd on one connection:
	rtt50 := bench.Micros(s[2].Percentile(50))
	r.Metric("unix_rtt_p50_us", rtt50)
	r.Metric("virtlockd_call_vs_unix_rtt", vl50/3/rtt50)
	r.Metric("vmlockd_call_vs_unix_rtt", vm50/3/rtt50)
	r.Metric("throughput_1conn_bound_vs_virtlockd", vl50/(3*rtt50))

	fmt.Fprintf(os.Stderr, "bench libvirt: throughput, 1 connection, %v each\n", o.duration)
	vlR1, vmR1, _, _, err := lvRate(ctx, e, vl[:1], vm[:1], o.duration)
	if err != nil {
		return fmt.Errorf("bench libvirt: %w", err)
	}
	r.Metric("virtlockd_cycles_per_s_1conn", vlR1)
	r.Metric("vmlockd_cycles_per_s_1conn", vmR1)
	r.Metric("virtlockd_cpu_per_cycle_1conn_us", e.cpu[0])
	r.Metric("vmlockd_cpu_per_cycle_1conn_us", e.cpu[1])

	fmt.Fprintf(os.Stderr, "bench libvirt: throughput, 8 connections, %v each\n", o.duration)
	vlR8, vmR8, vlS8, vmS8, err := lvRate(ctx, e, vl, vm, o.duration)
	if err != nil {
		return fmt.Errorf("bench libvirt: %w", err)
	}
	r.Metric("virtlockd_cycles_per_s_8conn", vlR8)
	r.Metric("vmlockd_cycles_per_s_8conn", vmR8)
	r.Metric("virtlockd_cpu_per_cycle_8conn_us", e.cpu[0])
	r.Metric("vmlockd_cpu_per_cycle_8conn_us", e.cpu[1])
	// The clients' own CPU bounds any daemon's rate on this machine: with
	// every CPU busy, a daemon that cost nothing would reach this ratio.
	r.Metric("client_cpu_per_cycle_8conn_us", e.clientCPU)
	if e.clientCPU > 0 { // CPU time comes in 10 ms ticks: a very short run may see none
		r.Metric("throughput_8conn_bound_vs_virtlockd", float64(runtime.NumCPU())*1e6/e.clientCPU/vlR8)
	}
	r.Metric("virtlockd_cycle_p99_8conn_us", bench.Micros(vlS8.Percentile(99)))
	r.Metric("vmlockd_cycle_p99_8conn_us", bench.Micros(vmS8.Percentile(99)))

	r.Goal("throughput_vs_virtlockd_1conn", vmR1/vlR1, 1.5, bench.Higher)
	r.Goal("throughput_vs_virtlockd_8conn", vmR8/vlR8, 1.5, bench.Higher)
	r.Goal("p99_vs_virtlockd", vm99/vl99, 1.0, bench.Lower)
	return r.Write(stdout)
}
