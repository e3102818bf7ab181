// Package qemutest holds test helpers that run QEMU's own tools, for the
// tests of the daemon and the end-to-end tests. It is not for production.
package qemutest

import (
	"bufio"
	"bytes"
	"io"
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// HoldOpen opens image with qemu-io (with opts, e.g. "-r", "-U") and keeps
// it open, holding QEMU's own image locks on it (OFD locks on bytes 100 and
// up; vmlock's lock is byte 0), until the returned function, also run at
// cleanup, closes it. It fails the test if qemu-io cannot open the image.
func HoldOpen(tb testing.TB, image string, opts ...string) (release func()) {
	tb.Helper()
	cmd := exec.Command("qemu-io", append(opts, image)...)
	in, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	release = sync.OnceFunc(func() {
		in.Close() // qemu-io quits at the end of its input
		cmd.Wait()
	})
	tb.Cleanup(release)
	// Its answer to a command says the image is open (and locked).
	io.WriteString(in, "length\n")
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || !strings.Contains(line, "MiB") {
		release()
		tb.Fatalf("qemu-io %s %s: %q, %v; stderr: %s", strings.Join(opts, " "), image, line, err, &stderr)
	}
	return release
}
