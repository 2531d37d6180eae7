// Package quorum is the replication engine of quorum-csi: it drives N
// children (replicas) through the Child interface and implements the
// semantics of QEMU's quorum block driver (block/quorum.c), plus the
// ordering guarantees QEMU lacks.
//
// Rules, with t the vote threshold (1 <= t <= N):
//
//   - Write, WriteZeroes, Discard and Flush go to every healthy child and
//     succeed when at least t children succeed. A child that fails one of
//     them is reported (REPORT_BAD) and becomes faulty: it is neither read
//     nor counted, and every region written meanwhile is marked dirty for
//     it. With a Journal, the fault is committed before the request that
//     found it completes. When the child answers again (Probe) its dirty
//     regions are copied to it in the background (resync), and it serves
//     reads again once it holds them all.
//   - Writes run inside extents of a committed write intent (the
//     Journal), so that after a crash Recover only has to reconcile those
//     extents. It does so in the background, and before any request to
//     an extent it has not reached, so a volume taken over after a crash
//     serves at once and never shows two versions of a byte.
//   - ReadPatternQuorum reads every healthy child and votes. The content
//     that the most children returned wins if at least t children returned
//     it; otherwise the read fails with a QUORUM_FAILURE. Children are
//     compared byte by byte first; only when they differ is each version
//     hashed and grouped. Losers are reported (REPORT_BAD) and, with
//     RewriteCorrupted, rewritten with the winner before the read returns.
//     A tie between versions with equal votes goes to the version held by
//     the child that comes first in the configured order. (QEMU picks by
//     the order of its internal vote list; we make the choice
//     deterministic and prefer the child the operator put first.)
//   - ReadPatternFIFO reads the first healthy child in configured order and
//     on error tries the next.
//   - Strict (QEMU's blkverify) reads every healthy child and fails the
//     read, with a QUORUM_FAILURE, on any error or disagreement.
//   - Requests whose ranges overlap are ordered by submission: a write (or
//     discard, write-zeroes) waits for every earlier overlapping request, a
//     read waits for every earlier overlapping write. So two writes to the
//     same range reach every child in the same order, and a read never sees
//     a range with a write to it half applied. Requests that do not
//     overlap run fully concurrently.
//   - A standby engine (Config.Standby, a live migration's target) takes
//     nothing over until its first write, write-zeroes or discard: it
//     only reads, rewrites no loser, resyncs and scrubs nothing and
//     commits no record; a flush has nothing of its own to make durable and
//     succeeds. That request, or Activate, runs the Activator,
//     which fences the last holder and reports the state it left; the
//     engine applies it as New does, recovers the holder's write intent,
//     and serves. Requests arriving meanwhile wait for it.
//
// The package does no I/O of its own and knows nothing of files, networks
// or Kubernetes; every failure mode is testable with fake children.
package quorum
