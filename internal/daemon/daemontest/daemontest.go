// Package daemontest tests a daemon's command line (package daemon) from
// a table of cases, the one rig of cmd/node's and cmd/datapath's flag
// tests.
package daemontest

import (
	"io"
	"strings"
	"testing"
)

// Case is a command line, run with $NODE_NAME set to Env, and what it
// must give: an error containing WantErr, or options that pass Check.
type Case[O any] struct {
	Name    string
	Env     string
	Args    []string
	WantErr string
	Check   func(t *testing.T, o O)
}

// Run runs each case through parse, and after them the mistakes that
// package daemon refuses on every daemon's command line. A command line
// that parse refuses must also make run exit 2 and say why on stderr,
// before it starts anything.
func Run[O any](t *testing.T, cases []Case[O], parse func([]string, io.Writer) (O, error), run func([]string, io.Writer) int) {
	t.Helper()
	cases = append(cases,
		Case[O]{Name: "no node name", WantErr: "no node name"},
		Case[O]{Name: "stray argument", Env: "n1", Args: []string{"extra"}, WantErr: "unexpected arguments"},
		Case[O]{Name: "unknown flag", Env: "n1", Args: []string{"--bogus"}, WantErr: "bogus"},
	)
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			t.Setenv("NODE_NAME", tc.Env)
			o, err := parse(tc.Args, io.Discard)
			if tc.WantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				tc.Check(t, o)
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.WantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.WantErr)
			}
			var stderr strings.Builder
			if code := run(tc.Args, &stderr); code != 2 || !strings.Contains(stderr.String(), tc.WantErr) {
				t.Fatalf("run: exit %d, stderr %q; want 2 and %q", code, stderr.String(), tc.WantErr)
			}
		})
	}
}
