//! Data checks (`graft check-data`): what is wrong with a labelled image folder before training on
//! it. Counts per class and split, files that do not decode, exact duplicates (content hash) and
//! near duplicates (64-bit difference hash) within a class, across classes (label conflicts) and
//! across train/val (leakage), tiny images, images that look like placeholders or graphics (few
//! distinct colours), and class imbalance.
//!
//! Errors (undecodable files, label conflicts, train/val leakage) make `check-data` exit 1;
//! everything else is a warning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use graft_runtime::dataset::{ImageFolder, Sample};
use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::decode_image;
use graft_runtime::progress::Progress;
use image::imageops::FilterType;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::Result;

/// Images with a side shorter than this are reported as tiny.
pub const TINY_SIDE: u32 = 64;
/// Fewer distinct colours than this in a 64x64 thumbnail: a placeholder, graphic or blank image.
pub const FEW_COLOURS: usize = 64;
/// Difference hashes at most this many bits apart are near-duplicate candidates...
pub const NEAR_DUPLICATE_BITS: u32 = 4;
/// ...confirmed when their 16x16 colour thumbnails differ by at most this much on average (0-255):
/// the hash alone pairs different pictures with the same layout (a bright flower on a dark
/// background).
pub const NEAR_DUPLICATE_MEAN_DIFFERENCE: f32 = 10.0;
/// Largest class over smallest class (training images) above which imbalance is reported.
pub const IMBALANCE_RATIO: f64 = 3.0;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The data is wrong: `check-data` exits 1.
    Error,
    /// Worth a look.
    Warning,
}

/// One kind of problem and every file it concerns.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Short machine-readable kind, e.g. `train-val-leak`.
    pub kind: &'static str,
    /// What is wrong, for people.
    pub message: String,
    /// The files (pairs are listed side by side).
    #[serde(serialize_with = "graft_runtime::paths::serialize_all")]
    pub paths: Vec<PathBuf>,
}

/// Image counts of one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassCount {
    /// Class name.
    pub class: String,
    /// Training images (all images without a split).
    pub train: usize,
    /// Validation images.
    pub val: usize,
}

/// Everything `check-data` found.
#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    /// The folder checked.
    #[serde(serialize_with = "graft_runtime::paths::serialize")]
    pub root: PathBuf,
    /// Name of the validation split folder, if any.
    pub val_split: Option<String>,
    /// Counts per class.
    pub classes: Vec<ClassCount>,
    /// Files ignored because their extension is not an image extension.
    pub ignored_files: usize,
    /// Problems, errors first.
    pub findings: Vec<Finding>,
}

impl DataReport {
    /// Number of findings of `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }
}

/// What one image looks like to the checks.
struct Probe {
    sha256: [u8; 32],
    decoded: std::result::Result<Decoded, String>,
}

struct Decoded {
    width: u32,
    height: u32,
    dhash: u64,
    colours: usize,
    /// 16x16 RGB thumbnail.
    small: Vec<u8>,
}

fn mean_difference(a: &[u8], b: &[u8]) -> f32 {
    let total: u32 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u32).sum();
    total as f32 / a.len().max(1) as f32
}

fn probe(path: &Path) -> Probe {
    let bytes = match graft_runtime::read::read_image_file(path) {
        Ok(b) => b,
        Err(e) => {
            return Probe {
                sha256: [0; 32],
                decoded: Err(e.to_string()),
            }
        }
    };
    let sha256 = Sha256::digest(&bytes).into();
    let decoded = decode_image(&bytes, path)
        .map(|image| {
            let gray = image.resize_exact(9, 8, FilterType::Triangle).to_luma8();
            let mut dhash = 0u64;
            for y in 0..8 {
                for x in 0..8 {
                    let bit = gray.get_pixel(x, y)[0] > gray.get_pixel(x + 1, y)[0];
                    dhash = (dhash << 1) | bit as u64;
                }
            }
            let thumbnail = image.resize(64, 64, FilterType::Nearest).to_rgb8();
            let mut colours: Vec<[u8; 3]> = thumbnail.pixels().map(|p| p.0).collect();
            colours.sort_unstable();
            colours.dedup();
            Decoded {
                width: image.width(),
                height: image.height(),
                dhash,
                colours: colours.len(),
                small: image
                    .resize_exact(16, 16, FilterType::Triangle)
                    .to_rgb8()
                    .into_raw(),
            }
        })
        .map_err(|e| e.to_string());
    Probe { sha256, decoded }
}

