//! Any bytes given to the image decoders (full size, and the fast pipeline's reduced-scale
//! libjpeg-turbo path), then preprocessing: an error or a tensor, never a panic or an unbounded
//! allocation.
#![no_main]

use graft_runtime::preprocess::{decode_image, Normalization, Preprocessing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz");
    // The fast pipeline: a sequential JPEG larger than 18 pixels is decoded at reduced scale.
    let preprocessing = Preprocessing::for_input(16, 16, Normalization::imagenet());
    let decoded = [decode_image(data, path), preprocessing.decode(data, path)];
    for image in decoded.iter().flatten() {
        let tensor = preprocessing.apply(image);
        assert_eq!(tensor.len(), 3 * 16 * 16);
        assert!(tensor.iter().all(|v| v.is_finite()));
    }
});
