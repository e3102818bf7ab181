package qemu

import (
	"context"
	"errors"
	"fmt"

	"github.com/vmlock/vmlock/qmp"
)

// JobStatus is a job's phase (QAPI JobStatus).
type JobStatus string

// The job phases. A two-phase job (active commit, mirror) goes
// created → running → ready, waits there for job-complete or
// block-job-cancel, then waiting → pending → concluded → null. A one-phase
// job (intermediate commit) goes created → running → waiting → pending →
// concluded → null by itself. A job concludes "aborting" → concluded when
// cancelled or failed. "null" means QEMU has dismissed the job: it is gone.
const (
	JobUndefined JobStatus = "undefined"
	JobCreated   JobStatus = "created"
	JobRunning   JobStatus = "running"
	JobPaused    JobStatus = "paused"
	JobReady     JobStatus = "ready"
	JobStandby   JobStatus = "standby" // paused while ready
	JobWaiting   JobStatus = "waiting"
	JobPending   JobStatus = "pending"
	JobAborting  JobStatus = "aborting"
	JobConcluded JobStatus = "concluded"
	JobNull      JobStatus = "null"
)

// Ended reports whether the job has finished its work: concluded or gone.
func (s JobStatus) Ended() bool { return s == JobConcluded || s == JobNull }

// JobInfo is one job as query-jobs reports it.
type JobInfo struct {
	ID     string    `json:"id"`
	Type   string    `json:"type"` // "commit", "mirror", "stream", "backup", ...
	Status JobStatus `json:"status"`
	// CurrentProgress and TotalProgress are in arbitrary units (bytes for
	// block jobs); cur == total at ready. Total may grow while a source is
	// written to.
	CurrentProgress int64 `json:"current-progress"`
	TotalProgress   int64 `json:"total-progress"`
	// Error is set once a job has failed or was cancelled.
	Error string `json:"error,omitempty"`
}

// BlockJobInfo is one block job as query-block-jobs reports it.
type BlockJobInfo struct {
	Device       string    `json:"device"` // the job id
	Type         string    `json:"type"`
	Len          int64     `json:"len"`
	Offset       int64     `json:"offset"`
	Busy         bool      `json:"busy"`
	Paused       bool      `json:"paused"`
	Speed        int64     `json:"speed"`
	IOStatus     string    `json:"io-status"`
	Ready        bool      `json:"ready"`
	Status       JobStatus `json:"status"`
	AutoFinalize bool      `json:"auto-finalize"`
	AutoDismiss  bool      `json:"auto-dismiss"`
	Error        string    `json:"error,omitempty"`
}

// QueryJobs returns every job QEMU knows, including concluded jobs that
// were started with auto-dismiss off and not dismissed yet (query-jobs).
func QueryJobs(ctx context.Context, c *qmp.Client) ([]JobInfo, error) {
	var jobs []JobInfo
	if err := c.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
		return nil, fmt.Errorf("qemu: listing jobs: %w", err)
	}
	return jobs, nil
}

// QueryBlockJobs returns the block jobs (query-block-jobs).
func QueryBlockJobs(ctx context.Context, c *qmp.Client) ([]BlockJobInfo, error) {
	var jobs []BlockJobInfo
	if err := c.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, fmt.Errorf("qemu: listing block jobs: %w", err)
	}
	return jobs, nil
}

// ErrNoSuchJob is wrapped by errors about a job id QEMU does not know.
var ErrNoSuchJob = errors.New("no such job")

// QueryJob returns the job with the given id, or an error wrapping
// ErrNoSuchJob.
func QueryJob(ctx context.Context, c *qmp.Client, id string) (JobInfo, error) {
	jobs, err := QueryJobs(ctx, c)
	if err != nil {
		return JobInfo{}, err
	}
	for _, j := range jobs {
		if j.ID == id {
			return j, nil
		}
	}
	return JobInfo{}, fmt.Errorf("qemu: job %q: %w", id, ErrNoSuchJob)
}

// CommitOptions are block-commit's arguments. Device is the top node of
// the chain (the active layer for an active commit); TopNode defaults to
// Device — committing the active layer — and BaseNode to the bottom of
// the chain.
type CommitOptions struct {
	// JobID names the job; required (QEMU derives no id from a node name).
	JobID    string `json:"job-id"`
	Device   string `json:"device"`
	TopNode  string `json:"top-node,omitempty"`
	BaseNode string `json:"base-node,omitempty"`
	// BackingFile, if set, is the backing file name written into the
	// overlay of TopNode (intermediate commits only).
	BackingFile string `json:"backing-file,omitempty"`
	// Speed limits the job in bytes per second; 0 is unlimited.
	Speed int64 `json:"speed,omitempty"`
	// OnError is "report" (default), "ignore" or "stop".
	OnError string `json:"on-error,omitempty"`
	// FilterNodeName names the filter node the job inserts above Device
	// (QEMU names it "#blockNNN" otherwise).
	FilterNodeName string `json:"filter-node-name,omitempty"`
	// AutoFinalize and AutoDismiss default to true in QEMU. With
	// AutoDismiss false a concluded job stays in query-jobs (with its
	// error) until JobDismiss.
	AutoFinalize *bool `json:"auto-finalize,omitempty"`
	AutoDismiss  *bool `json:"auto-dismiss,omitempty"`
}

