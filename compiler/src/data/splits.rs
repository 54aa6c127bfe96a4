//! Splits: which images train the weights, which images every choice is made on, and which are
//! only measured.
//!
//! A number reported as held out must come from images no choice has seen. The compile makes
//! choices (the head's epoch, the int8 calibration method and the layers returned to f32, the
//! fine-tuning epoch); before this module existed they were made on the validation split and then
//! its accuracy was reported, which flatters the result (swapping the validation labels moved the
//! kept epoch from 7 to 1 and changed every prediction). Now:
//!
//! | folder | weights trained on | choices made on | only measured (reported) |
//! |---|---|---|---|
//! | `DIR/<class>` | train part | a seeded holdout of the train part | a seeded holdout of `DIR` |
//! | `DIR/{train,val}` | train minus a holdout | the holdout of train | val |
//! | `DIR/{train,test}` | train minus a holdout | the holdout of train | test |
//! | `DIR/{train,val,test}` | train | val (as its name says) | test (val reported too, as used for choices) |
//!
//! Holdouts are stratified (each class keeps `--val-fraction` of its images, at least one) and
//! seeded by `--seed`, from separate random streams, so the same folder and seed always split the
//! same way.

use graft_runtime::progress::count;
use std::collections::HashSet;
use std::path::Path;

use graft_runtime::dataset::{ImageFolder, Sample};

use crate::error::{CompileError, Result};
use crate::util::rng::Rng;

/// The images of one compile, by role.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Images the weights are trained on.
    pub fit: Vec<Sample>,
    /// Images every choice is made on.
    pub select: Vec<Sample>,
    /// Where `select` came from: `train holdout` or `val`.
    pub select_source: &'static str,
    /// Images the reported accuracy is measured on.
    pub report: Vec<Sample>,
    /// Where `report` came from: `val`, `test` or `holdout`.
    pub report_source: &'static str,
    /// With `train/val/test`: the test images, only measured (`report` is then val, which the
    /// choices used).
    pub test: Option<Vec<Sample>>,
}

impl Splits {
    /// Splits `folder` as the module documentation says; `fraction` in (0, 1), `seed` for the
    /// holdouts.
    pub fn of(folder: &ImageFolder, fraction: f32, seed: u64) -> Result<Splits> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(CompileError::InvalidOption(format!(
                "--val-fraction must be between 0 and 1 (exclusive), got {fraction}"
            )));
        }
        let classes = &folder.classes;
        let select_holdout =
            |train: &[Sample]| stratified_holdout(train, classes, fraction, seed, Purpose::Choices);
        Ok(match (&folder.val, &folder.test) {
            (Some(val), Some(test)) => Splits {
                fit: folder.train.clone(),
                select: val.clone(),
                select_source: "val",
                report: val.clone(),
                report_source: "val",
                test: Some(test.clone()),
            },
            (Some(val), None) => {
                let (fit, select) = select_holdout(&folder.train)?;
                Splits {
                    fit,
                    select,
                    select_source: "train holdout",
                    report: val.clone(),
                    report_source: if folder.val_split.as_deref() == Some("test") {
                        "test"
                    } else {
                        "val"
                    },
                    test: None,
                }
            }
            (None, _) => {
                let (train, report) =
                    stratified_holdout(&folder.train, classes, fraction, seed, Purpose::Report)?;
                let (fit, select) = select_holdout(&train)?;
                Splits {
                    fit,
                    select,
                    select_source: "train holdout",
                    report,
                    report_source: "holdout",
                    test: None,
                }
            }
        })
    }

    /// Whether the reported images are untouched by every choice.
    pub fn report_is_held_out(&self) -> bool {
        self.select_source != "val"
    }

    /// Every image once, in the order fit, select, report, test.
    pub fn all(&self) -> Vec<Sample> {
        let mut seen = HashSet::new();
        let test = self.test.as_deref().unwrap_or_default();
        [&self.fit[..], &self.select, &self.report, test]
            .concat()
            .into_iter()
            .filter(|s| seen.insert(s.path.clone()))
            .collect()
    }

    /// One line for the compile's output: counts by role, and per class for training.
    pub fn describe(&self, data: &Path, classes: &[String]) -> String {
        let counts = graft_runtime::dataset::counts(&self.fit, classes.len());
        let per_class = classes
            .iter()
            .zip(&counts)
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let measured = match &self.test {
            Some(test) => format!(
                "{} held out (val also measured)",
                count(test.len(), "test image")
            ),
            None => format!(
                "{} held out",
                count(self.report.len(), &format!("{} image", self.report_source))
            ),
        };
        format!(
            "data      {}: {} classes, {} ({per_class}), {} for choices, {measured}",
            data.display(),
            classes.len(),
            count(self.fit.len(), "train image"),
            count(self.select.len(), &format!("{} image", self.select_source)),
        )
    }
}

/// What a holdout is for (its error message and its random stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The validation images of a folder without a split.
    Report,
    /// The images choices are made on, carved from the training images.
    Choices,
}

