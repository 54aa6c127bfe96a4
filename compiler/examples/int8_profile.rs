//! int8 on an unmodified ONNX classifier (its own head kept), with graft's quantization pass:
//! the search over calibration methods and f32 fallbacks (simulated, scored by top-1 agreement
//! with f32), then optionally the real int8 graph run end to end (top-1 against the labels and
//! agreement with f32, mean latency of both) and the slowest nodes of its plan.
//!
//! `cargo run --release -p graft-compiler --example int8_profile -- MODEL.onnx IMAGES_DIR [CALIB] [EVAL] [OPTION...]`
//! Options: `depthwise`, `per-channel` (which layers / scales), `method=min-max|percentile|entropy`
//! (default: try all), `budget=POINTS` of agreement int8 may lose (default 1), `real` (run the
//! int8 graph too: ~1 s per image on CPUs without VNNI), `profile` (per-node timing).
//! Plans are built as graft's runtime builds them (graft's depthwise kernel swapped in).
//! Calibration and evaluation images are spread evenly over the sorted list and do not overlap
//! when CALIB + EVAL <= the number of images.
//! IMAGES_DIR holds `<class>/<image>` (e.g. ../shared/datasets/imagenet-sample/val); images are
//! preprocessed with tf normalisation `(x - 127) / 128` at 224x224.
use std::path::{Path, PathBuf};
use std::time::Instant;

use graft_compiler::quantize::search::{input_tensor, search, Probe, SearchOptions};
use graft_compiler::quantize::{calibrate, quantize, simulate, CalibrationMethod, QuantizeConfig};
use graft_runtime::bench::profile_plan;
use graft_runtime::parallel::{default_threads, par_map};
use graft_runtime::preprocess::{load_image, Normalization, Preprocessing};
use graft_runtime::progress::NoProgress;
use tract_onnx::prelude::*;

/// Every image with the index of its class folder in sorted order (for ImageNet's 1000 wnid
/// folders, the model's class index).
fn images(dir: &Path) -> Vec<(PathBuf, usize)> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("IMAGES_DIR")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut files = Vec::new();
    for (index, class) in classes.iter().enumerate() {
        let mut in_class: Vec<PathBuf> = std::fs::read_dir(class)
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| f.path())
            .collect();
        in_class.sort();
        files.extend(in_class.into_iter().map(|p| (p, index)));
    }
    files
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let exp: Vec<f32> = v.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

