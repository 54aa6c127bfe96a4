//! Criterion benches of graft's kernel families on EfficientNet-Lite0's shapes (pointwise and
//! depthwise convolutions, an inverted-residual block, an int8 residual addition), at every
//! instruction-set level this CPU supports (the same code paths `GRAFT_KERNELS` selects), and
//! with AVX-512 the 16-channel-blocked layout's kernels (`GRAFT_LAYOUT`):
//! `cargo bench -p graft-runtime --bench kernels`. Numbers and machine in docs/PERFORMANCE.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use graft_runtime::kernels::gemm_f32::{self, Epilogue, PackedWeights, Rows, UNBOUNDED};
use graft_runtime::kernels::gemm_int8::{self, PackedInt8, Requantization, RowsInt8};
use graft_runtime::kernels::{conv_blocked, layout, qconv_blocked};
use graft_runtime::kernels::{use_graft_kernels_at, use_graft_kernels_in, Layout, Level};
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
            if level == Level::Avx512 {
                let blocked = |c: usize| c.div_ceil(layout::BLOCK) * n * layout::BLOCK;
                let weights = conv_blocked::BlockedWeights::new(&a, &bias, m, k);
                let input = layout::to_blocked(&b, k, n);
                let mut out = vec![0f32; blocked(m)];
                let clamps = conv_blocked::Clamps {
                    before: [0.0, 6.0],
                    after: UNBOUNDED,
                };
                group.bench_function(format!("f32/{name}/avx512-blocked"), |bench| {
                    bench.iter(|| {
                        conv_blocked::product(
                            &weights,
                            black_box(&input),
                            n,
                            None,
                            clamps,
                            &mut out,
                        )
                    })
                });
                let weights = qconv_blocked::BlockedInt8Weights::new(&packed);
                let input = layout::to_blocked(&qb, k, n);
                let mut out = vec![0i8; blocked(m)];
                group.bench_function(format!("int8/{name}/avx512-blocked"), |bench| {
                    bench.iter(|| qconv_blocked::product(&weights, black_box(&input), n, &mut out))
                });
            }
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

/// One inverted-residual block of Lite0 (expand 1x1 24 -> 144, depthwise 3x3, project 1x1
/// 144 -> 24, ReLU6 after the first two, residual add) on a 56x56 map, as a plan with graft's
/// kernels at AVX-512 in the plain and the blocked layout.
fn block(c: &mut Criterion) {
    if !Level::Avx512.supported() {
        return;
    }
    let (channels, expand, size) = (24, 144, 56);
    let mut model = TypedModel::default();
    let x = model
        .add_source("x", f32::fact([1, channels, size, size]))
        .unwrap();
    let mut conv =
        |name: &str, x: OutletId, (cin, cout, group, k): (usize, usize, usize, usize)| {
            let w = Tensor::from_shape(
                &[cout, cin / group, k, k],
                &values(cout * cin / group * k * k),
            )
            .unwrap();
            let w = model.add_const(format!("{name}.w"), w).unwrap();
            let b = model
                .add_const(format!("{name}.b"), tensor1(&values(cout)))
                .unwrap();
            let op = Conv::new(
                PoolSpec {
                    data_format: DataFormat::NCHW,
                    kernel_shape: tvec![k, k],
                    padding: PaddingSpec::SameUpper,
                    dilations: None,
                    strides: None,
                    input_channels: cin,
                    output_channels: cout,
                },
                KernelFormat::OIHW,
                group,
                None,
            );
            model.wire_node(name, op, &[x, w, b]).unwrap()[0]
        };
    let e = conv("expand", x, (channels, expand, 1, 1));
    let d = conv("depthwise", e, (expand, expand, expand, 3));
    let p = conv("project", d, (expand, channels, 1, 1));
    let y = model
        .wire_node("add", tract_core::ops::math::add(), &[p, x])
        .unwrap();
    model.select_output_outlets(&y).unwrap();
    let input =
        Tensor::from_shape(&[1, channels, size, size], &values(channels * size * size)).unwrap();
    let mut group = c.benchmark_group("kernels/block");
    group.sample_size(30);
    for layout in [Layout::Plain, Layout::Blocked] {
        let mut graph = model.clone().into_decluttered().unwrap();
        use_graft_kernels_in(&mut graph, Level::Avx512, layout).unwrap();
        let plan = graph.into_optimized().unwrap().into_runnable().unwrap();
        group.bench_function(format!("24_144_56x56/avx512-{}", layout.name()), |bench| {
            bench.iter(|| plan.run(tvec![input.clone().into()]).unwrap())
        });
    }
    group.finish();
}

/// An int8 graph's residual connection on Lite0's 24 x 56x56 map (two int8 tensors dequantized,
/// added, quantized), as a plan with tract's operators and with graft's `QuantizedAdd` at each
/// level.
fn residual_add(c: &mut Criterion) {
    use tract_core::ops::cast::cast;
    let shape = [24, 56, 56];
    let qi8 = |zero_point, scale| i8::datum_type().quantize(QParams::ZpScale { zero_point, scale });
    let types = [qi8(-5, 0.29), qi8(2, 0.34), qi8(-8, 0.25)];
    let mut model = TypedModel::default();
    let mut dequantized = vec![];
    let mut inputs = tvec![];
    for (i, &dt) in types[..2].iter().enumerate() {
        let x = model.add_source(format!("x{i}"), dt.fact(shape)).unwrap();
        dequantized.push(
            model
                .wire_node(format!("x{i}.f32"), cast(f32::datum_type()), &[x])
                .unwrap()[0],
        );
        let values: Vec<i8> = (0..24 * 56 * 56)
            .map(|j| (j * 73 + i) as u8 as i8)
            .collect();
        let mut t = Tensor::from_shape(&shape, &values).unwrap();
        // SAFETY: the same i8 storage, with quantization parameters.
        unsafe { t.set_datum_type(dt) };
        inputs.push(t);
    }
    let sum = model
        .wire_node("add", tract_core::ops::math::add(), &dequantized)
        .unwrap();
    let y = model.wire_node("quantize", cast(types[2]), &sum).unwrap();
    model.select_output_outlets(&y).unwrap();
    let run = |plan: &std::sync::Arc<TypedSimplePlan>| {
        plan.run(inputs.iter().map(|t| t.clone().into()).collect())
    };
    let mut group = c.benchmark_group("kernels/residual_add");
    group.sample_size(30);
    let tract = model
        .clone()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    group.bench_function("int8_24x56x56/tract", |bench| {
        bench.iter(|| run(&tract).unwrap())
    });
    for level in Level::available() {
        let mut graph = model.clone().into_decluttered().unwrap();
        use_graft_kernels_at(&mut graph, level).unwrap();
        let plan = graph.into_optimized().unwrap().into_runnable().unwrap();
        group.bench_function(format!("int8_24x56x56/{}", level.name()), |bench| {
            bench.iter(|| run(&plan).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, pointwise, depthwise, block, residual_add);
criterion_main!(benches);
