package qmp

import (
	"context"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// qemuBinary returns the path of qemu-system-x86_64. Without it the test
// is skipped, except under CI=true, where a missing QEMU is a failure.
func qemuBinary(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but qemu-system-x86_64 is not installed (Debian package qemu-system-x86): %v", err)
		}
		t.Skipf("qemu-system-x86_64 not installed: %v", err)
	}
	return p
}

// testCtx returns a context that ends with the test or after a generous
// safety timeout (never a timing assertion: only a guard against hangs).
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// baseArgs is the smallest QEMU that serves QMP: no machine, no devices,
// no guest, TCG.
var baseArgs = []string{"-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"}

type qemuProc struct {
	*exec.Cmd
	waitOnce sync.Once
	waitErr  error
}

// Wait waits for QEMU once; later calls return the first result.
func (p *qemuProc) Wait() error {
	p.waitOnce.Do(func() { p.waitErr = p.Cmd.Wait() })
	return p.waitErr
}

// startQEMU starts a QEMU with baseArgs plus extra and a QMP monitor; the
// client is closed and QEMU killed when the test ends.
func startQEMU(t testing.TB, extra ...string) (*Client, *qemuProc) {
	t.Helper()
	bin := qemuBinary(t)
	args := append(append([]string(nil), baseArgs...), extra...)
	c, cmd, err := StartQEMU(testCtx(t), bin, args)
	if err != nil {
		t.Fatalf("StartQEMU: %v", err)
	}
	p := &qemuProc{Cmd: cmd}
	t.Cleanup(func() {
		c.Close()
		p.Process.Kill()
		p.Wait()
	})
	return c, p
}
