//! Property tests: random writes through the library into random chains
//! (depth, format, block and sector sizes) read back equal to an in-memory
//! model of the guest disk, at every level of the chain.

mod common;

use proptest::prelude::*;
use vhdmerge::disk::create::{self, VhdOptions, VhdxOptions};
use vhdmerge::{Chain, ChainOptions};

#[derive(Debug, Clone)]
struct Level {
    block_shift: u32,
    writes: Vec<(u64, u64, u8)>,
}

fn level() -> impl Strategy<Value = Level> {
    (
        0u32..4,
        prop::collection::vec((0u64..1_000_000, 1u64..400_000, 1u8..255), 0..6),
    )
        .prop_map(|(block_shift, writes)| Level {
            block_shift,
            writes,
        })
}

fn run_case(
    vhdx: bool,
    sector4k: bool,
    size_mib: u64,
    levels: &[Level],
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let size = size_mib << 20;
    let ls = if vhdx && sector4k { 4096 } else { 512 };
    let mut model = vec![0u8; size as usize];
    let mut snapshots: Vec<Vec<u8>> = Vec::new();
    let mut paths: Vec<std::path::PathBuf> = Vec::new();
    for (i, lv) in levels.iter().enumerate() {
        let path = dir
            .path()
            .join(format!("l{i}.{}", if vhdx { "vhdx" } else { "vhd" }));
        if i == 0 {
            if vhdx {
                let bs = 1u64 << (20 + lv.block_shift);
                create::create_vhdx(
                    &path,
                    &VhdxOptions {
                        virtual_size: size,
                        block_size: bs,
                        logical_sector: ls,
                        ..Default::default()
                    },
                )
                .unwrap();
            } else {
                let bs = 1u64 << (19 + lv.block_shift);
                create::create_vhd(
                    &path,
                    &VhdOptions {
                        size,
                        block_size: bs,
                        fixed: false,
                    },
                )
                .unwrap();
            }
        } else {
            let bs = if vhdx {
                1u64 << (20 + lv.block_shift)
            } else {
                1u64 << (19 + lv.block_shift)
            };
            create::create_child(&path, &paths[i - 1], Some(bs)).unwrap();
        }
        let mut chain = common::open_writable(&path);
        for &(off, len, fill) in &lv.writes {
            let off = (off * 37) % size;
            let len = len.min(size - off);
            let data = vec![fill; len as usize];
            chain.write(off, &data).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        chain.close().unwrap();
        drop(chain);
        snapshots.push(model.clone());
        paths.push(path);
    }
    // Every level reads as the model did right after its writes.
    for (i, path) in paths.iter().enumerate() {
        let chain = Chain::open(path, &ChainOptions::default()).unwrap();
        prop_assert_eq!(chain.layers.len(), i + 1);
        let mut got = vec![0u8; size as usize];
        chain.read(0, &mut got).unwrap();
        prop_assert!(
            got == snapshots[i],
            "level {} of {:?} differs from the model",
            i,
            levels
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn vhdx_chains_match_the_model(sector4k in any::<bool>(), size_mib in 3u64..40, levels in prop::collection::vec(level(), 1..5)) {
        run_case(true, sector4k, size_mib, &levels)?;
    }

    #[test]
    fn vhd_chains_match_the_model(size_mib in 3u64..40, levels in prop::collection::vec(level(), 1..5)) {
        run_case(false, false, size_mib, &levels)?;
    }
}
