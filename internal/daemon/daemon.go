// Package daemon holds what the node's two daemons, cmd/node and
// cmd/datapath, do alike before they serve: a command line of flags
// only, whose mistakes exit 2, a JSON log, and the API server's
// configuration.
package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
)

// ParseFlags parses args into fs. A daemon takes its whole configuration
// from flags, so a positional argument is a mistake (a flag's value
// split off by a stray space, most likely).
func ParseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	return nil
}

// Start takes the error of parsing the command line. When there is none
// it returns the daemon's JSON logger on stderr, which controller-runtime
// logs with too, and ok. Otherwise the daemon stops with exit: 0 after
// -h, or 2 after a mistake, which is said on stderr after name.
func Start(name string, parseErr error, stderr io.Writer) (log logr.Logger, exit int, ok bool) {
	if errors.Is(parseErr, flag.ErrHelp) {
		return log, 0, false
	}
	if parseErr != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, parseErr)
		return log, 2, false
	}
	log = logr.FromSlogHandler(slog.NewJSONHandler(stderr, nil))
	ctrl.SetLogger(log)
	return log, 0, true
}

// RESTConfig reads kubeconfig, or when it is empty finds the
// configuration as controller-runtime does (in-cluster, or $KUBECONFIG).
func RESTConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	return ctrl.GetConfig()
}
