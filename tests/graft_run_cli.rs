//! `graft-run` alone, without a compiler: help, usage errors and unreadable artifacts.

use std::process::Command;

fn graft_run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_graft-run"))
        .args(args)
        .output()
        .expect("run graft-run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_commands_and_examples() {
    let (code, stdout, _) = graft_run(&["--help"]);
    assert_eq!(code, 0);
    for needle in [
        "predict",
        "eval",
        "inspect",
        "Exit codes",
        "graft-run model.graft bee.jpg",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from help:\n{stdout}"
        );
    }
}

#[test]
fn usage_errors_exit_1() {
    let (code, _, stderr) = graft_run(&[]);
    assert_eq!(code, 1, "{stderr}");
    let (code, _, stderr) = graft_run(&["model.graft"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("required"), "{stderr}");
}

#[test]
fn missing_and_foreign_files_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.graft");
    let (code, _, stderr) = graft_run(&[missing.to_str().unwrap(), "x.jpg"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    let text = dir.path().join("notes.graft");
    std::fs::write(&text, "hello").unwrap();
    let (code, _, stderr) = graft_run(&["inspect", text.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: {}: not a graft artifact (missing the GRAFTART magic bytes)",
            text.display()
        )
    );
}
