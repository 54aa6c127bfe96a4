//! Accuracy, per-class precision and recall, and confusion matrices; parallel evaluation of a
//! model over labelled images.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::dataset::Sample;
use crate::model::Model;
use crate::parallel::par_map;
use crate::progress::Progress;

/// Confusion matrix, `counts[true][predicted]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfusionMatrix {
    /// Counts indexed by true then predicted class.
    pub counts: Vec<Vec<u64>>,
}

/// Precision, recall and support of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassStats {
    /// Class name.
    pub label: String,
    /// Fraction of predictions of this class that were right (0 when never predicted).
    pub precision: f32,
    /// Fraction of images of this class predicted as such (0 when there are none).
    pub recall: f32,
    /// Number of images of this class.
    pub support: u64,
}

impl ConfusionMatrix {
    /// An all-zero matrix for `classes` classes.
    pub fn new(classes: usize) -> ConfusionMatrix {
        ConfusionMatrix {
            counts: vec![vec![0; classes]; classes],
        }
    }

    /// Builds the matrix from `(true, predicted)` pairs.
    pub fn from_pairs(classes: usize, pairs: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut m = ConfusionMatrix::new(classes);
        for (t, p) in pairs {
            m.add(t, p);
        }
        m
    }

    /// Records one prediction.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        self.counts[truth][predicted] += 1;
    }

    /// Total number of predictions.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Fraction of correct predictions (0 when empty).
    pub fn accuracy(&self) -> f32 {
        let correct: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        ratio(correct, self.total())
    }

    /// Precision, recall and support for each class.
    pub fn per_class(&self, labels: &[String]) -> Vec<ClassStats> {
        (0..self.counts.len())
            .map(|c| {
                let support: u64 = self.counts[c].iter().sum();
                let predicted: u64 = self.counts.iter().map(|row| row[c]).sum();
                ClassStats {
                    label: labels[c].clone(),
                    precision: ratio(self.counts[c][c], predicted),
                    recall: ratio(self.counts[c][c], support),
                    support,
                }
            })
            .collect()
    }

    /// A plain-text rendering with class names, for terminals.
    pub fn display<'a>(&'a self, labels: &'a [String]) -> impl fmt::Display + 'a {
        ConfusionTable {
            matrix: self,
            labels,
        }
    }
}

fn ratio(n: u64, d: u64) -> f32 {
    if d == 0 {
        0.0
    } else {
        n as f32 / d as f32
    }
}

struct ConfusionTable<'a> {
    matrix: &'a ConfusionMatrix,
    labels: &'a [String],
}

impl fmt::Display for ConfusionTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0)
            .max("true \\ predicted".len());
        let cell_w = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .chain(std::iter::once(self.matrix.total().to_string().len()))
            .max()
            .unwrap_or(1)
            .max(5);
        write!(f, "{:<name_w$}", "true \\ predicted")?;
        for l in self.labels {
            write!(f, " {l:>cell_w$}")?;
        }
        writeln!(f, " {:>7} {:>7}", "recall", "n")?;
        for (stats, row) in self
            .matrix
            .per_class(self.labels)
            .iter()
            .zip(&self.matrix.counts)
        {
            write!(f, "{:<name_w$}", stats.label)?;
            for v in row {
                write!(f, " {v:>cell_w$}")?;
            }
            writeln!(f, " {:>7.3} {:>7}", stats.recall, stats.support)?;
        }
        write!(f, "{:<name_w$}", "precision")?;
        for stats in self.matrix.per_class(self.labels) {
            write!(f, " {:>cell_w$.3}", stats.precision)?;
        }
        writeln!(f)
    }
}

/// Result of running a model over labelled images.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// The model's labels.
    pub labels: Vec<String>,
    /// Predictions against truth.
    pub confusion: ConfusionMatrix,
    /// Images that could not be classified, with the reason.
    #[serde(serialize_with = "crate::paths::serialize_pairs")]
    pub failures: Vec<(PathBuf, String)>,
    /// Every misclassified image, in sample order.
    pub mistakes: Vec<Mistake>,
}

/// A misclassified image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mistake {
    /// The image file.
    #[serde(serialize_with = "crate::paths::serialize")]
    pub path: PathBuf,
    /// Index of its true label.
    pub truth: usize,
    /// Index of the predicted label.
    pub predicted: usize,
    /// Softmax probability of the predicted label.
    pub probability: f32,
}

impl Evaluation {
    /// Fraction of evaluated images classified correctly.
    pub fn accuracy(&self) -> f32 {
        self.confusion.accuracy()
    }
}

/// Classifies every sample (labels already in the model's label order) and tallies the results.
/// Images that fail to decode are recorded in [`Evaluation::failures`] and left out; once
/// `progress` reports cancellation, the remaining images are left out silently.
pub fn evaluate(
    model: &Model,
    samples: &[Sample],
    threads: usize,
    progress: &dyn Progress,
) -> Evaluation {
    let labels = model.labels().to_vec();
    progress.start("evaluating", samples.len());
    let outcomes = par_map(
        samples,
        threads,
        |s| {
            (!progress.cancelled()).then(|| {
                model.classify_path(&s.path).map(|c| {
                    let top = c.top1();
                    (top, c.probabilities[top])
                })
            })
        },
        || progress.advance(),
    );
    progress.finish();
    let mut confusion = ConfusionMatrix::new(labels.len());
    let mut failures = Vec::new();
    let mut mistakes = Vec::new();
    for (sample, outcome) in samples.iter().zip(outcomes) {
        match outcome {
            Some(Ok((predicted, probability))) => {
                confusion.add(sample.label, predicted);
                if predicted != sample.label {
                    mistakes.push(Mistake {
                        path: sample.path.clone(),
                        truth: sample.label,
                        predicted,
                        probability,
                    });
                }
            }
            Some(Err(e)) => failures.push((sample.path.clone(), e.to_string())),
            None => {}
        }
    }
    Evaluation {
        labels,
        confusion,
        failures,
        mistakes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_from_a_known_matrix() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let m = ConfusionMatrix::from_pairs(2, [(0, 0), (0, 0), (0, 1), (1, 1)]);
        assert_eq!(m.accuracy(), 0.75);
        let stats = m.per_class(&labels);
        assert_eq!(
            (stats[0].precision, stats[0].recall, stats[0].support),
            (1.0, 2.0 / 3.0, 3)
        );
        assert_eq!((stats[1].precision, stats[1].recall), (0.5, 1.0));
        let text = m.display(&labels).to_string();
        assert!(text.contains("true \\ predicted"), "{text}");
        assert_eq!(ConfusionMatrix::new(3).accuracy(), 0.0);
    }
}
