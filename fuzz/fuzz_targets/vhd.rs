//! Fuzz target: see `vhdmerge::fuzzing::vhd` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhdmerge::fuzzing::vhd(data);
});
