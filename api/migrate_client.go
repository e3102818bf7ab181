package api

import (
	"context"

	"github.com/vmlock/vmlock/api/vmlockpb"
)

// MigratePrepare is the source's first step of a migration handover: it
// marks the object uuid as migrating to the host named to (that vmlockd's
// host name), makes its exclusive holds shared with the same tokens, and
// returns the handover state that the destination passes to Acquire.
func (c *Client) MigratePrepare(ctx context.Context, uuid, to string) (string, error) {
	rep, err := vmlockpb.NewMigrateClient(c.conn).Prepare(ctx, &vmlockpb.MigratePrepareRequest{Uuid: uuid, ToHost: to})
	return rep.GetState(), FromStatus(err)
}

// MigrateResult is what MigrateComplete did on this side.
type MigrateResult struct {
	State    string // what this side released, or what it keeps
	Role     string // "source" or "target"
	Released bool   // this side gave the object up
}

// MigrateComplete ends the handover on this side: without cancel the source
// releases and the target takes its resources exclusively again; with
// cancel the target releases and the source takes them back. The side
// that keeps the object waits, within ctx, until the other side has
// released.
func (c *Client) MigrateComplete(ctx context.Context, uuid string, cancel bool) (MigrateResult, error) {
	rep, err := vmlockpb.NewMigrateClient(c.conn).Complete(ctx, &vmlockpb.MigrateCompleteRequest{Uuid: uuid, Cancel: cancel})
	if err != nil {
		return MigrateResult{}, FromStatus(err)
	}
	return MigrateResult{State: rep.State, Role: rep.Role, Released: rep.Released}, nil
}
