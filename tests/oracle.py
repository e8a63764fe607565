#!/usr/bin/env python3
"""Independent readers as test oracles.

usage: oracle.py dissect|libvhdi OUT.raw TOP [PARENT ...]

Reads the guest-visible disk of TOP (with its parents, base last) through
dissect.hypervisor or libvhdi (pyvhdi) and writes it to OUT.raw as a sparse
file, so the Rust tests can compare digests.
"""
import sys
from pathlib import Path


def open_dissect(top):
    if top.lower().endswith((".vhd", ".avhd")):
        from dissect.hypervisor.disk.vhd import VHD

        d = VHD(open(top, "rb"))
    else:
        from dissect.hypervisor.disk.vhdx import VHDX

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
    # dissect returned short reads for some multi-megabyte reads that span
    # levels with different block sizes; 64 KiB reads are exact.
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
