//! Honest numbers: no choice the compile makes sees the images its reported accuracy comes from.
//! Swapping the labels of the held-out images changes the reported accuracy and nothing else;
//! with `train/val/test`, the test split is measured and never chosen on.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

/// Copies the images of `from/<class>` into `to/<class as renamed>`.
fn copy_split(
    from: &Path,
    to: &Path,
    rename: &dyn Fn(&str) -> String,
    keep: &dyn Fn(usize) -> bool,
) {
    for class in ["ants", "bees"] {
        let dir = to.join(rename(class));
        std::fs::create_dir_all(&dir).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(from.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for (_, file) in files.iter().enumerate().filter(|(i, _)| keep(*i)) {
            std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
        }
    }
}

fn same(class: &str) -> String {
    class.to_string()
}

fn swapped(class: &str) -> String {
    if class == "ants" { "bees" } else { "ants" }.to_string()
}

#[derive(serde::Deserialize)]
struct Report {
    manifest: graft_runtime::artifact::Manifest,
}

/// `graft compile` of Lite0 on `data` into `out`, with `extra` options.
fn compile_with(data: &Path, out: &Path, extra: &[&std::ffi::OsStr]) -> Output {
    let mut options: Vec<&std::ffi::OsStr> = args!["--normalize", "tf", "--no-cache"].to_vec();
    options.extend_from_slice(extra);
    compile_cmd(graft(), &lite0(), data, out, &options).expect_code(0)
}

/// Compiles Lite0 in int8 on `data` (`--json`), returning the report.
fn compile(data: &Path, out: &Path) -> Report {
    let output = compile_with(data, out, args!["--precision", "int8", "--json", "--quiet"]);
    serde_json::from_str(&output.stdout).unwrap()
}

/// `graft predict --json` on `images`: the artifact's top-2 labels and probabilities.
fn predictions(artifact: &Path, images: &Path) -> serde_json::Value {
    let out = run(
        graft(),
        args!["predict", artifact, images, "--json", "--top-k", "2"],
    )
    .expect_code(0)
    .stdout;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    doc["predictions"].clone()
}

/// The val labels swapped (ants <-> bees): the same artifact graph and predictions, the same
/// choices (epoch, calibration, int8 layers), only the reported accuracy differs.
#[test]
fn swapping_the_validation_labels_changes_only_the_reported_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let mini = hymenoptera_mini();
    let data = dir.path().join("swapped");
    copy_split(&mini.join("train"), &data.join("train"), &same, &|_| true);
    copy_split(&mini.join("val"), &data.join("val"), &swapped, &|_| true);
    let (a, b) = (
        dir.path().join("true.graft"),
        dir.path().join("swapped.graft"),
    );
    let (true_labels, swapped_labels) = (compile(&mini, &a), compile(&data, &b));
    let (ma, mb) = (&true_labels.manifest, &swapped_labels.manifest);
    let (ta, tb) = (ma.training.as_ref().unwrap(), mb.training.as_ref().unwrap());
    assert_eq!(ta.best_epoch, tb.best_epoch);
    assert_eq!(ta.history, tb.history);
    let (qa, qb) = (
        ma.quantization.as_ref().unwrap(),
        mb.quantization.as_ref().unwrap(),
    );
    assert_eq!(qa.method, qb.method);
    assert_eq!(qa.layers, qb.layers);
    let (pa, pb) = (
        predictions(&a, &mini.join("val")),
        predictions(&b, &mini.join("val")),
    );
    assert!(pa == pb, "different predictions");
    let inspected = run(graft(), args!["inspect", a]).expect_code(0).stdout;
    assert!(
        inspected.contains("(val, held out; choices made on 10 train holdout images)"),
        "{inspected}"
    );
    let (va, vb) = (ma.metrics.as_ref().unwrap(), mb.metrics.as_ref().unwrap());
    assert_eq!(va.selection_source.as_deref(), Some("train holdout"));
    assert!(va.val_accuracy >= 0.8, "{}", va.val_accuracy);
    assert!(
        (va.val_accuracy + vb.val_accuracy - 1.0).abs() < 1e-6,
        "swapped labels: {} vs {}",
        va.val_accuracy,
        vb.val_accuracy
    );
}

/// `train/val/test`: choices on val, test accuracy measured and printed, and swapping the test
/// labels changes nothing but the test accuracy.
#[test]
fn a_test_split_is_measured_and_never_chosen_on() {
    let dir = tempfile::tempdir().unwrap();
    let mini = hymenoptera_mini();
    let build = |name: &str, test_classes: &dyn Fn(&str) -> String| -> PathBuf {
        let data = dir.path().join(name);
        copy_split(&mini.join("train"), &data.join("train"), &same, &|_| true);
        copy_split(&mini.join("val"), &data.join("val"), &same, &|i| i % 2 == 0);
        copy_split(&mini.join("val"), &data.join("test"), test_classes, &|i| {
            i % 2 == 1
        });
        data
    };
    let (data, data_swapped) = (build("three", &same), build("three-swapped", &swapped));
    let out = dir.path().join("three.graft");
    let report = dir.path().join("report");
    let printed = compile_with(&data, &out, args!["--report", report]);
    let page = std::fs::read_to_string(dir.path().join("report/index.html")).unwrap();
    assert!(
        page.contains("test accuracy")
            && page.contains("on 12 test images (held out: no choice made on them)")
            && page.contains("choices were made on"),
        "report page lacks the test accuracy or the split note"
    );
    assert!(
        printed.stdout.contains("validation accuracy")
            && printed.stdout.contains("(12 val images, used for choices)")
            && printed.stdout.contains("test accuracy ")
            && printed
                .stdout
                .contains("(12 test images, held out: no choice made on them)"),
        "{}",
        printed.stdout
    );
    let (a, b) = (dir.path().join("a.graft"), dir.path().join("b.graft"));
    let (ra, rb) = (compile(&data, &a), compile(&data_swapped, &b));
    let (ma, mb) = (ra.manifest.metrics.unwrap(), rb.manifest.metrics.unwrap());
    assert_eq!(ma.selection_source.as_deref(), Some("val"));
    assert_eq!(ma.test_images, Some(12));
    assert_eq!(ma.val_accuracy, mb.val_accuracy);
    let (ta, tb) = (ma.test_accuracy.unwrap(), mb.test_accuracy.unwrap());
    assert!(
        (ta + tb - 1.0).abs() < 1e-6,
        "test accuracy {ta} vs swapped {tb}"
    );
    let (pa, pb) = (
        predictions(&a, &data.join("test")),
        predictions(&b, &data.join("test")),
    );
    assert!(pa == pb, "different predictions");
}
