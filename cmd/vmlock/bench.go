package main

import "github.com/spf13/cobra"

func newBenchCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "bench SCENARIO --json",
		Short: "run one of the project's benchmarks; prints one JSON object (docs/benchmarks.md)",
	}
	// One constructor per scenario, each in its own bench_<scenario>.go.
	for _, sub := range []func() *cobra.Command{
		newBenchDaemonCmd,
		newBenchScaleCmd,
		newBenchEtcdCmd,
		newBenchDriverCmd,
		newBenchHierlockCmd,
		newBenchBlockjobCmd,
		newBenchLibvirtCmd,
	} {
		c.AddCommand(sub())
	}
	c.AddCommand(newBenchInternalCmds()...)
	return c
}
