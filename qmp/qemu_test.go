package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Tests against a real QEMU (-machine none, TCG, no guest).

func TestQEMUHandshake(t *testing.T) {
	c, _ := startQEMU(t)
	g := c.Greeting()
	if g.Version.QEMU.Major < 2 {
		t.Fatalf("greeting version %v: want a real QEMU version", g.Version)
	}
	if !slices.Contains(g.Capabilities, "oob") {
		t.Errorf("greeting capabilities %q: want oob offered", g.Capabilities)
	}
	// Capabilities were negotiated: a command works (before negotiation
	// QEMU answers every command except qmp_capabilities with CommandNotFound).
	if err := c.Execute(testCtx(t), "query-status", nil, nil); err != nil {
		t.Fatalf("query-status after handshake: %v", err)
	}
	// A second qmp_capabilities is refused: we are in command mode.
	err := c.Execute(testCtx(t), "qmp_capabilities", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("second qmp_capabilities: got %v, want CommandNotFound", err)
	}
}

func TestQEMUQueryStatusAndVersion(t *testing.T) {
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Status != "running" || !st.Running {
		t.Fatalf("query-status = %+v, want running", st)
	}
	var v Version
	if err := c.Execute(ctx, "query-version", nil, &v); err != nil {
		t.Fatal(err)
	}
	if v != c.Greeting().Version {
		t.Fatalf("query-version %+v differs from greeting %+v", v, c.Greeting().Version)
	}
	// A raw reply.
	var raw json.RawMessage
	if err := c.Execute(ctx, "query-version", nil, &raw); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), `"package"`) {
		t.Fatalf("raw query-version reply %s lacks package", raw)
	}
}

func TestQEMUErrorReply(t *testing.T) {
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	err := c.Execute(ctx, "no-such-command", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("unknown command: got %T %v, want *Error", err, err)
	}
	t.Logf("unknown command: %v", err)
	if qe.Class != "CommandNotFound" || qe.Command != "no-such-command" || qe.Desc == "" {
		t.Fatalf("unknown command: got %+v", qe)
	}
	// Bad arguments: GenericError, and the client stays usable.
	err = c.Execute(ctx, "query-status", map[string]any{"bogus": 1}, nil)
	if !errors.As(err, &qe) || qe.Class != "GenericError" {
		t.Fatalf("bad argument: got %v, want GenericError", err)
	}
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatalf("after error replies: %v", err)
	}
	// Arguments that are not an object are refused before sending.
	if err := c.Execute(ctx, "query-status", []int{1}, nil); err == nil || errors.As(err, &qe) {
		t.Fatalf("array arguments: got %v, want a local error", err)
	}
}

