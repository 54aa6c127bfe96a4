//! The bad-input table: each case builds a hostile or broken input in a temporary folder, runs the
//! real `graft` or `graft-run` binary on it, and checks the exit code, the exact message, and that
//! no artifact (and no temporary file) was left behind.

mod common;

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use prost::Message;
use sha2::{Digest, Sha256};

fn graft() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_graft"))
}

fn graft_run() -> PathBuf {
    graft().with_file_name(format!("graft-run{}", std::env::consts::EXE_SUFFIX))
}

/// What a case expects on stderr.
enum Expect {
    /// The `error: ...` line, exactly.
    Error(String),
    /// The `error: ...` line starts with this.
    ErrorPrefix(String),
    /// Every one of these strings appears on stderr.
    Warnings(Vec<String>),
}

/// A command to run and what it must do.
struct Check {
    program: PathBuf,
    args: Vec<OsString>,
    code: i32,
    expect: Expect,
}

struct Case {
    name: &'static str,
    build: fn(&Path) -> Check,
}

fn os(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

fn copy_images(from: &Path, to: &Path, n: usize) {
    std::fs::create_dir_all(to).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files.into_iter().take(n) {
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

fn first_image(dir: &Path) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.swap_remove(0)
}

/// A split dataset with `n` real images per class and split.
fn small_dataset(root: &Path, n: usize) -> PathBuf {
    let data = root.join("data");
    for split in ["train", "val"] {
        for class in ["ants", "bees"] {
            copy_images(
                &hymenoptera_mini().join(split).join(class),
                &data.join(split).join(class),
                n,
            );
        }
    }
    data
}

/// `graft compile` on `data` into `dir/out.graft` with fast, deterministic options.
fn compile(dir: &Path, backbone: &Path, data: &Path, extra: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    TestCommand::compile(&graft(), backbone, data, &dir.join("out.graft"))
        .args(["--normalize", "tf", "--no-verify", "--cache-dir"])
        .arg(shared_cache())
        .args(os(extra))
        .argv()
        .to_vec()
}

/// `graft compile --keep-imagenet-head` with `labels`, into `dir/out.graft`.
fn own_head(dir: &Path, labels: &Path) -> Vec<OsString> {
    TestCommand::new(graft())
        .args([
            "compile",
            "--keep-imagenet-head",
            "--normalize",
            "tf",
            "--backbone",
        ])
        .arg(lite0())
        .arg("--labels")
        .arg(labels)
        .arg("--out")
        .arg(dir.join("out.graft"))
        .argv()
        .to_vec()
}

fn shared_cache() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .to_path_buf()
}

fn fail(program: PathBuf, args: Vec<OsString>, expect: Expect) -> Check {
    Check {
        program,
        args,
        code: 1,
        expect,
    }
}

/// The fixture artifact, compiled once.
fn good_artifact() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            &graft(),
            &compile(dir.path(), &lite0(), &small_dataset(dir.path(), 6), &[]),
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        std::fs::read(dir.path().join("out.graft")).unwrap()
    })
}

/// The fixture artifact written to `dir/m.graft`.
fn good_artifact_in(dir: &Path) -> PathBuf {
    let path = dir.join("m.graft");
    std::fs::write(&path, good_artifact()).unwrap();
    path
}

/// The artifact's manifest and graph bytes.
fn split_artifact(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let m = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let g = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    (
        bytes[32..32 + m].to_vec(),
        bytes[32 + m..32 + m + g].to_vec(),
    )
}

/// A well-formed container (valid checksum) around arbitrary manifest and graph bytes.
fn reseal(manifest: &[u8], graph: &[u8]) -> Vec<u8> {
    let mut out = good_artifact()[..16].to_vec();
    out.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    out.extend_from_slice(&(graph.len() as u64).to_le_bytes());
    out.extend_from_slice(manifest);
    out.extend_from_slice(graph);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// `graft-run predict` on an artifact written to `dir/name` from `bytes`.
fn predict_with(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    expect: impl FnOnce(&Path) -> Expect,
) -> Check {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let image = hymenoptera_mini().join("val/bees/1181173278_23c36fac71.jpg");
    fail(graft_run(), os(&[&path, &image]), expect(&path))
}

fn lite0_proto() -> tract_onnx::pb::ModelProto {
    use tract_onnx::prelude::Framework;
    tract_onnx::onnx().proto_model_for_path(lite0()).unwrap()
}

fn write_onnx(dir: &Path, name: &str, proto: &tract_onnx::pb::ModelProto) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

fn input_dims(
    proto: &mut tract_onnx::pb::ModelProto,
) -> &mut Vec<tract_onnx::pb::tensor_shape_proto::Dimension> {
    let input = &mut proto.graph.as_mut().unwrap().input[0];
    let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("tensor input")
    };
    &mut t.shape.as_mut().unwrap().dim
}

fn dim(
    value: tract_onnx::pb::tensor_shape_proto::dimension::Value,
) -> tract_onnx::pb::tensor_shape_proto::Dimension {
    tract_onnx::pb::tensor_shape_proto::Dimension {
        value: Some(value),
        denotation: String::new(),
    }
}

/// A FIFO named `name` in `dir`: opening it for reading blocks until a writer comes.
fn mkfifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
    path
}

/// Replaces the value of `option` in a command.
fn set_option(args: &mut [OsString], option: &str, value: &Path) {
    let at = args.iter().position(|a| a == option).unwrap() + 1;
    args[at] = value.as_os_str().to_os_string();
}

/// Replaces the `--out` value of a compile command.
fn set_out(args: &mut [OsString], out: &Path) {
    set_option(args, "--out", out);
}

/// A compile with `flag=value`, refused at parse time with `reason`.
fn option_error(dir: &Path, flag: &str, value: &str, placeholder: &str, reason: &str) -> Check {
    let option = format!("{flag}={value}");
    fail(
        graft(),
        compile(dir, &lite0(), &hymenoptera_mini(), &[&option]),
        Expect::Error(format!(
            "error: invalid value '{value}' for '{placeholder}': \"{value}\" {reason}"
        )),
    )
}

/// Lite0 with its first raw weight tensor moved out to external data at `location` (relative
/// to `dir`, where the model is written; the data file itself is left to the case). Returns
/// the model, the tensor's name and the bytes moved out.
fn external_weights(dir: &Path, location: &str) -> (PathBuf, String, Vec<u8>) {
    let mut proto = lite0_proto();
    let graph = proto.graph.as_mut().unwrap();
    let tensor = graph
        .initializer
        .iter_mut()
        .find(|t| !t.raw_data.is_empty())
        .unwrap();
    let data = std::mem::take(&mut tensor.raw_data);
    tensor.data_location = Some(1);
    for (key, value) in [
        ("location", location.to_string()),
        ("length", data.len().to_string()),
    ] {
        tensor
            .external_data
            .push(tract_onnx::pb::StringStringEntryProto {
                key: key.into(),
                value,
            });
    }
    let name = tensor.name.clone();
    (write_onnx(dir, "external.onnx", &proto), name, data)
}

