package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/vmlock/vmlock/bench"
	"github.com/vmlock/vmlock/etcdlock"
	"github.com/vmlock/vmlock/etcdlock/etcdtest"
	"github.com/vmlock/vmlock/lockmgr"
)

// benchEtcdOpts are the flags of `vmlock bench etcd`.
type benchEtcdOpts struct {
	json       bool
	rounds     int
	handoffs   int
	queueDelay time.Duration
	ttl        time.Duration
}

func newBenchEtcdCmd() *cobra.Command {
	o := &benchEtcdOpts{}
	c := &cobra.Command{
		Use:         "etcd",
		Annotations: map[string]string{annotationParallel: ""},
		Short:       "the etcd driver against etcd's concurrency.Mutex on an embedded 3-member cluster: grants, hand-off, takeover",
		Long: `Starts a 3-member etcd cluster inside this process (loopback, fsync on) and measures, in one run:
  - a grant of 1 and of 8 disks through the etcd driver (one transaction) against
    concurrency.Mutex taking the same 8 resources one by one;
  - hand-off to a waiting host (release → the waiter holds the lock) against Mutex hand-off,
    the waiter queued --queue-delay before the release, each hand-off starting at a random
    point of etcd's 100 ms watcher sync loop; with each host's client pinned to one member
    (the goal) and with every client spread over all members (handoff_spread_*);
  - takeover: hosts die right after a lease renewal; another host waits for their disks.
    takeover_s_over_ttl = the slowest takeover − TTL.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBenchEtcd(cmd.Context(), o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := c.Flags()
	f.BoolVar(&o.json, "json", false, "print the report as one JSON object (shared/specs/bench-output.md)")
	f.IntVar(&o.rounds, "rounds", 200, "timed grant rounds")
	f.IntVar(&o.handoffs, "handoffs", 100, "timed hand-offs of each kind")
	f.DurationVar(&o.queueDelay, "queue-delay", 10*time.Millisecond, "how long the waiter is queued before the holder releases")
	f.DurationVar(&o.ttl, "ttl", etcdlock.DefaultTTL, "session TTL of the hosts that die in the takeover test")
	return c
}

func runBenchEtcd(ctx context.Context, o *benchEtcdOpts, stdout, stderr io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	if o.rounds < 1 || o.handoffs < 1 {
		return usageError{errors.New("--rounds and --handoffs must be at least 1")}
	}
	progress := func(format string, args ...any) { fmt.Fprintf(stderr, "bench etcd: "+format+"\n", args...) }
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	progress("starting a 3-member embedded etcd cluster")
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	cl, err := etcdtest.Start(sctx, etcdtest.Options{Members: 3})
	cancel()
	if err != nil {
		return err
	}
	defer cl.Close()
	eps := cl.Endpoints()

	newHost := func(name string, ttl time.Duration, eps []string) (*etcdlock.Driver, error) {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		return etcdlock.New(ctx, etcdlock.Config{Endpoints: eps, Host: name, TTL: ttl, Logger: logger})
	}
	var closers []func() error
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}()
	newSide := func(name string, eps []string) (side, error) {
		d, err := newHost(name, 0, eps)
		if err != nil {
			return side{}, err
		}
		closers = append(closers, d.Close)
		cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			return side{}, err
		}
		closers = append(closers, cli.Close)
		s, err := concurrency.NewSession(cli, concurrency.WithTTL(int(etcdlock.DefaultTTL/time.Second)))
		if err != nil {
			return side{}, err
		}
		closers = append(closers, s.Close)
		return side{d, s}, nil
	}
	// Spread: every client knows every member (clientv3 balances its
	// calls over them). Pinned: each host talks to a member of its own,
	// as hosts configured with their nearest member do.
	var spread, pinned [2]side
	for i := range 2 {
		var err error
		if spread[i], err = newSide(fmt.Sprintf("bench-%d", i+1), eps); err != nil {
			return err
		}
		if pinned[i], err = newSide(fmt.Sprintf("bench-pinned-%d", i+1), eps[i:i+1]); err != nil {
			return err
		}
	}

	rep := bench.NewReport("etcd")
	progress("grants: %d rounds of 1 and 8 disks, driver and Mutex interleaved", o.rounds)
	if err := benchGrants(ctx, o.rounds, spread[0].d, spread[0].s, rep); err != nil {
		return err
	}
	progress("hand-off: %d rounds of each, hosts pinned to one member each and spread over all, waiter queued %s before the release", o.handoffs, o.queueDelay)
	if err := benchHandoff(ctx, o, pinned, spread, rep); err != nil {
		return err
	}
	progress("takeover: 3 hosts with TTL %s die right after a renewal", o.ttl)
	victim := func(name string, ttl time.Duration) (*etcdlock.Driver, error) { return newHost(name, ttl, eps) }
	if err := benchTakeover(ctx, o.ttl, victim, spread[1].d, rep); err != nil {
		return err
	}
	if o.json {
		return rep.Write(stdout)
	}
	names := make([]string, 0, len(rep.Metrics))
	for k := range rep.Metrics {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Fprintf(stdout, "%-32s %v\n", k, rep.Metrics[k])
	}
	for _, g := range rep.Goals {
		fmt.Fprintf(stdout, "goal %-27s %v (target %v, %s is better; met: %v)\n", g.Name, g.Value, g.Target, g.Better, g.Met())
	}
	return nil
}

func benchDisks(n int, uuid string) []lockmgr.Request {
	reqs := make([]lockmgr.Request, n)
	for i := range reqs {
		reqs[i] = lockmgr.Request{
			Resource: lockmgr.DiskResource(fmt.Sprintf("/var/lib/vmlock-bench/disk%d.qcow2", i), lockmgr.Exclusive),
			Holder:   lockmgr.Holder{Name: "bench", UUID: uuid, PID: os.Getpid()},
		}
	}
	return reqs
}

// mutexKey is where the Mutex recipe keeps the lock of the same resource.
func mutexKey(r lockmgr.Request) string { return "/vmlock-bench-mutex/" + r.Resource.Key() }

func benchGrants(ctx context.Context, rounds int, d *etcdlock.Driver, s *concurrency.Session, rep *bench.Report) error {
	const uuid = "bbbbbbbb-0000-0000-0000-000000000001"
	one, eight := benchDisks(1, uuid), benchDisks(8, uuid)
	driver := func(reqs []lockmgr.Request) (time.Duration, error) {
		t := time.Now()
		ls, err := d.Acquire(ctx, reqs)
		el := time.Since(t)
		if err != nil {
			return 0, err
		}
		return el, d.Release(ctx, ls)
	}
	mutex := func(reqs []lockmgr.Request) (time.Duration, error) {
		ms := make([]*concurrency.Mutex, len(reqs))
		t := time.Now()
		for i, r := range reqs {
			ms[i] = concurrency.NewMutex(s, mutexKey(r))
			if err := ms[i].Lock(ctx); err != nil {
				return 0, err
			}
		}
		el := time.Since(t)
		for _, m := range ms {
			if err := m.Unlock(ctx); err != nil {
				return 0, err
			}
		}
		return el, nil
	}
	type run struct {
		f    func([]lockmgr.Request) (time.Duration, error)
		reqs []lockmgr.Request
	}
	runs := []run{{driver, one}, {mutex, one}, {driver, eight}, {mutex, eight}}
	samples := make([]bench.Samples, len(runs))
	warm := max(10, rounds/10)
	for i := range warm + rounds {
		for j, r := range runs {
			el, err := r.f(r.reqs)
			if err != nil {
				return err
			}
			if i >= warm {
				samples[j] = append(samples[j], el)
			}
		}
	}
	ms := func(s bench.Samples) float64 { return bench.Micros(s.Percentile(50)) / 1000 }
	rep.Metric("grant1_driver_p50_ms", ms(samples[0]))
	rep.Metric("grant1_mutex_p50_ms", ms(samples[1]))
	rep.Metric("grant8_driver_p50_ms", ms(samples[2]))
	rep.Metric("grant8_mutex_p50_ms", ms(samples[3]))
	rep.Metric("grant8_driver_p99_ms", bench.Micros(samples[2].Percentile(99))/1000)
	rep.Metric("grant1_speedup_vs_mutex", ms(samples[1])/ms(samples[0]))
	rep.Goal("grant8_speedup_vs_mutex", ms(samples[3])/ms(samples[2]), 4, bench.Higher)
	return nil
}

// side is one host of the benchmark: the etcd driver, and a Mutex session
// of its own client configured alike.
type side struct {
	d *etcdlock.Driver
	s *concurrency.Session
}

// benchHandoff measures hand-offs between two pinned hosts (the goal: each
// host's client talks to one member) and between two spread ones (every
// client balances over every member), the driver's and the Mutex's in turn.
//
// The Mutex's waiter watches from the revision its Get returned, which puts
// its watcher in etcd's unsynced group until the member's next watcher sync
// (every 100 ms), so it hears of the release up to 100 ms late: the ~100 ms
// of shared/specs/peers-and-floors.md. A spread client may send the Get to
// one member and the watch to another that has not applied that revision
// yet; such a watch is synced at once, so spread Mutex hand-offs are fast or
// slow by the luck of that race. The driver watches from "now" and is always
// synced.
func benchHandoff(ctx context.Context, o *benchEtcdOpts, pinned, spread [2]side, rep *bench.Report) error {
	reqs := benchDisks(1, "bbbbbbbb-0000-0000-0000-000000000002")
	reqs[0].Resource.Name = "/var/lib/vmlock-bench/handoff.qcow2"
	// driver: h1 holds, h2 waits; the release is timed until h2 holds.
	var rel bench.Samples // the release transaction alone
	driver := func(hosts [2]side, wait time.Duration) (time.Duration, error) {
		h1, h2 := hosts[0].d, hosts[1].d
		held, err := h1.Acquire(ctx, reqs)
		if err != nil {
			return 0, err
		}
		queued := make(chan struct{}, 1)
		type result struct {
			ls  []lockmgr.Lease
			err error
			at  time.Time
		}
		done := make(chan result, 1)
		go func() {
			ls, err := h2.AcquireWait(ctx, reqs, func(*lockmgr.BusyError) {
				select {
				case queued <- struct{}{}:
				default:
				}
			})
			done <- result{ls, err, time.Now()}
		}()
		select {
		case <-queued:
		case r := <-done:
			return 0, fmt.Errorf("waiter did not wait: %v", r.err)
		}
		time.Sleep(wait)
		t := time.Now()
		if err := h1.Release(ctx, held); err != nil {
			return 0, err
		}
		rel = append(rel, time.Since(t))
		r := <-done
		if r.err != nil {
			return 0, r.err
		}
		return r.at.Sub(t), h2.Release(ctx, r.ls)
	}
	key := mutexKey(reqs[0])
	mutex := func(hosts [2]side, wait time.Duration) (time.Duration, error) {
		s1, s2 := hosts[0].s, hosts[1].s
		m1, m2 := concurrency.NewMutex(s1, key), concurrency.NewMutex(s2, key)
		if err := m1.Lock(ctx); err != nil {
			return 0, err
		}
		done := make(chan error, 1)
		var at time.Time
		go func() {
			err := m2.Lock(ctx)
			at = time.Now()
			done <- err
		}()
		// Queued once the waiter's key is there.
		for {
			resp, err := s1.Client().Get(ctx, key+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				return 0, err
			}
			if resp.Count >= 2 {
				break
			}
			time.Sleep(time.Millisecond)
		}
		time.Sleep(wait)
		t := time.Now()
		if err := m1.Unlock(ctx); err != nil {
			return 0, err
		}
		if err := <-done; err != nil {
			return 0, err
		}
		return at.Sub(t), m2.Unlock(ctx)
	}
	var ds, ms, sds, sms bench.Samples
	for i := range 3 + o.handoffs {
		// Each hand-off starts at a random point of etcd's watcher sync
		// period (100 ms): rounds that took a fixed time could phase-lock
		// with it and show the Mutex's best or worst case instead of its
		// typical one.
		var got [4]time.Duration // pinned driver, pinned Mutex, spread driver, spread Mutex
		for j := range got {
			time.Sleep(rand.N(100 * time.Millisecond))
			var err error
			hosts := pinned
			if j >= 2 {
				hosts = spread
			}
			if j%2 == 0 {
				got[j], err = driver(hosts, o.queueDelay)
			} else {
				got[j], err = mutex(hosts, o.queueDelay)
			}
			if err != nil {
				return fmt.Errorf("hand-off %d: %w", j, err)
			}
		}
		if i >= 3 {
			ds, ms, sds, sms = append(ds, got[0]), append(ms, got[1]), append(sds, got[2]), append(sms, got[3])
		}
	}
	p50 := func(s bench.Samples) float64 { return bench.Micros(s.Percentile(50)) / 1000 }
	p90 := func(s bench.Samples) float64 { return bench.Micros(s.Percentile(90)) / 1000 }
	dm, mm := p50(ds), p50(ms)
	rep.Metric("handoff_driver_p50_ms", dm)
	rep.Metric("handoff_driver_p90_ms", p90(ds))
	rep.Metric("handoff_driver_release_p50_ms", p50(rel))
	rep.Metric("handoff_mutex_p50_ms", mm)
	rep.Metric("handoff_mutex_p90_ms", p90(ms))
	rep.Metric("handoff_spread_driver_p50_ms", p50(sds))
	rep.Metric("handoff_spread_mutex_p50_ms", p50(sms))
	rep.Metric("handoff_spread_mutex_p90_ms", p90(sms))
	rep.Metric("handoff_spread_speedup_vs_mutex", p50(sms)/p50(sds))
	rep.Metric("handoff_queue_delay_ms", bench.Micros(o.queueDelay)/1000)
	rep.Goal("handoff_speedup_vs_mutex", mm/dm, 10, bench.Higher)
	return nil
}

func benchTakeover(ctx context.Context, ttl time.Duration, newHost func(string, time.Duration) (*etcdlock.Driver, error), waiter *etcdlock.Driver, rep *bench.Report) error {
	const n = 3
	var victims []*etcdlock.Driver
	defer func() {
		for _, v := range victims {
			v.Close()
		}
	}()
	reqs := make([][]lockmgr.Request, n)
	for i := range n {
		v, err := newHost(fmt.Sprintf("bench-victim-%d", i), ttl)
		if err != nil {
			return err
		}
		victims = append(victims, v)
		reqs[i] = benchDisks(1, fmt.Sprintf("bbbbbbbb-0000-0000-0000-00000000001%d", i))
		reqs[i][0].Resource.Name = fmt.Sprintf("/var/lib/vmlock-bench/takeover%d.qcow2", i)
		if _, err := v.Acquire(ctx, reqs[i]); err != nil {
			return err
		}
	}
	var wg sync.WaitGroup
	took := make([]time.Duration, n)
	errs := make([]error, n)
	for i, v := range victims {
		wg.Go(func() {
			queued := make(chan struct{})
			type result struct {
				err error
				at  time.Time
			}
			done := make(chan result, 1)
			go func() {
				wctx, cancel := context.WithTimeout(ctx, 3*ttl+30*time.Second)
				defer cancel()
				var once sync.Once
				ls, err := waiter.AcquireWait(wctx, reqs[i], func(*lockmgr.BusyError) { once.Do(func() { close(queued) }) })
				at := time.Now()
				if err == nil {
					err = waiter.Release(ctx, ls)
				}
				done <- result{err, at}
			}()
			select {
			case <-queued:
			case r := <-done:
				errs[i] = fmt.Errorf("takeover waiter did not wait: %v", r.err)
				return
			}
			// Die right after a renewal, the worst case for the takeover.
			n0 := v.Status().Renewals
			for v.Status().Renewals == n0 {
				time.Sleep(time.Millisecond)
			}
			died := time.Now()
			v.Close()
			r := <-done
			took[i], errs[i] = r.at.Sub(died), r.err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	slices.Sort(took)
	rep.Metric("ttl_s", ttl.Seconds())
	rep.Metric("takeover_p50_s", took[n/2].Seconds())
	rep.Metric("takeover_max_s", took[n-1].Seconds())
	rep.Goal("takeover_s_over_ttl", (took[n-1] - ttl).Seconds(), 1.0, bench.Lower)
	return nil
}
