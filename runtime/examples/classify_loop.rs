//! Times `Model::classify` on one decoded image, for comparing the bindings' per-image overhead
//! with the Rust call (scripts/python_overhead.py alternates it with the Python module).
//!
//! `cargo run --release -p graft-runtime --example classify_loop -- MODEL IMAGE ITERATIONS`
//! prints the median milliseconds per call.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, image, iterations] = &args[..] else {
        return Err("usage: classify_loop MODEL IMAGE ITERATIONS".into());
    };
    let model = graft_runtime::Model::load(model)?;
    let image = model
        .manifest()
        .preprocessing
        .load(std::path::Path::new(image))?;
    let iterations: usize = iterations.parse()?;
    for _ in 0..5 {
        model.classify(&image)?;
    }
    let mut times: Vec<f64> = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            model
                .classify(&image)
                .map(|_| started.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    println!("{:.4}", times[times.len() / 2]);
    Ok(())
}
