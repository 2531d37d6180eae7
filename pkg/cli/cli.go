// Package cli implements quorumctl's subcommands: the quorum engine on one
// machine, without Kubernetes.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"
)

// exitError carries a specific exit status out of a subcommand.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }

// errUsage marks a command-line mistake; it exits 2.
var errUsage = errors.New("usage")

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"create", "make new replica images and their metadata", runCreate},
		{"attach", "assemble replicas into a block device, in the foreground", runAttach},
		{"serve", "serve replica images to attaches on other machines (NBD), in the foreground", runServe},
		{"gen-certs", "write a development CA and TLS certificates for serve and attach", runGenCerts},
		{"check", "compare replicas offline; exit 1 when they differ", runCheck},
		{"scrub", "vote across replicas offline and repair minorities", runScrub},
		{"status", "show the replicas of an attached volume: state, dirty bytes, resync progress", runStatus},
		{"bench", "drive the engine in-process like qemu-img bench", runBench},
		{"fuse-holder", "keep fuse-loop devices' FUSE connections while no attach serves them, in the foreground", runFUSEHolder},
	}
}

// Main runs quorumctl with args (without the program name) and returns the
// exit status.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(args[1:], stdout, stderr)
		var ee *exitError
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.As(err, &ee):
			if ee.err != nil {
				fmt.Fprintf(stderr, "quorumctl %s: %v\n", c.name, ee.err)
			}
			return ee.code
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "quorumctl %s: %v\n", c.name, err)
			return 2
		}
		fmt.Fprintf(stderr, "quorumctl %s: %v\n", c.name, err)
		return 1
	}
	fmt.Fprintf(stderr, "quorumctl: unknown command %q (see quorumctl help)\n", args[0])
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: quorumctl COMMAND [flags] ...")
	fmt.Fprintln(w, "\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-11s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nquorumctl COMMAND -h shows a command's flags.")
}

func newFlagSet(name, args string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: quorumctl %s %s\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

// parse parses flags (anywhere among the arguments) and returns the
// positional arguments.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// parseSize reads sizes such as 4096, 512K, 10M, 1G, 2GiB (binary units,
// as qemu-img).
func parseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want a positive number of bytes, optionally with K, M, G or T", s)
	}
	return n * mult, nil
}

// sizeFlag is a flag.Value for sizes; zero is accepted only where it
// means "off".
type sizeFlag struct {
	n         int64
	allowZero bool
}

func (f *sizeFlag) String() string { return strconv.FormatInt(f.n, 10) }
func (f *sizeFlag) Set(s string) error {
	if f.allowZero && strings.TrimSpace(s) == "0" {
		f.n = 0
		return nil
	}
	n, err := parseSize(s)
	f.n = n
	return err
}

// positiveDuration defines a duration flag that must be more than zero
// when given: zero would be a ticker that panics or a timeout that
// fails every request, never what was meant.
func positiveDuration(fs *flag.FlagSet, name string, value time.Duration, usage string) *time.Duration {
	d := value
	fs.Func(name, fmt.Sprintf("%s (default %s)", usage, value), func(s string) error {
		v, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		if v <= 0 {
			return errors.New("must be more than 0")
		}
		d = v
		return nil
	})
	return &d
}

// positiveUint defines a whole-number flag that stays 0 (unset, which
// usage must say what it means) unless given, and must be at least 1
// when given: a 0 that silently meant the default would hide a mistake.
func positiveUint(fs *flag.FlagSet, name, usage string) *uint64 {
	var n uint64
	fs.Func(name, usage, func(s string) error {
		if strings.HasPrefix(s, "-") {
			return errors.New("must be at least 1")
		}
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return errors.New("not a whole number")
		}
		if v == 0 {
			return errors.New("must be at least 1 (leave the flag out for the default)")
		}
		n = v
		return nil
	})
	return &n
}

func needArgs(pos []string, what string) error {
	if len(pos) == 0 {
		return fmt.Errorf("%w: no %s given", errUsage, what)
	}
	return nil
}

// profileCPU starts a CPU profile into path when it is set; the returned
// function stops it.
func profileCPU(path string) (stop func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

// stateDir is where attach keeps its FUSE mount points.
func defaultStateDir() string {
	if d := os.Getenv("QUORUM_STATE_DIR"); d != "" {
		return d
	}
	return "/run/quorum-csi"
}
