package api

import (
	"context"

	"github.com/vmlock/vmlock/api/vmlockpb"
)

// The QEMU supervisor's calls (service vmlock.v1.QEMU). Each returns the
// daemon's reply and a lockmgr error (see FromStatus).

func (c *Client) qemu() vmlockpb.QEMUClient { return vmlockpb.NewQEMUClient(c.conn) }

// StartQEMU registers a VM whose process is about to execute QEMU, locks
// every drive's backing chain, and returns the monitor socket QEMU must
// serve (see vmlockpb.QEMUServer.Start).
func (c *Client) StartQEMU(ctx context.Context, req *vmlockpb.QEMUStartRequest) (*vmlockpb.QEMUStartReply, error) {
	rep, err := c.qemu().Start(ctx, req)
	return rep, FromStatus(err)
}

// QEMUVMs describes the supervised VM vm (uuid or name), or every VM if vm
// is "".
func (c *Client) QEMUVMs(ctx context.Context, vm string) ([]*vmlockpb.QEMUVM, error) {
	rep, err := c.qemu().List(ctx, &vmlockpb.QEMUListRequest{Vm: vm})
	return rep.GetVms(), FromStatus(err)
}

// AttachDisk locks an image's chain and adds the image to the VM.
func (c *Client) AttachDisk(ctx context.Context, req *vmlockpb.QEMUAttachDiskRequest) (*vmlockpb.QEMUDisk, error) {
	rep, err := c.qemu().AttachDisk(ctx, req)
	return rep, FromStatus(err)
}

// DetachDisk removes a disk from the VM and releases its chain.
func (c *Client) DetachDisk(ctx context.Context, vm, disk string) (*vmlockpb.QEMUDisk, error) {
	rep, err := c.qemu().DetachDisk(ctx, &vmlockpb.QEMUDetachDiskRequest{Vm: vm, Disk: disk})
	return rep, FromStatus(err)
}

// BlockCommit starts a commit job.
func (c *Client) BlockCommit(ctx context.Context, req *vmlockpb.BlockCommitRequest) (*vmlockpb.BlockJobInfo, error) {
	rep, err := c.qemu().BlockCommit(ctx, req)
	return rep, FromStatus(err)
}

// BlockCopy starts a copy job.
func (c *Client) BlockCopy(ctx context.Context, req *vmlockpb.BlockCopyRequest) (*vmlockpb.BlockJobInfo, error) {
	rep, err := c.qemu().BlockCopy(ctx, req)
	return rep, FromStatus(err)
}

// BlockJob shows, waits for, pivots or aborts a disk's job.
func (c *Client) BlockJob(ctx context.Context, req *vmlockpb.BlockJobRequest) (*vmlockpb.BlockJobInfo, error) {
	rep, err := c.qemu().BlockJob(ctx, req)
	return rep, FromStatus(err)
}
