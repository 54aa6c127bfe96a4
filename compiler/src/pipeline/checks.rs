//! Checks of the compile's inputs and outputs: `--out` is a writable new file and not one of the
//! inputs, the labels file, every class present in every split, duplicate images, and the written
//! graph measuring what the head measured.

use super::*;

/// Fails early, before any work, when the artifact could not be written at `out`.
pub(super) fn check_output_path(out: &Path) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if out.is_dir() {
        return Err(CompileError::InvalidOption(format!(
            "--out {}: is a folder, expected a file name",
            out.display()
        )));
    }
    if !parent.is_dir() {
        return Err(CompileError::InvalidOption(format!(
            "--out {}: folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    graft_runtime::artifact::check_writable(out).map_err(|e| match e {
        graft_runtime::Error::Io { source, .. } => CompileError::InvalidOption(format!(
            "--out {}: cannot write into folder {}: {source}",
            out.display(),
            parent.display()
        )),
        other => other.into(),
    })
}

/// Refuses an `--out` that is one of the compile's input files (the same file by identity, so
/// links and `./` spellings are caught too): the artifact would replace it.
pub(super) fn check_out_is_not_an_input<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = (&'static str, &'a Path)>,
) -> Result<()> {
    let Some(target) = FileId::of(out) else {
        return Ok(()); // a file that does not exist yet is nobody's input
    };
    for (what, input) in inputs {
        if FileId::of(input) == Some(target) {
            return Err(CompileError::InvalidOption(format!(
                "--out {}: is {what} {} (writing the artifact would replace it); choose another file",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// A file's identity: device and inode on Unix, the canonical path elsewhere.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(super) struct FileId {
    #[cfg(unix)]
    id: (u64, u64),
    #[cfg(not(unix))]
    id: u64,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).ok()?;
            Some(FileId {
                id: (meta.dev(), meta.ino()),
            })
        }
        #[cfg(not(unix))]
        {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            path.canonicalize().ok()?.hash(&mut hasher);
            Some(FileId {
                id: hasher.finish(),
            })
        }
    }
}

/// Largest labels file read (a million 64-byte labels).
pub(super) const LABELS_FILE_LIMIT: u64 = 64 << 20;

/// Reads one label per line; the count must match the model's outputs.
pub fn read_labels(path: &Path, expected: usize) -> Result<Vec<String>> {
    let bytes = graft_runtime::read::read_regular(path, LABELS_FILE_LIMIT, "labels")?;
    let text = String::from_utf8(bytes).map_err(|_| {
        CompileError::InvalidOption(format!("{}: labels file is not UTF-8", path.display()))
    })?;
    let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    for (line, label) in labels.iter().enumerate() {
        if let Some(reason) = graft_runtime::artifact::label_problem(label) {
            return Err(CompileError::InvalidOption(format!(
                "{}: line {}: label {label:?} {reason}",
                path.display(),
                line + 1
            )));
        }
    }
    if labels.len() != expected {
        return Err(CompileError::InvalidOption(format!(
            "{}: has {} labels, the model has {expected} outputs",
            path.display(),
            labels.len()
        )));
    }
    Ok(labels)
}

/// The cheap part of `graft check-data`, from the content hashes extraction computed anyway:
/// validation images identical to training images, and identical images under two labels.
pub(super) fn warn_about_duplicates(
    samples: &[Sample],
    train_count: usize,
    extraction: &Extraction,
    classes: &[String],
    reporter: &dyn Reporter,
) {
    let mut first_seen: HashMap<[u8; 32], (usize, bool)> = HashMap::new();
    let (mut leaked, mut conflicts) = (0, Vec::new());
    for (i, (sample, hash)) in samples.iter().zip(&extraction.content_hashes).enumerate() {
        let Some(hash) = hash else { continue };
        let is_val = i >= train_count;
        match first_seen.get(hash) {
            Some(&(label, seen_in_val)) => {
                if is_val && !seen_in_val {
                    leaked += 1;
                }
                if label != sample.label {
                    conflicts.push(format!(
                        "{} ({} and {})",
                        sample.path.display(),
                        classes[label],
                        classes[sample.label]
                    ));
                }
            }
            None => {
                first_seen.insert(*hash, (sample.label, is_val));
            }
        }
    }
    if leaked > 0 {
        reporter.message(&format!(
            "warning   {leaked} validation images are identical to training images: validation accuracy is inflated (graft check-data lists them)"
        ));
    }
    if !conflicts.is_empty() {
        reporter.message(&format!(
            "warning   {} under two labels: {}",
            match conflicts.len() {
                1 => "1 image appears".to_string(),
                n => format!("{n} images appear"),
            },
            conflicts.join(", ")
        ));
    }
}

pub(super) fn check_every_class_present(
    features: &Features,
    classes: &[String],
    what: &str,
) -> Result<()> {
    let counts = graft_runtime::dataset::counts(
        &features
            .labels
            .iter()
            .map(|&label| Sample {
                path: PathBuf::new(),
                label,
            })
            .collect::<Vec<_>>(),
        classes.len(),
    );
    match counts.iter().position(|&n| n == 0) {
        Some(c) => Err(CompileError::NotEnoughData(format!(
            "class {:?} has no decodable {what} images",
            classes[c]
        ))),
        None => Ok(()),
    }
}

/// The f32 graph, run end to end, must measure what the head measured on the features it was
/// trained and evaluated on (the same images, the same graph): both see identical tensors, so
/// they differ by rounding at most. A gap of more than 10 points (and 3 images) means the
/// features were not this graph's (a damaged or stale cache that passed its checks, a bug), and
/// the artifact is refused rather than written with a number that is not its own.
pub(super) fn check_graph_agrees_with_head(
    head_accuracy: f32,
    graph: &graft_runtime::eval::Evaluation,
    source: &str,
    cache: Option<&FeatureCache>,
) -> Result<()> {
    let images = graph.confusion.total().max(1) as f32;
    let gap = head_accuracy - graph.accuracy();
    if gap <= 0.10 || gap * images < 3.0 {
        return Ok(());
    }
    let hint = match cache {
        Some(cache) => format!(
            "the cached features do not match the backbone; delete {} or compile with --no-cache",
            cache.dir().display()
        ),
        None => "this is a bug in graft; please report it".into(),
    };
    Err(CompileError::Inconsistent(format!(
        "verify: the artifact classifies {} {source} images with accuracy {:.4}, but the head measured {head_accuracy:.4} on the features it was trained with: {hint}. No artifact written",
        graph.confusion.total(),
        graph.accuracy()
    )))
}
