//! Where an int8 graph spends its time: quantizes an ONNX classifier (its own head kept) with
//! graft's pass, then reports top-1 agreement with f32, mean latency of both, and the slowest
//! nodes of the int8 plan (one thread, timed node by node).
//!
//! `cargo run --release -p graft-compiler --example int8_profile -- MODEL.onnx IMAGES_DIR [CALIB] [EVAL] [depthwise] [per-channel]`
//! Calibration and evaluation images are spread evenly over the sorted list and do not overlap
//! when CALIB + EVAL <= the number of images.
//! IMAGES_DIR holds `<class>/<image>` (e.g. ../shared/datasets/imagenet-sample/val); images are
//! preprocessed with tf normalisation `(x - 127) / 128` at 224x224.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use graft_compiler::quantize::{calibrate, quantize, QuantizeConfig};
use graft_runtime::preprocess::{load_image, Normalization, Preprocessing};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{eval, SimpleState};

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

fn top1(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0)
}

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: int8_profile MODEL.onnx IMAGES_DIR [CALIB=16] [EVAL=50] [depthwise] [per-channel]");
        std::process::exit(2);
    }
    let calib_count: usize = args.get(3).map_or(16, |a| a.parse().expect("CALIB"));
    let eval_count: usize = args.get(4).map_or(50, |a| a.parse().expect("EVAL"));
    let flag = |name: &str| args.iter().skip(5).any(|a| a == name);
    let config = QuantizeConfig {
        depthwise: flag("depthwise"),
        per_channel: flag("per-channel"),
        keep_f32: vec![],
    };
    let mut model = tract_onnx::onnx()
        .model_for_path(&args[1])?
        .into_typed()?
        .into_decluttered()?;
    model.properties.retain(|k, _| !k.starts_with("onnx."));
    let all = images(Path::new(&args[2]));
    let preprocessing = Preprocessing::for_input(224, 224, Normalization::tf());
    let tensor = |p: &Path| -> Tensor {
        let image = load_image(p).expect("image");
        Tensor::from_shape(&[1, 3, 224, 224], &preprocessing.apply(&image)).expect("tensor")
    };
    let step = (all.len() / calib_count.max(eval_count).max(1)).max(1);
    let calibration = calibrate(
        &model,
        all.iter()
            .step_by(step)
            .take(calib_count)
            .map(|(p, _)| tensor(p)),
        |_| {},
    )?;
    let int8 = quantize(&model, &calibration, &config)?;
    // Through NNEF and back, optimised as graft's runtime does.
    let nnef = tract_nnef::nnef();
    let mut bytes = vec![];
    nnef.write_to_tar(&int8, &mut bytes)?;
    let mut int8 = nnef.model_for_read(&mut &bytes[..])?;
    int8.optimize()?;
    let int8 = int8.into_runnable()?;
    let f32_plan = model.into_optimized()?.into_runnable()?;

    let (mut agree, mut n, mut f32_time, mut int8_time) = (0, 0, 0f64, 0f64);
    let (mut f32_right, mut int8_right) = (0, 0);
    for (p, class) in all.iter().skip(step / 2).step_by(step).take(eval_count) {
        let x = tensor(p);
        let started = Instant::now();
        let a = f32_plan.run(tvec![x.clone().into()])?;
        f32_time += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let b = int8.run(tvec![x.into()])?;
        int8_time += started.elapsed().as_secs_f64();
        let (a, b) = (a[0].view(), b[0].view());
        let (a, b) = (top1(a.as_slice::<f32>()?), top1(b.as_slice::<f32>()?));
        agree += (a == b) as usize;
        f32_right += (a == *class) as usize;
        int8_right += (b == *class) as usize;
        n += 1;
    }
    println!(
        "top-1 against the class folders (ImageNet order when there are 1000): f32 {f32_right}/{n}, int8 {int8_right}/{n}"
    );
    println!(
        "top-1 agreement {agree}/{n}; mean latency f32 {:.1} ms, int8 {:.1} ms ({:.2}x); int8 NNEF {} bytes",
        f32_time * 1e3 / n as f64,
        int8_time * 1e3 / n as f64,
        int8_time / f32_time,
        bytes.len()
    );

    let x = tensor(&all[0].0);
    let mut state = SimpleState::new(&int8)?;
    let mut per_node: HashMap<String, f64> = HashMap::new();
    let runs = 3;
    for _ in 0..runs {
        state.run_plan_with_eval(tvec![x.clone().into()], |ctx, st, node, inputs| {
            let started = Instant::now();
            let result = eval(ctx, st, node, inputs);
            *per_node
                .entry(format!("{} ({})", node.name, node.op.name()))
                .or_default() += started.elapsed().as_secs_f64() / runs as f64;
            result
        })?;
    }
    let mut slowest: Vec<_> = per_node.into_iter().collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (node, seconds) in slowest.iter().take(15) {
        println!("{:8.2} ms  {node}", seconds * 1e3);
    }
    Ok(())
}
