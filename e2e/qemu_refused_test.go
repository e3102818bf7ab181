package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
	"github.com/vmlock/vmlock/qemu/qemutest"
)

// QEMU refuses a block job, or to open a copy target, for reasons vmlockd
// cannot see beforehand: QEMU's own image locks (OFD locks on bytes 100
// and up of the file, which vmlock's lock on byte 0 does not meet) held by
// another QEMU process. Then the call fails saying QEMU refused, with
// QEMU's words; every lock vmlockd took for the job is given back; a
// target it did not create is left as it was; no job is left; the guest
// runs on; and the same call succeeds once the other process is gone.
// QEMU's words do not name the image, so vmlockd's do.

// probeRead reports whether an OFD read lock on byte 0 of path can be
// taken right now: whether nobody holds it exclusively.
func probeRead(t *testing.T, path string) bool {
	t.Helper()
	return probe(t, path, unix.F_RDLCK)
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// wantChainBack checks that the VM holds ch exactly as before any job
// (the top exclusive, the backing files shared), as vmlockd's monitor and
// another process's OFD probes see it.
func (d *daemon) wantChainBack(v *vm, ch *vchain) {
	d.t.Helper()
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.top: lockmgr.Exclusive, ch.mid: lockmgr.Shared, ch.base: lockmgr.Shared})
	if probeRead(d.t, ch.top) || !probeRead(d.t, ch.mid) || !probeRead(d.t, ch.base) || probeFree(d.t, ch.base) {
		d.t.Fatalf("OFD probes: top readable %v, mid readable %v, base readable %v, base writable %v; want false, true, true, false",
			probeRead(d.t, ch.top), probeRead(d.t, ch.mid), probeRead(d.t, ch.base), probeFree(d.t, ch.base))
	}
}

// wantNoJob checks that the disk has no block job, neither in vmlockd
// (blockjob, vms, the VM's record) nor in QEMU, and that the guest runs.
func (d *daemon) wantNoJob(v *vm, disk string) {
	d.t.Helper()
	if info := d.jobInfo(v.name, disk); info["phase"] != "none" {
		d.t.Fatalf("blockjob %s %s: %v, want no job", v.name, disk, info)
	}
	if out := d.mustRun("vms", v.name, "-o", "json"); strings.Contains(out, `"job"`) {
		d.t.Fatalf("vms %s shows a job: %s", v.name, out)
	}
	recs, _ := filepath.Glob(filepath.Join(d.stateDir, "qemu", "*.json"))
	for _, p := range recs {
		b, err := os.ReadFile(p)
		if err != nil {
			d.t.Fatal(err)
		}
		var rec struct{ Jobs []any }
		if err := json.Unmarshal(b, &rec); err != nil || len(rec.Jobs) > 0 {
			d.t.Fatalf("record %s: %s (%v), want no job", p, b, err)
		}
	}
	var jobs []any
	if err := v.mon.Execute(qctx(d.t), "query-jobs", nil, &jobs); err != nil || len(jobs) > 0 {
		d.t.Fatalf("QEMU's jobs: %v (%v), want none", jobs, err)
	}
	var st struct{ Status string }
	if err := v.mon.Execute(qctx(d.t), "query-status", nil, &st); err != nil || st.Status != "running" {
		d.t.Fatalf("QEMU: %q, %v; want running", st.Status, err)
	}
}

// wantNoNodeOf checks that QEMU has no block node on file p.
func (v *vm) wantNoNodeOf(p string) {
	v.t.Helper()
	var nodes []struct {
		Name string `json:"node-name"`
		File string `json:"file"`
	}
	if err := v.mon.Execute(qctx(v.t), "query-named-block-nodes", map[string]bool{"flat": true}, &nodes); err != nil {
		v.t.Fatal(err)
	}
	for _, n := range nodes {
		if n.File == p {
			v.t.Fatalf("QEMU still has node %s on %s", n.Name, p)
		}
	}
}

