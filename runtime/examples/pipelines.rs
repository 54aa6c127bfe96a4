//! The fast preprocessing pipeline against the reference one on the same artifact: each image is
//! decoded and resized both ways (the artifact's parameters, only the pipeline changed) and
//! classified by the same graph. Prints the top-1 agreement, the largest probability difference,
//! each pipeline's accuracy when the images sit in `class/` folders named like the artifact's
//! labels, and the time each pipeline spent decoding and preprocessing.
//!
//! `cargo run --release -p graft-runtime --example pipelines -- MODEL.graft IMAGE_OR_DIR...`
use std::path::{Path, PathBuf};
use std::time::Instant;

use graft_runtime::preprocess::{Pipeline, Preprocessing};
use graft_runtime::Model;

fn images(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .expect("readable folder")
            .map(|e| e.expect("folder entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            images(&entry, out);
        }
    } else {
        out.push(path.to_path_buf());
    }
}

/// Top-1 index and probabilities of `path` through `preprocessing`, and the seconds spent
/// decoding and preprocessing.
fn classify(model: &Model, preprocessing: &Preprocessing, path: &Path) -> (usize, Vec<f32>, f64) {
    let started = Instant::now();
    let image = preprocessing.load(path).expect("decodable image");
    let tensor = preprocessing.apply(&image);
    let seconds = started.elapsed().as_secs_f64();
    let scores = model.classify_tensor(&tensor).expect("inference");
    (scores.top1(), scores.probabilities, seconds)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, inputs @ ..] = &args[..] else {
        panic!("usage: pipelines MODEL.graft IMAGE_OR_DIR...");
    };
    let model = Model::load(model).expect("loadable artifact");
    let recorded = model.manifest().preprocessing.clone();
    let with = |pipeline| Preprocessing {
        pipeline,
        ..recorded.clone()
    };
    let (reference, fast) = (with(Pipeline::Reference), with(Pipeline::Fast));
    let mut paths = vec![];
    for input in inputs {
        images(Path::new(input), &mut paths);
    }
    let labels = &model.manifest().labels;
    let (mut agree, mut worst, mut labelled) = (0, 0f32, 0);
    let (mut right, mut time) = ([0usize; 2], [0f64; 2]);
    for path in &paths {
        let a = classify(&model, &reference, path);
        let b = classify(&model, &fast, path);
        agree += usize::from(a.0 == b.0);
        worst =
            a.1.iter()
                .zip(&b.1)
                .fold(worst, |w, (x, y)| w.max((x - y).abs()));
        let class = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str());
        if let Some(truth) = labels.iter().position(|l| Some(l.as_str()) == class) {
            labelled += 1;
            right[0] += usize::from(a.0 == truth);
            right[1] += usize::from(b.0 == truth);
        }
        time[0] += a.2;
        time[1] += b.2;
    }
    let n = paths.len().max(1);
    println!(
        "{} images: top-1 agreement {agree}/{} = {:.2} %, max |probability difference| {worst:.4}",
        paths.len(),
        paths.len(),
        100.0 * agree as f64 / n as f64
    );
    if labelled > 0 {
        println!(
            "accuracy on {labelled} labelled images: reference {:.4}, fast {:.4}",
            right[0] as f64 / labelled as f64,
            right[1] as f64 / labelled as f64
        );
    }
    println!(
        "decode + preprocess per image: reference {:.1} ms, fast {:.1} ms",
        time[0] * 1e3 / n as f64,
        time[1] * 1e3 / n as f64
    );
}
