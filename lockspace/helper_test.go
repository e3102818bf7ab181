package lockspace

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// The tests run other processes: the test binary itself, re-executed in a
// helper mode chosen by this environment variable (a JSON helperArgs).
const helperEnv = "LOCKSPACE_TEST_HELPER"

// helperArgs tells a helper process what to do. Modes:
//
//	hold   Acquire Reqs with a Driver on Cfg, print "ok TOKENS" (or
//	       "err CODE MESSAGE"), wait for a line on stdin, release, print
//	       "released".
//	posix  take a POSIX fcntl write lock (F_SETLK) on byte 0 of Path (created
//	       if missing), as virtlockd does; print "ok"; wait for stdin.
//	probe  try a raw OFD write lock on byte 0 of Path; print "free", "busy",
//	       or "absent" if Path does not exist.
//	race   run raceWorkers; print the raceResult as JSON.
type helperArgs struct {
	Mode    string
	Cfg     Config
	Reqs    []lockmgr.Request
	Path    string
	Res     lockmgr.Resource
	Marks   string
	Seconds float64
	Workers int
}

func TestMain(m *testing.M) {
	if a := os.Getenv(helperEnv); a != "" {
		var args helperArgs
		if err := json.Unmarshal([]byte(a), &args); err != nil {
			fmt.Println("err bad helper args:", err)
			os.Exit(2)
		}
		os.Exit(runHelper(args))
	}
	os.Exit(m.Run())
}

func runHelper(a helperArgs) int {
	stdin := bufio.NewReader(os.Stdin)
	switch a.Mode {
	case "hold":
		d, err := New(a.Cfg)
		if err != nil {
			fmt.Println("err", lockmgr.CodeOf(err), err)
			return 1
		}
		for i := range a.Reqs {
			a.Reqs[i].Holder.PID = os.Getpid()
		}
		ls, err := d.Acquire(context.Background(), a.Reqs)
		if err != nil {
			fmt.Println("err", int(lockmgr.CodeOf(err)), err)
			_, _ = stdin.ReadString('\n')
			return 0
		}
		toks := make([]string, len(ls))
		for i, l := range ls {
			toks[i] = fmt.Sprint(l.Token())
		}
		fmt.Println("ok", strings.Join(toks, " "))
		_, _ = stdin.ReadString('\n')
		if err := d.Release(context.Background(), ls); err != nil {
			fmt.Println("err", int(lockmgr.CodeOf(err)), err)
			return 1
		}
		fmt.Println("released")
		return 0
	case "posix":
		f, err := os.OpenFile(a.Path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			fmt.Println("err", err)
			return 1
		}
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: 1}
		if err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk); err != nil {
			fmt.Println("err", err)
			return 1
		}
		fmt.Println("ok")
		_, _ = stdin.ReadString('\n')
		return 0
	case "probe":
		fd, err := unix.Open(a.Path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == unix.ENOENT {
			fmt.Println("absent")
			return 0
		}
		if err != nil {
			fmt.Println("err", err)
			return 1
		}
		if err := tryLock(fd, unix.F_WRLCK, 0); err == unix.EAGAIN {
			fmt.Println("busy")
		} else if err != nil {
			fmt.Println("err", err)
		} else {
			fmt.Println("free")
		}
		return 0
	case "race":
		res := raceWorkers(a)
		js, _ := json.Marshal(res)
		fmt.Println(string(js))
		return 0
	}
	fmt.Println("err unknown helper mode", a.Mode)
	return 2
}

// helper is a running helper process.
type helper struct {
	t     *testing.T
	cmd   *exec.Cmd
	in    io.WriteCloser
	lines chan string
	once  sync.Once
}

func spawn(t *testing.T, a helperArgs) *helper {
	t.Helper()
	js, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// Under -race, a process sleeps a second at exit unless told not to.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(js), "GORACE="+gorace)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{t: t, cmd: cmd, in: in, lines: make(chan string, 16)}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
	}()
	t.Cleanup(func() { h.stop(true) })
	return h
}

// next returns the helper's next line of output.
func (h *helper) next() string {
	h.t.Helper()
	select {
	case l, ok := <-h.lines:
		if !ok {
			h.t.Fatalf("helper %d exited without answering", h.cmd.Process.Pid)
		}
		return l
	case <-time.After(2 * time.Minute): // a hang guard, not a timing assertion
		h.t.Fatalf("helper %d did not answer", h.cmd.Process.Pid)
	}
	return ""
}