/// One image of the folder, as the checks see it.
struct Item<'a> {
    sample: &'a Sample,
    val: bool,
    probe: Probe,
}

/// Runs every check on `root` (`DIR/<class>/*` or `DIR/{train,val}/<class>/*`).
pub fn check_data(root: &Path, threads: usize, progress: &dyn Progress) -> Result<DataReport> {
    let folder = ImageFolder::scan(root)?;
    let mut samples: Vec<(&Sample, bool)> = folder.train.iter().map(|s| (s, false)).collect();
    if let Some(val) = &folder.val {
        samples.extend(val.iter().map(|s| (s, true)));
    }
    progress.start("checking", samples.len());
    let probes = par_map(
        &samples,
        threads,
        |(sample, _)| probe(&sample.path),
        || progress.advance(),
    );
    progress.finish();
    let items: Vec<Item> = samples
        .iter()
        .zip(probes)
        .map(|(&(sample, val), probe)| Item { sample, val, probe })
        .collect();

    let mut classes: Vec<ClassCount> = folder
        .classes
        .iter()
        .map(|c| ClassCount {
            class: c.clone(),
            train: 0,
            val: 0,
        })
        .collect();
    for item in &items {
        let count = &mut classes[item.sample.label];
        if item.val {
            count.val += 1;
        } else {
            count.train += 1;
        }
    }

    let mut findings = Vec::new();
    let undecodable: Vec<PathBuf> = items
        .iter()
        .filter(|i| i.probe.decoded.is_err())
        .map(|i| i.sample.path.clone())
        .collect();
    push(
        &mut findings,
        Severity::Error,
        "undecodable",
        "files that do not decode as images (compile skips them)",
        undecodable,
    );
    duplicates(&items, &mut findings);
    let decoded = |check: &dyn Fn(&Decoded) -> bool| -> Vec<PathBuf> {
        items
            .iter()
            .filter(|i| i.probe.decoded.as_ref().is_ok_and(check))
            .map(|i| i.sample.path.clone())
            .collect()
    };
    push(
        &mut findings,
        Severity::Warning,
        "tiny",
        &format!("images with a side under {TINY_SIDE} pixels (upscaled for the backbone)"),
        decoded(&|d| d.width.min(d.height) < TINY_SIDE),
    );
    push(
        &mut findings,
        Severity::Warning,
        "few-colours",
        &format!(
            "images with fewer than {FEW_COLOURS} distinct colours: placeholders, graphics or blank frames?"
        ),
        decoded(&|d| d.colours < FEW_COLOURS),
    );
    let train: Vec<usize> = classes.iter().map(|c| c.train).collect();
    let (smallest, largest) = (
        train.iter().copied().min().unwrap_or(0),
        train.iter().copied().max().unwrap_or(0),
    );
    if smallest > 0 && largest as f64 > IMBALANCE_RATIO * smallest as f64 {
        findings.push(Finding {
            severity: Severity::Warning,
            kind: "imbalance",
            message: format!(
                "classes are imbalanced: {largest} training images in the largest, {smallest} in the smallest"
            ),
            paths: Vec::new(),
        });
    }
    findings.sort_by_key(|f| f.severity != Severity::Error);
    Ok(DataReport {
        root: root.to_path_buf(),
        val_split: folder.val_split.clone(),
        classes,
        ignored_files: folder.ignored_files,
        findings,
    })
}

fn push(
    findings: &mut Vec<Finding>,
    severity: Severity,
    kind: &'static str,
    message: &str,
    paths: Vec<PathBuf>,
) {
    if !paths.is_empty() {
        findings.push(Finding {
            severity,
            kind,
            message: format!("{} {message}", paths.len()),
            paths,
        });
    }
}

