//! Fine-tuning Lite0: the translated top of the backbone computes what tract computes, a
//! fine-tune of the top 2 blocks on the fixture photos trains, writes back and runs end to end,
//! and bad fine-tuning options fail with exit 1 and a message.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use graft_compiler::backbone::cut::CutBackbone;
use graft_compiler::backbone::import::Backbone;
use graft_compiler::features::FeatureExtractor;
use graft_compiler::finetune::{TrainablePart, Unfreeze};
use graft_runtime::preprocess::{Normalization, Preprocessing};

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

fn fixture_images() -> Vec<std::path::PathBuf> {
    ["train/ants", "val/bees"]
        .iter()
        .map(|d| {
            let dir = hymenoptera_mini().join(d);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            files.remove(0)
        })
        .collect()
}

/// The candle translation of the top blocks (or of the whole network), fed by tract's frozen
/// prefix, gives the features tract computes for the whole cut graph (relative difference
/// <= 1e-4).
#[test]
fn translated_top_blocks_match_tract() {
    let backbone = Backbone::load(&lite0(), None).unwrap();
    let blocks = backbone.blocks("features");
    assert_eq!(blocks.len(), 18, "stem, 16 MBConv blocks, head conv");
    assert_eq!(blocks[17].name, "/_conv_head");
    let preprocessing = Preprocessing::for_input(224, 224, Normalization::tf());
    let cut: CutBackbone = backbone.clone().cut("features").unwrap();
    let reference = FeatureExtractor::new(&cut, &preprocessing).unwrap();
    for (unfreeze, boundary) in [
        (Unfreeze::Blocks(2), "/_blocks.14/Add_output_0"),
        (
            Unfreeze::Blocks(5),
            "/_blocks.11/_project_conv/Conv_output_0",
        ),
    ] {
        let part = TrainablePart::new(&backbone, "features", &unfreeze, &Device::Cpu).unwrap();
        assert_eq!(part.boundary, boundary, "{unfreeze:?}");
        for path in fixture_images() {
            let chw = preprocessing.apply(&preprocessing.load(&path).unwrap());
            let bytes = std::fs::read(&path).unwrap();
            let expected = reference.features_of(&bytes, &path).unwrap();
            let boundary_values = part.boundary_of(chw).unwrap();
            let input =
                Tensor::from_vec(boundary_values, part.boundary_len(), &Device::Cpu).unwrap();
            let got = part
                .features(&input, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let difference = relative_difference(&got, &expected);
            assert!(
                difference <= 1e-4,
                "{unfreeze:?}, {}: relative difference {difference}",
                path.display(),
            );
        }
    }
}

#[derive(serde::Deserialize)]
struct Report {
    artifact_val_accuracy: f32,
    manifest: graft_runtime::artifact::Manifest,
}

/// Fine-tuning the top 2 blocks trains, is written back into the backbone, and the artifact
/// classifies the fixture validation photos; tract and candle agree on the fine-tuned accuracy.
#[test]
fn finetune_top_blocks_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ft.graft");
    let run = TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &out)
        .args(args![
            "--no-cache",
            "--strategy",
            "finetune",
            "--unfreeze",
            "2",
            "--finetune-epochs",
            "2",
            "--optimizer",
            "sgd",
            "--backbone-lr",
            "0.001",
            "--json"
        ])
        .run()
        .expect_code(0);
    let report: Report = serde_json::from_str(&run.stdout).unwrap();
    assert!(
        report.artifact_val_accuracy >= 0.9,
        "accuracy {} on 24 photos",
        report.artifact_val_accuracy
    );
    let transfer = report.manifest.training.unwrap().transfer.unwrap();
    assert_eq!(transfer.strategy, "finetune");
    assert_eq!(transfer.boundary, "/_blocks.14/Add_output_0");
    assert_eq!(transfer.unfrozen_blocks, ["/_blocks.15", "/_conv_head"]);
    assert_eq!(transfer.optimizer, "sgd");
    assert_eq!(transfer.epochs_run, 2);
    assert!(transfer.train_images_per_second > 0.0);
    let check = run
        .stderr
        .lines()
        .find(|l| l.starts_with("check     fine-tuned backbone in tract"))
        .expect("check line");
    let numbers: Vec<&str> = check
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|s| s.len() > 2 && s.contains('.'))
        .collect();
    assert_eq!(numbers[0], numbers[1], "tract vs candle accuracy: {check}");

    let inspect = common::run(graft(), args!["inspect", out]).expect_code(0);
    assert!(
        inspect.stdout.contains(
            "finetune from \"/_blocks.14/Add_output_0\": 2 blocks (1013696 weights), sgd"
        ),
        "{}",
        inspect.stdout
    );
}

#[test]
fn bad_finetune_options_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.graft");
    let compile = |extra: &[&str]| {
        TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &out)
            .args(["--no-cache", "--epochs", "1"])
            .args(extra)
            .run()
    };
    let r = compile(&["--strategy", "finetune", "--unfreeze", "19"]).expect_code(1);
    assert_eq!(
        r.error_line(),
        "error: --unfreeze 19: the backbone has only 18 blocks with weights before \"features\""
    );
    let r = compile(&[
        "--strategy",
        "finetune",
        "--unfreeze-from",
        "/_blocks.14/_swish/Clip_output_0",
    ])
    .expect_code(1);
    assert!(
        r.error_line().starts_with(
            "error: cannot train node \"/_blocks.13/Add\": the trainable part computing \"features\" reads \"/_blocks.13/Add_output_0\""
        ),
        "{}",
        r.error_line()
    );
    let r = compile(&["--strategy", "finetune", "--unfreeze", "0"]).expect_code(1);
    assert!(r
        .stderr
        .contains("expected a number of top blocks (1 or more) or \"all\""));
    if !cfg!(feature = "cuda") {
        let r = compile(&["--strategy", "finetune", "--device", "cuda"]).expect_code(1);
        assert!(r
            .error_line()
            .starts_with("error: --device cuda: this graft was built without CUDA"));
    }
    assert!(!out.exists(), "no artifact after a failed compile");
}
