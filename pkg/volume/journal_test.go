package volume

import (
	"reflect"
	"testing"
)

func TestRecordRoundTrip(t *testing.T) {
	r := record{regionSize: 65536, extentSize: 4 << 20, active: []int64{0, 7, 1 << 40},
		dirty: map[string][]uint64{"aa": {1, 2, 3}, "bb": {}}}
	got, err := decodeRecord(encodeRecord(r))
	if err != nil {
		t.Fatal(err)
	}
	if got.dirty["bb"] == nil {
		got.dirty["bb"] = []uint64{}
	}
	if !reflect.DeepEqual(got, r) {
		t.Fatalf("round trip: %+v, want %+v", got, r)
	}
	b := encodeRecord(r)
	for n := range len(b) {
		if _, err := decodeRecord(b[:n]); err == nil {
			t.Fatalf("a record cut at %d of %d bytes decoded", n, len(b))
		}
	}
}

func FuzzDecodeRecord(f *testing.F) {
	f.Add(encodeRecord(record{regionSize: 4096, extentSize: 65536, active: []int64{1}, dirty: map[string][]uint64{"x": {5}}}))
	f.Add([]byte{1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := decodeRecord(b); err == nil {
			if _, err := decodeRecord(encodeRecord(r)); err != nil {
				t.Fatalf("re-encoded record does not decode: %v", err)
			}
		}
	})
}
