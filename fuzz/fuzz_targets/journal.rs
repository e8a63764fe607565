//! Fuzz target: see `vhdmerge::fuzzing::journal` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhdmerge::fuzzing::journal(data);
});
