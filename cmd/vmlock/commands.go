package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/api"
	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// callTimeout bounds every call to the daemon.
const callTimeout = 30 * time.Second

// maxDaemonGrace is how long revoke waits for a daemon whose kill grace it
// does not know (no --grace) beyond callTimeout: the longest it may be.
const maxDaemonGrace = api.MaxGrace

func (g *globals) socketPath() string {
	if g.socket != "" {
		return g.socket
	}
	if s := os.Getenv("VMLOCK_SOCKET"); s != "" {
		return s
	}
	return api.DefaultSocket()
}

func (g *globals) dial(ctx context.Context) (*api.Client, error) {
	return api.Dial(ctx, g.socketPath())
}

// call runs f with a connection to the daemon, bounded by the CLI's call
// timeout.
func (g *globals) call(cmd *cobra.Command, f func(ctx context.Context, c *api.Client) error) error {
	return g.callWithin(cmd, callTimeout, f)
}

// callWithin runs f with a connection to the daemon, bounded by timeout.
func (g *globals) callWithin(cmd *cobra.Command, timeout time.Duration, f func(ctx context.Context, c *api.Client) error) error {
	ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
	defer cancel()
	c, err := g.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return f(ctx, c)
}

// execHolding replaces this process with path, which inherits the locks
// vmlockd holds for object uuid. It returns only if exec failed, after
// giving those locks back.
func (g *globals) execHolding(path string, argv []string, uuid string) error {
	err := syscall.Exec(path, argv, os.Environ())
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if c, derr := g.dial(ctx); derr == nil {
		_, _ = c.Release(ctx, uuid)
		c.Close()
	}
	fmt.Fprintf(os.Stderr, "vmlock: cannot execute %s: %v\n", path, err)
	return exitError{126}
}

// printState runs a call that answers with a state string, and prints it.
func (g *globals) printState(cmd *cobra.Command, f func(ctx context.Context, c *api.Client) (string, error)) error {
	return g.call(cmd, func(ctx context.Context, c *api.Client) error {
		st, err := f(ctx, c)
		if err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), st)
		return nil
	})
}

func (g *globals) json() (bool, error) {
	switch g.output {
	case "table", "":
		return false, nil
	case "json":
		return true, nil
	}
	return false, usageError{fmt.Errorf("--output %q: want table or json", g.output)}
}

// resourceFlags are the --disk, --lease and --resource flags of acquire and run.
type resourceFlags struct {
	disks, leases, customs []string
}

func (rf *resourceFlags) add(c *cobra.Command) {
	c.Flags().StringArrayVar(&rf.disks, "disk", nil, "a disk image: PATH[:shared|:readonly] (repeatable)")
	c.Flags().StringArrayVar(&rf.leases, "lease", nil, "a lease: LOCKSPACE/KEY[:shared] (repeatable)")
	c.Flags().StringArrayVar(&rf.customs, "resource", nil, "a resource of a custom type: TYPE:NAME[:shared|:readonly] (repeatable)")
}

// splitMode splits a trailing ":MODE" off s; a path may itself contain
// colons, so only a known mode name counts.
func splitMode(s string) (string, lockmgr.Mode) {
	if i := strings.LastIndexByte(s, ':'); i >= 0 {
		switch s[i+1:] {
		case "shared", "readonly", "exclusive":
			m, _ := lockmgr.ParseMode(s[i+1:])
			return s[:i], m
		}
	}
	return s, lockmgr.Exclusive
}

func (rf *resourceFlags) resources() ([]lockmgr.Resource, error) {
	var rs []lockmgr.Resource
	for _, d := range rf.disks {
		p, m := splitMode(d)
		p, err := absDisk(p)
		if err != nil {
			return nil, err
		}
		rs = append(rs, lockmgr.DiskResource(p, m))
	}
	for _, l := range rf.leases {
		n, m := splitMode(l)
		rs = append(rs, lockmgr.Resource{Type: lockmgr.TypeLease, Name: n, Mode: m})
	}
	for _, c := range rf.customs {
		t, rest, ok := strings.Cut(c, ":")
		if !ok {
			return nil, usageError{fmt.Errorf("--resource %q: want TYPE:NAME[:MODE]", c)}
		}
		n, m := splitMode(rest)
		if lockmgr.ResourceType(t) == lockmgr.TypeDisk {
			var err error
			if n, err = absDisk(n); err != nil {
				return nil, err
			}
		}
		rs = append(rs, lockmgr.Resource{Type: lockmgr.ResourceType(t), Name: n, Mode: m})
	}
	for _, r := range rs {
		if err := r.Validate(); err != nil {
			return nil, err
		}
	}
	return rs, nil
}

