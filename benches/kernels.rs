//! Criterion benches of graft's kernel families on EfficientNet-Lite0's shapes, at every
//! instruction-set level this CPU supports (the same code paths `GRAFT_KERNELS` selects):
//! `cargo bench -p graft-runtime --bench kernels`. Numbers and machine in docs/PERFORMANCE.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use graft_runtime::kernels::gemm_f32::{self, Epilogue, PackedWeights, Rows, UNBOUNDED};
use graft_runtime::kernels::gemm_int8::{self, PackedInt8, Requantization, RowsInt8};
use graft_runtime::kernels::{use_graft_kernels_at, Level};
use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
use tract_core::ops::nn::DataFormat;

/// (name, output channels, input channels, pixels): 1x1 layers of Lite0.
const POINTWISE: [(&str, usize, usize, usize); 3] = [
    ("expand_24_144_56x56", 144, 24, 3136),
    ("expand_80_480_14x14", 480, 80, 196),
    ("project_1152_320_7x7", 320, 1152, 49),
];

fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect()
}

fn pointwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernels/pointwise");
    group.sample_size(30);
    for (name, m, k, n) in POINTWISE {
        let (a, b, bias) = (values(m * k), values(k * n), values(m));
        let qa: Vec<i8> = (0..m * k)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
            .collect();
        let qb: Vec<i8> = (0..k * n).map(|i| (i * 73 % 256) as u8 as i8).collect();
        let requant = Requantization {
            x0: -3,
            x_scale: 0.05,
            k_scales: (0..m).map(|i| 0.001 + i as f32 * 1e-5).collect(),
            bias: vec![100; m],
            y0: -10,
            y_scale: 0.1,
        };
        for level in Level::available() {
            let packed = PackedWeights::new(level, &a, m, k);
            let mut out = vec![0f32; m * n];
            let epilogue = Epilogue {
                bias: &bias,
                before: [0.0, 6.0],
                residual: None,
                after: UNBOUNDED,
            };
            group.bench_function(format!("f32/{name}/{}", level.name()), |bench| {
                bench.iter(|| {
                    gemm_f32::matmul(
                        &packed,
                        &Rows {
                            data: black_box(&b),
                            k,
                            n,
                        },
                        &mut out,
                        &epilogue,
                    )
                })
            });
            let packed = PackedInt8::new(level, &qa, m, k, &requant);
            let mut out = vec![0i8; m * n];
            group.bench_function(format!("int8/{name}/{}", level.name()), |bench| {
                bench.iter(|| {
                    gemm_int8::matmul(
                        &packed,
                        &RowsInt8 {
                            data: black_box(&qb),
                            k,
                            n,
                        },
                        &mut out,
                    )
                })
            });
        }
    }
    group.finish();
}

/// A depthwise convolution + ReLU6 of Lite0 as a plan with graft's kernels at `level`.
fn depthwise_plan(
    level: Level,
    channels: usize,
    size: usize,
    k: usize,
    stride: usize,
) -> std::sync::Arc<TypedSimplePlan> {
    let mut model = TypedModel::default();
    let x = model
        .add_source("x", f32::fact([1, channels, size, size]))
        .unwrap();
    let w = Tensor::from_shape(&[channels, 1, k, k], &values(channels * k * k)).unwrap();
    let w = model.add_const("w", w).unwrap();
    let b = model.add_const("b", tensor1(&values(channels))).unwrap();
    let conv = Conv::new(
        PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![k, k],
            padding: PaddingSpec::SameUpper,
            dilations: None,
            strides: Some(tvec![stride, stride]),
            input_channels: channels,
            output_channels: channels,
        },
        KernelFormat::OIHW,
        channels,
        None,
    );
    let y = model.wire_node("conv", conv, &[x, w, b]).unwrap();
    model.select_output_outlets(&y).unwrap();
    let mut model = model.into_decluttered().unwrap();
    use_graft_kernels_at(&mut model, level).unwrap();
    model.into_optimized().unwrap().into_runnable().unwrap()
}

fn depthwise(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernels/depthwise");
    group.sample_size(30);
    for (channels, size, k, stride) in [
        (96, 112, 3, 2),
        (144, 56, 3, 1),
        (672, 14, 5, 1),
        (1152, 7, 5, 1),
    ] {
        let input = Tensor::from_shape(&[1, channels, size, size], &values(channels * size * size))
            .unwrap();
        for level in Level::available() {
            let plan = depthwise_plan(level, channels, size, k, stride);
            let name = format!("{channels}x{size}x{size}_k{k}_s{stride}/{}", level.name());
            group.bench_function(name, |bench| {
                bench.iter(|| plan.run(tvec![input.clone().into()]).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pointwise, depthwise);
criterion_main!(benches);
