//! Writes a pattern into the top of a chain (or marks a VHDX block ZERO):
//! a small tool for trying things by hand.
//! usage: scratch_write DISK OFFSET LEN | scratch_write DISK zero BLOCK
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&a[1]);
    if a[2] == "zero" {
        let mut d = vhdmerge::disk::vhdx::VhdxDisk::open(path, true).unwrap();
        d.set_zero(a[3].parse().unwrap()).unwrap();
        vhdmerge::disk::Layer::close(&mut d).unwrap();
        return;
    }
    let mut c = vhdmerge::Chain::open(
        path,
        &vhdmerge::ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let off: u64 = a[2].parse().unwrap();
    let len: usize = a[3].parse().unwrap();
    c.write(off, &vec![0xAB; len]).unwrap();
    c.close().unwrap();
}
