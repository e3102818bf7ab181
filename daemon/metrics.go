package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the daemon's Prometheus metrics, on a registry of their own
// (never the global one).
type Metrics struct {
	Registry    *prometheus.Registry
	acquires    *prometheus.CounterVec
	busy        prometheus.Counter
	revocations prometheus.Counter
	latency     *prometheus.HistogramVec
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
	}
	m.Registry.MustRegister(m.acquires, m.busy, m.revocations, m.latency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// register adds the gauges that read the daemon's table.
func (m *Metrics) register(d *Daemon) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vmlock_locks_held", Help: "Resources held (read-only uses included)."},
			func() float64 { return float64(d.mgr.HeldCount()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vmlock_owners", Help: "Objects whose owner process is watched."},
			func() float64 { return float64(d.ownerCount()) }),
	)
}
