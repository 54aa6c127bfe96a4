//! The graft artifact container: one self-describing file holding a model graph and its manifest.
//!
//! Layout (all integers little-endian):
//!
//! | offset            | size | content                                              |
//! |-------------------|------|------------------------------------------------------|
//! | 0                 | 8    | magic `GRAFTART`                                     |
//! | 8                 | 4    | format version (`u32`, currently [`FORMAT_VERSION`]) |
//! | 12                | 4    | reserved, zero                                       |
//! | 16                | 8    | manifest length `m` (`u64`)                          |
//! | 24                | 8    | graph length `g` (`u64`)                             |
//! | 32                | m    | manifest, UTF-8 JSON ([`Manifest`])                  |
//! | 32 + m            | g    | graph, an NNEF archive (tar) written by tract-nnef   |
//! | 32 + m + g        | 32   | SHA-256 of every byte before it                      |
//!
//! Readers check, in this order: magic, version, that the declared lengths add up to the file size
//! (so nothing is allocated from an untrusted size), the checksum, the manifest, then every tensor
//! header inside the graph archive (a tensor may not declare more bytes than the archive holds for
//! it, since tract would allocate the declared size before reading). Writers go
//! through a temporary file in the destination directory and an atomic rename, so a crash or an
//! error never leaves a half-written artifact behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::preprocess::Preprocessing;

/// First eight bytes of every artifact.
pub const MAGIC: [u8; 8] = *b"GRAFTART";
/// The container format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header before the manifest.
pub const HEADER_LEN: usize = 32;
/// Size of the trailing checksum.
pub const CHECKSUM_LEN: usize = 32;
/// Upper bound on the manifest size; a larger declared size is treated as corruption.
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;

/// Everything about the model that is not the graph: labels, preprocessing, provenance, metrics.
///
/// The runtime needs `labels`, `preprocessing`, `input` and `outputs`; the rest documents how the
/// artifact was made and is shown by `inspect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Name and version of the program that wrote the artifact.
    pub producer: String,
    /// Class names, in the order of the model's output vector.
    pub labels: Vec<String>,
    /// How an image becomes the input tensor.
    pub preprocessing: Preprocessing,
    /// The graph's input.
    pub input: TensorSpec,
    /// Names of the graph's outputs, in order: probabilities first, then logits.
    pub outputs: Vec<String>,
    /// Numeric precision of the graph's convolutions: `f32` or `int8`.
    pub precision: String,
    /// How the large weight tensors are stored (`f32`, `f16`, `int8`); they are widened to f32
    /// when the graph is loaded (see [`crate::weights`]).
    #[serde(default)]
    pub weights: crate::weights::WeightStorage,
    /// How the graph was quantized, for `int8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationInfo>,
    /// Where the frozen part of the model came from.
    pub backbone: BackboneInfo,
    /// The classifier head that was trained.
    pub head: HeadInfo,
    /// How the head was trained.
    #[serde(default)]
    pub training: Option<TrainingInfo>,
    /// Quality measured when the artifact was compiled.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Versions of the libraries that produced the artifact.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

/// How an `int8` graph was quantized, and what it cost in accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationInfo {
    /// Calibration method (how activation ranges were chosen).
    pub method: String,
    /// Number of training images the activation ranges were measured on.
    pub calibration_images: usize,
    /// The precision chosen for every quantizable layer.
    pub layers: Vec<LayerPrecision>,
    /// Validation accuracy of the same graph in f32, run end to end.
    #[serde(default)]
    pub f32_val_accuracy: Option<f32>,
    /// Validation accuracy of the quantized graph, run end to end.
    #[serde(default)]
    pub val_accuracy: Option<f32>,
    /// Every calibration method tried, with how close its simulated graph came to f32.
    #[serde(default)]
    pub calibration_trials: Vec<CalibrationTrial>,
    /// Share of the probe images whose top-1 class int8 was allowed to change against f32
    /// (0.01: one in a hundred). Artifacts written before [`QuantizationInfo::probe`] existed
    /// recorded validation accuracy int8 was allowed to lose instead.
    #[serde(default)]
    pub accuracy_budget: Option<f32>,
    /// Simulated validation accuracy of the chosen quantization (artifacts written before
    /// [`QuantizationInfo::probe`] existed; newer ones record [`QuantizationInfo::agreement`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_accuracy: Option<f32>,
    /// The images the choices were simulated on, in words (`1000 images (train holdout and
    /// fitted training images)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Share of the probe images whose top-1 class the chosen (simulated) int8 graph keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f32>,
    /// The whole int8 graph against its f32 original, timed on the compiling machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<SpeedCheck>,
    /// Multiply-adds per image of every convolution and constant-weight matrix product of the
    /// f32 graph, quantizable or not (the int8 layers' `macs` over this is the int8 coverage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_macs: Option<u64>,
}

