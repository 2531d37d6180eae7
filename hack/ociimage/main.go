// Command ociimage writes a container image as a docker-archive tarball
// (what `ctr images import` and `docker load` read) from layer tarballs,
// without a container engine: hack/images.sh builds the project's images
// with it on machines that have none.
//
//	ociimage --tag quorum-csi/node:dev --entrypoint /usr/local/bin/quorum-node --out node.tar base.tar bin.tar
package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	tag := fs.String("tag", "", "image name and tag, e.g. quorum-csi/node:dev")
	entrypoint := fs.String("entrypoint", "", "the image's entrypoint")
	out := fs.String("out", "", "docker-archive tarball to write")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *tag == "" || *out == "" || fs.NArg() == 0 {
		return fmt.Errorf("usage: ociimage --tag NAME:TAG [--entrypoint PATH] --out FILE LAYER.tar...")
	}
	ref, err := name.NewTag(*tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", *tag, err)
	}
	var layers []v1.Layer
	for _, p := range fs.Args() {
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return os.Open(p) })
		if err != nil {
			return fmt.Errorf("layer %s: %w", p, err)
		}
		layers = append(layers, l)
	}
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if *entrypoint != "" {
		cfg.Config.Entrypoint = []string{*entrypoint}
	}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return err
	}
	if err := tarball.WriteToFile(*out, ref, img); err != nil {
		return fmt.Errorf("write %s: %w", *out, err)
	}
	return nil
}
