package scale

import (
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape reads a Prometheus text endpoint.
func scrape(c *http.Client, url string) (map[string]*dto.MetricFamily, error) {
	resp, err := c.Get(url)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	return mfs, nil
}

func labels(m *dto.Metric) map[string]string {
	l := map[string]string{}
	for _, p := range m.GetLabel() {
		l[p.GetName()] = p.GetValue()
	}
	return l
}

// sum adds up the samples of counter or gauge name whose labels pass ok.
func sum(mfs map[string]*dto.MetricFamily, name string, ok func(map[string]string) bool) float64 {
	total := 0.0
	for _, m := range mfs[name].GetMetric() {
		if ok(labels(m)) {
			total += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return total
}

// histogram is a classic Prometheus histogram: cumulative counts per
// upper bound.
type histogram struct {
	bounds []float64
	counts []float64
	count  float64
}

// histogramOf merges the samples of histogram name whose labels pass ok.
func histogramOf(mfs map[string]*dto.MetricFamily, name string, ok func(map[string]string) bool) histogram {
	byBound := map[float64]float64{}
	var h histogram
	for _, m := range mfs[name].GetMetric() {
		if !ok(labels(m)) {
			continue
		}
		h.count += float64(m.GetHistogram().GetSampleCount())
		for _, b := range m.GetHistogram().GetBucket() {
			byBound[b.GetUpperBound()] += float64(b.GetCumulativeCount())
		}
	}
	for b := range byBound {
		h.bounds = append(h.bounds, b)
	}
	sort.Float64s(h.bounds)
	for _, b := range h.bounds {
		h.counts = append(h.counts, byBound[b])
	}
	return h
}

// minus is h with the observations of an earlier scrape taken away.
func (h histogram) minus(earlier histogram) histogram {
	d := histogram{bounds: h.bounds, count: h.count - earlier.count}
	for i, b := range h.bounds {
		c := h.counts[i]
		for j, eb := range earlier.bounds {
			if eb == b {
				c -= earlier.counts[j]
			}
		}
		d.counts = append(d.counts, c)
	}
	return d
}

// quantile estimates the q-quantile as PromQL's histogram_quantile does:
// linear within the bucket it falls in; NaN without observations, the
// highest finite bound when it falls in the +Inf bucket.
func (h histogram) quantile(q float64) float64 {
	if h.count == 0 {
		return math.NaN()
	}
	rank := q * h.count
	lower, below := 0.0, 0.0
	for i, b := range h.bounds {
		if h.counts[i] >= rank {
			if math.IsInf(b, 1) {
				return lower
			}
			return lower + (b-lower)*(rank-below)/(h.counts[i]-below)
		}
		lower, below = b, h.counts[i]
	}
	return lower
}

// apiRequests are the API server's requests to resources, by "verb
// resource[/subresource]", from apiserver_request_total.
type apiRequests map[string]float64

func apiRequestsOf(mfs map[string]*dto.MetricFamily) apiRequests {
	r := apiRequests{}
	for _, m := range mfs["apiserver_request_total"].GetMetric() {
		l := labels(m)
		if l["resource"] == "" {
			continue // /metrics, /readyz, discovery
		}
		key := l["verb"] + " " + l["resource"]
		if l["subresource"] != "" {
			key += "/" + l["subresource"]
		}
		r[key] += m.GetCounter().GetValue()
	}
	return r
}

// since is the requests made after earlier.
func (r apiRequests) since(earlier apiRequests) apiRequests {
	d := apiRequests{}
	for k, v := range r {
		if v -= earlier[k]; v > 0 {
			d[k] = v
		}
	}
	return d
}

// split is the total of requests to Leases (the agents' renewals and the
// controller's leader election, which do not grow with volumes) and of
// all others.
func (r apiRequests) split() (leases, others float64) {
	for k, v := range r {
		if strings.HasSuffix(k, " leases") {
			leases += v
		} else {
			others += v
		}
	}
	return leases, others
}

// String lists the requests, most first.
func (r apiRequests) String() string {
	keys := make([]string, 0, len(r))
	for k := range r {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return r[keys[i]] > r[keys[j]] || r[keys[i]] == r[keys[j]] && keys[i] < keys[j] })
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "    %-40s %8.0f\n", k, r[k])
	}
	return b.String()
}

// clockTick is the unit of /proc/PID/stat's CPU times (USER_HZ, 100 on
// every Linux architecture Go supports).
const clockTick = 10 * time.Millisecond

// procStat is a process's memory and CPU use so far.
type procStat struct {
	rss, peakRSS uint64 // bytes: VmRSS, VmHWM
	cpu          time.Duration
}

func procStatOf(pid int) (procStat, error) {
	var st procStat
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return st, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			st.rss = kb << 10
		case "VmHWM:":
			st.peakRSS = kb << 10
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return st, err
	}
	// Fields after the command, which may hold spaces, in parentheses:
	// utime and stime are the 14th and 15th of the line.
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if len(f) < 13 {
		return st, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, _ := strconv.ParseUint(f[11], 10, 64)
	stime, _ := strconv.ParseUint(f[12], 10, 64)
	st.cpu = time.Duration(utime+stime) * clockTick
	return st, nil
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// rigCPU is the CPU time so far of the rest of the rig, by name: the API
// server and etcd (children of this process, started by kubetest) and
// this process, the simulated agents.
func rigCPU() map[string]time.Duration {
	cpu := map[string]time.Duration{}
	if st, err := procStatOf(os.Getpid()); err == nil {
		cpu["agents"] = st.cpu
	}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(d + "/stat")
		if err != nil {
			continue
		}
		open, end := strings.IndexByte(string(b), '('), strings.LastIndexByte(string(b), ')')
		if open < 0 || end < open {
			continue
		}
		comm, f := string(b[open+1:end]), strings.Fields(string(b[end+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(os.Getpid()) || (comm != "kube-apiserver" && comm != "etcd") {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(d))
		if st, err := procStatOf(pid); err == nil {
			cpu[comm] += st.cpu
		}
	}
	return cpu
}

// cores is the CPU each part of the rig used between two rigCPU, as
// cores over d.
func cores(before, after map[string]time.Duration, d time.Duration) string {
	var parts []string
	for _, name := range []string{"kube-apiserver", "etcd", "agents"} {
		parts = append(parts, fmt.Sprintf("%s %.2f", name, (after[name]-before[name]).Seconds()/d.Seconds()))
	}
	return strings.Join(parts, ", ")
}
