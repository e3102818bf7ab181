package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmlock/vmlock/internal/syncbuf"
)

// Unit tests of the client's logic against a scripted in-process QMP
// server over net.Pipe. The real-QEMU tests are in qemu_test.go.

const fakeGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}`

type fakeServer struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

type fakeRequest struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

func (f *fakeServer) send(lines ...string) {
	f.t.Helper()
	for _, l := range lines {
		if _, err := io.WriteString(f.conn, l+"\n"); err != nil {
			f.t.Errorf("fake server: send: %v", err)
			return
		}
	}
}

func (f *fakeServer) recv() fakeRequest {
	f.t.Helper()
	line, err := f.r.ReadBytes('\n')
	if err != nil {
		f.t.Fatalf("fake server: recv: %v", err)
	}
	var req fakeRequest
	if err := json.Unmarshal(line, &req); err != nil {
		f.t.Fatalf("fake server: bad request %q: %v", line, err)
	}
	return req
}

func (f *fakeServer) reply(req fakeRequest, ret string) {
	f.t.Helper()
	f.send(fmt.Sprintf(`{"return": %s, "id": %s}`, ret, req.ID))
}

// newFake returns a client connected to a fake server that has completed
// the handshake, and a buffer collecting the client's log.
func newFake(t *testing.T, opts ...Option) (*Client, *fakeServer, *syncbuf.Buffer) {
	t.Helper()
	cc, sc := net.Pipe()
	f := &fakeServer{t: t, conn: sc, r: bufio.NewReader(sc)}
	logs := &syncbuf.Buffer{}
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))}, opts...)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.send(fakeGreeting)
		req := f.recv()
		if req.Execute != "qmp_capabilities" {
			t.Errorf("first command %q, want qmp_capabilities", req.Execute)
		}
		f.reply(req, "{}")
	}()
	c, err := New(testCtx(t), cc, opts...)
	<-done
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		sc.Close()
	})
	return c, f, logs
}

// execAsync runs Execute in a goroutine and returns its result channel.
func execAsync(ctx context.Context, c *Client, cmd string, reply any) <-chan error {
	res := make(chan error, 1)
	go func() { res <- c.Execute(ctx, cmd, nil, reply) }()
	return res
}

func TestFakeHandshake(t *testing.T) {
	c, _, _ := newFake(t)
	if got := c.Greeting().Version.String(); got != "7.2.0" {
		t.Fatalf("greeting version %s", got)
	}
	if c.Greeting().Version.Package != "fake" {
		t.Fatalf("greeting %+v", c.Greeting())
	}
	if c.Err() != nil {
		t.Fatalf("Err() = %v on a live client", c.Err())
	}
}

func TestFakeGarbageAndUnknownShapesAreSkipped(t *testing.T) {
	c, f, logs := newFake(t)
	var got struct{ A int }
	res := execAsync(testCtx(t), c, "x", &got)
	req := f.recv()
	f.send(
		"this is not json",
		"[1, 2]",
		"",
		"   ",
		`{"foo": 1}`,
		`{"return": {"A": 2}, "id": 999999}`,
		`{"return": {"A": 3}}`,
		`{"return": {"A": 4}, "id": "not-ours"}`,
		`{"QMP": {}}`,
		`{"event": 5}`,
		`{"event": "OK", "timestamp": "bad"}`,
		`{"unterminated": `,
	)
	f.send(fmt.Sprintf(`{"return": {"A": 1}, "id": %s}`+"\r", req.ID)) // CRLF, as QEMU sends
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if got.A != 1 {
		t.Fatalf("reply A=%d, want 1 (matched the wrong message)", got.A)
	}
	l := logs.String()
	for _, want := range []string{"malformed", "matches no pending", "without a known id", "second QMP greeting", "unknown shape"} {
		if !strings.Contains(l, want) {
			t.Errorf("log lacks %q:\n%s", want, l)
		}
	}
	if c.Err() != nil {
		t.Fatalf("client failed: %v", c.Err())
	}
}

func TestFakeMalformedReplyFailsOnlyThatCall(t *testing.T) {
	for _, tc := range []struct{ name, msg string }{
		{"error not object", `{"error": "oops", "id": %s}`},
		{"error without class", `{"error": {"desc": "x"}, "id": %s}`},
		{"return and error", `{"return": {}, "error": {"class": "GenericError", "desc": "x"}, "id": %s}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, f, _ := newFake(t)
			res := execAsync(testCtx(t), c, "x", nil)
			f.send(fmt.Sprintf(tc.msg, f.recv().ID))
			err := <-res
			var pe *ProtocolError
			if !errors.Is(err, ErrProtocol) || !errors.As(err, &pe) {
				t.Fatalf("got %v, want a *ProtocolError", err)
			}
			res = execAsync(testCtx(t), c, "y", nil)
			f.reply(f.recv(), "{}")
			if err := <-res; err != nil {
				t.Fatalf("next call: %v", err)
			}
		})
	}
}

