package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

func newHoldCmd(g *globals) *cobra.Command {
	var timeout time.Duration
	var priority int
	c := &cobra.Command{
		Use:   "hold [--timeout D] [--priority P] LEVEL/NAME[:shared]... -- COMMAND [ARGS]",
		Short: "take hierarchical locks, run COMMAND, release them when it exits (like flock(1), but hierarchical and fair)",
		Long: `hold takes hierarchical locks in vmlockd's level order, each level in one
call (LEVEL/* is the whole level; without the first level, its lock is taken
shared), runs COMMAND, and releases them when COMMAND exits. It exits with
COMMAND's status. --timeout 0 waits as long as it takes; a timeout under a
millisecond fails at once if the locks are busy (a try-lock). The locks are
the session's: if hold itself is killed, even by SIGKILL, COMMAND is killed
(SIGKILL) with it, and vmlockd releases the locks at once. If vmlockd ends
the session while COMMAND runs (it stopped, reloaded or crashed: the
locks live in its memory and are released), hold says so, sends COMMAND
SIGTERM (SIGKILL 5 s later) and exits with status 9 (not held).`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dash := cmd.ArgsLenAtDash()
			if dash < 1 || dash == len(args) {
				return usageError{errors.New("want LEVEL/NAME... -- COMMAND [ARGS]")}
			}
			req, err := parseHoldSpecs(args[:dash])
			if err != nil {
				return err
			}
			req.Priority = int32(priority)
			if req.TimeoutMs, err = holdTimeoutMs(timeout); err != nil {
				return err
			}
			command := args[dash:]
			path, err := exec.LookPath(command[0])
			if err != nil {
				return usageError{fmt.Errorf("command %q: %w", command[0], err)}
			}
			ctx := context.Background()
			client, err := g.dial(ctx)
			if err != nil {
				return err
			}
			defer client.Close()
			sess, err := client.HierSession(ctx)
			if err != nil {
				return err
			}
			defer sess.Close()
			if _, err := sess.Acquire(ctx, req); err != nil {
				return err
			}
			child := exec.Command(path, command[1:]...)
			child.Args[0] = command[0]
			child.Stdin, child.Stdout, child.Stderr = os.Stdin, os.Stdout, os.Stderr
			// COMMAND must not outlive the session that holds its locks:
			// the kernel kills it when hold dies. The death signal follows
			// the thread that forks, so keep this goroutine on its thread
			// (it lives until hold exits).
			child.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			runtime.LockOSThread()
			sigs := make(chan os.Signal, 4)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
			if err := child.Start(); err != nil {
				return fmt.Errorf("starting %s: %w", path, err)
			}
			go func() {
				for s := range sigs {
					child.Process.Signal(s)
				}
			}()
			exited := make(chan error, 1)
			go func() { exited <- child.Wait() }()
			select {
			case err = <-exited:
			case <-sess.Done():
				// The daemon ended the session (stopped, reloaded, crashed):
				// the locks are released, and COMMAND may not go on as if
				// it held them.
				signal.Stop(sigs)
				fmt.Fprintf(cmd.ErrOrStderr(), "vmlock hold: %v; stopping %s (SIGTERM, SIGKILL after %v)\n", sess.Err(), command[0], holdLostGrace)
				child.Process.Signal(syscall.SIGTERM)
				select {
				case <-exited:
				case <-time.After(holdLostGrace):
					child.Process.Kill()
					<-exited
				}
				return exitError{int(lockmgr.CodeNotHeld)}
			}
			signal.Stop(sigs)
			var ee *exec.ExitError
			switch {
			case err == nil:
				return nil
			case errors.As(err, &ee):
				if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					return exitError{128 + int(ws.Signal())}
				}
				return exitError{ee.ExitCode()}
			}
			return err
		},
	}
	c.Flags().DurationVar(&timeout, "timeout", 0, "give up (exit 6) if the locks are not all granted within this time; 0 waits")
	c.Flags().IntVar(&priority, "priority", 0, "request priority: lower is served first")
	return c
}

// holdLostGrace is how long COMMAND has to exit on SIGTERM once its locks
// are lost, before SIGKILL.
const holdLostGrace = 5 * time.Second

// holdTimeoutMs turns --timeout into the request's milliseconds: 0 waits,
// a positive timeout is rounded up (so that one under a millisecond is the
// try-lock, not a wait without end), a negative one is a usage error.
func holdTimeoutMs(d time.Duration) (int64, error) {
	if d < 0 {
		return 0, usageError{fmt.Errorf("--timeout %v: want 0 (wait) or a positive duration", d)}
	}
	ms := int64(d / time.Millisecond)
	if d%time.Millisecond != 0 {
		ms++
	}
	return ms, nil
}

// parseHoldSpecs groups LEVEL/NAME[:shared] arguments by level.
func parseHoldSpecs(specs []string) (*vmlockpb.HierAcquire, error) {
	req := &vmlockpb.HierAcquire{}
	byLevel := map[string]*vmlockpb.LevelRequest{}
	for _, s := range specs {
		spec, shared := strings.CutSuffix(s, ":shared")
		spec = strings.TrimSuffix(spec, ":exclusive")
		level, name, ok := strings.Cut(spec, "/")
		if !ok || level == "" || name == "" {
			return nil, usageError{fmt.Errorf("lock %q: want LEVEL/NAME[:shared] or LEVEL/*", s)}
		}
		lr := byLevel[level]
		if lr == nil {
			lr = &vmlockpb.LevelRequest{Level: level, Shared: shared}
			byLevel[level] = lr
			req.Levels = append(req.Levels, lr)
		} else if lr.Shared != shared {
			return nil, usageError{fmt.Errorf("level %s: one mode per level (each level is acquired in one call)", level)}
		}
		if name == "*" {
			lr.All = true
		} else if !slices.Contains(lr.Names, name) {
			lr.Names = append(lr.Names, name)
		}
		if lr.All && len(lr.Names) > 0 {
			return nil, usageError{fmt.Errorf("level %s: both %s/* and single names", level, level)}
		}
	}
	return req, nil
}
