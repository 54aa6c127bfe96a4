//! Where an artifact's plan spends its time, operator by operator and node by node (one thread,
//! median of 100 runs on a zero image), built as `graft-run` builds it and, with `--tract-kernels`,
//! with tract's own operators instead of graft's kernels.
//!
//! `cargo run --release -p graft-runtime --example profile -- MODEL.graft [--tract-kernels] [NODES]`
use graft_runtime::bench::profile_plan;
use graft_runtime::kernels::use_graft_kernels;
use graft_runtime::weights::widen;
use tract_core::prelude::*;

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .expect("usage: profile MODEL.graft [--tract-kernels] [NODES]");
    let tract_kernels = args.iter().any(|a| a == "--tract-kernels");
    let nodes: usize = args
        .iter()
        .skip(2)
        .find_map(|a| a.parse().ok())
        .unwrap_or(12);
    let artifact = graft_runtime::Artifact::open(path)?;
    let archive = widen(artifact.graph_bytes()).map_err(TractError::msg)?;
    let mut graph = tract_nnef::nnef().model_for_read(&mut &archive[..])?;
    if !tract_kernels {
        use_graft_kernels(&mut graph)?;
    }
    graph.optimize()?;
    let plan = graph.into_runnable()?;
    let x = Tensor::zero::<f32>(&artifact.manifest.input.shape)?;
    let (per_node, per_op) = profile_plan(&plan, &x, 100)?;
    let total: f64 = per_op.iter().map(|(_, t)| t).sum();
    println!(
        "{path} ({}, {} kernels): {:.2} ms per image, by operator:",
        artifact.manifest.precision,
        if tract_kernels { "tract's" } else { "graft's" },
        total * 1e3
    );
    for (op, seconds) in per_op.iter().filter(|(_, t)| *t * 1e3 >= 0.01) {
        println!(
            "{:8.2} ms {:5.1} %  {op}",
            seconds * 1e3,
            seconds / total * 100.0
        );
    }
    println!("slowest nodes:");
    for (node, seconds) in per_node.iter().take(nodes) {
        println!("{:8.2} ms  {node}", seconds * 1e3);
    }
    Ok(())
}
