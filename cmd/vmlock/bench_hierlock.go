package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/hierlock"
)

// benchHierlockOpts are the flags of `vmlock bench hierlock`.
type benchHierlockOpts struct {
	json       bool
	iterations int
	warmup     int
	batch      int
	pythonOps  int
	noGaneti   bool
	python     string
	ganetiRoot string
	cacheDir   string
}

func newBenchHierlockCmd() *cobra.Command {
	o := &benchHierlockOpts{}
	c := &cobra.Command{
		Use:         "hierlock",
		Annotations: map[string]string{annotationParallel: ""},
		Short:       "hierlock (Ganeti-style locks) against sync.RWMutex and Ganeti's own Python SharedLock",
		Long: `Measures, interleaved in one run, the p50 of:
  - sharedlock_acquire_release: uncontended hierlock.SharedLock exclusive Acquire+Release;
  - rwmutex_lock_unlock: sync.RWMutex Lock+Unlock (the floor);
  - the same two in shared mode (RLock+RUnlock);
  - lockset100_acquire_release: one LockSet Acquire+Release of 100 named locks;
  - manager_job_acquire_release: a typical job (BGL shared, one instance, two nodes) through the Manager.
Tiny operations are timed in batches of --batch and reported per operation.
Then Ganeti's own lib/locking.py SharedLock acquire+release under python3, in rounds that
alternate with rounds of as many Go acquire+release pairs (the speedup is the ratio of their p50s),
from the Debian package (ganeti-3.0, the Python half of "ganeti"), fetched with apt-get download
and unpacked with dpkg -x into a cache directory if it is not installed. If that is impossible the
Ganeti metric and goal are left out and stderr says why (the exit status is still 0).
Goals: sharedlock_vs_rwmutex (≤ 10), lockset100_acquire_release_us (≤ 200),
speedup_vs_ganeti_python (≥ 100).
The output is always one JSON object (shared/specs/bench-output.md); progress goes to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBenchHierlock(cmd.Context(), o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := c.Flags()
	f.BoolVar(&o.json, "json", false, "print the report as one JSON object (the only output format; accepted for uniformity)")
	f.IntVar(&o.iterations, "iterations", 4000, "timed rounds (each runs every measured operation once, tiny ones --batch times)")
	f.IntVar(&o.warmup, "warmup", 300, "untimed rounds first")
	f.IntVar(&o.batch, "batch", 100, "operations per timed sample for the sub-microsecond operations")
	f.IntVar(&o.pythonOps, "python-ops", 210000, "acquire+release pairs timed in Ganeti's Python SharedLock (in 21 rounds, each alternating with as many Go pairs)")
	f.BoolVar(&o.noGaneti, "no-ganeti", false, "skip the Ganeti Python measurement")
	f.StringVar(&o.python, "python", "python3", "the Python interpreter for Ganeti")
	f.StringVar(&o.ganetiRoot, "ganeti-root", "", "a directory holding ganeti/locking.py (default: an installed Ganeti, else the cache)")
	f.StringVar(&o.cacheDir, "cache-dir", "", "where the Ganeti package is downloaded and unpacked (default $XDG_CACHE_HOME/vmlock-bench, /var/cache/vmlock-bench as root, else ~/.cache/vmlock-bench)")
	return c
}

func runBenchHierlock(ctx context.Context, o *benchHierlockOpts, stdout, stderr io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	if o.iterations < 1 || o.warmup < 0 || o.batch < 1 || o.pythonOps < 20 {
		return usageError{errors.New("--iterations and --batch must be at least 1, --warmup at least 0, --python-ops at least 20")}
	}
	progress := func(format string, args ...any) { fmt.Fprintf(stderr, "bench hierlock: "+format+"\n", args...) }

	const owner = hierlock.Owner("bench")
	var firstErr error
	check := func(err error) {
		if err != nil && firstErr == nil {
			firstErr = err
		}
	}
	lock := hierlock.NewSharedLock("bench", nil)
	var rw sync.RWMutex
	names := make([]string, 100)
	for i := range names {
		names[i] = fmt.Sprintf("node%d", i+1)
	}
	set, err := hierlock.NewLockSet("node", names, nil)
	if err != nil {
		return err
	}
	levels := hierlock.DefaultLevels()
	levels[hierlock.LevelInstance].Members = []string{"inst1", "inst2"}
	levels[hierlock.LevelNode].Members = []string{"node1", "node2", "node3"}
	mgr, err := hierlock.NewManager(hierlock.Config{Levels: levels})
	if err != nil {
		return err
	}
	job := []struct {
		level hierlock.Level
		req   hierlock.Request
	}{
		{hierlock.LevelCluster, hierlock.Request{Names: []string{hierlock.BGL}, Mode: hierlock.Shared}},
		{hierlock.LevelInstance, hierlock.Request{Names: []string{"inst1"}}},
		{hierlock.LevelNode, hierlock.Request{Names: []string{"node2", "node1"}}},
	}
	batch := o.batch
	fns := []func(){
		func() {
			for range batch {
				check(lock.Acquire(ctx, owner, hierlock.Exclusive, 0))
				check(lock.Release(owner))
			}
		},
		func() {
			for range batch {
				rw.Lock()
				//lint:ignore SA2001 an empty critical section is the point
				rw.Unlock()
			}
		},
		func() {
			for range batch {
				check(lock.Acquire(ctx, owner, hierlock.Shared, 0))
				check(lock.Release(owner))
			}
		},
		func() {
			for range batch {
				rw.RLock()
				//lint:ignore SA2001 an empty critical section is the point
				rw.RUnlock()
			}
		},
		func() {
			_, err := set.Acquire(ctx, owner, hierlock.Request{Names: names})
			check(err)
			check(set.Release(owner))
		},
		func() {
			for _, s := range job {
				_, err := mgr.Acquire(ctx, owner, s.level, s.req)
				check(err)
			}
			check(mgr.ReleaseAll(owner))
		},
	}
	progress("Go: %d warm-up and %d timed rounds (tiny operations in batches of %d)", o.warmup, o.iterations, batch)
	s := bench.Interleave(o.warmup, o.iterations, fns...)
	if firstErr != nil {
		return fmt.Errorf("hierlock failed during the benchmark: %w", firstErr)
	}
	perOp := func(i int, p float64) float64 { return bench.Micros(s[i].Percentile(p)) / float64(batch) }
	whole := func(i int, p float64) float64 { return bench.Micros(s[i].Percentile(p)) }

	rep := bench.NewReport("hierlock")
	excl, rwLock := perOp(0, 50), perOp(1, 50)
	shr, rwRLock := perOp(2, 50), perOp(3, 50)
	rep.Metric("sharedlock_acquire_release_p50_us", excl)
	rep.Metric("sharedlock_acquire_release_p99_us", perOp(0, 99))
	rep.Metric("rwmutex_lock_unlock_p50_us", rwLock)
	rep.Metric("sharedlock_shared_acquire_release_p50_us", shr)
	rep.Metric("rwmutex_rlock_runlock_p50_us", rwRLock)
	rep.Metric("sharedlock_shared_vs_rwmutex_rlock", shr/rwRLock)
	rep.Metric("lockset100_acquire_release_p50_us", whole(4, 50))
	rep.Metric("lockset100_acquire_release_p99_us", whole(4, 99))
	rep.Metric("manager_job_acquire_release_p50_us", whole(5, 50))

	// Ganeti's Python SharedLock, in rounds that alternate with rounds of
	// the same number of Go acquire+release pairs.
	var speedup float64
	if o.noGaneti {
		progress("Ganeti Python: skipped (--no-ganeti): metric and goal absent")
	} else if py, err := startHierlockPython(ctx, o, progress); err != nil {
		progress("Ganeti Python: ABSENT from the report: %v", err)
	} else {
		defer py.stop()
		const rounds = 21
		per := max(1, o.pythonOps/rounds)
		progress("Ganeti Python: %d rounds of %d acquire+release pairs, alternating with Go", rounds, per)
		var pySamples, goSamples bench.Samples
		for r := -1; r < rounds && err == nil; r++ { // round -1 warms up
			t := time.Now()
			for range per {
				check(lock.Acquire(ctx, owner, hierlock.Exclusive, 0))
				check(lock.Release(owner))
			}
			goPer := time.Since(t) / time.Duration(per)
			var pyPer time.Duration
			if pyPer, err = py.run(per); err == nil && r >= 0 {
				pySamples = append(pySamples, pyPer)
				goSamples = append(goSamples, goPer)
			}
		}
		if err != nil {
			progress("Ganeti Python: ABSENT from the report: %v", err)
		} else {
			pyUS, goUS := bench.Micros(pySamples.Percentile(50)), bench.Micros(goSamples.Percentile(50))
			rep.Metric("ganeti_python_sharedlock_acquire_release_us", pyUS)
			rep.Metric("sharedlock_acquire_release_paired_with_python_us", goUS)
			speedup = pyUS / goUS
			progress("Ganeti Python: %.3f µs per acquire+release, Go %.4f µs in the same rounds", pyUS, goUS)
		}
	}
	if firstErr != nil {
		return fmt.Errorf("hierlock failed during the benchmark: %w", firstErr)
	}

	rep.Goal("sharedlock_vs_rwmutex", excl/rwLock, 10, bench.Lower)
	rep.Goal("lockset100_acquire_release_us", whole(4, 50), 200, bench.Lower)
	if speedup > 0 {
		rep.Goal("speedup_vs_ganeti_python", speedup, 100, bench.Higher)
	}
	return rep.Write(stdout)
}

// hierlockGanetiScript times Ganeti's SharedLock on request, so that its
// rounds interleave with Go's: after setup it prints one JSON line, then for
// every line "N" on stdin it times N acquire+release pairs and prints the
// microseconds per pair.
//
// locking.py imports ganeti.errors and ganeti.compat (real, light) and
// ganeti.utils and ganeti.query, whose imports pull in OpenSSL, bitarray,
// pyinotify, the hypervisors and more. SharedLock uses only
// utils.RunningTimeout (loaded from Ganeti's own utils/algo.py, without
// running utils/__init__.py), utils.TimeoutExpired (a one-line copy) and, in
// GetLockInfo only, the query.LQ_* names: those two modules are stubbed with
// exactly that. Nothing of SharedLock itself is changed.
const hierlockGanetiScript = `
import json, sys, threading, time, types
root = sys.argv[1]
sys.path.insert(0, root)
if not hasattr(threading, "currentThread"):  # removed from newer Pythons
    threading.currentThread = threading.current_thread
import ganeti
utils = types.ModuleType("ganeti.utils")
utils.__path__ = [root + "/ganeti/utils"]
sys.modules["ganeti.utils"] = utils
ganeti.utils = utils
from ganeti.utils import algo
utils.RunningTimeout = algo.RunningTimeout
def TimeoutExpired(epoch, timeout, _time_fn=time.time):
    return _time_fn() > (epoch + timeout)
utils.TimeoutExpired = TimeoutExpired
query = types.ModuleType("ganeti.query")
query.LQ_MODE, query.LQ_OWNER, query.LQ_PENDING = "mode", "owner", "pending"
sys.modules["ganeti.query"] = query
ganeti.query = query
from ganeti import locking
lock = locking.SharedLock("bench")
acquire, release, clock = lock.acquire, lock.release, time.perf_counter
print(json.dumps({"python": sys.version.split()[0], "locking": locking.__file__}), flush=True)
for line in sys.stdin:
    n = int(line)
    t = clock()
    for _ in range(n):
        acquire(); release()
    print((clock() - t) / n * 1e6, flush=True)
`

// hierlockPython is a running Ganeti timing script.
type hierlockPython struct {
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    *bufio.Scanner
	errOut *bytes.Buffer
}

// startHierlockPython finds (or fetches) Ganeti's Python code and starts
// the timing script on it.
func startHierlockPython(ctx context.Context, o *benchHierlockOpts, progress func(string, ...any)) (*hierlockPython, error) {
	py, err := exec.LookPath(o.python)
	if err != nil {
		return nil, fmt.Errorf("no Python interpreter %q: %w", o.python, err)
	}
	root, err := hierlockGanetiRoot(ctx, o, progress)
	if err != nil {
		return nil, err
	}
	p := &hierlockPython{errOut: &bytes.Buffer{}}
	p.cmd = exec.CommandContext(ctx, py, "-B", "-c", hierlockGanetiScript, root)
	p.cmd.Stderr = p.errOut
	if p.in, err = p.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p.out = bufio.NewScanner(stdout)
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	if !p.out.Scan() {
		return nil, p.fail("python did not start")
	}
	var hello struct {
		Python  string `json:"python"`
		Locking string `json:"locking"`
	}
	if err := json.Unmarshal(p.out.Bytes(), &hello); err != nil {
		return nil, p.fail(fmt.Sprintf("unexpected output %q", p.out.Text()))
	}
	progress("Ganeti Python: timing %s under Python %s (%s)", hello.Locking, hello.Python, py)
	return p, nil
}

// run times n acquire+release pairs and returns the time per pair.
func (p *hierlockPython) run(n int) (time.Duration, error) {
	if _, err := fmt.Fprintln(p.in, n); err != nil {
		return 0, p.fail("python went away")
	}
	if !p.out.Scan() {
		return 0, p.fail("python went away")
	}
	us, err := strconv.ParseFloat(strings.TrimSpace(p.out.Text()), 64)
	if err != nil || us <= 0 {
		return 0, p.fail(fmt.Sprintf("unexpected output %q", p.out.Text()))
	}
	return time.Duration(us * float64(time.Microsecond)), nil
}

func (p *hierlockPython) fail(what string) error {
	p.stop()
	return fmt.Errorf("%s: %s", what, lastLines(p.errOut.String(), 6))
}

func (p *hierlockPython) stop() {
	if p.in != nil {
		p.in.Close()
		p.in = nil
		_ = p.cmd.Wait()
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// hierlockGanetiRoot returns a directory holding ganeti/locking.py: the one
// given, an installed Ganeti, or the package unpacked in the cache,
// downloading it first if needed.
func hierlockGanetiRoot(ctx context.Context, o *benchHierlockOpts, progress func(string, ...any)) (string, error) {
	if o.ganetiRoot != "" {
		if _, err := os.Stat(filepath.Join(o.ganetiRoot, "ganeti", "locking.py")); err != nil {
			return "", fmt.Errorf("--ganeti-root: %w", err)
		}
		return o.ganetiRoot, nil
	}
	if root := findGanetiLocking("/usr/share/ganeti"); root != "" {
		progress("Ganeti Python: using the installed %s", root)
		return root, nil
	}
	cache := o.cacheDir
	if cache == "" {
		cache = defaultBenchCacheDir()
	}
	base := filepath.Join(cache, "ganeti")
	unpacked := filepath.Join(base, "root")
	if root := findGanetiLocking(unpacked); root != "" {
		progress("Ganeti Python: using the cached %s", root)
		return root, nil
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", errors.New("no installed or cached Ganeti, and no apt-get to download it")
	}
	debs := filepath.Join(base, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return "", err
	}
	var tried []string
	for _, pkg := range ganetiPackages(ctx) {
		progress("Ganeti Python: apt-get download %s into %s", pkg, debs)
		cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
		cmd.Dir = debs
		if out, err := cmd.CombinedOutput(); err != nil {
			tried = append(tried, fmt.Sprintf("%s: apt-get download: %v: %s", pkg, err, lastLines(string(out), 2)))
			continue
		}
		files, _ := filepath.Glob(filepath.Join(debs, pkg+"_*.deb"))
		if len(files) == 0 {
			tried = append(tried, pkg+": no .deb after apt-get download")
			continue
		}
		tmp, err := os.MkdirTemp(base, "unpack-")
		if err != nil {
			return "", err
		}
		if out, err := exec.CommandContext(ctx, "dpkg", "-x", files[len(files)-1], tmp).CombinedOutput(); err != nil {
			os.RemoveAll(tmp)
			tried = append(tried, fmt.Sprintf("%s: dpkg -x: %v: %s", pkg, err, lastLines(string(out), 2)))
			continue
		}
		if findGanetiLocking(tmp) == "" {
			os.RemoveAll(tmp)
			tried = append(tried, pkg+": has no ganeti/locking.py")
			continue
		}
		os.RemoveAll(unpacked)
		if err := os.Rename(tmp, unpacked); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
		root := findGanetiLocking(unpacked)
		progress("Ganeti Python: unpacked %s, using %s", filepath.Base(files[len(files)-1]), root)
		return root, nil
	}
	if len(tried) == 0 {
		return "", errors.New("apt-cache knows no ganeti package (run apt-get update?)")
	}
	return "", fmt.Errorf("could not fetch Ganeti's Python code: %s", strings.Join(tried, "; "))
}

// ganetiPackages lists the packages that may ship lib/locking.py: the
// Python half that the "ganeti" metapackage depends on (ganeti-3.0 today),
// then "ganeti" itself (older releases shipped everything in it).
func ganetiPackages(ctx context.Context) []string {
	var pkgs []string
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", "ganeti").Output()
	if err == nil {
		re := regexp.MustCompile(`(?m)^\s+Depends: (ganeti-[0-9][0-9.]*)$`)
		for _, m := range re.FindAllStringSubmatch(string(out), -1) {
			pkgs = append(pkgs, m[1])
		}
		pkgs = append(pkgs, "ganeti")
	}
	return pkgs
}

// findGanetiLocking returns the directory above the first ganeti/locking.py
// under dir, or "".
func findGanetiLocking(dir string) string {
	found := ""
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || found != "" {
			return filepath.SkipDir
		}
		if !d.IsDir() && d.Name() == "locking.py" && filepath.Base(filepath.Dir(p)) == "ganeti" {
			found = filepath.Dir(filepath.Dir(p))
			return filepath.SkipAll
		}
		return nil
	})
	return found
}

func defaultBenchCacheDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "vmlock-bench")
	}
	if os.Geteuid() == 0 {
		return "/var/cache/vmlock-bench"
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "vmlock-bench")
	}
	return filepath.Join(os.TempDir(), "vmlock-bench")
}
