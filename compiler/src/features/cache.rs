//! The feature cache: features of each image, keyed by the image's content hash, stored per
//! (backbone, cut, preprocessing) in one checksummed file (its format in `cache_file.rs`), so a
//! second compile, or the compile after `graft advise`, reads them instead of running the
//! backbone again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use graft_runtime::preprocess::Preprocessing;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::cache_file::{parse as parse_cache, ImageHash, CACHE_HEADER_LEN};
use crate::backbone::cut::CutBackbone;
use crate::backbone::import::Backbone;
use crate::error::{CompileError, Result};

/// Version of the cache layout and of the feature computation; bump to invalidate old caches.
const CACHE_VERSION: u32 = 2;
const CACHE_FILE: &str = "features.bin";

/// The on-disk feature store for one (backbone, cut, preprocessing) key.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
    dim: usize,
    key_digest: [u8; 32],
}

#[derive(Serialize)]
struct CacheKey<'a> {
    version: u32,
    backbone_sha256: &'a str,
    cut: &'a str,
    preprocessing: &'a Preprocessing,
}

/// Cached features loaded from disk, keyed by image hash.
#[derive(Debug, Default)]
pub struct CachedFeatures {
    map: Option<memmap2::Mmap>,
    dim: usize,
    index: HashMap<ImageHash, usize>,
}

