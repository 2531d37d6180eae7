package csi

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The filesystem tools of the Node service: making, checking, growing
// and mounting what sits on a staged device.

// growOffline grows an ext2/3/4 filesystem that is smaller than its
// device, which it is after the volume was expanded while unstaged,
// before it is mounted. Offline, resize2fs writes the device itself;
// online it needs the kernel's resize ioctl and with it CAP_SYS_RESOURCE,
// which a node plugin's container may lack. XFS grows only when mounted,
// in NodeExpandVolume.
func (s *Node) growOffline(dev string) error {
	if ext, smaller, err := s.extFilesystem(dev); err != nil || !ext || !smaller {
		return err
	}
	// resize2fs wants a freshly checked filesystem; e2fsck -p exits 1
	// when it corrected something, which is no reason to stop.
	if out, err := exec.Command("e2fsck", "-f", "-p", dev).CombinedOutput(); err != nil {
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() > 1 {
			return fmt.Errorf("check the filesystem on %s before growing it: %w: %s", dev, err, out)
		}
	}
	if out, err := exec.Command("resize2fs", dev).CombinedOutput(); err != nil {
		return fmt.Errorf("grow the filesystem on %s: %w: %s", dev, err, out)
	}
	return nil
}

// extFilesystem reports whether dev holds an ext2/3/4 filesystem and,
// if so, whether that leaves at least one of its blocks of the device
// unused.
func (s *Node) extFilesystem(dev string) (ext, smaller bool, err error) {
	format, err := s.mounter.GetDiskFormat(dev)
	if err != nil {
		return false, false, fmt.Errorf("filesystem on %s: %w", dev, err)
	}
	if format != "ext2" && format != "ext3" && format != "ext4" {
		return false, false, nil
	}
	smaller, err = extSmallerThanDevice(dev)
	return true, smaller, err
}

// extSmallerThanDevice compares the block count and size dumpe2fs reads
// from the superblock with the device size.
func extSmallerThanDevice(dev string) (bool, error) {
	out, err := exec.Command("dumpe2fs", "-h", dev).Output()
	if err != nil {
		return false, fmt.Errorf("dumpe2fs -h %s: %w", dev, err)
	}
	var blocks, blockSize int64
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch k {
		case "Block count":
			blocks, err = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		case "Block size":
			blockSize, err = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
		if err != nil {
			return false, fmt.Errorf("dumpe2fs -h %s: %s: %w", dev, k, err)
		}
	}
	if blocks == 0 || blockSize == 0 {
		return false, fmt.Errorf("dumpe2fs -h %s: no block count or size in %q", dev, out)
	}
	size, err := deviceSize(dev)
	if err != nil {
		return false, err
	}
	return size >= (blocks+1)*blockSize, nil
}

// unmount unmounts path if something is mounted there, then removes
// made: what publish or stage made at path (the target itself, or the
// device record in the staging folder). The staging folder stays: the
// CO made it and removes it.
func (s *Node) unmount(path, made string) error {
	mounted, err := s.mounter.IsMountPoint(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("check mount %s: %w", path, err)
	case mounted:
		if err := s.mounter.Unmount(path); err != nil {
			return fmt.Errorf("unmount %s: %w", path, err)
		}
	}
	if err := os.Remove(made); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// makeFile creates the target of a Block bind mount, a regular file,
// with its folder.
func makeFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return err
	}
	return f.Close()
}

// deviceSize is the size of the block device at path (a bind mount of
// one counts).
func deviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	size, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("BLKGETSIZE64: %w", err)
	}
	return int64(size), nil
}
