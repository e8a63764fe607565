fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut c = vhdmerge::Chain::open(
        std::path::Path::new(&a[1]),
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
