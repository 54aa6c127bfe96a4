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

/// The one command builder of the end-to-end tests: a program (`graft`, `graft-run`), its
/// arguments, extra environment variables, and a private feature cache unless the arguments name
/// one. `TestCommand::compile(graft, backbone, data, out)` starts `graft compile --backbone B
/// --data D --out O`; `.arg`/`.args` add to it; `.run()` waits for it, `.command()` gives the
/// `std::process::Command` for tests that spawn, signal or wrap it.
#[derive(Debug, Clone)]
pub struct TestCommand {
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
}

impl TestCommand {
    /// `program` with no arguments.
    pub fn new(program: impl AsRef<Path>) -> TestCommand {
        TestCommand {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `graft compile --backbone B --data D --out O`.
    pub fn compile(graft: &Path, backbone: &Path, data: &Path, out: &Path) -> TestCommand {
        TestCommand::new(graft)
            .arg("compile")
            .arg("--backbone")
            .arg(backbone)
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(out)
    }

    /// `graft advise --backbone B --data D`.
    pub fn advise(graft: &Path, backbone: &Path, data: &Path) -> TestCommand {
        TestCommand::new(graft)
            .arg("advise")
            .arg("--backbone")
            .arg(backbone)
            .arg("--data")
            .arg(data)
    }

    /// One more argument.
    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> TestCommand {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// More arguments.
    pub fn args<A: AsRef<std::ffi::OsStr>>(
        mut self,
        args: impl IntoIterator<Item = A>,
    ) -> TestCommand {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// One more environment variable.
    pub fn env(mut self, key: &str, value: &str) -> TestCommand {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The arguments after the program.
    pub fn argv(&self) -> &[std::ffi::OsString] {
        &self.args
    }

    /// The process to spawn: the program, its arguments, a private (unused) feature cache
    /// directory in `GRAFT_CACHE_DIR`, and the extra environment.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env(
                "GRAFT_CACHE_DIR",
                std::env::temp_dir().join("graft-test-cache-unused"),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs the command to its end.
    pub fn run(&self) -> Output {
        let out = self
            .command()
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.program.display()));
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `graft compile --backbone B --data D --out O` and `extra`, run: [`TestCommand::compile`] in
/// one call, for the many compile tests.
pub fn compile_cmd(
    graft: &Path,
    backbone: &Path,
    data: &Path,
    out: &Path,
    extra: &[&std::ffi::OsStr],
) -> Output {
    TestCommand::compile(graft, backbone, data, out)
        .args(extra)
        .run()
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
    env.iter()
        .fold(TestCommand::new(program).args(args), |c, (k, v)| {
            c.env(k, v)
        })
        .run()
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