func TestFakeErrorReply(t *testing.T) {
	c, f, _ := newFake(t)
	res := execAsync(testCtx(t), c, "frob", nil)
	f.send(fmt.Sprintf(`{"id": %s, "error": {"class": "DeviceNotFound", "desc": "no such thing", "extra": 1}}`, f.recv().ID))
	err := <-res
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("got %T %v", err, err)
	}
	want := Error{Command: "frob", Class: "DeviceNotFound", Desc: "no such thing"}
	if *qe != want {
		t.Fatalf("got %+v, want %+v", *qe, want)
	}
	if msg := qe.Error(); !strings.Contains(msg, "frob") || !strings.Contains(msg, "DeviceNotFound") || !strings.Contains(msg, "no such thing") {
		t.Fatalf("message %q", msg)
	}
}

func TestFakeReplyDecodeError(t *testing.T) {
	c, f, _ := newFake(t)
	var n int
	res := execAsync(testCtx(t), c, "x", &n)
	f.reply(f.recv(), `"a string"`)
	var ute *json.UnmarshalTypeError
	if err := <-res; !errors.As(err, &ute) {
		t.Fatalf("got %v, want *json.UnmarshalTypeError", err)
	}
}

func TestFakeArguments(t *testing.T) {
	c, f, _ := newFake(t)
	ctx := testCtx(t)
	res := make(chan error, 1)
	go func() {
		res <- c.Execute(ctx, "with-args", struct {
			Device string `json:"device"`
			Speed  int    `json:"speed,omitempty"`
		}{Device: "d0"}, nil)
	}()
	req := f.recv()
	if req.Execute != "with-args" || string(req.Arguments) != `{"device":"d0"}` {
		t.Fatalf("request %+v, arguments %s", req, req.Arguments)
	}
	f.reply(req, "{}")
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	// A nil map sends no arguments at all.
	go func() { res <- c.Execute(ctx, "no-args", map[string]any(nil), nil) }()
	req = f.recv()
	if req.Arguments != nil {
		t.Fatalf("nil map sent arguments %s", req.Arguments)
	}
	f.reply(req, "{}")
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	// Bad arguments fail locally, nothing is sent.
	if err := c.Execute(ctx, "bad", "a string", nil); err == nil {
		t.Fatal("string arguments accepted")
	}
	if err := c.Execute(ctx, "bad", func() {}, nil); err == nil {
		t.Fatal("unmarshallable arguments accepted")
	}
	if err := c.Execute(ctx, "", nil, nil); err == nil {
		t.Fatal("empty command accepted")
	}
}

