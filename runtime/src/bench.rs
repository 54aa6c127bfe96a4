//! `bench`: how fast an artifact loads and runs on this machine: load time by stage, first
//! inference, single-thread latency percentiles, multi-thread throughput, preprocessing cost and
//! peak memory.

use crate::progress::count;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use image::{DynamicImage, RgbImage};
use serde::Serialize;

use crate::commands::Outcome;
use crate::error::{Error, Result};
use crate::model::{LoadOptions, LoadTimings, Model};
use crate::parallel::default_threads;
use crate::preprocess::Preprocessing;

/// Arguments of `bench`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct BenchArgs {
    /// Artifact to measure.
    pub model: PathBuf,
    /// Images to feed (cycled); default: a synthetic 640x480 picture. When the first one is a
    /// second artifact (`.graft`), the two artifacts are timed in alternation, A, B, A, B, ...
    /// on one thread, and the per-pair ratio B/A is reported: steadier than two separate runs on
    /// a machine whose speed drifts.
    pub images: Vec<PathBuf>,
    /// Timed single-thread runs for the latency percentiles.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 100))]
    pub iterations: usize,
    /// Untimed runs before measuring.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 10))]
    pub warmup: usize,
    /// Threads sharing the model for the batch and throughput runs [default: all cores].
    #[cfg_attr(feature = "cli", arg(long))]
    pub threads: Option<usize>,
    /// Images per batch for the batch-latency run: a batch's preprocessed images run on the
    /// `--threads` workers through the same batch-1 graph.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..)))]
    pub batch: u32,
    /// Threads inside each matrix product (tract's multithread-mm; needs a build with the
    /// `multithread` feature).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1))]
    pub intra_op_threads: usize,
    /// Run tract's own operators instead of graft's kernels (to compare the two).
    #[cfg_attr(feature = "cli", arg(long))]
    pub tract_kernels: bool,
    /// Print one JSON document instead of text.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
}

/// Latency statistics in milliseconds (the JSON keys say so: `p50_ms`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    #[serde(rename = "p50_ms")]
    pub p50: f64,
    /// 90th percentile.
    #[serde(rename = "p90_ms")]
    pub p90: f64,
    /// 99th percentile.
    #[serde(rename = "p99_ms")]
    pub p99: f64,
    /// Mean.
    #[serde(rename = "mean_ms")]
    pub mean: f64,
    /// Number of timed runs.
    pub runs: usize,
}

/// [`LoadTimings`] (seconds) written as milliseconds, each key ending in `_ms`.
fn stages_in_ms<S: serde::Serializer>(t: &LoadTimings, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(3))?;
    map.serialize_entry("validate_ms", &(t.validate * 1e3))?;
    map.serialize_entry("parse_ms", &(t.parse * 1e3))?;
    map.serialize_entry("optimize_ms", &(t.optimize * 1e3))?;
    map.end()
}

/// The `q` quantile (nearest rank) of `sorted` samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

impl Latency {
    fn from_seconds(mut samples: Vec<f64>) -> Latency {
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| quantile(&samples, q) * 1e3;
        Latency {
            p50: pick(0.5),
            p90: pick(0.9),
            p99: pick(0.99),
            mean: samples.iter().sum::<f64>() / samples.len() as f64 * 1e3,
            runs: samples.len(),
        }
    }
}

