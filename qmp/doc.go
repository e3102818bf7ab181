// Package qmp is a small client for the QEMU Machine Protocol (QMP), the
// JSON-over-a-stream control protocol that a QEMU process serves on a
// monitor configured with mode=control.
//
// A [Client] is made from any [net.Conn] ([New]), from a unix socket path
// ([Dial]), or by starting QEMU itself with a monitor on an inherited
// socketpair ([Start], [StartQEMU]), which needs no socket path at all. The
// client reads QEMU's greeting and negotiates capabilities before it is
// returned.
//
// Contracts:
//
//   - [Client.Execute] may be called from any number of goroutines at once.
//     Every command carries a unique "id" and its reply is matched by that
//     id, so concurrent callers never see each other's replies. A QMP error
//     reply is returned as a *[Error] (use errors.As); a lost connection as
//     an error wrapping [ErrDisconnected]; a local [Client.Close] as
//     [ErrClosed]; an expired context as an error wrapping the context's
//     error.
//   - Events are never dropped for a subscriber: every [Subscription] has
//     its own unbounded queue that the connection's reader appends to
//     without ever blocking, so a subscriber that does not read can neither
//     lose events nor stall replies to commands. Events that arrive while
//     no subscription exists are not kept. To wait for an event that a
//     command causes, subscribe before executing the command (QEMU may send
//     the event before the command's reply) and then call
//     [Subscription.Wait].
//   - Messages of any size are accepted (up to [MaxMessageSize]); there is
//     no 64 KiB line limit.
//   - Every call that can block takes a [context.Context].
//   - The package holds no mutable package-level state.
package qmp
