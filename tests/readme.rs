//! The README's "One example of every command" block, run line by line with the real binaries
//! in a temporary folder that links to `fixtures/`: every line must exit 0, and together they
//! must name every `graft` command but `demo` (run by the quick start) and `help`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

fn graft_run() -> PathBuf {
    graft_run_beside(graft())
}

/// The command lines between the README's `readme-examples` markers.
fn readme_examples() -> Vec<String> {
    let readme = std::fs::read_to_string(fixtures().join("../README.md")).unwrap();
    let start = readme
        .find("<!-- readme-examples -->")
        .expect("README has the examples block");
    let end = readme[start..]
        .find("<!-- /readme-examples -->")
        .expect("the examples block is closed")
        + start;
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("graft"))
        .map(str::to_string)
        .collect()
}

#[test]
#[cfg(unix)]
fn every_readme_example_runs() {
    let lines = readme_examples();
    for command in [
        "compile",
        "predict",
        "eval",
        "inspect",
        "bench",
        "check-data",
        "inspect-backbone",
        "advise",
        "completions",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().nth(1) == Some(command)),
            "README has no example of graft {command}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        fixtures().canonicalize().unwrap(),
        dir.path().join("fixtures"),
    )
    .unwrap();
    for line in &lines {
        let mut words = line.split_whitespace();
        let program = match words.next() {
            Some("graft") => graft().to_path_buf(),
            Some("graft-run") => graft_run(),
            other => panic!("unexpected program {other:?}"),
        };
        let out = Command::new(&program)
            .args(words)
            .current_dir(dir.path())
            .env("GRAFT_CACHE_DIR", dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README example failed: {line}\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "{line} printed nothing");
    }
    assert!(dir.path().join("probes.svg").is_file());
}