/// Everything `bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The artifact.
    #[serde(serialize_with = "crate::paths::serialize")]
    pub model: PathBuf,
    /// Artifact size in bytes.
    pub size_bytes: u64,
    /// Stored precision.
    pub precision: String,
    /// The kernels that ran the graph: graft's at an instruction-set level (`avx512`, `avxvnni`,
    /// `avx2`, `portable`; see `GRAFT_KERNELS`) or `tract`.
    pub kernels: String,
    /// How graft's kernels laid out the activations: `blocked` (16-channel blocks, AVX-512;
    /// see `GRAFT_LAYOUT`), `plain`, or `tract`.
    pub layout: String,
    /// Wall-clock load time in milliseconds.
    pub load_ms: f64,
    /// Load time by stage (written in milliseconds: `load_stages_ms`).
    #[serde(rename = "load_stages_ms", serialize_with = "stages_in_ms")]
    pub load_stages: LoadTimings,
    /// The first inference after loading, in milliseconds.
    pub first_inference_ms: f64,
    /// Graph execution on a preprocessed image, one thread.
    pub latency: Latency,
    /// Preprocessing (resize, crop, normalise) of a decoded image.
    pub preprocess: Latency,
    /// Decoding of the given image files (from memory, as the artifact's preprocessing decodes
    /// them); absent when the synthetic image was used.
    pub decode: Option<Latency>,
    /// Threads used for the batch and throughput runs.
    pub threads: usize,
    /// Images per batch.
    pub batch: usize,
    /// Time to classify one batch of preprocessed images on `threads` threads.
    pub batch_latency: Latency,
    /// Images per second in the batch run (graph execution only).
    #[serde(rename = "batch_images_per_s")]
    pub batch_throughput: f64,
    /// Threads inside each matrix product.
    pub intra_op_threads: usize,
    /// Images per second, preprocessing included, with `threads` threads sharing the model.
    #[serde(rename = "images_per_s")]
    pub throughput: f64,
    /// Peak resident memory of the process in bytes (Linux), when known.
    pub peak_rss_bytes: Option<u64>,
}