/// `artifact` with every value of the first graph tensor whose name contains `fragment` set to
/// NaN, resealed with a valid checksum.
fn with_nan_tensor(artifact: &[u8], fragment: &str) -> Vec<u8> {
    let (manifest, graph) = split_artifact(artifact);
    let mut archive = tar::Archive::new(&graph[..]);
    let mut builder = tar::Builder::new(Vec::new());
    let mut done = false;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        if !done && name.contains(fragment) && name.ends_with(".dat") {
            for value in content[128..].chunks_exact_mut(4) {
                value.copy_from_slice(&f32::NAN.to_le_bytes());
            }
            done = true;
        }
        let mut header = entry.header().clone();
        builder
            .append_data(&mut header, &name, &content[..])
            .unwrap();
    }
    assert!(done, "no tensor named *{fragment}*");
    reseal(&manifest, &builder.into_inner().unwrap())
}

const CASES: &[Case] = &[
    // ---- data folders ------------------------------------------------------------------------
    Case {
        name: "data folder with a single class",
        build: |dir| {
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("ants"),
                3,
            );
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[]),
                Expect::Error(format!(
                    "error: {}: found only one class (\"ants\"): a classifier needs at least two",
                    data.display()
                )),
            )
        },
    },
    Case {
        name: "class folder without images",
        build: |dir| {
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("ants"),
                3,
            );
            std::fs::create_dir_all(data.join("bees")).unwrap();
            fail(graft(), compile(dir, &lite0(), &data, &[]), Expect::Error(format!("error: {}: class \"bees\" has no images (expected files ending in .jpg, .jpeg, .png, .gif or .webp)", data.join("bees").display())))
        },
    },
    Case {
        name: "class folder holding only non-image files",
        build: |dir| {
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("ants"),
                3,
            );
            std::fs::create_dir_all(data.join("bees")).unwrap();
            std::fs::write(data.join("bees/README.txt"), "bees go here").unwrap();
            fail(graft(), compile(dir, &lite0(), &data, &[]), Expect::Error(format!("error: {}: class \"bees\" has no images (expected files ending in .jpg, .jpeg, .png, .gif or .webp)", data.join("bees").display())))
        },
    },
    Case {
        name: "data folder without class folders",
        build: |dir| {
            let data = dir.join("data");
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("photo.jpg"), b"x").unwrap();
            fail(graft(), compile(dir, &lite0(), &data, &[]), Expect::Error(format!("error: {}: no class folders found: expected DIR/<class>/<image> or DIR/{{train,val}}/<class>/<image>", data.display())))
        },
    },
    Case {
        name: "data path is a file",
        build: |dir| {
            let data = dir.join("data.zip");
            std::fs::write(&data, b"PK").unwrap();
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[]),
                Expect::Error(format!(
                    "error: {}: Not a directory (os error 20)",
                    data.display()
                )),
            )
        },
    },
    Case {
        name: "data path does not exist",
        build: |dir| {
            let data = dir.join("nope");
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[]),
                Expect::Error(format!(
                    "error: {}: No such file or directory (os error 2)",
                    data.display()
                )),
            )
        },
    },
    Case {
        name: "class folder name that is not UTF-8",
        build: |dir| {
            use std::os::unix::ffi::OsStrExt;
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("ants"),
                3,
            );
            copy_images(
                &hymenoptera_mini().join("train/bees"),
                &data.join(OsStr::from_bytes(b"b\xffes")),
                3,
            );
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[]),
                Expect::Error(format!(
                    "error: {}: class folder name \"b\\xFFes\" is not valid UTF-8",
                    data.display()
                )),
            )
        },
    },
    Case {
        name: "validation class with no training folder",
        build: |dir| {
            let data = small_dataset(dir, 2);
            copy_images(
                &hymenoptera_mini().join("val/bees"),
                &data.join("val/wasps"),
                1,
            );
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[]),
                Expect::Error(format!(
                    "error: {}: validation class \"wasps\" has no folder in {}",
                    data.join("val/wasps").display(),
                    data.join("train").display()
                )),
            )
        },
    },
    Case {
        name: "class whose every image is undecodable",
        build: |dir| {
            let data = small_dataset(dir, 2);
            std::fs::remove_dir_all(data.join("train/bees")).unwrap();
            std::fs::create_dir_all(data.join("train/bees")).unwrap();
            for i in 0..3 {
                std::fs::write(
                    data.join(format!("train/bees/broken{i}.jpg")),
                    b"\xff\xd8\xff garbage",
                )
                .unwrap();
            }
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[]),
                Expect::Error("error: class \"bees\" has no decodable training images".into()),
            )
        },
    },
    Case {
        name: "holdout split with a one-image class",
        build: |dir| {
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("ants"),
                3,
            );
            copy_images(
                &hymenoptera_mini().join("train/bees"),
                &data.join("bees"),
                1,
            );
            fail(graft(), compile(dir, &lite0(), &data, &[]), Expect::Error("error: class \"bees\" has 1 image(s): at least 2 are needed to hold one out for validation (or provide DIR/train and DIR/val)".into()))
        },
    },
    Case {
        name: "validation fraction out of range",
        build: |dir| {
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("ants"),
                3,
            );
            copy_images(
                &hymenoptera_mini().join("train/bees"),
                &data.join("bees"),
                3,
            );
            fail(
                graft(),
                compile(dir, &lite0(), &data, &[&"--val-fraction", &"1.5"]),
                Expect::Error(
                    "error: --val-fraction must be between 0 and 1 (exclusive), got 1.5".into(),
                ),
            )
        },
    },
    Case {
        name: "odd encodings compile, broken files are skipped by path",
        build: |dir| {
            use std::os::unix::ffi::OsStrExt;
            let data = small_dataset(dir, 4);
            let ants = data.join("train/ants");
            for f in std::fs::read_dir(fixtures().join("odd-images")).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, ants.join(f.file_name().unwrap())).unwrap();
            }
            let real = first_image(&hymenoptera_mini().join("train/ants"));
            std::fs::copy(&real, ants.join(OsStr::from_bytes(b"caf\xe9.jpg"))).unwrap();
            std::fs::write(ants.join("zero.jpg"), b"").unwrap();
            std::fs::write(ants.join("notes.jpg"), b"these are not pixels").unwrap();
            let good = std::fs::read(&real).unwrap();
            // A JPEG cut short still decodes (the missing rows come out gray), as in most decoders.
            std::fs::write(ants.join("truncated.jpg"), &good[..good.len() / 3]).unwrap();
            std::os::unix::fs::symlink(dir.join("gone.jpg"), ants.join("dangling.jpg")).unwrap();
            std::os::unix::fs::symlink(ants.join("loop-b.jpg"), ants.join("loop-a.jpg")).unwrap();
            std::os::unix::fs::symlink(ants.join("loop-a.jpg"), ants.join("loop-b.jpg")).unwrap();
            std::os::unix::fs::symlink(&ants, ants.join("self")).unwrap();
            let skipped = |name: &str, why: &str| {
                format!("warning   skipped {}: {why}", ants.join(name).display())
            };
            Check {
                program: graft(),
                args: compile(dir, &lite0(), &data, &[]),
                code: 0,
                expect: Expect::Warnings(vec![
                    skipped(
                        "bomb-20000x20000.png",
                        "cannot decode image: Image size exceeds limit",
                    ),
                    skipped("zero.jpg", "cannot decode image: unrecognised image format"),
                    skipped(
                        "notes.jpg",
                        "cannot decode image: unrecognised image format",
                    ),
                    skipped("dangling.jpg", "No such file or directory (os error 2)"),
                    skipped(
                        "loop-a.jpg",
                        "Too many levels of symbolic links (os error 40)",
                    ),
                    "warning   6 undecodable image(s) skipped".into(),
                    "features  27 images".into(),
                ]),
            }
        },
    },
    // ---- backbones ---------------------------------------------------------------------------
    Case {
        name: "backbone file missing",
        build: |dir| {
            let onnx = dir.join("missing.onnx");
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::Error(format!(
                    "error: {}: No such file or directory (os error 2)",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "backbone truncated",
        build: |dir| {
            let onnx = dir.join("truncated.onnx");
            std::fs::write(&onnx, &std::fs::read(lite0()).unwrap()[..50_000]).unwrap();
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::ErrorPrefix(format!(
                    "error: {}: not a valid ONNX model: ",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "backbone is not protobuf",
        build: |dir| {
            let onnx = dir.join("notes.onnx");
            std::fs::write(&onnx, "name,label\na.jpg,ant\n").unwrap();
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::ErrorPrefix(format!(
                    "error: {}: not a valid ONNX model: ",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "backbone is an empty file",
        build: |dir| {
            let onnx = dir.join("empty.onnx");
            std::fs::write(&onnx, b"").unwrap();
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::Error(format!(
                    "error: {}: the ONNX model has no graph",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "backbone with an operator tract lacks",
        build: |dir| {
            let mut proto = lite0_proto();
            let node = &mut proto.graph.as_mut().unwrap().node[5];
            node.op_type = "FancyAttention".into();
            let name = node.name.clone();
            let onnx = write_onnx(dir, "unsupported.onnx", &proto);
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::Error(format!(
                    "error: {}: unsupported ONNX operator \"FancyAttention\" at node {name:?}",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "backbone with a custom-domain operator",
        build: |dir| {
            let mut proto = lite0_proto();
            let node = &mut proto.graph.as_mut().unwrap().node[7];
            node.domain = "com.example".into();
            let (op, name) = (node.op_type.clone(), node.name.clone());
            let onnx = write_onnx(dir, "custom.onnx", &proto);
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::Error(format!(
                    "error: {}: unsupported ONNX operator \"com.example.{op}\" at node {name:?}",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "backbone with dynamic spatial input",
        build: |dir| {
            use tract_onnx::pb::tensor_shape_proto::dimension::Value;
            let mut proto = lite0_proto();
            let dims = input_dims(&mut proto);
            dims[2] = dim(Value::DimParam("height".into()));
            dims[3] = dim(Value::DimParam("width".into()));
            let onnx = write_onnx(dir, "dynamic.onnx", &proto);
            fail(graft(), compile(dir, &onnx, &hymenoptera_mini(), &[]), Expect::Error(format!("error: {}: input \"input\" has dynamic spatial dimensions (1x3x?x?); pass --input-size HxW", onnx.display())))
        },
    },
    Case {
        name: "backbone with a one-channel input",
        build: |dir| {
            use tract_onnx::pb::tensor_shape_proto::dimension::Value;
            let mut proto = lite0_proto();
            input_dims(&mut proto)[1] = dim(Value::DimValue(1));
            let onnx = write_onnx(dir, "gray.onnx", &proto);
            fail(graft(), compile(dir, &onnx, &hymenoptera_mini(), &[]), Expect::Error(format!("error: {}: input \"input\" has shape 1x1x224x224, expected NCHW images with 3 channels", onnx.display())))
        },
    },
    Case {
        name: "backbone with two inputs",
        build: |dir| {
            let mut proto = lite0_proto();
            let graph = proto.graph.as_mut().unwrap();
            let mut extra = graph.input[0].clone();
            extra.name = "mask".into();
            graph.input.push(extra);
            let onnx = write_onnx(dir, "two-inputs.onnx", &proto);
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::Error(format!(
                    "error: {}: expected exactly one image input, found 2: [\"input\", \"mask\"]",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "cut at a tensor that does not exist",
        build: |dir| {
            fail(graft(), compile(dir, &lite0(), &hymenoptera_mini(), &[&"--cut", &"block99"]), Expect::ErrorPrefix(format!("error: {}: cannot cut at \"block99\": no tensor of that name in the graph (the last ones are: ", lite0().display())))
        },
    },
    Case {
        name: "label file with the wrong number of labels",
        build: |dir| {
            let labels = dir.join("labels.txt");
            std::fs::write(&labels, "cat\ndog\nfish\n").unwrap();
            let args = own_head(dir, &labels);
            fail(
                graft(),
                args,
                Expect::Error(format!(
                    "error: {}: has 3 labels, the model has 1000 outputs",
                    labels.display()
                )),
            )
        },
    },
    Case {
        name: "unknown head",
        build: |dir| {
            fail(graft(), compile(dir, &lite0(), &hymenoptera_mini(), &[&"--head", &"rbf"]), Expect::ErrorPrefix("error: invalid value 'rbf' for '--head <HEAD>': unknown head \"rbf\": expected linear, logreg, svm or mlp:H".into()))
        },
    },
    Case {
        name: "unknown precision",
        build: |dir| {
            fail(graft(), compile(dir, &lite0(), &hymenoptera_mini(), &[&"--precision", &"int4"]), Expect::ErrorPrefix("error: invalid value 'int4' for '--precision <PRECISION>': unknown precision \"int4\": expected f32 or int8".into()))
        },
    },
    Case {
        name: "unknown preprocessing pipeline",
        build: |dir| {
            fail(graft(), compile(dir, &lite0(), &hymenoptera_mini(), &[&"--pipeline", &"turbo"]), Expect::Error("error: invalid value 'turbo' for '--pipeline <PIPELINE>': unknown preprocessing pipeline \"turbo\": expected fast, fast-v1 or reference".into()))
        },
    },
    Case {
        name: "unknown weight storage",
        build: |dir| {
            fail(graft(), compile(dir, &lite0(), &hymenoptera_mini(), &[&"--weights", &"int4"]), Expect::ErrorPrefix("error: invalid value 'int4' for '--weights <WEIGHTS>': unknown weight storage \"int4\": expected f32, f16 or int8".into()))
        },
    },
    Case {
        name: "unknown normalization",
        build: |dir| {
            let args = TestCommand::compile(
                &graft(),
                &lite0(),
                &hymenoptera_mini(),
                &dir.join("out.graft"),
            )
            .args(["--normalize", "fancy"])
            .argv()
            .to_vec();
            fail(graft(), args, Expect::ErrorPrefix("error: invalid value 'fancy' for '--normalize <NORMALIZE>': unknown normalization \"fancy\"".into()))
        },
    },
    // ---- output path -------------------------------------------------------------------------
    Case {
        name: "output folder does not exist",
        build: |dir| {
            let out = dir.join("no/such/folder/m.graft");
            let args = TestCommand::compile(&graft(), &lite0(), &hymenoptera_mini(), &out)
                .argv()
                .to_vec();
            fail(
                graft(),
                args,
                Expect::Error(format!(
                    "error: --out {}: folder {} does not exist",
                    out.display(),
                    dir.join("no/such/folder").display()
                )),
            )
        },
    },
    Case {
        name: "output path is a folder",
        build: |dir| {
            let out = dir.join("out.graft");
            std::fs::create_dir(&out).unwrap();
            let args = TestCommand::compile(&graft(), &lite0(), &hymenoptera_mini(), &out)
                .argv()
                .to_vec();
            fail(
                graft(),
                args,
                Expect::Error(format!(
                    "error: --out {}: is a folder, expected a file name",
                    out.display()
                )),
            )
        },
    },
    // ---- artifacts ---------------------------------------------------------------------------
    Case {
        name: "artifact truncated",
        build: |dir| {
            let good = good_artifact();
            predict_with(dir, "t.graft", &good[..good.len() - 1000], |p| {
                Expect::Error(format!("error: {}: artifact is truncated or corrupt: its header declares {} bytes but the file has {}", p.display(), good.len(), good.len() - 1000))
            })
        },
    },
    Case {
        name: "artifact truncated inside the header",
        build: |dir| {
            predict_with(dir, "t.graft", &good_artifact()[..20], |p| {
                Expect::Error(format!("error: {}: artifact is truncated or corrupt: its header declares 64 bytes but the file has 20", p.display()))
            })
        },
    },
    Case {
        name: "artifact with a flipped byte",
        build: |dir| {
            let mut bytes = good_artifact().to_vec();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x10;
            predict_with(dir, "f.graft", &bytes, |p| {
                Expect::ErrorPrefix(format!(
                    "error: {}: artifact is corrupt: checksum mismatch (stored ",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact with a flipped checksum byte",
        build: |dir| {
            let mut bytes = good_artifact().to_vec();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            predict_with(dir, "c.graft", &bytes, |p| {
                Expect::ErrorPrefix(format!(
                    "error: {}: artifact is corrupt: checksum mismatch (stored ",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact that is an ONNX file",
        build: |dir| {
            let onnx = std::fs::read(lite0()).unwrap();
            predict_with(dir, "model.graft", &onnx, |p| {
                Expect::Error(format!(
                    "error: {}: not a graft artifact (missing the GRAFTART magic bytes)",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact of zero bytes",
        build: |dir| {
            predict_with(dir, "empty.graft", b"", |p| {
                Expect::Error(format!(
                    "error: {}: not a graft artifact (missing the GRAFTART magic bytes)",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact from a future format version",
        build: |dir| {
            let mut bytes = good_artifact().to_vec();
            bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
            predict_with(dir, "future.graft", &bytes, |p| {
                Expect::Error(format!("error: {}: artifact format version 9 is not supported (this runtime reads version 1); it was written by a newer graft: upgrade the runtime", p.display()))
            })
        },
    },
    Case {
        name: "artifact from an older format version",
        build: |dir| {
            let mut bytes = good_artifact().to_vec();
            bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
            predict_with(dir, "old.graft", &bytes, |p| {
                Expect::Error(format!("error: {}: artifact format version 0 is not supported (this runtime reads version 1); it was written by an older graft: recompile the model", p.display()))
            })
        },
    },
    Case {
        name: "artifact declaring a huge manifest",
        build: |dir| {
            let mut bytes = good_artifact().to_vec();
            bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            let len = bytes.len();
            predict_with(dir, "huge.graft", &bytes, |p| {
                Expect::Error(format!("error: {}: artifact is truncated or corrupt: its header declares 18446744073709551615 bytes but the file has {len}", p.display()))
            })
        },
    },
    Case {
        name: "artifact whose graph declares a huge tensor (valid checksum)",
        build: |dir| {
            let (manifest, graph) = split_artifact(good_artifact());
            let mut archive = tar::Archive::new(&graph[..]);
            let mut builder = tar::Builder::new(Vec::new());
            let mut victim = String::new();
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                let name = entry.path().unwrap().to_string_lossy().into_owned();
                let mut content = Vec::new();
                entry.read_to_end(&mut content).unwrap();
                if victim.is_empty() && name.ends_with(".dat") {
                    victim = name.clone();
                    content[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                    content[8..12].copy_from_slice(&2u32.to_le_bytes());
                    content[12..16].copy_from_slice(&65_536u32.to_le_bytes());
                    content[16..20].copy_from_slice(&16_384u32.to_le_bytes());
                }
                let mut header = entry.header().clone();
                header.set_size(content.len() as u64);
                header.set_cksum();
                builder
                    .append_data(&mut header, &name, &content[..])
                    .unwrap();
            }
            let graph = builder.into_inner().unwrap();
            let bytes = reseal(&manifest, &graph);
            predict_with(dir, "bomb.graft", &bytes, move |p| {
                Expect::ErrorPrefix(format!("error: {}: cannot load the model graph: tensor {victim:?} declares 4294967296 bytes of data but the archive holds ", p.display()))
            })
        },
    },
    Case {
        name: "artifact whose graph is not an archive (valid checksum)",
        build: |dir| {
            let (manifest, _) = split_artifact(good_artifact());
            let bytes = reseal(&manifest, &[7u8; 4096]);
            predict_with(dir, "g.graft", &bytes, |p| {
                Expect::ErrorPrefix(format!(
                    "error: {}: cannot load the model graph: graph archive",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact whose manifest is not JSON (valid checksum)",
        build: |dir| {
            let (_, graph) = split_artifact(good_artifact());
            let bytes = reseal(b"{\"labels\": [", &graph);
            predict_with(dir, "m.graft", &bytes, |p| {
                Expect::ErrorPrefix(format!(
                    "error: {}: invalid artifact manifest: EOF while parsing",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact whose labels disagree with its graph (valid checksum)",
        build: |dir| {
            let (manifest, graph) = split_artifact(good_artifact());
            let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            m["labels"] = serde_json::json!(["ants", "bees", "wasps"]);
            let bytes = reseal(&serde_json::to_vec(&m).unwrap(), &graph);
            predict_with(dir, "l.graft", &bytes, |p| {
                Expect::ErrorPrefix(format!(
                    "error: {}: cannot load the model graph: graph output",
                    p.display()
                ))
            })
        },
    },
    Case {
        name: "artifact path is a folder",
        build: |dir| {
            let image = hymenoptera_mini().join("val/bees/1181173278_23c36fac71.jpg");
            fail(
                graft_run(),
                os(&[&dir, &image]),
                Expect::Error(format!(
                    "error: {}: is a folder, not an artifact file",
                    dir.display()
                )),
            )
        },
    },
    // ---- images at prediction and evaluation time ----------------------------------------
    Case {
        name: "decompression bomb at predict time",
        build: |dir| {
            let artifact = good_artifact_in(dir);
            let bomb = fixtures().join("odd-images/bomb-20000x20000.png");
            fail(
                graft_run(),
                os(&[&artifact, &bomb]),
                Expect::Warnings(vec![
                    format!(
                        "warning: skipped {}: cannot decode image: Image size exceeds limit",
                        bomb.display()
                    ),
                    "1 of 1 image could not be classified".into(),
                ]),
            )
        },
    },
    Case {
        name: "missing image at predict time",
        build: |dir| {
            let artifact = good_artifact_in(dir);
            let missing = dir.join("missing.jpg");
            fail(
                graft(),
                os(&[&"predict", &artifact, &missing]),
                Expect::Warnings(vec![format!(
                    "warning: skipped {}: No such file or directory (os error 2)",
                    missing.display()
                )]),
            )
        },
    },
    Case {
        name: "folder without images at predict time",
        build: |dir| {
            let artifact = good_artifact_in(dir);
            let empty = dir.join("photos");
            std::fs::create_dir(&empty).unwrap();
            fail(
                graft_run(),
                os(&[&artifact, &empty]),
                Expect::Error(format!(
                    "error: {}: folder contains no images",
                    empty.display()
                )),
            )
        },
    },
    Case {
        name: "evaluation folder with a class the model does not know",
        build: |dir| {
            let artifact = good_artifact_in(dir);
            let data = dir.join("eval");
            copy_images(&hymenoptera_mini().join("val/ants"), &data.join("ants"), 1);
            copy_images(&hymenoptera_mini().join("val/bees"), &data.join("wasps"), 1);
            fail(graft(), os(&[&"eval", &artifact, &data]), Expect::Error(format!("error: {}: class folder \"wasps\" is not a label of the model (labels: ants, bees)", data.join("wasps").display())))
        },
    },
    // ---- round two (issue 18): files that are not files, options out of range, --out --------
    Case {
        name: "image that is a FIFO at predict time (would block in open)",
        build: |dir| {
            let fifo = mkfifo(dir, "x.jpg");
            let artifact = good_artifact_in(dir);
            fail(
                graft_run(),
                os(&[&artifact, &fifo]),
                Expect::Warnings(vec![format!(
                    "warning: skipped {}: not a regular file (a FIFO); expected an image file",
                    fifo.display()
                )]),
            )
        },
    },
    Case {
        name: "image that is /dev/zero (would be read without end)",
        build: |dir| {
            let artifact = good_artifact_in(dir);
            fail(graft_run(), os(&[&artifact, &"/dev/zero"]), Expect::Warnings(vec!["warning: skipped /dev/zero: not a regular file (a character device); expected an image file".into()]))
        },
    },
    Case {
        name: "5 GB file named .jpg (sparse; refused before reading)",
        build: |dir| {
            let big = dir.join("big.jpg");
            std::fs::File::create(&big)
                .unwrap()
                .set_len(5 << 30)
                .unwrap();
            let artifact = good_artifact_in(dir);
            fail(graft(), os(&[&"predict", &artifact, &big]), Expect::Warnings(vec![format!("warning: skipped {}: image file is 5368709120 bytes, more than the 268435456-byte limit (set GRAFT_MAX_IMAGE_BYTES to raise it)", big.display())]))
        },
    },
    Case {
        name: "artifact that is a FIFO",
        build: |dir| {
            let fifo = mkfifo(dir, "m.graft");
            let image = first_image(&hymenoptera_mini().join("val/ants"));
            fail(
                graft_run(),
                os(&[&fifo, &image]),
                Expect::Error(format!(
                    "error: {}: not a regular file (a FIFO); expected an artifact file",
                    fifo.display()
                )),
            )
        },
    },
    Case {
        name: "FIFO among the training images is skipped, not waited on",
        build: |dir| {
            let data = small_dataset(dir, 6);
            let fifo = mkfifo(&data.join("train/ants"), "pipe.jpg");
            Check {
                program: graft(),
                args: compile(dir, &lite0(), &data, &[]),
                code: 0,
                expect: Expect::Warnings(vec![format!(
                    "warning   skipped {}: not a regular file (a FIFO); expected an image file",
                    fifo.display()
                )]),
            }
        },
    },
    Case {
        name: "--out is the backbone",
        build: |dir| {
            let backbone = dir.join("b.onnx");
            std::fs::copy(lite0(), &backbone).unwrap();
            let mut args = compile(dir, &backbone, &hymenoptera_mini(), &[]);
            set_out(&mut args, &backbone);
            fail(graft(), args, Expect::Error(format!("error: --out {0}: is the backbone {0} (writing the artifact would replace it); choose another file", backbone.display())))
        },
    },
    Case {
        name: "--out is a training image",
        build: |dir| {
            let data = small_dataset(dir, 2);
            let image = first_image(&data.join("train/ants"));
            let mut args = compile(dir, &lite0(), &data, &[]);
            set_out(&mut args, &image);
            fail(graft(), args, Expect::Error(format!("error: --out {0}: is a data image {0} (writing the artifact would replace it); choose another file", image.display())))
        },
    },
    Case {
        name: "cache folder that cannot be created runs without a cache",
        build: |dir| {
            let blocker = dir.join("not-a-folder");
            std::fs::write(&blocker, "x").unwrap();
            let mut args = compile(dir, &lite0(), &small_dataset(dir, 6), &[]);
            set_option(&mut args, "--cache-dir", &blocker.join("cache"));
            Check {
                program: graft(),
                args,
                code: 0,
                expect: Expect::Warnings(vec![
                    "warning: running without a feature cache: ".into(),
                    "feature cache disabled".into(),
                ]),
            }
        },
    },
    Case {
        name: "--out in a folder that cannot be written (checked before the work)",
        build: |dir| {
            let mut args = compile(dir, &lite0(), &hymenoptera_mini(), &[]);
            set_out(&mut args, Path::new("/proc/out.graft"));
            fail(
                graft(),
                args,
                Expect::ErrorPrefix(
                    "error: --out /proc/out.graft: cannot write into folder /proc: ".into(),
                ),
            )
        },
    },
    Case {
        name: "--report is an existing file (checked before the work)",
        build: |dir| {
            let report = dir.join("report.html");
            std::fs::write(&report, "mine").unwrap();
            let mut args = compile(dir, &lite0(), &hymenoptera_mini(), &[&"--report", &report]);
            args.retain(|a| a != "--no-verify");
            fail(
                graft(),
                args,
                Expect::Error(format!(
                    "error: --report {}: exists and is not a folder",
                    report.display()
                )),
            )
        },
    },
    Case {
        name: "--lr nan",
        build: |dir| {
            option_error(
                dir,
                "--lr",
                "nan",
                "--lr <LR>",
                "is not a learning rate: expected a number greater than 0 and at most 1",
            )
        },
    },
    Case {
        name: "--lr 1000",
        build: |dir| {
            option_error(
                dir,
                "--lr",
                "1000",
                "--lr <LR>",
                "is not a learning rate: expected a number greater than 0 and at most 1",
            )
        },
    },
    Case {
        name: "--lr=-1",
        build: |dir| {
            option_error(
                dir,
                "--lr",
                "-1",
                "--lr <LR>",
                "is not a learning rate: expected a number greater than 0 and at most 1",
            )
        },
    },
    Case {
        name: "--backbone-lr inf",
        build: |dir| {
            option_error(
                dir,
                "--backbone-lr",
                "inf",
                "--backbone-lr <LR>",
                "is not a learning rate: expected a number greater than 0 and at most 1",
            )
        },
    },
    Case {
        name: "--weight-decay=-5",
        build: |dir| {
            option_error(
                dir,
                "--weight-decay",
                "-5",
                "--weight-decay <WEIGHT_DECAY>",
                "is not a weight decay: expected a number from 0 to 100",
            )
        },
    },
    Case {
        name: "--dropout 1.5",
        build: |dir| {
            option_error(
                dir,
                "--dropout",
                "1.5",
                "--dropout <DROPOUT>",
                "is not a fraction: expected a number from 0 up to (not including) 1",
            )
        },
    },
    Case {
        name: "--epochs 0",
        build: |dir| {
            option_error(
                dir,
                "--epochs",
                "0",
                "--epochs <EPOCHS>",
                "is not a count: expected a whole number of at least 1",
            )
        },
    },
    Case {
        name: "--top-k 0",
        build: |dir| {
            let artifact = good_artifact_in(dir);
            let image = first_image(&hymenoptera_mini().join("val/ants"));
            fail(
                graft_run(),
                os(&[&"--top-k", &"0", &artifact, &image]),
                Expect::ErrorPrefix("error: invalid value '0' for '--top-k <TOP_K>'".into()),
            )
        },
    },
    Case {
        name: "backbone input of 8192x8192",
        build: |dir| {
            use tract_onnx::pb::tensor_shape_proto::dimension::Value;
            let mut proto = lite0_proto();
            let dims = input_dims(&mut proto);
            dims[2] = dim(Value::DimValue(8192));
            dims[3] = dim(Value::DimValue(8192));
            let onnx = write_onnx(dir, "huge-input.onnx", &proto);
            fail(graft(), compile(dir, &onnx, &hymenoptera_mini(), &[]), Expect::Error(format!("error: {}: input \"input\" is 8192x8192, more than graft's limit of 4194304 pixels (2048x2048); ImageNet CNNs take 224 to 600", onnx.display())))
        },
    },
    Case {
        name: "backbone of 5,000 more nodes (tract's optimizer would take minutes)",
        build: |dir| {
            let mut proto = lite0_proto();
            let graph = proto.graph.as_mut().unwrap();
            let mut last = graph.output[0].name.clone();
            for i in 0..5000 {
                let node = tract_onnx::pb::NodeProto {
                    input: vec![last.clone()],
                    output: vec![format!("chain{i}")],
                    name: format!("chain{i}"),
                    op_type: "Relu".into(),
                    ..Default::default()
                };
                last = format!("chain{i}");
                graph.node.push(node);
            }
            graph.output[0].name = last;
            let nodes = graph.node.len();
            let onnx = write_onnx(dir, "long.onnx", &proto);
            fail(graft(), compile(dir, &onnx, &hymenoptera_mini(), &[]), Expect::Error(format!("error: {}: the ONNX graph has {nodes} nodes, more than graft's limit of 4096 (image CNNs have a few thousand at most)", onnx.display())))
        },
    },
    Case {
        name: "external data in a FIFO (would block the import)",
        build: |dir| {
            let (onnx, _, _) = external_weights(dir, "w.bin");
            let fifo = mkfifo(dir, "w.bin");
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::Error(format!(
                    "error: {}: not a regular file (a FIFO); expected an external data file",
                    fifo.display()
                )),
            )
        },
    },
    Case {
        name: "external data outside the model's folder",
        build: |dir| {
            let (onnx, name, _) = external_weights(dir, "../w.bin");
            fail(graft(), compile(dir, &onnx, &hymenoptera_mini(), &[]), Expect::Error(format!("error: {}: initializer {name:?}: external data location \"../w.bin\" must be a relative path inside the model's folder", onnx.display())))
        },
    },
    Case {
        name: "external data range past the end of its file",
        build: |dir| {
            let (onnx, name, _) = external_weights(dir, "w.bin");
            std::fs::write(dir.join("w.bin"), [0u8; 10]).unwrap();
            fail(
                graft(),
                compile(dir, &onnx, &hymenoptera_mini(), &[]),
                Expect::ErrorPrefix(format!(
                    "error: {}: initializer {name:?}: external data range from byte 0 (",
                    onnx.display()
                )),
            )
        },
    },
    Case {
        name: "wrapper folder around a split dataset (names the --data meant)",
        build: |dir| {
            let wrapper = dir.join("wrapper");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &wrapper.join("data/train/ants"),
                2,
            );
            copy_images(
                &hymenoptera_mini().join("val/ants"),
                &wrapper.join("data/val/ants"),
                2,
            );
            fail(graft(), compile(dir, &lite0(), &wrapper, &[]), Expect::Error(format!("error: {}: found only one class (\"data\"): a classifier needs at least two; it holds folders (train, val), so --data {} may be what was meant", wrapper.display(), wrapper.join("data").display())))
        },
    },
    Case {
        name: "class folder name with a newline (would forge output lines)",
        build: |dir| {
            let data = dir.join("data");
            copy_images(
                &hymenoptera_mini().join("train/ants"),
                &data.join("an\nts"),
                3,
            );
            copy_images(
                &hymenoptera_mini().join("train/bees"),
                &data.join("bees"),
                3,
            );
            fail(graft(), compile(dir, &lite0(), &data, &[]), Expect::Error(format!("error: {}: class folder name \"an\\nts\" contains a control character (such as a newline); rename the folder", data.display())))
        },
    },
    Case {
        name: "labels file with a control character",
        build: |dir| {
            let labels = dir.join("labels.txt");
            let mut text: Vec<String> = (0..1000).map(|i| format!("class {i}")).collect();
            text[4] = "a\tb".into();
            std::fs::write(&labels, text.join("\n")).unwrap();
            let args = own_head(dir, &labels);
            fail(graft(), args, Expect::Error(format!("error: {}: line 5: label \"a\\tb\" contains a control character (such as a newline)", labels.display())))
        },
    },
    Case {
        name: "artifact whose labels hold a newline (valid checksum)",
        build: |dir| {
            let (manifest, graph) = split_artifact(good_artifact());
            let mut doc: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            doc["labels"][0] = "ants\nbees 0.999".into();
            let bytes = reseal(&serde_json::to_vec(&doc).unwrap(), &graph);
            predict_with(dir, "l.graft", &bytes, |p| {
                Expect::Error(format!("error: {}: invalid artifact manifest: label 0 (\"ants\\nbees 0.999\") contains a control character (such as a newline)", p.display()))
            })
        },
    },
    Case {
        name: "artifact whose head weights are NaN (valid checksum)",
        build: |dir| {
            let bytes = with_nan_tensor(good_artifact(), "graft.head");
            let path = dir.join("nan.graft");
            std::fs::write(&path, bytes).unwrap();
            let image = first_image(&hymenoptera_mini().join("val/ants"));
            fail(graft_run(), os(&[&path, &image]), Expect::Warnings(vec![format!("warning: skipped {}: the model's output is not finite (NaN or infinity); its weights may be damaged", image.display())]))
        },
    },
];

#[test]
fn every_bad_input_gets_a_clear_message_and_exit_code() {
    assert!(CASES.len() >= 30, "the table should hold at least 30 cases");
    let mut failures = Vec::new();
    for case in CASES {
        let dir = tempfile::tempdir().unwrap();
        let check = (case.build)(dir.path());
        let artifacts_before: Vec<PathBuf> = graft_files(dir.path());
        let out = run(&check.program, &check.args);
        let mut problems = Vec::new();
        if out.code != check.code {
            problems.push(format!("exit code {} (expected {})", out.code, check.code));
        }
        let error = out
            .stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or("");
        match &check.expect {
            Expect::Error(e) if error != e => {
                problems.push(format!("error line\n    {error}\n  expected\n    {e}"))
            }
            Expect::ErrorPrefix(p) if !error.starts_with(p.as_str()) => problems.push(format!(
                "error line\n    {error}\n  expected to start with\n    {p}"
            )),
            Expect::Warnings(ws) => {
                for w in ws {
                    if !out.stderr.contains(w.as_str()) {
                        problems.push(format!("stderr lacks {w:?}"));
                    }
                }
            }
            _ => {}
        }
        let leftovers: Vec<PathBuf> = graft_files(dir.path())
            .into_iter()
            .filter(|p| {
                !artifacts_before.contains(p)
                    && (check.code != 0 || p.extension() == Some(OsStr::new("tmp")))
            })
            .collect();
        if !leftovers.is_empty() {
            problems.push(format!("left files behind: {leftovers:?}"));
        }
        if check.code == 0 && !dir.path().join("out.graft").is_file() {
            problems.push("no artifact written".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n  {}\n--- stderr\n{}",
                case.name,
                problems.join("\n  "),
                out.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}

/// Artifacts and temporary files below `dir` (not following links).
fn graft_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("graft" | "tmp")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

// ---- cases that need more than an exit code and a message ------------------------------------

/// Exit code and peak resident memory (KiB) of `program` run with `args`; stdout and stderr
/// are discarded.
// The child is reaped by `wait4` (which also reports its peak memory), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn peak_rss(program: &Path, args: &[OsString]) -> (i32, i64) {
    let child = std::process::Command::new(program)
        .args(args)
        .env(
            "GRAFT_CACHE_DIR",
            std::env::temp_dir().join("graft-test-cache-unused"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: plain libc call on our own child; `rusage` is plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

/// A PNG of `w x h` gray pixels.
fn png(path: &Path, w: u32, h: u32) {
    image::GrayImage::from_pixel(w, h, image::Luma([128]))
        .save(path)
        .unwrap();
}

/// Issue 18 item 1: the shorter side is resized to 256 and the longer one was never capped, so a
/// 1x16000 strip became 256 x 4,096,000 pixels (3.2 GB per image). Every path now stays small.
#[test]
fn extreme_aspect_ratios_run_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (tall, wide) = (dir.path().join("tall.png"), dir.path().join("wide.png"));
    png(&tall, 1, 16_000);
    png(&wide, 16_000, 1);
    let mut peaks = Vec::new();
    for pipeline in ["fast", "reference"] {
        let data = small_dataset(&dir.path().join(pipeline), 6);
        std::fs::copy(&tall, data.join("train/ants/tall.png")).unwrap();
        std::fs::copy(&wide, data.join("train/bees/wide.png")).unwrap();
        let out = dir.path().join(pipeline).join("out.graft");
        let mut args = compile(
            &dir.path().join(pipeline),
            &lite0(),
            &data,
            &[&"--pipeline", &pipeline],
        );
        set_out(&mut args, &out);
        let (code, compile_peak) = peak_rss(&graft(), &args);
        assert_eq!(code, 0, "{pipeline} compile");
        let (code, predict_peak) = peak_rss(&graft_run(), &os(&[&out, &tall, &wide]));
        assert_eq!(code, 0, "{pipeline} predict");
        peaks.push((pipeline, compile_peak, predict_peak));
    }
    eprintln!("peak RSS (KiB) with a 1x16000 and a 16000x1 image: {peaks:?}");
    for (pipeline, compile_peak, predict_peak) in peaks {
        // Measured 2026-11-28: 198 MB compile, 68 MB predict (were 6.2 GB and 3.2 GB).
        assert!(
            compile_peak < 1_000_000,
            "{pipeline} compile peaked at {compile_peak} KiB"
        );
        assert!(
            predict_peak < 300_000,
            "{pipeline} predict peaked at {predict_peak} KiB"
        );
    }
}

/// Issue 18 item 8: `graft compile ... 2>&1 | head -1` panicked on the first write to the closed
/// stderr (exit 101, no artifact). The compile finishes and writes its artifact.
#[test]
fn closed_stderr_does_not_stop_a_compile() {
    let dir = tempfile::tempdir().unwrap();
    let args = compile(dir.path(), &lite0(), &small_dataset(dir.path(), 6), &[]);
    let quoted: Vec<String> = std::iter::once(graft().into_os_string())
        .chain(args)
        .map(|a| format!("'{}'", a.to_str().unwrap()))
        .collect();
    let script = format!(
        "{} 2>&1 | head -1 >/dev/null; exit ${{PIPESTATUS[0]}}",
        quoted.join(" ")
    );
    let status = std::process::Command::new("bash")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(dir.path().join("out.graft").is_file());
}

/// The feature cache file of the only key under `cache`.
fn cache_file(cache: &Path) -> PathBuf {
    let keys: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("features.bin").is_file())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys[0].join("features.bin")
}

/// A compile with its own cache folder; returns its output.
fn compile_cached(dir: &Path, data: &Path, cache: &Path, extra: &[&dyn AsRef<OsStr>]) -> Output {
    let mut args = compile(dir, &lite0(), data, extra);
    set_option(&mut args, "--cache-dir", cache);
    args.retain(|a| a != "--no-verify");
    run(&graft(), &args)
}

/// Issue 18 item 3: rows swapped between images inside a cache file gave an artifact with 0.0
/// validation accuracy and exit 0; another key's file was used silently. Both are now noticed
/// by the file's checksum and key, and the features are computed again.
#[test]
fn damaged_or_foreign_feature_caches_are_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_dataset(dir.path(), 6);
    let cache = dir.path().join("cache");
    let first = compile_cached(dir.path(), &data, &cache, &[]).expect_code(0);
    assert!(
        first.stderr.contains("0 from cache, 24 computed"),
        "{}",
        first.stderr
    );
    let file = cache_file(&cache);
    let mut bytes = std::fs::read(&file).unwrap();
    let dim = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let count = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let rows = 56 + count * 32;
    let (a, b) = bytes[rows..rows + 2 * dim * 4].split_at_mut(dim * 4);
    a.swap_with_slice(b);
    std::fs::write(&file, &bytes).unwrap();
    let second = compile_cached(dir.path(), &data, &cache, &[]).expect_code(0);
    assert!(
        second.stderr.contains(&format!(
            "warning: ignoring feature cache {}: checksum mismatch (the file was changed) (its features are computed again)",
            file.display()
        )),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("0 from cache, 24 computed"),
        "{}",
        second.stderr
    );

    // A file of another key (another resize) copied over this one.
    let other = dir.path().join("other-cache");
    compile_cached(dir.path(), &data, &other, &[&"--resize", &"240"]).expect_code(0);
    std::fs::copy(cache_file(&other), &file).unwrap();
    let third = compile_cached(dir.path(), &data, &cache, &[]).expect_code(0);
    assert!(
        third
            .stderr
            .contains("it belongs to another backbone, cut or preprocessing"),
        "{}",
        third.stderr
    );
}

/// Issue 18 item 3: a probe cache edited to `"chosen": "bogus"` panicked (exit 101); it is now
/// ignored and the probe runs again.
#[test]
fn edited_probe_cache_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_dataset(dir.path(), 6);
    let cache = dir.path().join("cache");
    let auto = |dir: &Path| {
        let mut args = compile(dir, &lite0(), &data, &[]);
        let at = args.iter().position(|a| a == "--normalize").unwrap();
        args.drain(at..at + 2);
        set_option(&mut args, "--cache-dir", &cache);
        run(&graft(), &args)
    };
    auto(dir.path()).expect_code(0);
    let probe_dir = cache.join("probe");
    let file = std::fs::read_dir(&probe_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("\"chosen\": \"tf\"", "\"chosen\": \"bogus\""),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&file).unwrap().contains("bogus"));
    let again = auto(dir.path()).expect_code(0);
    assert!(
        again.stderr.contains("normalize tf (auto"),
        "{}",
        again.stderr
    );
}

/// Issue 18 item 3: changing a backbone's external-data weights after a compile reused the
/// features of the old weights. The external files are part of the backbone's identity now.
#[test]
fn changed_external_data_is_a_new_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_dataset(dir.path(), 6);
    let (onnx, _, weights) = external_weights(dir.path(), "w.bin");
    std::fs::write(dir.path().join("w.bin"), weights).unwrap();
    let cache = dir.path().join("cache");
    let compile_ext = || {
        let mut args = compile(dir.path(), &onnx, &data, &[]);
        set_option(&mut args, "--cache-dir", &cache);
        run(&graft(), &args).expect_code(0)
    };
    assert!(compile_ext().stderr.contains("0 from cache, 24 computed"));
    assert!(compile_ext().stderr.contains("24 from cache, 0 computed"));
    let mut weights = std::fs::read(dir.path().join("w.bin")).unwrap();
    weights[0] ^= 0x40;
    std::fs::write(dir.path().join("w.bin"), &weights).unwrap();
    let changed = compile_ext();
    assert!(
        changed.stderr.contains("0 from cache, 24 computed"),
        "{}",
        changed.stderr
    );
}

/// Issue 18 item 5: a non-UTF-8 path panicked every `--json` output and `--report`. Paths are
/// written lossily now (U+FFFD), as in text output.
#[test]
fn non_utf8_paths_are_written_lossily() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let odd = |name: &[u8]| dir.path().join(OsStr::from_bytes(name));
    let data = odd(b"data\xff");
    for class in ["ants", "bees"] {
        copy_images(
            &hymenoptera_mini().join("val").join(class),
            &data.join(class),
            4,
        );
    }
    let image = data.join("ants").join(OsStr::from_bytes(b"a\xff.jpg"));
    std::fs::copy(first_image(&hymenoptera_mini().join("val/bees")), &image).unwrap();
    let model = odd(b"m\xff.graft");
    std::fs::write(&model, good_artifact()).unwrap();
    let commands: Vec<(PathBuf, Vec<OsString>)> = vec![
        (graft(), os(&[&"predict", &model, &image, &"--json"])),
        (graft(), os(&[&"eval", &model, &data, &"--json"])),
        (
            graft(),
            os(&[&"eval", &model, &data, &"--report", &odd(b"report\xff")]),
        ),
        (graft(), os(&[&"inspect", &model, &"--json"])),
        (graft(), os(&[&"bench", &model, &"--json"])),
        (graft_run(), os(&[&"predict", &model, &image, &"--json"])),
    ];
    for (program, args) in commands {
        let out = run(&program, &args);
        assert!(
            out.code == 0 && !out.stderr.contains("panicked"),
            "{args:?}: exit {}\n{}",
            out.code,
            out.stderr
        );
        if args.iter().any(|a| a == "--json") {
            let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert!(doc.to_string().contains('\u{fffd}'), "{args:?}: {doc}");
        }
    }
}

/// `predict --jsonl` (issue 19): one JSON object per line and image, written batch by batch;
/// an image that cannot be classified is a line with its error (and exit 1), and `--json` with
/// `--jsonl` is a usage error.
#[test]
fn predict_jsonl_writes_one_object_per_line_and_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = good_artifact_in(dir.path());
    let images = dir.path().join("images");
    copy_images(&hymenoptera_mini().join("val/ants"), &images, 3);
    std::fs::write(images.join("broken.jpg"), b"not a jpeg").unwrap();
    for program in [graft(), graft_run()] {
        let out = run(
            &program,
            &os(&[&"predict", &model, &images, &"--jsonl", &"--batch", &"2"]),
        );
        assert_eq!(out.code, 1, "{}", out.stderr);
        let lines: Vec<serde_json::Value> = out
            .stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "{}", out.stdout);
        let failed: Vec<_> = lines.iter().filter(|l| l.get("error").is_some()).collect();
        assert_eq!(failed.len(), 1, "{}", out.stdout);
        assert!(failed[0]["path"].as_str().unwrap().ends_with("broken.jpg"));
        for line in lines.iter().filter(|l| l.get("error").is_none()) {
            assert_eq!(line["top_k"].as_array().unwrap().len(), 2, "{line}");
        }
        let both = run(
            &program,
            &os(&[&"predict", &model, &images, &"--jsonl", &"--json"]),
        );
        assert_eq!(both.code, 1, "{}", both.stderr);
        assert!(
            both.stderr.contains("cannot be used with"),
            "{}",
            both.stderr
        );
    }
}
