package etcdlock

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/url"
	"strings"

	"github.com/vmlock/vmlock/lockmgr"
)

// keyspace builds the keys of the layout in the package comment.
type keyspace struct{ prefix string }

// maxKeyPart bounds an escaped name in a key; longer ones are hashed, so
// that a grant of many long disk paths stays within etcd's request size.
const maxKeyPart = 256

// esc makes s one key component: url.PathEscape (no "/" left), or for a long
// name "~" and its SHA-256 ("~" never starts an escaped resource key, whose
// type starts with a letter). The holder record keeps the full name.
func esc(s string) string {
	e := url.PathEscape(s)
	if len(e) <= maxKeyPart {
		return e
	}
	sum := sha256.Sum256([]byte(s))
	return "~" + hex.EncodeToString(sum[:])
}

// base is the prefix of every holder key of the resource with key k.
func (ks keyspace) base(k string) string { return ks.prefix + "res/" + esc(k) + "/" }
func (ks keyspace) excl(k string) string { return ks.base(k) + "e" }
func (ks keyspace) token(k string) string {
	return ks.prefix + "tok/" + esc(k)
}
func (ks keyspace) host(h string) string { return ks.prefix + "hosts/" + esc(h) }

// shared returns a new sharer key: unique per grant, so that two grants
// of one resource to one host (a migration to itself, two objects) never
// share a key.
func (ks keyspace) shared(k, host string) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return ks.base(k) + "s/" + esc(host) + "." + hex.EncodeToString(b[:])
}

// void returns the key that voids the grant attempt with record.Attempt
// attempt of host: the attempt's transaction is applied only while it does
// not exist (see Driver.voidAttempt).
func (ks keyspace) void(host, attempt string) string {
	return ks.prefix + "void/" + esc(host) + "." + attempt
}

// isExcl reports whether a holder key is an exclusive one.
func isExcl(key string) bool { return strings.HasSuffix(key, "/e") }

// record is the value of a holder key.
type record struct {
	Resource lockmgr.Resource `json:"resource"`
	Holder   lockmgr.Holder   `json:"holder"`
	// Token is the grant's fencing token when it differs from the key's
	// CreateRevision: after a downgrade by Convert moved the grant to
	// another key (an upgrade is a new grant, whose token is its key's
	// CreateRevision).
	Token uint64 `json:"token,omitempty"`
	// Replaced is, in the record of an upgrade, the token of the shared
	// grant it replaced: the one the daemon's record still names if it
	// died before recording the upgrade (see Driver.Adopt).
	Replaced uint64 `json:"replaced,omitempty"`
	// Attempt is a random value unique to the grant or conversion that
	// wrote the key, by which the driver recognises its own write when
	// etcd's answer to it was lost.
	Attempt string `json:"attempt,omitempty"`
}

// nonce returns a random value for record.Attempt.
func nonce() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func parseRecord(v []byte) (record, bool) {
	var r record
	if err := json.Unmarshal(v, &r); err != nil {
		return record{}, false
	}
	return r, true
}

// tokRecord is the value of a token key: who moved it last. The driver
// reads it only to recognise a grant of its own whose answer was lost and
// that it withdrew (Void), so that a retry of that grant with the same
// state is not refused as stale (see Driver.Acquire).
type tokRecord struct {
	Host string `json:"host"`
	UUID string `json:"uuid,omitempty"` // the holder's object
	// Attempt is the grant's record.Attempt; Expect the token the grant
	// was conditional on (Request.Expect, 0 if none).
	Attempt string `json:"attempt,omitempty"`
	Expect  uint64 `json:"expect,omitempty"`
	// Void says that the grant was withdrawn by voidOnce before anybody
	// was told of it: nobody was granted the resource by it.
	Void bool `json:"void,omitempty"`
}

func (r tokRecord) String() string {
	b, _ := json.Marshal(r) // cannot fail: strings, a number and a bool
	return string(b)
}

func parseTokRecord(v []byte) (tokRecord, bool) {
	var r tokRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return tokRecord{}, false
	}
	return r, true
}

// hostRecord is the value of a host's session key.
type hostRecord struct {
	Host  string `json:"host"`
	Lease string `json:"lease"` // hex, as etcdctl prints lease IDs
	PID   int    `json:"pid"`
}