/// Holds out `fraction` of each class of `samples` (at least one image, at most all but one),
/// chosen by a seeded shuffle; both halves keep the input order.
fn stratified_holdout(
    samples: &[Sample],
    classes: &[String],
    fraction: f32,
    seed: u64,
    purpose: Purpose,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let stream = match purpose {
        Purpose::Report => "validation-split",
        Purpose::Choices => "selection-split",
    };
    let mut rng = Rng::new(seed, stream);
    let mut held = vec![false; samples.len()];
    for (label, class) in classes.iter().enumerate() {
        let mut members: Vec<usize> = (0..samples.len())
            .filter(|&i| samples[i].label == label)
            .collect();
        if members.len() < 2 {
            let why = match purpose {
                Purpose::Report => "to hold one out for validation (or provide DIR/train and DIR/val)",
                Purpose::Choices => "for training: one is held out of them to choose the epoch and other settings on (or provide DIR/train, DIR/val and DIR/test)",
            };
            return Err(CompileError::NotEnoughData(format!(
                "class {class:?} has {} image(s): at least 2 are needed {why}",
                members.len()
            )));
        }
        let k = ((members.len() as f32 * fraction).round() as usize).clamp(1, members.len() - 1);
        rng.shuffle(&mut members);
        for &i in &members[..k] {
            held[i] = true;
        }
    }
    let (mut kept, mut out) = (Vec::new(), Vec::new());
    for (sample, held) in samples.iter().zip(held) {
        if held {
            out.push(sample.clone());
        } else {
            kept.push(sample.clone());
        }
    }
    Ok((kept, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(per_class: &[usize], prefix: &str) -> Vec<Sample> {
        let mut out = Vec::new();
        for (label, &n) in per_class.iter().enumerate() {
            for i in 0..n {
                out.push(Sample {
                    path: format!("{prefix}/{label}/{i}.jpg").into(),
                    label,
                });
            }
        }
        out
    }

    fn folder(per_class: &[usize], val: Option<&[usize]>, test: Option<&[usize]>) -> ImageFolder {
        ImageFolder {
            root: "d".into(),
            classes: (0..per_class.len()).map(|c| format!("c{c}")).collect(),
            train: samples(per_class, "train"),
            val: val.map(|v| samples(v, "val")),
            val_split: val.map(|_| "val".into()),
            test: test.map(|t| samples(t, "test")),
            ignored_files: 0,
        }
    }

    #[test]
    fn holdout_is_stratified_seeded_and_disjoint() {
        let f = folder(&[10, 5, 2], None, None);
        let holdout =
            |seed| stratified_holdout(&f.train, &f.classes, 0.2, seed, Purpose::Report).unwrap();
        let (train, val) = holdout(1);
        let val_counts = graft_runtime::dataset::counts(&val, 3);
        assert_eq!(val_counts, [2, 1, 1]);
        assert_eq!(train.len() + val.len(), 17);
        assert!(val.iter().all(|v| !train.contains(v)));
        assert_eq!(holdout(1).1, val);
        assert_ne!(holdout(2).1, val);
    }

    #[test]
    fn holdout_needs_two_images_per_class() {
        let f = folder(&[3, 1], None, None);
        let err = stratified_holdout(&f.train, &f.classes, 0.2, 1, Purpose::Report).unwrap_err();
        assert!(
            err.to_string().starts_with("class \"c1\" has 1 image(s)"),
            "{err}"
        );
    }

    /// Choices never see the reported images, whatever the layout.
    #[test]
    fn choices_and_reported_images_never_overlap() {
        let flat = Splits::of(&folder(&[20, 10], None, None), 0.2, 7).unwrap();
        let with_val = Splits::of(&folder(&[20, 10], Some(&[4, 4]), None), 0.2, 7).unwrap();
        for s in [&flat, &with_val] {
            assert!(s.report_is_held_out());
            let fit: HashSet<_> = s.fit.iter().map(|x| &x.path).collect();
            for x in s.select.iter().chain(&s.report) {
                assert!(!fit.contains(&x.path));
            }
            assert!(s.report.iter().all(|r| !s.select.contains(r)));
            assert_eq!(s.select_source, "train holdout");
        }
        assert_eq!(flat.report_source, "holdout");
        assert_eq!(flat.fit.len() + flat.select.len() + flat.report.len(), 30);
        assert_eq!(with_val.report_source, "val");
        assert_eq!(with_val.report.len(), 8);
        assert_eq!(with_val.fit.len() + with_val.select.len(), 30);

        let three = Splits::of(&folder(&[20, 10], Some(&[4, 4]), Some(&[3, 3])), 0.2, 7).unwrap();
        assert!(!three.report_is_held_out());
        assert_eq!((three.fit.len(), three.select_source), (30, "val"));
        assert_eq!(three.test.as_ref().unwrap().len(), 6);
        assert_eq!(three.all().len(), 30 + 8 + 6);
    }
}