func TestFakeBadGreeting(t *testing.T) {
	for _, tc := range []struct{ name, first string }{
		{"reply first", `{"return": {}}`},
		{"garbage", `hello`},
		{"greeting not object", `{"QMP": 1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cc, sc := net.Pipe()
			defer sc.Close()
			go io.WriteString(sc, tc.first+"\n")
			_, err := New(testCtx(t), cc)
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("got %v, want ErrProtocol", err)
			}
		})
	}
}

// QEMU flushes events queued while no client was connected, sometimes
// ahead of the greeting: they are skipped, and the handshake completes.
func TestFakeEventsBeforeGreetingAreSkipped(t *testing.T) {
	cc, sc := net.Pipe()
	defer sc.Close()
	f := &fakeServer{t: t, conn: sc, r: bufio.NewReader(sc)}
	go func() {
		f.send(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_READY", "data": {"device": "commit0"}}`)
		f.send(fakeGreeting)
		req := f.recv()
		f.reply(req, "{}")
	}()
	c, err := New(testCtx(t), cc)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer c.Close()
	if got := c.Greeting().Version.String(); got != "7.2.0" {
		t.Fatalf("greeting version %s", got)
	}
}

func TestFakeEOFBeforeGreeting(t *testing.T) {
	cc, sc := net.Pipe()
	sc.Close()
	_, err := New(testCtx(t), cc)
	if !errors.Is(err, ErrDisconnected) || !errors.Is(err, io.EOF) {
		t.Fatalf("got %v, want ErrDisconnected wrapping EOF", err)
	}
}

func TestFakeGreetingTimeout(t *testing.T) {
	cc, sc := net.Pipe()
	defer sc.Close()
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Millisecond)
	defer cancel()
	_, err := New(ctx, cc)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want DeadlineExceeded", err)
	}
	// New closed the connection.
	if _, err := sc.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("server write after failed New: %v", err)
	}
}

func TestFakeCancelledCallThenLateReply(t *testing.T) {
	c, f, logs := newFake(t)
	ctx, cancel := context.WithCancel(testCtx(t))
	res := execAsync(ctx, c, "slow", nil)
	slow := f.recv()
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: got %v", err)
	}
	var got string
	res = execAsync(testCtx(t), c, "fast", &got)
	fast := f.recv()
	f.reply(slow, `"slow"`) // late: must not reach the next caller
	f.reply(fast, `"fast"`)
	if err := <-res; err != nil || got != "fast" {
		t.Fatalf("next call: %q, %v", got, err)
	}
	if !strings.Contains(logs.String(), "matches no pending") {
		t.Fatalf("late reply not logged:\n%s", logs)
	}
}

func TestFakeWriteBlockedHonoursContext(t *testing.T) {
	c, f, _ := newFake(t)
	// The server reads nothing: net.Pipe writes block until read.
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Millisecond)
	defer cancel()
	if err := c.Execute(ctx, "blocked", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want DeadlineExceeded", err)
	}
	// Nothing was written, so the stream is intact.
	res := execAsync(testCtx(t), c, "next", nil)
	req := f.recv()
	if req.Execute != "next" {
		t.Fatalf("server got %q", req.Execute)
	}
	f.reply(req, "{}")
	if err := <-res; err != nil {
		t.Fatal(err)
	}
}

func TestFakeEventsWithoutReaderDoNotBlock(t *testing.T) {
	c, f, _ := newFake(t)
	sub := c.Subscribe() // never read until the end
	defer sub.Close()
	filtered := c.Subscribe("B")
	defer filtered.Close()
	res := execAsync(testCtx(t), c, "x", nil)
	req := f.recv()
	const n = 20000
	var sb strings.Builder
	for i := range n {
		name := "A"
		if i%4 == 0 {
			name = "B"
		}
		fmt.Fprintf(&sb, `{"event": %q, "data": {"i": %d}, "timestamp": {"seconds": %d, "microseconds": 5}}`+"\n", name, i, 1000+i)
	}
	// Nobody reads the subscriptions: the client's reader must still take
	// every event (or this write would block), and then the reply.
	if _, err := io.WriteString(f.conn, sb.String()); err != nil {
		t.Fatal(err)
	}
	f.reply(req, "{}")
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if sub.Len() != n || filtered.Len() != n/4 {
		t.Fatalf("queued %d and %d events, want %d and %d", sub.Len(), filtered.Len(), n, n/4)
	}
	ctx := testCtx(t)
	for i := range n {
		ev, err := sub.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var d struct{ I int }
		if err := ev.DecodeData(&d); err != nil || d.I != i {
			t.Fatalf("event %d: data %s (%v)", i, ev.Data, err)
		}
		if want := time.Unix(int64(1000+i), 5000); !ev.Time.Equal(want) {
			t.Fatalf("event %d: time %v, want %v", i, ev.Time, want)
		}
	}
	ev, err := filtered.Wait(ctx, func(e Event) bool {
		var d struct{ I int }
		e.DecodeData(&d)
		return d.I == 400
	})
	if err != nil || ev.Name != "B" || filtered.Len() != n/4-101 {
		t.Fatalf("Wait on filtered: %v %v, %d left", ev.Name, err, filtered.Len())
	}
}

