//! Criterion benches of the compile and run paths on the fixtures (EfficientNet-Lite0, 224x224,
//! one thread per tract run). `cargo bench -p graft-compiler --bench pipeline`; numbers and the
//! machine they came from are recorded in docs/PERFORMANCE.md.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use graft_compiler::backbone::import::Backbone;
use graft_compiler::features::{FeatureExtractor, Features};
use graft_compiler::head::train::{train_head, TrainConfig};
use graft_compiler::pipeline::{compile, CompileOptions};
use graft_compiler::quantize::Precision;
use graft_runtime::dataset::ImageFolder;
use graft_runtime::preprocess::{load_image, Normalization};
use graft_runtime::progress::NoProgress;
use graft_runtime::{LoadOptions, Model};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn options(out: &Path, cache: &Path) -> CompileOptions {
    CompileOptions {
        data: Some(fixtures().join("hymenoptera-mini")),
        normalization: Some(Normalization::tf()),
        cache_dir: Some(cache.to_path_buf()),
        threads: 1,
        verify: false,
        ..CompileOptions::new(fixtures().join("efficientnet_lite0.onnx"), out)
    }
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("bees.graft");
    let opts = options(&artifact, &dir.path().join("cache"));
    compile(&opts, &NoProgress).expect("fixture compile");
    let model = Model::load(&artifact).unwrap();
    let image_path = fixtures().join("hymenoptera-mini/val/bees/1181173278_23c36fac71.jpg");
    let image = load_image(&image_path).unwrap();
    let chw = model.manifest().preprocessing.apply(&image);

    // Guards the deployed path: one 224x224 image through the folded f32 graph (tract, 1 thread).
    c.bench_function("runtime/classify_tensor/f32/batch1", |b| {
        b.iter(|| model.classify_tensor(black_box(&chw)).unwrap())
    });
    // The same artifact with tract's own operators instead of graft's kernels (runtime/src/
    // kernels/): the ratio to the bench above is what graft's kernels buy.
    let tract_kernels = Model::load_with(
        &artifact,
        LoadOptions {
            graft_kernels: false,
        },
    )
    .unwrap();
    c.bench_function("runtime/classify_tensor/f32_tract_kernels/batch1", |b| {
        b.iter(|| tract_kernels.classify_tensor(black_box(&chw)).unwrap())
    });
    // Guards batch throughput: eight images through the shared plan on all cores
    // (`Model::classify_batch`, what `predict` does with each batch).
    let threads = graft_runtime::parallel::default_threads();
    let batch: Vec<&[f32]> = vec![chw.as_slice(); 8];
    c.bench_function("runtime/classify_tensor/f32/batch8", |b| {
        b.iter(|| model.classify_batch(black_box(&batch), threads).unwrap())
    });
    // The same graph quantized (`--precision int8`), measured in the same run as the f32 one:
    // the ratio of the two is the int8 speed-up (or slow-down) of tract's kernels on this CPU.
    let int8_artifact = dir.path().join("bees-int8.graft");
    let int8_options = CompileOptions {
        precision: Precision::Int8,
        ..options(&int8_artifact, &dir.path().join("cache"))
    };
    compile(&int8_options, &NoProgress).expect("fixture int8 compile");
    let int8_model = Model::load(&int8_artifact).unwrap();
    let mut group = c.benchmark_group("runtime/classify_tensor/int8");
    group.sample_size(10);
    group.bench_function("batch1", |b| {
        b.iter(|| int8_model.classify_tensor(black_box(&chw)).unwrap())
    });
    group.bench_function("batch8", |b| {
        b.iter(|| {
            int8_model
                .classify_batch(black_box(&batch), threads)
                .unwrap()
        })
    });
    group.finish();
    // Guards preprocessing cost (resize shorter side to 256, crop, normalise) of a ~256 px JPEG.
    c.bench_function("runtime/preprocess", |b| {
        b.iter(|| model.manifest().preprocessing.apply(black_box(&image)))
    });
    // Guards JPEG decoding with bounded memory and EXIF handling.
    c.bench_function("runtime/decode_jpeg", |b| {
        b.iter(|| load_image(black_box(&image_path)).unwrap())
    });
    // Guards cold start: mmap, checksum, NNEF parse and tract optimisation of the artifact.
    c.bench_function("runtime/load_artifact", |b| {
        b.iter(|| Model::load(black_box(&artifact)).unwrap())
    });
    // Baseline for load_artifact: tract loading and optimising the original ONNX.
    let onnx_path = fixtures().join("efficientnet_lite0.onnx");
    c.bench_function("baseline/load_onnx_with_tract", |b| {
        use tract_onnx::prelude::*;
        b.iter(|| {
            tract_onnx::onnx()
                .model_for_path(black_box(&onnx_path))
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .unwrap()
        })
    });

    let backbone = Backbone::load(&opts.backbone, None).unwrap();
    let cut = backbone.clone().cut("features").unwrap();
    let preprocessing = model.manifest().preprocessing.clone();
    let extractor = FeatureExtractor::new(&cut, &preprocessing).unwrap();
    let bytes = std::fs::read(&image_path).unwrap();
    // Guards feature extraction per image (decode + preprocess + frozen backbone).
    c.bench_function("compile/extract_one_image", |b| {
        b.iter(|| {
            extractor
                .features_of(black_box(&bytes), &image_path)
                .unwrap()
        })
    });

    let folder = ImageFolder::scan(&fixtures().join("hymenoptera-mini")).unwrap();
    let train = extractor
        .extract(&folder.train, None, 1, &NoProgress)
        .unwrap()
        .features;
    let val: Features = extractor
        .extract(folder.val.as_deref().unwrap(), None, 1, &NoProgress)
        .unwrap()
        .features;
    let config = TrainConfig {
        patience: usize::MAX,
        ..TrainConfig::default()
    };
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    // Guards head training speed: 100 epochs of AdamW on 48 cached 1280-d features (candle, CPU).
    group.bench_function("train_linear_head_100_epochs", |b| {
        b.iter(|| {
            train_head(&config, &train, &val, 2, &Device::Cpu, &mut |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
