package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/lockmgr"
)

// The libvirt tests run real libvirtd (Debian's, with its QEMU driver) with
// lock_manager = "lockd", talking to vmlockd's libvirt endpoint in
// virtlockd's place, and real QEMU guests (TCG, no guest OS).
//
// libvirtd runs in a private mount namespace (unshare -m) in which
// /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
// /var/cache/libvirt are bind mounts of the test's own directories, and
// /etc/passwd and /etc/group copies that have the libvirt-qemu user libvirtd
// insists on. The host's libvirt directories are not touched (they are only
// created, empty, as mount points if missing). vmlockd and the test stay in
// the host's namespace: vmlockd listens on TEST/run/virtlockd-sock, which
// libvirtd sees as /run/libvirt/virtlockd-sock, and virsh connects to
// TEST/run/libvirt-sock.
//
// qemu-lockd.conf sets file_lockspace_dir, so each disk's lease is a file
// named by the SHA-256 of its path in a lockspace directory. That is also
// how a test shows that a refusal is vmlockd's and not QEMU's own image
// lock: after the first domain started, the test puts a new file at the
// disk's path; a second domain naming that path opens the new file (QEMU
// does not object) but needs the same lease, which vmlockd refuses.

// libvirtEnv is libvirtd and vmlockd, started once for all libvirt tests.
type libvirtEnv struct {
	t        *testing.T
	dir      string // everything of this environment
	run      string // /run/libvirt inside the namespace
	leases   string // qemu-lockd.conf's file_lockspace_dir
	images   string
	uri      string
	d        *daemon
	libvirtd *exec.Cmd
	exited   chan struct{} // closed when libvirtd has exited
	logBuf   *bytes.Buffer
}

// needLibvirt skips the test when libvirtd, virsh, QEMU or unshare are
// missing, or when not running as root (libvirtd's system mode); under
// CI=true it fails instead.
func needLibvirt(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"libvirtd", "virsh", "qemu-system-x86_64", "unshare", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err := os.Stat(filepath.Join("/usr/sbin", tool)); err == nil {
				continue
			}
			if os.Getenv("CI") == "true" {
				t.Fatalf("CI=true but %s is not installed (Debian packages libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 util-linux, see scripts/debian-packages.txt): %v", tool, err)
			}
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("CI=true but not root: the libvirt tests run libvirtd in system mode")
		}
		t.Skip("the libvirt tests need root (libvirtd in system mode, mount namespaces)")
	}
}

