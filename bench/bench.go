// Package bench holds what every `vmlock bench` scenario shares: the JSON
// report of shared/specs/bench-output.md, and the statistics used to fill it.
//
// A scenario measures the project's path and its floor or peer in the same
// run, interleaved, after a warm-up, and reports their ratio as a goal.
package bench

import (
	"encoding/json"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Better says which direction of a goal's value is good.
type Better string

// The two directions.
const (
	Lower  Better = "lower"
	Higher Better = "higher"
)

// Goal is one target of an issue, with the measured value.
type Goal struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Target float64 `json:"target"`
	Better Better  `json:"better"`
}

// Met reports whether the value reaches the target.
func (g Goal) Met() bool {
	if g.Better == Higher {
		return g.Value >= g.Target
	}
	return g.Value <= g.Target
}

// Machine describes where a report was measured.
type Machine struct {
	CPUs   int    `json:"cpus"`
	Go     string `json:"go"`
	Kernel string `json:"kernel"`
}

// Report is the one JSON object a scenario prints.
type Report struct {
	Scenario string             `json:"scenario"`
	Machine  Machine            `json:"machine"`
	Metrics  map[string]float64 `json:"metrics"`
	Goals    []Goal             `json:"goals"`
}

// NewReport returns an empty report for scenario, with the machine filled in.
func NewReport(scenario string) *Report {
	return &Report{Scenario: scenario, Machine: ThisMachine(), Metrics: map[string]float64{}, Goals: []Goal{}}
}

// ThisMachine describes the running machine.
func ThisMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
		if i := strings.IndexByte(m.Kernel, '-'); i > 0 {
			m.Kernel = m.Kernel[:i]
		}
	}
	return m
}

// Goal appends a goal.
func (r *Report) Goal(name string, value, target float64, better Better) {
	r.Goals = append(r.Goals, Goal{Name: name, Value: round(value), Target: target, Better: better})
}

// Metric records a figure; name ends with its unit (_us, _ms, _s, _per_s, _mib...).
func (r *Report) Metric(name string, value float64) { r.Metrics[name] = round(value) }

// Write prints the report as one indented JSON object.
func (r *Report) Write(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteStdout prints the report on stdout.
func (r *Report) WriteStdout() error { return r.Write(os.Stdout) }

func round(v float64) float64 {
	// Three significant decimals are plenty for noisy figures and keep the JSON readable.
	if v >= 1000 || v <= -1000 {
		return float64(int64(v*10+0.5)) / 10
	}
	return float64(int64(v*1000+0.5)) / 1000
}

// Samples collects durations.
type Samples []time.Duration

// Percentile returns the p-th percentile (0 < p ≤ 100) by nearest rank.
func (s Samples) Percentile(p float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := slices.Clone(s)
	slices.Sort(c)
	i := int(float64(len(c))*p/100+0.5) - 1
	i = max(0, min(i, len(c)-1))
	return c[i]
}

// Micros returns d in microseconds.
func Micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Interleave runs warm iterations of each function, then n rounds in which
// every function runs once, in turn, timed individually; it returns one
// Samples per function. Interleaving keeps slow drifts of the machine (other
// load, frequency) out of the ratios.
func Interleave(warm, n int, fs ...func()) []Samples {
	for range warm {
		for _, f := range fs {
			f()
		}
	}
	out := make([]Samples, len(fs))
	for i := range out {
		out[i] = make(Samples, 0, n)
	}
	for range n {
		for i, f := range fs {
			t := time.Now()
			f()
			out[i] = append(out[i], time.Since(t))
		}
	}
	return out
}
