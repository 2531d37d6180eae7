package volume

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// maxStaleReplicas bounds how many out-of-sync replicas a record can
// carry; it sizes the journal slots.
const maxStaleReplicas = 16

// record is a quorum.Record with children named by replica id, as
// stored in every in-sync replica's journal.
type record struct {
	regionSize, extentSize int64
	active                 []int64
	dirty                  map[string][]uint64 // replica id -> bitmap words
}

func encodeRecord(r record) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 1)
	b = binary.LittleEndian.AppendUint64(b, uint64(r.regionSize))
	b = binary.LittleEndian.AppendUint64(b, uint64(r.extentSize))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(r.active)))
	for _, x := range r.active {
		b = binary.LittleEndian.AppendUint64(b, uint64(x))
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(r.dirty)))
	for id, words := range r.dirty {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(id)))
		b = append(b, id...)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(words)))
		for _, w := range words {
			b = binary.LittleEndian.AppendUint64(b, w)
		}
	}
	return b
}

var errBadRecord = errors.New("malformed journal record")

func decodeRecord(b []byte) (record, error) {
	r := record{dirty: map[string][]uint64{}}
	take := func(n int) ([]byte, error) {
		if len(b) < n {
			return nil, errBadRecord
		}
		v := b[:n]
		b = b[n:]
		return v, nil
	}
	u32 := func() (uint32, error) {
		v, err := take(4)
		if err != nil {
			return 0, err
		}
		return binary.LittleEndian.Uint32(v), nil
	}
	u64 := func() (uint64, error) {
		v, err := take(8)
		if err != nil {
			return 0, err
		}
		return binary.LittleEndian.Uint64(v), nil
	}
	if v, err := u32(); err != nil || v != 1 {
		return r, fmt.Errorf("%w: version", errBadRecord)
	}
	rs, err1 := u64()
	es, err2 := u64()
	n, err3 := u32()
	if err := errors.Join(err1, err2, err3); err != nil {
		return r, err
	}
	r.regionSize, r.extentSize = int64(rs), int64(es)
	for range n {
		x, err := u64()
		if err != nil {
			return r, err
		}
		r.active = append(r.active, int64(x))
	}
	ns, err := u32()
	if err != nil {
		return r, err
	}
	for range ns {
		l, err := u32()
		if err != nil {
			return r, err
		}
		id, err := take(int(l))
		if err != nil {
			return r, err
		}
		nw, err := u32()
		if err != nil {
			return r, err
		}
		if uint64(len(b)) < 8*uint64(nw) {
			return r, errBadRecord
		}
		words := make([]uint64, nw)
		for i := range words {
			if words[i], err = u64(); err != nil {
				return r, err
			}
		}
		r.dirty[string(id)] = words
	}
	return r, nil
}

// journal implements quorum.Journal over the replicas' journal files.
// Every commit goes to every replica that is in sync in it; a replica out
// of sync keeps an older record, so the newest record among the replicas
// of an attach is the truth.
type journal struct {
	mu       sync.Mutex
	replicas []member
	seq      uint64
	slotSize int64
	region   int64
	extent   int64
}

func slotSize(volumeSize, region int64, activeExtents int) int64 {
	words := ((volumeSize+region-1)/region + 63) / 64
	n := int64(64+8*(2*activeExtents+1024)) + maxStaleReplicas*(72+8*words)
	return (n + 4095) &^ 4095
}

func (j *journal) Commit(ctx context.Context, rec quorum.Record) error {
	if len(rec.Dirty) > maxStaleReplicas {
		return fmt.Errorf("%d replicas out of sync: the journal holds at most %d", len(rec.Dirty), maxStaleReplicas)
	}
	r := record{regionSize: j.region, extentSize: j.extent, active: rec.Active, dirty: map[string][]uint64{}}
	for i, b := range rec.Dirty {
		r.dirty[j.replicas[i].Meta().ReplicaID] = b.Words()
	}
	payload := encodeRecord(r)
	j.mu.Lock()
	defer j.mu.Unlock()
	j.seq++
	entry := replica.JournalEntry{Seq: j.seq, Payload: payload}
	var wg sync.WaitGroup
	errs := make([]error, len(j.replicas))
	for i, rf := range j.replicas {
		if rec.Dirty[i] != nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = rf.writeJournal(ctx, entry, j.slotSize)
		}()
	}
	wg.Wait()
	failed := map[int]error{}
	for i, err := range errs {
		if err != nil {
			failed[i] = err
		}
	}
	if len(failed) > 0 {
		return &quorum.CommitError{Failed: failed}
	}
	return nil
}

// newest reads the journal of every replica but those left out and
// decodes the newest record, or an empty one for a volume that never had
// a record.
func (j *journal) newest(ctx context.Context, leftOut map[int]bool) (record, error) {
	var best replica.JournalEntry
	found := false
	for i, r := range j.replicas {
		if leftOut[i] {
			continue
		}
		e, ok, err := r.readJournal(ctx, j.slotSize)
		if err != nil {
			return record{}, err
		}
		if ok && (!found || e.Seq > best.Seq) {
			best, found = e, true
		}
	}
	if !found {
		return record{dirty: map[string][]uint64{}}, nil
	}
	rec, err := decodeRecord(best.Payload)
	if err != nil {
		return rec, fmt.Errorf("journal record %d: %w", best.Seq, err)
	}
	if rec.regionSize != j.region || rec.extentSize != j.extent {
		return rec, fmt.Errorf("journal record %d has regions of %d and extents of %d bytes, this build uses %d and %d", best.Seq, rec.regionSize, rec.extentSize, j.region, j.extent)
	}
	j.seq = best.Seq
	return rec, nil
}
