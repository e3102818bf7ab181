package qemu

import (
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmlock/vmlock/qmp"
)

// All tests use a real QEMU (-machine none, TCG, no guest) and a real
// qcow2 chain made with qemu-img and filled with qemu-io.

func TestGraphChain(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	// top opened the way QEMU does by default: backing chain from the
	// image headers, implicit node names.
	if err := BlockdevAdd(ctx, c, Qcow2File("top", ch.top, false, false)); err != nil {
		t.Fatal(err)
	}
	g, err := QueryGraph(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if !g.Exact {
		t.Errorf("this QEMU has x-debug-query-block-graph; Exact should be set")
	}
	checkImplicitChain(t, g, ch)

	// The inferred graph (for QEMUs without x-debug-query-block-graph)
	// finds the same chain.
	infos, err := QueryNodes(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	ig := &Graph{Nodes: map[string]*Node{}}
	for _, info := range infos {
		ig.Nodes[info.Name] = &Node{NodeInfo: info}
	}
	ig.infer()
	checkImplicitChain(t, ig, ch)
}

func checkImplicitChain(t *testing.T, g *Graph, ch *chain) {
	t.Helper()
	chain, err := g.Chain("top")
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, n := range chain {
		files = append(files, n.Filename)
	}
	if want := []string{ch.top, ch.mid, ch.base}; !slices.Equal(files, want) {
		t.Fatalf("chain files %q, want %q", files, want)
	}
	if chain[0].ReadOnly || !chain[1].ReadOnly || !chain[2].ReadOnly {
		t.Errorf("read-only flags: top %v mid %v base %v; want backing files read-only", chain[0].ReadOnly, chain[1].ReadOnly, chain[2].ReadOnly)
	}
	if chain[1].BackingFile != ch.base || chain[2].BackingFile != "" {
		t.Errorf("backing files: mid %q base %q", chain[1].BackingFile, chain[2].BackingFile)
	}
	for _, n := range chain {
		st, err := g.Storage(n.Name)
		if err != nil {
			t.Fatal(err)
		}
		if len(st) != 1 || st[0].Driver != "file" || st[0].Filename != n.Filename {
			t.Fatalf("storage of %s: %+v", n.Name, st)
		}
	}
	if roots := g.Roots(); !slices.Equal(roots, []string{"top"}) {
		t.Fatalf("roots %q, want [top]", roots)
	}
	if _, err := g.Chain("nonexistent"); !errors.Is(err, ErrNoSuchNode) {
		t.Fatalf("chain of unknown node: %v", err)
	}
}

func TestQueryBlockDrive(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t, "-drive", "if=none,id=drive0,format=qcow2,node-name=top,file="+ch.top)
	devs, err := QueryBlock(testCtx(t), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 1 || devs[0].Device != "drive0" || devs[0].Inserted == nil {
		t.Fatalf("query-block: %+v", devs)
	}
	in := devs[0].Inserted
	if in.NodeName != "top" {
		t.Fatalf("drive0's node %q, want top", in.NodeName)
	}
	var files []string
	for img := &in.Image; img != nil; img = img.BackingImage {
		files = append(files, img.Filename)
	}
	if want := []string{ch.top, ch.mid, ch.base}; !slices.Equal(files, want) {
		t.Fatalf("image chain %q, want %q", files, want)
	}
}

// jobStatuses collects the JOB_STATUS_CHANGE statuses of job id.
// jobStatuses collects id's status changes up to and including last. It
// waits for last rather than reading only what is queued: QEMU may send a
// job's final status change after the event the test waited for.
func jobStatuses(t *testing.T, sub *qmp.Subscription, id string, last JobStatus) []JobStatus {
	t.Helper()
	var out []JobStatus
	for len(out) == 0 || out[len(out)-1] != last {
		ev, err := sub.Next(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		var d JobStatusChange
		if err := ev.DecodeData(&d); err != nil {
			t.Fatal(err)
		}
		if d.ID == id {
			out = append(out, d.Status)
		}
	}
	return out
}

func TestActiveCommitPivot(t *testing.T) {
	ch := makeChain(t)
	c, cmd := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	statuses := c.Subscribe(EventJobStatusChange)
	defer statuses.Close()

	job, err := StartCommit(ctx, c, CommitOptions{
		JobID: "commit0", Device: "top", FilterNodeName: "commit-filter", AutoDismiss: ptr(false),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if st, err := job.WaitStatus(ctx, JobReady); err != nil || st != JobReady {
		t.Fatalf("waiting for ready: %v %v", st, err)
	}
	info, err := job.Info(ctx)
	if err != nil || info.Type != "commit" || info.CurrentProgress != info.TotalProgress || info.TotalProgress == 0 {
		t.Fatalf("ready job info %+v, %v", info, err)
	}

	// While the job runs, the filter sits on top of the chain.
	g, err := QueryGraph(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if roots := g.Roots(); !slices.Equal(roots, []string{"commit-filter"}) {
		t.Fatalf("roots during the job %q", roots)
	}
	chain, err := g.Chain("commit-filter")
	if err != nil {
		t.Fatal(err)
	}
	if got := names(chain); !slices.Equal(got, []string{"commit-filter", "top", "mid", "base"}) {
		t.Fatalf("chain during the job %q", got)
	}

	// A writer during the job (over NBD): the active commit mirrors it.
	qemuIO(t, ch.nbdURL, false, "write -P 0x44 3M 512k")

	if err := job.Complete(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := job.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeCompleted || !res.Pivoted || res.Error != "" {
		t.Fatalf("result %+v", res)
	}
	if got, want := jobStatuses(t, statuses, "commit0", JobConcluded), []JobStatus{JobCreated, JobRunning, JobReady, JobWaiting, JobPending, JobConcluded}; !slices.Equal(got, want) {
		t.Fatalf("statuses %q, want %q", got, want)
	}
	// Pivoted: the export now serves base.
	if n := exportedNode(t, c); n != "base" {
		t.Fatalf("export serves %q after pivot, want base", n)
	}
	// auto-dismiss off: the concluded job stays until dismissed.
	if info, err := QueryJob(ctx, c, "commit0"); err != nil || info.Status != JobConcluded {
		t.Fatalf("concluded job: %+v %v", info, err)
	}
	if err := JobDismiss(ctx, c, "commit0"); err != nil {
		t.Fatal(err)
	}
	if st, err := job.WaitStatus(ctx, JobNull); err != nil || st != JobNull {
		t.Fatalf("after dismiss: %v %v", st, err)
	}
	if _, err := QueryJob(ctx, c, "commit0"); !errors.Is(err, ErrNoSuchJob) {
		t.Fatalf("dismissed job still listed: %v", err)
	}
	qemuIO(t, ch.nbdURL, true, "read -P 0x44 3M 512k")
	quit(t, c, cmd)

	// base alone now holds every layer's data and the write made during
	// the job, and reads exactly like the old chain.
	checkMerged(t, ch.base)
	qemuIO(t, ch.base, true, "read -P 0x44 3M 512k", "read -P 0 3584k 512k")
	run(t, "qemu-img", "compare", "-U", ch.top, ch.base)
}

func TestActiveCommitAbort(t *testing.T) {
	ch := makeChain(t)
	c, cmd := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "commit0", Device: "top"})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, JobReady); err != nil {
		t.Fatal(err)
	}
	// Abort at ready: no pivot; the job still ends "completed".
	if err := job.Cancel(ctx, false); err != nil {
		t.Fatal(err)
	}
	res, err := job.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeCompleted || res.Pivoted {
		t.Fatalf("result %+v, want completed without pivot", res)
	}
	if !job.WasReady() {
		t.Fatal("WasReady false")
	}
	// BLOCK_JOB_COMPLETED comes before the last status change (concluded,
	// then null once auto-dismissed): wait for it rather than race it.
	if _, err := job.WaitStatus(ctx, JobNull); err != nil {
		t.Fatalf("the job never reached null (auto-dismissed): %v; status %s", err, job.Status())
	}
	if n := exportedNode(t, c); n != "top" {
		t.Fatalf("export serves %q after abort, want top", n)
	}
	// Writes after the abort land in top, not in base.
	qemuIO(t, ch.nbdURL, false, "write -P 0x55 3M 512k")
	quit(t, c, cmd)
	checkMerged(t, ch.top)
	qemuIO(t, ch.top, true, "read -P 0x55 3M 512k")
	// The commit's data is in base all the same; the new write is not.
	checkMerged(t, ch.base)
	qemuIO(t, ch.base, true, "read -P 0 3M 1M")
}

func TestIntermediateCommit(t *testing.T) {
	ch := makeChain(t)
	c, cmd := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	statuses := c.Subscribe(EventJobStatusChange)
	defer statuses.Close()
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "commit1", Device: "top", TopNode: "mid", BaseNode: "base"})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	// One phase: it ends by itself, never ready.
	res, err := job.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Outcome != OutcomeCompleted || res.Pivoted || job.WasReady() {
		t.Fatalf("result %+v, was ready %v", res, job.WasReady())
	}
	got := jobStatuses(t, statuses, "commit1", JobNull)
	if slices.Contains(got, JobReady) || !slices.Equal(got[len(got)-2:], []JobStatus{JobConcluded, JobNull}) {
		t.Fatalf("statuses %q", got)
	}
	// mid left the chain.
	g, err := QueryGraph(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := g.Chain("top")
	if err != nil {
		t.Fatal(err)
	}
	if got := names(chain); !slices.Equal(got, []string{"top", "base"}) {
		t.Fatalf("chain after intermediate commit %q", got)
	}
	quit(t, c, cmd)
	checkMerged(t, ch.top)
	qemuIO(t, ch.base, true, "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0 2M 2M")
	if info := run(t, "qemu-img", "info", "-U", ch.top); !strings.Contains(info, "backing file: "+ch.base) {
		t.Fatalf("top's backing file not rewritten to base:\n%s", info)
	}
}

func TestCompleteBeforeReadyRefused(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	// Throttled to a byte per second, the job cannot become ready.
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "slow", Device: "top", Speed: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, JobRunning); err != nil {
		t.Fatal(err)
	}
	err = job.Complete(ctx)
	var qe *qmp.Error
	if !errors.Is(err, ErrNotReady) || !errors.As(err, &qe) {
		t.Fatalf("complete before ready: got %v, want ErrNotReady and a *qmp.Error", err)
	}
	t.Logf("complete before ready: %v", err)
	if err := job.Cancel(ctx, false); err != nil {
		t.Fatal(err)
	}
	if _, err := job.WaitStatus(ctx, JobReady); !errors.Is(err, ErrJobEnded) {
		t.Fatalf("waiting for ready on a cancelled job: %v", err)
	}
	res, err := job.Wait(ctx)
	if err != nil || res.Outcome != OutcomeCancelled || job.WasReady() {
		t.Fatalf("cancelled job: %+v %v", res, err)
	}
	if n := exportedNode(t, c); n != "top" {
		t.Fatalf("export serves %q after cancel, want top", n)
	}
}

func TestStartCommitErrors(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	var qe *qmp.Error
	if _, err := StartCommit(ctx, c, CommitOptions{JobID: "x", Device: "nonexistent"}); !errors.As(err, &qe) {
		t.Fatalf("unknown device: %v", err)
	}
	// base above top: QEMU refuses.
	if _, err := StartCommit(ctx, c, CommitOptions{JobID: "x", Device: "mid", TopNode: "mid", BaseNode: "top"}); !errors.As(err, &qe) {
		t.Fatalf("base not below top: %v", err)
	}
	if _, err := StartCommit(ctx, c, CommitOptions{Device: "top"}); err == nil {
		t.Fatal("commit without job id accepted")
	}
	if _, err := Attach(ctx, c, "nonexistent"); !errors.Is(err, ErrNoSuchJob) {
		t.Fatalf("attach to unknown job: %v", err)
	}
}

func TestMirrorPivot(t *testing.T) {
	ch := makeChain(t)
	c, cmd := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	copyPath := filepath.Join(ch.dir, "copy.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", copyPath, "4M")
	if err := BlockdevAdd(ctx, c, Qcow2File("copy", copyPath, false, true)); err != nil {
		t.Fatal(err)
	}
	job, err := StartMirror(ctx, c, MirrorOptions{JobID: "copy0", Device: "top", Target: "copy", Sync: "full"})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, JobReady); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, ch.nbdURL, false, "write -P 0x44 3M 512k")
	if err := job.Complete(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := job.Wait(ctx)
	if err != nil || res.Outcome != OutcomeCompleted || !res.Pivoted {
		t.Fatalf("result %+v %v", res, err)
	}
	if n := exportedNode(t, c); n != "copy" {
		t.Fatalf("export serves %q after pivot, want copy", n)
	}
	quit(t, c, cmd)
	// A complete standalone copy.
	if info := run(t, "qemu-img", "info", "-U", copyPath); strings.Contains(info, "backing file") {
		t.Fatalf("copy has a backing file:\n%s", info)
	}
	checkMerged(t, copyPath)
	qemuIO(t, copyPath, true, "read -P 0x44 3M 512k")
	run(t, "qemu-img", "compare", "-U", ch.top, copyPath)
}

func TestJobFailsOnIOError(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	// base sits on blkdebug, which fails every write to it with EIO.
	base := map[string]any{
		"driver": "qcow2", "node-name": "base", "backing": nil,
		"file": map[string]any{
			"driver": "blkdebug", "node-name": "base-debug",
			"inject-error": []map[string]any{{"event": "write_aio", "errno": 5}},
			"image":        map[string]any{"driver": "file", "node-name": "base-file", "filename": ch.base},
		},
	}
	mid := Qcow2File("mid", ch.mid, false, false)
	mid["backing"] = "base"
	top := Qcow2File("top", ch.top, false, false)
	top["backing"] = "mid"
	for _, n := range []map[string]any{base, mid, top} {
		if err := BlockdevAdd(ctx, c, n); err != nil {
			t.Fatal(err)
		}
	}
	g, err := QueryGraph(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	st, err := g.Storage("base")
	if err != nil || len(st) != 1 || st[0].Name != "base-file" || st[0].Filename != ch.base {
		t.Fatalf("storage of base through blkdebug: %v %v", names(st), err)
	}
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "bad", Device: "top", TopNode: "mid"})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	res, err := job.Wait(ctx)
	if !errors.Is(err, ErrJobFailed) || res.Outcome != OutcomeFailed || res.Error == "" {
		t.Fatalf("got %+v, %v; want a failed job", res, err)
	}
	if !strings.Contains(res.Error, "Input/output error") {
		t.Errorf("job error %q does not name the I/O error", res.Error)
	}
	if !slices.Contains(res.IOErrors, "write") {
		t.Errorf("BLOCK_JOB_ERROR write not recorded: %q", res.IOErrors)
	}
	t.Logf("failed job: %v", err)
	// The chain is unchanged.
	g, err = QueryGraph(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := g.Chain("top")
	if err != nil || !slices.Equal(names(chain), []string{"top", "mid", "base"}) {
		t.Fatalf("chain after failed job %q %v", names(chain), err)
	}
}

func TestAttachAfterReconnect(t *testing.T) {
	ch := makeChain(t)
	sock := filepath.Join(ch.dir, "qmp.sock")
	c, cmd := startQEMU(t, "-qmp", "unix:"+sock+",server=on,wait=off")
	ctx := testCtx(t)
	addChain(t, c, ch)
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "commit0", Device: "top"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := job.WaitStatus(ctx, JobReady); err != nil {
		t.Fatal(err)
	}
	job.Close()

	// A "restarted supervisor": a new connection on QEMU's other monitor.
	c2, err := qmp.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	job2, err := Attach(ctx, c2, "commit0")
	if err != nil {
		t.Fatal(err)
	}
	defer job2.Close()
	if st := job2.Status(); st != JobReady || !job2.WasReady() {
		t.Fatalf("attached job status %s", st)
	}
	if err := job2.Complete(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := job2.Wait(ctx)
	if err != nil || res.Outcome != OutcomeCompleted || !res.Pivoted {
		t.Fatalf("result %+v %v", res, err)
	}
	if n := exportedNode(t, c2); n != "base" {
		t.Fatalf("export serves %q after pivot, want base", n)
	}
	quit(t, c, cmd)
	checkMerged(t, ch.base)
}

// A job that was cancelled before a supervisor attached to it (it ended
// while the supervisor was down) is reported cancelled, as the events
// would have said, not failed: QEMU's query-jobs gives a cancelled job
// the error "Operation canceled".
func TestAttachToAJobCancelledMeanwhile(t *testing.T) {
	ch := makeChain(t)
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	addChain(t, c, ch)
	job, err := StartCommit(ctx, c, CommitOptions{JobID: "slow", Device: "top", Speed: 1, AutoDismiss: new(false)})
	if err != nil {
		t.Fatal(err)
	}
	defer job.Close()
	if _, err := job.WaitStatus(ctx, JobRunning); err != nil {
		t.Fatal(err)
	}
	if err := job.Cancel(ctx, false); err != nil {
		t.Fatal(err)
	}
	if res, err := job.Wait(ctx); err != nil || res.Outcome != OutcomeCancelled {
		t.Fatalf("cancelled job seen through its events: %+v %v", res, err)
	}

	attached, err := Attach(ctx, c, "slow")
	if err != nil {
		t.Fatal(err)
	}
	defer attached.Close()
	res, ok := attached.Result()
	if !ok || res.Outcome != OutcomeCancelled || res.Error != "" {
		t.Fatalf("cancelled job seen through query-jobs: %+v (ended %v), want cancelled", res, ok)
	}
	if res, err := attached.Wait(ctx); err != nil || res.Outcome != OutcomeCancelled {
		t.Fatalf("Wait on the attached cancelled job: %+v %v", res, err)
	}
}

// QEMU 7.2 crashes (SIGSEGV) on query-named-block-nodes while a stream
// job that has ended waits to be dismissed. QueryNodes, QueryGraph and
// Disks do not ask it then: they say why, and QEMU lives on; once the job
// is dismissed they read the graph again.
func TestGraphIsNotReadWhileAStreamWaitsToBeDismissed(t *testing.T) {
	ch := makeChain(t)
	c, cmd := startQEMU(t, "-drive", "if=none,id=drive0,format=qcow2,file="+ch.top)
	ctx := testCtx(t)
	sub := c.Subscribe(EventJobStatusChange)
	defer sub.Close()
	if err := c.Execute(ctx, "block-stream", map[string]any{"job-id": "mine", "device": "drive0", "auto-dismiss": false}, nil); err != nil {
		t.Fatal(err)
	}
	jobStatuses(t, sub, "mine", JobConcluded)
	for name, read := range map[string]func() error{
		"QueryNodes": func() error { _, err := QueryNodes(ctx, c); return err },
		"QueryGraph": func() error { _, err := QueryGraph(ctx, c); return err },
		"Disks":      func() error { _, err := Disks(ctx, c); return err },
	} {
		if err := read(); !errors.Is(err, ErrGraphUnreadable) || !strings.Contains(err.Error(), `"mine"`) {
			t.Fatalf("%s while stream job mine waits to be dismissed: %v, want ErrGraphUnreadable naming it", name, err)
		}
	}
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatalf("QEMU after the graph reads: %v", err)
	}
	if err := JobDismiss(ctx, c, "mine"); err != nil {
		t.Fatal(err)
	}
	disks, err := Disks(ctx, c)
	if err != nil || len(disks) != 1 || len(disks[0].Images) != 1 {
		t.Fatalf("disks once the stream was dismissed: %+v %v, want drive0 with its top alone", disks, err)
	}
	quit(t, c, cmd)
	checkMerged(t, ch.top)
}
