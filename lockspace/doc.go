// Package lockspace is vmlock's local lock driver: every lease is an OFD
// byte-range lock (fcntl F_OFD_SETLK) on byte 0 of a file, so it lives on an
// open file description. A copy of that description (File, passed to another
// process with SCM_RIGHTS) keeps the lock alive across a crash of the daemon,
// and the lock conflicts with the POSIX fcntl locks that virtlockd takes on
// the same byte. Locks work across hosts where the file system forwards
// byte-range locks (NFSv4, GFS2, CephFS).
//
// # What is locked
//
//   - A disk, direct leases (Config.DiskLeaseDir empty, the default): the
//     image file itself, opened O_RDWR, as virtlockd does. The image must
//     exist. Its fencing token lives in StateDir/tokens/H, where H is the
//     lowercase hex SHA-256 of the canonical path.
//   - A disk, indirect leases: the lease file DiskLeaseDir/H (H as above).
//   - A lease "LS/KEY": the lease file LeaseDir/LS/KEY.
//   - A custom resource of type T named N: LeaseDir/custom.T/<sha256hex(N)>.
//
// Byte 0 is write-locked for an exclusive grant and read-locked for a
// shared one. Byte 1 is a short-held mutex (F_OFD_SETLKW) that shared
// grants take while they read and rewrite the token, since several sharers
// may do so at once; an exclusive grant already excludes everybody.
//
// Names never escape their directory: lockspaces and keys are single path
// components checked by lockmgr.ValidName, and lockspace directories and
// lease files are opened relative to a directory descriptor with O_NOFOLLOW. The names ".hwm" and lockspaces
// beginning with "custom." are reserved.
//
// # On-disk format
//
// A lease file (indirect disk, lease, custom) and a direct lease's token file
// hold one record, written with a single pwrite while the lock is held:
//
//	bytes 0..7    fencing token, uint64 little endian
//	bytes 8..11   n, uint32 little endian
//	bytes 12..    n bytes of JSON: the lockmgr.Holder of the newest grant
//
// A direct lease's token file, once it holds a record, is extended to 4096
// bytes ending with the 16 bytes "vmlock.tokens.v1" and mapped into memory
// (tokenmap.go): grants then read and write the record there, without a
// system call; a file without that ending (cut short, rewritten) is read
// with pread and judged as below.
//
// An empty (new) file has token 0 and no holder. Any other file shorter
// than the header, or with token 0, was damaged (a torn write, a truncation,
// zeros after a crash): its last token is unknown, so the resource is not
// granted (CodeInternal, "damaged token record") until an operator repairs
// the file in place (docs/operations.md); the same holds for a .hwm shorter
// than 8 bytes. The
// token strictly increases on every grant of the resource, shared grants
// included. An
// upgrade to exclusive (Convert) is a grant too: it rewrites the record with
// the upgraded lease's holder and the file's token plus one, which becomes
// the lease's token. A busy
// error reads the record without locking (best effort) to name the holder;
// if the conflicting lock is a POSIX lock (F_OFD_GETLK reports its pid; OFD
// locks report -1) the holder is that foreign process instead.
//
// Each directory of lease files also holds ".hwm", the high-water mark: 8
// bytes, uint64 little endian, the greatest token of any lease file removed
// from that directory, updated under an OFD write lock on its byte 0.
//
// # Removal of lease files, and the inode re-check
//
// Lease files are created on demand (O_CREAT|O_NOFOLLOW, mode 0600) and
// removed by their last holder, without racing a concurrent acquirer:
//
//   - On release, the holder takes a write lock on byte 0 (a sharer gets it
//     only if it is the last holder). If it does, it raises .hwm to the
//     file's token, unlinks the file while still holding the lock, and only
//     then unlocks and closes it. Otherwise it just unlocks and closes. It
//     unlinks the path only if it still names the file locked: a held lease
//     file an operator moved away (or replaced) no longer excludes anyone,
//     and the file made anew at its path may be another holder's.
//   - An acquirer, after locking its descriptor, compares fstat of the
//     descriptor with fstatat of the path (device and inode), taken from
//     LeaseDir ("LS/KEY") or DiskLeaseDir, where other drivers look, not
//     from the cached lockspace directory. If the path is gone or names
//     another inode, it locked a file that was being removed: it closes it
//     and starts again (a bounded number of times).
//   - A file that is new (shorter than 8 bytes) continues from .hwm: its first
//     grant gets token hwm+1, so tokens never go back when files come and go.
//
// A lockspace directory that an operator renamed or removed after this
// Driver cached it is noticed: a removed one by the open of a lease file in
// it, a renamed one by that re-check (the path then names another file, or
// none, and LeaseDir/LS is not the cached directory). The Driver then uses
// the directory now at LeaseDir/LS, made again if needed, except while it
// holds leases through lease files in the old one: those files went with
// it, and a lease file in a new directory would not conflict with their
// locks, so every acquire in that lockspace fails (the error says the
// directory was renamed or removed) until they are released; a lease held
// there stays busy. (Other drivers cannot know of them.) Tokens in the new
// directory start again from 1, since the .hwm stayed in the old one.
//
// LeaseDir and DiskLeaseDir themselves are opened once, by New, and their
// paths are not checked again: renamed or removed (or a symlink to them
// changed) while a Driver runs, it keeps using the old directory while
// other drivers use the new one, and one lease can be granted twice. An
// operator moves them only while no lease in them is held on any host.
//
// The price of removal: a state string's token for a resource whose file
// was removed is compared with the directory's mark, which other resources
// may have raised since, so such a handover can be refused as stale although
// nobody took the resource (a conservative error, never a false grant).
//
// A last sharer's brief write lock at release can make a concurrent shared
// acquirer see a conflict; shared acquirers retry a few times before they
// report busy when the record says the resource is held shared.
//
// # Kept image descriptors
//
// A released direct lease's descriptor of an image file (not a block
// device, which must be free to be removed), unlocked, is kept open for the
// next grant of the image while inotify says its path still names that file
// (images.go has the rules): a grant is then one non-blocking epoll_wait per
// Acquire and one lock per resource, instead of a walk of the path. Only
// descriptors never passed out by File are kept, so vmlockd, which passes
// every lease's file to its lock-holder, opens its images every time.
//
// # Acquire
//
// Acquire first locks every requested resource (open, F_OFD_SETLK, inode
// re-check) and checks every expected token, and only then writes the new
// tokens and holder records. A busy or stale resource thus changes no
// token, and everything locked so far is released (lease files this call
// created are removed) before the error is returned. A shared resource's
// token can still move after the check (other sharers are granted it), so
// the shared resources with an expected token have their token mutexes
// (byte 1) taken together, in the order of their keys, then checked again,
// and written before any is let go.
//
// # Host crashes
//
// Tokens and records are written to the page cache, not synced: they survive
// a restart or crash of the daemon, but a crash of the host can take back
// the last grants made before it. StateDir/boot (boot.go) makes that safe:
// a grant in the host's n-th boot since the first start takes a token above
// n<<40, so tokens granted after a reboot exceed all granted before; and if
// the last boot ended without Close (which syncs and records a clean end),
// a state string whose token matches a record of that boot or an earlier
// one on a local file system is refused as stale, since the record may
// have lost a later grant. Records on network file systems (unknown types
// included) are trusted as before. A damaged StateDir/boot fails New.
package lockspace