impl QuantizationInfo {
    /// Fraction of the graph's product multiply-adds computed in int8, when recorded.
    pub fn int8_mac_fraction(&self) -> Option<f64> {
        let total = self.product_macs.filter(|&t| t > 0)?;
        let int8: u64 = self
            .layers
            .iter()
            .filter(|l| l.precision == "int8")
            .map(|l| l.macs.unwrap_or(0))
            .sum();
        Some(int8 as f64 / total as f64)
    }
}

/// Latency of the int8 graph and of the f32 graph it came from, run in alternation on the
/// compiling machine (one thread, batch 1, medians).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedCheck {
    /// The f32 graph, milliseconds.
    pub f32_ms: f32,
    /// The int8 graph, milliseconds.
    pub int8_ms: f32,
    /// Median of int8 over f32 per pair.
    pub ratio: f32,
    /// The kernels that ran (`avx512`, `avxvnni`, `avx2`, `portable`).
    pub kernels: String,
    /// The CPU, as the operating system names it.
    pub cpu: String,
}

/// One calibration method tried by the compiler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationTrial {
    /// `min-max`, `percentile` or `entropy`.
    pub method: String,
    /// Validation accuracy of the int8 graph simulated in f32 with this method's ranges
    /// (artifacts written before [`QuantizationInfo::probe`] existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_accuracy: Option<f32>,
    /// Share of the probe images whose top-1 class the simulated graph keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f32>,
    /// Mean Kullback-Leibler divergence of its output distribution from the f32 graph's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergence: Option<f32>,
}

/// [`LayerPrecision::reason`] of a layer the budget (top-1 changes against f32; validation
/// accuracy in older artifacts) returned to f32.
pub const KEPT_F32_FOR_BUDGET: &str = "kept f32: accuracy budget";
/// [`LayerPrecision::reason`] of a depthwise convolution (tract has no int8 kernel for it).
pub const KEPT_F32_NO_INT8_DEPTHWISE: &str = "kept f32: tract has no int8 depthwise kernel";
/// [`LayerPrecision::reason`] of a layer timed slower in int8 than in f32 when compiled.
pub const KEPT_F32_SLOWER_IN_INT8: &str = "kept f32: slower in int8 on the compiling machine";

/// The precision chosen for one quantizable layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPrecision {
    /// Node name in the graph.
    pub layer: String,
    /// `conv`, `depthwise` or `pointwise`.
    pub kind: String,
    /// `int8` or `f32`.
    pub precision: String,
    /// Why an f32 layer was not quantized (one of the `KEPT_F32_*` texts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The layer alone in f32 and in int8 on the compiling machine, in milliseconds, when timed
    /// (`--int8-layers faster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_ms: Option<[f32; 2]>,
    /// Multiply-adds of the layer per image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macs: Option<u64>,
}

/// Name and shape of a graph tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name in the graph.
    pub name: String,
    /// Concrete shape (NCHW for images).
    pub shape: Vec<usize>,
}

