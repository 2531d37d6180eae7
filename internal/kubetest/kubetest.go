// Package kubetest is the rig of the tests against real Kubernetes
// components (rig.go: a controller manager, loggers, free addresses, the
// TestMain). It starts a real etcd and kube-apiserver for a test, built
// by hack/k8s-bins.sh, so that API objects are validated, defaulted and
// stored by the real thing rather than a fake client. Each test gets its
// own pair on free loopback ports under t.TempDir(), and both processes are
// gone when the test ends, whether it passed, failed or was killed (they
// die with the test binary).
package kubetest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// K8sVersion is the Kubernetes release hack/k8s-bins.sh builds.
const K8sVersion = "v1.37.2"

// readyTimeout bounds the wait for /readyz. The API server is ready in
// about 3 s on an idle 2-core machine; the rest is for a machine busy with
// other tests.
const readyTimeout = 90 * time.Second

// BinDir is where the binaries are looked for: $QUORUM_K8S_BIN, else the
// default output folder of hack/k8s-bins.sh.
func BinDir() string {
	if d := os.Getenv("QUORUM_K8S_BIN"); d != "" {
		return d
	}
	return "/var/cache/quorum-csi/k8s/" + K8sVersion + "/bin"
}

// Server is a running etcd + kube-apiserver pair.
type Server struct {
	// Config reaches the API server as a member of system:masters.
	Config *rest.Config
	// Kubeconfig is a kubeconfig file with the same credentials, for
	// kubectl and other programs.
	Kubeconfig string

	dir   string
	procs []*process
}

// Start starts etcd and kube-apiserver, waits until the API server is
// ready, and stops both when t ends. Without the binaries the test is
// skipped, or fails under QUORUM_CI=1.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := BinDir()
	for _, name := range []string{"etcd", "kube-apiserver"} {
		requireBinary(t, bin, name)
	}
	s := &Server{dir: t.TempDir()}
	// Registered before anything is started, so a failing start still
	// stops what it had started.
	t.Cleanup(func() { s.stop(t) })
	if err := s.start(bin); err != nil {
		t.Fatalf("start etcd and kube-apiserver: %v", err)
	}
	return s
}

