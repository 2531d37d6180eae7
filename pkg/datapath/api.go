package datapath

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// The API is HTTP with JSON bodies on a Unix socket that only root on the
// node reaches:
//
//	GET    /v1/ready                    200 once every volume was taken back, else 503
//	GET    /v1/volumes                  [Status]
//	GET    /v1/volumes/{id}             Status
//	PUT    /v1/volumes/{id}             StageRequest -> Status
//	DELETE /v1/volumes/{id}?wait=D      unstage, waiting up to D for the device's users
//	DELETE /v1/volumes/{id}?force=1     unstage even while in use
//	PUT    /v1/volumes/{id}/targets     Target: record a publish
//	DELETE /v1/volumes/{id}/targets     Target: forget it
//	POST   /v1/volumes/{id}/quiesce     Hold: hold requests at a consistent cut
//	POST   /v1/volumes/{id}/resume      let them through again
//	POST   /v1/volumes/{id}/activate    take a standby's replicas over now
//	POST   /v1/handover                 the planned end of this process, for a successor
//
// Errors come as {"error": text, "code": kind} with kind one of the
// codes below, so the client returns the sentinel errors again.

// DefaultSocket is where the data path's API listens on a node.
const DefaultSocket = "/run/quorum-csi/datapath.sock"

// Target is a path a volume is published at.
type Target struct {
	Path string `json:"path"`
	// Single is true for a SINGLE_NODE_SINGLE_WRITER publish.
	Single bool `json:"single,omitempty"`
}

// Hold asks for a quiesce of at most MaxHold (a Go duration, "30s").
type Hold struct {
	MaxHold string `json:"maxHold"`
}

type apiError struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

var errorCodes = []struct {
	code   string
	err    error
	status int
}{
	{"not_found", ErrNotFound, http.StatusNotFound},
	{"conflict", ErrConflict, http.StatusConflict},
	{"busy", ErrBusy, http.StatusConflict},
	{"not_ready", ErrNotReady, http.StatusServiceUnavailable},
}

// Server serves a Service's API.
type Server struct {
	Service *Service
	// Handover ends this process's service for a successor (see
	// Service.Handover); the process decides what else it lets go of.
	Handover func(ctx context.Context) error
	// Instance names this process's pod (its UID) in the ready answer:
	// until a successor listens, its predecessor answers on the same
	// socket, and the successor's readiness probe must not take that
	// answer for its own (its pod would be ready, and the predecessor's
	// pod with the FUSE descriptor holder deleted, before it took the
	// devices back).
	Instance string
}

// readyAnswer is the body of a ready answer.
type readyAnswer struct {
	Instance string `json:"instance,omitempty"`
}

// Handler is the API.
func (a *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/ready", func(w http.ResponseWriter, r *http.Request) {
		if !a.Service.Ready() {
			writeError(w, ErrNotReady)
			return
		}
		writeJSON(w, http.StatusOK, readyAnswer{Instance: a.Instance})
	})
	mux.HandleFunc("GET /v1/volumes", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Service.List())
	})
	mux.HandleFunc("GET /v1/volumes/{id}", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Service.Get(r.PathValue("id"))
		reply(w, st, err)
	})
	mux.HandleFunc("PUT /v1/volumes/{id}", func(w http.ResponseWriter, r *http.Request) {
		var req StageRequest
		if !readJSON(w, r, &req) {
			return
		}
		if req.VolumeID != r.PathValue("id") {
			writeError(w, fmt.Errorf("volume %q in the body, %q in the path", req.VolumeID, r.PathValue("id")))
			return
		}
		st, err := a.Service.Stage(r.Context(), req)
		reply(w, st, err)
	})
	mux.HandleFunc("DELETE /v1/volumes/{id}", func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if d := r.URL.Query().Get("wait"); d != "" {
			wait, err := time.ParseDuration(d)
			if err != nil {
				writeError(w, fmt.Errorf("wait=%q: %w", d, err))
				return
			}
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, wait)
			defer cancel()
		}
		err := a.Service.Unstage(ctx, r.PathValue("id"), r.URL.Query().Get("force") == "1")
		reply(w, struct{}{}, err)
	})
	target := func(published bool) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			var t Target
			if !readJSON(w, r, &t) {
				return
			}
			reply(w, struct{}{}, a.Service.SetTarget(r.PathValue("id"), t.Path, t.Single, published))
		}
	}
	mux.HandleFunc("PUT /v1/volumes/{id}/targets", target(true))
	mux.HandleFunc("DELETE /v1/volumes/{id}/targets", target(false))
	mux.HandleFunc("POST /v1/volumes/{id}/quiesce", func(w http.ResponseWriter, r *http.Request) {
		var h Hold
		if !readJSON(w, r, &h) {
			return
		}
		hold, err := time.ParseDuration(h.MaxHold)
		if err != nil {
			writeError(w, fmt.Errorf("maxHold %q: %w", h.MaxHold, err))
			return
		}
		reply(w, struct{}{}, a.Service.Quiesce(r.Context(), r.PathValue("id"), hold))
	})
	mux.HandleFunc("POST /v1/volumes/{id}/resume", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, a.Service.Resume(r.PathValue("id")))
	})
	mux.HandleFunc("POST /v1/volumes/{id}/activate", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, a.Service.Activate(r.Context(), r.PathValue("id")))
	})
	mux.HandleFunc("POST /v1/handover", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, a.Handover(r.Context()))
	})
	return mux
}

