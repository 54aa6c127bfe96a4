//! Any bytes given to the normalisation-probe cache reader (the very file the compiler reads
//! with, `compiler/src/backbone/probe/result.rs`): `None`, or a result whose chosen normalisation can be
//! built, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../compiler/src/backbone/probe/result.rs"]
#[allow(dead_code)]
mod result;

fuzz_target!(|data: &[u8]| {
    if let Some(cached) = result::ProbeResult::from_cache(data) {
        let normalization = cached.normalization();
        assert!(normalization.std.iter().all(|s| *s > 0.0));
    }
});
