use tract_onnx::prelude::*;
fn main() -> TractResult<()> {
    let mut model = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true)
        .model_for_path("fixtures/efficientnet_lite0.onnx")?;
    let n = model.symbols.sym("N");
    model.set_input_fact(
        0,
        f32::fact(&[n.clone().to_dim(), 3.to_dim(), 224.to_dim(), 224.to_dim()]).into(),
    )?;
    let mut typed = model.into_typed()?.into_decluttered()?;
    typed.properties.retain(|k, _| !k.starts_with("onnx."));
    let mut buf = Vec::new();
    tract_nnef::nnef().write_to_tar(&typed, &mut buf)?;
    let back = tract_nnef::nnef().model_for_read(&mut &buf[..])?;
    println!("nnef round trip input {:?}", back.input_fact(0)?);
    for b in [1i64, 8] {
        let sym = back.symbols.sym("N");
        let concrete = back.set_symbols(&std::collections::HashMap::from([(sym, b.to_dim())]))?;
        let plan = concrete.into_optimized()?.into_runnable()?;
        let input = Tensor::zero::<f32>(&[b as usize, 3, 224, 224])?;
        for _ in 0..2 {
            plan.run(tvec!(input.clone().into_tvalue()))?;
        }
        let t = std::time::Instant::now();
        for _ in 0..5 {
            plan.run(tvec!(input.clone().into_tvalue()))?;
        }
        println!(
            "concretized batch {b}: {:.2} ms/image",
            t.elapsed().as_secs_f64() * 1000.0 / 5.0 / b as f64
        );
    }
    Ok(())
}