// expect reads a line and fails unless it starts with prefix.
func (h *helper) expect(prefix string) string {
	h.t.Helper()
	l := h.next()
	if !strings.HasPrefix(l, prefix) {
		h.t.Fatalf("helper %d said %q, want %q...", h.cmd.Process.Pid, l, prefix)
	}
	return l
}

// release tells a "hold" helper to release, and waits for it.
func (h *helper) release() {
	h.t.Helper()
	if _, err := io.WriteString(h.in, "\n"); err != nil {
		h.t.Fatal(err)
	}
	h.expect("released")
	h.stop(false)
}

// stop closes the helper's stdin (which ends "posix" and "hold" helpers)
// and waits for it; kill kills it first.
func (h *helper) stop(kill bool) {
	h.once.Do(func() {
		_ = h.in.Close()
		if kill {
			_ = h.cmd.Process.Kill()
		}
		for range h.lines {
		}
		_ = h.cmd.Wait()
	})
}

func (h *helper) pid() int { return h.cmd.Process.Pid }

// probe asks another process whether path is locked on byte 0.
func probe(t *testing.T, path string) string {
	t.Helper()
	h := spawn(t, helperArgs{Mode: "probe", Path: path})
	l := h.next()
	h.stop(false)
	return l
}

// env is one test's directories.
type env struct {
	root string
	cfg  Config
}

