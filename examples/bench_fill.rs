//! Fills the top of a chain for the benchmarks (bench/run.sh), and writes
//! the same ranges as qemu-io commands so a qcow2 overlay can hold the
//! same data.
//!
//! usage: bench_fill DISK whole|scattered BYTES SEED QEMU_IO_COMMANDS_OUT [SHIFT]
//!   whole:     4 MiB writes, aligned, spread evenly over the disk
//!   scattered: 4 KiB writes at random 4 KiB-aligned offsets
//!   SHIFT:     bytes added to every offset (modulo the disk size), so that
//!              the levels of a chain can write distinct ranges

use std::io::Write;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&a[1]);
    let whole = a[2] == "whole";
    let bytes: u64 = a[3].parse().unwrap();
    let mut seed: u64 = a[4].parse().unwrap();
    let mut cmds = std::io::BufWriter::new(std::fs::File::create(&a[5]).unwrap());
    let shift: u64 = a.get(6).map_or(0, |s| s.parse().unwrap());
    let mut chain = vhdmerge::Chain::open(
        path,
        &vhdmerge::ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let size = chain.virtual_size();
    let mut next = || vhdmerge::guid::splitmix64(&mut seed);
    let unit: u64 = if whole { 4 << 20 } else { 4096 };
    let count = bytes / unit;
    let mut since = 0u64;
    for i in 0..count {
        let off = if whole {
            (i * (size / unit) / count) * unit
        } else {
            next() % (size / unit) * unit
        };
        let off = (off + shift) % size;
        let fill = (next() % 250 + 1) as u8;
        chain.write(off, &vec![fill; unit as usize]).unwrap();
        writeln!(cmds, "write -P {fill} {off} {unit}").unwrap();
        since += unit;
        if since >= 64 << 20 {
            chain.commit().unwrap();
            since = 0;
        }
    }
    chain.close().unwrap();
}
