// Package nbd is quorum-csi's replica transport: the NBD protocol (fixed
// newstyle, as NetworkBlockDevice/nbd doc/proto.md specifies it) with a
// server that exports replica images and a client that is one of the
// engine's children. No reachable Go library pipelines requests or does
// TLS with structured replies, so the protocol is ours, in three layers:
//
//   - The codec (proto.go, codec.go, errors.go): constants, frames and
//     typed errors, pure functions over io.Reader and io.Writer with no
//     connection state. Malformed input is a *ProtocolError; a request
//     the server refused is a *RequestError that matches its Errno (and
//     the corresponding syscall.Errno) with errors.Is.
//   - The server: its life and exports (server.go), the handshake and
//     option negotiation (negotiate.go), requests in transmission
//     (transmit.go), replies (reply.go), and the epoch fence beside the
//     epoch store (epoch.go). It exports Backends by name (quorum.Child's
//     method set, so *replica.File exports as it is). It negotiates
//     NBD_OPT_GO, INFO, LIST, ABORT, STRUCTURED_REPLY, STARTTLS and the
//     metadata context options (base:allocation; everything is reported
//     as allocated data unless the backend is an ExtentLister), and
//     serves READ, WRITE (FUA: flush after), FLUSH, TRIM, WRITE_ZEROES
//     (NO_HOLE: Backend.WriteZeroes, else Backend.Discard), CACHE (a
//     no-op) and BLOCK_STATUS. Each request runs in its own goroutine,
//     within a per-connection budget of requests and bytes; replies go
//     out as requests complete. It advertises the backend's block size
//     (BlockSizer) as the minimum and 32 MiB as the maximum, and answers
//     an unaligned or out-of-range request with EINVAL (ENOSPC for writes
//     past the end, as the protocol asks) without calling the backend.
//     Bytes that cannot be a request end that connection, with a log
//     line; nothing a client sends ends the server. Shutdown stops
//     reading requests, answers those in flight, then closes.
//   - The client (client.go; one connection's pipeline, clientconn.go;
//     its handshake, handshake.go): implements quorum.Child over
//     one connection with many requests in flight (a write lock orders
//     them on the wire, one reader goroutine routes replies by cookie).
//     Each request has a timeout (its context's deadline or
//     Config.Timeout); a request that times out or is cancelled fails
//     alone and its late reply is discarded, never written into a buffer
//     the caller got back. A lost connection is not a failure (see
//     "Connection losses" below). Discard is WRITE_ZEROES without NO_HOLE
//     (never TRIM, after which a range may read as anything), WriteZeroes
//     is WRITE_ZEROES with NO_HOLE.
//
// # Connection losses
//
// A replica server goes away for a moment whenever its node's data-path
// process restarts or is upgraded, which a rolling upgrade does node
// after node. If the client failed the requests in flight, every volume
// with a replica there would lose that replica until a resync, and two
// restarts in a row could take a 2-of-3 volume below its threshold. So
// the client reconnects in the background (capped exponential backoff
// with jitter), and the requests in flight at the loss, and those made
// meanwhile, wait for the new connection and are sent again on it. Each
// waits until its own deadline (its context's, or Config.Timeout from
// when it was made): a request whose deadline passes first fails with
// ErrDisconnected and context.DeadlineExceeded, so a server that stays
// away longer than the timeout still costs the engine that child, as
// before. A reply of NBD_ESHUTDOWN is treated as a loss too: the request
// is sent again once the server is back. Requests fail at once, without
// waiting, when the client is fenced (ErrFenced, for good), when the
// export it reached again has another size, block size or read-only
// flag (ErrExportChanged), when the connection ended in a protocol
// violation, and after Close (ErrClosed).
//
// Sending a request again is safe because every request of the engine is
// idempotent: a read, a write of given bytes, a flush, write-zeroes with
// or without NO_HOLE (Discard). And a copy sent again cannot overtake a
// later request to the same bytes from the engine: package quorum holds
// a range for every request (rangeTable in pkg/quorum/rangelock.go,
// acquired by Engine.modify and Engine.ReadAt in engine.go, by the
// resync's copyRegion and finishResync in resync.go and by Scrub in
// scrub.go), and a request that modifies data waits there for every
// earlier overlapping request and excludes every later one until all
// children answered it. The only writes under a shared range are the
// repairs of a voting read (Engine.rewrite), and those write the winning
// bytes, the same for every reader of that range. Flush takes no range:
// sent again, it covers at least what it covered the first time. The
// client sends a request again only once its previous send is over: the
// old connection's reader has ended and will write into no buffer. What
// it cannot know is whether the server executed the first send. A server
// process that restarted has no copy left; one that survived the loss
// (the connection broke, not the server) may still be running the first
// copy, which could then land after a later write to the same bytes. The
// window is the server's own I/O time, and the resend comes after at
// least half of MinBackoff; a connection that breaks silently is only
// declared lost after Timeout (TCP_USER_TIMEOUT), when the requests it
// carried have timed out and are not sent again. Likewise a flush sent
// again to a server whose machine rebooted covers only what its disks
// kept: a reboot takes longer than the timeout, and so costs the child
// as before.
//
// # TLS
//
// A Server with ServerConfig.TLS runs in the protocol's FORCEDTLS mode:
// before NBD_OPT_STARTTLS every option but STARTTLS and ABORT is answered
// NBD_REP_ERR_TLS_REQD (GO included) and NBD_OPT_EXPORT_NAME is hung up
// on. ServerTLSConfig requires a client certificate from the given CA. A
// Client with Config.TLS sends STARTTLS first and gives up if it is
// refused, never falling back to clear text. GenerateDevCA writes a CA
// and server and client certificates with the file names of QEMU's
// tls-creds-x509 (ca-cert.pem, server-cert.pem, client-key.pem, ...), so
// one folder also serves qemu-nbd, qemu-io, nbdkit and libnbd's tools.
//
// # Fencing with epochs
//
// Each attachment of a volume has an epoch, a number that the control
// plane increases for every new attachment. A fenced export (one with
// Export.Epochs) accepts writes only from the current epoch, so two
// holders of a volume can never both write.
//
// A client presents its epoch in the export name: "NAME@epoch=N", N in
// decimal from 1 without leading zeroes (ExportName, SplitExportName).
// The export name rather than a new option, because the protocol has no
// range of option numbers for private use (only metadata contexts have
// the "x-" namespace, and a context must then be answered in every
// BLOCK_STATUS reply), and because any NBD client can present a name:
// QEMU's own nbd driver, qemu-io and nbdinfo can act as fenced holders
// ("nbd://host/vol@epoch=7") with no code of ours. Both ways fail closed
// with servers that do not know the convention: an unknown name is
// NBD_REP_ERR_UNKNOWN. "@epoch=" is reserved in export names.
//
// The server keeps, per export, the highest epoch it has accepted (the
// current epoch), loaded from the EpochStore when the export is added.
// On NBD_OPT_GO (and INFO):
//
//   - NAME@epoch=N with N older than current: refused, NBD_REP_ERR_POLICY
//     with a message starting "fenced:".
//   - NAME@epoch=N with N current or newer: read-write. A newer N is a
//     standby until it first writes: it may read, and the current holder
//     keeps writing (a KubeVirt live-migration target).
//   - NAME alone: read-only (NBD_FLAG_READ_ONLY) if the export has
//     AllowPlainRead, else refused (POLICY). On an export without
//     fencing an epoch is refused (POLICY): a client asking to be fenced
//     must be, or not get in.
//
// The first write-class request (WRITE, WRITE_ZEROES, TRIM, FLUSH) of a
// connection with a newer epoch activates it: the server waits for the
// write-class requests in flight on the export (they run under a read
// lock, activation takes the write lock), calls EpochStore.StoreEpoch
// (if that fails, the request fails with EIO and nothing changes), makes
// the epoch current, and ends every connection that presented an older
// one: it stops reading them, answers what they had sent (writes with
// EPERM), and closes them. From then on every request of an older epoch
// fails with EPERM and a "fenced:" message, so each write of the old
// holder either completed before the new epoch took effect or never
// happens. The Client maps "fenced:" refusals to ErrFenced and stops
// reconnecting: a fenced holder never takes the volume back by itself.
// Plain read-only connections are not ended.
//
// Persisting the epoch is the caller's job, through EpochStore:
// EpochFile keeps it in a small file replaced atomically, MemEpochs in
// memory. The epoch is per export; exports may share one store.
// quorum-csi serves each replica as two exports (the image and its
// metadata and journal, see package volume) with one epoch file, and an
// attach takes a replica over by flushing both with its epoch before it
// decides on anything it read from them (a standby reads first, and
// flushes at its first write).
package nbd
