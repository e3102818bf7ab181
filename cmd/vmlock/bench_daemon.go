package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/daemon"
	"github.com/vmlock/vmlock/lockholder"
	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/lockspace"
)

// The daemon benchmarks run vmlockd's code in a child process of their own
// (the hidden "bench _daemon" command), so that `go run ./cmd/vmlock bench
// daemon` needs nothing built beforehand, and the API is measured across a
// real process boundary like its floor.

func newBenchDaemonCmd() *cobra.Command {
	var n int
	var dur time.Duration
	var profile string
	c := &cobra.Command{
		Use:   "daemon --json",
		Short: "API acquire+release latency vs a unix-socket round trip, and throughput with 8 clients",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return benchDaemon(cmd.Context(), n, dur, profile)
		},
	}
	c.Flags().Bool("json", true, "print the JSON report (always on)")
	c.Flags().IntVar(&n, "iterations", 5000, "timed iterations of each latency measurement")
	c.Flags().DurationVar(&dur, "duration", 3*time.Second, "how long the throughput run lasts")
	c.Flags().StringVar(&profile, "cpuprofile", "", "write the CPU profile of the daemon's side to this file (go tool pprof)")
	return c
}

// benchEnv is a scratch directory with a daemon child running in it.
type benchEnv struct {
	dir, socket, state string
	cpuProfile         string // the daemon child's, if set
	cmd                *exec.Cmd
	owners             []*exec.Cmd
}

func newBenchEnv() (*benchEnv, error) {
	dir, err := os.MkdirTemp("", "vmlock-bench-")
	if err != nil {
		return nil, err
	}
	return &benchEnv{dir: dir, socket: filepath.Join(dir, "d.sock"), state: filepath.Join(dir, "state")}, nil
}

