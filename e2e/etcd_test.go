package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/lockmgr"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

// The cluster tests: a real etcd cluster (three embedded members, run by
// the test process on loopback) and several vmlockd processes, each one a
// "host" with its own state directory and --host name.

// startEtcd starts a 3-member cluster for one test.
func startEtcd(t *testing.T) *etcdtest.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := etcdtest.Start(ctx, etcdtest.Options{Members: 3, NoFsync: true, Dir: t.TempDir()})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// clusterHost is one vmlockd with the etcd driver, standing for one host. Its
// embedded daemon gives the CLI helpers (vmlock, locks, startRun).
type clusterHost struct {
	*daemon
	name   string
	args   []string
	cmd    *exec.Cmd
	out    *syncbuf.Buffer
	exited chan struct{}
}

// hostConfig is what the [etcd] section of a host's config file says.
type hostConfig struct {
	endpoints   []string
	ttl, margin time.Duration // 0: the defaults (10 s, 2 s)
}

func startHost(t *testing.T, name string, hc hostConfig) *clusterHost {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmlock-e2e-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	conf := filepath.Join(dir, "vmlockd.toml")
	var b strings.Builder
	fmt.Fprintf(&b, "driver = \"etcd\"\n\n[etcd]\nendpoints = [\"%s\"]\ndial_timeout = \"2s\"\n", strings.Join(hc.endpoints, `", "`))
	if hc.ttl > 0 {
		fmt.Fprintf(&b, "ttl = %q\n", hc.ttl.String())
	}
	if hc.margin > 0 {
		fmt.Fprintf(&b, "fence_margin = %q\n", hc.margin.String())
	}
	if err := os.WriteFile(conf, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, dir: dir, socket: filepath.Join(dir, "vmlockd.sock"), stateDir: filepath.Join(dir, "state")}
	h := &clusterHost{daemon: d, name: name, out: &syncbuf.Buffer{}}
	h.args = []string{"--config", conf, "--socket", d.socket, "--state-dir", d.stateDir, "--host", name, "--log-level", "debug"}
	t.Cleanup(func() {
		h.stop()
		h.killHolder()
		if t.Failed() {
			t.Logf("%s: vmlockd log:\n%s", name, h.out)
		}
		os.RemoveAll(dir)
	})
	h.start()
	return h
}

func (h *clusterHost) start() {
	h.t.Helper()
	cmd := exec.Command(bins.vmlockd, h.args...)
	cmd.Stdout, cmd.Stderr = h.out, h.out
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	h.cmd, h.exited = cmd, exited
	h.waitReady()
}

// kill9 kills vmlockd (not its lock-holder).
func (h *clusterHost) kill9() {
	if h.cmd == nil {
		return
	}
	h.cmd.Process.Kill()
	<-h.exited
	h.cmd = nil
}

func (h *clusterHost) stop() {
	if h.cmd == nil {
		return
	}
	h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(10 * time.Second):
		h.cmd.Process.Kill()
		<-h.exited
	}
	h.cmd = nil
}

// fenced reports whether the host's log says it fenced itself.
func (h *clusterHost) fenced() bool { return strings.Contains(h.out.String(), "fencing:") }

// sleeper starts a process that stands for a VM.
func sleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// acquire asks h for disks, exclusively, for a new object owned by pid.
func (h *clusterHost) acquire(ctx context.Context, name string, pid int, disks ...string) (string, error) {
	c, err := api.Dial(ctx, h.socket)
	if err != nil {
		return "", err
	}
	defer c.Close()
	var rs []lockmgr.Resource
	for _, d := range disks {
		rs = append(rs, lockmgr.DiskResource(d, lockmgr.Exclusive))
	}
	return c.Acquire(ctx, lockmgr.Object{UUID: newUUIDForTest(), Name: name, PID: pid}, rs, "")
}

