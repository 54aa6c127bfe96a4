//! Extract: run the frozen backbone once per image and cache the features on disk.
//!
//! Extraction runs the cut graph, optimized by tract, on all cores (one tract state per worker).
//! Features are cached under a key made of the backbone's SHA-256, the cut tensor and the
//! preprocessing; inside a key, each image is found by the SHA-256 of its file content, so renamed
//! or moved images hit the cache and edited ones do not. The cache file is read back through a
//! memory map and rewritten atomically (temporary file + rename), so an interrupted compile leaves
//! a usable cache.
//!
//! The cache is not trusted: each file records the digest of its key and ends with a SHA-256 of
//! everything before it, both checked on every load, so a file copied in from another key, or
//! edited (rows swapped between images, a byte flipped), is ignored with a warning and its
//! features are computed again. Verifying costs one pass over the file (milliseconds for
//! thousands of images); computing a wrong head from silently wrong features costs far more.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graft_runtime::dataset::Sample;
use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::Preprocessing;
use graft_runtime::progress::Progress;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use crate::backbone::cut::{CutBackbone, MultiCut};
use crate::backbone::import::Backbone;
use crate::error::{CompileError, Result};

mod cache_file;

pub use cache_file::ImageHash;
use cache_file::{parse as parse_cache, CACHE_HEADER_LEN};

/// Version of the cache layout and of the feature computation; bump to invalidate old caches.
const CACHE_VERSION: u32 = 2;
const CACHE_FILE: &str = "features.bin";

/// The optimized frozen graph plus the preprocessing that feeds it. Usually one cut (one
/// output); for a [`MultiCut`], one output per cut, all computed by one forward pass.
pub struct FeatureExtractor {
    plan: Arc<TypedSimplePlan>,
    preprocessing: Preprocessing,
    input_shape: Vec<usize>,
    dims: Vec<usize>,
}

/// Features of the images that could be decoded, in sample order.
#[derive(Debug, Clone, Default)]
pub struct Features {
    /// Row-major `[rows, dim]` matrix.
    pub data: Vec<f32>,
    /// Length of one feature vector.
    pub dim: usize,
    /// Label of each row.
    pub labels: Vec<usize>,
    /// Image file of each row.
    pub paths: Vec<PathBuf>,
}

impl Features {
    /// Number of feature vectors.
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The rows of `self`, then those of `other` (same dimension).
    pub fn concat(&self, other: &Features) -> Features {
        debug_assert_eq!(self.dim, other.dim);
        Features {
            data: [&self.data[..], &other.data].concat(),
            dim: self.dim,
            labels: [&self.labels[..], &other.labels].concat(),
            paths: [&self.paths[..], &other.paths].concat(),
        }
    }

    /// The `i`-th feature vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// A new set made of the given rows, in that order.
    pub fn select(&self, rows: &[usize]) -> Features {
        let mut out = Features {
            dim: self.dim,
            ..Features::default()
        };
        for &i in rows {
            out.data.extend_from_slice(self.row(i));
            out.labels.push(self.labels[i]);
            out.paths.push(self.paths[i].clone());
        }
        out
    }
}

/// What an extraction run did.
#[derive(Debug, Clone, Default)]
pub struct Extraction {
    /// The features of every decodable image.
    pub features: Features,
    /// Images that could not be read or decoded, with the error (which names the file); they are
    /// left out.
    pub failures: Vec<(PathBuf, String)>,
    /// Feature vectors taken from the cache.
    pub cache_hits: usize,
    /// Feature vectors computed by running the backbone.
    pub computed: usize,
    /// Content hash (SHA-256) of every readable image, by position in the samples.
    pub content_hashes: Vec<Option<ImageHash>>,
}

impl FeatureExtractor {
    /// Optimizes the cut graph for this CPU.
    pub fn new(cut: &CutBackbone, preprocessing: &Preprocessing) -> Result<FeatureExtractor> {
        FeatureExtractor::for_graph(
            cut.model(),
            cut.backbone().input_shape().to_vec(),
            vec![cut.feature_dim()],
            preprocessing,
        )
    }

