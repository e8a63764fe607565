#!/usr/bin/env bash
# The merge benchmark (bench/run.sh) and the hashing benchmark
# (bench/hash.sh) on XFS with reflink, made in a sparse image file and
# loop-mounted for the run: vhdmerge clones there, qemu-img commit and the
# plain copy copy. Usage: bench/xfs.sh [workloads, default: a b c d f].
# Environment: XFS_IMAGE (default /var/tmp/vhdmerge-xfs.img), XFS_SIZE
# (default 40G, sparse), ROUNDS. Needs root and mkfs.xfs (xfsprogs).
# Prints Markdown; unmounts and deletes the image at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=${XFS_IMAGE:-/var/tmp/vhdmerge-xfs.img}
MNT=$(mktemp -d /tmp/vhdmerge-xfs.XXXXXX)
cleanup() { umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; rm -f "$IMG"; rmdir "$MNT" 2>/dev/null || true; }
trap cleanup EXIT
rm -f "$IMG"
truncate -s "${XFS_SIZE:-40G}" "$IMG"
mkfs.xfs -q -m reflink=1 "$IMG"
mount -o loop "$IMG" "$MNT"
echo "XFS (reflink=1) in a loop-mounted sparse image on $(df --output=fstype "$(dirname "$IMG")" | tail -1), $(uname -r)"
echo
BENCH_DIR=$MNT/merge bench/run.sh "${@:-a b c d f}"
rm -rf "${MNT:?}/merge"
echo
BENCH_DIR=$MNT/hash bench/hash.sh
