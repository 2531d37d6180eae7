package scale

import (
	"context"
	"flag"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

var (
	controllerBin = flag.String("controller", "", "the controller binary to measure; without it TestScale is skipped")
	volumes       = flag.Int("volumes", 1000, "QuorumVolumes to create at once")
	nodes         = flag.Int("nodes", 100, "simulated nodes")
	lost          = flag.Int("lost", 10, "nodes that stop renewing their Lease at once")
	idle          = flag.Duration("idle", 2*time.Minute, "how long to count the requests of idle volumes")
	out           = flag.String("out", "", "file for the report (standard output when empty)")
)

// Targets of the issue; the report says whether each is met.
const (
	readyTarget   = 60 * time.Second
	p99Target     = time.Second
	rssTarget     = 256 << 20
	idleTarget    = 0.01 // requests per idle volume and minute: "about zero"
	replicas      = 3
	readyTimeout  = 10 * time.Minute
	healthTimeout = contract.DefaultLeaseDuration + 3*time.Minute
)

func TestMain(m *testing.M) { kubetest.Main(m) }

func TestScale(t *testing.T) {
	if *controllerBin == "" {
		t.Skip("the scale benchmark runs from bench/scale.sh")
	}
	if *volumes < 1 || *nodes < replicas || *lost < 1 || *lost > *nodes-replicas+1 || *idle <= 0 {
		t.Fatalf("-volumes %d -nodes %d -lost %d -idle %s: want a volume, at least %d nodes, and at least one lost node with %d left",
			*volumes, *nodes, *lost, *idle, replicas, replicas-1)
	}
	ctx := t.Context()
	srv, direct := qvtest.Start(t)
	// The simulated agents and the volume creation are not what is
	// measured: no client-side rate limit holds them back.
	rc := rest.CopyConfig(srv.Config)
	rc.QPS = -1
	c, err := client.New(rc, client.Options{Scheme: direct.Scheme()})
	if err != nil {
		t.Fatal(err)
	}
	api, err := rest.HTTPClientFor(srv.Config)
	if err != nil {
		t.Fatal(err)
	}
	apiMetrics := srv.Config.Host + "/metrics"

	names := make([]string, *nodes)
	for i := range names {
		names[i] = fmt.Sprintf("node-%03d", i)
	}
	progress("starting %d simulated nodes", *nodes)
	ag := startAgents(ctx, t, rc, c, names)
	ctl := startController(t, srv)
	progress("controller running (pid %d, metrics %s)", ctl.pid, ctl.metrics)

	var rep report
	rep.header(ctl)

	// 1. Create every volume at once and wait until all are Ready.
	apiBefore := mustScrape(t, api, apiMetrics)
	ctlBefore := mustScrape(t, http.DefaultClient, ctl.metrics)
	procBefore, rigBefore := ctl.stat(t), rigCPU()
	progress("creating %d QuorumVolumes", *volumes)
	start := time.Now()
	parallel(t, *volumes, func(i int) error {
		qv := &v1alpha1.QuorumVolume{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("vol-%04d", i)},
			Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("1Gi"), Replicas: replicas},
		}
		return c.Create(ctx, qv)
	})
	created := time.Since(start)
	progress("created in %.1f s; waiting for all Ready", created.Seconds())
	ready := waitCount(t, ag, "Ready", *volumes, start, readyTimeout, func(_ string, st volumeState) bool {
		return st.phase == v1alpha1.VolumeReady
	})
	readyAfter := time.Since(start)
	// The last writes of the agents and the controller settle.
	time.Sleep(2 * time.Second)
	procAfter, rigAfter, window := ctl.stat(t), rigCPU(), time.Since(start)
	ctlAfter := mustScrape(t, http.DefaultClient, ctl.metrics)
	apiAfter := mustScrape(t, api, apiMetrics)
	isQV := func(l map[string]string) bool { return l["controller"] == "quorumvolume" }
	recon := histogramOf(ctlAfter, "controller_runtime_reconcile_time_seconds", isQV).minus(histogramOf(ctlBefore, "controller_runtime_reconcile_time_seconds", isQV))
	reconErrors := sum(ctlAfter, "controller_runtime_reconcile_total", func(l map[string]string) bool { return isQV(l) && l["result"] == "error" }) -
		sum(ctlBefore, "controller_runtime_reconcile_total", func(l map[string]string) bool { return isQV(l) && l["result"] == "error" })
	createReqs := apiRequestsOf(apiAfter).since(apiRequestsOf(apiBefore))
	leaseReqs, volReqs := createReqs.split()
	p50, p99 := recon.quantile(0.5), recon.quantile(0.99)
	cpu := procAfter.cpu - procBefore.cpu

	rep.section("%d volumes created at once (creates took %.1f s)", *volumes, created.Seconds())
	if ready < *volumes {
		rep.row("volumes Ready", fmt.Sprintf("%d of %d after %.0f s", ready, *volumes, readyAfter.Seconds()), "all", false)
	} else {
		rep.row("all Ready after", fmt.Sprintf("%.1f s", readyAfter.Seconds()), fmt.Sprintf("<= %.0f s", readyTarget.Seconds()), readyAfter <= readyTarget)
	}
	rep.row("reconciles", fmt.Sprintf("%.0f (%.0f errors)", recon.count, reconErrors), "", true)
	rep.row("reconcile p50", ms(p50), "", true)
	rep.row("reconcile p99", ms(p99), fmt.Sprintf("< %d ms", p99Target.Milliseconds()), p99 < p99Target.Seconds())
	rep.row("reconciles per second", fmt.Sprintf("%.1f", recon.count/readyAfter.Seconds()), "", true)
	rep.row("API requests per volume", fmt.Sprintf("%.1f", volReqs/float64(*volumes)), "", true)
	rep.row("Lease requests meanwhile", fmt.Sprintf("%.0f", leaseReqs), "", true)
	rep.row("controller RSS (peak)", fmt.Sprintf("%.0f MiB (%.0f MiB)", mib(procAfter.rss), mib(procAfter.peakRSS)), fmt.Sprintf("< %d MiB", rssTarget>>20), procAfter.peakRSS < rssTarget)
	rep.row("controller CPU", fmt.Sprintf("%.1f s (%.2f cores)", cpu.Seconds(), cpu.Seconds()/window.Seconds()), "", true)
	rep.row("other CPU, cores", cores(rigBefore, rigAfter, window), "", true)
	rep.detail("API requests while creating (agents' included), by verb and resource:\n" + createReqs.String())

	// 2. Nodes lose their Lease at once.
	lostNodes := names[:*lost]
	isLost := map[string]bool{}
	for _, n := range lostNodes {
		isLost[n] = true
	}
	lostOn := func(st volumeState) int {
		k := 0
		for _, n := range st.nodes {
			if isLost[n] {
				k++
			}
		}
		return k
	}
	// Three replicas, vote threshold 2: Degraded with one of them on a
	// lost node, Faulted with two or three.
	wantPhase := func(k int) v1alpha1.VolumePhase {
		switch {
		case k == 0:
			return v1alpha1.VolumeReady
		case replicas-k >= replicas/2+1:
			return v1alpha1.VolumeDegraded
		default:
			return v1alpha1.VolumeFaulted
		}
	}
	affected, faulted := 0, 0
	ag.count(func(_ string, st volumeState) bool {
		if k := lostOn(st); k > 0 {
			affected++
			if wantPhase(k) == v1alpha1.VolumeFaulted {
				faulted++
			}
		}
		return false
	})
	progress("%d nodes stop renewing their Lease; %d volumes have replicas there", *lost, affected)
	stopped := time.Now()
	expiry := ag.lose(lostNodes)
	healthy := waitCount(t, ag, "health", *volumes, stopped, healthTimeout, func(_ string, st volumeState) bool {
		return st.phase == wantPhase(lostOn(st))
	})
	noticed := time.Since(stopped)
	rep.section("%d of %d nodes stop renewing their Lease (duration %.0f s) at once: %d volumes affected, %d of them Faulted (two replicas there)",
		*lost, *nodes, contract.DefaultLeaseDuration.Seconds(), affected, faulted)
	if healthy < *volumes {
		rep.row("volumes in their expected phase", fmt.Sprintf("%d of %d after %.0f s", healthy, *volumes, noticed.Seconds()), "all", false)
	} else {
		rep.row("every affected volume Degraded/Faulted after", fmt.Sprintf("%.1f s (%.1f s after the last Lease expired)", noticed.Seconds(), time.Since(expiry).Seconds()), "", true)
	}

	// 3. Idle, once the Events and reports of the lease loss are written.
	settle(t, api, apiMetrics)
	progress("idle for %s", *idle)
	apiBefore = mustScrape(t, api, apiMetrics)
	ctlBefore = mustScrape(t, http.DefaultClient, ctl.metrics)
	procBefore, rigBefore = ctl.stat(t), rigCPU()
	time.Sleep(*idle)
	procAfter, rigAfter = ctl.stat(t), rigCPU()
	ctlAfter = mustScrape(t, http.DefaultClient, ctl.metrics)
	apiAfter = mustScrape(t, api, apiMetrics)
	idleReqs := apiRequestsOf(apiAfter).since(apiRequestsOf(apiBefore))
	leaseReqs, volReqs = idleReqs.split()
	minutes := idle.Minutes()
	perVolMin := volReqs / float64(*volumes) / minutes
	idleRecon := sum(ctlAfter, "controller_runtime_reconcile_total", isQV) - sum(ctlBefore, "controller_runtime_reconcile_total", isQV)
	idleCPU := procAfter.cpu - procBefore.cpu
	rep.section("idle for %s", *idle)
	rep.row("API requests per volume per minute", fmt.Sprintf("%.4f", perVolMin), fmt.Sprintf("about 0 (< %g)", idleTarget), perVolMin < idleTarget)
	rep.row("Lease requests per minute", fmt.Sprintf("%.0f", leaseReqs/minutes), "", true)
	rep.row("reconciles per minute", fmt.Sprintf("%.0f", idleRecon/minutes), "", true)
	rep.row("controller CPU", fmt.Sprintf("%.2f cores", idleCPU.Seconds()/idle.Seconds()), "", true)
	rep.row("other CPU, cores", cores(rigBefore, rigAfter, *idle), "", true)
	rep.row("controller RSS (peak)", fmt.Sprintf("%.0f MiB (%.0f MiB)", mib(procAfter.rss), mib(procAfter.peakRSS)), fmt.Sprintf("< %d MiB", rssTarget>>20), procAfter.peakRSS < rssTarget)
	if len(idleReqs) > 0 {
		rep.detail("API requests while idle, by verb and resource:\n" + idleReqs.String())
	}
	applies, failed, lastErr := ag.stats()
	rep.detail(fmt.Sprintf("simulated agents: %d applies in all\n", applies))
	if failed > 0 {
		rep.detail(fmt.Sprintf("simulated agents: %d failed applies or renewals, the last: %v\n", failed, lastErr))
	}

	rep.line = fmt.Sprintf("scale: %d volumes Ready in %.1f s; reconcile p99 %.0f ms; controller RSS %.0f MiB; idle requests per volume per minute %.4f",
		ready, readyAfter.Seconds(), p99*1000, mib(procAfter.peakRSS), perVolMin)
	rep.write(t)
}