/// Provenance of the pretrained backbone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneInfo {
    /// File name of the ONNX model (no directory).
    pub file_name: String,
    /// SHA-256 of the ONNX file, hex.
    pub sha256: String,
    /// Tensor at which the backbone was cut.
    pub cut: String,
    /// Shape of the features fed to the head.
    pub feature_shape: Vec<usize>,
}

/// Description of the classifier head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// `linear`, `mlp:H`, or `imagenet` for the backbone's own classifier.
    pub kind: String,
    /// `[inputs, outputs]` of each dense layer.
    pub layers: Vec<[usize; 2]>,
}

/// Hyper-parameters and history of head training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// Seed of every random choice (split, initialisation, shuffling, dropout).
    pub seed: u64,
    /// Optimiser name and settings.
    pub optimizer: String,
    /// Learning rate.
    pub learning_rate: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Epochs actually run (early stopping may end training before the maximum).
    pub epochs_run: usize,
    /// Epoch whose weights were kept (1-based).
    pub best_epoch: usize,
    /// Per-epoch loss and accuracy.
    pub history: Vec<EpochRecord>,
    /// Whether the loss weighted classes by inverse frequency (`--class-weights auto`).
    #[serde(default)]
    pub balanced_classes: bool,
    /// Fine-tuning or training from scratch, when the backbone was trained too.
    #[serde(default)]
    pub transfer: Option<TransferInfo>,
}

/// How the backbone itself was trained (`graft compile --strategy finetune|scratch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferInfo {
    /// `finetune` or `scratch`.
    pub strategy: String,
    /// Tensor below which the backbone stayed frozen (the image input: nothing frozen).
    pub boundary: String,
    /// Names of the blocks that were trained.
    pub unfrozen_blocks: Vec<String>,
    /// Trained backbone weights (scalars).
    pub trainable_weights: usize,
    /// `adamw` or `sgd` (with momentum).
    pub optimizer: String,
    /// Base learning rate of the backbone layers.
    pub backbone_learning_rate: f64,
    /// Base learning rate of the head.
    pub head_learning_rate: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: String,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Whether training images were augmented.
    pub augmented: bool,
    /// Epochs run.
    pub epochs_run: usize,
    /// Epoch whose weights were kept (1-based; 0 when no epoch lowered the validation loss below
    /// the starting weights', which are then kept).
    pub best_epoch: usize,
    /// Per-epoch loss and accuracy of the joint training.
    pub history: Vec<EpochRecord>,
    /// Wall-clock seconds of the joint training (frozen layers, augmentation and evaluation
    /// included).
    pub seconds: f64,
    /// Forward + backward throughput of the trainable part and head, images per second.
    pub train_images_per_second: f64,
}

/// Loss and accuracy after one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f32,
    /// Training accuracy at the end of the epoch.
    pub train_accuracy: f32,
    /// Validation loss at the end of the epoch.
    pub val_loss: f32,
    /// Validation accuracy at the end of the epoch.
    pub val_accuracy: f32,
}

/// Accuracy measured at compile time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Where the validation images came from: `val` (a split folder), `test` (a `test` folder
    /// as the only split) or `holdout` (carved out of the folder's images).
    pub validation_source: String,
    /// Number of training images used.
    pub train_images: usize,
    /// Number of validation images used.
    pub val_images: usize,
    /// Training accuracy of the kept head.
    pub train_accuracy: f32,
    /// Validation accuracy of the artifact's graph, run end to end on the validation images.
    pub val_accuracy: f32,
    /// Validation confusion matrix, `[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Where the images every choice (epoch, calibration, fallbacks) was made on came from:
    /// `train holdout` (then the validation numbers are held out) or `val` (with a test split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection_source: Option<String>,
    /// Number of images choices were made on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection_images: Option<usize>,
    /// Accuracy of the artifact's graph on the test split, when the data has `train/val/test`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f32>,
    /// Number of test images measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_images: Option<usize>,
}