impl CachedFeatures {
    /// The cached features of the image with this content hash.
    pub fn get(&self, hash: &ImageHash) -> Option<Vec<f32>> {
        let row = *self.index.get(hash)?;
        let map = self.map.as_ref()?;
        let start = CACHE_HEADER_LEN + self.index.len() * 32 + row * self.dim * 4;
        Some(
            map[start..start + self.dim * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        )
    }

    /// Number of cached feature vectors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

impl FeatureCache {
    /// The cache for `cut` + `preprocessing` under `root` (created if missing); `None`, with a
    /// warning, when that folder cannot be created or written (a read-only home, a full disk):
    /// the compile then runs without a cache instead of failing.
    pub fn new(
        root: &Path,
        cut: &CutBackbone,
        preprocessing: &Preprocessing,
    ) -> Option<FeatureCache> {
        FeatureCache::for_tensor(
            root,
            (cut.backbone(), cut.cut_name(), cut.feature_dim()),
            preprocessing,
        )
    }

    /// The cache for the `dim`-wide features of the backbone cut at tensor `cut`; the same cache
    /// [`FeatureCache::new`] opens for that cut.
    pub fn for_tensor(
        root: &Path,
        (backbone, cut, dim): (&Backbone, &str, usize),
        preprocessing: &Preprocessing,
    ) -> Option<FeatureCache> {
        let key = CacheKey {
            version: CACHE_VERSION,
            backbone_sha256: backbone.sha256(),
            cut,
            preprocessing,
        };
        let key_json = serde_json::to_string_pretty(&key).expect("key serializes");
        let key_digest: [u8; 32] = Sha256::digest(key_json.as_bytes()).into();
        let digest = graft_runtime::artifact::hex(&key_digest);
        let dir = root.join(&digest[..24]);
        let key_path = dir.join("key.json");
        let ready = std::fs::create_dir_all(&dir)
            .map_err(|e| CompileError::io(&dir, e))
            .and_then(|()| {
                if key_path.exists() {
                    Ok(graft_runtime::artifact::check_writable(&key_path)?)
                } else {
                    Ok(graft_runtime::artifact::write_atomic(
                        &key_path,
                        key_json.as_bytes(),
                    )?)
                }
            });
        if let Err(e) = ready {
            graft_runtime::progress::note(format_args!(
                "warning: running without a feature cache: {e}"
            ));
            return None;
        }
        Some(FeatureCache {
            dir,
            dim,
            key_digest,
        })
    }

    /// The folder holding this key's features.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Memory-maps the cached features. A missing file is an empty cache; one that fails a
    /// check (magic, size, key, checksum) is ignored with a warning and replaced at the next
    /// store.
    pub fn load(&self) -> Result<CachedFeatures> {
        let path = self.dir.join(CACHE_FILE);
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CachedFeatures::default())
            }
            Ok(meta) if !meta.is_file() => {
                self.warn_ignored(&path, "not a regular file");
                return Ok(CachedFeatures::default());
            }
            _ => {}
        }
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(CachedFeatures::default())
            }
            Err(e) => return Err(CompileError::io(&path, e)),
        };
        // SAFETY: read-only private map; the file is only ever replaced by rename, never written
        // in place, so its content cannot change under the map.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CompileError::io(&path, e))?;
        match parse_cache(&map, self.dim, &self.key_digest) {
            Ok(index) => Ok(CachedFeatures {
                map: Some(map),
                dim: self.dim,
                index,
            }),
            Err(reason) => {
                self.warn_ignored(&path, reason);
                Ok(CachedFeatures::default())
            }
        }
    }

    fn warn_ignored(&self, path: &Path, reason: &str) {
        graft_runtime::progress::note(format_args!(
            "warning: ignoring feature cache {}: {reason} (its features are computed again)",
            path.display()
        ));
    }

    /// Writes `old` plus `fresh` as the new cache file, atomically.
    pub fn store(&self, old: &CachedFeatures, fresh: &[(ImageHash, Vec<f32>)]) -> Result<()> {
        let mut hashes: Vec<ImageHash> = Vec::new();
        let mut data: Vec<f32> = Vec::new();
        let mut old_rows: Vec<(&ImageHash, &usize)> = old.index.iter().collect();
        old_rows.sort_by_key(|(_, row)| **row);
        for (hash, _) in old_rows {
            hashes.push(*hash);
            data.extend(old.get(hash).expect("indexed row"));
        }
        let mut seen: std::collections::HashSet<ImageHash> = hashes.iter().copied().collect();
        for (hash, f) in fresh {
            if seen.insert(*hash) {
                hashes.push(*hash);
                data.extend_from_slice(f);
            }
        }
        let bytes = super::cache_file::encode(self.dim, &self.key_digest, &hashes, &data);
        graft_runtime::artifact::write_atomic(&self.dir.join(CACHE_FILE), &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_file_round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cache = FeatureCache {
            dir: dir.path().to_path_buf(),
            dim: 3,
            key_digest: [7; 32],
        };
        assert!(cache.load().unwrap().is_empty());
        cache
            .store(
                &CachedFeatures::default(),
                &[([1; 32], vec![1.0, 2.0, 3.0])],
            )
            .unwrap();
        let first = cache.load().unwrap();
        cache
            .store(
                &first,
                &[([2; 32], vec![4.0, 5.0, 6.0]), ([1; 32], vec![9.0; 3])],
            )
            .unwrap();
        let loaded = cache.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded.get(&[1; 32]).unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(loaded.get(&[2; 32]).unwrap(), [4.0, 5.0, 6.0]);
        assert!(loaded.get(&[3; 32]).is_none());

        let path = dir.path().join(CACHE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(cache.load().unwrap().is_empty());

        // The two rows swapped (each image gets the other's features): the checksum catches it.
        let mut swapped = bytes.clone();
        let rows = CACHE_HEADER_LEN + 2 * 32;
        let (a, b) = swapped[rows..rows + 24].split_at_mut(12);
        a.swap_with_slice(b);
        assert_eq!(
            parse_cache(&swapped, 3, &[7; 32]),
            Err("checksum mismatch (the file was changed)")
        );
        // Another key's file copied in.
        assert_eq!(
            parse_cache(&bytes, 3, &[8; 32]),
            Err("it belongs to another backbone, cut or preprocessing")
        );
        assert_eq!(parse_cache(&bytes, 3, &[7; 32]).map(|i| i.len()), Ok(2));
        assert!(parse_cache(&bytes, 4, &[7; 32]).is_err());
    }
}
