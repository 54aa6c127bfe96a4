//! The C ABI: `runtime/examples/c/classify.c` is compiled against `runtime/include/graft.h` and
//! `libgraft_runtime.so`, run on the fixture artifact, and must print what `graft-run` prints.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use graft_compiler::pipeline::{compile, CompileOptions};
use graft_runtime::preprocess::Normalization;
use graft_runtime::progress::NoProgress;

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_graft"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cargo build` puts the shared library beside the binaries; `cargo test` leaves it in `deps/`.
fn library() -> PathBuf {
    let candidates =
        [target_dir(), target_dir().join("deps")].map(|d| d.join("libgraft_runtime.so"));
    candidates
        .iter()
        .find(|lib| lib.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} missing: run `cargo test --workspace`",
                candidates[0].display()
            )
        })
        .clone()
}

fn header() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/include/graft.h")
}

#[test]
fn header_declares_exactly_the_exported_functions() {
    let text = std::fs::read_to_string(header()).unwrap();
    let mut declared: Vec<&str> = text
        .match_indices("graft_")
        .filter_map(|(at, _)| {
            let name_len = text[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - at);
            text[at + name_len..]
                .starts_with('(')
                .then(|| &text[at..at + name_len])
        })
        .collect();
    declared.sort();
    declared.dedup();
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(library())
        .output()
        .expect("nm (binutils) is needed for this test");
    let symbols = String::from_utf8_lossy(&nm.stdout);
    let mut exported: Vec<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|s| s.starts_with("graft_"))
        .collect();
    exported.sort();
    assert_eq!(
        declared, exported,
        "regenerate the header with scripts/gen_header.sh"
    );
    assert_eq!(declared.len(), 7);
}

#[test]
fn c_example_prints_what_graft_run_prints() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("bees.graft");
    let options = CompileOptions {
        data: Some(hymenoptera_mini()),
        normalization: Some(Normalization::tf()),
        verify: false,
        ..CompileOptions::new(lite0(), &artifact)
    };
    compile(&options, &NoProgress).unwrap();

    let exe = dir.path().join("classify");
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(header().parent().unwrap())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/examples/c/classify.c"))
        .arg(library())
        .arg(format!(
            "-Wl,-rpath,{}",
            library().parent().unwrap().display()
        ))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );

    let images = [
        hymenoptera_mini().join("val/ants/11381045_b352a47d8c.jpg"),
        hymenoptera_mini().join("val/bees/1181173278_23c36fac71.jpg"),
        fixtures().join("odd-images/cmyk.jpg"),
    ];
    let c = Command::new(&exe)
        .arg(&artifact)
        .args(&images)
        .output()
        .unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let c_out = String::from_utf8_lossy(&c.stdout).into_owned();
    let graft_run = target_dir().join("graft-run");
    let rust = Command::new(graft_run)
        .arg(&artifact)
        .args(&images)
        .output()
        .unwrap();
    let rust_out = String::from_utf8_lossy(&rust.stdout).into_owned();
    let (file_lines, gradient) = c_out.rsplit_once("gradient: ").unwrap();
    assert_eq!(file_lines, rust_out);

    // The raw-buffer path gives what the Rust API gives for the same picture.
    let picture = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(4 * x) as u8, (5 * y) as u8, (2 * (x + y)) as u8])
    });
    let model = graft_runtime::Model::load(&artifact).unwrap();
    let result = model
        .classify(&image::DynamicImage::ImageRgb8(picture))
        .unwrap();
    let top = &result.top_k(1, model.labels())[0];
    assert_eq!(
        gradient.trim_end(),
        format!("{} {:.3}", top.label, top.probability)
    );

    let missing = Command::new(&exe)
        .arg(&artifact)
        .arg(dir.path().join("missing.jpg"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim_end(),
        format!(
            "error: {}: No such file or directory (os error 2)",
            dir.path().join("missing.jpg").display()
        )
    );
    let bad_model = Command::new(&exe).arg(&images[0]).output().unwrap();
    assert_eq!(bad_model.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&bad_model.stderr).trim_end(),
        format!(
            "error: {}: not a graft artifact (missing the GRAFTART magic bytes)",
            images[0].display()
        )
    );
}
