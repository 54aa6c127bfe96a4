use std::sync::atomic::Ordering;
use std::time::Instant;
use graft_runtime::kernels::gemm_f32::EXPERIMENT;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m = graft_runtime::Model::load(&args[1]).unwrap();
    let input = vec![0.5f32; m.manifest().preprocessing.tensor_len()];
    let mut t = [vec![], vec![]];
    for i in 0..400 {
        let on = i % 2 == 0;
        EXPERIMENT.store(on, Ordering::Relaxed);
        let s = Instant::now();
        m.classify_tensor(&input).unwrap();
        if i >= 20 { t[on as usize].push(s.elapsed().as_secs_f64() * 1e3); }
    }
    let mut ratios: Vec<f64> = t[1].iter().zip(&t[0]).map(|(a, b)| a / b).collect();
    ratios.sort_by(f64::total_cmp);
    for v in t.iter_mut() { v.sort_by(f64::total_cmp); }
    println!("off p50 {:.3} ms, on p50 {:.3} ms, on/off per pair median {:.3}", t[0][t[0].len()/2], t[1][t[1].len()/2], ratios[ratios.len()/2]);
}
