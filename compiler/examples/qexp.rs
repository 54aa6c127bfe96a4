use graft_compiler::quantize::*;
use graft_runtime::preprocess::{load_image, Normalization, Preprocessing};
use std::time::Instant;
use tract_onnx::prelude::*;

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut v = vec![];
    for c in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(c.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

fn top1(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let mut m = tract_onnx::onnx()
        .model_for_path(&args[1])?
        .into_typed()?
        .into_decluttered()?;
    m.properties.retain(|k, _| !k.starts_with("onnx."));
    let all = files(&args[2]);
    let ncal: usize = args[3].parse()?;
    let neval: usize = args[4].parse()?;
    let depthwise = args[5] == "1";
    let pre = Preprocessing::for_input(224, 224, Normalization::tf());
    let tensor = |p: &std::path::Path| -> Tensor {
        let img = load_image(p).unwrap();
        Tensor::from_shape(&[1, 3, 224, 224], &pre.apply(&img)).unwrap()
    };
    // calibration: every 7th image; eval: others
    let cal: Vec<Tensor> = all
        .iter()
        .step_by(all.len() / ncal)
        .take(ncal)
        .map(|p| tensor(p))
        .collect();
    let t = Instant::now();
    let calib = calibrate(&m, cal, |_| {}).unwrap();
    eprintln!("calibrated in {:?}", t.elapsed());
    let config = QuantizeConfig {
        depthwise,
        keep_f32: vec![],
    };
    for l in plan(&m, &config).unwrap() {
        eprintln!("{} {} {}", l.layer, l.kind, l.precision);
    }
    let q = match args[6].as_str() {
        "int8" => quantize(&m, &calib, &config).unwrap(),
        p => compress_weights(&m, p.parse().unwrap()).unwrap(),
    };
    let f = tract_nnef::nnef();
    let mut buf = vec![];
    if let Err(e) = f.write_to_tar(&q, &mut buf) {
        for c in e.chain() {
            eprintln!("CAUSE: {c}");
        }
        return Err(e);
    }
    let mut fbuf = vec![];
    f.write_to_tar(&m, &mut fbuf)?;
    eprintln!("nnef f32 {} bytes, int8 {} bytes", fbuf.len(), buf.len());
    std::fs::write("/tmp/qexp/q.nnef.tar", &buf)?;
    let q2 = match f.model_for_read(&mut &buf[..]) {
        Ok(m) => m,
        Err(e) => {
            for c in e.chain() {
                eprintln!("CAUSE: {c}");
            }
            return Err(e);
        }
    };
    let mut qopt = q2;
    qopt.optimize()?;
    let mut counts = std::collections::BTreeMap::new();
    for n in &qopt.nodes {
        *counts.entry(n.op.name().to_string()).or_insert(0) += 1;
    }
    eprintln!("OPS {counts:?}");
    for n in qopt
        .nodes
        .iter()
        .filter(|n| n.op.name() == "OptMatMul")
        .take(4)
    {
        eprintln!("INFO {} {:?}", n.name, n.op.info());
    }
    for n in &qopt.nodes {
        if n.op.name().contains("EinSum") || n.op.name().contains("Conv") {
            eprintln!("SLOW {} {}", n.name, n.op.name());
        }
    }
    for n in qopt
        .nodes
        .iter()
        .filter(|n| n.name.contains("blocks_15__project"))
    {
        eprintln!(
            "NODE {} {} {:?} in={:?}",
            n.name,
            n.op.name(),
            qopt.outlet_fact(n.id.into())
                .map(|f| format!("{:?}", f))
                .unwrap_or_default(),
            n.inputs
                .iter()
                .map(|i| qopt.node(i.node).name.clone())
                .collect::<Vec<_>>()
        );
    }
    let qplan = qopt.into_runnable()?;
    {
        let x = tensor(&all[5]);
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&qplan)?;
        let mut times: std::collections::HashMap<String, (f64, usize)> = Default::default();
        for _ in 0..3 {
            state.run_plan_with_eval(tvec![x.clone().into()], |ctx, st, node, inputs| {
                let s = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, st, node, inputs);
                let key = if node.op.name() == "OptMatMul" {
                    node.name.clone()
                } else {
                    node.op.name().to_string()
                };
                let e = times.entry(key).or_default();
                e.0 += s.elapsed().as_secs_f64() / 3.0;
                e.1 += 1;
                r
            })?;
        }
        let mut v: Vec<_> = times.into_iter().collect();
        v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        for (k, (t, n)) in v.iter().take(14) {
            eprintln!("PROF {k}: {:.2} ms ({} nodes)", t * 1e3, n / 3);
        }
    }
    let fopt = m.clone().into_optimized()?;
    for n in fopt
        .nodes
        .iter()
        .filter(|n| n.op.name() == "OptMatMul")
        .take(3)
    {
        eprintln!("FINFO {} {:?}", n.name, n.op.info());
    }
    let fplan = fopt.into_runnable()?;
    let mut agree = 0;
    let mut n = 0;
    let mut tq = 0f64;
    let mut tf = 0f64;
    for p in all.iter().skip(3).step_by(all.len() / neval).take(neval) {
        let x = tensor(p);
        let s = Instant::now();
        let a = fplan.run(tvec![x.clone().into()])?;
        tf += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let b = qplan.run(tvec![x.into()])?;
        tq += s.elapsed().as_secs_f64();
        let (a, b) = (a[0].view(), b[0].view());
        let a = a.as_slice::<f32>()?;
        let b = b.as_slice::<f32>()?;
        agree += (top1(a) == top1(b)) as usize;
        n += 1;
    }
    println!(
        "agree {agree}/{n}; f32 {:.1} ms int8 {:.1} ms ratio {:.3}",
        tf * 1e3 / n as f64,
        tq * 1e3 / n as f64,
        tq / tf
    );
    Ok(())
}