fn check_iterations(args: &BenchArgs) -> Result<()> {
    if args.iterations == 0 {
        return Err(Error::InvalidOption(
            "--iterations must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The image files at `paths`, read into memory once, with their paths (for errors).
type Files<'a> = Vec<(Vec<u8>, &'a Path)>;

fn read_files(paths: &[PathBuf]) -> Result<Files<'_>> {
    paths
        .iter()
        .map(|p| Ok((crate::read::read_image_file(p)?, p.as_path())))
        .collect()
}

/// The `files` decoded as `preprocessing` decodes them, or the synthetic picture when there are
/// none.
fn bench_images(files: &Files, preprocessing: &Preprocessing) -> Result<Vec<DynamicImage>> {
    if files.is_empty() {
        return Ok(vec![synthetic_image()]);
    }
    files
        .iter()
        .map(|(bytes, path)| preprocessing.decode(bytes, path))
        .collect()
}

/// Decoding time of `files` (from memory) by `preprocessing`'s pipeline, `runs` decodes in turn;
/// `None` without files.
fn decode_latency(
    files: &Files,
    preprocessing: &Preprocessing,
    runs: usize,
) -> Result<Option<Latency>> {
    if files.is_empty() {
        return Ok(None);
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let (bytes, path) = &files[i % files.len()];
        let started = Instant::now();
        std::hint::black_box(preprocessing.decode(bytes, path)?);
        samples.push(started.elapsed().as_secs_f64());
    }
    Ok(Some(Latency::from_seconds(samples)))
}

/// Runs the measurements.
pub fn measure(args: &BenchArgs) -> Result<BenchReport> {
    check_iterations(args)?;
    crate::set_intra_op_threads(args.intra_op_threads)?;
    let started = Instant::now();
    let model = Model::load_with(
        &args.model,
        LoadOptions {
            graft_kernels: !args.tract_kernels,
        },
    )?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let preprocessing = &model.manifest().preprocessing;
    let files = read_files(&args.images)?;
    let images = bench_images(&files, preprocessing)?;
    let tensors: Vec<Vec<f32>> = images.iter().map(|i| preprocessing.apply(i)).collect();

    let started = Instant::now();
    model.classify_tensor(&tensors[0])?;
    let first_inference_ms = started.elapsed().as_secs_f64() * 1e3;

    for i in 0..args.warmup {
        model.classify_tensor(&tensors[i % tensors.len()])?;
    }
    let mut samples = Vec::with_capacity(args.iterations);
    for i in 0..args.iterations {
        let started = Instant::now();
        model.classify_tensor(&tensors[i % tensors.len()])?;
        samples.push(started.elapsed().as_secs_f64());
    }
    let latency = Latency::from_seconds(samples);
    let preprocess = Latency::from_seconds(
        (0..args.iterations.min(200))
            .map(|i| {
                let started = Instant::now();
                std::hint::black_box(preprocessing.apply(&images[i % images.len()]));
                started.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let decode = decode_latency(&files, preprocessing, args.iterations.min(50))?;

    let threads = args.threads.unwrap_or_else(default_threads).max(1);
    let batch = args.batch as usize;
    let batch_tensors: Vec<&[f32]> = (0..batch)
        .map(|i| tensors[i % tensors.len()].as_slice())
        .collect();
    let batch_runs = (args.iterations / batch).max(5);
    let mut batch_samples = Vec::with_capacity(batch_runs);
    for _ in 0..batch_runs {
        let started = Instant::now();
        model.classify_batch(&batch_tensors, threads)?;
        batch_samples.push(started.elapsed().as_secs_f64());
    }
    let batch_latency = Latency::from_seconds(batch_samples);
    let batch_throughput = batch as f64 / (batch_latency.mean / 1e3);

    let total = args.iterations.max(threads);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return Ok(());
                        }
                        let image = &images[i % images.len()];
                        model.classify(image)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("bench worker panicked"))
    })?;
    let throughput = total as f64 / started.elapsed().as_secs_f64();

    Ok(BenchReport {
        model: args.model.clone(),
        size_bytes: model.artifact().size,
        precision: model.manifest().precision.clone(),
        kernels: kernels_name(args.tract_kernels),
        layout: layout_name(args.tract_kernels),
        load_ms,
        load_stages: model.load_timings(),
        first_inference_ms,
        latency,
        preprocess,
        decode,
        threads,
        batch,
        batch_latency,
        batch_throughput,
        intra_op_threads: args.intra_op_threads,
        throughput,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn layout_name(tract_kernels: bool) -> String {
    use crate::kernels::{Layout, Level};
    if tract_kernels {
        "tract".into()
    } else {
        Layout::current().at(Level::current()).name().into()
    }
}

fn kernels_name(tract_kernels: bool) -> String {
    if tract_kernels {
        "tract".into()
    } else {
        crate::kernels::Level::current().name().into()
    }
}

/// Two artifacts timed in alternation on one thread.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The first artifact (A).
    #[serde(serialize_with = "crate::paths::serialize")]
    pub a: PathBuf,
    /// The second artifact (B).
    #[serde(serialize_with = "crate::paths::serialize")]
    pub b: PathBuf,
    /// The kernels that ran both graphs.
    pub kernels: String,
    /// Their activation layout (see [`BenchReport::layout`]).
    pub layout: String,
    /// A's graph execution, milliseconds.
    pub a_latency: Latency,
    /// B's graph execution, milliseconds.
    pub b_latency: Latency,
    /// B's time over A's in each pair.
    pub ratio: Ratio,
}

/// Percentiles of a per-pair ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Number of pairs.
    pub pairs: usize,
}

impl Ratio {
    fn from_samples(mut samples: Vec<f64>) -> Ratio {
        samples.sort_by(f64::total_cmp);
        let pick = |q: f64| quantile(&samples, q);
        Ratio {
            p10: pick(0.1),
            p50: pick(0.5),
            p90: pick(0.9),
            pairs: samples.len(),
        }
    }
}

fn is_artifact(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|e| e == "graft")
}

/// Times `args.model` (A) and the artifact first in `args.images` (B) in alternation, on the
/// rest of the images (or the synthetic picture), `args.iterations` pairs after `args.warmup`.
pub fn compare(args: &BenchArgs) -> Result<Comparison> {
    check_iterations(args)?;
    let options = LoadOptions {
        graft_kernels: !args.tract_kernels,
    };
    let b_path = &args.images[0];
    let (a, b) = (
        Model::load_with(&args.model, options)?,
        Model::load_with(b_path, options)?,
    );
    let files = read_files(&args.images[1..])?;
    let tensors = |model: &Model| -> Result<Vec<Vec<f32>>> {
        let preprocessing = &model.manifest().preprocessing;
        let images = bench_images(&files, preprocessing)?;
        Ok(images.iter().map(|i| preprocessing.apply(i)).collect())
    };
    let (ta, tb) = (tensors(&a)?, tensors(&b)?);
    let (a_latency, b_latency, ratio) =
        alternate([&a, &b], [&ta, &tb], args.iterations, args.warmup)?;
    Ok(Comparison {
        a: args.model.clone(),
        b: b_path.clone(),
        kernels: kernels_name(args.tract_kernels),
        layout: layout_name(args.tract_kernels),
        a_latency,
        b_latency,
        ratio,
    })
}

/// Times `models[0]` and `models[1]` in alternation on one thread, `pairs` pairs after `warmup`
/// untimed ones, each on its own inputs (cycled); returns both latencies and the per-pair ratio
/// of the second over the first.
pub fn alternate(
    models: [&Model; 2],
    inputs: [&[Vec<f32>]; 2],
    pairs: usize,
    warmup: usize,
) -> Result<(Latency, Latency, Ratio)> {
    let time = |model: &Model, input: &[f32]| -> Result<f64> {
        let started = Instant::now();
        model.classify_tensor(input)?;
        Ok(started.elapsed().as_secs_f64())
    };
    let [a, b] = models;
    let [xa, xb] = inputs;
    for i in 0..warmup {
        time(a, &xa[i % xa.len()])?;
        time(b, &xb[i % xb.len()])?;
    }
    let (mut sa, mut sb, mut ratios) = (vec![], vec![], vec![]);
    for i in 0..pairs.max(1) {
        let x = time(a, &xa[i % xa.len()])?;
        let y = time(b, &xb[i % xb.len()])?;
        sa.push(x);
        sb.push(y);
        ratios.push(y / x);
    }
    Ok((
        Latency::from_seconds(sa),
        Latency::from_seconds(sb),
        Ratio::from_samples(ratios),
    ))
}

/// The CPU's model name (Linux `/proc/cpuinfo`), or the architecture.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn print_comparison(args: &BenchArgs, out: &mut dyn Write) -> Result<Outcome> {
    let c = compare(args)?;
    let io = |e| Error::io("<stdout>", e);
    if args.json {
        crate::commands::write_json(out, &c)?;
        return Ok(Outcome::Complete);
    }
    let lines = [
        ("A", format!("{}: p50 {:.2} ms, p90 {:.2} ms", c.a.display(), c.a_latency.p50, c.a_latency.p90)),
        ("B", format!("{}: p50 {:.2} ms, p90 {:.2} ms", c.b.display(), c.b_latency.p50, c.b_latency.p90)),
        (
            "B / A",
            format!(
                "median {:.3} (p10 {:.3}, p90 {:.3}) over {} alternating pairs, 1 thread, {} kernels, {} layout",
                c.ratio.p50,
                c.ratio.p10,
                c.ratio.p90,
                c.ratio.pairs,
                c.kernels,
                c.layout
            ),
        ),
    ];
    for (k, v) in lines {
        writeln!(out, "{k:<7}{v}").map_err(io)?;
    }
    Ok(Outcome::Complete)
}

