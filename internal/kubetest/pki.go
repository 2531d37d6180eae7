package kubetest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"

	"github.com/quorum-csi/quorum-csi/pkg/nbd"
)

// pki is what kube-apiserver needs to serve TLS and sign service-account
// tokens, and what a client needs to trust it and log in as an admin.
type pki struct {
	caPEM      []byte
	certFile   string // apiserver serving certificate, for 127.0.0.1
	keyFile    string
	caFile     string
	saKeyFile  string // service-account signing key (private)
	saPubFile  string
	tokenFile  string // --token-auth-file: the admin's bearer token
	adminToken string
}

// newPKI writes a fresh CA with a serving certificate signed by it (the
// development PKI of package nbd, DevCA), a service-account key pair and
// a static admin token into dir. Go's crypto instead of openssl keeps the
// helper free of tools and of their version differences.
func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("make pki folder: %w", err)
	}
	p := &pki{
		certFile:  filepath.Join(dir, "apiserver.crt"),
		keyFile:   filepath.Join(dir, "apiserver.key"),
		caFile:    filepath.Join(dir, "ca.crt"),
		saKeyFile: filepath.Join(dir, "sa.key"),
		saPubFile: filepath.Join(dir, "sa.pub"),
		tokenFile: filepath.Join(dir, "tokens.csv"),
	}
	ca, err := nbd.NewDevCA("quorum-csi kubetest CA")
	if err != nil {
		return nil, err
	}
	p.caPEM = ca.CertPEM
	serving, err := ca.Issue("kube-apiserver", []string{"127.0.0.1", "localhost"}, true)
	if err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate service-account key: %w", err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("encode service-account public key: %w", err)
	}
	saKeyDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return nil, fmt.Errorf("encode service-account key: %w", err)
	}
	tok := make([]byte, 16)
	if _, err := rand.Read(tok); err != nil {
		return nil, fmt.Errorf("make admin token: %w", err)
	}
	p.adminToken = hex.EncodeToString(tok)

	files := []struct {
		path string
		data []byte
	}{
		{p.caFile, p.caPEM},
		{p.certFile, serving.CertPEM},
		{p.keyFile, serving.KeyPEM},
		{p.saKeyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saKeyDER})},
		{p.saPubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub})},
		// token,user,uid,"group": system:masters passes every RBAC check.
		{p.tokenFile, []byte(p.adminToken + `,admin,admin,"system:masters"` + "\n")},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return nil, fmt.Errorf("write %s: %w", f.path, err)
		}
	}
	return p, nil
}