fn top1(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: int8_profile MODEL.onnx IMAGES_DIR [CALIB=16] [EVAL=1000] [OPTION...]");
        std::process::exit(2);
    }
    let calib_count: usize = args.get(3).map_or(16, |a| a.parse().expect("CALIB"));
    let eval_count: usize = args.get(4).map_or(1000, |a| a.parse().expect("EVAL"));
    let options = &args[5.min(args.len())..];
    let flag = |name: &str| options.iter().any(|a| a == name);
    let value = |name: &str| {
        options
            .iter()
            .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
    };
    let config = QuantizeConfig {
        depthwise: flag("depthwise"),
        per_channel: flag("per-channel"),
        keep_f32: vec![],
    };
    let methods = match value("method") {
        Some(m) => vec![m.parse::<CalibrationMethod>()?],
        None => CalibrationMethod::ALL.to_vec(),
    };
    let budget: f64 = value("budget").map_or(Ok(1.0), str::parse)? / 100.0;
    let mut model = tract_onnx::onnx()
        .model_for_path(&args[1])?
        .into_typed()?
        .into_decluttered()?;
    model.properties.retain(|k, _| !k.starts_with("onnx."));
    let all = images(Path::new(&args[2]));
    let preprocessing = Preprocessing::for_input(224, 224, Normalization::tf());
    let pixels = |p: &PathBuf| preprocessing.pixels(&load_image(p).expect("image"));
    let tensor = |p: &PathBuf| input_tensor(&preprocessing, &pixels(p)).expect("tensor");
    let threads = default_threads();
    let step = (all.len() / calib_count.max(eval_count).max(1)).max(1);
    let calibration_inputs: Vec<Tensor> = all
        .iter()
        .step_by(step)
        .take(calib_count)
        .map(|(p, _)| tensor(p))
        .collect();
    let evaluated: Vec<&(PathBuf, usize)> = all
        .iter()
        .skip(step / 2)
        .step_by(step)
        .take(eval_count)
        .collect();
    let eval_images: Vec<Vec<u8>> = par_map(&evaluated, threads, |(p, _)| pixels(p), || ());
    let labels: Vec<usize> = evaluated.iter().map(|(_, c)| *c).collect();
    let n = eval_images.len();

    let started = Instant::now();
    let calibration = calibrate(&model, &calibration_inputs, |_| {})?;
    let probe = Probe::new(
        &model,
        eval_images,
        &preprocessing,
        Some(labels.clone()),
        threads,
    )?;
    let f32_right = probe.reference().accuracy.unwrap_or(0.0);
    // Scored by agreement with f32 (no labels): the budget is spent on agreement.
    let probe = probe.without_labels();
    let result = search(
        &model,
        &calibration,
        &probe,
        &SearchOptions {
            methods,
            budget,
            base: config.clone(),
        },
        &NoProgress,
    )?;
    println!(
        "{n} images, {} calibration images; f32 top-1 {:.1} %",
        calibration.images,
        f32_right * 100.0
    );
    for trial in &result.trials {
        println!(
            "simulated {:<10} agreement {:.1} %, divergence {:.4}",
            trial.method.name(),
            trial.measurement.agreement * 100.0,
            trial.measurement.divergence
        );
    }
    for fallback in &result.fallbacks {
        println!(
            "back to f32: {} (sensitivity {:.4})",
            fallback.layer, fallback.divergence
        );
    }
    println!(
        "chosen: {}, {} layers back to f32; simulated agreement {:.1} % ({:.0} s)",
        result.method.name(),
        result.fallbacks.len(),
        result.simulated.agreement * 100.0,
        started.elapsed().as_secs_f64()
    );
    let ranges = calibration.ranges(result.method);
    let int8 = quantize(&model, &ranges, &result.config)?;
    let simulated =
        graft_runtime::kernels::into_optimized(simulate(&model, &ranges, &result.config)?)?
            .into_runnable()?;
    // Through NNEF and back, optimised as graft's runtime does.
    let nnef = tract_nnef::nnef();
    let mut bytes = vec![];
    nnef.write_to_tar(&int8, &mut bytes)?;
    let mut int8 = nnef.model_for_read(&mut &bytes[..])?;
    graft_runtime::kernels::use_graft_kernels(&mut int8)?;
    int8.optimize()?;
    let int8 = int8.into_runnable()?;
    let f32_plan = graft_runtime::kernels::into_optimized(model)?.into_runnable()?;
    println!("int8 NNEF {} bytes", bytes.len());

    if flag("real") {
        let started = Instant::now();
        let indices: Vec<usize> = (0..n).collect();
        let runs = par_map(
            &indices,
            threads,
            |&i| -> TractResult<(usize, usize, usize, f64, f64, f32, f32)> {
                let x = probe.input(i).map_err(|e| TractError::msg(e.to_string()))?;
                let started = Instant::now();
                let a = f32_plan.run(tvec![x.clone().into()])?;
                let f32_time = started.elapsed().as_secs_f64();
                let started = Instant::now();
                let b = int8.run(tvec![x.clone().into()])?;
                let int8_time = started.elapsed().as_secs_f64();
                let c = simulated.run(tvec![x.clone().into()])?;
                let top =
                    |t: &TValue| -> TractResult<usize> { Ok(top1(t.view().as_slice::<f32>()?)) };
                let gap = |t: &TValue, u: &TValue| -> TractResult<f32> {
                    let (t, u) = (t.view(), u.view());
                    let (t, u) = (softmax(t.as_slice::<f32>()?), softmax(u.as_slice::<f32>()?));
                    Ok(t.iter()
                        .zip(&u)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs())))
                };
                Ok((
                    top(&a[0])?,
                    top(&b[0])?,
                    top(&c[0])?,
                    f32_time,
                    int8_time,
                    gap(&b[0], &c[0])?,
                    gap(&b[0], &a[0])?,
                ))
            },
            || (),
        );
        let (mut agree, mut sim_agree, mut f32_ok, mut int8_ok) = (0, 0, 0, 0);
        let (mut f32_time, mut int8_time) = (0f64, 0f64);
        let (mut sim_gap, mut f32_gap) = (0f32, 0f32);
        for (run, label) in runs.into_iter().zip(&labels) {
            let (a, b, c, ft, it, sg, fg) = run?;
            sim_gap = sim_gap.max(sg);
            f32_gap = f32_gap.max(fg);
            agree += (a == b) as usize;
            sim_agree += (b == c) as usize;
            f32_ok += (a == *label) as usize;
            int8_ok += (b == *label) as usize;
            f32_time += ft;
            int8_time += it;
        }
        println!(
            "real int8: top-1 against the labels f32 {f32_ok}/{n}, int8 {int8_ok}/{n}; agreement with f32 {agree}/{n}; with the simulation {sim_agree}/{n} ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
        println!(
            "largest probability difference of real int8: from the simulation {sim_gap:.4}, from f32 {f32_gap:.4}"
        );
        println!(
            "mean latency ({threads} threads busy) f32 {:.1} ms, int8 {:.1} ms ({:.2}x)",
            f32_time * 1e3 / n as f64,
            int8_time * 1e3 / n as f64,
            int8_time / f32_time
        );
    }

    if flag("profile") {
        let x = calibration_inputs[0].clone();
        for (name, plan) in [("f32", &f32_plan), ("int8", &int8)] {
            let (per_node, per_op) = profile_plan(plan, &x, 5)?;
            let total: f64 = per_op.iter().map(|(_, t)| t).sum();
            println!("{name} plan: {:.2} ms in total; by operator:", total * 1e3);
            for (op, seconds) in per_op.iter().take(8) {
                println!("{:8.2} ms  {op}", seconds * 1e3);
            }
            println!("{name} plan: slowest nodes:");
            for (node, seconds) in per_node.iter().take(12) {
                println!("{:8.2} ms  {node}", seconds * 1e3);
            }
        }
    }
    Ok(())
}
