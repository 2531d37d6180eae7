#!/usr/bin/env bash
# Boots the test guest under QEMU's software emulation and runs one
# in-guest test script; exits with that script's status (the guest prints
# it as "TEST-RC: N"), 124 when the guest does not finish within
# $GUEST_TIMEOUT seconds (default 600), 125 when it ends without a status.
#
# Usage: e2e/guest/run.sh BUILDDIR TEST [QEMU ARGS...]
#   BUILDDIR  what e2e/guest/build.sh wrote (vmlinuz, initramfs.cpio.gz)
#   TEST      runs /test-TEST.sh in the guest; "boot-vda" boots the root
#             filesystem on the first virtio disk instead
# The console goes to stdout. $GUEST_APPEND is added to the kernel command
# line (for parameters of the in-guest script).
set -uo pipefail
B=${1:?usage: $0 BUILDDIR TEST [QEMU ARGS...]}
T=${2:?usage: $0 BUILDDIR TEST [QEMU ARGS...]}
shift 2
APPEND="console=ttyS0 quiet panic=-1 test=$T ${GUEST_APPEND:-}"
[[ $T == boot-vda ]] && APPEND="console=ttyS0 quiet panic=-1 rootvda"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# TCG: the test machines' /dev/kvm cannot run a stock kernel. cx16 off:
# with it, TCG corrupts this kernel (GUEST-TESTS.md). One TCG thread for
# both vCPUs: with a thread each, the kernel's boot-time code patching
# (int3 breakpoints) sometimes hits a stale translation on the other vCPU
# and panics ("Oops: int3" in sched_clock_cpu, seen once in CI).
timeout --foreground "${GUEST_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg,thread=single -cpu max,-cx16 -smp 2 -m 2048 \
	-nographic -no-reboot -kernel "$B/vmlinuz" -initrd "$B/initramfs.cpio.gz" \
	-append "$APPEND" "$@" </dev/null | tee "$LOG"
rc=${PIPESTATUS[0]}
((rc == 124)) && exit 124
status=$(sed -n 's/^TEST-RC: \([0-9]*\).*/\1/p' "$LOG" | tail -n1)
[[ -n $status ]] || exit 125
exit "$status"