/// A parsed artifact: its manifest and the location of its graph inside the mapped bytes.
#[derive(Debug)]
pub struct Artifact {
    /// Where the artifact was read from (or a description such as `<memory>`).
    pub path: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// Hex SHA-256 recorded at the end of the file.
    pub checksum: String,
    /// Size of the whole artifact in bytes.
    pub size: u64,
    bytes: Bytes,
    graph: Range<usize>,
}

#[derive(Debug)]
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl Artifact {
    /// Memory-maps and validates the artifact at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Artifact> {
        let path = path.as_ref();
        if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            let e = std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a folder, not an artifact file",
            );
            return Err(Error::io(path, e));
        }
        // A FIFO or device is refused before it is opened (opening a FIFO blocks).
        crate::read::check_regular(path, u64::MAX, "artifact")?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process. Another process truncating
        // the file while it is mapped would fault on access; the checksum read below touches every
        // byte once so a file changed between open and parse is reported as corrupt.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(Bytes::Mapped(map), path.to_path_buf())
    }

    /// Validates an artifact held in memory; `label` names it in error messages.
    pub fn from_bytes(bytes: Vec<u8>, label: impl Into<PathBuf>) -> Result<Artifact> {
        Self::parse(Bytes::Owned(bytes), label.into())
    }

    /// The serialized graph (an NNEF tar archive).
    pub fn graph_bytes(&self) -> &[u8] {
        &self.bytes[self.graph.clone()]
    }

    fn parse(bytes: Bytes, path: PathBuf) -> Result<Artifact> {
        let actual = bytes.len() as u64;
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(Error::NotAnArtifact { path });
        }
        if bytes.len() < HEADER_LEN {
            return Err(Error::SizeMismatch {
                path,
                declared: (HEADER_LEN + CHECKSUM_LEN) as u64,
                actual,
            });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            let hint = if version > FORMAT_VERSION {
                "it was written by a newer graft: upgrade the runtime"
            } else {
                "it was written by an older graft: recompile the model"
            };
            return Err(Error::UnsupportedVersion {
                path,
                found: version,
                supported: FORMAT_VERSION,
                hint,
            });
        }
        let manifest_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let graph_len = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        let declared = (HEADER_LEN as u64 + CHECKSUM_LEN as u64)
            .checked_add(manifest_len)
            .and_then(|n| n.checked_add(graph_len));
        let declared = match declared {
            Some(d) if d == actual && manifest_len <= MAX_MANIFEST_LEN => d,
            other => {
                return Err(Error::SizeMismatch {
                    path,
                    declared: other.unwrap_or(u64::MAX),
                    actual,
                })
            }
        };
        let body_end = (declared as usize) - CHECKSUM_LEN;
        let computed = Sha256::digest(&bytes[..body_end]);
        let stored = &bytes[body_end..];
        if computed.as_slice() != stored {
            return Err(Error::ChecksumMismatch {
                path,
                stored: hex(stored),
                computed: hex(&computed),
            });
        }
        let manifest_end = HEADER_LEN + manifest_len as usize;
        let manifest: Manifest =
            serde_json::from_slice(&bytes[HEADER_LEN..manifest_end]).map_err(|e| {
                Error::InvalidManifest {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        validate_manifest(&manifest).map_err(|reason| Error::InvalidManifest {
            path: path.clone(),
            reason,
        })?;
        check_graph_archive(&bytes[manifest_end..body_end]).map_err(|reason| {
            Error::InvalidGraph {
                path: path.clone(),
                reason,
            }
        })?;
        Ok(Artifact {
            checksum: hex(stored),
            manifest,
            size: actual,
            graph: manifest_end..body_end,
            bytes,
            path,
        })
    }
}

/// Why `label` cannot be a class label, if it cannot: a label is printed one per line and
/// between separators, so it must not be empty or hold control characters (a newline in a label
/// would forge output lines).
pub fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        Some("is empty")
    } else if label.chars().any(char::is_control) {
        Some("contains a control character (such as a newline)")
    } else {
        None
    }
}

