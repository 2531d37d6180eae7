package quorum

import "math/bits"

// Bitmap marks fixed-size regions of a volume, for dirty tracking.
type Bitmap struct {
	words      []uint64
	regionSize int64
	size       int64
}

// NewBitmap covers a volume of size bytes in regions of regionSize.
func NewBitmap(size, regionSize int64) *Bitmap {
	n := (size + regionSize - 1) / regionSize
	return &Bitmap{words: make([]uint64, (n+63)/64), regionSize: regionSize, size: size}
}

// RegionSize is the granularity.
func (b *Bitmap) RegionSize() int64 { return b.regionSize }

// Regions is the number of regions.
func (b *Bitmap) Regions() int64 { return (b.size + b.regionSize - 1) / b.regionSize }

// SetRange marks every region that [off, off+length) touches.
func (b *Bitmap) SetRange(off, length int64) {
	if length <= 0 {
		return
	}
	for r := off / b.regionSize; r <= (off+length-1)/b.regionSize; r++ {
		b.words[r/64] |= 1 << (r % 64)
	}
}

// Set marks region r.
func (b *Bitmap) Set(r int64) { b.words[r/64] |= 1 << (r % 64) }

// Clear unmarks region r.
func (b *Bitmap) Clear(r int64) { b.words[r/64] &^= 1 << (r % 64) }

// Test reports whether region r is marked.
func (b *Bitmap) Test(r int64) bool { return b.words[r/64]&(1<<(r%64)) != 0 }

// Next returns the first marked region at or after r, or -1.
func (b *Bitmap) Next(r int64) int64 {
	for w := r / 64; w < int64(len(b.words)); w++ {
		word := b.words[w]
		if w == r/64 {
			word &^= (1 << (r % 64)) - 1
		}
		if word != 0 {
			return w*64 + int64(bits.TrailingZeros64(word))
		}
	}
	return -1
}

// Count is the number of marked regions.
func (b *Bitmap) Count() int64 {
	var n int
	for _, w := range b.words {
		n += bits.OnesCount64(w)
	}
	return int64(n)
}

// Bytes is the volume bytes the marked regions cover.
func (b *Bitmap) Bytes() int64 {
	var n int64
	for r := b.Next(0); r >= 0; r = b.Next(r + 1) {
		_, l := b.Span(r)
		n += l
	}
	return n
}

// Span is the byte range of region r, clamped to the volume's end.
func (b *Bitmap) Span(r int64) (off, length int64) {
	off = r * b.regionSize
	return off, min(b.regionSize, b.size-off)
}

// Or marks every region marked in o (same geometry).
func (b *Bitmap) Or(o *Bitmap) {
	for i := range b.words {
		b.words[i] |= o.words[i]
	}
}

// Words exposes the bitmap for persistence; Load is its inverse.
func (b *Bitmap) Words() []uint64 { return b.words }

// Load replaces the bitmap's content with words (as returned by Words).
func (b *Bitmap) Load(words []uint64) { copy(b.words, words) }

// Clone returns a copy.
func (b *Bitmap) Clone() *Bitmap {
	c := *b
	c.words = append([]uint64(nil), b.words...)
	return &c
}
