#!/usr/bin/env bash
# Side-by-side merge benchmark: vhdmerge merge vs qemu-img commit vs a plain
# copy with one fsync, on the same written ranges, several rounds, medians
# and ratios from one run; and the cost of checkpoints, and of resuming a
# killed merge (workload r). Workloads f, g and h are the common checkpoint:
# a child that rewrites data a full base already holds. Usage:
#   bench/run.sh [a b c d e f g h r]    (default: all workloads)
# Environment: BENCH_DIR (scratch folder, default /tmp/vhdmerge-bench),
# ROUNDS (default 3), PREFAULT_GIB (default 8, see drop_caches). Prints a
# Markdown report on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin vhdmerge --example bench_fill
V=$PWD/target/release/vhdmerge
F=$PWD/target/release/examples/bench_fill
W=${BENCH_DIR:-/tmp/vhdmerge-bench}
ROUNDS=${ROUNDS:-3}
WORKLOADS=${*:-a b c d e f g h r}
rm -rf "$W"; mkdir -p "$W"
GiB=$((1 << 30)); MiB=$((1 << 20))
FINISH_ONLY=no
if "$V" merge --help | grep -q -- --finish-only; then FINISH_ONLY=yes; fi

# Before every timed command: the page cache dropped, two seconds for the
# disk to settle (a file system mounted with `discard` trims the blocks of
# the files just removed behind the sync: work no timed command should pay
# for), then PREFAULT_GIB (default 8) of memory touched and freed. In a
# virtual machine whose balloon reports free pages to the host, memory left
# free for about two seconds is handed back, and the next command to use
# it (as page cache) waits for the host to back every page again: on this
# project's machines that doubled a merge's time, or not, depending on the
# seconds before it. Touched just before, the memory every timed command
# gets is alike.
PREFAULT_GIB=${PREFAULT_GIB:-8}
drop_caches() {
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; sleep 2
    [ "$PREFAULT_GIB" -gt 0 ] && python3 - "$PREFAULT_GIB" <<'PY'
import mmap, sys
n = int(sys.argv[1]) << 30
m = mmap.mmap(-1, n)
for at in range(0, n, 1 << 20):
    m[at:at + (1 << 20)] = b"\1" * (1 << 20)
m.close()
PY
    return 0
}
# Used bytes of the file system holding $W, once settled (XFS frees the
# blocks of deleted files in the background).
used() {
    local last now
    last=$(sync -f "$W"; stat -f -c '%b %f %S' "$W" | awk '{printf "%.0f\n", ($1 - $2) * $3}')
    for _ in $(seq 50); do
        sleep 0.1
        now=$(sync -f "$W"; stat -f -c '%b %f %S' "$W" | awk '{printf "%.0f\n", ($1 - $2) * $3}')
        [ "$now" = "$last" ] && break
        last=$now
    done
    echo "$last"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# timed NAME CMD...: runs CMD under /usr/bin/time, appends "secs rss_kib" to $W/NAME.times
timed() {
    local name=$1; shift
    drop_caches
    /usr/bin/time -f "%e %M" -o "$W/t.out" "$@" > "$W/$name.last" 2>/dev/null
    cat "$W/t.out" >> "$W/$name.times"
}

# prepare WL: builds pristine inputs in $W/$WL/src (vhdmerge chain, qemu overlay, payload)
prepare() {
    local wl=$1 d=$W/$1/src
    mkdir -p "$d"
    case $wl in
    a|b|e)
        local size bytes mode bs
        case $wl in
            a) size=$((4 * GiB)); bytes=$((2 * GiB)); mode=whole; bs=32M ;;
            b) size=$((8 * GiB)); bytes=$((512 * MiB)); mode=scattered; bs=32M ;;
            e) size=$((64 << 40)); bytes=$((64 * MiB)); mode=scattered; bs=32M ;;
        esac
        $V --quiet create "$d/base.vhdx" --size "$size" --block-size "$bs" > /dev/null
        $V --quiet create "$d/child.avhdx" --parent "$d/base.vhdx" > /dev/null
        $F "$d/child.avhdx" "$mode" "$bytes" 1 "$d/cmds"
        echo "$bytes" > "$d/bytes"
        ;;
    c)
        $V --quiet create "$d/l0.vhdx" --size $((4 * GiB)) --block-size 32M > /dev/null
        local prev=l0.vhdx
        for i in 1 2 3 4; do
            $V --quiet create "$d/l$i.avhdx" --parent "$d/$prev" > /dev/null
            # Each level writes its own 4 MiB of the same 128 blocks of
            # 32 MiB: the merge copies 4 x 512 MiB into blocks it allocates
            # once, each level's data on top of what the levels below left.
            $F "$d/l$i.avhdx" whole $((512 * MiB)) "$i" "$d/cmds$i" $(( (i - 1) * 4 * MiB ))
            prev=l$i.avhdx
        done
        echo $((2 * GiB)) > "$d/bytes"
        ;;
    r)
        # 4 GiB in whole 4 MiB pieces over an 8 GiB disk, merged, killed
        # at 50 % and 90 % of its copy, and resumed.
        $V --quiet create "$d/base.vhdx" --size $((8 * GiB)) --block-size 32M > /dev/null
        $V --quiet create "$d/child.avhdx" --parent "$d/base.vhdx" > /dev/null
        $F "$d/child.avhdx" whole $((4 * GiB)) 1 "$d/cmds"
        echo $((4 * GiB)) > "$d/bytes"
        return
        ;;
    f|g|h)
        # An 8 GiB system disk holding 1 GiB (4 MiB at the start of every
        # 32 MiB), and a checkpoint with 2 MiB blocks over it: (f) 2 GiB of
        # whole 4 MiB writes, 2 MiB off the base's, so a quarter of them
        # rewrite base data; (g) 512 MiB of scattered 4 KiB writes; (h) (f)
        # as VHD (2 MiB blocks throughout).
        local ext=vhdx cext=avhdx mode=whole bytes=$((2 * GiB)) shift=$((2 * MiB))
        local bs=(--block-size 32M)
        if [ "$wl" = h ]; then ext=vhd; cext=avhd; bs=(); fi
        if [ "$wl" = g ]; then mode=scattered; bytes=$((512 * MiB)); shift=0; fi
        $V --quiet create "$d/base.$ext" --size $((8 * GiB)) "${bs[@]}" > /dev/null
        $F "$d/base.$ext" whole $((1 * GiB)) 7 /dev/null
        $V --quiet create "$d/child.$cext" --parent "$d/base.$ext" --block-size 2M > /dev/null
        $F "$d/child.$cext" "$mode" "$bytes" 1 "$d/cmds" "$shift"
        echo "$bytes" > "$d/bytes"
        # The qemu-img commit peer: an identical base under a qcow2 overlay.
        local qf=vhdx
        [ "$wl" = h ] && qf=vpc
        $V --quiet create "$d/qbase.$ext" --size $((8 * GiB)) "${bs[@]}" > /dev/null
        $F "$d/qbase.$ext" whole $((1 * GiB)) 7 /dev/null
        qemu-img create -q -f qcow2 -b "qbase.$ext" -F "$qf" "$d/over.qcow2"
        qemu-io -f qcow2 "$d/over.qcow2" < "$d/cmds" > /dev/null
        head -c "$bytes" /dev/urandom > "$d/payload.raw"
        # (f) also against a copy of its merged bytes plus the base data
        # it overwrites (a quarter of them), each once: what a merge that
        # keeps before-images must at least move.
        if [ "$wl" = f ]; then
            head -c $((bytes + bytes / 4)) /dev/urandom > "$d/payload-images.raw"
        fi
        return
        ;;
    d)
        $V --quiet create "$d/base.vhd" --size $((4 * GiB)) > /dev/null
        $V --quiet create "$d/child.avhd" --parent "$d/base.vhd" > /dev/null
        $F "$d/child.avhd" whole $((1 * GiB)) 1 "$d/cmds"
        echo $((1 * GiB)) > "$d/bytes"
        ;;
    esac
    # The same data as a qcow2 overlay (chain) over an identical base, for qemu-img commit.
    case $wl in
    a|b)
        $V --quiet create "$d/qbase.vhdx" --size "$size" --block-size 32M > /dev/null
        qemu-img create -q -f qcow2 -b qbase.vhdx -F vhdx "$d/over.qcow2"
        qemu-io -f qcow2 "$d/over.qcow2" < "$d/cmds" > /dev/null
        ;;
    c)
        $V --quiet create "$d/qbase.vhdx" --size $((4 * GiB)) --block-size 32M > /dev/null
        local prev=qbase.vhdx pf=vhdx
        for i in 1 2 3 4; do
            qemu-img create -q -f qcow2 -b "$prev" -F "$pf" "$d/q$i.qcow2"
            qemu-io -f qcow2 "$d/q$i.qcow2" < "$d/cmds$i" > /dev/null
            prev=q$i.qcow2; pf=qcow2
        done
        ;;
    esac
    head -c "$(cat "$d/bytes")" /dev/urandom > "$d/payload.raw" 2>/dev/null || true
}

