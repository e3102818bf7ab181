package qemu

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/vmlock/vmlock/qmp"
)

var (
	// ErrNotReady is wrapped by Job.Complete's error when QEMU refused to
	// complete a job that has not reached the ready phase (or never will:
	// an intermediate commit).
	ErrNotReady = errors.New("block job is not ready yet")
	// ErrJobEnded is wrapped by Job.WaitStatus's error when the job ended
	// (concluded or was dismissed) without reaching the awaited status.
	ErrJobEnded = errors.New("block job ended")
	// ErrJobFailed is wrapped by Job.Wait's error when the job failed (QEMU
	// reported an error in BLOCK_JOB_COMPLETED, e.g. an I/O error).
	ErrJobFailed = errors.New("block job failed")
)

// Outcome is how a block job ended.
type Outcome string

const (
	// OutcomeUnknown: the end was not observed (the job was attached to
	// after it had ended and QEMU kept no error).
	OutcomeUnknown Outcome = ""
	// OutcomeCompleted: BLOCK_JOB_COMPLETED without error. After
	// job-complete this is a pivot; after block-job-cancel of a ready job
	// it is an abort that left the top (source) active; for an
	// intermediate commit it is the commit's end.
	OutcomeCompleted Outcome = "completed"
	// OutcomeCancelled: BLOCK_JOB_CANCELLED (cancelled before ready, or
	// with force).
	OutcomeCancelled Outcome = "cancelled"
	// OutcomeFailed: BLOCK_JOB_COMPLETED with an error.
	OutcomeFailed Outcome = "failed"
)

// Result is a job's end as reported by QEMU's events.
type Result struct {
	Outcome Outcome
	// Pivoted is true if the job completed after Complete was called
	// through this Job: the base (commit) or target (mirror) replaced the
	// top in the graph.
	Pivoted bool
	// Error is QEMU's error message for a failed job.
	Error string
	// Len and Offset are the job's progress at the end (bytes).
	Len, Offset int64
	// IOErrors lists the BLOCK_JOB_ERROR operations ("read", "write")
	// seen before the end.
	IOErrors []string
}

// Job tracks one block job through a subscription made before the job
// started (or before it was attached to), so no status change is missed.
// Its state advances as its methods consume QEMU's events. Methods are
// safe for concurrent use; waits are served one at a time. Close the Job
// when done with it.
type Job struct {
	c   *qmp.Client
	id  string
	sub *qmp.Subscription
	// consume serialises event consumption; a channel so waiting for it
	// honours contexts.
	consume chan struct{}

	mu                sync.Mutex
	status            JobStatus
	wasReady          bool
	result            *Result
	ioErrors          []string
	completeRequested bool
}

func newJob(c *qmp.Client, id string) *Job {
	return &Job{
		c:       c,
		id:      id,
		sub:     c.Subscribe(EventJobStatusChange, EventBlockJobReady, EventBlockJobCompleted, EventBlockJobCancelled, EventBlockJobError),
		consume: make(chan struct{}, 1),
		status:  JobUndefined,
	}
}

// StartCommit subscribes to the job's events and starts a block-commit
// job. QEMU's refusal (e.g. an unknown node, a base not below the top) is
// returned as an error wrapping *qmp.Error.
func StartCommit(ctx context.Context, c *qmp.Client, opts CommitOptions) (*Job, error) {
	j := newJob(c, opts.JobID)
	if err := BlockCommit(ctx, c, opts); err != nil {
		j.Close()
		return nil, err
	}
	return j, nil
}

// StartMirror subscribes to the job's events and starts a blockdev-mirror
// job.
func StartMirror(ctx context.Context, c *qmp.Client, opts MirrorOptions) (*Job, error) {
	j := newJob(c, opts.JobID)
	if err := BlockdevMirror(ctx, c, opts); err != nil {
		j.Close()
		return nil, err
	}
	return j, nil
}

// Attach tracks a job that is already running (e.g. after the supervisor
// restarted): it subscribes, then reads the job's current status with
// query-jobs. It fails with an error wrapping ErrNoSuchJob if QEMU has no
// such job. A job that has already ended (kept by QEMU because it was
// started without auto-dismiss) has its Result from query-jobs: failed
// with QEMU's error, cancelled, or completed.
func Attach(ctx context.Context, c *qmp.Client, id string) (*Job, error) {
	j := newJob(c, id)
	info, err := QueryJob(ctx, c, id)
	if err != nil {
		j.Close()
		return nil, err
	}
	j.mu.Lock()
	j.status = info.Status
	j.wasReady = info.Status == JobReady || info.Status == JobStandby
	if info.Status.Ended() {
		r := &Result{Outcome: OutcomeCompleted, Offset: info.CurrentProgress, Len: info.TotalProgress}
		switch {
		case strings.EqualFold(info.Error, syscall.ECANCELED.Error()):
			// QEMU's error of a cancelled job (BLOCK_JOB_CANCELLED).
			r.Outcome = OutcomeCancelled
		case info.Error != "":
			r.Outcome, r.Error = OutcomeFailed, info.Error
		}
		j.result = r
	}
	j.mu.Unlock()
	return j, nil
}

// ID returns the job's id.
func (j *Job) ID() string { return j.id }

// Close stops tracking the job (it does not cancel it). Idempotent.
func (j *Job) Close() { j.sub.Close() }