// absDisk makes a disk path absolute against our working directory: vmlockd
// resolves a relative path against its own, which is another. A path
// through our own descriptors (/dev/stdin, /proc/self/fd/N) is resolved
// here, for the same reason: vmlockd's are others.
func absDisk(p string) (string, error) {
	if p == "" {
		return p, nil // refused by Validate
	}
	a, err := filepath.Abs(p)
	if err != nil {
		return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "disk path %q: %v", p, err)
	}
	if api.SelfRelative(a) {
		real, err := filepath.EvalSymlinks(a)
		if err != nil {
			return "", lockmgr.Errorf(lockmgr.CodeInvalidArgument, "disk path %s names no file (a pipe? a deleted file?): %v", p, err)
		}
		return real, nil
	}
	return a, nil
}

// parseResource reads the RESOURCE argument of revoke: TYPE:NAME, or a bare
// path for a disk. A relative disk path is made absolute (see absDisk).
func parseResource(s string) (lockmgr.Resource, error) {
	r := lockmgr.DiskResource(s, lockmgr.Exclusive)
	if !strings.HasPrefix(s, "/") && !strings.HasPrefix(s, ".") {
		if t, n, ok := strings.Cut(s, ":"); ok {
			r = lockmgr.Resource{Type: lockmgr.ResourceType(t), Name: n}
		}
	}
	if r.Type == lockmgr.TypeDisk {
		p, err := absDisk(r.Name)
		if err != nil {
			return r, err
		}
		r.Name = p
	}
	return r, r.Validate()
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func addCommands(root *cobra.Command, g *globals) {
	root.AddCommand(newStatusCmd(g), newLocksCmd(g), newAcquireCmd(g), newReleaseCmd(g), newInquireCmd(g),
		newRunCmd(g), newRevokeCmd(g), newDaemonCmd(g), newHoldCmd(g),
		newBlockCommitCmd(g), newBlockCopyCmd(g), newBlockJobCmd(g), newDiskCmd(g), newVMsCmd(g))
	root.AddCommand(newMigrateCmd(g))
}

func newStatusCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "show the daemon's version, driver, uptime and counts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				st, err := c.Status(ctx)
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				if asJSON {
					return writeJSON(out, map[string]any{
						"version": st.Version, "driver": st.Driver, "uptime_seconds": st.UptimeSeconds,
						"objects": st.Objects, "locks": st.Locks, "pid": st.Pid, "host": st.Host,
						"state_dir": st.StateDir, "reloads": st.Reloads,
					})
				}
				tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintf(tw, "version:\t%s\ndriver:\t%s\nuptime:\t%s\npid:\t%d\nhost:\t%s\nstate dir:\t%s\nobjects:\t%d\nlocks:\t%d\nreloads:\t%d\n",
					st.Version, st.Driver, (time.Duration(st.UptimeSeconds) * time.Second).String(), st.Pid, st.Host, st.StateDir, st.Objects, st.Locks, st.Reloads)
				return tw.Flush()
			})
		},
	}
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newLocksCmd(g *globals) *cobra.Command {
	var sortBy string
	c := &cobra.Command{
		Use:   "locks",
		Short: "the lock monitor: every held resource with its mode, holders, token and age",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			asJSON, err := g.json()
			if err != nil {
				return err
			}
			less, ok := lockOrders[sortBy]
			if !ok {
				return usageError{fmt.Errorf("--sort %q: want resource, age, token or holder", sortBy)}
			}
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				mon, err := c.Monitor(ctx)
				if err != nil {
					return err
				}
				locks := mon.Locks
				slices.SortStableFunc(locks, less)
				hier, err := c.HierMonitor(ctx)
				if err != nil {
					// The resource locks are the monitor's point: show them
					// even if the daemon cannot list its hierarchical locks.
					fmt.Fprintln(cmd.ErrOrStderr(), "vmlock: hierarchical locks not shown:", err)
					hier = &vmlockpb.HierMonitorReply{}
				}
				jobs := blockJobsOf(ctx, c)
				if asJSON {
					return writeJSON(cmd.OutOrStdout(), monitorJSON{Resources: locks, Untracked: mon.Untracked, Hierarchical: hierJSON(hier), BlockJobs: jobs})
				}
				if err := printLocks(cmd.OutOrStdout(), locks, time.Now()); err != nil {
					return err
				}
				if err := printUntracked(cmd.OutOrStdout(), mon.Untracked); err != nil {
					return err
				}
				if err := printBlockJobs(cmd.OutOrStdout(), jobs); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout())
				return printHier(cmd.OutOrStdout(), hier)
			})
		},
	}
	c.Flags().StringVar(&sortBy, "sort", "resource", "sort by resource, age, token or holder")
	return c
}

