//! Runtime under load: one loaded model shared by several threads gives every thread the same
//! answers as a single thread, and memory stays flat once warmed up.
//!
//! `GRAFT_SOAK_PREDICTIONS` sets the number of predictions (default 400, a few seconds);
//! `scripts/soak.sh` runs 10,000 and docs/RELIABILITY.md records the result.

mod common;

use std::sync::Arc;

use common::*;
use graft_compiler::pipeline::{compile, CompileOptions};
use graft_runtime::preprocess::{load_image, Normalization};
use graft_runtime::progress::NoProgress;
use graft_runtime::Model;

/// Resident set size of this process in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn shared_model_is_thread_safe_and_memory_stays_flat() {
    let predictions: usize = std::env::var("GRAFT_SOAK_PREDICTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let threads = 4;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.graft");
    let options = CompileOptions {
        data: Some(hymenoptera_mini()),
        normalization: Some(Normalization::tf()),
        verify: false,
        ..CompileOptions::new(lite0(), &out)
    };
    compile(&options, &NoProgress).unwrap();
    let model = Arc::new(Model::load(&out).unwrap());

    let mut images = Vec::new();
    for class in ["ants", "bees"] {
        for entry in std::fs::read_dir(hymenoptera_mini().join("val").join(class)).unwrap() {
            images.push(load_image(&entry.unwrap().path()).unwrap());
        }
    }
    let reference: Vec<Vec<f32>> = images
        .iter()
        .map(|image| model.classify(image).unwrap().probabilities)
        .collect();
    let images = Arc::new(images);
    let reference = Arc::new(reference);

    // The same worker threads run the warm-up and the soak, as in a server: each keeps its
    // allocator arena, so RSS after the warm-up is the steady state a leak would grow from.
    // (Fresh threads per round may each get a new malloc arena under contention, which reads as
    // growth but is not a leak.)
    let warm_up = (predictions / 4).max(threads * 8);
    let phase = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (model, images, reference, phase) = (
                model.clone(),
                images.clone(),
                reference.clone(),
                phase.clone(),
            );
            std::thread::spawn(move || -> Result<(), String> {
                let run = |count: usize| -> Result<(), String> {
                    for i in 0..count / threads {
                        let k = (i * threads + t) % images.len();
                        let got = model.classify(&images[k]).map_err(|e| e.to_string())?;
                        if got.probabilities != reference[k] {
                            return Err(format!("thread {t}, image {k}: differs from one thread"));
                        }
                    }
                    Ok(())
                };
                // Reach both barriers whatever happens, so a failure cannot hang the test.
                let warmed = run(warm_up);
                phase.wait();
                phase.wait();
                warmed?;
                run(predictions)
            })
        })
        .collect();
    phase.wait();
    let baseline = rss_kib();
    phase.wait();
    for h in handles {
        h.join().expect("worker panicked").unwrap();
    }
    let after = rss_kib();
    eprintln!(
        "soak: {predictions} predictions on {threads} threads, all equal to the single-thread result; RSS {baseline} KiB after warm-up, {after} KiB at the end"
    );
    assert!(
        after <= baseline + baseline / 10,
        "RSS grew from {baseline} KiB to {after} KiB"
    );
}
