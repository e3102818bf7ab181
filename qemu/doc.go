// Package qemu holds typed helpers over QMP (package qmp) for what vmlock
// needs from a running QEMU: its block graph (nodes, backing chains, the
// files each image uses; Disks sums it up per disk) and its two-phase
// block jobs (block-commit, blockdev-mirror, job-complete,
// block-job-cancel, query-jobs). Before QEMU runs, ParseCommandLine reads
// the images its command line names and BackingChain the chain an image's
// headers name (qemu-img), so that locks can precede QEMU's first write.
//
// The package has no lock logic: it reports what QEMU does, precisely
// enough for a supervisor to move locks along with the data. Every call
// takes a context and a connected *qmp.Client; QEMU's error replies are
// returned as *qmp.Error (wrapped), so errors.As works on them.
//
// Two-phase jobs: an active-layer commit and a mirror run to the "ready"
// status, then wait until the user completes them (job-complete: pivot to
// the base or the copy) or cancels them (block-job-cancel: keep the top;
// a commit's data is nevertheless already in the base). An intermediate
// commit has no ready phase and ends by itself. [Job] tracks one job from
// before its start, so it cannot miss a status change, and reports its
// outcome, including the I/O error QEMU gives when a job fails.
package qemu
