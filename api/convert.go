package api

import (
	"time"

	"github.com/vmlock/vmlock/api/vmlockpb"
	"github.com/vmlock/vmlock/lockmgr"
)

// ObjectToPB converts an object for the wire.
func ObjectToPB(o lockmgr.Object) *vmlockpb.Object {
	return &vmlockpb.Object{Uuid: o.UUID, Name: o.Name, Id: int64(o.ID), Pid: int64(o.PID), Uri: o.URI, Host: o.Host}
}

// ObjectFromPB converts an object from the wire; it does not validate it.
func ObjectFromPB(o *vmlockpb.Object) lockmgr.Object {
	if o == nil {
		return lockmgr.Object{}
	}
	return lockmgr.Object{UUID: o.Uuid, Name: o.Name, ID: int(o.Id), PID: int(o.Pid), URI: o.Uri, Host: o.Host}
}

// ResourceToPB converts a resource for the wire.
func ResourceToPB(r lockmgr.Resource) *vmlockpb.Resource {
	return &vmlockpb.Resource{Type: string(r.Type), Name: r.Name, Mode: r.Mode.String()}
}

// ResourceFromPB converts and validates a resource from the wire. An empty
// type means a disk.
func ResourceFromPB(r *vmlockpb.Resource) (lockmgr.Resource, error) {
	if r == nil {
		return lockmgr.Resource{}, lockmgr.Errorf(lockmgr.CodeInvalidArgument, "missing resource")
	}
	m, err := lockmgr.ParseMode(r.Mode)
	if err != nil {
		return lockmgr.Resource{}, err
	}
	t := lockmgr.ResourceType(r.Type)
	if t == "" {
		t = lockmgr.TypeDisk
	}
	res := lockmgr.Resource{Type: t, Name: r.Name, Mode: m}
	return res, res.Validate()
}

// HolderToPB converts a holder for the wire.
func HolderToPB(h lockmgr.Holder) *vmlockpb.Holder {
	return &vmlockpb.Holder{Name: h.Name, Uuid: h.UUID, Pid: int64(h.PID), Host: h.Host, Mode: h.Mode.String(),
		SinceUnixNano: unixNano(h.Since), Foreign: h.Foreign}
}

// HolderFromPB converts a holder from the wire.
func HolderFromPB(h *vmlockpb.Holder) lockmgr.Holder {
	m, _ := lockmgr.ParseMode(h.GetMode())
	return lockmgr.Holder{Name: h.GetName(), UUID: h.GetUuid(), PID: int(h.GetPid()), Host: h.GetHost(), Mode: m,
		Since: fromUnixNano(h.GetSinceUnixNano()), Foreign: h.GetForeign()}
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}
