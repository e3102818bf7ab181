// Package virtlockd speaks libvirt's virtlockd protocol, so that libvirtd
// configured with lock_manager = "lockd" can use vmlockd in virtlockd's
// place, and so that tools can drive either daemon. It holds the codec, a
// Client, and a Server that serves the protocol on top of a
// lockmgr.Manager.
//
// # Wire format
//
// libvirt RPC over a unix stream socket, XDR (big-endian, 4-byte aligned).
// Each message is a u32 length that counts itself, a header of six 32-bit
// fields (program, version, procedure, type, serial, status) and the
// payload. The lockspace program is 0x0EA7BEEF version 1; its procedures
// REGISTER(owner{uuid opaque[16], name, id, pid}, flags), RESTRICT(flags),
// NEW(path, flags), CREATE_RESOURCE, DELETE_RESOURCE, ACQUIRE_RESOURCE and
// RELEASE_RESOURCE(path, name, flags) and CREATE_LOCKSPACE(path) all return
// void. Strings are string<65536>. A reply repeats program, version,
// procedure and serial with type REPLY; status OK has no payload, status
// ERROR carries libvirt's error structure (code, domain, optional message,
// level, and unused members: see RemoteError).
//
// Decoding is strict and bounded: a length word outside [28, 4+32 MiB] ends
// the stream; a server reads no call larger than MaxCallSize into memory (a
// larger one is skipped and answered with an error); a string over its
// bound, a truncated field, non-zero padding, a bad optional discriminant or
// trailing bytes are a *DecodeError. No input makes the decoder panic or
// allocate more than the message it actually received.
//
// # Semantics served (virtlockd's, from libvirt 9/10)
//
// Per connection: REGISTER records an owner (a second one overwrites it; an
// owner id of 0 is refused). RESTRICT makes every later call on the
// connection fail. Every call is checked in virtlockd's order: unknown flag
// bits (INVALID_ARG); restricted connection (OPERATION_DENIED, even for
// REGISTER); no owner registered (OPERATION_INVALID; REGISTER and
// CREATE_LOCKSPACE excepted); unknown lockspace (INTERNAL_ERROR "Lockspace
// for path %s does not exist"). Locks belong to the registered owner's pid,
// not to the connection's peer: RELEASE frees a resource held by the owner
// registered last or, if it holds none, by an owner registered earlier
// with the same pid (before a second REGISTER). Shared on a shared-held resource adds the
// owner; anything else on a held resource is RESOURCE_BUSY, also for the
// owner that holds it. RELEASE of a resource nobody holds is RESOURCE_BUSY
// "not locked"; of one held by others only, INTERNAL_ERROR "owner %d does
// not hold the resource lock". Without AUTOCREATE a resource's file must
// exist; with it, the file is created (0600) and, if the first holder
// asked for AUTOCREATE, removed when the last holder releases it.
//
// When a client closes its connection and its peer pid (SO_PEERCRED) is
// the registered owner's pid — the connection libvirt opens in the child
// that execs QEMU, which QEMU inherits — every lock of that pid is
// released, whichever owner registered with it took it (virtlockd's
// locks belong to pids); if it held any, its process is killed. vmlockd kills first
// (through a pidfd taken at accept time, never a reused pid) and releases
// once the process has exited, so no other domain is granted a disk while
// the old QEMU may still write to it. Closing any other connection releases
// nothing. A shutdown of the server closes every connection and releases
// nothing: the daemon keeps the locks across its restart.
//
// Only peers whose uid is the daemon's effective uid are served (root, when
// privileged), as virtlockd does; others are disconnected at once.
//
// # Mapping onto the lock table
//
// An owner is a lockmgr.Object: its uuid, name, id and pid, URI ObjectURI.
// The default lockspace ("") names disk images by absolute path; each is the
// disk resource of that path (symlinks resolved, so two spellings are one
// lock). RELEASE of a path releases the disk that the path named at the
// owner's ACQUIRE, as virtlockd (which keeps the path string) does, even if
// a symlink in it has been retargeted since, and across a restart of the
// daemon. A lockspace directory D (CREATE_LOCKSPACE, e.g. qemu-lockd.conf's
// file_lockspace_dir, whose names are the SHA-256 of disk paths) holds
// leases: name N is the lease LockspaceName(D)/N, and D/N is its file.
// Busy errors keep libvirt's code 87 and domain 51 and carry the
// lockmgr.BusyError message, which names the holding domain and its pid.
// Lockspaces that clients create are kept in a LockspaceStore across
// restarts, because libvirtd sends CREATE_LOCKSPACE only when it starts; a
// store file that is not one (a disk corrupted it) is moved aside and
// logged, and the server starts without its lockspaces: calls in them fail
// until libvirtd creates them again, so none is granted twice.
// Which files go with their last holder, and by which other paths
// (symlinks) owners acquired disks, is kept in a GrantStore, so that a
// restarted server still releases by those paths and removes those files:
// when their last holder releases them, when its process exits (the
// daemon, which sees that through its pid tracking, calls
// Server.Forgotten), or at start if it exited while the daemon was down.
// A record the store cannot read is logged and skipped.
package virtlockd