var lockOrders = map[string]func(a, b api.Lock) int{
	"resource": func(a, b api.Lock) int { return cmp.Compare(a.Resource.Key(), b.Resource.Key()) },
	"age":      func(a, b api.Lock) int { return a.Since.Compare(b.Since) },
	"token":    func(a, b api.Lock) int { return cmp.Compare(a.Token, b.Token) },
	"holder": func(a, b api.Lock) int {
		return cmp.Compare(firstHolder(a), firstHolder(b))
	},
}

// monitorJSON is what `vmlock locks -o json` prints.
type monitorJSON struct {
	Resources []api.Lock `json:"resources"`
	// Untracked are the holdings vmlockd keeps locked without managing
	// them (docs/operations.md, "Troubleshooting").
	Untracked    []api.Untracked `json:"untracked,omitempty"`
	Hierarchical []hierLockRow   `json:"hierarchical"`
	// BlockJobs are the QEMU block jobs in progress (see qemu.go).
	BlockJobs []*vmlockpb.BlockJobInfo `json:"block_jobs,omitempty"`
}

type hierLockRow struct {
	Name    string           `json:"name"`
	Mode    string           `json:"mode"`
	Owners  []string         `json:"owners"`
	Pending []hierPendingRow `json:"pending"`
}

type hierPendingRow struct {
	Mode     string   `json:"mode"`
	Priority int32    `json:"priority"`
	Owners   []string `json:"owners"`
}

func hierJSON(rep *vmlockpb.HierMonitorReply) []hierLockRow {
	rows := make([]hierLockRow, 0, len(rep.Locks))
	for _, l := range rep.Locks {
		r := hierLockRow{Name: l.Name, Mode: l.Mode, Owners: l.Owners, Pending: []hierPendingRow{}}
		if r.Owners == nil {
			r.Owners = []string{}
		}
		for _, p := range l.Pending {
			r.Pending = append(r.Pending, hierPendingRow{Mode: p.Mode, Priority: p.Priority, Owners: p.Owners})
		}
		rows = append(rows, r)
	}
	return rows
}

