//! Writes the seed corpus: a tiny but complete artifact (a 4x4 RGB input, mean pooled, a 3->2
//! dense layer and a softmax; a toy graph for the fuzzer only) and copies of the odd-encoding
//! image fixtures, a small feature-cache file and a probe-cache file.
//!
//! usage: cargo run --manifest-path fuzz/Cargo.toml --bin make_seeds

use std::collections::BTreeMap;
use std::path::Path;

use graft_runtime::artifact::{encode, BackboneInfo, HeadInfo, Manifest, TensorSpec};
use graft_runtime::preprocess::{Normalization, Preprocessing};
use tract_core::internal::*;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::nn::{Reduce, Reducer, Softmax, SoftmaxKind};

#[path = "../../../compiler/src/features/cache_file.rs"]
#[allow(dead_code)]
mod cache_file;

fn toy_graph() -> TractResult<TypedModel> {
    let mut model = TypedModel::default();
    let input = model.add_source("input", f32::fact([1, 3, 4, 4]))?;
    let sum = model.wire_node("sum", Reduce::new(tvec![2, 3], Reducer::Sum), &[input])?[0];
    let w = model.wire_node("squeeze_w", AxisOp::Rm(3), &[sum])?[0];
    let features = model.wire_node("squeeze_h", AxisOp::Rm(2), &[w])?[0];
    let weight = model.add_const("weight", tensor2(&[[0.1f32, 0.2, 0.3], [-0.3, 0.2, -0.1]]))?;
    let axes = AxesMapping::for_numpy_matmul(2, false, true, false)?;
    let logits = model.wire_node("matmul", EinSum::new(axes, f32::datum_type()), &[features, weight])?[0];
    let probabilities = model.wire_node("softmax", Softmax::new(tvec![1], None, SoftmaxKind::Softmax), &[logits])?[0];
    model.select_output_outlets(&[probabilities, logits])?;
    model.into_decluttered()
}

fn main() -> TractResult<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let graph = tract_nnef::nnef().write_to_tar_with_config(&toy_graph()?, Vec::new(), false, true)?;
    let mut preprocessing = Preprocessing::for_input(4, 4, Normalization::unit());
    preprocessing.resize_shorter = 4;
    let manifest = Manifest {
        producer: "graft-fuzz seed".into(),
        labels: vec!["a".into(), "b".into()],
        preprocessing,
        input: TensorSpec { name: "input".into(), shape: vec![1, 3, 4, 4] },
        outputs: vec!["probabilities".into(), "logits".into()],
        precision: "f32".into(),
        weights: Default::default(),
        quantization: None,
        backbone: BackboneInfo {
            file_name: "toy".into(),
            sha256: "00".into(),
            cut: "sum".into(),
            feature_shape: vec![1, 3],
        },
        head: HeadInfo { kind: "linear".into(), layers: vec![[3, 2]] },
        training: None,
        metrics: None,
        versions: BTreeMap::new(),
    };
    let corpus = root.join("corpus/artifact_load");
    std::fs::create_dir_all(&corpus)?;
    std::fs::write(corpus.join("toy.graft"), encode(&manifest, &graph))?;
    let model = graft_runtime::Model::from_artifact(graft_runtime::Artifact::from_bytes(
        encode(&manifest, &graph),
        "toy",
    )?)?;
    println!("toy artifact classifies: {:?}", model.classify_tensor(&[0.5; 48])?.probabilities);

    let images = root.join("corpus/image_preprocess");
    std::fs::create_dir_all(&images)?;
    for entry in std::fs::read_dir(root.join("../fixtures/odd-images"))? {
        let path = entry?.path();
        std::fs::copy(&path, images.join(path.file_name().unwrap()))?;
    }

    let caches = root.join("corpus/feature_cache");
    std::fs::create_dir_all(&caches)?;
    let hashes = [[1u8; 32], [2; 32], [3; 32]];
    let rows: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
    std::fs::write(caches.join("three-rows.bin"), cache_file::encode(4, &[7; 32], &hashes, &rows))?;

    let probes = root.join("corpus/probe_cache");
    std::fs::create_dir_all(&probes)?;
    std::fs::write(
        probes.join("tf.json"),
        r#"{"scores": [["imagenet", -0.839], ["tf", -0.549], ["unit", -0.941]], "chosen": "tf", "method": "mean log-probability"}"#,
    )?;
    Ok(())
}
