package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// JournalSuffix names the file beside an image that holds the volume's
// journal records (write intent and dirty maps) as this replica last saw
// them.
const JournalSuffix = ".qjournal"

// The journal file has two slots; records alternate between them, so a
// torn write leaves the other, older record readable. Each slot starts
// with a header: magic, sequence number, payload length, CRC-32C of the
// payload.
const (
	journalMagic  = "QJRNL001"
	journalHeader = 8 + 8 + 4 + 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// JournalPath names the journal file of the image at path.
func JournalPath(path string) string { return path + JournalSuffix }

// JournalEntry is a record as stored: an opaque payload and its sequence
// number.
type JournalEntry struct {
	Seq     uint64
	Payload []byte
}

// openJournal opens the journal file, making it when create is set; a
// missing file without create leaves r.journal nil (no record yet), so
// that a refused attach creates nothing.
func (r *File) openJournal(create bool) error {
	r.journalMu.Lock()
	defer r.journalMu.Unlock()
	if r.journal != nil {
		return nil
	}
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(JournalPath(r.path), flags, 0o600)
	if errors.Is(err, os.ErrNotExist) && !create {
		return nil
	}
	if err != nil {
		return fmt.Errorf("replica %s: journal: %w", r.path, err)
	}
	r.journal = f
	return nil
}

func (r *File) journalFile() *os.File {
	r.journalMu.Lock()
	defer r.journalMu.Unlock()
	return r.journal
}

// JournalSlot is where a record goes: records alternate between two
// slots of slotSize bytes, which the caller sizes for the largest record
// its volume can produce.
func JournalSlot(seq uint64, slotSize int64) int64 { return int64(seq%2) * slotSize }

// WriteJournal stores a record in the slot its sequence number selects
// and makes it durable.
func (r *File) WriteJournal(e JournalEntry, slotSize int64) error {
	buf, err := EncodeJournal(e, slotSize)
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.path, err)
	}
	if err := r.openJournal(true); err != nil {
		return err
	}
	if _, err := r.journal.WriteAt(buf, JournalSlot(e.Seq, slotSize)); err != nil {
		return fmt.Errorf("replica %s: write journal: %w", r.path, err)
	}
	if err := unix.Fdatasync(int(r.journal.Fd())); err != nil {
		return fmt.Errorf("replica %s: sync journal: %w", r.path, err)
	}
	return nil
}

// EncodeJournal is a record as it is stored at JournalSlot(e.Seq,
// slotSize): header and payload.
func EncodeJournal(e JournalEntry, slotSize int64) ([]byte, error) {
	if int64(journalHeader+len(e.Payload)) > slotSize {
		return nil, fmt.Errorf("journal record of %d bytes exceeds its slot of %d", len(e.Payload), slotSize)
	}
	buf := make([]byte, journalHeader+len(e.Payload))
	copy(buf, journalMagic)
	binary.LittleEndian.PutUint64(buf[8:], e.Seq)
	binary.LittleEndian.PutUint32(buf[16:], uint32(len(e.Payload)))
	binary.LittleEndian.PutUint32(buf[20:], crc32.Checksum(e.Payload, castagnoli))
	copy(buf[journalHeader:], e.Payload)
	return buf, nil
}

// JournalAt reads the journal file's bytes at off, as zeroes where the
// file (or the whole file) does not exist yet; for serving the journal
// to a remote attach.
func (r *File) JournalAt(p []byte, off int64) error {
	clear(p)
	j := r.journalFile()
	if j == nil {
		return nil
	}
	if _, err := j.ReadAt(p, off); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("replica %s: read journal: %w", r.path, err)
	}
	return nil
}

// WriteJournalAt writes bytes of the journal file at off, for a remote
// attach that encodes its records itself; SyncJournal makes them durable.
func (r *File) WriteJournalAt(p []byte, off int64) error {
	if err := r.openJournal(true); err != nil {
		return err
	}
	if _, err := r.journal.WriteAt(p, off); err != nil {
		return fmt.Errorf("replica %s: write journal: %w", r.path, err)
	}
	return nil
}

// SyncJournal makes the journal's writes durable.
func (r *File) SyncJournal() error {
	j := r.journalFile()
	if j == nil {
		return nil
	}
	if err := unix.Fdatasync(int(j.Fd())); err != nil {
		return fmt.Errorf("replica %s: sync journal: %w", r.path, err)
	}
	return nil
}

// ReadJournal returns the newest intact record, or ok false when there is
// none (a new replica).
func (r *File) ReadJournal(slotSize int64) (e JournalEntry, ok bool, err error) {
	j := r.journalFile()
	if j == nil {
		return e, false, nil
	}
	e, ok, err = ReadJournalFrom(j, slotSize)
	if err != nil {
		return e, false, fmt.Errorf("replica %s: read journal: %w", r.path, err)
	}
	return e, ok, nil
}

// ReadJournalFrom returns the newest intact record of a journal read
// through ra, or ok false when neither slot holds one.
func ReadJournalFrom(ra io.ReaderAt, slotSize int64) (e JournalEntry, ok bool, err error) {
	for slot := range int64(2) {
		got, valid, err := readSlot(ra, slot*slotSize, slotSize)
		if err != nil {
			return e, false, err
		}
		if valid && (!ok || got.Seq > e.Seq) {
			e, ok = got, true
		}
	}
	return e, ok, nil
}

func readSlot(f io.ReaderAt, off, slotSize int64) (JournalEntry, bool, error) {
	var e JournalEntry
	hdr := make([]byte, journalHeader)
	if _, err := f.ReadAt(hdr, off); err != nil {
		if errors.Is(err, io.EOF) {
			return e, false, nil
		}
		return e, false, err
	}
	if string(hdr[:8]) != journalMagic {
		return e, false, nil
	}
	n := int64(binary.LittleEndian.Uint32(hdr[16:]))
	if journalHeader+n > slotSize {
		return e, false, nil
	}
	payload := make([]byte, n)
	if _, err := f.ReadAt(payload, off+journalHeader); err != nil {
		if errors.Is(err, io.EOF) {
			return e, false, nil // torn: the file ends inside the record
		}
		return e, false, err
	}
	if crc32.Checksum(payload, castagnoli) != binary.LittleEndian.Uint32(hdr[20:]) {
		return e, false, nil
	}
	return JournalEntry{Seq: binary.LittleEndian.Uint64(hdr[8:]), Payload: payload}, true, nil
}