func newUUIDForTest() string {
	b := make([]byte, 16)
	rand.Read(b)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// waitGrant asks h for disk every 20 ms until it is granted (to a new
// object owned by pid) and returns when the grant's reply came.
func (h *clusterHost) waitGrant(ctx context.Context, disk string, pid int) (time.Time, error) {
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := h.acquire(cctx, "taker", pid, disk)
		cancel()
		if err == nil {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("%s never granted %s: last error: %w", h.name, disk, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// diskPaths returns n disk paths (files that exist) in a fresh directory.
func diskPaths(t *testing.T, n int) []string {
	t.Helper()
	out := make([]string, n)
	for i := range out {
		out[i] = image(t, fmt.Sprintf("d%d.img", i))
	}
	return out
}

func TestEtcdOneDiskCannotBeHeldOnTwoHostsAndGrantsAreAllOrNothing(t *testing.T) {
	c := startEtcd(t)
	hc := hostConfig{endpoints: c.Endpoints(), ttl: 3 * time.Second, margin: time.Second}
	h1, h2 := startHost(t, "h1", hc), startHost(t, "h2", hc)
	disks := diskPaths(t, 3)

	web := h1.startRun("web1", "--disk", disks[0])
	r := h2.vmlock("run", "--name", "web2", "--disk", disks[0], "--", "true")
	if r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("h2 run on h1's disk: exit %d (%s), want busy", r.code, r.stderr)
	}
	mustContain(t, "busy message", r.stderr, "disk "+disks[0]+" is locked exclusively", `vm "web1"`,
		fmt.Sprintf("pid %d", web.Process.Pid), "host h1")
	if r := h2.vmlock("run", "--disk", disks[0]+":shared", "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("shared run against an exclusive holder on another host: exit %d, want busy", r.code)
	}

	// Three disks, the last one busy: none stays held.
	r = h2.vmlock("run", "--name", "three", "--disk", disks[1], "--disk", disks[2], "--disk", disks[0], "--", "true")
	if r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("3-disk run with one busy: exit %d (%s), want busy", r.code, r.stderr)
	}
	if ls := h2.locks(); len(ls) != 0 {
		t.Fatalf("h2 holds %+v after a failed grant", ls)
	}
	for _, d := range disks[1:] {
		if r := h1.vmlock("run", "--disk", d, "--", "true"); r.code != 0 {
			t.Fatalf("%s after h2's failed 3-disk grant: exit %d (%s): a part of it stayed held", d, r.code, r.stderr)
		}
	}
	web.Process.Kill()
	web.Wait()
	// Once web1 is gone, h2 gets all three at once.
	waitUntil(t, 10*time.Second, "h2 granted all three disks", func() bool {
		return h2.vmlock("run", "--disk", disks[0], "--disk", disks[1], "--disk", disks[2], "--", "true").code == 0
	})
}

func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestEtcdTakeoverAfterTheHolderHostIsKilled(t *testing.T) {
	c := startEtcd(t)
	const ttl = 3 * time.Second
	hc := hostConfig{endpoints: c.Endpoints(), ttl: ttl, margin: time.Second}
	h1, h2 := startHost(t, "h1", hc), startHost(t, "h2", hc)
	disk := diskPaths(t, 1)[0]
	web := h1.startRun("web1", "--disk", disk)
	taker := sleeper(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := h2.acquire(ctx, "early", taker.Process.Pid, disk); !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("h2 before the crash: %v, want busy", err)
	}

	// The host dies: vmlockd, its lock-holder and the VM at once.
	t0 := time.Now()
	h1.kill9()
	h1.killHolder()
	web.Process.Kill()
	granted, err := h2.waitGrant(ctx, disk, taker.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	took := granted.Sub(t0)
	t.Logf("takeover: h2 granted the disk %v after h1 was killed (TTL %v; %.2f × TTL; goal ≤ TTL + 1 s)", took.Round(time.Millisecond), ttl, took.Seconds()/ttl.Seconds())
}

// etcdLink is one host's way to etcd: a proxy per member.
type etcdLink []*etcdtest.Proxy

func newLink(t *testing.T, c *etcdtest.Cluster) etcdLink {
	var l etcdLink
	for _, ep := range c.Endpoints() {
		l = append(l, etcdtest.NewProxy(t, ep))
	}
	return l
}

func (l etcdLink) endpoints() []string {
	var out []string
	for _, p := range l {
		out = append(out, p.URL())
	}
	return out
}

func (l etcdLink) cut(b bool) {
	for _, p := range l {
		p.SetBlocked(b)
	}
}

func TestEtcdHostCutOffFromEtcdKillsItsHolderBeforeAnotherHostIsGranted(t *testing.T) {
	c := startEtcd(t)
	const ttl, margin = 3 * time.Second, time.Second
	l1 := newLink(t, c)
	h1 := startHost(t, "h1", hostConfig{endpoints: l1.endpoints(), ttl: ttl, margin: margin})
	h2 := startHost(t, "h2", hostConfig{endpoints: c.Endpoints(), ttl: ttl, margin: margin})
	disks := diskPaths(t, 2)
	web := h1.startRun("web1", "--disk", disks[0])
	died := make(chan time.Time, 1)
	go func() { web.Wait(); died <- time.Now() }()
	taker := sleeper(t)

	tCut := time.Now()
	l1.cut(true)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	granted, err := h2.waitGrant(ctx, disks[0], taker.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	aliveAtGrant := web.ProcessState == nil && syscall.Kill(web.Process.Pid, 0) == nil && !isZombie(web.Process.Pid)
	var tDeath time.Time
	select {
	case tDeath = <-died:
	case <-time.After(5 * time.Second):
		t.Fatalf("h1's holder (pid %d) still runs %v after h2 was granted its disk", web.Process.Pid, time.Since(granted))
	}
	t.Logf("cut off at 0: h1's holder killed at +%v, h2 granted at +%v (TTL %v, fence margin %v)",
		tDeath.Sub(tCut).Round(time.Millisecond), granted.Sub(tCut).Round(time.Millisecond), ttl, margin)
	if aliveAtGrant || !tDeath.Before(granted) {
		t.Fatalf("h2 was granted the disk (+%v) before h1's holder was killed (+%v)", granted.Sub(tCut), tDeath.Sub(tCut))
	}
	if !h1.fenced() {
		t.Fatal("h1's log does not say it fenced")
	}
	if ws, ok := web.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("h1's holder ended with %v, want SIGKILL", web.ProcessState)
	}

	// Back on the network, h1 starts a new session and grants again.
	l1.cut(false)
	waitUntil(t, 30*time.Second, "h1 granting again after the partition", func() bool {
		return h1.vmlock("run", "--disk", disks[1], "--", "true").code == 0
	})
	if r := h1.vmlock("run", "--disk", disks[0], "--", "true"); r.code != int(lockmgr.CodeBusy) {
		t.Fatalf("h1 after the partition, on the disk h2 took: exit %d, want busy", r.code)
	}
}

// isZombie reports whether pid has exited but is not reaped yet.
func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z'
}

func TestEtcdLeaderKilledLosesNoLockAndFencesNothing(t *testing.T) {
	c := startEtcd(t)
	hc := hostConfig{endpoints: c.Endpoints()} // the default TTL (10 s) and margin (2 s)
	hosts := []*clusterHost{startHost(t, "h1", hc), startHost(t, "h2", hc), startHost(t, "h3", hc)}
	disks := diskPaths(t, 3)
	var webs []*exec.Cmd
	for i, h := range hosts {
		webs = append(webs, h.startRun(fmt.Sprintf("web%d", i), "--disk", disks[i]))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lead, err := c.WaitLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	c.Stop(lead)
	newLead, err := c.WaitLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("killed leader m%d; m%d leads after %v", lead, newLead, time.Since(t0).Round(time.Millisecond))
	// Watch the holders for longer than the TTL.
	for time.Since(t0) < 12*time.Second {
		for i, web := range webs {
			if syscall.Kill(web.Process.Pid, 0) != nil || isZombie(web.Process.Pid) {
				t.Fatalf("web%d died %v after the leader was killed", i, time.Since(t0))
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	for i, h := range hosts {
		if h.fenced() {
			t.Fatalf("%s fenced itself after a leader change", h.name)
		}
		held := false
		for _, l := range h.locks() {
			if l.Resource.Name == disks[i] && len(l.Holders) == 1 && l.Holders[0].PID == webs[i].Process.Pid {
				held = true
			}
		}
		if !held {
			t.Fatalf("%s no longer shows web%d holding %s", h.name, i, disks[i])
		}
		other := hosts[(i+1)%len(hosts)]
		if r := other.vmlock("run", "--disk", disks[i], "--", "true"); r.code != int(lockmgr.CodeBusy) {
			t.Fatalf("%s could take %s from %s after the leader change: exit %d (%s)", other.name, disks[i], h.name, r.code, r.stderr)
		}
	}
}

// A vmlockd restarted within the TTL keeps every lock; one that stays down
// has its lock-holder kill the holders before another host can take over.
func TestEtcdDaemonDownLongerThanTheTTLIsFencedByItsLockHolder(t *testing.T) {
	c := startEtcd(t)
	const ttl, margin = 3 * time.Second, time.Second
	hc := hostConfig{endpoints: c.Endpoints(), ttl: ttl, margin: margin}
	h1, h2 := startHost(t, "h1", hc), startHost(t, "h2", hc)
	disks := diskPaths(t, 2)
	web := h1.startRun("web1", "--disk", disks[0])
	taker := sleeper(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// A crash and a quick restart: the lease is re-attached, nothing moves.
	h1.kill9()
	h1.start()
	time.Sleep(2 * ttl)
	if syscall.Kill(web.Process.Pid, 0) != nil || isZombie(web.Process.Pid) {
		t.Fatal("the holder died across a quick restart of vmlockd")
	}
	if _, err := h2.acquire(ctx, "early", taker.Process.Pid, disks[0]); !errors.Is(err, lockmgr.ErrBusy) {
		t.Fatalf("h2 after h1's quick restart: %v, want busy", err)
	}
	found := false
	for _, l := range h1.locks() {
		found = found || l.Resource.Name == disks[0] && len(l.Holders) == 1 && l.Holders[0].PID == web.Process.Pid
	}
	if !found {
		t.Fatal("after the quick restart h1 does not show web1's lock")
	}

	// Now vmlockd stays down: its lock-holder must kill web1 before h2 can
	// be granted the disk.
	died := make(chan time.Time, 1)
	go func() { web.Wait(); died <- time.Now() }()
	t0 := time.Now()
	h1.kill9()
	granted, err := h2.waitGrant(ctx, disks[0], taker.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	var tDeath time.Time
	select {
	case tDeath = <-died:
	case <-time.After(5 * time.Second):
		t.Fatalf("web1 still runs %v after h2 was granted its disk", time.Since(granted))
	}
	t.Logf("vmlockd killed at 0: the lock-holder killed web1 at +%v, h2 granted at +%v (TTL %v)",
		tDeath.Sub(t0).Round(time.Millisecond), granted.Sub(t0).Round(time.Millisecond), ttl)
	if !tDeath.Before(granted) {
		t.Fatalf("h2 was granted the disk (+%v) before web1 was killed (+%v)", granted.Sub(t0), tDeath.Sub(t0))
	}
	if ws, ok := web.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("web1 ended with %v, want SIGKILL", web.ProcessState)
	}
	// The restarted vmlockd finds its owner dead and its lease gone, and
	// serves a new session.
	h1.start()
	if ls := h1.locks(); len(ls) != 0 {
		t.Fatalf("h1 after coming back: %+v, want no locks", ls)
	}
	if r := h1.vmlock("run", "--disk", disks[1], "--", "true"); r.code != 0 {
		t.Fatalf("h1 after coming back: exit %d (%s)", r.code, r.stderr)
	}
}

// The safety checker. Writers on three hosts take a random "disk"
// exclusively, append "B token id" to the disk's file, a "W token id" line
// every 20 ms while they hold it (mostly briefly, sometimes for longer than
// the TTL), then "E token id", and release; meanwhile the test kills writers,
// cuts a host off from etcd, kills vmlockds (with and without their
// lock-holders), and stops an etcd member. Afterwards every disk file must
// read as one writer at a time with tokens that never go back: a line with
// a token below one already written (a fenced writer that still wrote), a
// token granted twice, or a line of a writer after another writer began
// (two exclusive holders at once) fails the test.

// Environment of a writer process (the test binary itself, see init).
const (
	envWriter       = "VMLOCK_E2E_WRITER"
	envWriterSocket = "VMLOCK_E2E_WRITER_SOCKET"
	envWriterDisks  = "VMLOCK_E2E_WRITER_DISKS"
	envWriterUntil  = "VMLOCK_E2E_WRITER_UNTIL"
)

func init() {
	if id := os.Getenv(envWriter); id != "" {
		os.Exit(writerMain(id))
	}
}

// writerMain is a writer process: it loops until VMLOCK_E2E_WRITER_UNTIL.
func writerMain(id string) int {
	socket := os.Getenv(envWriterSocket)
	disks := strings.Split(os.Getenv(envWriterDisks), ",")
	n, _ := strconv.ParseInt(os.Getenv(envWriterUntil), 10, 64)
	until := time.Unix(0, n)
	pid := os.Getpid()
	pause := func(max time.Duration) { time.Sleep(time.Duration(mrand.Int64N(int64(max)))) }
	for i := 0; time.Now().Before(until); i++ {
		disk := disks[mrand.IntN(len(disks))]
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := api.Dial(ctx, socket)
		if err != nil {
			cancel()
			pause(100 * time.Millisecond)
			continue
		}
		uuid := newUUIDForTest()
		st, err := c.Acquire(ctx, lockmgr.Object{UUID: uuid, Name: id, PID: pid}, []lockmgr.Resource{lockmgr.DiskResource(disk, lockmgr.Exclusive)}, "")
		cancel()
		if err != nil {
			c.Close()
			pause(40 * time.Millisecond)
			continue
		}
		parsed, err := lockmgr.ParseState(st)
		if err != nil || len(parsed) != 1 {
			fmt.Fprintf(os.Stderr, "writer %s: bad state %q: %v\n", id, st, err)
			return 1
		}
		tok := parsed[0].Token
		f, err := os.OpenFile(disk, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		write := func(kind string) { fmt.Fprintf(f, "%s %d %s.%d\n", kind, tok, id, i) }
		// Mostly short holds; some longer than the TTL, as VMs do.
		hold := time.Duration(50+mrand.IntN(150)) * time.Millisecond
		if mrand.IntN(10) < 3 {
			hold = time.Duration(2000+mrand.IntN(4000)) * time.Millisecond
		}
		write("B")
		for end := time.Now().Add(hold); time.Now().Before(end); {
			time.Sleep(20 * time.Millisecond)
			write("W")
		}
		write("E")
		f.Close()
		released := false
		for end := time.Now().Add(5 * time.Second); !released && time.Now().Before(end); {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			_, err := c.Release(ctx, uuid)
			cancel()
			released = err == nil || errors.Is(err, lockmgr.ErrNotRegistered)
			if !released {
				pause(100 * time.Millisecond)
			}
		}
		c.Close()
		if !released {
			return 0 // our exit releases it, once vmlockd sees it
		}
		pause(30 * time.Millisecond)
	}
	return 0
}

// checkDisk reads one disk file and returns its violations and how many
// grants wrote to it.
func checkDisk(path string) (violations []string, grants int, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	var maxTok uint64
	cur := ""
	for n, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var kind, who string
		var tok uint64
		if _, err := fmt.Sscanf(line, "%s %d %s", &kind, &tok, &who); err != nil {
			return nil, 0, fmt.Errorf("%s line %d %q: %w", path, n+1, line, err)
		}
		switch {
		case tok < maxTok:
			violations = append(violations, fmt.Sprintf("%s line %d %q: token %d written after token %d (a stale holder wrote)", filepath.Base(path), n+1, line, tok, maxTok))
		case kind == "B" && tok == maxTok:
			violations = append(violations, fmt.Sprintf("%s line %d %q: token %d granted twice", filepath.Base(path), n+1, line, tok))
		case kind != "B" && who != cur:
			violations = append(violations, fmt.Sprintf("%s line %d %q: %s wrote while %s held the disk", filepath.Base(path), n+1, line, who, cur))
		}
		if kind == "B" {
			grants++
			cur = who
		}
		maxTok = max(maxTok, tok)
	}
	return violations, grants, nil
}

// writerPool keeps writer processes running on each host until the end.
type writerPool struct {
	t     *testing.T
	exe   string
	disks []string
	until time.Time

	mu    sync.Mutex
	procs map[string]*exec.Cmd // by slot
	wg    sync.WaitGroup
}

func (p *writerPool) run(h *clusterHost, slot string) {
	p.wg.Go(func() {
		for gen := 0; time.Now().Before(p.until); gen++ {
			cmd := exec.Command(p.exe)
			cmd.Env = append(os.Environ(), envWriter+"="+fmt.Sprintf("%s-g%d", slot, gen), envWriterSocket+"="+h.socket,
				envWriterDisks+"="+strings.Join(p.disks, ","), envWriterUntil+"="+strconv.FormatInt(p.until.UnixNano(), 10))
			if err := cmd.Start(); err != nil {
				p.t.Errorf("start writer: %v", err)
				return
			}
			p.mu.Lock()
			p.procs[slot] = cmd
			p.mu.Unlock()
			cmd.Wait()
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// kill SIGKILLs the writers whose slot starts with prefix.
func (p *writerPool) kill(prefix string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for slot, cmd := range p.procs {
		if strings.HasPrefix(slot, prefix) && cmd.Process.Signal(syscall.SIGKILL) == nil {
			n++
		}
	}
	return n
}

func TestEtcdSafetyCheckerUnderFaults(t *testing.T) {
	c := startEtcd(t)
	const ttl, margin = 3 * time.Second, time.Second
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	l1 := newLink(t, c)
	hosts := []*clusterHost{
		startHost(t, "h1", hostConfig{endpoints: l1.endpoints(), ttl: ttl, margin: margin}),
		startHost(t, "h2", hostConfig{endpoints: c.Endpoints(), ttl: ttl, margin: margin}),
		startHost(t, "h3", hostConfig{endpoints: c.Endpoints(), ttl: ttl, margin: margin}),
	}
	dir := t.TempDir()
	disks := []string{filepath.Join(dir, "disk-a"), filepath.Join(dir, "disk-b"), filepath.Join(dir, "disk-c")}
	for _, d := range disks {
		if err := os.WriteFile(d, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	const runFor = 20 * time.Second
	start := time.Now()
	pool := &writerPool{t: t, exe: exe, disks: disks, until: start.Add(runFor), procs: map[string]*exec.Cmd{}}
	for _, h := range hosts {
		for j := range 2 {
			pool.run(h, fmt.Sprintf("%s/w%d", h.name, j))
		}
	}
	// The faults, in order; between them, a random writer crashes now and then.
	type fault struct {
		at   time.Duration
		what string
		do   func()
	}
	faults := []fault{
		{2 * time.Second, "cut h1 off from etcd for 5s", func() { l1.cut(true) }},
		{5 * time.Second, "kill vmlockd of h2, back after 1s", func() { hosts[1].kill9(); time.Sleep(time.Second); hosts[1].start() }},
		{7 * time.Second, "h1 reconnected", func() { l1.cut(false) }},
		{9 * time.Second, "crash host h3 (vmlockd, lock-holder, writers), back after 4s", func() {
			hosts[2].kill9()
			hosts[2].killHolder()
			pool.kill("h3/")
			time.Sleep(4 * time.Second)
			hosts[2].start()
		}},
		{13500 * time.Millisecond, "stop an etcd member", func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if lead, err := c.WaitLeader(ctx); err == nil {
				c.Stop(lead)
			}
		}},
		{14 * time.Second, "kill vmlockd of h1, back after 4s (its lock-holder fences)", func() {
			hosts[0].kill9()
			time.Sleep(4 * time.Second)
			hosts[0].start()
		}},
	}
	crashes := 0
	next := 0
	for tick := time.NewTicker(700 * time.Millisecond); time.Since(start) < runFor; <-tick.C {
		for next < len(faults) && time.Since(start) >= faults[next].at {
			t.Logf("+%v: %s", time.Since(start).Round(100*time.Millisecond), faults[next].what)
			faults[next].do()
			next++
		}
		host := hosts[mrand.IntN(len(hosts))].name
		crashes += pool.kill(fmt.Sprintf("%s/w%d", host, mrand.IntN(2)))
	}
	pool.wg.Wait()

	total := 0
	var all []string
	for _, d := range disks {
		v, grants, err := checkDisk(d)
		if err != nil {
			t.Fatal(err)
		}
		total += grants
		all = append(all, v...)
	}
	fences := 0
	for _, h := range hosts {
		fences += strings.Count(h.out.String(), "fencing: this host's cluster lease")
	}
	t.Logf("%d writing grants on %d disks in %v; %d writer crashes, %d self-fencings by vmlockd", total, len(disks), runFor, crashes, fences)
	if len(all) > 0 {
		if len(all) > 10 {
			all = all[:10]
		}
		t.Fatalf("safety violations:\n%s", strings.Join(all, "\n"))
	}
	if total < 15 {
		t.Fatalf("only %d grants wrote: the run checked too little", total)
	}
	if !hosts[0].fenced() {
		t.Fatal("h1 did not fence itself while it was cut off from etcd")
	}
}

// The checker itself catches what it is for.
func TestEtcdSafetyCheckerFlagsStaleAndOverlappingWriters(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name, log string
		bad       int
	}{
		{"clean", "B 5 a\nW 5 a\nE 5 a\nB 9 b\nW 9 b\nE 9 b\n", 0},
		{"crashed holder, then the next", "B 5 a\nW 5 a\nB 9 b\nW 9 b\nE 9 b\n", 0},
		{"stale holder writes after the next grant", "B 5 a\nB 9 b\nW 5 a\nE 9 b\n", 1},
		{"two holders at once with one token", "B 5 a\nB 5 b\nW 5 a\n", 2},
	}
	for _, c := range cases {
		p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_"))
		if err := os.WriteFile(p, []byte(c.log), 0o644); err != nil {
			t.Fatal(err)
		}
		v, _, err := checkDisk(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(v) != c.bad {
			t.Errorf("%s: %d violations %q, want %d", c.name, len(v), v, c.bad)
		}
	}
}