// printHier prints the hierarchical locks that are held or awaited, as
// Ganeti's gnt-debug locks does; idle ones are only counted (-o json lists
// them all).
func printHier(w io.Writer, rep *vmlockpb.HierMonitorReply) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HIERARCHICAL LOCK\tMODE\tOWNERS\tPENDING")
	idle := 0
	for _, l := range rep.Locks {
		if len(l.Owners) == 0 && len(l.Pending) == 0 {
			idle++
			continue
		}
		var pend []string
		for _, p := range l.Pending {
			pend = append(pend, fmt.Sprintf("%s:%s", p.Mode, strings.Join(p.Owners, ",")))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", l.Name, l.Mode, orDash(strings.Join(l.Owners, ",")), orDash(strings.Join(pend, " ")))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "(%d idle hierarchical locks not shown)\n", idle)
	return err
}

func orDash(s string) string { return cmp.Or(s, "-") }

func firstHolder(l api.Lock) string {
	if len(l.Holders) == 0 {
		return ""
	}
	return l.Holders[0].Name + "\x00" + l.Holders[0].UUID
}

func printLocks(w io.Writer, locks []api.Lock, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TYPE\tRESOURCE\tMODE\tTOKEN\tAGE\tWAITERS\tHOLDERS")
	for _, l := range locks {
		var hs []string
		for _, h := range l.Holders {
			s := fmt.Sprintf("%s (uuid %s, pid %d, host %s", cmp.Or(h.Name, "-"), h.UUID, h.PID, cmp.Or(h.Host, "-"))
			if len(l.Holders) > 1 || h.Mode != l.Resource.Mode {
				s += ", " + h.Mode.String()
			}
			hs = append(hs, s+")")
		}
		age := "-"
		if !l.Since.IsZero() {
			age = now.Sub(l.Since).Truncate(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\n", l.Resource.Type, l.Resource.Name, l.Resource.Mode, l.Token, age, l.Waiters, strings.Join(hs, "; "))
	}
	return tw.Flush()
}

// printUntracked lists the holdings vmlockd keeps locked without managing
// them, if any, after the lock table.
func printUntracked(w io.Writer, us []api.Untracked) error {
	if len(us) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nHELD, NOT MANAGED (see docs/operations.md, Troubleshooting)\tPID\tUNTIL\tRESOURCES\tWHY")
	for _, u := range us {
		until := "resolved by hand"
		if u.UntilOwnerExits {
			until = "its owner exits"
		}
		rs := make([]string, 0, len(u.Resources))
		for _, r := range u.Resources {
			rs = append(rs, r.String())
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", cmp.Or(u.UUID, strings.Join(u.Keys, " ")), u.PID, until, cmp.Or(strings.Join(rs, ", "), "-"), u.Problem)
	}
	return tw.Flush()
}

// objectFlags are the identity flags of acquire and run.
type objectFlags struct {
	uuid, name, uri string
	id, pid         int
}

func (of *objectFlags) add(c *cobra.Command, withPID bool) {
	c.Flags().StringVar(&of.uuid, "uuid", "", "the object's uuid")
	c.Flags().StringVar(&of.name, "name", "", "the object's name (shown to operators)")
	c.Flags().IntVar(&of.id, "id", 0, "the object's id (e.g. a domain id)")
	c.Flags().StringVar(&of.uri, "uri", "", "the object's URI")
	if withPID {
		c.Flags().IntVar(&of.pid, "pid", 0, "the owner process: the locks live until it exits or are released")
	}
}

func (of *objectFlags) object() lockmgr.Object {
	return lockmgr.Object{UUID: of.uuid, Name: of.name, ID: of.id, PID: of.pid, URI: of.uri}
}

func newAcquireCmd(g *globals) *cobra.Command {
	var of objectFlags
	var rf resourceFlags
	var state string
	c := &cobra.Command{
		Use:   "acquire --uuid U --pid P [--name N] [--id I] [--state S] --disk PATH[:MODE]... [--lease LS/KEY[:shared]]... [--resource TYPE:NAME[:MODE]]...",
		Short: "acquire resources for an object owned by process P (all or nothing); prints the state string",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if of.uuid == "" || of.pid == 0 {
				return usageError{fmt.Errorf("--uuid and --pid are required")}
			}
			rs, err := rf.resources()
			if err != nil {
				return err
			}
			o := of.object()
			if err := o.Validate(); err != nil {
				return err
			}
			return g.printState(cmd, func(ctx context.Context, c *api.Client) (string, error) {
				return c.Acquire(ctx, o, rs, state)
			})
		},
	}
	of.add(c, true)
	rf.add(c)
	c.Flags().StringVar(&state, "state", "", "a state string from release or inquire: grant only if its tokens are current (migration)")
	return c
}

func newReleaseCmd(g *globals) *cobra.Command {
	var uuid string
	var rf resourceFlags
	c := &cobra.Command{
		Use:   "release --uuid U [--disk PATH]... [--lease LS/KEY]... [--resource TYPE:NAME]...",
		Short: "release all of an object's resources, or the given ones (unplug); prints the released state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if uuid == "" {
				return usageError{fmt.Errorf("--uuid is required")}
			}
			rs, err := rf.resources()
			if err != nil {
				return err
			}
			return g.printState(cmd, func(ctx context.Context, c *api.Client) (string, error) {
				return c.Release(ctx, uuid, rs...)
			})
		},
	}
	c.Flags().StringVar(&uuid, "uuid", "", "the object's uuid")
	rf.add(c)
	return c
}

func newInquireCmd(g *globals) *cobra.Command {
	var uuid string
	c := &cobra.Command{
		Use:   "inquire --uuid U",
		Short: "print the state string of what an object holds",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if uuid == "" {
				return usageError{fmt.Errorf("--uuid is required")}
			}
			return g.printState(cmd, func(ctx context.Context, c *api.Client) (string, error) {
				return c.Inquire(ctx, uuid)
			})
		},
	}
	c.Flags().StringVar(&uuid, "uuid", "", "the object's uuid")
	return c
}