fn validate_manifest(manifest: &Manifest) -> std::result::Result<(), String> {
    if manifest.labels.len() < 2 {
        return Err(format!(
            "a classifier needs at least 2 labels, found {}",
            manifest.labels.len()
        ));
    }
    for (i, label) in manifest.labels.iter().enumerate() {
        if let Some(reason) = label_problem(label) {
            return Err(format!("label {i} ({label:?}) {reason}"));
        }
    }
    if manifest.outputs.len() != 2 {
        return Err(format!(
            "expected 2 outputs (probabilities, logits), found {}",
            manifest.outputs.len()
        ));
    }
    let shape = &manifest.input.shape;
    let [_, channels, height, width] = shape[..] else {
        return Err(format!("input shape {shape:?} is not NCHW"));
    };
    if channels != 3 || [height as u32, width as u32] != manifest.preprocessing.crop {
        return Err(format!(
            "input shape {shape:?} does not match the preprocessing crop {:?}",
            manifest.preprocessing.crop
        ));
    }
    manifest.preprocessing.validate().map_err(|e| e.to_string())
}

/// Size of the header of an NNEF tensor (`.dat`) file.
const NNEF_TENSOR_HEADER: u64 = 128;

/// Walks the graph's tar archive and checks that every NNEF tensor header declares a shape and a
/// byte size consistent with each other and with the bytes actually present, so that reading the
/// graph cannot be made to allocate more than the file holds.
fn check_graph_archive(archive: &[u8]) -> std::result::Result<(), String> {
    let mut tar = tar::Archive::new(archive);
    let entries = tar.entries().map_err(|e| format!("graph archive: {e}"))?;
    let mut found_graph = false;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("graph archive: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("graph archive entry name: {e}"))?
            .to_string_lossy()
            .into_owned();
        let size = entry.size();
        if size > archive.len() as u64 {
            return Err(format!(
                "graph archive entry {name:?} declares {size} bytes, more than the archive"
            ));
        }
        if name.trim_start_matches("./") == "graph.nnef" {
            found_graph = true;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text)
                .map_err(|_| "graph.nnef is not UTF-8 text".to_string())?;
            check_graph_text(&text)?;
            continue;
        }
        if !name.ends_with(".dat") {
            continue;
        }
        let mut header = [0u8; NNEF_TENSOR_HEADER as usize];
        std::io::Read::read_exact(&mut entry, &mut header)
            .map_err(|_| format!("tensor {name:?} is shorter than its header"))?;
        let field = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let (data_bytes, rank, bits) = (field(4) as u64, field(8), field(44));
        if header[..2] != [0x4e, 0xef] || rank > 8 {
            return Err(format!("tensor {name:?} has an invalid header"));
        }
        let elements =
            (0..rank as usize).try_fold(1u64, |acc, i| acc.checked_mul(field(12 + 4 * i) as u64));
        let declared = elements
            .and_then(|n| n.checked_mul(bits as u64))
            .map(|b| b.div_ceil(8));
        if declared != Some(data_bytes) || NNEF_TENSOR_HEADER + data_bytes > size {
            return Err(format!(
                "tensor {name:?} declares {} bytes of data but the archive holds {} for it",
                declared.unwrap_or(u64::MAX).max(data_bytes),
                size.saturating_sub(NNEF_TENSOR_HEADER)
            ));
        }
    }
    if !found_graph {
        return Err("graph archive has no graph.nnef".into());
    }
    Ok(())
}

