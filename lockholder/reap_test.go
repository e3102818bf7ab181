package lockholder

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// reexecEnv makes this test binary play vmlockd across a reload (TestMain
// runs reexecMain): it starts a holder, replaces its own image, and
// connects again from the new image.
const reexecEnv = "LOCKHOLDER_TEST_REEXEC"

// reexecMain is the process of TestAHolderStartedBeforeAReloadIsReaped. In
// its first image it starts a holder of dir and execs itself; in the
// second it connects to that holder, lets it go (a holder with no entries
// exits when its controller leaves) and prints the holder's state once it
// has exited: "gone" if reaped, "zombie" if not.
func reexecMain(dir string) error {
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	if os.Getenv(reexecEnv+"_IMAGE") == "" {
		cmd := Command(os.Args[0], "-test.run=^$")
		cmd.Env = []string{serveEnv + "=" + dir}
		if err := StartDetached(cmd); err != nil {
			return err
		}
		c, err := Connect(ctx, dir, func() error { return nil })
		if err != nil {
			return err
		}
		// An entry keeps the holder through the exec, as locks do.
		if err := c.Put(ctx, "O/x/0", []byte("{}"), nil); err != nil {
			return err
		}
		return syscall.Exec(os.Args[0], os.Args, append(os.Environ(), reexecEnv+"_IMAGE=2"))
	}
	c, err := Connect(ctx, dir, func() error { return fmt.Errorf("no holder to connect to") })
	if err != nil {
		return err
	}
	pid := c.PID()
	c.ReapIfChild() // as vmlockd does for a holder it did not start
	if err := c.Drop(ctx, "O/x/0"); err != nil {
		return err
	}
	c.Close()
	for ctx.Err() == nil {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			fmt.Println("gone")
			return nil
		}
		// The state follows the command name in parentheses.
		if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 0 && f[0] == "Z" {
			time.Sleep(200 * time.Millisecond) // a reaper may be on its way
			if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && strings.Contains(string(b), ") Z") {
				fmt.Println("zombie")
				return nil
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return ctx.Err()
}

// A lock-holder started before a reload is vmlockd's child, which the new
// image's runtime does not wait for: when it exits, the new image reaps it
// instead of leaving a zombie per reload.
func TestAHolderStartedBeforeAReloadIsReaped(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), reexecEnv+"="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the reloading process failed: %v\n%s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "gone" {
		t.Fatalf("the holder of the previous image, once exited, is %q, want gone (reaped)", got)
	}
}
