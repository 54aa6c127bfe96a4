//! Helpers shared by the end-to-end tests: paths to the fixtures and the real binaries, and a
//! small runner that captures exit code, stdout and stderr.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's `fixtures/` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// `../shared` beside the repository, when present (real datasets for the larger checks).
pub fn shared() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    dir.join("datasets").is_dir().then_some(dir)
}

/// The Lite0 backbone fixture.
pub fn lite0() -> PathBuf {
    fixtures().join("efficientnet_lite0.onnx")
}

/// The small ant/bee fixture dataset.
pub fn hymenoptera_mini() -> PathBuf {
    fixtures().join("hymenoptera-mini")
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(self, code: i32) -> Output {
        assert_eq!(
            self.code, code,
            "exit code {} (expected {code})\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// The stderr line starting with `error: `.
    pub fn error_line(&self) -> &str {
        self.stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line in stderr:\n{}", self.stderr))
    }
}

/// `graft compile --backbone B --data D --out O` and `extra`, run by the `graft` binary at
/// `graft`: the one command builder the compile tests share.
pub fn compile_cmd(
    graft: &Path,
    backbone: &Path,
    data: &Path,
    out: &Path,
    extra: &[&std::ffi::OsStr],
) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "compile".as_ref(),
        "--backbone".as_ref(),
        backbone.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    args.extend_from_slice(extra);
    run(graft, &args)
}

/// Runs `program` with `args` and a private feature cache.
pub fn run<A: AsRef<std::ffi::OsStr>>(program: &Path, args: &[A]) -> Output {
    run_with_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_with_env<A: AsRef<std::ffi::OsStr>>(
    program: &Path,
    args: &[A],
    env: &[(&str, &str)],
) -> Output {
    let out = Command::new(program)
        .args(args)
        .env(
            "GRAFT_CACHE_DIR",
            std::env::temp_dir().join("graft-test-cache-unused"),
        )
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Converts a list of string-likes into `OsStr` arguments.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &[$(::std::ffi::OsStr::new(&$a)),*]
    };
}

/// The `graft-run` binary built beside `graft` (the tests run with `cargo test --workspace`).
pub fn graft_run_beside(graft: &Path) -> PathBuf {
    let path = graft.with_file_name(format!("graft-run{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` so it is built",
        path.display()
    );
    path
}

/// `|got - expected| / |expected|` (Euclidean norms): how far a recomputation is from a reference.
pub fn relative_difference(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len(), "lengths differ");
    let norm = expected.iter().map(|v| v * v).sum::<f32>().sqrt();
    let diff = got
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    diff / norm
}

/// The largest `|got[i] - expected[i]|`.
pub fn max_abs_difference(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len(), "lengths differ");
    got.iter()
        .zip(expected)
        .fold(0f32, |worst, (a, b)| worst.max((a - b).abs()))
}

/// A file of little-endian f32 values (the golden logits `make_fixtures.py` and
/// `make_families.py` write).
pub fn read_f32_file(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A 224x224 golden crop as the exact tensor the fixture scripts gave onnxruntime:
/// `(x - 127) / 128`, NCHW.
pub fn golden_tensor(path: &Path) -> Vec<f32> {
    let image = graft_runtime::preprocess::load_image(path)
        .unwrap()
        .to_rgb8();
    assert_eq!(image.dimensions(), (224, 224), "{}", path.display());
    let mut chw = vec![0f32; 3 * 224 * 224];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            chw[c * 224 * 224 + i] = (px.0[c] as f32 - 127.0) / 128.0;
        }
    }
    chw
}
