package nbd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// TLS with mutual certificates. Certificate folders use the file names of
// QEMU's tls-creds-x509 (and so of nbdkit --tls-certificates and libnbd's
// tls-certificates): the same folder configures our server, qemu-nbd,
// qemu-io, nbdinfo and nbdcopy.
const (
	CAFile         = "ca-cert.pem"
	CAKeyFile      = "ca-key.pem"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
)

// ServerTLSConfig is a server configuration that presents certFile/keyFile
// and requires a client certificate signed by the CA in caFile.
func ServerTLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	pool, cert, err := loadTLSFiles(caFile, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12, // the protocol's minimum
	}, nil
}

// ClientTLSConfig is a client configuration that presents
// certFile/keyFile and trusts only servers with a certificate signed by
// the CA in caFile. serverName, if not empty, is the name to verify
// (default: the host dialled).
func ClientTLSConfig(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	pool, cert, err := loadTLSFiles(caFile, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// ServerTLSDir and ClientTLSDir load a certificate folder laid out as
// GenerateDevCA writes it (QEMU's file names).
func ServerTLSDir(dir string) (*tls.Config, error) {
	return ServerTLSConfig(filepath.Join(dir, CAFile), filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile))
}

func ClientTLSDir(dir, serverName string) (*tls.Config, error) {
	return ClientTLSConfig(filepath.Join(dir, CAFile), filepath.Join(dir, ClientCertFile), filepath.Join(dir, ClientKeyFile), serverName)
}

func loadTLSFiles(caFile, certFile, keyFile string) (*x509.CertPool, tls.Certificate, error) {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("TLS CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, tls.Certificate{}, fmt.Errorf("TLS CA %s: no PEM certificate in it", caFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("TLS certificate %s with key %s: %w", certFile, keyFile, err)
	}
	return pool, cert, nil
}

// GenerateDevCA writes a new CA and a server and client certificate
// signed by it into dir, under the names above, keys readable by the
// owner only. hosts are the server certificate's names (DNS names or IP
// addresses); "localhost" and 127.0.0.1 are always included. It refuses
// to overwrite any file. For development and tests: the CA's key sits
// next to the certificates and they expire after a year.
func GenerateDevCA(dir string, hosts []string) error {
	for _, f := range []string{CAFile, CAKeyFile, ServerCertFile, ServerKeyFile, ClientCertFile, ClientKeyFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("dev CA: %s already exists; refusing to overwrite it", filepath.Join(dir, f))
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("dev CA: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dev CA: %w", err)
	}
	ca, err := NewDevCA("quorum-csi dev CA")
	if err != nil {
		return err
	}
	srv, err := ca.Issue("quorum-csi server", append([]string{"localhost", "127.0.0.1", "::1"}, hosts...), true)
	if err != nil {
		return err
	}
	cli, err := ca.Issue("quorum-csi client", nil, false)
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{CAFile, ca.CertPEM, 0o644},
		{CAKeyFile, ca.KeyPEM, 0o600},
		{ServerCertFile, srv.CertPEM, 0o644},
		{ServerKeyFile, srv.KeyPEM, 0o600},
		{ClientCertFile, cli.CertPEM, 0o644},
		{ClientKeyFile, cli.KeyPEM, 0o600},
	}
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		fh, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, f.mode)
		if err != nil {
			return fmt.Errorf("dev CA: %w", err)
		}
		_, err = fh.Write(f.data)
		if cerr := fh.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("dev CA: write %s: %w", p, err)
		}
	}
	return nil
}

// DevCA is a certificate authority in memory.
type DevCA struct {
	CertPEM, KeyPEM []byte
	cert            *x509.Certificate
	key             *ecdsa.PrivateKey
}

// KeyPair is a certificate and its key, PEM encoded.
type KeyPair struct {
	CertPEM, KeyPEM []byte
}

// NewDevCA makes a self-signed CA.
func NewDevCA(name string) (*DevCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("dev CA: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"quorum-csi"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(1, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		// GnuTLS (QEMU, nbdkit, libnbd) checks these on a CA.
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("dev CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("dev CA: %w", err)
	}
	keyPEM, err := keyToPEM(key)
	if err != nil {
		return nil, err
	}
	return &DevCA{CertPEM: certToPEM(der), KeyPEM: keyPEM, cert: cert, key: key}, nil
}

// Issue signs a certificate for a server (with names, DNS or IP) or for
// a client.
func (ca *DevCA) Issue(commonName string, names []string, server bool) (KeyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return KeyPair{}, fmt.Errorf("dev CA: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: commonName, Organization: []string{"quorum-csi"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(1, 0, 0),
		BasicConstraintsValid: true,
		// QEMU refuses certificates whose critical key usage lacks
		// either of these, whatever the key type.
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, n := range names {
			if ip := net.ParseIP(n); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, n)
			}
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return KeyPair{}, fmt.Errorf("dev CA: issue %s: %w", commonName, err)
	}
	keyPEM, err := keyToPEM(key)
	if err != nil {
		return KeyPair{}, err
	}
	return KeyPair{CertPEM: certToPEM(der), KeyPEM: keyPEM}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func certToPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyToPEM(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("dev CA: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
