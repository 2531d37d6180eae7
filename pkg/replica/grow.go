package replica

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Grow extends the replica at path to size bytes (expansion): the image
// grows sparse, so the new range reads as zeroes, and the metadata
// records the new size. The replica must not be open elsewhere (ErrInUse).
// Growing to the current size does nothing; shrinking is refused.
//
// The journal's slots are sized for the volume (slotSize gives their size
// for a volume size, as the attach computes it), so they may move. The
// metadata is the commit point: it is replaced last, atomically, and until
// then the journal reads the same under the old slot size as under the
// new one, so a crash at any step leaves a replica that opens at its old
// size and can be grown again. Records keep their payload: a dirty map
// made for the old size loads into a larger one with the new regions
// clean, which they are (zeroes on every replica).
func Grow(path string, size int64, slotSize func(volumeSize int64) int64) error {
	if size <= 0 || size%SizeAlign != 0 {
		return fmt.Errorf("grow replica %s to %d bytes: must be a positive multiple of %d", path, size, SizeAlign)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("grow replica %s: %w", path, err)
	}
	defer f.Close()
	// The same lock as Open's, so a replica is never grown under an
	// attach or a server.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("grow replica %s: %w", path, ErrInUse)
		}
		return fmt.Errorf("grow replica %s: lock: %w", path, err)
	}
	m, err := ReadMeta(path)
	if err != nil {
		return err
	}
	switch {
	case size == m.Size:
		return nil
	case size < m.Size:
		return fmt.Errorf("grow replica %s: it has %d bytes, more than %d; replicas never shrink", path, m.Size, size)
	}
	if err := relayJournal(path, slotSize(m.Size), slotSize(size)); err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("grow replica %s to %d bytes: %w", path, size, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("grow replica %s: sync: %w", path, err)
	}
	m.Size = size
	return writeMeta(path, m)
}

// relayJournal makes the newest journal record readable with both slot
// sizes. A record in slot 0 already is (offset 0 either way). One in
// slot 1 is copied to slot 0 first, then to slot 1 of the new layout;
// the copy in slot 0 carries it under either slot size meanwhile, and the
// one at its new place keeps two valid slots once the next record
// overwrites slot 0.
func relayJournal(path string, oldSlot, newSlot int64) error {
	if oldSlot == newSlot {
		return nil
	}
	j, err := os.OpenFile(JournalPath(path), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil // no record yet
	}
	if err != nil {
		return fmt.Errorf("grow replica %s: journal: %w", path, err)
	}
	defer j.Close()
	e, ok, err := ReadJournalFrom(j, oldSlot)
	if err != nil {
		return fmt.Errorf("grow replica %s: read journal: %w", path, err)
	}
	if !ok || JournalSlot(e.Seq, oldSlot) == 0 {
		return nil
	}
	b, err := EncodeJournal(e, oldSlot)
	if err != nil {
		return fmt.Errorf("grow replica %s: %w", path, err)
	}
	for _, off := range []int64{0, JournalSlot(e.Seq, newSlot)} {
		if _, err := j.WriteAt(b, off); err != nil {
			return fmt.Errorf("grow replica %s: move journal record: %w", path, err)
		}
		if err := unix.Fdatasync(int(j.Fd())); err != nil {
			return fmt.Errorf("grow replica %s: sync journal: %w", path, err)
		}
	}
	return nil
}