func newEnv(t *testing.T, indirect bool) *env {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	e := &env{root: root, cfg: Config{StateDir: filepath.Join(root, "state"), LeaseDir: filepath.Join(root, "leases")}}
	if indirect {
		e.cfg.DiskLeaseDir = filepath.Join(root, "disklease")
	}
	if err := os.MkdirAll(filepath.Join(root, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) driver(t *testing.T) *Driver {
	t.Helper()
	d, err := New(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// image returns the canonical path of an image in the env, created if create.
func (e *env) image(t *testing.T, name string, create bool) string {
	t.Helper()
	p := filepath.Join(e.root, "images", name)
	if create {
		if err := os.WriteFile(p, []byte("QFI\xfb"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r, err := lockmgr.Canonical(lockmgr.DiskResource(p, lockmgr.Exclusive))
	if err != nil {
		t.Fatal(err)
	}
	return r.Name
}

// lockPath is where r's lock lives, computed independently of the driver:
// it checks the naming contract of the package comment.
func (e *env) lockPath(r lockmgr.Resource) string {
	hash := func(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }
	switch r.Type {
	case lockmgr.TypeDisk:
		if e.cfg.DiskLeaseDir == "" {
			return r.Name
		}
		return filepath.Join(e.cfg.DiskLeaseDir, hash(r.Name))
	case lockmgr.TypeLease:
		ls, key, _ := strings.Cut(r.Name, "/")
		return filepath.Join(e.cfg.LeaseDir, ls, key)
	}
	return filepath.Join(e.cfg.LeaseDir, "custom."+string(r.Type), hash(r.Name))
}

// kind is one way of locking a resource; tables run over all of them.
type kind struct {
	name     string
	indirect bool
	file     bool // locked through a lease file, removed by its last holder
	res      func(t *testing.T, e *env, i int, m lockmgr.Mode) lockmgr.Resource
}

func allKinds() []kind {
	return []kind{
		{name: "direct", res: func(t *testing.T, e *env, i int, m lockmgr.Mode) lockmgr.Resource {
			return lockmgr.DiskResource(e.image(t, fmt.Sprintf("disk%d.qcow2", i), true), m)
		}},
		{name: "indirect", indirect: true, file: true, res: func(t *testing.T, e *env, i int, m lockmgr.Mode) lockmgr.Resource {
			// An indirect lease does not need the image to exist.
			return lockmgr.DiskResource(e.image(t, fmt.Sprintf("disk%d.qcow2", i), false), m)
		}},
		{name: "lease", file: true, res: func(_ *testing.T, _ *env, i int, m lockmgr.Mode) lockmgr.Resource {
			return lockmgr.LeaseResource("cluster-a", fmt.Sprintf("key-%d", i), m)
		}},
		{name: "custom", file: true, res: func(_ *testing.T, _ *env, i int, m lockmgr.Mode) lockmgr.Resource {
			return lockmgr.Resource{Type: "iscsi", Name: fmt.Sprintf("iqn.2024-01.org.example:target/lun %d", i), Mode: m}
		}},
	}
}

func otherHolder(m lockmgr.Mode) lockmgr.Holder {
	return lockmgr.Holder{Name: "vm-other", UUID: "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", Host: "host-b", Mode: m}
}

func myHolder(m lockmgr.Mode) lockmgr.Holder {
	return lockmgr.Holder{Name: "vm-mine", UUID: "9e8d7c6b-5a49-4837-a625-140f1e2d3c4b", PID: os.Getpid(), Host: "host-a", Mode: m}
}

func reqsOf(h lockmgr.Holder, rs ...lockmgr.Resource) []lockmgr.Request {
	out := make([]lockmgr.Request, len(rs))
	for i, r := range rs {
		out[i] = lockmgr.Request{Resource: r, Holder: h}
	}
	return out
}

// raceResult is what raceWorkers report.
type raceResult struct {
	Exclusive, Shared, Busy int
	Errors                  []string
}

// raceWorkers acquires and releases a.Res from a.Workers goroutines until
// a.Seconds have passed, checking with marker files in a.Marks that no two
// exclusive holders (nor an exclusive holder and a sharer) overlap, and with
// a.Marks/last that exclusive grants' tokens strictly increase across all
// processes. Every fourth grant of a worker is shared.
func raceWorkers(a helperArgs) raceResult {
	var res raceResult
	var mu sync.Mutex
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(res.Errors) < 10 {
			res.Errors = append(res.Errors, fmt.Sprintf(format, args...))
		}
	}
	d, err := New(a.Cfg)
	if err != nil {
		return raceResult{Errors: []string{err.Error()}}
	}
	defer d.Close()
	ctx := context.Background()
	deadline := time.Now().Add(time.Duration(a.Seconds * float64(time.Second)))
	excl := filepath.Join(a.Marks, "excl")
	last := filepath.Join(a.Marks, "last")
	var wg sync.WaitGroup
	for w := range a.Workers {
		wg.Go(func() {
			var nx, ns, nb int
			for time.Now().Before(deadline) {
				r := a.Res
				r.Mode = lockmgr.Exclusive
				if (nx+ns)%4 == 3 {
					r.Mode = lockmgr.Shared
				}
				h := lockmgr.Holder{Name: fmt.Sprintf("worker-%d-%d", os.Getpid(), w), PID: os.Getpid(), Mode: r.Mode}
				ls, err := d.Acquire(ctx, reqsOf(h, r))
				if errors.Is(err, lockmgr.ErrBusy) {
					nb++
					time.Sleep(time.Duration(rand.IntN(50)) * time.Microsecond)
					continue
				}
				if err != nil {
					fail("acquire %s: %v", r.Mode, err)
					continue
				}
				tok := ls[0].Token()
				if r.Mode == lockmgr.Exclusive {
					nx++
					f, err := os.OpenFile(excl, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
					if err != nil {
						fail("two exclusive holders at once (token %d): %v", tok, err)
					} else {
						_ = f.Close()
					}
					if ents, _ := os.ReadDir(a.Marks); hasPrefix(ents, "shared.") {
						fail("an exclusive holder and a sharer at once (token %d)", tok)
					}
					b, _ := os.ReadFile(last)
					if len(b) == 8 && binary.LittleEndian.Uint64(b) >= tok {
						fail("token went from %d to %d", binary.LittleEndian.Uint64(b), tok)
					}
					_ = os.WriteFile(last, binary.LittleEndian.AppendUint64(nil, tok), 0o600)
					if err == nil {
						_ = os.Remove(excl)
					}
				} else {
					ns++
					mark := filepath.Join(a.Marks, fmt.Sprintf("shared.%d.%d", os.Getpid(), w))
					if err := os.WriteFile(mark, nil, 0o600); err != nil {
						fail("shared marker: %v", err)
					}
					if _, err := os.Stat(excl); err == nil {
						fail("a sharer and an exclusive holder at once (token %d)", tok)
					}
					_ = os.Remove(mark)
				}
				if err := d.Release(ctx, ls); err != nil {
					fail("release: %v", err)
				}
			}
			mu.Lock()
			res.Exclusive += nx
			res.Shared += ns
			res.Busy += nb
			mu.Unlock()
		})
	}
	wg.Wait()
	return res
}

func hasPrefix(ents []os.DirEntry, p string) bool {
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), p) {
			return true
		}
	}
	return false
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

// cycle acquires and releases r, exclusively, and returns the token.
func cycle(t *testing.T, d *Driver, r lockmgr.Resource) uint64 {
	t.Helper()
	ls, err := d.Acquire(ctx, reqsOf(myHolder(r.Mode), r))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Release(ctx, ls); err != nil {
		t.Fatal(err)
	}
	return ls[0].Token()
}
