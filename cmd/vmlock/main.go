// Command vmlock is the command-line client of vmlockd: the lock monitor,
// acquire/release/inquire for scripts, the `run` supervisor, and the
// project's benchmarks.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/lockmgr"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

// exitError carries a process exit status out of a command (for `run`,
// whose status is its child's).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// run executes the CLI and returns its exit status: 0 ok, and otherwise the
// lockmgr error code of the failure (2 usage or invalid argument, 3 busy,
// 4 stale state, 5 permission denied, 6 timeout, 7 not registered,
// 8 unsupported, 9 not held, 1 anything else).
func run(args []string) int {
	root := newRootCmd()
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	fmt.Fprintln(os.Stderr, "vmlock:", err)
	var ue usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") || strings.HasPrefix(err.Error(), "unknown flag") {
		return int(lockmgr.CodeInvalidArgument)
	}
	return int(lockmgr.CodeOf(err))
}

// usageError marks errors in the command line itself.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// annotationParallel marks a command that runs parallel code in-process
// (the benchmarks of hierlock, etcd and block jobs) and so keeps Go's
// default GOMAXPROCS.
const annotationParallel = "vmlock/parallel"

// jsonCommands are the commands whose output --output changes; the others
// print state strings or plain lines whatever it says.
const jsonCommands = "status, locks, vms, blockjob and migrate complete"

// globals are the flags every subcommand shares.
type globals struct {
	socket string
	output string
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "vmlock",
		Short:         "vmlock: the client of vmlockd, the lock manager for virtual machines",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		// A client of vmlockd makes one call at a time: with a single P the
		// goroutines of an RPC hand over on one thread, without a
		// cross-thread wake-up per call (which costs more than the call on
		// small VMs). Commands that run parallel code in-process say so.
		if _, parallel := cmd.Annotations[annotationParallel]; !parallel && os.Getenv("GOMAXPROCS") == "" {
			runtime.GOMAXPROCS(1)
		}
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.PersistentFlags().StringVar(&g.socket, "socket", "", "vmlockd's socket (default $VMLOCK_SOCKET, else /run/vmlock/vmlockd.sock as root, $XDG_RUNTIME_DIR/vmlock/vmlockd.sock otherwise)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format of "+jsonCommands+": table or json (the other commands print plain lines)")
	addCommands(root, g)
	root.AddCommand(newBenchCmd())
	markUsageErrors(root)
	return root
}

// markUsageErrors makes every command's argument check return a usageError,
// so that a wrong command line always exits 2.
func markUsageErrors(c *cobra.Command) {
	if check := c.Args; check != nil {
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := check(cmd, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
	for _, sub := range c.Commands() {
		markUsageErrors(sub)
	}
}