/// Checks the NNEF graph text for constructs that tract 0.23.9 does not reject cleanly: a
/// `transpose` whose axes are not a permutation makes it panic or allocate without bound (both
/// found by fuzzing, see docs/RELIABILITY.md).
fn check_graph_text(text: &str) -> std::result::Result<(), String> {
    for (number, line) in text.lines().enumerate() {
        let Some(call) = line.find("transpose(") else {
            continue;
        };
        let bad = || {
            format!(
                "graph.nnef line {}: transpose axes are not a permutation",
                number + 1
            )
        };
        let args = &line[call..];
        let axes = args
            .find("axes = [")
            .map(|at| &args[at + "axes = [".len()..])
            .and_then(|rest| rest.split_once(']'))
            .ok_or_else(bad)?
            .0;
        let mut axes: Vec<usize> = axes
            .split(',')
            .map(|a| a.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        axes.sort_unstable();
        if axes.iter().enumerate().any(|(i, a)| i != *a) {
            return Err(bad());
        }
    }
    Ok(())
}

/// Serializes a manifest and graph into artifact bytes.
pub fn encode(manifest: &Manifest, graph: &[u8]) -> Vec<u8> {
    let manifest_json = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
    let mut out = Vec::with_capacity(HEADER_LEN + manifest_json.len() + graph.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(manifest_json.len() as u64).to_le_bytes());
    out.extend_from_slice(&(graph.len() as u64).to_le_bytes());
    out.extend_from_slice(&manifest_json);
    out.extend_from_slice(graph);
    let checksum = Sha256::digest(&out);
    out.extend_from_slice(&checksum);
    out
}

/// The folder `path` is written into (`.` for a bare file name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A new temporary file beside `path`, named `.graft-*.tmp`, with the permissions a new file
/// gets (0666 less the umask, like `cp` or `cargo build` outputs; tempfile's default, 0600,
/// would hide the artifact from the service user that deploys it).
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = folder_of(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(TEMP_PREFIX).suffix(TEMP_SUFFIX);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))
}

const TEMP_PREFIX: &str = ".graft-";
const TEMP_SUFFIX: &str = ".tmp";

/// Temporary files older than this are left from a killed write and are removed by the next.
const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Checks, before any long work, that [`write_atomic`] could write `path`: its folder accepts a
/// new file (created and removed at once).
pub fn check_writable(path: &Path) -> Result<()> {
    temp_beside(path).map(drop)
}