/// `bench`: measures and prints (one artifact, or two in alternation).
pub fn bench(args: &BenchArgs, out: &mut dyn Write) -> Result<Outcome> {
    if args.images.first().is_some_and(|p| is_artifact(p)) {
        return print_comparison(args, out);
    }
    let r = measure(args)?;
    let io = |e| Error::io("<stdout>", e);
    if args.json {
        crate::commands::write_json(out, &r)?;
        return Ok(Outcome::Complete);
    }
    let s = &r.load_stages;
    let lines = [
        (
            "model",
            format!(
                "{} ({:.1} MiB, {}, {} kernels, {} layout)",
                r.model.display(),
                r.size_bytes as f64 / (1 << 20) as f64,
                r.precision,
                r.kernels,
                r.layout
            ),
        ),
        (
            "load",
            format!(
                "{:.1} ms (validate {:.1}, parse {:.1}, optimize {:.1}); first inference {:.1} ms",
                r.load_ms,
                s.validate * 1e3,
                s.parse * 1e3,
                s.optimize * 1e3,
                r.first_inference_ms
            ),
        ),
        (
            "latency",
            format!(
                "1 thread, {} runs after {} warm-up: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
                r.latency.runs, args.warmup, r.latency.p50, r.latency.p90, r.latency.p99, r.latency.mean
            ),
        ),
        (
            "preprocess",
            format!("p50 {:.2} ms per image (decoding excluded)", r.preprocess.p50),
        ),
        (
            "decode",
            match &r.decode {
                Some(d) => format!("p50 {:.2} ms per image file, {} runs", d.p50, d.runs),
                None => "not measured (no image files given)".into(),
            },
        ),
        (
            "batch",
            format!(
                "{} on {}, {} runs: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms; {:.1} images/s",
                count(r.batch as usize, "image"),
                count(r.threads, "thread"),
                r.batch_latency.runs,
                r.batch_latency.p50,
                r.batch_latency.p90,
                r.batch_latency.p99,
                r.batch_throughput
            ),
        ),
        (
            "throughput",
            format!(
                "{:.1} images/s with {} thread(s) sharing the model, preprocessing included{}",
                r.throughput,
                r.threads,
                if r.intra_op_threads > 1 {
                    format!(", {} intra-op threads", r.intra_op_threads)
                } else {
                    String::new()
                }
            ),
        ),
        (
            "memory",
            r.peak_rss_bytes.map_or("peak RSS unknown on this platform".into(), |b| {
                format!("peak RSS {:.0} MiB", b as f64 / (1 << 20) as f64)
            }),
        ),
    ];
    for (k, v) in lines {
        writeln!(out, "{k:<11}{v}").map_err(io)?;
    }
    Ok(Outcome::Complete)
}