// startLibvirt starts vmlockd with its libvirt endpoint, then libvirtd in a
// private mount namespace. Both stop when t ends (every domain is destroyed
// first).
func startLibvirt(t *testing.T) *libvirtEnv {
	t.Helper()
	needLibvirt(t)
	dir, err := os.MkdirTemp("", "vmlock-libvirt-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	e := &libvirtEnv{t: t, dir: dir, run: filepath.Join(dir, "run"), leases: filepath.Join(dir, "leases"),
		images: filepath.Join(dir, "images"), logBuf: &bytes.Buffer{}}
	e.uri = "qemu+unix:///system?socket=" + filepath.Join(e.run, "libvirt-sock")
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, sub := range []string{"etc", "run", "lib", "log/qemu", "cache", "images"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The spec's settings for running libvirtd without systemd, cgroups or
	// a security driver, with the lockd plugin.
	write("etc/qemu.conf", `lock_manager = "lockd"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
user = "root"
group = "root"
stdio_handler = "file"
`)
	write("etc/qemu-lockd.conf", fmt.Sprintf("file_lockspace_dir = %q\n", e.leases))
	write("etc/libvirtd.conf", fmt.Sprintf("log_outputs = \"3:file:%s\"\n", filepath.Join(dir, "libvirtd.log")))
	for _, f := range []string{"passwd", "group"} {
		b, err := os.ReadFile("/etc/" + f)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte("\nlibvirt-qemu:")) && !bytes.HasPrefix(b, []byte("libvirt-qemu:")) {
			if f == "passwd" {
				b = append(b, "libvirt-qemu:x:64055:64055:Libvirt Qemu:/nonexistent:/usr/sbin/nologin\n"...)
			} else {
				b = append(b, "libvirt-qemu:x:64055:\n"...)
			}
		}
		write(f, string(b))
	}

	// vmlockd first: libvirtd's plugin sends CREATE_LOCKSPACE when it starts.
	e.d = startDaemon(t, "--libvirt-socket", filepath.Join(e.run, "virtlockd-sock"))

	mounts := [][2]string{
		{"etc", "/etc/libvirt"}, {"run", "/run/libvirt"}, {"lib", "/var/lib/libvirt"},
		{"log", "/var/log/libvirt"}, {"cache", "/var/cache/libvirt"},
		{"passwd", "/etc/passwd"}, {"group", "/etc/group"},
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	for _, m := range mounts {
		if strings.HasPrefix(m[1], "/etc/passwd") || strings.HasPrefix(m[1], "/etc/group") {
			// files: always there
		} else if err := os.MkdirAll(m[1], 0o755); err != nil { // an empty mount point
			t.Fatal(err)
		}
		fmt.Fprintf(&script, "mount --bind %q %q\n", filepath.Join(dir, m[0]), m[1])
	}
	script.WriteString("exec libvirtd\n")
	e.libvirtd = exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", script.String())
	e.libvirtd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
	e.libvirtd.Stdout, e.libvirtd.Stderr = e.logBuf, e.logBuf
	if err := e.libvirtd.Start(); err != nil {
		t.Fatal(err)
	}
	e.exited = make(chan struct{})
	go func() { e.libvirtd.Wait(); close(e.exited) }()
	t.Cleanup(e.stop)
	t0 := time.Now()
	for {
		if _, _, err := e.virsh("list"); err == nil {
			break
		}
		select {
		case <-e.exited:
			t.Fatalf("libvirtd exited; output:\n%s\nlog:\n%s", e.logBuf, e.file("libvirtd.log"))
		default:
		}
		if time.Since(t0) > 60*time.Second {
			t.Fatalf("libvirtd did not start; output:\n%s\nlog:\n%s", e.logBuf, e.file("libvirtd.log"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("libvirtd ready after %v", time.Since(t0).Round(time.Millisecond))
	return e
}

func (e *libvirtEnv) file(name string) string {
	b, _ := os.ReadFile(filepath.Join(e.dir, name))
	return string(b)
}

// stop destroys every domain, then stops libvirtd; QEMUs that survive
// (libvirtd could not destroy them) are killed through their pid files.
func (e *libvirtEnv) stop() {
	if out, _, err := e.virsh("list", "--name"); err == nil {
		for _, name := range strings.Fields(out) {
			e.virsh("destroy", name)
		}
	}
	e.libvirtd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.exited:
	case <-time.After(15 * time.Second):
		e.libvirtd.Process.Kill()
		<-e.exited
	}
	pids, _ := filepath.Glob(filepath.Join(e.run, "qemu", "*.pid"))
	for _, p := range pids {
		if b, err := os.ReadFile(p); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if e.t.Failed() {
		e.t.Logf("libvirtd output:\n%s\nlibvirtd.log:\n%s", e.logBuf, e.file("libvirtd.log"))
	}
}

// virsh runs virsh against the test's libvirtd.
func (e *libvirtEnv) virsh(args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-c", e.uri}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

// mustVirsh runs virsh and fails the test if it fails.
func (e *libvirtEnv) mustVirsh(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, err := e.virsh(args...)
	if err != nil {
		t.Fatalf("virsh %s: %v\n%s%s", strings.Join(args, " "), err, out, errs)
	}
	return out
}

// disk is a disk of a test domain.
type disk struct {
	path      string
	target    string // vda, vdb, ...
	readonly  bool
	shareable bool
}

// domain is a transient test domain.
type domain struct {
	name, uuid string
	disks      []disk
}

// newImage makes a 1 MiB raw image.
func (e *libvirtEnv) newImage(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(e.images, name)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	return p
}

// replaceImage puts a new file at path, so that a second QEMU opening path
// gets no conflict with the first one's image locks (see the top comment).
func (e *libvirtEnv) replaceImage(t *testing.T, path string) {
	t.Helper()
	if err := os.Rename(path, path+".replaced"); err != nil {
		t.Fatal(err)
	}
	e.newImage(t, filepath.Base(path))
}

func newDomain(name string, disks ...disk) *domain {
	var u [16]byte
	rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return &domain{name: name, disks: disks,
		uuid: fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])}
}

// xml is the domain's definition: no guest OS, TCG, 64 MiB, its disks on
// virtio, and a virtio-scsi controller and ACPI for hotplug.
func (dom *domain) xml() string {
	var b strings.Builder
	fmt.Fprintf(&b, `<domain type='qemu'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
`, dom.name, dom.uuid)
	for _, d := range dom.disks {
		fmt.Fprintf(&b, "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='%s'/>\n      <target dev='%s' bus='virtio'/>\n", d.path, d.target)
		if d.readonly {
			b.WriteString("      <readonly/>\n")
		}
		if d.shareable {
			b.WriteString("      <shareable/>\n")
		}
		b.WriteString("    </disk>\n")
	}
	b.WriteString(`    <controller type='scsi' model='virtio-scsi'/>
    <serial type='null'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
`)
	return b.String()
}

// create starts dom (virsh create) and returns virsh's error and stderr.
func (e *libvirtEnv) create(t *testing.T, dom *domain) (string, error) {
	t.Helper()
	p := filepath.Join(e.dir, dom.name+".xml")
	if err := os.WriteFile(p, []byte(dom.xml()), 0o644); err != nil {
		t.Fatal(err)
	}
	_, errs, err := e.virsh("create", p)
	return errs, err
}

// start starts dom and returns its QEMU's pid; the domain is destroyed
// when t ends.
func (e *libvirtEnv) start(t *testing.T, dom *domain) int {
	t.Helper()
	t0 := time.Now()
	if errs, err := e.create(t, dom); err != nil {
		t.Fatalf("virsh create %s: %v\n%s\nqemu log:\n%s", dom.name, err, errs, e.file("log/qemu/"+dom.name+".log"))
	}
	t.Logf("domain %s started in %v", dom.name, time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() { e.virsh("destroy", dom.name) })
	return e.qemuPID(t, dom)
}

func (e *libvirtEnv) qemuPID(t *testing.T, dom *domain) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.run, "qemu", dom.name+".pid"))
	if err != nil {
		t.Fatalf("pid of %s: %v", dom.name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// running reports whether libvirt lists dom as running.
func (e *libvirtEnv) running(t *testing.T, dom *domain) bool {
	t.Helper()
	out, _, err := e.virsh("domstate", dom.name)
	return err == nil && strings.TrimSpace(out) == "running"
}

// lease returns the name of the lease libvirt takes for a disk path: the
// lowercase hex SHA-256 of the path as written in the domain XML.
func lease(path string) string {
	sum := sha256.Sum256([]byte(path))
	return hex.EncodeToString(sum[:])
}

// leaseLock returns the lock monitor's entry of path's lease, if held.
func (e *libvirtEnv) leaseLock(t *testing.T, path string) (api.Lock, bool) {
	t.Helper()
	for _, l := range e.d.locks() {
		if l.Resource.Type == lockmgr.TypeLease && strings.HasSuffix(l.Resource.Name, "/"+lease(path)) {
			return l, true
		}
	}
	return api.Lock{}, false
}

// wantHeldBy fails unless path's lease is held by exactly the domains
// given, with their QEMU pids.
func (e *libvirtEnv) wantHeldBy(t *testing.T, path string, mode lockmgr.Mode, doms []*domain, pids []int) {
	t.Helper()
	l, ok := e.leaseLock(t, path)
	if !ok {
		if len(doms) == 0 {
			return
		}
		t.Fatalf("the lease of %s is not held; want it held by %s", path, doms[0].name)
	}
	if len(l.Holders) != len(doms) {
		t.Fatalf("the lease of %s has holders %+v; want %d", path, l.Holders, len(doms))
	}
	for i, dom := range doms {
		found := false
		for _, h := range l.Holders {
			if h.UUID == dom.uuid {
				found = true
				if h.Name != dom.name || h.PID != pids[i] || h.Mode != mode {
					t.Fatalf("holder of %s = %+v; want %s (uuid %s, pid %d, %s)", path, h, dom.name, dom.uuid, pids[i], mode)
				}
			}
		}
		if !found {
			t.Fatalf("the lease of %s has holders %+v; want %s among them", path, l.Holders, dom.name)
		}
	}
}

// waitLeaseFree polls until nothing holds path's lease and returns how
// long it took; the bound is generous: timing is logged, not asserted.
func (e *libvirtEnv) waitLeaseFree(t *testing.T, path string) time.Duration {
	t.Helper()
	t0 := time.Now()
	for time.Since(t0) < 20*time.Second {
		if _, held := e.leaseLock(t, path); !held {
			return time.Since(t0)
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("the lease of %s is still held after 20 s", path)
	return 0
}

// waitLeaseFileGone polls until the lease file of path is gone: vmlockd
// removes the files it auto-created with their last holder.
func (e *libvirtEnv) waitLeaseFileGone(t *testing.T, path string) {
	t.Helper()
	file := filepath.Join(e.leases, lease(path))
	for t0 := time.Now(); time.Since(t0) < 20*time.Second; time.Sleep(2 * time.Millisecond) {
		if _, err := os.Stat(file); os.IsNotExist(err) {
			return
		}
	}
	t.Fatalf("the lease file of %s is still there after 20 s", path)
}

// wantVmlockdRefusal fails unless a virsh error is vmlockd's busy refusal
// naming the holder.
func wantVmlockdRefusal(t *testing.T, stderr string, err error, holder *domain, pid int) {
	t.Helper()
	if err == nil {
		t.Fatalf("virsh succeeded; want vmlockd's refusal naming %s", holder.name)
	}
	t.Logf("refused as wanted: %s", strings.TrimSpace(stderr))
	mustContain(t, "virsh's error", stderr, "resource busy", "is locked exclusively by vm",
		fmt.Sprintf("%q", holder.name), "uuid "+holder.uuid, "pid "+strconv.Itoa(pid))
}

func TestLibvirt(t *testing.T) {
	e := startLibvirt(t)

	t.Run("StartHoldsTheDiskAndRefusesASecondDomain", func(t *testing.T) {
		img := e.newImage(t, "a.img")
		a := newDomain("lv-a", disk{path: img, target: "vda"})
		pid := e.start(t, a)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})
		// The monitor's table names the domain too.
		r := e.d.vmlock("locks")
		if r.code != 0 {
			t.Fatalf("vmlock locks: %d %s", r.code, r.stderr)
		}
		mustContain(t, "vmlock locks", r.stdout, lease(img), a.name, a.uuid, strconv.Itoa(pid))
		t.Logf("vmlock locks:\n%s", r.stdout)

		e.replaceImage(t, img)
		b := newDomain("lv-b", disk{path: img, target: "vda"})
		errs, err := e.create(t, b)
		wantVmlockdRefusal(t, errs, err, a, pid)
		if e.running(t, b) {
			t.Fatal("the second domain runs")
		}
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})
		if !e.running(t, a) {
			t.Fatal("the first domain stopped")
		}
	})

	t.Run("HotplugOfALockedDiskIsRefusedAndLeavesNothingLocked", func(t *testing.T) {
		img := e.newImage(t, "hot.img")
		a := newDomain("lv-hot-a", disk{path: img, target: "vda"})
		pidA := e.start(t, a)
		own := e.newImage(t, "hot-h.img")
		h := newDomain("lv-hot-h", disk{path: own, target: "vda"})
		pidH := e.start(t, h)
		e.replaceImage(t, img)
		_, errs, err := e.virsh("attach-disk", h.name, img, "sdb", "--targetbus", "scsi", "--live")
		wantVmlockdRefusal(t, errs, err, a, pidA)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pidA})
		e.wantHeldBy(t, own, lockmgr.Exclusive, []*domain{h}, []int{pidH})
		for _, l := range e.d.locks() {
			for _, hd := range l.Holders {
				if hd.UUID == h.uuid && !strings.HasSuffix(l.Resource.Name, "/"+lease(own)) {
					t.Fatalf("the refused hotplug left %s locked by %s", l.Resource, h.name)
				}
			}
		}
		if !e.running(t, h) {
			t.Fatal("the domain whose hotplug was refused stopped")
		}
		// A free disk hotplugs, and is locked.
		free := e.newImage(t, "hot-free.img")
		e.mustVirsh(t, "attach-disk", h.name, free, "sdc", "--targetbus", "scsi", "--live")
		e.wantHeldBy(t, free, lockmgr.Exclusive, []*domain{h}, []int{pidH})
	})

	t.Run("DestroyAndKill9OfQEMUFreeTheLock", func(t *testing.T) {
		img := e.newImage(t, "d.img")
		a := newDomain("lv-destroy", disk{path: img, target: "vda"})
		pid := e.start(t, a)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})
		t0 := time.Now()
		e.mustVirsh(t, "destroy", a.name)
		took := e.waitLeaseFree(t, img)
		t.Logf("virsh destroy: lease free %v after destroy returned (%v after it was called)", took.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))

		b := newDomain("lv-kill9", disk{path: img, target: "vda"})
		pid = e.start(t, b)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{b}, []int{pid})
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		took = e.waitLeaseFree(t, img)
		t.Logf("kill -9 of QEMU: lease free after %v", took.Round(time.Millisecond))
	})

	t.Run("SuspendFreesResumeRetakes", func(t *testing.T) {
		img := e.newImage(t, "s.img")
		a := newDomain("lv-suspend", disk{path: img, target: "vda"})
		pid := e.start(t, a)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})
		e.mustVirsh(t, "suspend", a.name)
		if _, held := e.leaseLock(t, img); held {
			t.Fatal("a suspended domain still holds its disk")
		}
		e.mustVirsh(t, "resume", a.name)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})
	})

	t.Run("ReadonlyDiskTakesNoLock", func(t *testing.T) {
		rw := e.newImage(t, "r-rw.img")
		ro := e.newImage(t, "r-ro.img")
		a := newDomain("lv-readonly", disk{path: rw, target: "vda"}, disk{path: ro, target: "vdb", readonly: true})
		pid := e.start(t, a)
		e.wantHeldBy(t, rw, lockmgr.Exclusive, []*domain{a}, []int{pid})
		if l, held := e.leaseLock(t, ro); held {
			t.Fatalf("the read-only disk is locked: %+v", l)
		}
		if _, err := os.Stat(filepath.Join(e.leases, lease(ro))); err == nil {
			t.Fatal("a lease file exists for the read-only disk")
		}
	})

	t.Run("ShareableRawDisksRunTogether", func(t *testing.T) {
		img := e.newImage(t, "sh.img")
		a := newDomain("lv-share-a", disk{path: img, target: "vda", shareable: true})
		b := newDomain("lv-share-b", disk{path: img, target: "vda", shareable: true})
		pidA := e.start(t, a)
		pidB := e.start(t, b)
		e.wantHeldBy(t, img, lockmgr.Shared, []*domain{a, b}, []int{pidA, pidB})
		if !e.running(t, a) || !e.running(t, b) {
			t.Fatal("both domains should run")
		}
	})

	t.Run("ReloadKeepsTheLibvirtSocketAndTheLocks", func(t *testing.T) {
		img := e.newImage(t, "rl.img")
		a := newDomain("lv-reload", disk{path: img, target: "vda"})
		pid := e.start(t, a)
		sock := filepath.Join(e.run, "virtlockd-sock")
		before, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if r := e.d.vmlock("daemon", "reload"); r.code != 0 {
			t.Fatalf("vmlock daemon reload: exit %d: %s", r.code, r.stderr)
		}
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})
		if after, err := os.Stat(sock); err != nil || !os.SameFile(before, after) {
			t.Fatalf("the libvirt socket was re-created by the reload (%v), not inherited", err)
		}
		// The socket libvirtd uses was handed over: a new domain locks.
		img2 := e.newImage(t, "rl2.img")
		b := newDomain("lv-reload-b", disk{path: img2, target: "vda"})
		pidB := e.start(t, b)
		e.wantHeldBy(t, img2, lockmgr.Exclusive, []*domain{b}, []int{pidB})
		// QEMU's connection closed with the old image: pid tracking frees.
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		took := e.waitLeaseFree(t, img)
		t.Logf("kill -9 of QEMU after a reload: lease free after %v", took.Round(time.Millisecond))
		e.waitLeaseFileGone(t, img)
	})

	t.Run("Kill9OfVmlockdKeepsTheRunningDomainsLock", func(t *testing.T) {
		img := e.newImage(t, "k.img")
		a := newDomain("lv-survivor", disk{path: img, target: "vda"})
		pid := e.start(t, a)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})

		e.d.kill9()
		e.d.start()
		if !e.running(t, a) {
			t.Fatal("the domain died with vmlockd")
		}
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{a}, []int{pid})

		e.replaceImage(t, img)
		b := newDomain("lv-usurper", disk{path: img, target: "vda"})
		errs, err := e.create(t, b)
		wantVmlockdRefusal(t, errs, err, a, pid)
		if e.running(t, b) {
			t.Fatal("the second domain runs")
		}

		// QEMU's lock connection died with the old vmlockd: the restarted
		// one frees the lock through its pid tracking.
		e.mustVirsh(t, "destroy", a.name)
		took := e.waitLeaseFree(t, img)
		t.Logf("destroy after a vmlockd restart: lease free after %v", took.Round(time.Millisecond))
		// The lease file it auto-created before the restart goes with it.
		e.waitLeaseFileGone(t, img)
		// And the disk can be used again.
		c := newDomain("lv-after", disk{path: img, target: "vda"})
		pidC := e.start(t, c)
		e.wantHeldBy(t, img, lockmgr.Exclusive, []*domain{c}, []int{pidC})
	})
}
