//! Running a graph as the runtime will (end to end, from image files) on the reported and test
//! images, and picking out the feature rows and samples of each split.

use super::*;

/// Runs an encoded graph end to end (as the runtime will) on labelled images.
pub(super) fn run_graph(
    manifest: &Manifest,
    graph: &[u8],
    samples: &[Sample],
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<graft_runtime::eval::Evaluation> {
    let model = graph_model(manifest, graph, options)?;
    let evaluation = evaluate(&model, samples, options.threads, reporter);
    if reporter.cancelled() {
        return Err(CompileError::Interrupted);
    }
    Ok(evaluation)
}

/// `graph` with `manifest` loaded as the runtime loads an artifact, without writing it.
pub(super) fn graph_model(
    manifest: &Manifest,
    graph: &[u8],
    options: &CompileOptions,
) -> Result<Model> {
    let artifact = Artifact::from_bytes(artifact::encode(manifest, graph), &options.out)?;
    Ok(Model::from_artifact(artifact)?)
}

/// The manifest of the all-f32 graph `manifest`'s graph was made from (f32 compute and weights).
pub(super) fn all_f32(manifest: &Manifest) -> Manifest {
    let mut f32_manifest = manifest.clone();
    f32_manifest.precision = Precision::F32.name().into();
    f32_manifest.quantization = None;
    f32_manifest.weights = WeightStorage::F32;
    f32_manifest
}

/// Accuracy of the artifact's graph on the test images whose features could be extracted, and
/// their number: measured only, after every choice.
pub(super) fn test_accuracy(
    manifest: &Manifest,
    graph: &[u8],
    (test, extracted): (&[Sample], &Features),
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<(f32, usize)> {
    let test = usable(test, extracted);
    let evaluation = run_graph(manifest, graph, &test, options, reporter)?;
    reporter.message(&format!(
        "test      artifact run end to end on {} test images (held out: no choice made on them): accuracy {:.4}",
        evaluation.confusion.total(),
        evaluation.accuracy()
    ));
    Ok((evaluation.accuracy(), evaluation.confusion.total() as usize))
}

/// The rows of `all` whose images are among `samples` (those whose features were extracted).
pub(super) fn rows_of(all: &Features, samples: &[Sample]) -> Features {
    let paths: HashSet<&Path> = samples.iter().map(|s| s.path.as_path()).collect();
    let rows: Vec<usize> = (0..all.rows())
        .filter(|&i| paths.contains(all.paths[i].as_path()))
        .collect();
    all.select(&rows)
}

/// The samples of `samples` whose features were extracted (undecodable images are skipped).
pub(super) fn usable(samples: &[Sample], features: &Features) -> Vec<Sample> {
    let extracted: HashSet<&Path> = features.paths.iter().map(|p| p.as_path()).collect();
    samples
        .iter()
        .filter(|s| extracted.contains(s.path.as_path()))
        .cloned()
        .collect()
}
