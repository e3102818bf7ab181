package main

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api"
)

// newMigrateCmd is the lock side of a live migration (see
// docs/architecture.md, "Migration handover"):
//
//	source:      vmlock migrate prepare --uuid U --to HOST     → prints the handover state S
//	destination: vmlock acquire --uuid U --pid P [--disk ...] --state S
//	both:        vmlock migrate complete --uuid U [--cancel]
func newMigrateCmd(g *globals) *cobra.Command {
	m := &cobra.Command{
		Use:   "migrate",
		Short: "hand an object's locks over to another host during a live migration",
		Long: `The lock side of a live migration:

  on the source:       vmlock migrate prepare --uuid U --to DEST_HOST
                       prints a handover state S; exclusive disks become shared
                       (same token) so that both QEMUs may have them open
  on the destination:  vmlock acquire --uuid U --pid P [--disk ...] --state S
                       granted only if nobody else took the resources since
  on both, when done:  vmlock migrate complete --uuid U [--cancel]
                       success: the source releases, the destination keeps
                       (exclusive again); --cancel: the destination releases,
                       the source keeps`,
	}
	var uuid, to string
	prep := &cobra.Command{
		Use:   "prepare --uuid U --to HOST",
		Short: "on the source: mark the object as migrating to HOST and print the handover state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if uuid == "" || to == "" {
				return usageError{fmt.Errorf("--uuid and --to are required")}
			}
			return g.printState(cmd, func(ctx context.Context, c *api.Client) (string, error) {
				return c.MigratePrepare(ctx, uuid, to)
			})
		},
	}
	prep.Flags().StringVar(&uuid, "uuid", "", "the object's uuid")
	prep.Flags().StringVar(&to, "to", "", "the destination vmlockd's host name")

	var cuuid string
	var cancelFlag bool
	complete := &cobra.Command{
		Use:   "complete --uuid U [--cancel]",
		Short: "on both sides: end the handover (the source releases, or with --cancel the destination releases)",
		Long: `Ends the handover on this side and prints the state of what this side
released, or of what it keeps. The side that keeps the object takes its disks
exclusively again once the other side has released them, waiting for that
within the daemon's request timeout.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cuuid == "" {
				return usageError{fmt.Errorf("--uuid is required")}
			}
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				res, err := c.MigrateComplete(ctx, cuuid, cancelFlag)
				if err != nil {
					return err
				}
				if asJSON {
					return writeJSON(cmd.OutOrStdout(), map[string]any{"state": res.State, "role": res.Role, "released": res.Released})
				}
				fmt.Fprintln(cmd.OutOrStdout(), res.State)
				return nil
			})
		},
	}
	complete.Flags().StringVar(&cuuid, "uuid", "", "the object's uuid")
	complete.Flags().BoolVar(&cancelFlag, "cancel", false, "the migration failed: the destination releases, the source keeps")
	m.AddCommand(prep, complete)
	return m
}
