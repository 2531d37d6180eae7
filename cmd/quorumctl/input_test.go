package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// snapshotDir reads every file under dir, to prove that a refused command
// changed nothing.
func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			b, _ := os.ReadFile(p)
			out[p] = string(b)
		}
		return nil
	})
	return out
}

// TestBadInput: every mistake gets one clear line on stderr, a non-zero
// exit, and no change to any file.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	abc := replicas(t, dir, "1M", "a.img", "b.img", "c.img")
	other := replicas(t, dir, "1M", "other.img")
	big := replicas(t, dir, "2M", "big.img")
	plain := filepath.Join(dir, "plain.img")
	os.WriteFile(plain, make([]byte, 1<<20), 0o600)
	missing := filepath.Join(dir, "missing.img")

	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no command", nil, 2, "usage: quorumctl COMMAND"},
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"create without size", []string{"create", filepath.Join(dir, "x.img")}, 2, "--size is required"},
		{"create bad size", []string{"create", "--size", "12Q", filepath.Join(dir, "x.img")}, 2, `size "12Q"`},
		{"create unaligned size", []string{"create", "--size", "1000", filepath.Join(dir, "x.img")}, 1, "multiple of 4096"},
		{"create over existing", []string{"create", "--size", "1M", filepath.Join(dir, "x.img"), abc[0]}, 1, "already exists; refusing to overwrite"},
		{"create path twice", []string{"create", "--size", "1M", filepath.Join(dir, "x.img"), filepath.Join(dir, "x.img")}, 1, "given twice"},
		{"attach no paths", []string{"attach"}, 2, "no replicas given"},
		{"attach remote without epoch", []string{"attach", abc[0], "nbd://127.0.0.1:1/b"}, 1, "needs an epoch"},
		{"attach bad URI", []string{"attach", "--epoch", "1", abc[0], "nbd://127.0.0.1/b?tls=1"}, 1, `unknown parameter "tls"`},
		{"attach nbds without certificates", []string{"attach", "--epoch", "1", abc[0], "nbds://127.0.0.1/b"}, 1, "needs ?tls-certificates"},
		{"attach unreachable server", []string{"attach", "--epoch", "1", abc[0], "nbd://127.0.0.1:1/b"}, 1, "connection refused"},
		{"serve no exports", []string{"serve"}, 2, "no --export"},
		{"serve bad export", []string{"serve", "--export", "b"}, 2, "want NAME=PATH"},
		{"serve reserved name", []string{"serve", "--export", "b@epoch=3=" + abc[1]}, 2, "reserved"},
		{"serve metadata name", []string{"serve", "--export", "b/meta=" + abc[1]}, 2, "metadata exports"},
		{"serve name twice", []string{"serve", "--export", "b=" + abc[1], "--export", "b=" + abc[2]}, 2, "given twice"},
		{"serve plain file", []string{"serve", "--listen", "127.0.0.1:0", "--export", "p=" + plain}, 1, "not a quorum replica"},
		{"serve bad listen", []string{"serve", "--listen", "127.0.0.1:99999", "--export", "b=" + abc[1]}, 1, "invalid port"},
		{"serve missing TLS files", []string{"serve", "--tls-dir", dir, "--export", "b=" + abc[1]}, 1, "ca-cert.pem"},
		{"gen-certs no folder", []string{"gen-certs"}, 2, "exactly one folder"},
		{"attach sizes differ", []string{"attach", abc[0], big[0]}, 1, "belongs to volume"},
		{"attach threshold above N", []string{"attach", "--vote-threshold", "4", abc[0], abc[1], abc[2]}, 1, "vote threshold 4 out of range: want 1 to 3"},
		{"attach threshold negative", []string{"attach", "--vote-threshold", "-1", abc[0]}, 2, `invalid value "-1" for flag -vote-threshold: must be at least 1`},
		{"attach threshold zero", []string{"attach", "--vote-threshold", "0", abc[0]}, 2, `invalid value "0" for flag -vote-threshold: must be at least 1 (leave the flag out for the default)`},
		{"attach epoch zero", []string{"attach", "--epoch", "0", abc[0]}, 2, `invalid value "0" for flag -epoch: must be at least 1`},
		{"attach probe interval zero", []string{"attach", "--probe-interval", "0s", abc[0]}, 2, `invalid value "0s" for flag -probe-interval: must be more than 0`},
		{"attach scrub interval negative", []string{"attach", "--scrub-interval", "-1h", abc[0]}, 2, `invalid value "-1h" for flag -scrub-interval: must be more than 0`},
		{"attach nbd timeout zero", []string{"attach", "--nbd-timeout", "0", abc[0]}, 2, `invalid value "0" for flag -nbd-timeout: must be more than 0`},
		{"attach nbd timeout not a duration", []string{"attach", "--nbd-timeout", "ten", abc[0]}, 2, `invalid value "ten" for flag -nbd-timeout`},
		{"attach threshold not a number", []string{"attach", "--vote-threshold", "two", abc[0]}, 2, "invalid value"},
		{"attach bad read pattern", []string{"attach", "--read-pattern", "random", abc[0]}, 2, `read pattern "random"`},
		{"attach rewrite with fifo", []string{"attach", "--read-pattern", "fifo", "--rewrite-corrupted", abc[0], abc[1]}, 1, "rewrite-corrupted needs read pattern"},
		{"attach path twice", []string{"attach", abc[0], abc[1], abc[0]}, 1, "given twice"},
		{"attach path twice via another spelling", []string{"attach", abc[0], dir + "/./a.img"}, 1, "given twice"},
		{"attach missing file", []string{"attach", abc[0], missing}, 1, "no such file or directory"},
		{"attach plain file", []string{"attach", plain}, 1, "not a quorum replica"},
		{"attach other volume", []string{"attach", abc[0], abc[1], other[0]}, 1, "belongs to volume"},
		{"check one path", []string{"check", abc[0]}, 2, "at least two"},
		{"check other volume", []string{"check", abc[0], other[0]}, 1, "belongs to volume"},
		{"bench no paths", []string{"bench"}, 2, "no replica paths"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshotDir(t, dir)
			stdout, stderr, code := quorumctl(t, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d", code, tc.code)
			}
			if !strings.Contains(stderr, tc.want) {
				t.Errorf("stderr %q does not say %q", stderr, tc.want)
			}
			if stdout != "" && tc.args != nil {
				t.Errorf("stdout %q, want nothing", stdout)
			}
			// One line for the error (usage listings aside).
			if code == 1 && strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
				t.Errorf("error is not one line: %q", stderr)
			}
			after := snapshotDir(t, dir)
			if len(after) != len(before) {
				t.Errorf("files before %d, after %d", len(before), len(after))
			}
			for p, b := range before {
				if after[p] != b {
					t.Errorf("%s changed", p)
				}
			}
		})
	}
}

// TestAlreadyAttached: a second attach of a replica in use is refused
// without touching anything, and the first keeps working.
func TestAlreadyAttached(t *testing.T) {
	dir := kernelTest(t)
	ps := replicas(t, dir, "16M", "a.img", "b.img", "c.img")
	a := attach(t, dir, ps...)
	before := snapshotDir(t, dir)
	for _, args := range [][]string{
		{"attach", ps[2]},
		{"attach", "--state-dir", filepath.Join(dir, "state"), ps[0], ps[1], ps[2]},
		{"check", ps[0], ps[1]},
	} {
		_, stderr, code := quorumctl(t, args...)
		if code != 1 || !strings.Contains(stderr, "in use by another process (is it attached already?)") {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
	}
	after := snapshotDir(t, dir)
	for p, b := range before {
		if after[p] != b {
			t.Errorf("%s changed", p)
		}
	}
	a.stop(syscall.SIGINT)
}