# merge NAME WL RUN_DIR [OPTIONS...]: times vhdmerge merge of the workload's chain as NAME
merge() {
    local name=$1 wl=$2 r=$3; shift 3
    case $wl in
        a|b|e|f|g) timed "$name" "$V" --quiet merge "$@" "$r/child.avhdx" ;;
        h) timed "$name" "$V" --quiet merge "$@" "$r/child.avhd" ;;
        c) timed "$name" "$V" --quiet merge "$@" --into "$r/l0.vhdx" "$r/l4.avhdx" ;;
        d) timed "$name" "$V" --quiet merge "$@" "$r/child.avhd" ;;
    esac
}

run() {
    local wl=$1 d=$W/$1/src r=$W/$1/run
    if [ "$wl" = r ]; then run_resume; return; fi
    for round in $(seq "$ROUNDS"); do
        rm -rf "$r"; mkdir -p "$r"; cp --sparse=always --reflink=never "$d"/* "$r"/
        merge "$wl-vhdmerge" "$wl" "$r" --json
        cp "$W/$wl-vhdmerge.last" "$W/$wl-report-$round.json"
        case $wl in
            a|b|f|g|h) timed "$wl-qemu" qemu-img commit -q -f qcow2 "$r/over.qcow2" ;;
            c) timed "$wl-qemu" qemu-img commit -q -f qcow2 -b "$r/q1.qcow2" "$r/q4.qcow2" \
                 && timed "$wl-qemu1" qemu-img commit -q -f qcow2 "$r/q1.qcow2" ;;
        esac
        # The peer's files are done with: (f) to (h) need the space.
        rm -f "$r"/qbase.* "$r"/over.qcow2 "$r"/q[0-9].qcow2
        timed "$wl-copy" dd if="$r/payload.raw" of="$r/copy.raw" bs=4M conv=fsync status=none
        if [ -f "$r/payload-images.raw" ]; then
            rm -f "$r/copy.raw"
            timed "$wl-copyimg" dd if="$r/payload-images.raw" of="$r/copy.raw" bs=4M conv=fsync status=none
        fi
        # The same merge leaving the merged files (renamed), as qemu-img
        # commit leaves its overlay: deleting a large sparse file is work
        # of the file system (ext4 frees every extent) that the peer skips.
        rm -rf "$r"; mkdir -p "$r"; cp --sparse=always --reflink=never "$d"/* "$r"/
        local before; before=$(used)
        merge "$wl-keep" "$wl" "$r" --keep --json
        echo $(( $(used) - before )) >> "$W/$wl-space"
        cp "$W/$wl-keep.last" "$W/$wl-keep-report-$round.json"
        # What deleting the merged files costs on its own: the default
        # merge is about --keep plus this.
        timed "$wl-rm" rm -f "$r"/*.merged
        # Without checkpoints but the last (and the 30 s bound): what the
        # default 1 GiB checkpoints cost.
        rm -rf "$r"; mkdir -p "$r"; cp --sparse=always --reflink=never "$d"/* "$r"/
        merge "$wl-nockpt" "$wl" "$r" --keep --checkpoint-every 1T
        # The opt-in mode without before-images of overwritten data, where
        # the child rewrites the base's data (if the build has it: the
        # bench also runs older builds, for before-and-after tables).
        if [ "$FINISH_ONLY" = yes ] && [[ $wl == [fgh] ]]; then
            rm -rf "$r"; mkdir -p "$r"; cp --sparse=always --reflink=never "$d"/* "$r"/
            merge "$wl-fonly" "$wl" "$r" --keep --finish-only --json
            cp "$W/$wl-fonly.last" "$W/$wl-fonly-report-$round.json"
        fi
    done
}

# Guest bytes of the Copy records in a journal (frames: 24-byte header,
# kind at 6; a Copy payload starts with its u32 variant index, then offset
# and length as u64 LE), counting each offset once.
journal_copied() {
    python3 - "$1" <<'PY'
import struct, sys
b = open(sys.argv[1], "rb").read()
at, runs = 0, {}
while at + 24 <= len(b):
    kind, = struct.unpack_from("<H", b, at + 6)
    n, = struct.unpack_from("<I", b, at + 16)
    if at + 24 + n > len(b):
        break
    if kind == 3:
        off, ln = struct.unpack_from("<QQ", b, at + 24 + 4)
        runs[off] = ln
    at += 24 + n
print(sum(runs.values()))
PY
}

# Workload r: an uninterrupted merge --keep, then the same merge killed
# (SIGKILL) at 50 % and 90 % of its copy, and the `recover` that resumes
# it, each timed with a cold cache. The base starts empty and grows block
# by block in guest order as the copy goes, so its length is the progress
# the kill waits for (what was copied is then read from the journal).
run_resume() {
    local d=$W/r/src r=$W/r/run final
    for round in $(seq "$ROUNDS"); do
        rm -rf "$r"; mkdir -p "$r"; cp --sparse=always --reflink=never "$d"/* "$r"/
        timed r-full "$V" --quiet merge --keep --json "$r/child.avhdx"
        cp "$W/r-full.last" "$W/r-full-$round.json"
        final=$(stat -c %s "$r/base.vhdx")
        for pct in 50 90; do
            rm -rf "$r"; mkdir -p "$r"; cp --sparse=always --reflink=never "$d"/* "$r"/
            local start pid
            start=$(stat -c %s "$r/base.vhdx")
            drop_caches
            "$V" --quiet merge --keep "$r/child.avhdx" > /dev/null 2>&1 &
            pid=$!
            while kill -0 "$pid" 2>/dev/null \
                && [ $(( ($(stat -c %s "$r/base.vhdx") - start) * 100 )) -lt $(( (final - start) * pct )) ]; do
                sleep 0.02
            done
            kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
            # How far the copy had got: the base's growth (Copy records
            # reach the journal file only at its syncs, so it lags).
            # (awk: the product overflows bash's 64-bit arithmetic)
            echo "$(awk -v s="$(stat -c %s "$r/base.vhdx")" -v a="$start" -v f="$final" -v b="$(cat "$d/bytes")" \
                'BEGIN { printf "%.0f", (s - a) / (f - a) * b }') $(journal_copied "$r/base.vhdx.vhdmerge-journal")" >> "$W/r-killed-$pct.bytes"
            timed "r-recover-$pct" "$V" --quiet recover --json "$r/base.vhdx"
            cp "$W/r-recover-$pct.last" "$W/r-recover-$pct-$round.json"
        done
    done
}

report_resume() {
    python3 - "$W" <<'PY'
import glob, json, statistics, sys
w = sys.argv[1]
med = statistics.median
full = med(float(l.split()[0]) for l in open(f"{w}/r-full.times"))
print(f"Uninterrupted `merge --keep` of 4 GiB: {full:.2f} s (median).\n")
print("| killed at | copied when killed (base growth) | in the journal file | resumed_from | remaining | recover (median) | recover / uninterrupted merge | peak RSS |")
print("|---|---|---|---|---|---|---|---|")
for pct in (50, 90):
    times = [l.split() for l in open(f"{w}/r-recover-{pct}.times")]
    t = med(float(x[0]) for x in times)
    rss = med(int(x[1]) for x in times) / 1024
    killed = [int(l.split()[0]) for l in open(f"{w}/r-killed-{pct}.bytes")]
    journaled = [int(l.split()[1]) for l in open(f"{w}/r-killed-{pct}.bytes")]
    reps = [json.load(open(p)) for p in sorted(glob.glob(f"{w}/r-recover-{pct}-*.json"))]
    rf = [r.get("resumed_from") or 0 for r in reps]
    rem = [r.get("remaining") or 0 for r in reps]
    gib = lambda v: "/".join(f"{x / 2**30:.2f}" for x in v) + " GiB"
    print(f"| {pct} % | {gib(killed)} | {gib(journaled)} | {gib(rf)} | {gib(rem)} | {t:.2f} s | {t / full:.2f} | {rss:.1f} MiB |")
PY
}

report() {
    local wl=$1 bytes
    bytes=$(cat "$W/$wl.bytes")
    local vt vr qt ct kt rt
    vt=$(awk '{print $1}' "$W/$wl-vhdmerge.times" | median)
    rt=$(awk '{print $1}' "$W/$wl-rm.times" | median)
    kt=$(awk '{print $1}' "$W/$wl-keep.times" | median)
    vr=$(awk '{print $2}' "$W/$wl-vhdmerge.times" | median)
    ct=$(awk '{print $1}' "$W/$wl-copy.times" | median)
    qt=-
    if [ -f "$W/$wl-qemu.times" ]; then
        qt=$(awk '{print $1}' "$W/$wl-qemu.times" | median)
        if [ -f "$W/$wl-qemu1.times" ]; then
            qt=$(paste "$W/$wl-qemu.times" "$W/$wl-qemu1.times" | awk '{print $1 + $3}' | median)
        fi
    fi
    python3 - "$wl" "$bytes" "$vt" "$vr" "$qt" "$ct" "$W/$wl-report" "$kt" "$rt" <<'PY'
import glob, json, statistics, sys
wl, size, vt, vr, qt, ct, rep, kt, rt = sys.argv[1:]
size, vt, vr, ct, kt, rt = int(size), float(vt), int(vr), float(ct), float(kt), float(rt)
# Throughput of the first and the last tenth of the copy, per round; the
# medians over the rounds are reported, and the median of last / first.
firsts, lasts, ratios = [], [], []
for path in sorted(glob.glob(rep + "-*.json")):
    r = json.load(open(path))
    d = r["decile_seconds"]
    spans = [b - a for a, b in zip([0.0] + d[:-1], d)]
    if len(spans) == 10 and spans[0] > 0 and spans[-1] > 0:
        firsts.append((size / 10) / spans[0] / 1e6)
        lasts.append((size / 10) / spans[-1] / 1e6)
        ratios.append(lasts[-1] / firsts[-1])
med = lambda v: statistics.median(v) if v else float("nan")
first, last, ratio = med(firsts), med(lasts), med(ratios)
q = "-" if qt == "-" else f"{float(qt):.2f} s"
ratio_q = "-" if qt == "-" else f"{vt / float(qt):.2f} / {kt / float(qt):.2f}"
over = r["plan"]["overwrite_bytes"]
print(f"| {wl} | {size / 2**20:.0f} MiB ({over / size:.0%} over base data) | {vt:.2f} s | {kt:.2f} s | {rt:.2f} s | {size / vt / 1e6:.0f} MB/s | {q} | {ratio_q} | {ct:.2f} s | {vt / ct:.2f} / {kt / ct:.2f} | {vr / 1024:.1f} MiB | {r['journal_bytes'] / 2**20:.1f} MiB | {first:.0f} / {last:.0f} MB/s ({ratio:.2f}) |")
PY
}

# Each workload's files go once it has run: (f) to (h) take 8 GiB each.
for wl in $WORKLOADS; do
    prepare "$wl"; run "$wl"
    cp "$W/$wl/src/bytes" "$W/$wl.bytes"
    [ "$wl" = r ] || rm -rf "${W:?}/$wl"
done
echo "| workload | merged data | vhdmerge merge (median) | merge --keep | rm of the merged files | rate | qemu-img commit | ratio vs qemu (merge / --keep) | plain copy + fsync | ratio vs copy (merge / --keep) | vhdmerge peak RSS | journal | first / last decile (last / first) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for wl in $WORKLOADS; do [ "$wl" = r ] || report "$wl"; done
for wl in $WORKLOADS; do
    [ -f "$W/$wl-copyimg.times" ] || continue
    k=$(awk '{print $1}' "$W/$wl-keep.times" | median)
    c=$(awk '{print $1}' "$W/$wl-copyimg.times" | median)
    echo
    echo "($wl) plain copy of its merged bytes plus the base data they overwrite, once: $c s; merge --keep / that copy: $(python3 -c "print(f'{$k / $c:.2f}')")"
done
echo
echo "Space and cloning, merge --keep (the merged files stay, so cloned blocks stay shared): the file system's used bytes after minus before (settled), and the bytes the report says were cloned:"
echo
echo "| workload | merged | overwrites | used space grew | grew / merged | cloned | journal |"
echo "|---|---|---|---|---|---|---|"
for wl in $WORKLOADS; do
    [ -f "$W/$wl-space" ] || continue
    python3 - "$wl" "$W" <<'PY'
import glob, json, statistics, sys
wl, w = sys.argv[1:]
grew = statistics.median(int(l) for l in open(f"{w}/{wl}-space"))
r = json.load(open(sorted(glob.glob(f"{w}/{wl}-keep-report-*.json"))[-1]))
b, over = r["plan"]["bytes"], r["plan"]["overwrite_bytes"]
cl = r.get("sharing", {}).get("cloned_bytes", 0)
m = lambda v: f"{v / 2**20:.0f} MiB"
print(f"| {wl} | {m(b)} | {m(over)} | {grew / 2**20:.1f} MiB | {grew / b:.2f} | {m(cl)} | {r['journal_bytes'] / 2**20:.1f} MiB |")
PY
done
echo
echo "Checkpoint cost: merge --keep with the default 1 GiB checkpoints against --checkpoint-every 1T (only the last one, and the 30 s bound):"
echo
echo "| workload | default checkpoints | without | overhead |"
echo "|---|---|---|---|"
for wl in $WORKLOADS; do
    [ -f "$W/$wl-nockpt.times" ] || continue
    k=$(awk '{print $1}' "$W/$wl-keep.times" | median)
    n=$(awk '{print $1}' "$W/$wl-nockpt.times" | median)
    echo "| $wl | $k s | $n s | $(python3 -c "print(f'{$k / $n - 1:+.1%}')") |"
done
if ls "$W"/*-fonly.times > /dev/null 2>&1; then
    echo
    echo "Finish-only: \`merge --keep --finish-only\` (no before-images of overwritten data; an interrupted merge can only be finished):"
    echo
    echo "| workload | finish-only --keep (median) | ratio vs qemu-img commit | ratio vs plain copy | peak RSS | journal | first / last decile (last / first) |"
    echo "|---|---|---|---|---|---|---|"
    for wl in $WORKLOADS; do
        [ -f "$W/$wl-fonly.times" ] || continue
        python3 - "$wl" "$W" <<'PY'
import glob, json, statistics, sys
wl, w = sys.argv[1:]
col = lambda name, i: statistics.median(float(l.split()[i]) for l in open(f"{w}/{wl}-{name}.times"))
t, rss, copy = col("fonly", 0), col("fonly", 1), col("copy", 0)
try:
    q = col("qemu", 0)
    vq = f"{t / q:.2f}"
except FileNotFoundError:
    vq = "-"
size = int(open(f"{w}/{wl}.bytes").read())
ratios, firsts, lasts = [], [], []
for path in sorted(glob.glob(f"{w}/{wl}-fonly-report-*.json")):
    r = json.load(open(path))
    d = r["decile_seconds"]
    spans = [b - a for a, b in zip([0.0] + d[:-1], d)]
    if len(spans) == 10 and spans[0] > 0 and spans[-1] > 0:
        firsts.append(size / 10 / spans[0] / 1e6)
        lasts.append(size / 10 / spans[-1] / 1e6)
        ratios.append(lasts[-1] / firsts[-1])
med = lambda v: statistics.median(v) if v else float("nan")
print(f"| {wl} | {t:.2f} s | {vq} | {t / copy:.2f} | {rss / 1024:.1f} MiB | {r['journal_bytes'] / 2**20:.1f} MiB | {med(firsts):.0f} / {med(lasts):.0f} MB/s ({med(ratios):.2f}) |")
PY
    done
fi
if [[ " $WORKLOADS " == *" r "* ]]; then echo; report_resume; fi
