//! The imported backbone is the original model: an artifact of the unmodified Lite0 (its own
//! ImageNet classifier kept) gives the logits onnxruntime gives, and the same top-1 as the ONNX
//! run by tract on the imagenet-sample photos.

mod common;

use std::path::Path;

use common::*;
use graft_compiler::pipeline::{compile, CompileOptions};
use graft_runtime::preprocess::Normalization;
use graft_runtime::progress::NoProgress;
use graft_runtime::Model;

/// Compiles the fixture backbone with its own classifier kept, `(x - 127) / 128` normalisation.
fn imagenet_artifact(dir: &Path) -> Model {
    let out = dir.join("imagenet.graft");
    let options = CompileOptions {
        keep_imagenet_head: true,
        labels_file: Some(fixtures().join("imagenet-labels.txt")),
        normalization: Some(Normalization::tf()),
        verify: false,
        ..CompileOptions::new(lite0(), &out)
    };
    compile(&options, &NoProgress).expect("compile with the ImageNet head");
    Model::load(&out).expect("load the artifact")
}

#[derive(serde::Deserialize)]
struct GoldenEntry {
    file: String,
    imagenet_index: usize,
}

/// `fixtures/golden` holds 224x224 crops and the logits onnxruntime computed for them
/// (`fixtures/make_fixtures.py`); the artifact must reproduce them within 1e-3.
#[test]
fn artifact_logits_match_onnxruntime_on_golden_crops() {
    let dir = tempfile::tempdir().unwrap();
    let model = imagenet_artifact(dir.path());
    assert_eq!(model.labels().len(), 1000);
    assert_eq!(model.labels()[0], "tench");
    let golden = fixtures().join("golden");
    let index: Vec<GoldenEntry> =
        serde_json::from_slice(&std::fs::read(golden.join("index.json")).unwrap()).unwrap();
    let ort = read_f32_file(&golden.join("ort_logits.f32"));
    assert_eq!(ort.len(), index.len() * 1000);
    let mut worst = 0f32;
    let mut correct = 0;
    for (i, entry) in index.iter().enumerate() {
        let chw = golden_tensor(&golden.join(&entry.file));
        let result = model.classify_tensor(&chw).unwrap();
        let reference = &ort[i * 1000..(i + 1) * 1000];
        worst = worst.max(max_abs_difference(&result.logits, reference));
        let ort_top1 = (0..1000)
            .max_by(|&a, &b| reference[a].total_cmp(&reference[b]))
            .unwrap();
        assert_eq!(result.top1(), ort_top1, "{}", entry.file);
        correct += (result.top1() == entry.imagenet_index) as usize;
    }
    assert!(worst <= 1e-3, "max |logit - onnxruntime| = {worst}");
    assert!(
        correct >= 12,
        "only {correct}/16 golden crops classified correctly"
    );
    eprintln!("golden: max |logit - onnxruntime| = {worst:.2e}, top-1 {correct}/16");
}

/// On the 1,000 imagenet-sample photos (skipped without ../shared): the artifact, fed by graft's
/// own preprocessing, agrees with the original ONNX run by tract on the same tensor.
#[test]
fn artifact_agrees_with_the_onnx_model_on_imagenet_sample() {
    use tract_onnx::prelude::*;
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = imagenet_artifact(dir.path());
    let original = tract_onnx::onnx()
        .model_for_path(lite0())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap();
    let root = shared.join("datasets/imagenet-sample");
    let csv = std::fs::read_to_string(root.join("labels.csv")).unwrap();
    let rows: Vec<(String, usize)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), 1000);
    let preprocessing = model.manifest().preprocessing.clone();
    let results = graft_runtime::parallel::par_map(
        &rows,
        2,
        |(path, label)| {
            let image = preprocessing.load(&root.join(path)).unwrap();
            let chw = preprocessing.apply(&image);
            let ours = model.classify_tensor(&chw).unwrap();
            let input = Tensor::from_shape(&[1, 3, 224, 224], &chw).unwrap();
            let theirs = original.run(tvec!(input.into_tvalue())).unwrap();
            let theirs = theirs[0].view().as_slice::<f32>().unwrap().to_vec();
            let diff = ours
                .logits
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let their_top1 = (0..1000)
                .max_by(|&a, &b| theirs[a].total_cmp(&theirs[b]))
                .unwrap();
            (ours.top1(), their_top1, *label, diff)
        },
        || {},
    );
    let agree = results.iter().filter(|r| r.0 == r.1).count();
    let ours_correct = results.iter().filter(|r| r.0 == r.2).count();
    let theirs_correct = results.iter().filter(|r| r.1 == r.2).count();
    let worst = results.iter().map(|r| r.3).fold(0f32, f32::max);
    eprintln!(
        "imagenet-sample: top-1 agreement {agree}/1000, top-1 accuracy graft {ours_correct}/1000, onnx {theirs_correct}/1000, max |logit diff| {worst:.2e}"
    );
    assert!(agree >= 990, "top-1 agreement {agree}/1000 below 99 %");
    assert!(worst <= 1e-3, "max |logit diff| {worst}");
}
