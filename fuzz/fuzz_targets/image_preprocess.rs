//! Any bytes given to the image decoder, then preprocessing: an error or a tensor, never a panic
//! or an unbounded allocation.
#![no_main]

use graft_runtime::preprocess::{decode_image, Normalization, Preprocessing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = decode_image(data, std::path::Path::new("fuzz")) else {
        return;
    };
    let preprocessing = Preprocessing::for_input(16, 16, Normalization::imagenet());
    let tensor = preprocessing.apply(&image);
    assert_eq!(tensor.len(), 3 * 16 * 16);
    assert!(tensor.iter().all(|v| v.is_finite()));
});
