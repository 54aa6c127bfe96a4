//! `graft advise` on the real Lite0 fixture and the fixture photos: it probes one cut per
//! resolution stage and the default, measures the photos' similarity to ImageNet, recommends a
//! head on the frozen backbone (ants and bees are ImageNet classes, and 24 training images a
//! class are too few to fine-tune), and `compile --strategy auto` follows it from a warm cache.
//! Also: one forward pass for several cuts gives each cut's features exactly.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use graft_compiler::backbone::cut::MultiCut;
use graft_compiler::backbone::import::Backbone;
use graft_compiler::features::FeatureExtractor;
use graft_runtime::dataset::ImageFolder;
use graft_runtime::preprocess::{Normalization, Preprocessing};
use graft_runtime::progress::NoProgress;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

#[derive(serde::Deserialize)]
struct Advice {
    train_per_class: Vec<usize>,
    probes: Vec<Probe>,
    similarity: Option<Similarity>,
    recommendation: Recommendation,
}

#[derive(serde::Deserialize)]
struct Probe {
    tensor: String,
    default: bool,
    cv: Cv,
}

#[derive(serde::Deserialize)]
struct Cv {
    accuracy: f32,
    fold_accuracies: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Similarity {
    classes: usize,
    mean_top1_probability: f32,
}

#[derive(serde::Deserialize)]
struct Recommendation {
    strategy: String,
    cut: String,
    head: String,
    unfreeze: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct CompileJson {
    cache_hits: usize,
    computed: usize,
    manifest: Manifest,
}

#[derive(serde::Deserialize)]
struct Manifest {
    head: Head,
    metrics: Metrics,
}

#[derive(serde::Deserialize)]
struct Head {
    kind: String,
}

#[derive(serde::Deserialize)]
struct Metrics {
    val_accuracy: f32,
}

#[test]
fn advise_probes_each_stage_and_compile_auto_follows_it_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let plot = dir.path().join("probes.svg");
    let advise = |extra: &[&OsStr]| {
        TestCommand::advise(graft(), &lite0(), &hymenoptera_mini())
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra)
            .run()
    };
    let out =
        advise(&[OsStr::new("--plot"), plot.as_os_str(), OsStr::new("--json")]).expect_code(0);
    let advice: Advice = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(advice.train_per_class, [24, 24]);
    let tensors: Vec<&str> = advice.probes.iter().map(|p| p.tensor.as_str()).collect();
    assert_eq!(
        tensors,
        [
            "/_blocks.4/Add_output_0",
            "/_blocks.10/Add_output_0",
            "/_blocks.14/Add_output_0",
            "features"
        ]
    );
    for probe in &advice.probes {
        assert_eq!(probe.cv.fold_accuracies.len(), 5);
        assert!((0.0..=1.0).contains(&probe.cv.accuracy));
    }
    let top = advice.probes.iter().find(|p| p.default).unwrap();
    assert!(
        top.cv.accuracy >= 0.85,
        "features probe {}",
        top.cv.accuracy
    );
    assert!(
        top.cv.accuracy > advice.probes[0].cv.accuracy,
        "the pooled features beat block 4's 40 channels"
    );
    let similarity = advice
        .similarity
        .expect("Lite0 has its ImageNet classifier");
    assert_eq!(similarity.classes, 1000);
    assert!(
        similarity.mean_top1_probability > 0.5,
        "ants and bees look like ImageNet: {}",
        similarity.mean_top1_probability
    );
    let r = &advice.recommendation;
    assert_eq!(
        (
            r.strategy.as_str(),
            r.cut.as_str(),
            r.head.as_str(),
            r.unfreeze.clone()
        ),
        ("head", "features", "logreg", None)
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches("<circle").count(), 4, "{svg}");

    let text = advise(&[]).expect_code(0);
    assert!(
        text.stdout
            .contains("advice      head: graft compile ... --cut features --head logreg"),
        "{}",
        text.stdout
    );

    let artifact = dir.path().join("auto.graft");
    let compile = |extra: &[&OsStr]| {
        TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &artifact)
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra)
            .run()
    };
    let auto = compile(&[
        OsStr::new("--strategy"),
        OsStr::new("auto"),
        OsStr::new("--json"),
    ])
    .expect_code(0);
    assert!(
        auto.stderr
            .contains("advice    compiling with --cut features --head logreg"),
        "{}",
        auto.stderr
    );
    let report: CompileJson = serde_json::from_str(&auto.stdout).unwrap();
    assert_eq!(
        (report.cache_hits, report.computed),
        (48, 24),
        "advise cached the 48 training images' features, not the 24 validation images'"
    );
    assert_eq!(report.manifest.head.kind, "logreg");
    assert!(
        report.manifest.metrics.val_accuracy >= 0.8,
        "{}",
        report.manifest.metrics.val_accuracy
    );

    let conflict = compile(&[
        OsStr::new("--strategy"),
        OsStr::new("auto"),
        OsStr::new("--cut"),
        OsStr::new("features"),
    ])
    .expect_code(1);
    assert_eq!(
        conflict.error_line(),
        "error: --strategy auto chooses the cut and the blocks to retrain: leave out --cut and --unfreeze-from"
    );
}

#[test]
fn one_pass_over_several_cuts_equals_each_cut_alone() {
    let backbone = Backbone::load(&lite0(), None).unwrap();
    let preprocessing = Preprocessing::for_input(224, 224, Normalization::tf());
    let folder = ImageFolder::scan(&hymenoptera_mini()).unwrap();
    let samples = &folder.train[..3];
    let cuts = vec!["/_blocks.10/Add_output_0".to_string(), "features".into()];
    let many = MultiCut::new(&backbone, &cuts).unwrap();
    let together = FeatureExtractor::for_cuts(&many, &backbone, &preprocessing)
        .unwrap()
        .extract_outputs(samples, &[None, None], 1, &NoProgress)
        .unwrap();
    assert_eq!(together.len(), 2);
    for (cut, joint) in cuts.iter().zip(&together) {
        let alone = FeatureExtractor::new(&backbone.clone().cut(cut).unwrap(), &preprocessing)
            .unwrap()
            .extract(samples, None, 1, &NoProgress)
            .unwrap();
        assert_eq!(joint.features.dim, alone.features.dim);
        let worst = joint
            .features
            .data
            .iter()
            .zip(&alone.features.data)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{cut}: relative difference {worst}");
    }
}
