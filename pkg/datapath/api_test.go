package datapath

import (
	"net"
	"path/filepath"
	"testing"
)

// TestListenReplaces: a successor's Listen takes the socket path over,
// and the predecessor closing its listener afterwards leaves it working.
func TestListenReplaces(t *testing.T) {
	path := filepath.Join(t.TempDir(), "datapath.sock")
	old, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	successor, err := Listen(path)
	if err != nil {
		t.Fatalf("listen beside a running predecessor: %v", err)
	}
	defer successor.Close()
	old.Close()
	go func() {
		if c, err := successor.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("dial the successor after the predecessor closed: %v", err)
	}
	c.Close()
}