func newRunCmd(g *globals) *cobra.Command {
	var of objectFlags
	var rf resourceFlags
	var qemuVM bool
	c := &cobra.Command{
		Use:   "run [--name N] [--uuid U] --disk PATH[:MODE]... [--lease ...] -- COMMAND [ARGS]",
		Short: "acquire the resources, then become COMMAND: the locks live exactly as long as it does",
		Long: `run acquires every resource for this process, then executes COMMAND in its
place (same pid), so the locks are COMMAND's: they are released when it exits,
for whatever reason, and a revocation kills it. run exits with COMMAND's exit
status; when a resource is busy it does not start COMMAND and exits 3, naming
the holder.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 0 {
				return usageError{fmt.Errorf("put COMMAND after --")}
			}
			if qemuVM {
				return runQEMU(cmd, g, &of, &rf, args)
			}
			rs, err := rf.resources()
			if err != nil {
				return err
			}
			path, err := exec.LookPath(args[0])
			if err != nil {
				return usageError{fmt.Errorf("command %q: %w", args[0], err)}
			}
			o := of.object()
			o.PID = os.Getpid()
			if o.UUID == "" {
				o.UUID = newUUID()
			}
			if o.Name == "" {
				o.Name = args[0]
			}
			if err := o.Validate(); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), callTimeout)
			defer cancel()
			c, err := g.dial(ctx)
			if err != nil {
				return err
			}
			if _, err := c.Acquire(ctx, o, rs, ""); err != nil {
				c.Close()
				return err
			}
			c.Close()
			return g.execHolding(path, args, o.UUID)
		},
	}
	of.add(c, false)
	rf.add(c)
	c.Flags().BoolVar(&qemuVM, "qemu", false, "COMMAND is QEMU: lock every disk's whole backing chain (as QEMU uses it) and let vmlockd supervise it")
	return c
}

func newRevokeCmd(g *globals) *cobra.Command {
	var grace time.Duration
	c := &cobra.Command{
		Use:   "revoke RESOURCE",
		Short: "kill the holders of a resource (SIGTERM, then SIGKILL after --grace) and free it",
		Long:  "RESOURCE is a disk path, or TYPE:NAME (disk:/path, lease:LOCKSPACE/KEY, or a custom type).",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if grace < 0 || grace > 0 && grace < time.Millisecond || grace > api.MaxGrace {
				return usageError{fmt.Errorf("--grace %v: want 0 (the daemon's) or 1ms up to %v", grace, api.MaxGrace)}
			}
			r, err := parseResource(args[0])
			if err != nil {
				return err
			}
			// The daemon bounds the call by the grace period and its request
			// timeout; without --grace the CLI does not know the daemon's
			// grace, so it waits for it generously rather than give up on a
			// revocation that is still killing.
			wait := grace
			if wait == 0 {
				wait = maxDaemonGrace
			}
			return g.callWithin(cmd, callTimeout+wait, func(ctx context.Context, c *api.Client) error {
				pids, err := c.Revoke(ctx, r, grace)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "revoked %s: killed pid(s) %v; it is free\n", r, pids)
				return nil
			})
		},
	}
	c.Flags().DurationVar(&grace, "grace", 0, "time between SIGTERM and SIGKILL, up to 1h (default: the daemon's revoke.grace, 5s unless configured)")
	return c
}

func newDaemonCmd(g *globals) *cobra.Command {
	d := &cobra.Command{Use: "daemon", Short: "control vmlockd"}
	d.AddCommand(&cobra.Command{
		Use:   "reload",
		Short: "re-execute vmlockd in place; every lock stays held",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(cmd, func(ctx context.Context, c *api.Client) error {
				before, err := c.Status(ctx)
				if err != nil {
					return err
				}
				if _, err := c.Reload(ctx); err != nil {
					return err
				}
				// Wait until the new image serves.
				for {
					st, err := c.Status(ctx)
					if err == nil && st.Reloads > before.Reloads {
						fmt.Fprintf(cmd.OutOrStdout(), "vmlockd reloaded (pid %d, %d locks held)\n", st.Pid, st.Locks)
						return nil
					}
					select {
					case <-ctx.Done():
						return lockmgr.Errorf(lockmgr.CodeTimeout, "vmlockd did not come back from the reload in time")
					case <-time.After(20 * time.Millisecond):
					}
				}
			})
		},
	})
	return d
}
