package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// exportFlag collects --export NAME=PATH pairs, in order.
type exportFlag struct {
	names, paths []string
}

func (f *exportFlag) String() string { return strings.Join(f.names, ",") }

func (f *exportFlag) Set(s string) error {
	name, path, ok := strings.Cut(s, "=")
	if !ok || name == "" || path == "" {
		return fmt.Errorf("want NAME=PATH, got %q", s)
	}
	if strings.Contains(name, "@epoch") {
		return fmt.Errorf("export name %q: \"@epoch=\" is reserved for the epoch a client presents", name)
	}
	if strings.HasSuffix(name, volume.SidecarSuffix) {
		return fmt.Errorf("export name %q: names ending in %q are the replicas' metadata exports", name, volume.SidecarSuffix)
	}
	for _, n := range f.names {
		if n == name {
			return fmt.Errorf("export name %q given twice", name)
		}
	}
	f.names, f.paths = append(f.names, name), append(f.paths, path)
	return nil
}

// listen opens "unix:PATH" or a TCP address.
func listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}

func runServe(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("serve", "--export NAME=PATH [--export ...] [flags]", stderr)
	exports := &exportFlag{}
	fs.Var(exports, "export", "serve the replica image at PATH as NAME (nbd://HOST:PORT/NAME), with its metadata as NAME/meta; repeatable")
	addr := fs.String("listen", ":"+nbd.DefaultPort, "address to listen on: HOST:PORT (port 0 picks one), or unix:PATH")
	tlsDir := fs.String("tls-dir", "", "folder with ca-cert.pem, server-cert.pem and server-key.pem (quorumctl gen-certs writes one): TLS is then required and clients need a certificate from that CA")
	plainRead := fs.Bool("allow-plain-read", false, "let clients that present no epoch (qemu-io, nbdinfo, ...) read the exports; they can never write")
	cpuProfile := fs.String("cpu-profile", "", "write a Go CPU profile of the run to this file (for performance work)")
	drain := fs.Duration("shutdown-timeout", 30*time.Second, "on SIGTERM, how long requests in flight may take to finish before connections are closed")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: unexpected arguments %q (replicas are given with --export NAME=PATH)", errUsage, pos)
	}
	if len(exports.names) == 0 {
		return fmt.Errorf("%w: no --export NAME=PATH given", errUsage)
	}
	log := slog.New(slog.NewJSONHandler(&syncWriter{w: stderr}, nil))
	stopProfile, err := profileCPU(*cpuProfile)
	if err != nil {
		return err
	}
	defer stopProfile()
	cfg := nbd.ServerConfig{Logger: log}
	if *tlsDir != "" {
		if cfg.TLS, err = nbd.ServerTLSDir(*tlsDir); err != nil {
			return err
		}
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	var closers []func() error
	defer func() {
		for _, c := range closers {
			if err := c(); err != nil {
				log.Error("release replica", "error", err)
			}
		}
	}()
	for i, name := range exports.names {
		r, err := replica.Open(exports.paths[i])
		if err != nil {
			return err
		}
		closers = append(closers, r.Close)
		xs, closeExtents, err := volume.ReplicaExports(r, name, *plainRead)
		if err != nil {
			return err
		}
		closers = append(closers, closeExtents)
		cfg.Exports = append(cfg.Exports, xs...)
	}
	srv, err := nbd.NewServer(cfg)
	if err != nil {
		return err
	}
	l, err := listen(*addr)
	if err != nil {
		srv.Close()
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	log.Info("serving", "address", l.Addr().String(), "exports", exports.names, "tls", cfg.TLS != nil, "allowPlainRead", *plainRead)
	if cfg.TLS == nil {
		log.Warn("serving without TLS: anyone who can reach the address and present a current epoch can write (give --tls-dir)")
	}
	fmt.Fprintln(stdout, l.Addr().String())

	select {
	case err := <-served:
		srv.Close()
		return fmt.Errorf("serve: %w", err)
	case sig := <-sigs:
		log.Info("shutting down: finishing requests in flight", "signal", sig.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	go func() {
		select {
		case <-sigs:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("closed connections with requests still in flight", "error", err)
	}
	if err := <-served; err != nil && !errors.Is(err, nbd.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	log.Info("stopped")
	return nil
}

func runGenCerts(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("gen-certs", "[--host NAME]... DIR", stderr)
	var hosts stringsFlag
	fs.Var(&hosts, "host", "a DNS name or IP address of the replica server, put in its certificate beside localhost and 127.0.0.1; repeatable")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: want exactly one folder", errUsage)
	}
	if err := nbd.GenerateDevCA(pos[0], hosts); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote a development CA and server and client certificates to %s (for development and tests: the CA key is beside them)\n", pos[0])
	return nil
}

// stringsFlag collects a repeatable string flag.
type stringsFlag []string

func (s *stringsFlag) String() string { return strings.Join(*s, ",") }
func (s *stringsFlag) Set(v string) error {
	*s = append(*s, v)
	return nil
}
