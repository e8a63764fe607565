//! Fuzz target: see `vhdmerge::fuzzing::vhdx` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhdmerge::fuzzing::vhdx(data);
});
