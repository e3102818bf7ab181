package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/qmp"
)

// need returns the path of a QEMU tool. Without it the test is skipped,
// except under CI=true, where a missing tool is a failure.
func need(t testing.TB, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %s is not installed (Debian packages qemu-system-x86, qemu-utils): %v", tool, err)
		}
		t.Skipf("%s not installed: %v", tool, err)
	}
	return p
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// run runs a command and fails the test if it fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(need(t, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuIO runs qemu-io commands on an image and fails the test if any
// fails. qemu-io exits 0 even when a read -P pattern check fails, so the
// output is checked too.
func qemuIO(t testing.TB, image string, readOnly bool, cmds ...string) {
	t.Helper()
	var args []string
	nbd := strings.HasPrefix(image, "nbd")
	if readOnly {
		args = append(args, "-r")
		if !nbd {
			args = append(args, "-U") // images QEMU may hold are read anyway
		}
	}
	if nbd {
		args = append(args, "-f", "raw")
	}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := run(t, "qemu-io", append(args, image)...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed:") {
		t.Fatalf("qemu-io %s %q:\n%s", image, cmds, out)
	}
}

// Layer contents: each layer writes its own 1 MiB region, mid also
// overrides part of base.
const (
	mib       = 1 << 20
	imageSize = 4 * mib
)

// checkMerged checks that image (with whatever backing chain it has)
// reads as the merged chain.
func checkMerged(t testing.TB, image string) {
	t.Helper()
	qemuIO(t, image, true,
		"read -P 0x11 0 1M",
		"read -P 0x22 1M 1M",
		"read -P 0x33 2M 1M",
	)
}

type chain struct {
	dir             string
	base, mid, top  string
	nbdSock, nbdURL string
}

// makeChain creates base ← mid ← top (qcow2) with data in every layer:
// base 0x11 in [0,2M), mid 0x22 in [1M,2M), top 0x33 in [2M,3M).
func makeChain(t testing.TB) *chain {
	t.Helper()
	// Short paths: unix socket paths must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "vq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &chain{
		dir:     dir,
		base:    filepath.Join(dir, "base.qcow2"),
		mid:     filepath.Join(dir, "mid.qcow2"),
		top:     filepath.Join(dir, "top.qcow2"),
		nbdSock: filepath.Join(dir, "nbd.sock"),
	}
	c.nbdURL = "nbd+unix:///top?socket=" + c.nbdSock
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", c.base, fmt.Sprint(imageSize))
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", c.base, "-F", "qcow2", c.mid)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", c.mid, "-F", "qcow2", c.top)
	qemuIO(t, c.base, false, "write -P 0x11 0 2M")
	qemuIO(t, c.mid, false, "write -P 0x22 1M 1M")
	qemuIO(t, c.top, false, "write -P 0x33 2M 1M")
	return c
}

// startQEMU starts QEMU (-machine none, TCG) with a QMP client; it is
// killed when the test ends.
func startQEMU(t testing.TB, extra ...string) (*qmp.Client, *exec.Cmd) {
	t.Helper()
	return startQEMUIn(t, "", extra...)
}

// startQEMUIn is startQEMU with dir as QEMU's working directory ("": the
// test's).
func startQEMUIn(t testing.TB, dir string, extra ...string) (*qmp.Client, *exec.Cmd) {
	t.Helper()
	bin := need(t, "qemu-system-x86_64")
	args := append([]string{"-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"}, extra...)
	var stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stderr = &stderr
	c, err := qmp.Start(testCtx(t), cmd)
	if err != nil {
		t.Fatalf("starting QEMU: %v\n%s", err, stderr.String())
	}
	t.Cleanup(func() {
		c.Close()
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return c, cmd
}

// quit makes QEMU exit cleanly (flushing and closing its images).
func quit(t testing.TB, c *qmp.Client, cmd *exec.Cmd) {
	t.Helper()
	if err := c.Execute(testCtx(t), "quit", nil, nil); err != nil && !strings.Contains(err.Error(), "connection lost") {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("QEMU exit: %v", err)
	}
}

// addChain adds the chain as explicit nodes base, mid, top and exports top
// writable over NBD. The backing nodes are opened read-write: QEMU refuses
// to commit into a node opened with an explicit read-only=true (management
// software reopens it first with blockdev-reopen).
func addChain(t testing.TB, c *qmp.Client, ch *chain) {
	t.Helper()
	ctx := testCtx(t)
	base := Qcow2File("base", ch.base, false, true)
	mid := Qcow2File("mid", ch.mid, false, false)
	mid["backing"] = "base"
	top := Qcow2File("top", ch.top, false, false)
	top["backing"] = "mid"
	for _, n := range []map[string]any{base, mid, top} {
		if err := BlockdevAdd(ctx, c, n); err != nil {
			t.Fatal(err)
		}
	}
	export(t, c, ch, "top")
}

func export(t testing.TB, c *qmp.Client, ch *chain, node string) {
	t.Helper()
	ctx := testCtx(t)
	if err := c.Execute(ctx, "nbd-server-start", map[string]any{
		"addr": map[string]any{"type": "unix", "data": map[string]any{"path": ch.nbdSock}},
	}, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(ctx, "block-export-add", map[string]any{
		"type": "nbd", "id": "exp0", "node-name": node, "name": "top", "writable": true,
	}, nil); err != nil {
		t.Fatal(err)
	}
}

// exportedNode returns the node the NBD export currently serves.
func exportedNode(t testing.TB, c *qmp.Client) string {
	t.Helper()
	var exports []struct {
		ID       string `json:"id"`
		NodeName string `json:"node-name"`
	}
	if err := c.Execute(testCtx(t), "query-block-exports", nil, &exports); err != nil {
		t.Fatal(err)
	}
	if len(exports) != 1 {
		t.Fatalf("exports: %+v", exports)
	}
	return exports[0].NodeName
}

func ptr[T any](v T) *T { return &v }

func names(nodes []*Node) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.Name)
	}
	return out
}
