package daemon

import (
	"google.golang.org/grpc"

	"github.com/vmlock/vmlock/api/vmlockpb"
)

// services lists the gRPC services vmlockd serves on its API socket. Each
// feature (hierarchical locks, QEMU supervision, ...) adds one line.
func (d *Daemon) services() []func(*grpc.Server) {
	d.qemu = d.newQEMUSupervisor()
	return []func(*grpc.Server){
		func(s *grpc.Server) { vmlockpb.RegisterVMLockServer(s, &service{d: d}) },
		func(s *grpc.Server) { vmlockpb.RegisterMigrateServer(s, &migrateService{d: d}) },
		func(s *grpc.Server) { vmlockpb.RegisterQEMUServer(s, &qemuService{s: d.qemu}) },
		func(s *grpc.Server) { vmlockpb.RegisterHierLockServer(s, d.hier) },
	}
}
