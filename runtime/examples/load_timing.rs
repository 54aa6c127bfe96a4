//! Prints where `Model::load` spends its time: `cargo run --release --example load_timing -- M.graft`.
use tract_core::prelude::*;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: load_timing MODEL.graft");
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let model = graft_runtime::Model::load(&path).expect("load");
        let total = started.elapsed().as_secs_f64();
        println!("{:?} total {total:.4}", model.load_timings());
    }
    let artifact = graft_runtime::Artifact::open(&path).unwrap();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let proto = tract_nnef::nnef()
            .proto_model_for_read(&mut artifact.graph_bytes())
            .unwrap();
        let a = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let graph = tract_nnef::nnef().model_for_proto_model(&proto).unwrap();
        let b = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut g2 = graph.clone();
        g2.optimize().unwrap();
        let c = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let _ = graph.into_optimized().unwrap();
        let d = t.elapsed().as_secs_f64();
        println!("proto {a:.4} translate {b:.4} optimize-only {c:.4} declutter+optimize {d:.4}");
    }
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut ar = tar::Archive::new(artifact.graph_bytes());
        let mut total = 0;
        let mut text = String::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).unwrap();
            total += v.len();
            if e.path().unwrap().ends_with("graph.nnef") {
                text = String::from_utf8(v).unwrap();
            }
        }
        let a = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let doc = tract_nnef::ast::parse::parse_document(&text).unwrap();
        let b = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let nnef = tract_nnef::nnef();
        let c = t.elapsed().as_secs_f64();
        println!("tar read {total} bytes {a:.4}, text parse {b:.4} ({} fragments), nnef() {c:.4} ({} stdlib)", doc.fragments.len(), nnef.stdlib.len());
    }
    let proto = tract_nnef::nnef()
        .proto_model_for_read(&mut artifact.graph_bytes())
        .unwrap();
    let graph = tract_nnef::nnef().model_for_proto_model(&proto).unwrap();
    let mut only = graph.clone();
    only.optimize().unwrap();
    let plans = [
        ("optimize-only", only.into_runnable().unwrap()),
        (
            "declutter+optimize",
            graph.into_optimized().unwrap().into_runnable().unwrap(),
        ),
    ];
    let input = Tensor::zero::<f32>(&[1, 3, 224, 224]).unwrap();
    for round in 0..3 {
        for (name, plan) in &plans {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                plan.run(tvec!(input.clone().into_tvalue())).unwrap();
            }
            println!(
                "round {round} {name}: {:.2} ms/run",
                t.elapsed().as_secs_f64() * 1000.0 / 20.0
            );
        }
    }
}
