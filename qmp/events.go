package qmp

import (
	"context"
	"fmt"
	"sync"
)

// Subscription receives the events a Client reads from the moment it was
// created. Its queue is unbounded: the client appends to it without ever
// blocking, so events are kept until they are read (or the subscription
// is closed) however slowly the subscriber reads. A subscription that is
// no longer read must be closed, or its queue grows without bound. Its
// methods are safe for concurrent use; each event is returned once, to
// one caller.
type Subscription struct {
	c     *Client
	names map[string]bool // nil: every event

	mu     sync.Mutex
	queue  []Event
	head   int
	err    error // set when the client ends: returned once the queue is empty
	closed bool
	ready  chan struct{} // capacity 1: "something changed"
}

// Subscribe returns a new subscription to the events named in names, or to
// every event if names is empty. Events read by the client before this
// call are not delivered to it: subscribe before executing a command whose
// events you need. On a client that has already ended, the subscription
// reports the client's error from its first Next.
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, ready: make(chan struct{}, 1)}
	if len(names) > 0 {
		s.names = make(map[string]bool, len(names))
		for _, n := range names {
			s.names[n] = true
		}
	}
	c.mu.Lock()
	if c.err != nil {
		s.err = c.err
	} else {
		c.subs[s] = struct{}{}
	}
	c.mu.Unlock()
	return s
}

// push appends ev to the queue; it never blocks.
func (s *Subscription) push(ev Event) {
	if s.names != nil && !s.names[ev.Name] {
		return
	}
	s.mu.Lock()
	if s.closed || s.err != nil {
		s.mu.Unlock()
		return
	}
	s.queue = append(s.queue, ev)
	s.mu.Unlock()
	s.signal()
}

// end records the client's terminal error.
func (s *Subscription) end(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.signal()
}

func (s *Subscription) signal() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// Next returns the oldest queued event, waiting for one if the queue is
// empty. After the client ended, Next still returns every event that was
// queued before the end, and then the client's error (ErrClosed, or an
// error wrapping ErrDisconnected). After Close it returns an error wrapping
// ErrClosed. If ctx ends first it returns an error wrapping ctx.Err().
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			s.signal() // pass the wake-up on to the next waiter
			return Event{}, fmt.Errorf("qmp: subscription closed: %w", ErrClosed)
		}
		if s.head < len(s.queue) {
			ev := s.queue[s.head]
			s.queue[s.head] = Event{}
			s.head++
			switch {
			case s.head == len(s.queue):
				s.queue, s.head = s.queue[:0], 0
			case s.head >= 1024 && s.head*2 >= len(s.queue):
				n := copy(s.queue, s.queue[s.head:])
				clear(s.queue[n:])
				s.queue, s.head = s.queue[:n], 0
			}
			more := s.head < len(s.queue)
			s.mu.Unlock()
			if more {
				s.signal() // another waiter may take the next one
			}
			return ev, nil
		}
		err := s.err
		s.mu.Unlock()
		if err != nil {
			s.signal() // pass the wake-up on to the next waiter
			return Event{}, err
		}
		select {
		case <-s.ready:
		case <-ctx.Done():
			return Event{}, fmt.Errorf("qmp: waiting for event: %w", ctx.Err())
		}
	}
}

// Wait returns the first queued or future event for which match returns
// true (match nil accepts any event), discarding the events before it. It
// fails like Next. Because the subscription queues every event since it
// was created, an event that arrived between the subscription's creation
// and the call to Wait — e.g. before the reply of the command that caused
// it — is found.
func (s *Subscription) Wait(ctx context.Context, match func(Event) bool) (Event, error) {
	for {
		ev, err := s.Next(ctx)
		if err != nil {
			return Event{}, err
		}
		if match == nil || match(ev) {
			return ev, nil
		}
	}
}

// Len returns the number of queued events.
func (s *Subscription) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue) - s.head
}

// Close stops the subscription and drops its queue. It is idempotent.
// Calls to Next that are waiting return an error wrapping ErrClosed.
func (s *Subscription) Close() {
	s.mu.Lock()
	s.closed = true
	s.queue, s.head = nil, 0
	s.mu.Unlock()
	s.signal()
	s.c.mu.Lock()
	delete(s.c.subs, s) // no-op once the client ended (subs is nil)
	s.c.mu.Unlock()
}

// Events subscribes to the events named in names (every event if none)
// and returns a channel that delivers them in order. The channel's buffer
// is unbounded (the subscription's queue), so an unread channel never
// blocks the client. The channel is closed, and the subscription with
// it, when ctx ends or after the client ended and every queued event was
// delivered; cancel ctx when you stop reading, or a goroutine stays blocked
// on the send. Client.Err says why a channel closed.
func (c *Client) Events(ctx context.Context, names ...string) <-chan Event {
	s := c.Subscribe(names...)
	ch := make(chan Event)
	go func() {
		defer close(ch)
		defer s.Close()
		for {
			ev, err := s.Next(ctx)
			if err != nil {
				return
			}
			select {
			case ch <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch
}

// WaitEvent waits for the next event, read after this call, for which match
// returns true (match nil accepts any event). It fails like
// Subscription.Next; with a context deadline it returns an error wrapping
// context.DeadlineExceeded. WaitEvent cannot see events the client read
// before it was called: to wait for an event a command causes, call
// Subscribe before Execute and then Subscription.Wait.
func (c *Client) WaitEvent(ctx context.Context, match func(Event) bool) (Event, error) {
	s := c.Subscribe()
	defer s.Close()
	return s.Wait(ctx, match)
}
