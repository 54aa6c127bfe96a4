use graft_runtime::kernels::use_graft_kernels;
use graft_runtime::weights::widen;
use std::time::Instant;
use tract_core::plan::SimpleState;
use tract_core::prelude::*;
fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] * 1e3
}
fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let artifact = graft_runtime::Artifact::open(&args[1])?;
    let archive = widen(artifact.graph_bytes()).map_err(TractError::msg)?;
    let mut graph = tract_nnef::nnef().model_for_read(&mut &archive[..])?;
    use_graft_kernels(&mut graph)?;
    graph.optimize()?;
    let plan = graph.into_runnable()?;
    let x = Tensor::zero::<f32>(&artifact.manifest.input.shape)?;
    let data = vec![0.1f32; x.len()];
    let mut state = SimpleState::new(&plan)?;
    for round in 0..3 {
        let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
        for _ in 0..200 {
            let t = Instant::now();
            let input = Tensor::from_shape(&artifact.manifest.input.shape, &data)?;
            plan.run(tvec![input.into_tvalue()])?;
            a.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            plan.run(tvec![x.clone().into_tvalue()])?;
            b.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            state.run(tvec![x.clone().into_tvalue()])?;
            c.push(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "round {round}: copy+run {:.3} ms, run {:.3} ms, state reused {:.3} ms",
            p50(a),
            p50(b),
            p50(c)
        );
    }
    let (_, per_op) = graft_runtime::bench::profile_plan(&plan, &x, 50)?;
    eprintln!(
        "profile sum {:.3} ms",
        per_op.iter().map(|x| x.1).sum::<f64>() * 1e3
    );
    Ok(())
}