/// Removes `.graft-*.tmp` files older than a day from `dir`: what a write killed by SIGKILL or a
/// power cut leaves behind (a running write's file is younger). Failures are ignored.
pub fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed to disk,
/// then renamed over `path`. On error nothing is left behind and an existing file is untouched.
/// Temporary files that killed writes left in that folder more than a day ago are removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    remove_stale_temp_files(folder_of(path));
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::Normalization;

    fn manifest() -> Manifest {
        Manifest {
            producer: "test".into(),
            labels: vec!["a".into(), "b".into()],
            preprocessing: Preprocessing::for_input(224, 224, Normalization::imagenet()),
            input: TensorSpec {
                name: "input".into(),
                shape: vec![1, 3, 224, 224],
            },
            outputs: vec!["probabilities".into(), "logits".into()],
            precision: "f32".into(),
            weights: Default::default(),
            quantization: None,
            backbone: BackboneInfo {
                file_name: "b.onnx".into(),
                sha256: "00".into(),
                cut: "features".into(),
                feature_shape: vec![1, 8],
            },
            head: HeadInfo {
                kind: "linear".into(),
                layers: vec![[8, 2]],
            },
            training: None,
            metrics: None,
            versions: BTreeMap::new(),
        }
    }

    /// A minimal NNEF archive: a graph document and one f32 tensor of `dims`, holding `data`.
    fn archive(dims: &[u32], declared_bytes: u32, data: &[u8]) -> Vec<u8> {
        let mut header = [0u8; 128];
        header[..4].copy_from_slice(&[0x4e, 0xef, 1, 0]);
        header[4..8].copy_from_slice(&declared_bytes.to_le_bytes());
        header[8..12].copy_from_slice(&(dims.len() as u32).to_le_bytes());
        for (i, d) in dims.iter().enumerate() {
            header[12 + 4 * i..16 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
        header[44..48].copy_from_slice(&32u32.to_le_bytes());
        let mut tensor = header.to_vec();
        tensor.extend_from_slice(data);
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in [("graph.nnef", &b"version 1.0;"[..]), ("w.dat", &tensor[..])] {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder.append_data(&mut h, name, content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn tensor_headers_are_checked_against_the_archive() {
        let good = archive(&[2, 3], 24, &[0; 24]);
        assert_eq!(check_graph_archive(&good), Ok(()));
        let huge = archive(&[65_536, 65_536], u32::MAX, &[0; 24]);
        assert_eq!(
            check_graph_archive(&huge),
            Err("tensor \"w.dat\" declares 17179869184 bytes of data but the archive holds 24 for it".into())
        );
        let lying = archive(&[2, 3], 240, &[0; 24]);
        assert!(check_graph_archive(&lying)
            .unwrap_err()
            .contains("declares 240 bytes"));
        assert!(check_graph_archive(b"not a tar")
            .unwrap_err()
            .starts_with("graph archive"));
        let empty = tar::Builder::new(Vec::new()).into_inner().unwrap();
        assert_eq!(
            check_graph_archive(&empty),
            Err("graph archive has no graph.nnef".into())
        );
    }

    #[test]
    fn transposes_must_permute() {
        assert_eq!(
            check_graph_text("  a = transpose(b, axes = [0, 3, 1, 2]);\n"),
            Ok(())
        );
        assert_eq!(
            check_graph_text("x;\n  a = transpose(b, axes = [1, 0, 1, 3]);\n"),
            Err("graph.nnef line 2: transpose axes are not a permutation".into())
        );
        assert!(check_graph_text("a = transpose(b, axes = [2- 0, 1, 3]);").is_err());
        assert!(check_graph_text("a = transpose(b);").is_err());
    }

    #[test]
    fn round_trip_preserves_manifest_and_graph() {
        let graph = archive(&[1], 4, &[0; 4]);
        let bytes = encode(&manifest(), &graph);
        let artifact = Artifact::from_bytes(bytes.clone(), "<memory>").unwrap();
        assert_eq!(artifact.manifest, manifest());
        assert_eq!(artifact.graph_bytes(), graph);
        assert_eq!(artifact.size, bytes.len() as u64);
    }

    #[test]
    fn every_truncation_is_rejected_without_panicking() {
        let bytes = encode(&manifest(), &archive(&[1], 4, &[0; 4]));
        for len in 0..bytes.len() {
            let err = Artifact::from_bytes(bytes[..len].to_vec(), "t").unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::NotAnArtifact { .. } | Error::SizeMismatch { .. }
                ),
                "len {len}: {err}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let bytes = encode(&manifest(), &archive(&[1], 4, &[0; 4]));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(
                Artifact::from_bytes(bad, "t").is_err(),
                "flip at {i} accepted"
            );
        }
    }

    #[test]
    fn future_version_is_named_in_the_error() {
        let mut bytes = encode(&manifest(), b"g");
        bytes[8] = 7;
        let err = Artifact::from_bytes(bytes, "m.graft").unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.graft: artifact format version 7 is not supported (this runtime reads version 1); \
             it was written by a newer graft: upgrade the runtime"
        );
    }

    #[test]
    fn huge_declared_sizes_do_not_allocate() {
        let mut bytes = encode(&manifest(), b"g");
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = Artifact::from_bytes(bytes, "m.graft").unwrap_err();
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
    }

    #[test]
    fn stale_temp_files_are_removed_by_the_next_write_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".graft-killed.tmp");
        let fresh = dir.path().join(".graft-running.tmp");
        let other = dir.path().join("notes.tmp");
        for f in [&stale, &fresh, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        let old = std::time::SystemTime::now() - STALE_TEMP_AGE * 2;
        for f in [&stale, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        write_atomic(&dir.path().join("m.graft"), b"artifact").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("m.graft"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o600, 0o600);
            assert_ne!(
                mode & 0o044,
                0,
                "readable beyond the owner under a usual umask: {mode:o}"
            );
        }
        assert!(!stale.exists());
        assert!(fresh.exists() && other.exists());
        check_writable(&dir.path().join("n.graft")).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            3,
            "fresh, other, m.graft"
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.graft");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
