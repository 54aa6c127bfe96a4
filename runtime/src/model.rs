//! A loaded artifact, ready to classify images.
//!
//! [`Model::load`] memory-maps the artifact, validates it, deserializes the NNEF graph with
//! tract-nnef and optimizes it for this CPU. One `Model` can be shared by many threads: each call
//! to [`Model::classify`] runs with its own state.

use std::path::Path;
use std::sync::Arc;

use image::DynamicImage;
use serde::Serialize;
use tract_core::prelude::*;

use crate::artifact::{Artifact, Manifest};
use crate::error::{Error, Result};

/// A validated artifact with its graph optimized and ready to run.
#[derive(Debug)]
pub struct Model {
    artifact: Artifact,
    plan: Arc<TypedSimplePlan>,
    load_timings: LoadTimings,
}

/// Where the time of [`Model::load`] went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LoadTimings {
    /// Memory-mapping the file and checking header, checksum, manifest and archive.
    pub validate: f64,
    /// Deserializing the NNEF graph.
    pub parse: f64,
    /// tract's optimisation for this CPU and plan building.
    pub optimize: f64,
}

/// The model's answer for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    /// Softmax probabilities, one per label.
    pub probabilities: Vec<f32>,
    /// Raw scores before the softmax, one per label.
    pub logits: Vec<f32>,
}

/// One entry of a top-k list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelScore {
    /// Index of the class in the model's labels.
    pub index: usize,
    /// Class name.
    pub label: String,
    /// Probability of the class.
    pub probability: f32,
}

impl Classification {
    /// Index of the most probable class (the first one on ties).
    pub fn top1(&self) -> usize {
        self.ranked()[0]
    }

    /// The `k` most probable classes, most probable first.
    pub fn top_k(&self, k: usize, labels: &[String]) -> Vec<LabelScore> {
        self.ranked()
            .into_iter()
            .take(k)
            .map(|index| LabelScore {
                index,
                label: labels[index].clone(),
                probability: self.probabilities[index],
            })
            .collect()
    }

    fn ranked(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.probabilities.len()).collect();
        order.sort_by(|&a, &b| {
            self.probabilities[b]
                .total_cmp(&self.probabilities[a])
                .then(a.cmp(&b))
        });
        order
    }
}

/// How a graph is prepared for running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Swap in graft's kernels where tract is slow ([`crate::kernels`]); off gives tract's own
    /// operators, for comparison.
    pub graft_kernels: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            graft_kernels: true,
        }
    }
}

