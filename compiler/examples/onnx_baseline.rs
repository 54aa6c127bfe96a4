//! Baselines for `graft bench`: tract loading, optimizing and running the original ONNX model
//! (single thread), and the per-image cost of running a batch of 8 instead of 1.
//!
//! `cargo run --release -p graft-compiler --example onnx_baseline -- MODEL.onnx [RUNS]`
use std::time::Instant;

use tract_onnx::prelude::*;

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> TractResult<()> {
    let path = std::env::args()
        .nth(1)
        .expect("usage: onnx_baseline MODEL.onnx [RUNS]");
    let runs: usize = std::env::args()
        .nth(2)
        .map_or(100, |r| r.parse().expect("RUNS"));
    let loads: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            let plan = tract_onnx::onnx()
                .model_for_path(&path)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable());
            assert!(plan.is_ok());
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let plan = tract_onnx::onnx()
        .model_for_path(&path)?
        .into_optimized()?
        .into_runnable()?;
    let shape: Vec<usize> = plan
        .model()
        .input_fact(0)?
        .shape
        .as_concrete()
        .unwrap()
        .to_vec();
    let input = Tensor::zero::<f32>(&shape)?;
    for _ in 0..10 {
        plan.run(tvec!(input.clone().into_tvalue()))?;
    }
    let latency: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            plan.run(tvec!(input.clone().into_tvalue())).unwrap();
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    println!(
        "tract-onnx: load+optimize p50 {:.1} ms, latency p50 {:.2} ms (1 thread, batch 1, {runs} runs)",
        p50(loads),
        p50(latency)
    );

    // Batch 8: the same graph with a symbolic batch, fixed to 8 before optimizing.
    let mut model = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true)
        .model_for_path(&path)?;
    let n = model.symbols.sym("N");
    let mut dims: TVec<TDim> = shape.iter().map(|d| d.to_dim()).collect();
    dims[0] = n.clone().into();
    model.set_input_fact(0, f32::fact(&dims).into())?;
    let typed = model.into_typed()?.into_decluttered()?;
    for batch in [1usize, 8] {
        let concrete = typed.set_symbols(&std::collections::HashMap::from([(
            n.clone(),
            batch.to_dim(),
        )]))?;
        let plan = concrete.into_optimized()?.into_runnable()?;
        let mut batch_shape = shape.clone();
        batch_shape[0] = batch;
        let input = Tensor::zero::<f32>(&batch_shape)?;
        for _ in 0..3 {
            plan.run(tvec!(input.clone().into_tvalue()))?;
        }
        let per_image: Vec<f64> = (0..(runs / batch).max(5))
            .map(|_| {
                let started = Instant::now();
                plan.run(tvec!(input.clone().into_tvalue())).unwrap();
                started.elapsed().as_secs_f64() * 1e3 / batch as f64
            })
            .collect();
        println!(
            "tract-onnx batch {batch}: p50 {:.2} ms per image",
            p50(per_image)
        );
    }
    Ok(())
}
