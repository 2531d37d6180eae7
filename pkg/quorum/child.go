package quorum

import "context"

// Child is one replica as the engine sees it. Offsets and lengths are in
// bytes; implementations may require them to be multiples of a block size
// and must then reject other values with an error rather than touch bytes
// outside the range (the engine orders requests by range).
type Child interface {
	// ReadAt fills all of p from offset off, or returns an error.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes all of p at offset off, or returns an error.
	WriteAt(ctx context.Context, p []byte, off int64) error
	// Flush makes every write completed before the call durable.
	Flush(ctx context.Context) error
	// Discard deallocates the range. Afterwards it must read as zeroes,
	// because replicas must stay identical whatever they do with space.
	Discard(ctx context.Context, off, length int64) error
	// WriteZeroes makes the range read as zeroes, keeping it allocated.
	WriteZeroes(ctx context.Context, off, length int64) error
	// Size is the child's size in bytes; it does not change.
	Size() int64
}

// Member names a child for events and status.
type Member struct {
	Name  string
	Child Child
	// Dirty, when set, makes the child start faulty, missing these
	// regions (all of them for a replacement); it rejoins through resync.
	Dirty *Bitmap
}