// controller is the controller binary, running.
type controller struct {
	pid     int
	metrics string // its /metrics URL
	log     string
}

// startController runs the controller binary against srv, with its
// defaults (leader election included), and waits until it leads.
func startController(t *testing.T, srv *kubetest.Server) *controller {
	t.Helper()
	dir := t.TempDir()
	metricsAddr, probeAddr := kubetest.FreeAddr(t, "127.0.0.1"), kubetest.FreeAddr(t, "127.0.0.1")
	ctl := &controller{metrics: "http://" + metricsAddr + "/metrics", log: filepath.Join(dir, "controller.log")}
	logFile, err := os.Create(ctl.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(*controllerBin, "--kubeconfig", srv.Kubeconfig, "--csi-endpoint", "unix://"+filepath.Join(dir, "csi.sock"),
		"--metrics-bind-address", metricsAddr, "--health-probe-bind-address", probeAddr)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Dies with this process even when the cleanups do not run.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ctl.pid = cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(ctl.log)
			if len(b) > 8192 {
				b = b[len(b)-8192:]
			}
			t.Logf("controller log (last lines):\n%s", b)
		}
	})
	c, err := client.New(srv.Config, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	qvtest.Poll(t, "the controller to lead", 2*time.Minute, func(ctx context.Context) bool {
		select {
		case err := <-exited:
			t.Fatalf("controller exited: %v", err)
		default:
		}
		l := &coordinationv1.Lease{}
		if err := c.Get(ctx, client.ObjectKey{Namespace: contract.DefaultNamespace, Name: "quorum-controller"}, l); err != nil || l.Spec.HolderIdentity == nil {
			return false
		}
		_, err := scrape(http.DefaultClient, ctl.metrics)
		return err == nil
	})
	return ctl
}