// Kubectl runs the built kubectl against the server and returns its
// standard output; an error carries kubectl's stderr, which is what a user
// would read. Without kubectl the test is skipped (failed under CI).
func (s *Server) Kubectl(t testing.TB, args ...string) (string, error) {
	t.Helper()
	bin := BinDir()
	requireBinary(t, bin, "kubectl")
	cmd := exec.CommandContext(t.Context(), filepath.Join(bin, "kubectl"), append([]string{"--kubeconfig", s.Kubeconfig}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

func requireBinary(t testing.TB, dir, name string) {
	t.Helper()
	if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Mode()&0o111 == 0 {
		testutil.Unavailable(t, fmt.Sprintf("needs %s in %s: build it with hack/k8s-bins.sh (or point QUORUM_K8S_BIN at it)", name, dir))
	}
}

func (s *Server) start(bin string) error {
	p, err := newPKI(filepath.Join(s.dir, "pki"))
	if err != nil {
		return err
	}
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	etcdPeer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	etcd, err := s.spawn(bin, "etcd",
		"--name=kubetest",
		"--data-dir="+filepath.Join(s.dir, "etcd"),
		"--listen-client-urls="+etcdClient, "--advertise-client-urls="+etcdClient,
		"--listen-peer-urls="+etcdPeer, "--initial-advertise-peer-urls="+etcdPeer,
		"--initial-cluster=kubetest="+etcdPeer,
		// The data dies with the test; fsync would only slow it down.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	apiserver, err := s.spawn(bin, "kube-apiserver",
		"--etcd-servers="+etcdClient,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[2]),
		"--tls-cert-file="+p.certFile, "--tls-private-key-file="+p.keyFile,
		"--client-ca-file="+p.caFile, "--token-auth-file="+p.tokenFile,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+p.saPubFile, "--service-account-signing-key-file="+p.saKeyFile,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=RBAC",
		// Without it the API server refuses to advertise 127.0.0.1 as the
		// kubernetes service endpoint.
		"--endpoint-reconciler-type=none",
		// A CSI node plugin is privileged: the chart test applies one.
		"--allow-privileged=true",
		"--cert-dir="+filepath.Join(s.dir, "apiserver-certs"),
	)
	if err != nil {
		return err
	}
	host := "https://127.0.0.1:" + strconv.Itoa(ports[2])
	s.Config = &rest.Config{
		Host:            host,
		BearerToken:     p.adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: p.caPEM},
		QPS:             100,
		Burst:           200,
	}
	if s.Kubeconfig, err = writeKubeconfig(filepath.Join(s.dir, "kubeconfig"), host, p); err != nil {
		return err
	}
	return waitReady(host, p, etcd, apiserver)
}

// waitReady polls /readyz until it answers 200, and gives up early with
// the process's log when etcd or the API server exits.
func waitReady(host string, p *pki, procs ...*process) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.caPEM)
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(readyTimeout)
	var last string
	for time.Now().Before(deadline) {
		for _, pr := range procs {
			select {
			case <-pr.done:
				return fmt.Errorf("%s exited (%v) before the API server was ready:\n%s", pr.name, pr.err, pr.logTail())
			default:
			}
		}
		req, err := http.NewRequest(http.MethodGet, host+"/readyz", nil)
		if err != nil {
			return fmt.Errorf("make readyz request: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+p.adminToken)
		if resp, err := client.Do(req); err != nil {
			last = err.Error()
		} else {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("API server not ready after %v (last answer: %s):\n%s", readyTimeout, last, procs[len(procs)-1].logTail())
}

func writeKubeconfig(path, host string, p *pki) (string, error) {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubetest"] = &clientcmdapi.Cluster{Server: host, CertificateAuthorityData: p.caPEM}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: p.adminToken}
	cfg.Contexts["kubetest"] = &clientcmdapi.Context{Cluster: "kubetest", AuthInfo: "admin"}
	cfg.CurrentContext = "kubetest"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", fmt.Errorf("write kubeconfig: %w", err)
	}
	return path, nil
}

// freePorts returns n distinct loopback ports that were free a moment ago.
// All listeners stay open until every port is chosen, so the kernel cannot
// hand out one port twice.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// stop ends every process, newest first (the API server before its etcd),
// and on failure logs the tail of each one's output.
func (s *Server) stop(t testing.TB) {
	for i := len(s.procs) - 1; i >= 0; i-- {
		pr := s.procs[i]
		if err := pr.stop(); err != nil {
			t.Errorf("stop %s: %v", pr.name, err)
		}
		if t.Failed() {
			t.Logf("%s log (last lines):\n%s", pr.name, pr.logTail())
		}
	}
}

// process is one child, with its combined output in a file.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has exited
	err     error         // its exit status, valid after done
}

func (s *Server) spawn(bin, name string, args ...string) (*process, error) {
	logPath := filepath.Join(s.dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	defer logFile.Close()
	cmd := exec.Command(filepath.Join(bin, name), args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own group, so stop can signal everything it might fork;
		// and killed with the test binary, whose cleanups do not run when
		// it is killed or panics on -timeout.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	pr := &process{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		pr.err = cmd.Wait()
		close(pr.done)
	}()
	s.procs = append(s.procs, pr)
	return pr, nil
}

// stop asks the process to terminate and kills its group when it has not
// exited after a grace period.
func (p *process) stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	pgid := p.cmd.Process.Pid
	if err := syscall.Kill(-pgid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("terminate: %w", err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(15 * time.Second):
	}
	if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill: %w", err)
	}
	select {
	case <-p.done:
		return fmt.Errorf("did not exit within 15 s of SIGTERM; killed")
	case <-time.After(15 * time.Second):
		return fmt.Errorf("still running 15 s after SIGKILL")
	}
}

// logTail is the end of the process's output, where the reason it failed
// usually is.
func (p *process) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	const max = 4096
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}
