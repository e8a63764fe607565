#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the test oracles it
# needs (Debian's qemu-utils, and libvhdi-python + dissect.hypervisor from
# PyPI into ./.venv) and the tools that make the XFS and btrfs file systems
# tests/filesystems.rs loop-mounts (xfsprogs, btrfs-progs), checks
# formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
    echo "== installing qemu-utils"
    apt-get update -qq && apt-get install -y -qq qemu-utils >/dev/null
fi

if [ "$(id -u)" = 0 ] && { ! command -v mkfs.xfs >/dev/null || ! command -v mkfs.btrfs >/dev/null; }; then
    echo "== installing xfsprogs and btrfs-progs"
    apt-get update -qq && apt-get install -y -qq xfsprogs btrfs-progs >/dev/null
fi

if ! .venv/bin/python -c 'import pyvhdi, dissect.hypervisor' 2>/dev/null; then
    echo "== installing the Python oracles into .venv"
    python3 -m venv --clear .venv
    .venv/bin/pip install -q -r tests/requirements.txt
fi
export VHDMERGE_PYTHON="$PWD/.venv/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -q -- -D warnings
echo "== cargo test"
# Library, binary and integration tests (examples have none). The totals
# are printed last as one line, 'tests: N passed, N failed'.
log=$(mktemp)
set +e
cargo test --lib --bins --tests -- --test-threads=2 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
