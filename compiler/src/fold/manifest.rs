//! Artifact: assemble the manifest that travels with the folded graph. The container format
//! itself (magic, version, checksum, atomic write) lives in `graft_runtime::artifact`, next to
//! its reader.

use std::collections::BTreeMap;

use graft_runtime::artifact::{
    BackboneInfo, HeadInfo, Manifest, TensorSpec, TrainingInfo, TransferInfo,
};
use graft_runtime::Preprocessing;

use crate::backbone::cut::CutBackbone;
use crate::head::train::{HeadKind, TrainConfig, TrainedHead, CV_FOLDS, LAMBDA_PATH};

/// tract version the compiler is built against (checked against Cargo.lock by a test).
pub const TRACT_VERSION: &str = "0.23.9";
/// candle version the compiler is built against (checked against Cargo.lock by a test).
pub const CANDLE_VERSION: &str = "0.11.1";

/// What the manifest says about the head.
#[derive(Debug, Clone)]
pub struct HeadSummary {
    info: HeadInfo,
    training: Option<TrainingInfo>,
}

impl HeadSummary {
    /// A head trained by graft.
    pub fn trained(head: &TrainedHead, config: &TrainConfig) -> HeadSummary {
        HeadSummary {
            info: HeadInfo {
                kind: head.kind.to_string(),
                layers: head.layers.iter().map(|l| [l.inputs, l.outputs]).collect(),
            },
            training: Some(TrainingInfo {
                seed: config.seed,
                optimizer: match head.kind {
                    HeadKind::LogReg => format!(
                        "accelerated gradient descent, L2 {} chosen by {CV_FOLDS}-fold CV",
                        LAMBDA_PATH[head.best_epoch - 1]
                    ),
                    HeadKind::Svm => format!(
                        "Pegasos, L2 {} chosen by {CV_FOLDS}-fold CV",
                        LAMBDA_PATH[head.best_epoch - 1]
                    ),
                    _ => "AdamW".into(),
                },
                learning_rate: config.learning_rate,
                weight_decay: config.weight_decay,
                batch_size: config.batch_size,
                epochs_run: head.history.len(),
                best_epoch: head.best_epoch,
                history: head.history.clone(),
                balanced_classes: config.balance_classes,
                transfer: None,
            }),
        }
    }

    /// Records how the backbone was trained too (fine-tuning or from scratch).
    pub fn with_transfer(mut self, transfer: Option<TransferInfo>) -> HeadSummary {
        if let Some(training) = self.training.as_mut() {
            training.transfer = transfer;
        }
        self
    }

    /// The backbone's own classifier, kept as is.
    pub fn backbone_classifier(classes: usize) -> HeadSummary {
        HeadSummary {
            info: HeadInfo {
                kind: "backbone".into(),
                layers: vec![[classes, classes]],
            },
            training: None,
        }
    }
}

/// The manifest for an artifact built from `cut` with `labels`; metrics are filled in later.
pub fn manifest_for(
    cut: &CutBackbone,
    preprocessing: &Preprocessing,
    labels: &[String],
    head: &HeadSummary,
) -> Manifest {
    let backbone = cut.backbone();
    let versions = BTreeMap::from([
        ("graft".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("tract".to_string(), TRACT_VERSION.to_string()),
        ("candle".to_string(), CANDLE_VERSION.to_string()),
    ]);
    Manifest {
        producer: format!("graft-compiler {}", env!("CARGO_PKG_VERSION")),
        labels: labels.to_vec(),
        preprocessing: preprocessing.clone(),
        input: TensorSpec {
            name: backbone.input_name().to_string(),
            shape: backbone.input_shape().to_vec(),
        },
        outputs: vec!["probabilities".into(), "logits".into()],
        precision: "f32".into(),
        weights: Default::default(),
        quantization: None,
        backbone: BackboneInfo {
            file_name: backbone.file_name(),
            sha256: backbone.sha256().to_string(),
            cut: cut.cut_name().to_string(),
            feature_shape: cut.cut_shape().to_vec(),
        },
        head: head.info.clone(),
        training: head.training.clone(),
        metrics: None,
        versions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_versions_match_cargo_lock() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
            .expect("Cargo.lock at the workspace root");
        for (name, version) in [
            ("tract-core", TRACT_VERSION),
            ("candle-core", CANDLE_VERSION),
        ] {
            let entry = format!("name = \"{name}\"\nversion = \"{version}\"");
            assert!(
                lock.contains(&entry),
                "Cargo.lock does not pin {name} {version}"
            );
        }
    }
}
