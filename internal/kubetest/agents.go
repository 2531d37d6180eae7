package kubetest

import (
	"context"
	"testing"
	"time"

	"k8s.io/client-go/rest"

	"github.com/quorum-csi/quorum-csi/pkg/agent"
)

// agentStopTimeout bounds how long a stopping agent may take.
const agentStopTimeout = 60 * time.Second

// Agent is a node agent (agent.Run) running in the test process.
type Agent struct {
	// Config is what the agent runs with, defaults filled in.
	Config agent.Config

	t      testing.TB
	cancel context.CancelFunc
	done   chan error
}

// StartAgent runs a node agent with cfg against the API server at rc
// until Stop or the end of the test. Unset, the metrics endpoint is off
// ("0"), the Lease lasts 3 s renewed every 300 ms (so a stopped agent is
// noticed within seconds, and a busy machine does not miss renewals),
// shutdown may take 5 s and the agent logs to the test log.
func StartAgent(t testing.TB, rc *rest.Config, cfg agent.Config) *Agent {
	t.Helper()
	if cfg.MetricsAddress == "" {
		cfg.MetricsAddress = "0"
	}
	if cfg.LeaseDuration == 0 {
		cfg.LeaseDuration = 3 * time.Second
	}
	if cfg.RenewInterval == 0 {
		cfg.RenewInterval = 300 * time.Millisecond
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 5 * time.Second
	}
	if cfg.Logger.GetSink() == nil {
		cfg.Logger = Logger(t, "agent", cfg.Node)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{Config: cfg, t: t, cancel: cancel, done: make(chan error, 1)}
	go func() { a.done <- agent.Run(ctx, rc, cfg) }()
	t.Cleanup(a.Stop)
	return a
}

// Stop cancels the agent and waits until Run returned; an error from Run,
// or a Run that does not return within a minute, fails the test. Stopping
// a stopped agent does nothing.
func (a *Agent) Stop() {
	if a.cancel == nil {
		return
	}
	a.cancel()
	a.cancel = nil
	select {
	case err := <-a.done:
		if err != nil {
			a.t.Errorf("agent %s: %v", a.Config.Node, err)
		}
	case <-time.After(agentStopTimeout):
		a.t.Errorf("agent %s did not stop within %s", a.Config.Node, agentStopTimeout)
	}
}
