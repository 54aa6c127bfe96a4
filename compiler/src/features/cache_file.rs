//! The feature cache's file format: what [`super::FeatureCache`] writes and reads back.
//!
//! One file per cache key: magic `GRAFTFC2`, feature dimension (u32), reserved (u32), row count
//! (u64), the SHA-256 of the key, then one 32-byte image hash per row, then the rows' `f32`
//! values (little-endian), and last the SHA-256 of everything before it. [`parse`] checks every
//! part before a row is used, so a damaged, edited or foreign file is refused with a reason.
//!
//! Kept free of graft's other modules (std and sha2 only) so that the fuzz target
//! `fuzz/fuzz_targets/feature_cache.rs` compiles this very file.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// SHA-256 of an image file's content.
pub type ImageHash = [u8; 32];

const MAGIC: [u8; 8] = *b"GRAFTFC2";
/// Magic, dimension (u32), reserved (u32), row count (u64), key digest (32 bytes).
pub const CACHE_HEADER_LEN: usize = 56;
/// The SHA-256 of the rest of the file, at its end.
const CHECKSUM_LEN: usize = 32;

/// The file holding `hashes[i]`'s features at `data[i * dim..(i + 1) * dim]`, under the key
/// whose digest is `key_digest`.
pub fn encode(dim: usize, key_digest: &[u8; 32], hashes: &[ImageHash], data: &[f32]) -> Vec<u8> {
    assert_eq!(
        data.len(),
        hashes.len() * dim,
        "one row of {dim} values per hash"
    );
    let mut bytes =
        Vec::with_capacity(CACHE_HEADER_LEN + hashes.len() * (32 + dim * 4) + CHECKSUM_LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&(dim as u32).to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
    bytes.extend_from_slice(key_digest);
    for h in hashes {
        bytes.extend_from_slice(h);
    }
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let checksum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&checksum);
    bytes
}

/// The row index of a cache file for features of `dim` values under the key `key_digest`, or
/// what is wrong with it.
pub fn parse(
    bytes: &[u8],
    dim: usize,
    key_digest: &[u8; 32],
) -> std::result::Result<HashMap<ImageHash, usize>, &'static str> {
    if bytes.len() < CACHE_HEADER_LEN + CHECKSUM_LEN || bytes[..8] != MAGIC {
        return Err("not a feature cache of this graft version");
    }
    let file_dim = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let expected =
        (count as u128) * (32 + dim as u128 * 4) + (CACHE_HEADER_LEN + CHECKSUM_LEN) as u128;
    if file_dim != dim || expected != bytes.len() as u128 {
        return Err("its size does not match its header");
    }
    if bytes[12..16] != [0; 4] {
        // Found by fuzzing: a file accepted with other bytes here would not be the file
        // `encode` writes for the same rows.
        return Err("its reserved header field is not zero");
    }
    if bytes[24..56] != key_digest[..] {
        return Err("it belongs to another backbone, cut or preprocessing");
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if Sha256::digest(body)[..] != checksum[..] {
        return Err("checksum mismatch (the file was changed)");
    }
    let hashes = &bytes[CACHE_HEADER_LEN..CACHE_HEADER_LEN + count as usize * 32];
    let index: HashMap<ImageHash, usize> = hashes
        .chunks_exact(32)
        .enumerate()
        .map(|(row, h)| (h.try_into().expect("32 bytes"), row))
        .collect();
    if index.len() != count as usize {
        return Err("an image appears twice");
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzz target `feature_cache` found (`fixtures/fuzz-regressions`): each is
    /// refused, or parses to exactly what `encode` writes.
    #[test]
    fn fuzz_regressions_are_refused() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fuzz-regressions");
        let bytes = std::fs::read(dir.join("feature-cache-reserved-field.bin")).unwrap();
        let key: [u8; 32] = bytes[24..56].try_into().unwrap();
        assert_eq!(
            parse(&bytes, 4, &key),
            Err("its reserved header field is not zero")
        );
        let mut fixed = bytes.clone();
        fixed[12..16].fill(0);
        let body = fixed.len() - CHECKSUM_LEN;
        let sum = Sha256::digest(&fixed[..body]);
        fixed[body..].copy_from_slice(&sum);
        let index = parse(&fixed, 4, &key).unwrap();
        assert_eq!(index.len(), 3);
    }
}
