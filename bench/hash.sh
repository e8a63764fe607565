#!/bin/bash
# Hashing benchmark: `vhdmerge hash` and `hash --flat` against `b3sum` (all
# threads, and one) over the same bytes, cold cache, several rounds, medians
# and ratios from one run. The disk: 8 GiB dynamic VHDX with 32 MiB blocks,
# 4 MiB written at the start of every block (each block allocated, 25 % of
# its bytes written, the rest holes of the file), and its sparse raw export.
# Usage: bench/hash.sh. Environment: BENCH_DIR (default /tmp/vhdmerge-hash),
# ROUNDS (default 3). Needs b3sum (`cargo install b3sum`). Prints Markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin vhdmerge --example bench_fill
V=$PWD/target/release/vhdmerge
F=$PWD/target/release/examples/bench_fill
B3=$(command -v b3sum || echo "$HOME/.cargo/bin/b3sum")
[ -x "$B3" ] || { echo "b3sum is needed: cargo install b3sum" >&2; exit 1; }
W=${BENCH_DIR:-/tmp/vhdmerge-hash}
ROUNDS=${ROUNDS:-3}
mkdir -p "$W" && cd "$W"
if [ ! -f d.raw ]; then
  rm -f d.vhdx
  "$V" --quiet create d.vhdx --size 8G --block-size 32M >/dev/null
  "$F" d.vhdx whole $((2 << 30)) 3 /dev/null
  "$V" --quiet export d.vhdx d.raw >/dev/null
fi
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
names=("vhdmerge hash" "vhdmerge hash --flat" "b3sum" "b3sum --num-threads 1")
cmds=("$V --quiet hash d.vhdx" "$V --quiet hash --flat d.vhdx" "$B3 d.raw" "$B3 --num-threads 1 d.raw")
rm -f ./*.times
for _ in $(seq "$ROUNDS"); do
  for i in "${!cmds[@]}"; do
    drop_caches
    s=$(date +%s.%N); ${cmds[$i]} > "out.$i"; e=$(date +%s.%N)
    echo "$e - $s" | bc >> "$i.times"
  done
done
base=$(median < 2.times)
echo "| command | rounds (s) | median | ratio to b3sum | digest |"
echo "|---|---|---|---|---|"
for i in "${!cmds[@]}"; do
  m=$(median < "$i.times")
  printf '| `%s` | %s | %.2f s | %.2f× | `%s…` |\n' "${names[$i]}" \
    "$(sort -g "$i.times" | xargs printf '%.2f, ' | sed 's/, $//')" "$m" \
    "$(echo "$m / $base" | bc -l)" "$(cut -c1-16 "out.$i")"
done
