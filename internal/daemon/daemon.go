// Package daemon holds what the node's two daemons, cmd/node and
// cmd/datapath, do alike before they serve: a command line of flags
// only, the node's name and kubeconfig among them, whose mistakes exit 2,
// a JSON log, and the API server's configuration.
package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
)

// NewFlagSet returns the command line of the daemon name, which says its
// mistakes on stderr, with the flags both daemons take: --node-name
// (default $NODE_NAME) into node, and --kubeconfig into kubeconfig.
func NewFlagSet(name string, stderr io.Writer, node, kubeconfig *string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(node, nodeNameFlag, os.Getenv("NODE_NAME"), "this node's name, as its Node object (default $NODE_NAME, set from the downward API)")
	fs.StringVar(kubeconfig, "kubeconfig", "", "kubeconfig file; default: in-cluster config, or $KUBECONFIG")
	return fs
}

const nodeNameFlag = "node-name"

// ParseFlags parses args into fs, made by NewFlagSet. A daemon takes its
// whole configuration from flags, so a positional argument is a mistake
// (a flag's value split off by a stray space, most likely). Without a
// node name a daemon cannot tell which replicas and volumes are its own.
func ParseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if f := fs.Lookup(nodeNameFlag); f == nil || f.Value.String() == "" {
		return errors.New("no node name: give --node-name or set NODE_NAME")
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
