package cli

import "testing"

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
	}{
		{"4096", 4096},
		{"512K", 512 << 10},
		{"10M", 10 << 20},
		{"1G", 1 << 30},
		{"1g", 1 << 30},
		{"2GiB", 2 << 30},
		{"3GB", 3 << 30},
		{"1T", 1 << 40},
		{"", 0},
		{"0", 0},
		{"-1M", 0},
		{"1.5G", 0},
		{"12Q", 0},
		{"9999999999T", 0},
	}
	for _, tc := range tests {
		got, err := parseSize(tc.in)
		if tc.want == 0 {
			if err == nil {
				t.Errorf("parseSize(%q) = %d, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}