// Status returns the job's status as of the events received so far
// (consuming those already queued, without waiting). Before any event it
// is JobUndefined (for an attached job: the status query-jobs gave).
func (j *Job) Status() JobStatus {
	select {
	case j.consume <- struct{}{}:
		for j.sub.Len() > 0 {
			ev, err := j.sub.Next(context.Background()) // queued: does not block
			if err != nil {
				break
			}
			j.apply(ev)
		}
		<-j.consume
	default: // a wait is consuming events right now
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.status
}

// WasReady reports whether the job has been seen in the ready phase.
func (j *Job) WasReady() bool {
	j.Status()
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.wasReady
}

// Result returns the job's end, and false if it has not ended yet (as far
// as the events received so far tell).
func (j *Job) Result() (Result, bool) {
	j.Status()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.result == nil {
		return Result{}, false
	}
	return j.copyResult(), true
}

func (j *Job) copyResult() Result {
	r := *j.result
	r.IOErrors = slices.Clone(j.ioErrors)
	return r
}

// apply updates the state from one event.
func (j *Job) apply(ev qmp.Event) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.status == JobNull {
		return // gone: a new job may reuse the id
	}
	switch ev.Name {
	case EventJobStatusChange:
		var d JobStatusChange
		if ev.DecodeData(&d) != nil || d.ID != j.id {
			return
		}
		j.status = d.Status
		if d.Status == JobReady {
			j.wasReady = true
		}
	case EventBlockJobReady:
		var d BlockJobEvent
		if ev.DecodeData(&d) == nil && d.Device == j.id {
			j.wasReady = true
		}
	case EventBlockJobCompleted, EventBlockJobCancelled:
		var d BlockJobEvent
		if ev.DecodeData(&d) != nil || d.Device != j.id {
			return
		}
		r := &Result{Outcome: OutcomeCompleted, Len: d.Len, Offset: d.Offset}
		switch {
		case ev.Name == EventBlockJobCancelled:
			r.Outcome = OutcomeCancelled
		case d.Error != "":
			r.Outcome, r.Error = OutcomeFailed, d.Error
		default:
			r.Pivoted = j.completeRequested
		}
		j.result = r
	case EventBlockJobError:
		var d BlockJobError
		if ev.DecodeData(&d) == nil && d.Device == j.id {
			j.ioErrors = append(j.ioErrors, d.Operation)
		}
	}
}

// WaitStatus waits until the job is in one of the statuses want and
// returns it. If the job ends without reaching one (it concluded, unless
// want includes JobNull, or it was dismissed) the error wraps ErrJobEnded
// and, for a failed job, says why. Other errors: the context's, or the
// client's (connection lost).
func (j *Job) WaitStatus(ctx context.Context, want ...JobStatus) (JobStatus, error) {
	select {
	case j.consume <- struct{}{}:
	case <-ctx.Done():
		j.mu.Lock()
		st := j.status
		j.mu.Unlock()
		return st, fmt.Errorf("qemu: job %s: waiting for %v: %w", j.id, want, ctx.Err())
	}
	defer func() { <-j.consume }()
	for {
		j.mu.Lock()
		st, res := j.status, j.result
		j.mu.Unlock()
		if slices.Contains(want, st) {
			return st, nil
		}
		if st == JobNull || (st == JobConcluded && !slices.Contains(want, JobNull)) {
			why := ""
			if res != nil && res.Error != "" {
				why = ": " + res.Error
			} else if res != nil {
				why = " (" + string(res.Outcome) + ")"
			}
			return st, fmt.Errorf("qemu: job %s: %w in status %s before reaching %v%s", j.id, ErrJobEnded, st, want, why)
		}
		ev, err := j.sub.Next(ctx)
		if err != nil {
			return st, fmt.Errorf("qemu: job %s: waiting for %v: %w", j.id, want, err)
		}
		j.apply(ev)
	}
}

// Wait waits for the job to end (concluded or dismissed) and returns how
// it ended. A failed job returns its Result and an error wrapping
// ErrJobFailed with QEMU's message; a completed or cancelled job returns a
// nil error.
func (j *Job) Wait(ctx context.Context) (Result, error) {
	if _, err := j.WaitStatus(ctx, JobConcluded, JobNull); err != nil {
		return Result{}, err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.result == nil {
		return Result{}, nil
	}
	r := j.copyResult()
	if r.Outcome == OutcomeFailed {
		return r, fmt.Errorf("qemu: job %s: %w: %s", j.id, ErrJobFailed, r.Error)
	}
	return r, nil
}

// Complete asks the ready job to pivot (job-complete); Wait then reports
// the end. If QEMU refuses because the job is not ready, the error wraps
// both ErrNotReady and QEMU's *qmp.Error.
func (j *Job) Complete(ctx context.Context) error {
	j.mu.Lock()
	j.completeRequested = true
	j.mu.Unlock()
	err := JobComplete(ctx, j.c, j.id)
	if err == nil {
		return nil
	}
	j.mu.Lock()
	j.completeRequested = false
	j.mu.Unlock()
	var qe *qmp.Error
	if errors.As(err, &qe) {
		if info, qerr := QueryJob(ctx, j.c, j.id); qerr == nil && info.Status != JobReady {
			return fmt.Errorf("qemu: job %s is %s: %w: %w", j.id, info.Status, ErrNotReady, qe)
		}
	}
	return err
}

// Cancel cancels the job (block-job-cancel); see BlockJobCancel for what
// that means for a ready job. Wait then reports the end.
func (j *Job) Cancel(ctx context.Context, force bool) error {
	return BlockJobCancel(ctx, j.c, j.id, force)
}

// Info queries the job's current progress and status from QEMU
// (query-jobs); it does not consume events.
func (j *Job) Info(ctx context.Context) (JobInfo, error) {
	return QueryJob(ctx, j.c, j.id)
}
