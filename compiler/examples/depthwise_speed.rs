//! Forward + backward time of one depthwise convolution, three ways: candle's grouped conv (one
//! convolution per channel), graft's shifted-slice formulation (portable, any device) and
//! graft's custom CPU op (what training on CPU uses). Shapes are Lite0's first stride-2
//! depthwise layer and its last 5x5 one, at batch 16.
//!
//! cargo run --release -p graft-compiler --example depthwise_speed

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use graft_compiler::finetune::translate::{
    depthwise_conv, depthwise_conv_cpu, Activation, ConvAttrs,
};

fn time(f: impl Fn() -> candle_core::Result<()>) -> f64 {
    f().unwrap();
    let runs = 3;
    let started = Instant::now();
    for _ in 0..runs {
        f().unwrap();
    }
    started.elapsed().as_secs_f64() * 1000.0 / runs as f64
}

fn main() -> candle_core::Result<()> {
    let device = Device::Cpu;
    println!("layer                         candle grouped  shifted slices  graft custom op   (ms, forward+backward, batch 16)");
    for (name, channels, size, kernel, stride) in [
        ("blocks.1 dw 3x3/2 96@112", 96, 112, 3, 2),
        ("blocks.15 dw 3x3/1 1152@7", 1152, 7, 3, 1),
        ("blocks.12 dw 5x5/1 1152@7", 1152, 7, 5, 1),
    ] {
        let pad = kernel / 2;
        let x = Var::from_tensor(&Tensor::randn(
            0f32,
            1.0,
            (16, channels, size + 2 * pad, size + 2 * pad),
            &device,
        )?)?;
        let w = Var::from_tensor(&Tensor::randn(
            0f32,
            0.1,
            (channels, 1, kernel, kernel),
            &device,
        )?)?;
        let backward = |y: Tensor| -> candle_core::Result<()> {
            y.sum_all()?.backward()?;
            Ok(())
        };
        let grouped = time(|| backward(x.conv2d(&w, 0, stride, 1, channels)?));
        let slices = time(|| backward(depthwise_conv(&x, &w, [stride; 2], [1, 1])?));
        // The fused op pads inside: it takes the unpadded input and the padding.
        let centre =
            Var::from_tensor(&x.narrow(2, pad, size)?.narrow(3, pad, size)?.contiguous()?)?;
        let attrs = ConvAttrs {
            strides: [stride; 2],
            pads: [pad; 4],
            dilations: [1, 1],
        };
        let custom = time(|| {
            backward(depthwise_conv_cpu(
                &centre,
                &w,
                None,
                attrs,
                Activation::Identity,
            )?)
        });
        let forward =
            time(|| depthwise_conv_cpu(&centre, &w, None, attrs, Activation::Identity).map(|_| ()));
        println!(
            "{name:<29} {grouped:>14.1} {slices:>15.1} {custom:>16.1}   (forward {forward:.1})"
        );
    }
    Ok(())
}
