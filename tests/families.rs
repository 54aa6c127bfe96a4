//! Every CNN family, not only EfficientNet-Lite: the small fixture backbones of
//! `fixtures/families/` (random weights, the operators and shapes real exports have; see
//! `make_families.py`) import with a default cut, reproduce onnxruntime's logits, translate to
//! candle as tract computes them, and compile with a new head, in int8 and with fine-tuning.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use graft_compiler::backbone::import::Backbone;
use graft_compiler::finetune::{TrainablePart, Unfreeze};
use graft_compiler::pipeline::{compile, CompileOptions};
use graft_runtime::preprocess::{Normalization, Pipeline, Preprocessing};
use graft_runtime::progress::NoProgress;
use graft_runtime::Model;
use tract_onnx::prelude::{tvec, IntoRunnable, Tensor as TractTensor};

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

fn family(name: &str) -> PathBuf {
    fixtures().join("families").join(format!("{name}.onnx"))
}

/// The golden crops `make_families.py` gave onnxruntime: `(x - 127) / 128`, NCHW.
fn golden_crop(index: usize) -> Vec<f32> {
    let golden = fixtures().join("golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    golden_tensor(&files[index])
}

/// An artifact of the unmodified backbone gives onnxruntime's logits (within 1e-3) on four
/// golden crops: BN folding, ceil-mode pooling, shape arithmetic, LayerNorm and GELU survive
/// import, NNEF and the runtime.
fn reproduces_onnxruntime_logits(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let crops: Vec<Vec<f32>> = (0..4).map(golden_crop).collect();
    let out = dir.path().join(format!("{name}.graft"));
    let options = CompileOptions {
        keep_imagenet_head: true,
        normalization: Some(Normalization::tf()),
        verify: false,
        ..CompileOptions::new(family(name), &out)
    };
    compile(&options, &NoProgress).unwrap_or_else(|e| panic!("{name}: {e}"));
    let model = Model::load(&out).unwrap();
    let ort = read_f32_file(&fixtures().join(format!("families/{name}.logits.f32")));
    let mut worst = 0f32;
    for (i, crop) in crops.iter().enumerate() {
        let logits = model.classify_tensor(crop).unwrap().logits;
        assert_eq!(logits.len(), 1000, "{name}");
        worst = worst.max(max_abs_difference(&logits, &ort[i * 1000..(i + 1) * 1000]));
    }
    println!("{name:12} max |logit - onnxruntime| {worst:.2e}");
    assert!(worst <= 1e-3, "{name}: max |logit - onnxruntime| = {worst}");
}

/// The default cut is the input of its classifier (a Gemm, or SqueezeNet's 1x1
/// Conv), `inspect-backbone` marks it, and the graph has blocks to fine-tune.
fn has_a_default_cut_and_blocks(name: &str, cut: &str) {
    let backbone = Backbone::load(&family(name), None).unwrap();
    assert_eq!(backbone.default_cut().unwrap(), cut, "{name}");
    assert!(
        backbone.blocks(cut).len() >= 3,
        "{name}: {:?}",
        backbone.blocks(cut)
    );
    let listed = run(graft(), args!["inspect-backbone", family(name)]).expect_code(0);
    let marked = listed
        .stdout
        .lines()
        .find(|l| l.contains("<- default cut"))
        .unwrap_or_else(|| panic!("{name}: no default cut marked\n{}", listed.stdout));
    assert!(marked.contains(cut), "{name}: {marked}");
    let blocks = backbone.blocks(cut);
    let top = &blocks.last().unwrap().name;
    assert!(
        listed
            .stdout
            .contains(&format!("retrains the top N:\n  1. {top} (")),
        "{name}: blocks not listed\n{}",
        listed.stdout
    );
}

/// The candle translation of the top two blocks, fed by tract's frozen prefix, gives
/// the features tract computes for the whole cut graph (relative difference <= 1e-4).
fn translated_top_blocks_match_tract(name: &str, cut: &str) {
    let preprocessing = Preprocessing::for_input(224, 224, Normalization::tf());
    let photo = hymenoptera_mini().join("train/ants");
    let mut photos: Vec<PathBuf> = std::fs::read_dir(&photo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    photos.sort();
    let chw = preprocessing.apply(&preprocessing.load(&photos[0]).unwrap());
    let backbone = Backbone::load(&family(name), None).unwrap();
    let whole = backbone
        .prefix(cut)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = TractTensor::from_shape(&[1, 3, 224, 224], &chw).unwrap();
    let outputs = whole.run(tvec![input.into()]).unwrap();
    let mut expected: Vec<f32> = outputs[0].view().as_slice::<f32>().unwrap().to_vec();
    let channels = outputs[0].shape()[1];
    if expected.len() != channels {
        // A feature map (SqueezeNet's cut): the features are its global average.
        let area = expected.len() / channels;
        expected = expected
            .chunks(area)
            .map(|c| c.iter().sum::<f32>() / area as f32)
            .collect();
    }
    let part = TrainablePart::new(&backbone, cut, &Unfreeze::Blocks(2), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let boundary = part.boundary_of(chw.clone()).unwrap();
    let boundary = Tensor::from_vec(boundary, part.boundary_len(), &Device::Cpu).unwrap();
    let got = part
        .features(&boundary, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let difference = relative_difference(&got, &expected);
    println!(
        "{name:12} top 2 blocks {:?}, candle vs tract: relative difference {difference:.1e}",
        part.blocks,
    );
    assert!(
        difference <= 1e-4,
        "{name}: relative difference {difference}"
    );
}

/// A fixture photo upscaled to 4000x3000, saved as JPEG.
fn twelve_megapixel_photo(dir: &Path) -> PathBuf {
    let name = "hymenoptera-mini/val/bees/1181173278_23c36fac71.jpg";
    let source = graft_runtime::preprocess::load_image(&fixtures().join(name)).unwrap();
    let big = source.resize_exact(4000, 3000, image::imageops::FilterType::Triangle);
    let photo = dir.join("photo.jpg");
    big.to_rgb8().save(&photo).unwrap();
    photo
}

/// The artifact's fast pipeline (JPEG decoded at 1/8 scale, SIMD resize of the crop) gives
/// the probabilities the full-size reference pipeline gives, within 0.05.
fn fast_pipeline_agrees_with_reference(name: &str, artifact: &Path, photo: &Path) {
    let model = Model::load(artifact).unwrap();
    let fast = model.manifest().preprocessing.clone();
    assert_eq!(fast.pipeline, Pipeline::Fast, "{name}");
    let reference = Preprocessing {
        pipeline: Pipeline::Reference,
        ..fast.clone()
    };
    let a = model
        .classify_tensor(&fast.apply(&fast.load(photo).unwrap()))
        .unwrap();
    let b = model
        .classify_tensor(&reference.apply(&reference.load(photo).unwrap()))
        .unwrap();
    let worst = max_abs_difference(&a.probabilities, &b.probabilities);
    assert!(worst < 0.05, "{name}: probabilities differ by {worst}");
}

#[derive(serde::Deserialize)]
struct Report {
    manifest: graft_runtime::artifact::Manifest,
}

fn compile_family(name: &str, out: &Path, extra: &[&str]) -> Report {
    let mut options: Vec<&std::ffi::OsStr> = args![
        "--normalize",
        "tf",
        "--no-cache",
        "--epochs",
        "5",
        "--json",
        "--quiet"
    ]
    .to_vec();
    options.extend(extra.iter().map(std::ffi::OsStr::new));
    let output = compile_cmd(graft(), &family(name), &hymenoptera_mini(), out, &options);
    assert_eq!(output.code, 0, "{name} {extra:?}: {}", output.stderr);
    assert!(out.is_file(), "{name} {extra:?}");
    serde_json::from_str(&output.stdout).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Head, int8 and fine-tuning compiles run end to end on the fixture photos, and
/// the head artifact classifies a 12-megapixel photo through the fast pipeline as through the
/// full-size reference one.
/// int8 covers at least 80 % of the product multiply-adds (with the accuracy budget
/// lifted, so that the share measures what the rewrite can quantize, not what these random
/// weights lose).
fn compiles_head_int8_and_finetune(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let photo = twelve_megapixel_photo(dir.path());
    let head_path = dir.path().join(format!("{name}.graft"));
    let head = compile_family(name, &head_path, &[]);
    assert_eq!(head.manifest.labels, ["ants", "bees"], "{name}");
    fast_pipeline_agrees_with_reference(name, &head_path, &photo);

    let int8 = compile_family(
        name,
        &dir.path().join(format!("{name}.int8.graft")),
        &["--precision", "int8", "--accuracy-budget", "100"],
    );
    let q = int8.manifest.quantization.expect("int8 manifest");
    let share = q.int8_mac_fraction().expect("multiply-adds recorded");
    let int8 = q.layers.iter().filter(|l| l.precision == "int8").count();
    println!(
        "{name:12} int8 {int8}/{} layers, {:.1} % of {:.1} M multiply-adds",
        q.layers.len(),
        share * 100.0,
        q.product_macs.unwrap_or(0) as f64 / 1e6
    );
    assert!(share >= 0.8, "{name}: int8 covers {:.1} %", share * 100.0);

    let finetuned = compile_family(
        name,
        &dir.path().join(format!("{name}.ft.graft")),
        &[
            "--strategy",
            "finetune",
            "--unfreeze",
            "2",
            "--finetune-epochs",
            "1",
        ],
    );
    let transfer = finetuned
        .manifest
        .training
        .and_then(|t| t.transfer)
        .expect("fine-tuning recorded");
    assert_eq!(transfer.strategy, "finetune", "{name}");
    assert_eq!(
        transfer.unfrozen_blocks.len(),
        2,
        "{name}: {:?}",
        transfer.unfrozen_blocks
    );
}

/// One test module per family, with the tensor its default cut must be (the input of its own
/// classifier, before any Dropout).
macro_rules! family {
    ($name:ident, $cut:expr) => {
        mod $name {
            const NAME: &str = stringify!($name);

            #[test]
            fn reproduces_onnxruntime_logits() {
                super::reproduces_onnxruntime_logits(NAME)
            }

            #[test]
            fn has_a_default_cut_and_blocks() {
                super::has_a_default_cut_and_blocks(NAME, $cut)
            }

            #[test]
            fn translated_top_blocks_match_tract() {
                super::translated_top_blocks_match_tract(NAME, $cut)
            }

            #[test]
            fn compiles_head_int8_and_finetune() {
                super::compiles_head_int8_and_finetune(NAME)
            }
        }
    };
}

family!(resnet, "/Reshape_output_0");
family!(mobilenetv2, "/Flatten_output_0");
family!(mobilenetv3, "/classifier/classifier.1/HardSwish_output_0");
family!(squeezenet, "/features/features.8/Concat_output_0");
family!(vgg, "/classifier/classifier.4/Relu_output_0");
family!(inception, "/Flatten_output_0");
family!(densenet, "/Flatten_output_0");
family!(convnext, "/classifier/classifier.1/Flatten_output_0");

/// `graft advise` and `--strategy auto` on families other than Lite0: SqueezeNet (a conv
/// classifier, no Gemm) and ResNet (shape arithmetic before its Gemm).
#[test]
fn advise_and_auto_strategy_work_beyond_lite0() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["squeezenet", "resnet"] {
        let advice = TestCommand::advise(graft(), &family(name), &hymenoptera_mini())
            .args(["--normalize", "tf", "--no-cache"])
            .run()
            .expect_code(0);
        assert!(
            advice
                .stdout
                .contains("graft compile --strategy auto follows this advice"),
            "{name}: {}",
            advice.stdout
        );
        let report = compile_family(
            name,
            &dir.path().join(format!("{name}.auto.graft")),
            &["--strategy", "auto"],
        );
        assert_eq!(report.manifest.labels, ["ants", "bees"], "{name}");
    }
}
