package quorum

// EventType is the kind of an Event; the names are QEMU's QMP event names.
type EventType string

const (
	// EventQuorumFailure: a request could not gather voteThreshold
	// successful or agreeing children and failed.
	EventQuorumFailure EventType = "QUORUM_FAILURE"
	// EventReportBad: one child failed a request or returned data that lost
	// the vote.
	EventReportBad EventType = "REPORT_BAD"
)

// Op is the kind of request an Event is about.
type Op string

const (
	OpRead        Op = "read"
	OpWrite       Op = "write"
	OpFlush       Op = "flush"
	OpDiscard     Op = "discard"
	OpWriteZeroes Op = "write-zeroes"
	// OpJournal: a child could not store a journal record. Its data is
	// intact, but the next attach could not learn from it what the
	// others hold, so it is left out until it resyncs.
	OpJournal Op = "journal"
)

// Event reports a failure or a disagreement. Child is empty for
// QUORUM_FAILURE, which is about the request as a whole.
type Event struct {
	Type   EventType `json:"event"`
	Op     Op        `json:"op"`
	Offset int64     `json:"offset"`
	Length int64     `json:"length"`
	Child  string    `json:"child,omitempty"`
	Error  string    `json:"error,omitempty"`
}