impl Model {
    /// Loads, validates and prepares the artifact at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Self::load_with(path, LoadOptions::default())
    }

    /// [`Model::load`] with explicit options.
    pub fn load_with(path: impl AsRef<Path>, options: LoadOptions) -> Result<Model> {
        // tract's NNEF reader parses its standard library when created (~10 ms); do that on a
        // second thread while this one maps and validates the file.
        let (artifact, nnef, validate) = std::thread::scope(|scope| {
            let reader = scope.spawn(tract_nnef::nnef);
            let started = std::time::Instant::now();
            let artifact = Artifact::open(path);
            let validate = started.elapsed().as_secs_f64();
            (
                artifact,
                reader.join().expect("NNEF reader setup panicked"),
                validate,
            )
        });
        let mut model = Self::prepare(artifact?, &nnef, options)?;
        model.load_timings.validate = validate;
        Ok(model)
    }

    /// How long loading took, stage by stage (`validate` is zero when the artifact was opened
    /// separately).
    pub fn load_timings(&self) -> LoadTimings {
        self.load_timings
    }

    /// Prepares an already validated artifact.
    ///
    /// A graph that makes tract panic (fuzzing found malformed NNEF that does) is reported as
    /// [`Error::InvalidGraph`] instead of bringing the process down; this needs the default
    /// `panic = "unwind"`.
    pub fn from_artifact(artifact: Artifact) -> Result<Model> {
        Self::prepare(artifact, &tract_nnef::nnef(), LoadOptions::default())
    }

    fn prepare(
        artifact: Artifact,
        nnef: &tract_nnef::framework::Nnef,
        options: LoadOptions,
    ) -> Result<Model> {
        let invalid = |reason: String| Error::InvalidGraph {
            path: artifact.path.clone(),
            reason,
        };
        let mut load_timings = LoadTimings::default();
        let prepare = || -> std::result::Result<Arc<TypedSimplePlan>, String> {
            let started = std::time::Instant::now();
            let archive = crate::weights::widen(artifact.graph_bytes())?;
            let graph = nnef
                .model_for_read(&mut &archive[..])
                .map_err(|e| format!("{e:#}"))?;
            check_graph(&graph, &artifact.manifest)?;
            load_timings.parse = started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            // The compiler decluttered the graph before writing it, so only tract's CPU-specific
            // optimisation runs here (skipping a second declutter saves ~40 % of this step).
            let mut graph = graph;
            if options.graft_kernels {
                crate::kernels::use_graft_kernels(&mut graph).map_err(|e| format!("{e:#}"))?;
            }
            let plan = graph
                .optimize()
                .and_then(|_| graph.into_runnable())
                .map_err(|e| format!("{e:#}"));
            load_timings.optimize = started.elapsed().as_secs_f64();
            plan
        };
        let plan = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(prepare)) {
            Ok(result) => result.map_err(invalid)?,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(invalid(format!(
                    "tract panicked while reading it: {message}"
                )));
            }
        };
        Ok(Model {
            artifact,
            plan,
            load_timings,
        })
    }

    /// The artifact's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.artifact.manifest
    }

    /// The artifact this model was loaded from.
    pub fn artifact(&self) -> &Artifact {
        &self.artifact
    }

    /// Class names, in output order.
    pub fn labels(&self) -> &[String] {
        &self.artifact.manifest.labels
    }

    /// Runs the graph on one preprocessed CHW tensor (see [`crate::Preprocessing::apply`]).
    pub fn classify_tensor(&self, chw: &[f32]) -> Result<Classification> {
        let shape = &self.manifest().input.shape;
        let input = Tensor::from_shape(shape, chw).map_err(|e| {
            Error::Inference(format!(
                "input of {} values for shape {shape:?}: {e}",
                chw.len()
            ))
        })?;
        let outputs = self
            .plan
            .run(tvec!(input.into_tvalue()))
            .map_err(|e| Error::Inference(format!("{e:#}")))?;
        let read = |ix: usize| -> Result<Vec<f32>> {
            outputs[ix]
                .view()
                .as_slice::<f32>()
                .map(|s| s.to_vec())
                .map_err(|e| Error::Inference(format!("reading output {ix}: {e:#}")))
        };
        let classification = Classification {
            probabilities: read(0)?,
            logits: read(1)?,
        };
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&classification.probabilities) || !finite(&classification.logits) {
            // NaN weights, or activations that overflow: no label can be trusted.
            return Err(Error::NonFiniteOutput {
                path: self.artifact.path.clone(),
            });
        }
        Ok(classification)
    }

    /// Classifies several preprocessed CHW tensors on `threads` threads sharing this model's plan,
    /// results in input order. The graph stays batch-1: in tract 0.23 one batch-8 run costs more
    /// per image than eight batch-1 runs, so a batch is spread across cores instead.
    pub fn classify_batch(&self, chws: &[&[f32]], threads: usize) -> Result<Vec<Classification>> {
        crate::parallel::par_map(chws, threads, |chw| self.classify_tensor(chw), || ())
            .into_iter()
            .collect()
    }

    /// Preprocesses and classifies a decoded image.
    pub fn classify(&self, image: &DynamicImage) -> Result<Classification> {
        self.classify_tensor(&self.manifest().preprocessing.apply(image))
    }

    /// Reads, decodes, preprocesses and classifies the image file at `path`.
    pub fn classify_path(&self, path: &Path) -> Result<Classification> {
        self.classify(&self.manifest().preprocessing.load(path)?)
            .map_err(|e| match e {
                // Name the image the output was computed for, as every other per-image error does.
                Error::NonFiniteOutput { .. } => Error::NonFiniteOutput {
                    path: path.to_path_buf(),
                },
                e => e,
            })
    }
}

/// Checks that the graph's interface matches what the manifest promises.
fn check_graph(graph: &TypedModel, manifest: &Manifest) -> std::result::Result<(), String> {
    let inputs = graph.input_outlets().map_err(|e| e.to_string())?;
    let outputs = graph.output_outlets().map_err(|e| e.to_string())?;
    if inputs.len() != 1 || outputs.len() != 2 {
        return Err(format!(
            "graph has {} inputs and {} outputs, expected 1 and 2",
            inputs.len(),
            outputs.len()
        ));
    }
    let input = graph.outlet_fact(inputs[0]).map_err(|e| e.to_string())?;
    let expected: TVec<TDim> = manifest.input.shape.iter().map(|d| (*d).into()).collect();
    if input.datum_type != f32::datum_type() || input.shape.to_tvec() != expected {
        return Err(format!(
            "graph input is {input:?}, manifest says f32 {:?}",
            manifest.input.shape
        ));
    }
    for outlet in outputs {
        let fact = graph.outlet_fact(*outlet).map_err(|e| e.to_string())?;
        let classes: TVec<TDim> = tvec![1.into(), manifest.labels.len().into()];
        if fact.shape.to_tvec() != classes {
            return Err(format!(
                "graph output {fact:?} does not have one score per label ({})",
                manifest.labels.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Graphs found by fuzzing (`fixtures/fuzz-regressions`): transposes whose axes are not a
    /// permutation, on which tract 0.23.9 panics or allocates without bound.
    #[test]
    fn graphs_that_break_tract_are_rejected_first() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fuzz-regressions");
        for (file, line) in [
            ("transpose-bad-permutation.graft", 14),
            ("transpose-duplicate-axis.graft", 14),
        ] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let err = Artifact::from_bytes(bytes, file).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{file}: cannot load the model graph: graph.nnef line {line}: transpose axes are not a permutation")
            );
        }
    }

    #[test]
    fn top_k_orders_by_probability_then_index() {
        let c = Classification {
            probabilities: vec![0.2, 0.5, 0.2, 0.1],
            logits: vec![0.0; 4],
        };
        let labels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let top: Vec<_> = c.top_k(3, &labels).into_iter().map(|s| s.label).collect();
        assert_eq!(top, ["b", "a", "c"]);
        assert_eq!(c.top1(), 1);
        assert_eq!(c.top_k(10, &labels).len(), 4);
    }
}
