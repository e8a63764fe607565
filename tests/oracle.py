#!/usr/bin/env python3
"""Independent readers as test oracles.

usage: oracle.py dissect|libvhdi OUT.raw TOP [PARENT ...]

Reads the guest-visible disk of TOP (with its parents, base last) through
dissect.hypervisor or libvhdi (pyvhdi) and writes it to OUT.raw as a sparse
file, so the Rust tests can compare digests.
"""
import sys
from pathlib import Path


def partial_runs(bitmap, start_idx, length):
    """(present, count) runs of `length` sector-bitmap bits from bit
    `start_idx` of `bitmap` (LSB first), as dissect's _iter_partial_runs.

    dissect 3.21's own version drops bits when a run starts inside a byte
    that mixes present and absent sectors: it stops at bit min(length, 8)
    instead of start_idx + length, and does not restart at bit 0 in the
    next byte, so `read` returns fewer bytes than asked (f(b"\xf0", 2, 4)
    gives [(0, 2)], not [(0, 2), (1, 2)]). A partly present block read
    through its parent at a sector that is not a multiple of 8 hits it.
    Only this helper is replaced; dissect still finds every block, bitmap
    and parent itself.
    """
    runs = []
    for k in range(start_idx, start_idx + length):
        bit = (bitmap[k // 8] >> (k % 8)) & 1
        if runs and runs[-1][0] == bit:
            runs[-1][1] += 1
        else:
            runs.append([bit, 1])
    return [tuple(r) for r in runs]


def split_reads(read_sectors):
    """Wraps dissect's VHDX.read_sectors so that each call it makes stays
    inside one block and, when it starts inside a sector-bitmap byte, ends
    at that byte's last sector.

    dissect 3.21 reads ceil(count / 8) bitmap bytes from the byte holding
    the first sector, one byte short when the run starts at bit b > 0 and
    b + count reaches past those bytes (sectors 3..10 need bits 3..10, two
    bytes; it reads one). Parent reads start wherever a child's run of
    absent sectors starts, so they hit it. It also takes min(count, sectors per
    block) sectors from the first block without stopping at the block's
    end. The pieces below are reads dissect handles as it is.
    """

    def wrapped(self, sector, count):
        parts = []
        while count > 0:
            n = min(count, self._sectors_per_block - sector % self._sectors_per_block)
            if sector % 8:
                n = min(n, 8 - sector % 8)
            parts.append(read_sectors(self, sector, n))
            sector += n
            count -= n
        return b"".join(parts)

    return wrapped


def open_dissect(top):
    if top.lower().endswith((".vhd", ".avhd")):
        from dissect.hypervisor.disk.vhd import VHD

        d = VHD(open(top, "rb"))
    else:
        from dissect.hypervisor.disk import vhdx
        from dissect.hypervisor.disk.vhdx import VHDX

        vhdx._iter_partial_runs = partial_runs
        VHDX.read_sectors = split_reads(VHDX.read_sectors)
        d = VHDX(Path(top))
    size = d.size

    def read(off, n):
        d.seek(off)
        return d.read(n)

    return size, read


def open_libvhdi(top, parents):
    import pyvhdi

    files = []
    for p in [top] + parents:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    # Attach from the base up, so every parent can already read through.
    for i in reversed(range(len(files) - 1)):
        files[i].set_parent(files[i + 1])
    size = files[0].media_size

    def read(off, n):
        return files[0].read_buffer_at_offset(n, off)

    return size, read


def main():
    reader, out, top, *parents = sys.argv[1:]
    if reader == "dissect":
        size, read = open_dissect(top)
    elif reader == "libvhdi":
        size, read = open_libvhdi(top, parents)
    else:
        sys.exit(f"unknown reader {reader}")
    step = 64 << 10
    with open(out, "wb") as o:
        o.truncate(size)
        pos = 0
        while pos < size:
            n = min(step, size - pos)
            b = read(pos, n)
            if len(b) != n:
                sys.exit(f"{reader}: short read at {pos}: {len(b)} of {n}")
            if b.count(0) != n:
                o.seek(pos)
                o.write(b)
            pos += n
    print(size)


if __name__ == "__main__":
    main()