// A commit whose base another process reads with QEMU's image locking
// (qemu-io -r: it does not share writing) is refused by QEMU, which
// cannot get the base's "write" lock, although vmlockd could lock the base
// exclusively. The base is shared again.
func TestQEMUCommitQEMURefusesGivesTheBaseBack(t *testing.T) {
	needQEMU(t)
	d := startDaemon(t)
	ch := makeVChain(t)
	v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
	reader := qemutest.HoldOpen(t, ch.base, "-r")
	r := d.vmlock("blockcommit", "vm1", "drive0", "--active")
	if r.code == 0 || !strings.Contains(r.stderr, "QEMU refused the job, a commit of disk drive0 into "+ch.base+": ") || !strings.Contains(r.stderr, `Failed to get "write" lock`) {
		t.Fatalf("blockcommit while another process reads the base: exit %d, stderr %q; want QEMU's refusal in its words, naming the base", r.code, r.stderr)
	}
	d.wantChainBack(v, ch)
	d.wantNoJob(v, "drive0")

	reader()
	mustContain(t, "blockcommit --pivot", d.mustRun("blockcommit", "vm1", "drive0", "--active", "--pivot"), "Successfully pivoted")
	d.wantLocks(v.pid(), map[string]lockmgr.Mode{ch.base: lockmgr.Exclusive})
	v.quit()
	checkMerged(t, ch.base)
}

// A copy into an existing image that another process holds with QEMU's
// image locking is refused by QEMU: with qemu-io it cannot open the target;
// with qemu-io -r -U (force-share: it takes QEMU's "consistent read" lock,
// but shares everything) the target opens, but QEMU refuses the mirror job,
// which must not share consistent reads of its target. Either way the
// target, which vmlockd did not create, is removed from QEMU, left as it
// was, and unlocked.
func TestQEMUBlockCopyIntoAnImageAnotherQEMUProcessHoldsLeavesItAlone(t *testing.T) {
	needQEMU(t)
	cases := []struct {
		name       string
		qemuIOOpts []string
		refusal    string // vmlockd's words, naming the target
		qemuWords  string
	}{
		{"target open elsewhere: QEMU cannot open it", nil, "QEMU cannot open the copy target ", `Failed to get "write" lock`},
		{"target read elsewhere with force-share: QEMU refuses the job", []string{"-r", "-U"},
			"QEMU refused the job, a copy of disk drive0 into ", `Failed to get shared "consistent read" lock`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := startDaemon(t)
			ch := makeVChain(t)
			dest := filepath.Join(ch.dir, "copy.qcow2")
			runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", dest, "4M")
			v := d.startVM("vm1", ch.dir, driveArg(ch.top)...)
			before := fileSum(t, dest)
			other := qemutest.HoldOpen(t, dest, c.qemuIOOpts...)
			r := d.vmlock("blockcopy", "vm1", "drive0", dest, "--reuse-external")
			if r.code == 0 || !strings.Contains(r.stderr, c.refusal+dest+": ") || !strings.Contains(r.stderr, c.qemuWords) {
				t.Fatalf("blockcopy into an image another process holds: exit %d, stderr %q; want QEMU's refusal in its words, naming the target", r.code, r.stderr)
			}
			d.wantChainBack(v, ch)
			if !probeFree(t, dest) {
				t.Fatalf("%s is still locked after the refused copy", dest)
			}
			d.wantNoJob(v, "drive0")
			v.wantNoNodeOf(dest)
			other()
			if fileSum(t, dest) != before {
				t.Fatalf("the refused copy changed %s, which vmlockd did not create", dest)
			}

			mustContain(t, "blockcopy --pivot", d.mustRun("blockcopy", "vm1", "drive0", dest, "--reuse-external", "--pivot"), "Successfully pivoted")
			d.wantLocks(v.pid(), map[string]lockmgr.Mode{dest: lockmgr.Exclusive})
			v.quit()
			checkMerged(t, dest)
		})
	}
}
