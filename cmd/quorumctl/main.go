// Command quorumctl runs the quorum engine on one machine: it creates
// replica images, assembles them into a block device and checks them.
package main

import (
	"os"

	"github.com/quorum-csi/quorum-csi/pkg/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
