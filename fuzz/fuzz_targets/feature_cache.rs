//! Any bytes given to the feature-cache reader (the very file the compiler reads with,
//! `compiler/src/features/cache_file.rs`): a reason to ignore them or an index whose every row
//! lies inside the file, never a panic or an allocation beyond the input. Each input is tried as
//! it is and with its trailing checksum recomputed (so mutations reach the checks after it), for
//! the dimension and key its header claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[path = "../../compiler/src/features/cache_file.rs"]
#[allow(dead_code)]
mod cache_file;

fn check(bytes: &[u8]) {
    if bytes.len() < cache_file::CACHE_HEADER_LEN {
        let _ = cache_file::parse(bytes, 1, &[0; 32]);
        return;
    }
    let dim = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let key: [u8; 32] = bytes[24..56].try_into().unwrap();
    for dim in [dim, dim.wrapping_add(1), 1] {
        if let Ok(index) = cache_file::parse(bytes, dim, &key) {
            let rows = index.len();
            let end = cache_file::CACHE_HEADER_LEN + rows * 32 + rows * dim * 4;
            assert!(end + 32 == bytes.len(), "rows inside the file");
            assert!(index.values().all(|&row| row < rows), "row numbers in range");
            // What parses re-encodes to the same bytes.
            let hashes: Vec<[u8; 32]> = {
                let mut h = vec![[0u8; 32]; rows];
                for (hash, &row) in &index {
                    h[row] = *hash;
                }
                h
            };
            let data: Vec<f32> = bytes[cache_file::CACHE_HEADER_LEN + rows * 32..end]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let again = cache_file::encode(dim, &key, &hashes, &data);
            assert!(again == bytes, "round trip");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() > 32 {
        let mut resealed = data.to_vec();
        let body = resealed.len() - 32;
        let sum = Sha256::digest(&resealed[..body]);
        resealed[body..].copy_from_slice(&sum);
        check(&resealed);
    }
});