// BlockCommit starts a block-commit job. Prefer StartCommit, which tracks
// the job from before it starts.
func BlockCommit(ctx context.Context, c *qmp.Client, opts CommitOptions) error {
	if opts.JobID == "" || opts.Device == "" {
		return errors.New("qemu: block-commit: JobID and Device are required")
	}
	if err := c.Execute(ctx, "block-commit", opts, nil); err != nil {
		return fmt.Errorf("qemu: starting commit job %s: %w", opts.JobID, err)
	}
	return nil
}

// MirrorOptions are blockdev-mirror's arguments: copy Device's data (per
// Sync) to the existing node Target.
type MirrorOptions struct {
	JobID  string `json:"job-id"` // required
	Device string `json:"device"`
	Target string `json:"target"`
	// Sync is "full" (the whole chain's data: a standalone copy), "top"
	// (only Device's own layer) or "none".
	Sync string `json:"sync"`
	// Replaces names the node the target replaces on completion, if not
	// Device.
	Replaces       string `json:"replaces,omitempty"`
	Speed          int64  `json:"speed,omitempty"`
	Granularity    int64  `json:"granularity,omitempty"`
	BufSize        int64  `json:"buf-size,omitempty"`
	OnSourceError  string `json:"on-source-error,omitempty"`
	OnTargetError  string `json:"on-target-error,omitempty"`
	FilterNodeName string `json:"filter-node-name,omitempty"`
	// CopyMode is "background" (default) or "write-blocking".
	CopyMode     string `json:"copy-mode,omitempty"`
	AutoFinalize *bool  `json:"auto-finalize,omitempty"`
	AutoDismiss  *bool  `json:"auto-dismiss,omitempty"`
}

// BlockdevMirror starts a blockdev-mirror job. Prefer StartMirror.
func BlockdevMirror(ctx context.Context, c *qmp.Client, opts MirrorOptions) error {
	if opts.JobID == "" || opts.Device == "" || opts.Target == "" || opts.Sync == "" {
		return errors.New("qemu: blockdev-mirror: JobID, Device, Target and Sync are required")
	}
	if err := c.Execute(ctx, "blockdev-mirror", opts, nil); err != nil {
		return fmt.Errorf("qemu: starting mirror job %s: %w", opts.JobID, err)
	}
	return nil
}

// JobComplete asks a ready job to pivot: an active commit makes the base
// the active layer, a mirror makes the target replace the source
// (job-complete). QEMU refuses before the job is ready.
func JobComplete(ctx context.Context, c *qmp.Client, id string) error {
	if err := c.Execute(ctx, "job-complete", map[string]string{"id": id}, nil); err != nil {
		return fmt.Errorf("qemu: completing job %s: %w", id, err)
	}
	return nil
}

// BlockJobCancel cancels a block job (block-job-cancel). On a ready
// mirror or active commit without force, the job ends with
// BLOCK_JOB_COMPLETED without pivoting (the source stays active; the
// target or base holds a consistent copy); with force, or before ready,
// it ends with BLOCK_JOB_CANCELLED.
func BlockJobCancel(ctx context.Context, c *qmp.Client, id string, force bool) error {
	args := map[string]any{"device": id}
	if force {
		args["force"] = true
	}
	if err := c.Execute(ctx, "block-job-cancel", args, nil); err != nil {
		return fmt.Errorf("qemu: cancelling job %s: %w", id, err)
	}
	return nil
}

// JobFinalize finalizes a pending job started with AutoFinalize false
// (job-finalize).
func JobFinalize(ctx context.Context, c *qmp.Client, id string) error {
	if err := c.Execute(ctx, "job-finalize", map[string]string{"id": id}, nil); err != nil {
		return fmt.Errorf("qemu: finalizing job %s: %w", id, err)
	}
	return nil
}

// JobDismiss removes a concluded job started with AutoDismiss false
// (job-dismiss).
func JobDismiss(ctx context.Context, c *qmp.Client, id string) error {
	if err := c.Execute(ctx, "job-dismiss", map[string]string{"id": id}, nil); err != nil {
		return fmt.Errorf("qemu: dismissing job %s: %w", id, err)
	}
	return nil
}

// Job event payloads.

// JobStatusChange is the data of a JOB_STATUS_CHANGE event.
type JobStatusChange struct {
	ID     string    `json:"id"`
	Status JobStatus `json:"status"`
}

// BlockJobEvent is the data of BLOCK_JOB_READY, BLOCK_JOB_COMPLETED and
// BLOCK_JOB_CANCELLED events.
type BlockJobEvent struct {
	Type   string `json:"type"`
	Device string `json:"device"` // the job id
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Speed  int64  `json:"speed"`
	// Error is set in BLOCK_JOB_COMPLETED when the job failed.
	Error string `json:"error,omitempty"`
}

// BlockJobError is the data of a BLOCK_JOB_ERROR event (an I/O error the
// job hit; with on-error "report" the job then fails).
type BlockJobError struct {
	Device    string `json:"device"`
	Operation string `json:"operation"` // "read" or "write"
	Action    string `json:"action"`    // "ignore", "report" or "stop"
}

// Event names the job helpers use.
const (
	EventJobStatusChange   = "JOB_STATUS_CHANGE"
	EventBlockJobReady     = "BLOCK_JOB_READY"
	EventBlockJobCompleted = "BLOCK_JOB_COMPLETED"
	EventBlockJobCancelled = "BLOCK_JOB_CANCELLED"
	EventBlockJobError     = "BLOCK_JOB_ERROR"
)