/// Exact (same bytes) and near (difference hashes within [`NEAR_DUPLICATE_BITS`]) duplicate pairs,
/// sorted by where they are: across train/val, across classes, within a class.
fn duplicates(items: &[Item], findings: &mut Vec<Finding>) {
    let mut by_content: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        if item.probe.decoded.is_ok() {
            by_content.entry(item.probe.sha256).or_default().push(i);
        }
    }
    let mut exact: Vec<(usize, usize)> = Vec::new();
    for group in by_content.values() {
        for (k, &a) in group.iter().enumerate() {
            exact.extend(group[k + 1..].iter().map(|&b| (a, b)));
        }
    }
    let decoded: Vec<(usize, &Decoded)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| item.probe.decoded.as_ref().ok().map(|d| (i, d)))
        .collect();
    let mut near: Vec<(usize, usize)> = Vec::new();
    for (k, &(a, da)) in decoded.iter().enumerate() {
        for &(b, db) in &decoded[k + 1..] {
            if (da.dhash ^ db.dhash).count_ones() <= NEAR_DUPLICATE_BITS
                && items[a].probe.sha256 != items[b].probe.sha256
                && mean_difference(&da.small, &db.small) <= NEAR_DUPLICATE_MEAN_DIFFERENCE
            {
                near.push((a, b));
            }
        }
    }
    let place = |(a, b): (usize, usize)| {
        let (a, b) = (&items[a], &items[b]);
        if a.val != b.val {
            "train-val"
        } else if a.sample.label != b.sample.label {
            "cross-class"
        } else {
            "within-class"
        }
    };
    for (pairs, kind_prefix, what) in [
        (exact, "exact", "identical"),
        (near, "near", "near-identical"),
    ] {
        for (place_kind, severity, description) in [
            (
                "train-val",
                Severity::Error,
                "in both the training and the validation split (leakage: validation accuracy is inflated)",
            ),
            (
                "cross-class",
                Severity::Error,
                "in two different classes (label conflict)",
            ),
            (
                "within-class",
                Severity::Warning,
                "in the same class (they count twice in training)",
            ),
        ] {
            let mut selected: Vec<(usize, usize)> = pairs
                .iter()
                .copied()
                .filter(|&p| place(p) == place_kind)
                .collect();
            selected.sort_unstable();
            if selected.is_empty() {
                continue;
            }
            // Near duplicates can be a coincidence of the hash: never more than a warning.
            let severity = if kind_prefix == "near" {
                Severity::Warning
            } else {
                severity
            };
            findings.push(Finding {
                severity,
                kind: match (kind_prefix, place_kind) {
                    ("exact", "train-val") => "exact-duplicate-train-val",
                    ("exact", "cross-class") => "exact-duplicate-cross-class",
                    ("exact", _) => "exact-duplicate-within-class",
                    (_, "train-val") => "near-duplicate-train-val",
                    (_, "cross-class") => "near-duplicate-cross-class",
                    _ => "near-duplicate-within-class",
                },
                message: format!("{} pairs of {what} images {description}", selected.len()),
                paths: selected
                    .iter()
                    .flat_map(|&(a, b)| [items[a].sample.path.clone(), items[b].sample.path.clone()])
                    .collect(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difference_hash_survives_resizing_and_tells_pictures_apart() {
        let dir = tempfile::tempdir().unwrap();
        let picture = |w: u32, h: u32, shift: u32| {
            image::RgbImage::from_fn(w, h, |x, y| {
                let v = (((x * 255 / w) + shift) ^ (y * 255 / h)) as u8;
                image::Rgb([v, v / 2, 255 - v])
            })
        };
        let save = |name: &str, image: image::RgbImage| {
            let path = dir.path().join(name);
            image.save(&path).unwrap();
            probe(&path).decoded.unwrap()
        };
        let a = save("a.png", picture(320, 240, 0));
        let b = save("b.png", picture(160, 120, 0));
        let c = save("c.png", picture(320, 240, 97));
        assert!((a.dhash ^ b.dhash).count_ones() <= NEAR_DUPLICATE_BITS);
        assert!((a.dhash ^ c.dhash).count_ones() > NEAR_DUPLICATE_BITS);
        assert_eq!((a.width, a.height), (320, 240));
        assert!(a.colours >= FEW_COLOURS);
        let flat = save(
            "flat.png",
            image::RgbImage::from_pixel(100, 100, image::Rgb([9, 9, 9])),
        );
        assert_eq!(flat.colours, 1);
    }
}
