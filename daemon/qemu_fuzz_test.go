package daemon

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/lockmgr"
)

// A VM's record (STATE_DIR/qemu/<uuid>.json) is read back at every start
// of vmlockd, whatever a crash, a full disk or another version of vmlockd
// left in the file. decodeVMRecord never panics, accepts only what
// re-attaching relies on (a VM's uuid, its QEMU's pid, the absolute path
// of a unix socket, canonical image paths, jobs vmlockd can follow: one a
// disk, each with its id, a known type and canonical paths), and whatever
// it accepts is saved and read back unchanged.
func FuzzVMRecord(f *testing.F) {
	rec := vmRecord{UUID: "5e550000-0000-4000-8000-000000000001", PID: 4242, Monitor: "/var/lib/vmlock/qemu/5e550000-0000-4000-8000-000000000001.qmp",
		Resume: true, Verified: true, Managed: []string{"/img/base.qcow2", "/img/data.raw", "/img/top.qcow2"}, Seq: 3,
		Jobs: []jobRecord{
			{Disk: "drive0", ID: "vmlock-commit-drive0-1", Type: jobActiveCommit, Top: "/img/top.qcow2", Base: "/img/base.qcow2", Delete: []string{"/img/top.qcow2"}},
			{Disk: "drive1", Asked: "/img/b.qcow2", ID: "vmlock-copy-drive1-3", Type: jobCopy, Top: "/img/b.qcow2", Target: "/img/copy.qcow2", TargetNode: "vmlock-target-2", UID: 1000},
			{Disk: "exp0", ID: "mine", Type: jobStream, Top: "/img/c.qcow2", Foreign: true},
		}}
	b, err := json.Marshal(rec)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{"uuid":"5e550000-0000-4000-8000-000000000001","pid":7,"monitor":"/run/m.qmp","managed":null,"seq":0}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := decodeVMRecord(b)
		if err != nil {
			return
		}
		if why := unreliable(rec); why != "" {
			t.Fatalf("decodeVMRecord(%q) accepted a record whose %s", b, why)
		}
		saved, err := json.Marshal(rec)
		if err != nil {
			t.Fatalf("the record decoded from %q does not save: %v", b, err)
		}
		again, err := decodeVMRecord(saved)
		if err != nil {
			t.Fatalf("the record decoded from %q saves as %q, which does not decode: %v", b, saved, err)
		}
		if resaved, _ := json.Marshal(again); !bytes.Equal(resaved, saved) {
			t.Fatalf("the record decoded from %q saves as %q, which reads back as %q", b, saved, resaved)
		}
	})
}

// unreliable says what in rec re-attaching cannot rely on, or "".
func unreliable(rec vmRecord) string {
	canonical := func(p string) bool {
		return filepath.IsAbs(p) && filepath.Clean(p) == p && !strings.ContainsRune(p, 0)
	}
	if u, err := lockmgr.ParseUUID(rec.UUID); err != nil || u != rec.UUID {
		return "uuid is not a uuid in canonical form"
	}
	if rec.PID <= 0 {
		return "pid is not a process id"
	}
	if !filepath.IsAbs(rec.Monitor) || len(rec.Monitor) > maxSocketPath || strings.ContainsRune(rec.Monitor, 0) {
		return "monitor is not the absolute path of a unix socket"
	}
	if slices.ContainsFunc(rec.Managed, func(p string) bool { return !canonical(p) }) {
		return "managed images are not all canonical paths"
	}
	if rec.Seq < 0 {
		return "seq is negative"
	}
	disks, ids := map[string]bool{}, map[string]bool{}
	for _, j := range rec.Jobs {
		switch {
		case j.Disk == "" || disks[j.Disk]:
			return "jobs lack a disk, or two are on one disk"
		case j.ID == "" || ids[j.ID]:
			return "jobs lack an id, or two have one id"
		case !slices.Contains([]string{jobCommit, jobActiveCommit, jobCopy, jobBackup, jobStream}, j.Type):
			return "job " + j.ID + " is of an unknown type"
		case j.UID < 0:
			return "job " + j.ID + " has a negative uid"
		}
		for _, p := range append([]string{j.Top, j.Base, j.Target}, j.Delete...) {
			if p != "" && !canonical(p) || p == "" && slices.Contains(j.Delete, p) {
				return "job " + j.ID + " names an image by a path that is not canonical"
			}
		}
		disks[j.Disk], ids[j.ID] = true, true
	}
	return ""
}
