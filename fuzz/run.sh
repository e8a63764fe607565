#!/usr/bin/env bash
# Runs one cargo-fuzz target (or all four) for a bounded time.
#
#   fuzz/run.sh [TARGET|all] [SECONDS]     default: all, 60 seconds each
#
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz
# --version 0.13.2 --locked). Seeds in fuzz/seeds/TARGET/*.gz are unpacked
# into fuzz/corpus/TARGET first; crashes land in fuzz/artifacts/TARGET/ and
# belong, once understood and fixed, in fuzz/regressions/TARGET/ where
# tests/fuzz.rs replays them on stable.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-all}
secs=${2:-60}
targets=(vhdx vhd log journal)
[ "$target" = all ] || targets=("$target")
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    for s in seeds/"$t"/*.gz regressions/"$t"/*; do
        [ -f "$s" ] || continue
        case $s in
            *.gz) gunzip -c "$s" > "corpus/$t/$(basename "$s" .gz)" ;;
            *) cp "$s" "corpus/$t/" ;;
        esac
    done
    # Inputs up to 8 MiB: the VHDX seeds are 4-6 MiB files.
    cargo +nightly fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=8388608 -rss_limit_mb=2048 -timeout=20
done
