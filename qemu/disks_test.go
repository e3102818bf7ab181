package qemu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

func imagePaths(d Disk) []string {
	var out []string
	for _, img := range d.Images {
		out = append(out, img.Path)
	}
	return out
}

func TestDisks(t *testing.T) {
	ch := makeChain(t)
	ro := filepath.Join(ch.dir, "ro.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", ro, "1M")
	c, _ := startQEMU(t,
		"-drive", "if=none,id=drive0,format=qcow2,file="+ch.top,
		"-drive", "if=none,id=cd0,format=qcow2,readonly=on,file="+ro)
	ctx := testCtx(t)
	disks, err := Disks(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]Disk{}
	for _, d := range disks {
		byName[d.Name] = d
	}
	d0, cd := byName["drive0"], byName["cd0"]
	if len(disks) != 2 || d0.Device != "drive0" || cd.Device != "cd0" {
		t.Fatalf("disks %+v", disks)
	}
	if got := imagePaths(d0); !slices.Equal(got, []string{ch.top, ch.mid, ch.base}) || d0.ReadOnly || d0.ShareRW {
		t.Fatalf("drive0: chain %q read-only %v share-rw %v", got, d0.ReadOnly, d0.ShareRW)
	}
	if d0.Images[0].Size != imageSize || d0.Images[0].Format != "qcow2" || !d0.Images[1].ReadOnly {
		t.Fatalf("drive0's images %+v", d0.Images)
	}
	if !cd.ReadOnly || !slices.Equal(imagePaths(cd), []string{ro}) {
		t.Fatalf("cd0 %+v", cd)
	}

	// During an active commit the job's filter is the root; the disk and
	// its images stay the same.
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "j", Device: d0.Root, Speed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	disks, err = Disks(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	d := disks[slices.IndexFunc(disks, func(d Disk) bool { return d.Name == "drive0" })]
	if d.Root == d0.Root || d.Node != d0.Node || !slices.Equal(imagePaths(d), imagePaths(d0)) {
		t.Fatalf("during the job: root %s node %s images %q", d.Root, d.Node, imagePaths(d))
	}
}

func TestDisksShareRW(t *testing.T) {
	ch := makeChain(t)
	// A machine with a PCI bus, never started (-S): only its devices matter.
	c, _ := startQEMU(t, "-machine", "pc", "-S",
		"-drive", "if=none,id=drive0,format=qcow2,file="+ch.top,
		"-device", "virtio-blk-pci,drive=drive0,id=vd0,share-rw=on")
	disks, err := Disks(testCtx(t), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(disks) != 1 || !disks[0].ShareRW || disks[0].QDev == "" {
		t.Fatalf("disks %+v", disks)
	}
}

func TestBackingChain(t *testing.T) {
	ch := makeChain(t)
	ctx := testCtx(t)
	chain, err := BackingChain(ctx, nil, ch.top, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, img := range chain {
		files = append(files, img.Filename)
	}
	if !slices.Equal(files, []string{ch.top, ch.mid, ch.base}) || chain[0].Format != "qcow2" {
		t.Fatalf("chain %q", files)
	}
	if _, err := BackingChain(ctx, nil, filepath.Join(ch.dir, "missing.qcow2"), ""); !errors.Is(err, ErrImage) {
		t.Fatalf("chain of a missing image: %v", err)
	}
	// A forced format is not probed: a qcow2 read as raw has no backing.
	chain, err = BackingChain(ctx, nil, ch.top, "raw")
	if err != nil || len(chain) != 1 || chain[0].Format != "raw" {
		t.Fatalf("top read as raw: %+v %v", chain, err)
	}
}

// Read with a user's identity, the chain reaches only files that user may
// open: a backing file named in the user's image header but readable only
// by root is not read (and not opened) on the user's behalf.
func TestBackingChainReadsWithTheGivenIdentity(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to read as another uid")
	}
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} { // t.TempDir makes both 0700
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	secret, top := filepath.Join(dir, "secret.raw"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "raw", secret, "1M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", top)
	if err := os.Chmod(secret, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(top, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	_, err := BackingChain(testCtx(t), nobody, top, "")
	if !errors.Is(err, ErrImage) || !strings.Contains(err.Error(), "ermission denied") {
		t.Fatalf("nobody's chain through root's file: %v, want a permission error", err)
	}
	if chain, err := BackingChain(testCtx(t), nil, top, ""); err != nil || len(chain) != 2 {
		t.Fatalf("root's chain: %+v, %v", chain, err)
	}
}

// A qcow2 image with an external data file keeps the guest's data there:
// Disks names that file next to the image, in the backing chain too, and
// BackingChain reads it from the headers.
func TestDisksNameTheDataFileOfAQcow2Image(t *testing.T) {
	dir := t.TempDir()
	data, img := filepath.Join(dir, "data.raw"), filepath.Join(dir, "img.qcow2")
	data2, base, top := filepath.Join(dir, "data2.raw"), filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data, img, "1M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data2, base, "1M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	chain, err := BackingChain(testCtx(t), nil, top, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].DataFile() != "" || chain[1].DataFile() != data2 {
		t.Fatalf("qemu-img's chain: %+v", chain)
	}

	c, _ := startQEMU(t, "-drive", "if=none,id=drive0,format=qcow2,file="+img, "-drive", "if=none,id=drive1,format=qcow2,file="+top)
	ctx := testCtx(t)
	disks, err := Disks(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]string{}
	for _, d := range disks {
		for _, im := range d.Images {
			files[d.Name] = append(files[d.Name], im.Path+"+"+im.DataFile)
		}
	}
	want := map[string][]string{"drive0": {img + "+" + data}, "drive1": {top + "+", base + "+" + data2}}
	if fmt.Sprint(files) != fmt.Sprint(want) {
		t.Fatalf("disks' files (image+data file):\n got %v\nwant %v", files, want)
	}

	// Where QEMU's graph is not exact, the image's header tells.
	g, err := QueryGraph(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	ig := &Graph{Nodes: map[string]*Node{}}
	for name, n := range g.Nodes {
		ig.Nodes[name] = &Node{NodeInfo: n.NodeInfo}
	}
	ig.infer()
	node := disks[slices.IndexFunc(disks, func(d Disk) bool { return d.Name == "drive0" })].Node
	if p, df, err := ig.files(ig.Nodes[node]); p != img || df != data || err != nil {
		t.Fatalf("inferred graph: image %q data file %q (%v); want %q, %q", p, df, err, img, data)
	}
}

// A disk is unused when nothing but a block job uses its root: a bare
// -blockdev or blockdev-add node. A -drive's backend or a block export
// uses its disk. A pivot on an unused disk would replace nothing.
func TestDisksTellWhetherAnythingUsesTheRoot(t *testing.T) {
	ch := makeChain(t)
	drv, exp := filepath.Join(ch.dir, "drv.qcow2"), filepath.Join(ch.dir, "exp.qcow2")
	for _, p := range []string{drv, exp} {
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
	}
	c, _ := startQEMU(t, "-drive", "if=none,id=drive0,format=qcow2,file="+drv)
	ctx := testCtx(t)
	for _, n := range []map[string]any{Qcow2File("bare", ch.top, false, false), Qcow2File("exp", exp, false, false)} {
		if err := BlockdevAdd(ctx, c, n); err != nil {
			t.Fatal(err)
		}
	}
	export(t, c, ch, "exp")
	unused := func() map[string]bool {
		t.Helper()
		disks, err := Disks(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for _, d := range disks {
			got[d.Name] = d.Unused
		}
		return got
	}
	want := map[string]bool{"drive0": false, "bare": true, "exp0": false}
	if got := unused(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Unused by disk: %v, want %v", got, want)
	}

	// The job's filter over the bare node is used by the job alone.
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "j", Device: "bare", AutoDismiss: ptr(false)})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, JobReady); err != nil {
		t.Fatal(err)
	}
	if got := unused(); !got["bare"] || got["drive0"] {
		t.Fatalf("Unused by disk during a job on bare: %v, want bare unused, drive0 used", got)
	}
}

// After a pivot, the nodes a user added above the new active layer stay in
// the graph and name it as their backing node. The exported disk is
// nonetheless a disk of its own, named by its export's id before and after
// the pivot, with the base as its active layer; the old top is an unused
// disk.
func TestDisksAfterAPivotShowTheExportedDiskOnItsNewActiveLayer(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t)
	addChain(t, c, ch)
	ctx := testCtx(t)
	summary := func() string {
		t.Helper()
		disks, err := Disks(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, d := range disks {
			var imgs []string
			for _, img := range d.Images {
				imgs = append(imgs, img.Node)
			}
			out = append(out, fmt.Sprintf("%s(export %q unused %v): %s", d.Name, d.Export, d.Unused, strings.Join(imgs, " ")))
		}
		return strings.Join(out, "; ")
	}
	if got, want := summary(), `exp0(export "exp0" unused false): top mid base`; got != want {
		t.Fatalf("disks before the job:\n got %s\nwant %s", got, want)
	}
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "j", Device: "top", AutoDismiss: ptr(false)})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, JobReady); err != nil {
		t.Fatal(err)
	}
	if got, want := summary(), `exp0(export "exp0" unused false): top mid base`; got != want {
		t.Fatalf("disks at ready:\n got %s\nwant %s", got, want)
	}
	if err := job.Complete(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := job.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if err := JobDismiss(ctx, c, "j"); err != nil {
		t.Fatal(err)
	}
	if got, want := summary(), `exp0(export "exp0" unused false): base; top(export "" unused true): top mid base`; got != want {
		t.Fatalf("disks after the pivot:\n got %s\nwant %s", got, want)
	}
}

// A backup job's target is written by QEMU through the copy-before-write
// filter the job inserts, whose "target" child it is: it is a disk of its
// own while the job runs (as a mirror's target is), and the disk backed
// up keeps its chain.
func TestDisksShowABackupTargetAsADiskOfItsOwn(t *testing.T) {
	ch := makeChain(t)
	dest := filepath.Join(ch.dir, "backup.qcow2")
	c, _ := startQEMU(t, "-drive", "if=none,id=drive0,format=qcow2,file="+ch.top)
	ctx := testCtx(t)
	if err := c.Execute(ctx, "drive-backup", map[string]any{"job-id": "bk", "device": "drive0", "target": dest, "format": "qcow2", "sync": "full", "speed": 1}, nil); err != nil {
		t.Fatal(err)
	}
	disks, err := Disks(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	var chains [][]string
	for _, d := range disks {
		chains = append(chains, imagePaths(d))
		if d.ReadOnly {
			t.Fatalf("read-only disk during the backup: %+v", d)
		}
	}
	slices.SortFunc(chains, func(a, b []string) int { return strings.Compare(a[0], b[0]) })
	if want := [][]string{{dest}, {ch.top, ch.mid, ch.base}}; fmt.Sprint(chains) != fmt.Sprint(want) {
		t.Fatalf("disks during the backup: %q, want %q", chains, want)
	}
}