func (c *controller) stat(t *testing.T) procStat {
	t.Helper()
	st, err := procStatOf(c.pid)
	if err != nil {
		t.Fatalf("controller: %v", err)
	}
	return st
}

func mustScrape(t *testing.T, c *http.Client, url string) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := scrape(c, url)
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// settle waits until the API server took no request to QuorumVolumes or
// Events for 10 s (at most two minutes): the Events of a burst of
// changes are written after the status, at the recorder's pace.
func settle(t *testing.T, api *http.Client, url string) {
	t.Helper()
	volumeRequests := func() float64 {
		total := 0.0
		for k, v := range apiRequestsOf(mustScrape(t, api, url)) {
			if strings.HasSuffix(k, " events") || strings.Contains(k, " quorumvolumes") {
				total += v
			}
		}
		return total
	}
	last, quiet := volumeRequests(), 0
	for deadline := time.Now().Add(2 * time.Minute); quiet < 2 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Second)
		n := volumeRequests()
		if n == last {
			quiet++
		} else {
			last, quiet = n, 0
		}
	}
}

// waitCount waits until ok holds for want volumes, or timeout after
// since, logging progress every 10 s; it returns how many it holds for.
func waitCount(t *testing.T, ag *agents, what string, want int, since time.Time, timeout time.Duration, ok func(string, volumeState) bool) int {
	t.Helper()
	next := time.Now().Add(10 * time.Second)
	for {
		n := ag.count(ok)
		if n >= want {
			return n
		}
		if time.Since(since) > timeout {
			progress("%s: %d of %d after %.0f s; giving up", what, n, want, time.Since(since).Seconds())
			return n
		}
		if time.Now().After(next) {
			progress("%s: %d of %d after %.0f s", what, n, want, time.Since(since).Seconds())
			next = next.Add(10 * time.Second)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ms(seconds float64) string {
	if math.IsNaN(seconds) {
		return "-"
	}
	return fmt.Sprintf("%.0f ms", seconds*1000)
}

// progress logs to stderr, which bench/scale.sh passes on.
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// report is the benchmark's output: a header, sections of rows
// (measurement, value, target, met), details, and the summary line.
type report struct {
	b    strings.Builder
	line string
}

func (r *report) header(ctl *controller) {
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&r.b, "controller scale benchmark: %d QuorumVolumes of %d replicas, %d simulated nodes (Lease %.0f s, renewed every %.0f s)\n",
		*volumes, replicas, *nodes, contract.DefaultLeaseDuration.Seconds(), contract.DefaultRenewInterval.Seconds())
	fmt.Fprintf(&r.b, "etcd, kube-apiserver %s, the controller and the simulated agents on this machine: %d CPUs, load average %s\n",
		kubetest.K8sVersion, runtime.NumCPU(), strings.Join(strings.Fields(string(load))[:3], " "))
}

func (r *report) section(format string, args ...any) {
	fmt.Fprintf(&r.b, "\n%s\n", fmt.Sprintf(format, args...))
	fmt.Fprintf(&r.b, "  %-40s %-40s %-20s %s\n", "measurement", "value", "target", "meets")
}

func (r *report) row(what, value, target string, met bool) {
	meets := ""
	if target != "" {
		meets = "yes"
		if !met {
			meets = "NO"
		}
	}
	fmt.Fprintf(&r.b, "  %-40s %-40s %-20s %s\n", what, value, target, meets)
	progress("%s: %s", what, value)
}

func (r *report) detail(s string) { fmt.Fprintf(&r.b, "\n%s", s) }

func (r *report) write(t *testing.T) {
	t.Helper()
	s := r.b.String() + "\n" + r.line + "\n"
	if *out == "" {
		fmt.Print(s)
		return
	}
	if err := os.WriteFile(*out, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}