    /// Optimizes the graph of several cuts for this CPU.
    pub fn for_cuts(
        cuts: &MultiCut,
        backbone: &Backbone,
        preprocessing: &Preprocessing,
    ) -> Result<FeatureExtractor> {
        FeatureExtractor::for_graph(
            cuts.model(),
            backbone.input_shape().to_vec(),
            cuts.cuts().iter().map(|(_, shape)| shape[1]).collect(),
            preprocessing,
        )
    }

    fn for_graph(
        model: &TypedModel,
        input_shape: Vec<usize>,
        dims: Vec<usize>,
        preprocessing: &Preprocessing,
    ) -> Result<FeatureExtractor> {
        let plan = graft_runtime::kernels::into_optimized(model.clone())
            .and_then(|m| m.into_runnable())
            .map_err(CompileError::graph("feature extraction"))?;
        Ok(FeatureExtractor {
            plan,
            preprocessing: preprocessing.clone(),
            input_shape,
            dims,
        })
    }

    /// Length of one feature vector (of the first output).
    pub fn dim(&self) -> usize {
        self.dims[0]
    }

    /// Features of one image file's bytes (the first output).
    pub fn features_of(&self, bytes: &[u8], path: &Path) -> Result<Vec<f32>> {
        Ok(self.outputs_of(bytes, path)?.swap_remove(0))
    }

    /// Features of one image file's bytes, one vector per output.
    fn outputs_of(&self, bytes: &[u8], path: &Path) -> Result<Vec<Vec<f32>>> {
        let graph = CompileError::graph("feature extraction");
        let image = self.preprocessing.decode(bytes, path)?;
        let chw = self.preprocessing.apply(&image);
        let input = Tensor::from_shape(&self.input_shape, &chw).map_err(&graph)?;
        let outputs = self.plan.run(tvec!(input.into_tvalue())).map_err(&graph)?;
        outputs
            .iter()
            .map(|out| Ok(out.view().as_slice::<f32>().map_err(&graph)?.to_vec()))
            .collect()
    }

    /// Features for every sample, taken from `cache` when present there and computed otherwise
    /// (new ones are added to the cache). Undecodable images are reported in
    /// [`Extraction::failures`] and skipped. When `progress` reports cancellation, the features
    /// computed so far are still saved to the cache before [`CompileError::Interrupted`].
    pub fn extract(
        &self,
        samples: &[Sample],
        cache: Option<&FeatureCache>,
        threads: usize,
        progress: &dyn Progress,
    ) -> Result<Extraction> {
        Ok(self
            .extract_outputs(samples, &[cache.cloned()], threads, progress)?
            .swap_remove(0))
    }

    /// [`Self::extract`] for every output at once, `caches[k]` caching output `k` (all `None`,
    /// or one per output): an image is computed unless every cache holds it.
    pub fn extract_outputs(
        &self,
        samples: &[Sample],
        caches: &[Option<FeatureCache>],
        threads: usize,
        progress: &dyn Progress,
    ) -> Result<Vec<Extraction>> {
        let outputs = self.dims.len();
        let caching = caches.len() == outputs && caches.iter().all(Option::is_some);
        let caches: Vec<&FeatureCache> = if caching {
            caches.iter().flatten().collect()
        } else {
            Vec::new()
        };
        let hashes = par_map(samples, threads, |s| hash_file(&s.path), || {});
        let cached = caches
            .iter()
            .map(|c| c.load())
            .collect::<Result<Vec<CachedFeatures>>>()?;
        let Lookup {
            mut rows,
            todo,
            hashes: hashes_ok,
        } = Lookup::of(hashes, &cached);
        let cache_hits = rows.iter().filter(|r| matches!(r, Some(Ok(_)))).count();
        progress.start("extracting features", todo.len());
        let computed = par_map(
            &todo,
            threads,
            |&i| {
                if progress.cancelled() {
                    return Err(CompileError::Interrupted);
                }
                let path = &samples[i].path;
                let bytes = graft_runtime::read::read_image_file(path)?;
                self.outputs_of(&bytes, path)
            },
            || progress.advance(),
        );
        progress.finish();
        let mut fresh: Vec<Vec<(ImageHash, Vec<f32>)>> = vec![Vec::new(); outputs];
        for (&i, result) in todo.iter().zip(computed) {
            if let (Ok(f), Some(h)) = (&result, &hashes_ok[i]) {
                for (k, features) in f.iter().enumerate() {
                    fresh[k].push((*h, features.clone()));
                }
            }
            rows[i] = Some(result);
        }
        for ((cache, old), fresh) in caches.iter().zip(&cached).zip(&fresh) {
            if !fresh.is_empty() {
                if let Err(e) = cache.store(old, fresh) {
                    graft_runtime::progress::note(format_args!(
                        "warning: features not cached: {e}"
                    ));
                }
            }
        }
        if progress.cancelled() {
            return Err(CompileError::Interrupted);
        }
        let extractions: Vec<Extraction> = self
            .dims
            .iter()
            .zip(&fresh)
            .map(|(&dim, fresh)| Extraction {
                features: Features {
                    dim,
                    ..Features::default()
                },
                cache_hits,
                computed: fresh.len(),
                content_hashes: hashes_ok.clone(),
                ..Extraction::default()
            })
            .collect();
        assemble(extractions, samples, rows)
    }
}

