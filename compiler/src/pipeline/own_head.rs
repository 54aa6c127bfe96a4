//! `--keep-imagenet-head`: the second, shorter pipeline (the backbone's own classifier, softmax
//! appended, no data and no training).

use super::*;

/// `--keep-imagenet-head`: the backbone's own classifier, softmax appended, no training.
pub(super) fn compile_with_own_head(
    options: &CompileOptions,
    backbone: Backbone,
    preprocessing: Preprocessing,
    reporter: &dyn Reporter,
    started: Instant,
) -> Result<CompileReport> {
    let outputs = backbone.output_names();
    let [output] = &outputs[..] else {
        return Err(CompileError::InvalidOption(format!(
            "--keep-imagenet-head needs a backbone with one output, it has {}",
            outputs.len()
        )));
    };
    let cut = backbone.cut(output)?;
    let classes = cut.feature_dim();
    let labels = match &options.labels_file {
        Some(path) => read_labels(path, classes)?,
        None => (0..classes).map(|i| format!("class_{i}")).collect(),
    };
    reporter.message(&format!(
        "head      the backbone's own classifier ({output:?}, {classes} classes), softmax appended"
    ));
    let manifest = manifest_for(
        &cut,
        &preprocessing,
        &labels,
        &HeadSummary::backbone_classifier(classes),
    );
    let mut manifest = manifest;
    let graph = cut.into_folded(&[])?.to_nnef()?;
    let narrowed = narrow_weights(&graph, options.weights, &mut manifest, reporter)?;
    let bytes = artifact::encode(&manifest, narrowed.as_deref().unwrap_or(&graph));
    artifact::write_atomic(&options.out, &bytes)?;
    Ok(CompileReport {
        manifest,
        artifact_bytes: bytes.len() as u64,
        cache_hits: 0,
        computed: 0,
        skipped: Vec::new(),
        head_val_accuracy: None,
        artifact_val_accuracy: None,
        extract_seconds: 0.0,
        total_seconds: started.elapsed().as_secs_f64(),
        evaluation: None,
    })
}