/// Time spent per name, slowest first, in seconds.
pub type Timings = Vec<(String, f64)>;

/// Where a plan spends its time: the median over `runs` runs on `input` (after one untimed run)
/// of the seconds per node (`name (operator)`) and per operator (summed over its nodes in each
/// run); slowest first. Medians, not means: on a shared VM a few slow runs would otherwise move
/// the totals by 10 %.
pub fn profile_plan(
    plan: &std::sync::Arc<tract_core::prelude::TypedSimplePlan>,
    input: &tract_core::prelude::Tensor,
    runs: usize,
) -> tract_core::prelude::TractResult<(Timings, Timings)> {
    use std::collections::HashMap;
    use tract_core::plan::{eval, SimpleState};
    use tract_core::prelude::*;
    let mut state = SimpleState::new(plan)?;
    let mut per_node: HashMap<String, Vec<f64>> = HashMap::new();
    let mut per_op: HashMap<String, Vec<f64>> = HashMap::new();
    for run in 0..=runs {
        let mut ops: HashMap<String, f64> = HashMap::new();
        state.run_plan_with_eval(tvec![input.clone().into()], |ctx, st, node, inputs| {
            let started = Instant::now();
            let result = eval(ctx, st, node, inputs);
            if run > 0 {
                let seconds = started.elapsed().as_secs_f64();
                *ops.entry(node.op.name().to_string()).or_insert(0.0) += seconds;
                per_node
                    .entry(format!("{} ({})", node.name, node.op.name()))
                    .or_default()
                    .push(seconds);
            }
            result
        })?;
        for (op, seconds) in ops {
            per_op.entry(op).or_default().push(seconds);
        }
    }
    let sorted = |map: HashMap<String, Vec<f64>>| {
        let mut v: Timings = map
            .into_iter()
            .map(|(name, mut samples)| {
                samples.sort_by(f64::total_cmp);
                (name, quantile(&samples, 0.5))
            })
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    };
    Ok((sorted(per_node), sorted(per_op)))
}

/// A deterministic 640x480 colour gradient with some texture (what `bench` feeds by default).
pub fn synthetic_image() -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8])
    }))
}

/// The process's peak resident set size (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_sorted_samples() {
        let l = Latency::from_seconds((1..=100).rev().map(|ms| ms as f64 / 1e3).collect());
        assert_eq!(
            (l.p50.round(), l.p90.round(), l.p99.round()),
            (51.0, 90.0, 99.0)
        );
        assert!((l.mean - 50.5).abs() < 1e-9);
        assert_eq!(l.runs, 100);
    }
}