// start starts (or restarts) the daemon child and waits until it serves.
func (e *benchEnv) start(ctx context.Context) (time.Duration, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	e.cmd = exec.Command(exe, "bench", "_daemon", "--socket", e.socket, "--state-dir", e.state, "--cpuprofile", e.cpuProfile)
	e.cmd.Stderr = os.Stderr
	if err := e.cmd.Start(); err != nil {
		return 0, err
	}
	for time.Since(t0) < 30*time.Second {
		c, err := api.Dial(ctx, e.socket)
		if err == nil {
			_, err = c.Status(ctx)
			c.Close()
			if err == nil {
				return time.Since(t0), nil
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return 0, errors.New("the benchmark daemon did not start")
}

func (e *benchEnv) kill9() {
	e.cmd.Process.Kill()
	e.cmd.Wait()
}

func (e *benchEnv) close() {
	if e.cmd != nil && e.cmd.ProcessState == nil {
		e.cmd.Process.Signal(syscall.SIGTERM)
		e.cmd.Wait()
	}
	for _, o := range e.owners {
		o.Process.Kill()
		o.Wait()
	}
	// The lock-holder exits once its controller is gone and it holds
	// nothing; owners are dead, but the daemon is too, so end it here.
	killHolder(e.state)
	os.RemoveAll(e.dir)
}

func killHolder(stateDir string) {
	for _, pid := range holderPIDs(stateDir) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

// holderPIDs returns the lock-holder processes of the vmlockd whose state
// directory is stateDir.
func holderPIDs(stateDir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + ent.Name() + "/cmdline")
		if strings.Contains(string(b), "_holder") && strings.Contains(string(b), stateDir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// owner starts a process that owns locks for the benchmark.
func (e *benchEnv) owner() (int, error) {
	c := exec.Command("sleep", "3600")
	if err := c.Start(); err != nil {
		return 0, err
	}
	e.owners = append(e.owners, c)
	return c.Process.Pid, nil
}

func (e *benchEnv) image(name string) (string, error) {
	p := filepath.Join(e.dir, name)
	return p, os.WriteFile(p, nil, 0o600)
}

// holderPID finds the lock-holder of the environment.
func (e *benchEnv) holderPID() int {
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile("/proc/" + ent.Name() + "/cmdline")
		if strings.Contains(string(b), "_holder") && strings.Contains(string(b), e.state) {
			return pid
		}
	}
	return 0
}

// rssMiB reads a process's resident set size.
func rssMiB(pid int) float64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

func benchDaemon(ctx context.Context, n int, dur time.Duration, profile string) error {
	e, err := newBenchEnv()
	if err != nil {
		return err
	}
	e.cpuProfile = profile
	defer e.close()
	if _, err := e.start(ctx); err != nil {
		return err
	}
	echo, err := startEcho(e.dir)
	if err != nil {
		return err
	}
	defer echo.close()
	c, err := api.Dial(ctx, e.socket)
	if err != nil {
		return err
	}
	defer c.Close()
	pid, err := e.owner()
	if err != nil {
		return err
	}
	disk, err := e.image("one.img")
	if err != nil {
		return err
	}
	o := lockmgr.Object{UUID: "b0000000-0000-4000-8000-000000000001", Name: "bench", PID: pid}
	rs := []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}
	var failed error
	pair := func() {
		if _, err := c.Acquire(ctx, o, rs, ""); err != nil && failed == nil {
			failed = err
		}
		if _, err := c.Release(ctx, o.UUID); err != nil && failed == nil {
			failed = err
		}
	}
	status := func() {
		if _, err := c.Status(ctx); err != nil && failed == nil {
			failed = err
		}
	}
	fmt.Fprintf(os.Stderr, "bench daemon: %d interleaved iterations of acquire+release, a unix round trip, and an empty API call\n", n)
	s := bench.Interleave(n/10, n, pair, echo.roundTrip, status)
	if failed != nil {
		return failed
	}
	if echo.err != nil {
		return echo.err
	}
	r := bench.NewReport("daemon")
	ar50, ar99 := bench.Micros(s[0].Percentile(50)), bench.Micros(s[0].Percentile(99))
	rtt50, rtt99 := bench.Micros(s[1].Percentile(50)), bench.Micros(s[1].Percentile(99))
	r.Metric("acquire_release_p50_us", ar50)
	r.Metric("acquire_release_p99_us", ar99)
	r.Metric("unix_rtt_p50_us", rtt50)
	r.Metric("unix_rtt_p99_us", rtt99)
	// The cost of the RPC framework alone: an API call that does nothing.
	r.Metric("empty_api_call_p50_us", bench.Micros(s[2].Percentile(50)))
	r.Metric("empty_api_call_vs_unix_rtt", bench.Micros(s[2].Percentile(50))/rtt50)

	fmt.Fprintf(os.Stderr, "bench daemon: 8 clients for %v\n", dur)
	pps, err := throughput(ctx, e, 8, dur, false)
	if err != nil {
		return err
	}
	r.Metric("pairs_per_s_8_clients", pps)
	// The same with two empty calls instead of acquire+release: the most
	// the gRPC transport allows on this machine.
	ceiling, err := throughput(ctx, e, 8, dur, true)
	if err != nil {
		return err
	}
	r.Metric("empty_call_pairs_per_s_8_clients", ceiling)
	r.Goal("api_acquire_release_vs_unix_rtt", ar50/rtt50, 4, bench.Lower)
	r.Goal("api_pairs_per_s_8_clients", pps, 20000, bench.Higher)
	return r.WriteStdout()
}

// throughput runs clients connections, each acquiring and releasing its
// own disk for its own owner in a loop (or, with empty, making two empty
// API calls instead: the transport's ceiling), and returns pairs per second.
func throughput(ctx context.Context, e *benchEnv, clients int, dur time.Duration, empty bool) (float64, error) {
	var total atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, clients)
	start := make(chan struct{})
	for i := range clients {
		pid, err := e.owner()
		if err != nil {
			return 0, err
		}
		disk, err := e.image(fmt.Sprintf("t%d.img", i))
		if err != nil {
			return 0, err
		}
		c, err := api.Dial(ctx, e.socket)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		o := lockmgr.Object{UUID: fmt.Sprintf("c0000000-0000-4000-8000-%012d", i), PID: pid}
		rs := []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			end := time.Now().Add(dur)
			n := int64(0)
			for time.Now().Before(end) {
				var err error
				if empty {
					if _, err = c.Status(ctx); err == nil {
						_, err = c.Status(ctx)
					}
				} else if _, err = c.Acquire(ctx, o, rs, ""); err == nil {
					_, err = c.Release(ctx, o.UUID)
				}
				if err != nil {
					errc <- err
					return
				}
				n++
			}
			total.Add(n)
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	el := time.Since(t0)
	select {
	case err := <-errc:
		return 0, err
	default:
	}
	return float64(total.Load()) / el.Seconds(), nil
}

// echo is the floor: a child process answering each message on a unix
// socket, through Go's net package like the API.
type echo struct {
	cmd  *exec.Cmd
	conn net.Conn
	buf  []byte
	err  error
}

func startEcho(dir string) (*echo, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "echo.sock")
	cmd := exec.Command(exe, "bench", "_echo", path)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	for range 3000 {
		if conn, err := net.Dial("unix", path); err == nil {
			return &echo{cmd: cmd, conn: conn, buf: make([]byte, 64)}, nil
		}
		time.Sleep(time.Millisecond)
	}
	cmd.Process.Kill()
	return nil, errors.New("echo server did not start")
}

func (e *echo) roundTrip() {
	if _, err := e.conn.Write(e.buf); err != nil && e.err == nil {
		e.err = err
	}
	if _, err := io.ReadFull(e.conn, e.buf); err != nil && e.err == nil {
		e.err = err
	}
}

func (e *echo) close() {
	e.conn.Close()
	e.cmd.Process.Kill()
	e.cmd.Wait()
}

// newBenchInternalCmds are the hidden children of the benchmarks.
func newBenchInternalCmds() []*cobra.Command {
	echoCmd := &cobra.Command{
		Use: "_echo SOCKET", Hidden: true, Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			ln, err := net.Listen("unix", args[0])
			if err != nil {
				return err
			}
			for {
				c, err := ln.Accept()
				if err != nil {
					return err
				}
				go func() {
					buf := make([]byte, 64)
					for {
						if _, err := io.ReadFull(c, buf); err != nil {
							return
						}
						if _, err := c.Write(buf); err != nil {
							return
						}
					}
				}()
			}
		},
	}
	var socket, state, lvSocket, cpuProfile string
	daemonCmd := &cobra.Command{
		Use: "_daemon", Hidden: true, Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			if cpuProfile != "" {
				f, err := os.Create(cpuProfile)
				if err != nil {
					return err
				}
				defer f.Close()
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			if os.Getenv("GOMAXPROCS") == "" {
				runtime.GOMAXPROCS(1) // vmlockd's default max_procs
			}
			drv, err := lockspace.New(lockspace.Config{StateDir: state, LeaseDir: filepath.Join(state, "lockspaces")})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			cfg := daemon.Config{
				Socket: socket, StateDir: state, Driver: drv, Version: "bench",
				Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
				HolderCommand: func() error {
					return lockholder.StartDetached(lockholder.Command(exe, "bench", "_holder", "--state-dir", state))
				},
			}
			if lvSocket != "" {
				cfg.Libvirt = &daemon.LibvirtConfig{Socket: lvSocket}
			}
			d, err := daemon.New(ctx, cfg, nil)
			if err != nil {
				return err
			}
			return d.Run(ctx)
		},
	}
	daemonCmd.Flags().StringVar(&socket, "socket", "", "")
	daemonCmd.Flags().StringVar(&state, "state-dir", "", "")
	daemonCmd.Flags().StringVar(&lvSocket, "libvirt-socket", "", "also serve virtlockd's protocol here")
	daemonCmd.Flags().StringVar(&cpuProfile, "cpuprofile", "", "write the daemon's CPU profile here")
	holderCmd := &cobra.Command{
		Use: "_holder", Hidden: true, Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGPIPE)
			runtime.GOMAXPROCS(1) // as vmlockd's lock-holder
			return lockholder.Serve(context.Background(), state)
		},
	}
	holderCmd.Flags().StringVar(&state, "state-dir", "", "")
	return []*cobra.Command{echoCmd, daemonCmd, holderCmd}
}