/// The features of one image at every output, or why it has none.
type Row = Option<Result<Vec<Vec<f32>>>>;

/// Appends each sample's row to every output's extraction, or records why it failed (a user
/// error: an undecodable or unreadable image; anything else stops the extraction).
fn assemble(
    mut extractions: Vec<Extraction>,
    samples: &[Sample],
    rows: Vec<Row>,
) -> Result<Vec<Extraction>> {
    for (sample, row) in samples.iter().zip(rows) {
        match row.expect("every row is filled") {
            Ok(per_output) => {
                for (extraction, f) in extractions.iter_mut().zip(per_output) {
                    extraction.features.data.extend_from_slice(&f);
                    extraction.features.labels.push(sample.label);
                    extraction.features.paths.push(sample.path.clone());
                }
            }
            Err(e) => {
                let message = match e {
                    CompileError::Runtime(e) if e.is_user_error() => e.to_string(),
                    e @ CompileError::Io { .. } => e.to_string(),
                    e => return Err(e),
                };
                for extraction in &mut extractions {
                    extraction
                        .failures
                        .push((sample.path.clone(), message.clone()));
                }
            }
        }
    }
    Ok(extractions)
}

/// What the cache already holds for a list of images.
struct Lookup {
    /// Per image: the cached rows (a hit), the hashing error, or `None` (to compute).
    rows: Vec<Row>,
    /// The images to compute.
    todo: Vec<usize>,
    /// Per image, its content hash (`None` when it could not be read).
    hashes: Vec<Option<ImageHash>>,
}

impl Lookup {
    /// Looks each image up in every cache; a hit needs all of them (no cache: no hit).
    fn of(hashes: Vec<Result<ImageHash>>, cached: &[CachedFeatures]) -> Lookup {
        let mut lookup = Lookup {
            rows: Vec::with_capacity(hashes.len()),
            todo: Vec::new(),
            hashes: Vec::with_capacity(hashes.len()),
        };
        for (i, hash) in hashes.into_iter().enumerate() {
            match hash {
                Ok(h) => {
                    let hits: Option<Vec<Vec<f32>>> = match cached.is_empty() {
                        true => None,
                        false => cached.iter().map(|c| c.get(&h)).collect(),
                    };
                    match hits {
                        Some(f) => lookup.rows.push(Some(Ok(f))),
                        None => {
                            lookup.rows.push(None);
                            lookup.todo.push(i);
                        }
                    }
                    lookup.hashes.push(Some(h));
                }
                Err(e) => {
                    lookup.rows.push(Some(Err(e)));
                    lookup.hashes.push(None);
                }
            }
        }
        lookup
    }
}

fn hash_file(path: &Path) -> Result<ImageHash> {
    let bytes = graft_runtime::read::read_image_file(path)?;
    Ok(Sha256::digest(&bytes).into())
}

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
        let bytes = cache_file::encode(self.dim, &self.key_digest, &hashes, &data);
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