func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(v); err != nil {
		writeError(w, fmt.Errorf("request body: %w", err))
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			writeJSON(w, c.status, apiError{Error: err.Error(), Code: c.code})
			return
		}
	}
	writeJSON(w, http.StatusBadRequest, apiError{Error: err.Error(), Code: "invalid"})
}

// Listen listens on the API socket at path, replacing a socket file left
// there (by a process that died, or by the predecessor this one took
// over from: its clients must reach the new service from now on).
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("data path socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("data path socket: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("data path socket: %w", err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("data path socket: %w", err)
	}
	// The predecessor closes its listener after this one replaced its
	// socket file: unlinking on close would remove ours.
	l.SetUnlinkOnClose(false)
	return l, nil
}

// Client calls a data path's API.
type Client struct {
	hc *http.Client
}

// NewClient talks to the data path listening at socket.
func NewClient(socket string) *Client {
	return &Client{hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		// Each call is rare and may follow a restart of the data path:
		// a kept connection would only reach a process that is gone.
		DisableKeepAlives: true,
	}}}
}

func (c *Client) do(ctx context.Context, method, path string, query url.Values, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	u := "http://datapath" + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("data path: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var ae apiError
		if err := json.NewDecoder(resp.Body).Decode(&ae); err != nil {
			return fmt.Errorf("data path: %s %s: %s", method, path, resp.Status)
		}
		for _, c := range errorCodes {
			if c.code == ae.Code {
				return fmt.Errorf("data path: %s: %w", ae.Error, c.err)
			}
		}
		return fmt.Errorf("data path: %s", ae.Error)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Ready reports nil once the data path took back every volume.
func (c *Client) Ready(ctx context.Context) error {
	_, err := c.ReadyInstance(ctx)
	return err
}

// ReadyInstance is Ready that also says which instance answered
// (Server.Instance).
func (c *Client) ReadyInstance(ctx context.Context) (string, error) {
	var a readyAnswer
	err := c.do(ctx, http.MethodGet, "/v1/ready", nil, nil, &a)
	return a.Instance, err
}

// Stage serves a volume (see Service.Stage).
func (c *Client) Stage(ctx context.Context, req StageRequest) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodPut, "/v1/volumes/"+url.PathEscape(req.VolumeID), nil, req, &st)
	return st, err
}

// Unstage removes a volume's device, waiting up to wait for its users
// (see Service.Unstage); force removes it even while in use.
func (c *Client) Unstage(ctx context.Context, id string, wait time.Duration, force bool) error {
	q := url.Values{"wait": {wait.String()}}
	if force {
		q.Set("force", "1")
	}
	return c.do(ctx, http.MethodDelete, "/v1/volumes/"+url.PathEscape(id), q, nil, nil)
}

// Get reports a staged volume; ErrNotFound if it is not staged.
func (c *Client) Get(ctx context.Context, id string) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(id), nil, nil, &st)
	return st, err
}

// List reports every staged volume.
func (c *Client) List(ctx context.Context) ([]Status, error) {
	var sts []Status
	err := c.do(ctx, http.MethodGet, "/v1/volumes", nil, nil, &sts)
	return sts, err
}

// SetTarget records (published) or forgets a target of a volume.
func (c *Client) SetTarget(ctx context.Context, id string, t Target, published bool) error {
	method := http.MethodPut
	if !published {
		method = http.MethodDelete
	}
	return c.do(ctx, method, "/v1/volumes/"+url.PathEscape(id)+"/targets", nil, t, nil)
}

// Quiesce holds the volume's requests at a consistent cut for at most
// maxHold (see Service.Quiesce).
func (c *Client) Quiesce(ctx context.Context, id string, maxHold time.Duration) error {
	return c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(id)+"/quiesce", nil, Hold{MaxHold: maxHold.String()}, nil)
}

// Resume lets a quiesced volume's requests through again.
func (c *Client) Resume(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(id)+"/resume", nil, nil, nil)
}

// Activate takes a standby volume's replicas over (see
// Service.Activate).
func (c *Client) Activate(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(id)+"/activate", nil, nil, nil)
}

// Handover asks the data path to end for a successor.
func (c *Client) Handover(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/handover", nil, nil, nil)
}
