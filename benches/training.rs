//! Criterion benches of fine-tuning steps on the fixture backbone (EfficientNet-Lite0): forward,
//! backward (graft's fused CPU kernels and candle's patched backward) and nothing else, on
//! rayon's threads. `cargo bench -p graft-compiler --bench training`; compare two builds only
//! within one session, alternating (the machine's speed drifts), see docs/PERFORMANCE.md.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use graft_compiler::backbone::import::Backbone;
use graft_compiler::finetune::translate::Subgraph;

/// One training step's forward and backward through `subgraph` on `input`.
fn step(subgraph: &Subgraph, input: &Tensor) {
    let features = subgraph.forward(input, true).unwrap();
    let grads = features
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    std::hint::black_box(grads);
}

fn benches(c: &mut Criterion) {
    let onnx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/efficientnet_lite0.onnx");
    let backbone = Backbone::load(&onnx, None).unwrap();
    let graph = backbone.onnx_graph();
    let cpu = Device::Cpu;
    let mut group = c.benchmark_group("finetune");
    group.sample_size(10);
    // Guards the top-2-blocks case (block 15 and the head conv at 7x7, batch 16): the batched
    // 1x1 products and the 7x7 depthwise kernel.
    let top2 = Subgraph::extract(
        graph,
        "/_blocks.14/Add_output_0",
        "features",
        &cpu,
        DType::F32,
    )
    .unwrap();
    let boundary = Tensor::randn(0f32, 1.0, (16, 192, 7, 7), &cpu).unwrap();
    group.bench_function("top2_blocks_step_batch16", |b| {
        b.iter(|| step(&top2, &boundary))
    });
    // Guards whole-network training (every layer from the 224x224 image, batch 4): the
    // per-image 1x1 and depthwise kernels at 112x112 and 56x56.
    let input_name = backbone.input_name().to_string();
    let all = Subgraph::extract(graph, &input_name, "features", &cpu, DType::F32).unwrap();
    let images = Tensor::randn(0f32, 1.0, (4, 3, 224, 224), &cpu).unwrap();
    group.bench_function("every_layer_step_batch4", |b| {
        b.iter(|| step(&all, &images))
    });
    group.finish();
}

criterion_group!(training, benches);
criterion_main!(training);