func TestFakeEventShapes(t *testing.T) {
	c, f, _ := newFake(t)
	sub := c.Subscribe()
	defer sub.Close()
	f.send(
		`{"event": "NODATA", "timestamp": {"seconds": -1, "microseconds": -1}}`,
		`{"event": "NULLDATA", "data": null}`,
		`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "FIRST_KEY_LAST", "data": [1]}`,
	)
	ctx := testCtx(t)
	ev, _ := sub.Next(ctx)
	if ev.Name != "NODATA" || ev.Data != nil || !ev.Time.IsZero() {
		t.Fatalf("NODATA: %+v", ev)
	}
	var v struct{}
	if err := ev.DecodeData(&v); err != nil {
		t.Fatalf("DecodeData without data: %v", err)
	}
	ev, _ = sub.Next(ctx)
	if ev.Name != "NULLDATA" || ev.Data != nil {
		t.Fatalf("NULLDATA: %+v", ev)
	}
	ev, _ = sub.Next(ctx)
	if ev.Name != "FIRST_KEY_LAST" || string(ev.Data) != "[1]" || !ev.Time.Equal(time.Unix(1, 2000)) {
		t.Fatalf("FIRST_KEY_LAST: %+v", ev)
	}
	if err := ev.DecodeData(&v); err == nil {
		t.Fatal("decoding an array into a struct succeeded")
	}
}

func TestFakeCloseFailsPendingAndIsIdempotent(t *testing.T) {
	c, f, _ := newFake(t)
	sub := c.Subscribe()
	res := execAsync(testCtx(t), c, "x", nil)
	f.recv()
	f.send(`{"event": "BEFORE_CLOSE"}`)
	for sub.Len() == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-res; !errors.Is(err, ErrClosed) {
		t.Fatalf("pending call: %v", err)
	}
	if err := c.Execute(testCtx(t), "y", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close: %v", err)
	}
	ctx := testCtx(t)
	if ev, err := sub.Next(ctx); err != nil || ev.Name != "BEFORE_CLOSE" {
		t.Fatalf("queued event: %v %v", ev, err)
	}
	if _, err := sub.Next(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Next after Close: %v", err)
	}
	if _, err := c.Subscribe().Next(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Subscribe after Close: %v", err)
	}
	ch := c.Events(ctx)
	if _, ok := <-ch; ok {
		t.Fatal("Events after Close delivered an event")
	}
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed")
	}
}

func TestFakeSubscriptionClose(t *testing.T) {
	c, f, _ := newFake(t)
	sub := c.Subscribe()
	res := make(chan error, 1)
	go func() {
		_, err := sub.Next(testCtx(t))
		res <- err
	}()
	sub.Close()
	sub.Close()
	if err := <-res; !errors.Is(err, ErrClosed) {
		t.Fatalf("Next on closed subscription: %v", err)
	}
	// The client lost the subscription: no queueing for it any more.
	f.send(`{"event": "AFTER"}`)
	other := c.Subscribe()
	defer other.Close()
	f.send(`{"event": "SYNC"}`)
	if _, err := other.Wait(testCtx(t), func(e Event) bool { return e.Name == "SYNC" }); err != nil {
		t.Fatal(err)
	}
	if sub.Len() != 0 {
		t.Fatalf("closed subscription queued %d events", sub.Len())
	}
	c.mu.Lock()
	n := len(c.subs)
	c.mu.Unlock()
	if n != 1 {
		t.Fatalf("client holds %d subscriptions, want 1", n)
	}
}

