package nbd

import (
	"fmt"
	"maps"
	"net"
	"net/url"
	"slices"
	"strings"
)

// DefaultPort is NBD's IANA port.
const DefaultPort = "10809"

// IsURI reports whether s looks like an NBD URI rather than a file path.
func IsURI(s string) bool {
	for _, p := range []string{"nbd://", "nbds://", "nbd+unix://", "nbds+unix://"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// ParseURI turns an NBD URI, in the syntax QEMU and libnbd share, into a
// client Config:
//
//	nbd://HOST[:PORT]/EXPORT            TCP, port 10809 by default
//	nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR[&tls-hostname=NAME]
//	nbd+unix:///EXPORT?socket=PATH
//	nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR&tls-hostname=NAME
//
// EXPORT may carry an epoch, "vol@epoch=7" (see the package
// documentation); it is percent-decoded. nbds needs tls-certificates, a
// folder as GenerateDevCA writes it (ca-cert.pem, client-cert.pem,
// client-key.pem; libnbd's parameter and layout). tls-hostname is the
// name to verify in the server's certificate (default: HOST; required
// over a Unix socket). Any other parameter is an error, so that a typo
// never silently drops TLS or an epoch.
func ParseURI(s string) (Config, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Config{}, fmt.Errorf("NBD URI %q: %w", s, err)
	}
	var cfg Config
	var tlsOn bool
	switch u.Scheme {
	case "nbd":
		cfg.Network = "tcp"
	case "nbds":
		cfg.Network, tlsOn = "tcp", true
	case "nbd+unix":
		cfg.Network = "unix"
	case "nbds+unix":
		cfg.Network, tlsOn = "unix", true
	default:
		return Config{}, fmt.Errorf("NBD URI %q: scheme must be nbd, nbds, nbd+unix or nbds+unix", s)
	}
	if u.User != nil || u.Fragment != "" || u.Opaque != "" {
		return Config{}, fmt.Errorf("NBD URI %q: user, fragment or opaque part not supported", s)
	}
	export := strings.TrimPrefix(u.Path, "/")
	if cfg.Export, cfg.Epoch, err = SplitExportName(export); err != nil {
		return Config{}, fmt.Errorf("NBD URI %q: %w", s, err)
	}
	q := u.Query()
	take := func(k string) string {
		v := q.Get(k)
		delete(q, k)
		return v
	}
	socket, certs, hostname := take("socket"), take("tls-certificates"), take("tls-hostname")
	if len(q) > 0 {
		return Config{}, fmt.Errorf("NBD URI %q: unknown parameter %q", s, slices.Sorted(maps.Keys(q))[0])
	}
	if cfg.Network == "unix" {
		if u.Host != "" || socket == "" {
			return Config{}, fmt.Errorf("NBD URI %q: a Unix socket URI has no host and needs ?socket=PATH", s)
		}
		cfg.Addr = socket
	} else {
		if socket != "" || u.Hostname() == "" {
			return Config{}, fmt.Errorf("NBD URI %q: a TCP URI needs a host and takes no socket", s)
		}
		port := u.Port()
		if port == "" {
			port = DefaultPort
		}
		cfg.Addr = net.JoinHostPort(u.Hostname(), port)
	}
	if !tlsOn {
		if certs != "" || hostname != "" {
			return Config{}, fmt.Errorf("NBD URI %q: TLS parameters need the nbds scheme", s)
		}
		return cfg, nil
	}
	if certs == "" {
		return Config{}, fmt.Errorf("NBD URI %q: nbds needs ?tls-certificates=DIR", s)
	}
	if cfg.Network == "unix" && hostname == "" {
		return Config{}, fmt.Errorf("NBD URI %q: TLS over a Unix socket needs ?tls-hostname=NAME", s)
	}
	if cfg.TLS, err = ClientTLSDir(certs, hostname); err != nil {
		return Config{}, fmt.Errorf("NBD URI %q: %w", s, err)
	}
	return cfg, nil
}
