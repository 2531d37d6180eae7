package nbd

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// FileBackend is a Backend kept in a regular file (a replica image) that
// also answers block status from the file's allocation, as the
// filesystem reports it through SEEK_DATA and SEEK_HOLE. It reads the map
// through a descriptor of its own, so it needs no cooperation from the
// backend (replica.File keeps its descriptor private and locked).
type FileBackend struct {
	Backend
	f     *os.File
	block int64
}

// WithFileExtents wraps b, whose bytes live in the file at path, with an
// ExtentLister. Close the result to release its descriptor.
func WithFileExtents(b Backend, path string) (*FileBackend, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("nbd: allocation map of %s: %w", path, err)
	}
	block := int64(1)
	if bs, ok := b.(BlockSizer); ok {
		block = bs.BlockSize()
	}
	return &FileBackend{Backend: b, f: f, block: block}, nil
}

// BlockSize forwards the wrapped backend's block size.
func (fb *FileBackend) BlockSize() int64 { return fb.block }

// Close releases the map's descriptor (not the backend).
func (fb *FileBackend) Close() error { return fb.f.Close() }

// Extents implements ExtentLister. Holes are reported as hole and zero,
// data as 0. Extent edges are rounded to the block size (a partial block
// counts as data), so every extent is a whole number of blocks.
func (fb *FileBackend) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	fd := int(fb.f.Fd())
	end := off + length
	var out []Extent
	add := func(n int64, flags uint32) {
		for n > 0 {
			// Descriptor lengths are 32-bit.
			m := min(n, int64(^uint32(0))/fb.block*fb.block)
			if k := len(out); k > 0 && out[k-1].Flags == flags && int64(out[k-1].Length)+m <= int64(^uint32(0)) {
				out[k-1].Length += uint32(m)
			} else {
				out = append(out, Extent{Length: uint32(m), Flags: flags})
			}
			n -= m
		}
	}
	for pos := off; pos < end; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = end // no data after pos
		} else if err != nil {
			return nil, fmt.Errorf("nbd: SEEK_DATA at %d: %w", pos, err)
		}
		// A hole counts only in whole blocks; its partial last block is data.
		holeEnd := min(data, end) / fb.block * fb.block
		if holeEnd > pos {
			add(holeEnd-pos, StateHole|StateZero)
			pos = holeEnd
		}
		if pos >= end {
			break
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("nbd: SEEK_HOLE at %d: %w", pos, err)
		}
		dataEnd := min((hole+fb.block-1)/fb.block*fb.block, end)
		if dataEnd <= pos {
			dataEnd = min(pos+fb.block, end)
		}
		add(dataEnd-pos, 0)
		pos = dataEnd
	}
	return out, nil
}