func TestFakeEventsChannel(t *testing.T) {
	c, f, _ := newFake(t)
	ctx, cancel := context.WithCancel(testCtx(t))
	ch := c.Events(ctx, "X")
	f.send(`{"event": "Y"}`, `{"event": "X", "data": 1}`, `{"event": "X", "data": 2}`)
	for want := 1; want <= 2; want++ {
		ev := <-ch
		if ev.Name != "X" || string(ev.Data) != fmt.Sprint(want) {
			t.Fatalf("got %+v, want X %d", ev, want)
		}
	}
	cancel()
	for range ch { // closes after cancel
	}
}

func TestFakeConnectionLostMidMessage(t *testing.T) {
	c, f, _ := newFake(t)
	res := execAsync(testCtx(t), c, "x", nil)
	req := f.recv()
	io.WriteString(f.conn, fmt.Sprintf(`{"return": {}, "id": %s`, req.ID)) // no newline
	f.conn.Close()
	err := <-res
	if !errors.Is(err, ErrDisconnected) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("got %v, want ErrDisconnected wrapping ErrUnexpectedEOF", err)
	}
}

func TestFakeOversizedMessage(t *testing.T) {
	c, f, _ := newFake(t, withMaxMessageSize(1000))
	res := execAsync(testCtx(t), c, "x", nil)
	req := f.recv()
	// Just under the limit is fine (the limit counts the newline).
	f.reply(req, `"`+strings.Repeat("a", 1000-len(`{"return": "", "id": }`)-len(req.ID)-1)+`"`)
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	res = execAsync(testCtx(t), c, "x", nil)
	req = f.recv()
	// The client fails the connection mid-message, so the write may fail.
	go io.WriteString(f.conn, fmt.Sprintf(`{"return": "%s", "id": %s}`+"\n", strings.Repeat("a", 5000), req.ID))
	err := <-res
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("got %v, want ErrProtocol", err)
	}
	<-c.Done()
	if !errors.Is(c.Err(), ErrProtocol) {
		t.Fatalf("Err() = %v", c.Err())
	}
}

func TestFakeConcurrentExecute(t *testing.T) {
	c, f, _ := newFake(t)
	// The server answers in reverse order of arrival, in batches.
	const n = 64
	go func() {
		var batch []fakeRequest
		for range n {
			batch = append(batch, f.recv())
			if len(batch) == 8 {
				for i := len(batch) - 1; i >= 0; i-- {
					f.reply(batch[i], fmt.Sprintf("%q", batch[i].Execute))
				}
				batch = nil
			}
		}
	}()
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cmd := fmt.Sprintf("cmd-%d", i)
			var got string
			if err := c.Execute(testCtx(t), cmd, nil, &got); err != nil || got != cmd {
				t.Errorf("%s: got %q, %v", cmd, got, err)
			}
		})
	}
	wg.Wait()
}

// Several goroutines may wait in Next on one subscription (its methods are
// safe for concurrent use): every one of them must be woken by Close and by
// the client's end, not just the first (the wake-up channel holds one).
func TestFakeConcurrentNextAllWoken(t *testing.T) {
	waiters := func(sub *Subscription, n int) <-chan error {
		res := make(chan error, n)
		for range n {
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_, err := sub.Next(ctx)
				res <- err
			}()
		}
		time.Sleep(50 * time.Millisecond) // let them block in Next
		return res
	}
	c, f, _ := newFake(t)

	sub := c.Subscribe("E")

	// Close wakes every waiter.
	res := waiters(sub, 3)
	sub.Close()
	for range 3 {
		if err := <-res; !errors.Is(err, ErrClosed) {
			t.Fatalf("waiter after Close: %v, want ErrClosed", err)
		}
	}

	// The client's end wakes every waiter.
	sub = c.Subscribe()
	res = waiters(sub, 3)
	f.conn.Close()
	for range 3 {
		if err := <-res; !errors.Is(err, ErrDisconnected) {
			t.Fatalf("waiter after the connection was lost: %v, want ErrDisconnected", err)
		}
	}
}
