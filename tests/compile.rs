//! End to end through the real `graft` and `graft-run` binaries: compile the fixture backbone on
//! the fixture images, then predict, evaluate and inspect the artifact.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

fn graft_run() -> PathBuf {
    graft_run_beside(graft())
}

/// One compile of the fixtures shared by the tests of this file.
struct Compiled {
    dir: tempfile::TempDir,
    artifact: PathBuf,
    output: Output,
}

impl Compiled {
    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
}

fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let artifact = dir.path().join("bees.graft");
        let cache = dir.path().join("cache");
        let output = compile_cmd(
            &lite0(),
            &hymenoptera_mini(),
            &artifact,
            args!["--cache-dir", cache],
        )
        .expect_code(0);
        Compiled {
            dir,
            artifact,
            output,
        }
    })
}

/// The number after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> f64 {
    let start = text
        .find(prefix)
        .unwrap_or_else(|| panic!("{prefix:?} not in:\n{text}"))
        + prefix.len();
    text[start..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs `graft compile --backbone B --data D --out O` followed by `extra`.
fn compile_cmd(backbone: &Path, data: &Path, out: &Path, extra: &[&std::ffi::OsStr]) -> Output {
    common::compile_cmd(graft(), backbone, data, out, extra)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn fixture_compile_reaches_the_accuracy_floor_and_eval_measures_the_same() {
    let c = compiled();
    let printed = number_after(&c.output.stdout, "validation accuracy ");
    assert!(
        printed >= 0.9,
        "validation accuracy {printed} below the 0.9 floor"
    );
    assert!(
        c.output
            .stdout
            .contains("(24 val images, held out: no choice made on them)"),
        "{}",
        c.output.stdout
    );
    assert!(
        c.output.stderr.contains("normalize tf (auto"),
        "the probe should pick tf for Lite0:\n{}",
        c.output.stderr
    );

    let eval = run(graft(), args!["eval", c.artifact, hymenoptera_mini()]).expect_code(0);
    let measured = number_after(&eval.stdout, "accuracy ");
    assert_eq!(measured, printed, "eval:\n{}", eval.stdout);
    assert!(eval.stdout.contains("on 24 images"), "{}", eval.stdout);

    let eval_json = json(
        &run(
            graft_run().as_path(),
            args!["eval", c.artifact, hymenoptera_mini(), "--json"],
        )
        .expect_code(0)
        .stdout,
    );
    assert_eq!(
        format!("{:.4}", eval_json["accuracy"].as_f64().unwrap()),
        format!("{printed:.4}")
    );
    assert_eq!(eval_json["images"], 24);
}

#[test]
fn second_compile_reuses_the_feature_cache() {
    let c = compiled();
    assert!(
        c.output
            .stderr
            .contains("72 images: 0 from cache, 72 computed"),
        "{}",
        c.output.stderr
    );
    let again = c.dir.path().join("again.graft");
    let out = compile_cmd(
        &lite0(),
        &hymenoptera_mini(),
        &again,
        args!["--cache-dir", c.cache(), "--head", "mlp:32"],
    )
    .expect_code(0);
    assert!(
        out.stderr.contains("72 images: 72 from cache, 0 computed"),
        "{}",
        out.stderr
    );
}

#[test]
fn same_seed_gives_a_byte_identical_artifact() {
    let c = compiled();
    let again = c.dir.path().join("same.graft");
    compile_cmd(
        &lite0(),
        &hymenoptera_mini(),
        &again,
        args!["--cache-dir", c.cache(), "--quiet"],
    )
    .expect_code(0);
    assert!(
        std::fs::read(&again).unwrap() == std::fs::read(&c.artifact).unwrap(),
        "artifacts differ"
    );
}

#[test]
fn predict_prints_top_k_and_graft_run_agrees() {
    let c = compiled();
    let images = [
        hymenoptera_mini().join("val/ants/11381045_b352a47d8c.jpg"),
        hymenoptera_mini().join("val/bees"),
    ];
    let graft_out = run(
        graft(),
        args!["predict", c.artifact, images[0], images[1], "--json", "-k", "2"],
    )
    .expect_code(0);
    let run_out = run(
        graft_run().as_path(),
        args![c.artifact, images[0], images[1], "--json", "-k", "2"],
    )
    .expect_code(0);
    assert_eq!(graft_out.stdout, run_out.stdout);
    let doc = json(&graft_out.stdout);
    let predictions = doc["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 13, "1 ant + 12 bees");
    for p in predictions {
        let top = p["top_k"].as_array().unwrap();
        let total: f64 = top.iter().map(|s| s["probability"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{p}");
        assert!(top[0]["probability"].as_f64() >= top[1]["probability"].as_f64());
    }
    assert_eq!(predictions[0]["top_k"][0]["label"], "ants");

    let text = run(graft_run().as_path(), args![c.artifact, images[0]]).expect_code(0);
    assert!(
        text.stdout
            .starts_with(&format!("{}: ants ", images[0].display())),
        "{}",
        text.stdout
    );
    assert!(
        text.stderr.starts_with("classified 1 image in ")
            && text.stderr.contains(" images/s (1 thread, batches of 32)"),
        "{}",
        text.stderr
    );

    // Batches of 5 stream the same 13 lines, in the same order, as one batch of 32.
    let whole = run(graft(), args!["predict", c.artifact, images[0], images[1]]).expect_code(0);
    let batched = run(
        graft(),
        args![
            "predict",
            c.artifact,
            images[0],
            images[1],
            "--batch",
            "5",
            "--threads",
            "2"
        ],
    )
    .expect_code(0);
    assert_eq!(whole.stdout.lines().count(), 13);
    assert_eq!(whole.stdout, batched.stdout);
    assert!(
        batched.stderr.contains("classified 13 images in ")
            && batched
                .stderr
                .contains(" images/s (2 threads, batches of 5)"),
        "{}",
        batched.stderr
    );
    let zero = run(
        graft(),
        args!["predict", c.artifact, images[0], "--batch", "0"],
    )
    .expect_code(1);
    assert!(
        zero.stderr
            .contains("invalid value '0' for '--batch <BATCH>'"),
        "{}",
        zero.stderr
    );
}

#[test]
fn bench_reports_batch_latency_and_throughput() {
    let c = compiled();
    let doc = json(
        &run(
            graft_run().as_path(),
            args![
                "bench",
                c.artifact,
                "--iterations",
                "16",
                "--batch",
                "4",
                "--threads",
                "2",
                "--json"
            ],
        )
        .expect_code(0)
        .stdout,
    );
    assert_eq!(doc["batch"], 4);
    assert_eq!(doc["threads"], 2);
    assert_eq!(doc["batch_latency"]["runs"], 5, "16 / 4 runs, at least 5");
    let p50 = doc["batch_latency"]["p50_ms"].as_f64().unwrap();
    let single = doc["latency"]["p50_ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && single > 0.0);
    assert!(doc["batch_images_per_s"].as_f64().unwrap() > 0.0);
    for key in [
        "load_ms",
        "first_inference_ms",
        "images_per_s",
        "size_bytes",
    ] {
        assert!(doc[key].as_f64().unwrap() > 0.0, "{key}: {doc}");
    }
    // Every duration names its unit (issue 19): the load stages are milliseconds too.
    let stages = &doc["load_stages_ms"];
    for key in ["validate_ms", "parse_ms", "optimize_ms"] {
        assert!(stages[key].as_f64().unwrap() >= 0.0, "{key}: {doc}");
    }
    assert!(
        stages["parse_ms"].as_f64().unwrap() + stages["optimize_ms"].as_f64().unwrap()
            <= doc["load_ms"].as_f64().unwrap() * 1.01,
        "stages in the same unit as load_ms: {doc}"
    );
    assert!(doc["decode"].is_null(), "no files, no decoding time: {doc}");
    let photo = fixtures().join("hymenoptera-mini/val/ants/11381045_b352a47d8c.jpg");
    let doc = json(
        &run(
            graft_run().as_path(),
            args!["bench", c.artifact, photo, "--iterations", "4", "--json"],
        )
        .expect_code(0)
        .stdout,
    );
    assert_eq!(doc["decode"]["runs"], 4, "{doc}");
    assert!(doc["decode"]["p50_ms"].as_f64().unwrap() > 0.0, "{doc}");
}

/// A 12-megapixel photo: the fast pipeline decodes it at 1/8 scale and classifies it as the
/// full-size reference pipeline does, through the same artifact.
#[test]
fn fast_and_reference_pipelines_agree_on_a_12_megapixel_photo() {
    use graft_runtime::preprocess::{decode_image, Pipeline, Preprocessing};
    let c = compiled();
    let model = graft_runtime::Model::load(&c.artifact).unwrap();
    let fast = model.manifest().preprocessing.clone();
    assert_eq!(fast.pipeline, Pipeline::Fast);
    let reference = Preprocessing {
        pipeline: Pipeline::Reference,
        ..fast.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in [
        "ants/11381045_b352a47d8c.jpg",
        "bees/1181173278_23c36fac71.jpg",
    ]
    .iter()
    .enumerate()
    {
        let source = decode_image(
            &std::fs::read(fixtures().join("hymenoptera-mini/val").join(name)).unwrap(),
            Path::new(name),
        )
        .unwrap();
        let big = source.resize_exact(4000, 3000, image::imageops::FilterType::Triangle);
        let photo = dir.path().join(format!("photo{i}.jpg"));
        big.to_rgb8().save(&photo).unwrap();
        let small = fast.load(&photo).unwrap();
        assert_eq!((small.width(), small.height()), (500, 375), "1/8 scale");
        let full = reference.load(&photo).unwrap();
        assert_eq!((full.width(), full.height()), (4000, 3000));
        let a = model.classify_tensor(&fast.apply(&small)).unwrap();
        let b = model.classify_tensor(&reference.apply(&full)).unwrap();
        assert_eq!(a.top1(), b.top1(), "{name}");
        let worst = max_abs_difference(&a.probabilities, &b.probabilities);
        assert!(worst < 0.1, "{name}: probabilities differ by {worst}");
    }
}

#[test]
fn bench_times_two_artifacts_in_alternation_under_every_kernel_level() {
    let c = compiled();
    // The same artifact twice: the per-pair ratio is about 1 (no timing assertion beyond
    // being a positive number), and each level this CPU has can be forced.
    for level in graft_runtime::kernels::Level::available() {
        let out = run_with_env(
            &graft_run(),
            args![
                "bench",
                c.artifact,
                c.artifact,
                "--iterations",
                "6",
                "--json"
            ],
            &[("GRAFT_KERNELS", level.name())],
        )
        .expect_code(0);
        let doc = json(&out.stdout);
        assert_eq!(doc["kernels"], level.name());
        let layout = if level == graft_runtime::kernels::Level::Avx512 {
            "blocked"
        } else {
            "plain"
        };
        assert_eq!(doc["layout"], layout, "{doc}");
        assert_eq!(doc["ratio"]["pairs"], 6);
        for key in ["p10", "p50", "p90"] {
            assert!(doc["ratio"][key].as_f64().unwrap() > 0.0, "{doc}");
        }
        assert!(doc["a_latency"]["p50_ms"].as_f64().unwrap() > 0.0);
    }
    if graft_runtime::kernels::Level::Avx512.supported() {
        let out = run_with_env(
            &graft_run(),
            args![
                "bench",
                c.artifact,
                c.artifact,
                "--iterations",
                "2",
                "--json"
            ],
            &[("GRAFT_LAYOUT", "plain")],
        )
        .expect_code(0);
        assert_eq!(json(&out.stdout)["layout"], "plain");
    }
    let text = run(
        graft(),
        args!["bench", c.artifact, c.artifact, "--iterations", "3"],
    )
    .expect_code(0)
    .stdout;
    assert!(text.contains("B / A  median "), "{text}");
    assert!(
        text.contains("over 3 alternating pairs, 1 thread, "),
        "{text}"
    );
}

#[test]
fn inspect_shows_labels_preprocessing_provenance_and_metrics() {
    let c = compiled();
    let doc = json(
        &run(graft(), args!["inspect", c.artifact, "--json"])
            .expect_code(0)
            .stdout,
    );
    let m = &doc["manifest"];
    assert_eq!(m["labels"], serde_json::json!(["ants", "bees"]));
    assert_eq!(m["preprocessing"]["normalization"]["name"], "tf");
    assert_eq!(m["preprocessing"]["crop"], serde_json::json!([224, 224]));
    assert_eq!(m["preprocessing"]["pipeline"], "fast-v2");
    assert_eq!(
        m["backbone"]["sha256"],
        "cf70b3573f4a1349ccf3ba43e6e3417fa72a0e3dd26011aef06a707f9cfd8593"
    );
    assert_eq!(m["backbone"]["cut"], "features");
    assert_eq!(m["head"]["layers"], serde_json::json!([[1280, 2]]));
    assert_eq!(m["training"]["seed"], 42);
    let printed = number_after(&c.output.stdout, "validation accuracy ");
    assert_eq!(
        format!("{:.4}", m["metrics"]["val_accuracy"].as_f64().unwrap()),
        format!("{printed:.4}")
    );
    assert_eq!(doc["format_version"], 1);

    let text = run(graft_run().as_path(), args!["inspect", c.artifact]).expect_code(0);
    for needle in [
        "labels      2 classes: ants, bees",
        "cut at \"features\"",
        "normalize tf",
        "pipeline fast (reduced-scale decode of large JPEGs, SIMD resize)",
        "shorter side -> 256 (bilinear), centre crop 224x224, RGB, normalize",
    ] {
        assert!(
            text.stdout.contains(needle),
            "{needle:?} not in\n{}",
            text.stdout
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn folder_without_val_split_holds_out_a_stratified_fifth_and_skips_corrupt_images() {
    let c = compiled();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&hymenoptera_mini().join("train"), dir.path());
    std::fs::write(
        dir.path().join("bees/broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    let out_path = dir.path().join("m.graft");
    let out = compile_cmd(
        &lite0(),
        dir.path(),
        &out_path,
        args!["--cache-dir", c.cache(), "--no-verify"],
    )
    .expect_code(0);
    assert!(
        out.stderr.contains(
            "31 train images (ants 15, bees 16), 8 train holdout images for choices, 10 holdout \
             images held out"
        ),
        "{}",
        out.stderr
    );
    let broken = dir.path().join("bees/broken.jpg");
    assert!(
        out.stderr.contains(&format!(
            "warning   skipped {}: cannot decode image",
            broken.display()
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("1 undecodable image(s) skipped"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout
            .contains("holdout images, held out: no choice made on them)"),
        "{}",
        out.stdout
    );
    assert!(out_path.is_file());
}

#[test]
fn bad_data_folders_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&hymenoptera_mini().join("train/ants"), &data.join("ants"));
    let out_path = dir.path().join("m.graft");
    let compile = |data: &Path| compile_cmd(&lite0(), data, &out_path, args!["--no-cache"]);

    let single = compile(&data).expect_code(1);
    assert_eq!(
        single.error_line(),
        format!(
            "error: {}: found only one class (\"ants\"): a classifier needs at least two",
            data.display()
        )
    );

    std::fs::create_dir(data.join("bees")).unwrap();
    std::fs::write(data.join("bees/notes.txt"), "no images here").unwrap();
    let empty = compile(&data).expect_code(1);
    assert_eq!(
        empty.error_line(),
        format!(
            "error: {}: class \"bees\" has no images (expected files ending in .jpg, .jpeg, .png, .gif or .webp)",
            data.join("bees").display()
        )
    );

    let missing = compile(&dir.path().join("nope")).expect_code(1);
    assert_eq!(
        missing.error_line(),
        format!(
            "error: {}: No such file or directory (os error 2)",
            dir.path().join("nope").display()
        )
    );
    assert!(!out_path.exists(), "no artifact may be written on error");
}

#[test]
fn an_existing_artifact_survives_a_failed_compile() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("m.graft");
    std::fs::write(&out_path, b"previous good artifact").unwrap();
    compile_cmd(&lite0(), &dir.path().join("nope"), &out_path, args![]).expect_code(1);
    assert_eq!(std::fs::read(&out_path).unwrap(), b"previous good artifact");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

#[test]
fn bad_backbones_and_cuts_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("m.graft");
    let data = hymenoptera_mini();
    let compile = |backbone: &Path, extra: &[&str]| {
        let extra: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
        let mut all = args!["--no-cache"].to_vec();
        all.extend(extra);
        compile_cmd(backbone, &data, &out_path, &all)
    };

    let bad_cut = compile(&lite0(), &["--cut", "nope"]).expect_code(1);
    assert!(
        bad_cut.error_line().starts_with(&format!(
            "error: {}: cannot cut at \"nope\": no tensor of that name in the graph (the last ones are: ",
            lite0().display()
        )),
        "{}",
        bad_cut.stderr
    );

    let missing = dir.path().join("missing.onnx");
    let out = compile(&missing, &[]).expect_code(1);
    assert_eq!(
        out.error_line(),
        format!(
            "error: {}: No such file or directory (os error 2)",
            missing.display()
        )
    );

    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &std::fs::read(lite0()).unwrap()[..100_000]).unwrap();
    let out = compile(&truncated, &[]).expect_code(1);
    assert!(
        out.error_line().starts_with(&format!(
            "error: {}: not a valid ONNX model: ",
            truncated.display()
        )),
        "{}",
        out.stderr
    );

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not protobuf at all").unwrap();
    let out = compile(&garbage, &[]).expect_code(1);
    assert!(
        out.error_line()
            .starts_with(&format!("error: {}: ", garbage.display())),
        "{}",
        out.stderr
    );

    let bad_head = compile(&lite0(), &["--head", "rbf"]).expect_code(1);
    assert!(
        bad_head
            .stderr
            .contains("unknown head \"rbf\": expected linear, logreg, svm or mlp:H"),
        "{}",
        bad_head.stderr
    );
    assert!(!out_path.exists());
}

#[test]
fn unsupported_operators_and_dynamic_inputs_are_named() {
    use prost::Message;
    use tract_onnx::pb::tensor_shape_proto::{dimension::Value, Dimension};
    use tract_onnx::prelude::Framework;

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("m.graft");
    let proto = tract_onnx::onnx()
        .proto_model_for_path(lite0())
        .expect("fixture parses");

    let mut unsupported = proto.clone();
    let graph = unsupported.graph.as_mut().unwrap();
    let node_name = graph.node[3].name.clone();
    graph.node[3].op_type = "FancyAttention".into();
    let path = dir.path().join("unsupported.onnx");
    std::fs::write(&path, unsupported.encode_to_vec()).unwrap();
    let out =
        compile_cmd(&path, &hymenoptera_mini(), &out_path, args!["--no-cache"]).expect_code(1);
    assert_eq!(
        out.error_line(),
        format!(
            "error: {}: unsupported ONNX operator \"FancyAttention\" at node {node_name:?}",
            path.display()
        )
    );

    let mut dynamic = proto.clone();
    let input = &mut dynamic.graph.as_mut().unwrap().input[0];
    let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("tensor input")
    };
    let dims = &mut t.shape.as_mut().unwrap().dim;
    for d in [0, 2, 3] {
        dims[d] = Dimension {
            value: Some(Value::DimParam(format!("d{d}"))),
            denotation: String::new(),
        };
    }
    let path = dir.path().join("dynamic.onnx");
    std::fs::write(&path, dynamic.encode_to_vec()).unwrap();
    let out =
        compile_cmd(&path, &hymenoptera_mini(), &out_path, args!["--no-cache"]).expect_code(1);
    assert_eq!(
        out.error_line(),
        format!(
            "error: {}: input \"input\" has dynamic spatial dimensions (?x3x?x?); pass --input-size HxW",
            path.display()
        )
    );
    assert!(!out_path.exists());
}

#[test]
fn damaged_artifacts_are_rejected_with_the_reason() {
    let c = compiled();
    let good = std::fs::read(&c.artifact).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let image = hymenoptera_mini().join("val/ants/11381045_b352a47d8c.jpg");
    let check = |path: &Path, expected: String| {
        for program in [graft_run(), graft().to_path_buf()] {
            let out = run(&program, args!["predict", path, image]).expect_code(1);
            assert_eq!(out.error_line(), expected, "{}", program.display());
        }
    };

    let truncated = write("truncated.graft", &good[..good.len() / 2]);
    check(
        &truncated,
        format!(
            "error: {}: artifact is truncated or corrupt: its header declares {} bytes but the file has {}",
            truncated.display(),
            good.len(),
            good.len() / 2
        ),
    );

    let mut flipped = good.clone();
    flipped[good.len() / 3] ^= 0x01;
    let flipped = write("flipped.graft", &flipped);
    let out = run(graft_run().as_path(), args![flipped, image]).expect_code(1);
    assert!(
        out.error_line().starts_with(&format!(
            "error: {}: artifact is corrupt: checksum mismatch (stored ",
            flipped.display()
        )),
        "{}",
        out.stderr
    );

    let onnx = write("model.onnx", &std::fs::read(lite0()).unwrap()[..4096]);
    check(
        &onnx,
        format!(
            "error: {}: not a graft artifact (missing the GRAFTART magic bytes)",
            onnx.display()
        ),
    );

    let empty = write("empty.graft", b"");
    check(
        &empty,
        format!(
            "error: {}: not a graft artifact (missing the GRAFTART magic bytes)",
            empty.display()
        ),
    );

    let mut future = good.clone();
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    let future = write("future.graft", &future);
    check(
        &future,
        format!(
            "error: {}: artifact format version 2 is not supported (this runtime reads version 1); it was written by a newer graft: upgrade the runtime",
            future.display()
        ),
    );
}

#[test]
fn undecodable_images_at_predict_time_are_reported_and_exit_1() {
    let c = compiled();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let good = hymenoptera_mini().join("val/bees/1181173278_23c36fac71.jpg");
    let out = run(graft_run().as_path(), args![c.artifact, good, bad]).expect_code(1);
    assert!(
        out.stdout.starts_with(&format!("{}: bees", good.display())),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains(&format!(
            "warning: skipped {}: cannot decode image",
            bad.display()
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("1 of 2 images could not be classified"),
        "{}",
        out.stderr
    );
}

/// Acceptance on the real dataset (skipped without ../shared): Lite0 + hymenoptera with default
/// options reaches at least 0.93 validation accuracy.
#[test]
fn hymenoptera_full_reaches_0_93() {
    let Some(shared) = shared() else {
        eprintln!("skipped: ../shared not found");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("h.graft");
    let out = compile_cmd(
        &shared.join("backbones/efficientnet_lite0.onnx"),
        &shared.join("datasets/hymenoptera"),
        &out_path,
        args!["--cache-dir", dir.path().join("cache")],
    )
    .expect_code(0);
    let accuracy = number_after(&out.stdout, "validation accuracy ");
    assert!(
        accuracy >= 0.93,
        "validation accuracy {accuracy}:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("(153 val images, held out"),
        "{}",
        out.stdout
    );
}

/// Ctrl-C during feature extraction: exit 130, no artifact and no temporary file anywhere, and
/// the features computed before the interrupt are in the cache for the next run.
#[test]
fn ctrl_c_leaves_no_artifact_and_keeps_a_usable_cache() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("m.graft");
    let cache = dir.path().join("cache");
    let mut child = TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &out_path)
        .args(["--threads", "1", "--cache-dir"])
        .arg(&cache)
        // graft's portable kernels (several times slower than the CPU's best) keep extraction
        // running for seconds, so the interrupt below lands in it on any machine.
        .env("GRAFT_KERNELS", "portable")
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "compile ended early:\n{seen}"
        );
        seen.push_str(&line);
        if line.starts_with("normalize") {
            break;
        }
    }
    // Extraction of 72 images on one thread with the portable kernels takes several seconds;
    // interrupt it part way.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    stderr.read_to_string(&mut seen).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(
        seen.contains("error: interrupted: no artifact written"),
        "{seen}"
    );
    assert!(!out_path.exists());
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            assert!(
                !path.to_string_lossy().ends_with(".tmp"),
                "left {}",
                path.display()
            );
            if path.is_dir() {
                stack.push(path);
            }
        }
    }

    let again = compile_cmd(
        &lite0(),
        &hymenoptera_mini(),
        &out_path,
        args!["--cache-dir", cache, "--no-verify"],
    )
    .expect_code(0);
    let reused = number_after(&again.stderr, "72 images: ") as usize;
    assert!(
        reused > 0 && reused < 72,
        "expected part of the features from the interrupted run:\n{}",
        again.stderr
    );
    assert!(out_path.is_file());
}

/// Artifacts and report pages get the permissions any new file gets (0666 less the umask), so a
/// service user can read a deployed model; tempfile's private 0600 used to stay on them.
#[cfg(unix)]
#[test]
fn artifacts_and_reports_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = compiled().cache();
    for (umask, expected) in [("022", 0o644), ("077", 0o600)] {
        let out = dir.path().join(format!("m{umask}.graft"));
        let report = dir.path().join(format!("report{umask}"));
        let compile = TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &out)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--report")
            .arg(&report)
            .arg("--quiet");
        let status = TestCommand::new("bash")
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$@\""))
            .arg("bash")
            .arg(graft())
            .args(compile.argv())
            .command()
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        for file in [out, report.join("index.html"), report.join("metrics.json")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode,
                expected,
                "{} under umask {umask}: {mode:o}",
                file.display()
            );
        }
    }
}

/// `DIR/train/<class>` without a validation split is a training split (it used to be read as one
/// class named "train"): validation is held out of it, as for a flat folder.
#[test]
fn a_train_folder_alone_holds_out_validation_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&hymenoptera_mini().join("train"), &data.join("train"));
    let out = compile_cmd(
        &lite0(),
        &data,
        &dir.path().join("m.graft"),
        args!["--cache-dir", compiled().cache()],
    )
    .expect_code(0);
    assert!(
        out.stderr
            .contains("2 classes, 30 train images (ants 15, bees 15)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout
            .contains("(10 holdout images, held out: no choice made on them)"),
        "{}",
        out.stdout
    );
}
