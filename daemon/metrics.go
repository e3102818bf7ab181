package daemon

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/vmlock/vmlock/virtlockd"
)

// Metrics are the daemon's Prometheus metrics, on a registry of their own
// (never the global one).
type Metrics struct {
	Registry    *prometheus.Registry
	acquires    *prometheus.CounterVec
	busy        prometheus.Counter
	revocations prometheus.Counter
	latency     *prometheus.HistogramVec
	libvirt     *prometheus.CounterVec

	// The libvirt endpoint's series, by procedure (and result: ok, busy,
	// error), looked up once here rather than by label on every call.
	lvCalls   [virtlockd.ProcCreateLockspace + 1][3]prometheus.Counter
	lvLatency [virtlockd.ProcCreateLockspace + 1]prometheus.Observer
}

// NewMetrics returns the metrics, registered on a new registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		acquires: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmlock_acquires_total", Help: "Acquire calls, by result (ok, or the error class).",
		}, []string{"result"}),
		busy: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmlock_busy_refusals_total", Help: "Acquires refused because a resource was held by someone else.",
		}),
		revocations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmlock_revocations_total", Help: "Holders killed by a revocation.",
		}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "vmlock_request_duration_seconds", Help: "API call latency, by method.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 10),
		}, []string{"method"}),
		libvirt: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmlock_libvirt_calls_total", Help: "Calls on the libvirt (virtlockd protocol) endpoint, by procedure and result (ok, busy or error).",
		}, []string{"procedure", "result"}),
	}
	m.Registry.MustRegister(m.acquires, m.busy, m.revocations, m.latency, m.libvirt,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for p := virtlockd.ProcRegister; p <= virtlockd.ProcCreateLockspace; p++ {
		for i, result := range []string{"ok", "busy", "error"} {
			m.lvCalls[p][i] = m.libvirt.WithLabelValues(p.String(), result)
		}
		m.lvLatency[p] = m.latency.WithLabelValues("libvirt." + p.String())
	}
	return m
}

// register adds the gauges that read the daemon's table.
func (m *Metrics) register(d *Daemon) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vmlock_locks_held", Help: "Resources held (read-only uses included)."},
			func() float64 { return float64(d.mgr.HeldCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vmlock_owners", Help: "Objects whose owner process is watched."},
			func() float64 { return float64(d.ownerCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vmlock_kept_objects",
			Help: "Objects whose lock-holder records vmlockd left untouched at its start, their locks held, because it cannot tell that their owner is gone (see docs/operations.md)."},
			func() float64 { return float64(d.keptCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vmlock_unadopted_leases",
			Help: "Leases vmlockd could not take back at its start from owners that still run; their locks stay held until the owner exits (see docs/operations.md)."},
			func() float64 { return float64(d.unadoptedCount()) }),
	)
}

// observeLibvirt counts a call of the libvirt endpoint and records its
// latency under the method "libvirt.PROCEDURE". A busy refusal also counts
// as one of the daemon's busy refusals.
func (m *Metrics) observeLibvirt(p virtlockd.Procedure, took time.Duration, rerr *virtlockd.RemoteError) {
	if p < virtlockd.ProcRegister || p > virtlockd.ProcCreateLockspace {
		return // the server observes valid procedures only
	}
	result := 0 // ok
	switch {
	case rerr == nil:
	case rerr.Code == virtlockd.CodeResourceBusy:
		result = 1
		m.busy.Inc()
	default:
		result = 2
	}
	m.lvCalls[p][result].Inc()
	m.lvLatency[p].Observe(took.Seconds())
}
