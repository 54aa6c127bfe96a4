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
    let mut args = os(&[
        &"compile",
        &"--backbone",
        &backbone,
        &"--data",
        &data,
        &"--out",
        &dir.join("out.graft"),
        &"--normalize",
        &"tf",
        &"--no-verify",
        &"--cache-dir",
        &shared_cache(),
    ]);
    args.extend(os(extra));
    args
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
            let args = os(&[
                &"compile",
                &"--backbone",
                &lite0(),
                &"--keep-imagenet-head",
                &"--labels",
                &labels,
                &"--out",
                &dir.join("out.graft"),
                &"--normalize",
                &"tf",
            ]);
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
            fail(graft(), compile(dir, &lite0(), &hymenoptera_mini(), &[&"--pipeline", &"turbo"]), Expect::Error("error: invalid value 'turbo' for '--pipeline <PIPELINE>': unknown preprocessing pipeline \"turbo\": expected fast or reference".into()))
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
            let args = os(&[
                &"compile",
                &"--backbone",
                &lite0(),
                &"--data",
                &hymenoptera_mini(),
                &"--out",
                &dir.join("out.graft"),
                &"--normalize",
                &"fancy",
            ]);
            fail(graft(), args, Expect::ErrorPrefix("error: invalid value 'fancy' for '--normalize <NORMALIZE>': unknown normalization \"fancy\"".into()))
        },
    },
    // ---- output path -------------------------------------------------------------------------
    Case {
        name: "output folder does not exist",
        build: |dir| {
            let out = dir.join("no/such/folder/m.graft");
            let args = os(&[
                &"compile",
                &"--backbone",
                &lite0(),
                &"--data",
                &hymenoptera_mini(),
                &"--out",
                &out,
            ]);
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
            let args = os(&[
                &"compile",
                &"--backbone",
                &lite0(),
                &"--data",
                &hymenoptera_mini(),
                &"--out",
                &out,
            ]);
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
            let artifact = dir.join("m.graft");
            std::fs::write(&artifact, good_artifact()).unwrap();
            let bomb = fixtures().join("odd-images/bomb-20000x20000.png");
            fail(
                graft_run(),
                os(&[&artifact, &bomb]),
                Expect::Warnings(vec![
                    format!(
                        "warning: skipped {}: cannot decode image: Image size exceeds limit",
                        bomb.display()
                    ),
                    "1 of 1 images could not be classified".into(),
                ]),
            )
        },
    },
    Case {
        name: "missing image at predict time",
        build: |dir| {
            let artifact = dir.join("m.graft");
            std::fs::write(&artifact, good_artifact()).unwrap();
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
            let artifact = dir.join("m.graft");
            std::fs::write(&artifact, good_artifact()).unwrap();
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
            let artifact = dir.join("m.graft");
            std::fs::write(&artifact, good_artifact()).unwrap();
            let data = dir.join("eval");
            copy_images(&hymenoptera_mini().join("val/ants"), &data.join("ants"), 1);
            copy_images(&hymenoptera_mini().join("val/bees"), &data.join("wasps"), 1);
            fail(graft(), os(&[&"eval", &artifact, &data]), Expect::Error(format!("error: {}: class folder \"wasps\" is not a label of the model (labels: ants, bees)", data.join("wasps").display())))
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
