//! Latency of two artifacts measured in alternation (A, B, A, B, ...) in one process, one thread:
//! on a shared VM whose speed drifts between runs, the per-pair ratio is steadier than timings
//! taken one artifact after the other.
//!
//! `cargo run --release -p graft-runtime --example ab -- A.graft B.graft [PAIRS=200]`
use std::time::Instant;

use graft_runtime::Model;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: ab A.graft B.graft [PAIRS=200]");
        std::process::exit(2);
    }
    let pairs: usize = args.get(3).map_or(Ok(200), |p| p.parse())?;
    let (a, b) = (Model::load(&args[1])?, Model::load(&args[2])?);
    let input = vec![0.5f32; a.manifest().preprocessing.tensor_len()];
    let time = |model: &Model| -> Result<f64, graft_runtime::Error> {
        let started = Instant::now();
        model.classify_tensor(&input)?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..10 {
        time(&a)?;
        time(&b)?;
    }
    let (mut ta, mut tb, mut ratios) = (vec![], vec![], vec![]);
    for _ in 0..pairs {
        let (x, y) = (time(&a)?, time(&b)?);
        ta.push(x);
        tb.push(y);
        ratios.push(y / x);
    }
    println!(
        "{pairs} pairs, one thread: A p50 {:.2} ms, B p50 {:.2} ms; B/A per pair: median {:.3}",
        median(&mut ta),
        median(&mut tb),
        median(&mut ratios)
    );
    Ok(())
}
