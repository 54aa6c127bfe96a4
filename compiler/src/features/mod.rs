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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use graft_runtime::dataset::Sample;
use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::Preprocessing;
use graft_runtime::progress::Progress;
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use crate::backbone::cut::{CutBackbone, MultiCut};
use crate::backbone::import::Backbone;
use crate::error::{CompileError, Result};

mod cache;
mod cache_file;

pub use cache::{CachedFeatures, FeatureCache};
pub use cache_file::ImageHash;

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
