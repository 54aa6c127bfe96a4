//! Prints the nodes of an artifact's graph as the runtime reads it (before graft's kernels and
//! tract's optimisation): what the kernel rewrites have to match.
//!
//! `cargo run --release -p graft-runtime --example dump_graph -- MODEL.graft [NODES=60]`
use graft_runtime::weights::widen;
use tract_core::prelude::*;
fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let artifact = graft_runtime::Artifact::open(&args[1])?;
    let archive = widen(artifact.graph_bytes()).map_err(TractError::msg)?;
    let graph = tract_nnef::nnef().model_for_read(&mut &archive[..])?;
    for n in graph
        .nodes()
        .iter()
        .take(args.get(2).map_or(60, |a| a.parse().unwrap()))
    {
        println!(
            "{} {} [{}] {:?} -> {:?}",
            n.id,
            n.name,
            n.op.name(),
            n.inputs,
            n.outputs[0].fact
        );
        if let Some(e) = n.op_as::<tract_core::ops::einsum::EinSum>() {
            println!("    einsum {}", e.axes);
        }
    }
    Ok(())
}