func TestQEMUConcurrentExecute(t *testing.T) {
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	const workers, calls = 16, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers*calls)
	for w := range workers {
		wg.Go(func() {
			for i := range calls {
				// HMP echoes an unknown command's name, so each reply is
				// unique to its request.
				name := fmt.Sprintf("nosuch_%d_%d", w, i)
				var out string
				err := c.Execute(ctx, "human-monitor-command", map[string]string{"command-line": name}, &out)
				if err != nil {
					errs <- err
					continue
				}
				if !strings.Contains(out, "'"+name+"'") {
					errs <- fmt.Errorf("call %s got reply %q", name, out)
				}
				if i%5 == 0 {
					var opts []struct {
						Option string `json:"option"`
					}
					err := c.Execute(ctx, "query-command-line-options", map[string]string{"option": "machine"}, &opts)
					if err != nil {
						errs <- err
					} else if len(opts) != 1 || opts[0].Option != "machine" {
						errs <- fmt.Errorf("query-command-line-options machine: got %+v", opts)
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestQEMULargeReply(t *testing.T) {
	c, _ := startQEMU(t, "-m", "16M")
	ctx := testCtx(t)

	var raw json.RawMessage
	if err := c.Execute(ctx, "query-qmp-schema", nil, &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) <= 64<<10 {
		t.Fatalf("query-qmp-schema reply is %d bytes; the test needs > 64 KiB", len(raw))
	}
	var schema []struct {
		Name     string `json:"name"`
		MetaType string `json:"meta-type"`
	}
	if err := json.Unmarshal(raw, &schema); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range schema {
		found = found || (e.Name == "query-status" && e.MetaType == "command")
	}
	if !found {
		t.Fatalf("schema of %d entries lacks command query-status", len(schema))
	}

	// A few MiB: a hex dump of guest RAM (machine none maps -m RAM at 0).
	const n = 400000
	var dump string
	if err := c.Execute(ctx, "human-monitor-command", map[string]string{"command-line": fmt.Sprintf("xp /%dxb 0", n)}, &dump); err != nil {
		t.Fatal(err)
	}
	if len(dump) < 2<<20 {
		t.Fatalf("xp reply is %d bytes, want a few MiB", len(dump))
	}
	lines := strings.Split(strings.TrimRight(dump, "\r\n"), "\r\n")
	if len(lines) != n/8 {
		t.Fatalf("xp reply has %d lines, want %d", len(lines), n/8)
	}
	if want := fmt.Sprintf("%016x:", n-8); !strings.HasPrefix(lines[len(lines)-1], want) {
		t.Fatalf("last line %q, want prefix %q", lines[len(lines)-1], want)
	}
	// The client still works after huge messages.
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestQEMUEventsNotLost(t *testing.T) {
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	all := c.Subscribe()
	defer all.Close()
	stops := c.Subscribe("STOP")
	defer stops.Close()
	chCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := c.Events(chCtx, "RESUME")

	// Generate many events while nobody reads any of them; commands keep
	// getting their replies meanwhile.
	const rounds = 300
	for range rounds {
		if err := c.Execute(ctx, "stop", nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Execute(ctx, "cont", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if got := all.Len(); got != 2*rounds {
		t.Fatalf("all-events subscription queued %d events, want %d", got, 2*rounds)
	}
	var last time.Time
	for i := range 2 * rounds {
		ev, err := all.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := "STOP"
		if i%2 == 1 {
			want = "RESUME"
		}
		if ev.Name != want {
			t.Fatalf("event %d is %s, want %s", i, ev.Name, want)
		}
		if ev.Time.Before(last) || ev.Time.IsZero() {
			t.Fatalf("event %d timestamp %v not after %v", i, ev.Time, last)
		}
		last = ev.Time
	}
	for i := range rounds {
		ev, err := stops.Next(ctx)
		if err != nil || ev.Name != "STOP" {
			t.Fatalf("STOP subscription event %d: %v %v", i, ev.Name, err)
		}
		ev = <-ch
		if ev.Name != "RESUME" {
			t.Fatalf("RESUME channel event %d: %v", i, ev.Name)
		}
	}
	if n := stops.Len(); n != 0 {
		t.Fatalf("STOP subscription has %d extra events", n)
	}
}

func TestQEMUWaitEventAfterReply(t *testing.T) {
	c, _ := startQEMU(t)
	ctx := testCtx(t)
	// QEMU sends STOP before stop's reply: subscribing first catches it.
	sub := c.Subscribe()
	defer sub.Close()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	ev, err := sub.Wait(ctx, func(e Event) bool { return e.Name == "STOP" })
	if err != nil {
		t.Fatal(err)
	}
	if ev.Name != "STOP" {
		t.Fatalf("got %s", ev.Name)
	}
	var st struct{ Status string }
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "paused" {
		t.Fatalf("after stop: status %q, err %v", st.Status, err)
	}
}

func TestQEMUWaitEventTimeout(t *testing.T) {
	c, _ := startQEMU(t)
	ctx, cancel := context.WithTimeout(testCtx(t), 50*time.Millisecond)
	defer cancel()
	_, err := c.WaitEvent(ctx, func(e Event) bool { return e.Name == "NEVER_SENT" })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitEvent: got %v, want DeadlineExceeded", err)
	}
	// The client is unaffected.
	if err := c.Execute(testCtx(t), "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestQEMUKilledFailsPending(t *testing.T) {
	c, p := startQEMU(t)
	ctx := testCtx(t)
	sub := c.Subscribe()
	defer sub.Close()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	// Freeze QEMU so the next command stays pending, then kill it.
	if err := p.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() { res <- c.Execute(ctx, "query-status", nil, nil) }()
	for !hasPending(c) {
		time.Sleep(time.Millisecond)
	}
	if err := p.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	err := <-res
	if !errors.Is(err, ErrDisconnected) {
		t.Fatalf("pending Execute after kill: got %v, want ErrDisconnected", err)
	}
	t.Logf("pending Execute after kill: %v", err)
	<-c.Done()
	if !errors.Is(c.Err(), ErrDisconnected) {
		t.Fatalf("Err() = %v", c.Err())
	}
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("Execute after loss: got %v", err)
	}
	// Queued events survive the loss, then the error is reported.
	if ev, err := sub.Next(ctx); err != nil || ev.Name != "STOP" {
		t.Fatalf("queued event after loss: %v %v", ev.Name, err)
	}
	if _, err := sub.Next(ctx); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("Next after loss: got %v", err)
	}
	if _, err := c.WaitEvent(ctx, nil); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("WaitEvent after loss: got %v", err)
	}
	c.Close()
	c.Close()
	var ee *exec.ExitError
	if err := p.Wait(); !errors.As(err, &ee) {
		t.Fatalf("QEMU wait: %v", err)
	}
}

func TestQEMUQuit(t *testing.T) {
	c, p := startQEMU(t)
	ctx := testCtx(t)
	sub := c.Subscribe("SHUTDOWN")
	defer sub.Close()
	// quit's reply may or may not arrive before QEMU closes the monitor.
	if err := c.Execute(ctx, "quit", nil, nil); err != nil && !errors.Is(err, ErrDisconnected) {
		t.Fatal(err)
	}
	ev, err := sub.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var data struct {
		Guest  bool   `json:"guest"`
		Reason string `json:"reason"`
	}
	if err := ev.DecodeData(&data); err != nil || data.Reason != "host-qmp-quit" || data.Guest {
		t.Fatalf("SHUTDOWN data %+v, err %v", data, err)
	}
	if err := p.Wait(); err != nil {
		t.Fatalf("QEMU exit after quit: %v", err)
	}
	<-c.Done()
}

func TestQEMUStartFailure(t *testing.T) {
	bin := qemuBinary(t)
	_, _, err := StartQEMU(testCtx(t), bin, append(append([]string(nil), baseArgs...), "-no-such-option"))
	if err == nil {
		t.Fatal("StartQEMU with a bad option succeeded")
	}
	t.Logf("StartQEMU with a bad option: %v", err)
	if !strings.Contains(err.Error(), "no-such-option") {
		t.Fatalf("error does not quote QEMU's complaint: %v", err)
	}
	if !errors.Is(err, ErrDisconnected) {
		t.Fatalf("error %v does not wrap ErrDisconnected", err)
	}
}

func hasPending(c *Client) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending) > 0
}
