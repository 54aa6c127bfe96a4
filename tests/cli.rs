//! The `graft` command line itself: every command has help with an example, and completion
//! scripts cover every command.

mod common;

use std::path::Path;

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

const COMMANDS: [&str; 11] = [
    "compile",
    "predict",
    "eval",
    "inspect",
    "bench",
    "demo",
    "check-data",
    "inspect-backbone",
    "advise",
    "completions",
    "help",
];

#[test]
fn every_command_is_listed_and_has_an_example() {
    let help = run(graft(), &["--help"]).expect_code(0).stdout;
    for command in COMMANDS {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from graft --help:\n{help}"
        );
    }
    for command in COMMANDS.iter().filter(|c| !matches!(**c, "help" | "demo")) {
        let help = run(graft(), &[command, "--help"]).expect_code(0).stdout;
        assert!(
            help.contains("Example"),
            "graft {command} --help has no example:\n{help}"
        );
    }
}

#[test]
fn completion_scripts_cover_every_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = run(graft(), &["completions", shell]).expect_code(0).stdout;
        for command in COMMANDS {
            assert!(script.contains(command), "{shell} script lacks {command}");
        }
    }
    let bad = run(graft(), &["completions", "tcsh"]).expect_code(1);
    assert!(
        bad.stderr.contains("invalid value 'tcsh' for '<SHELL>'"),
        "{}",
        bad.stderr
    );
}

/// The default output is short (no epoch lines), `-v` adds a readable line per pipeline stage
/// with its duration and counts, `-vv` a line per epoch.
#[test]
fn verbosity_levels_add_stage_lines_then_epoch_lines() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("v.graft");
    let cache = dir.path().join("cache");
    let (backbone, data) = (lite0(), hymenoptera_mini());
    let compile = |flags: &[&str]| {
        TestCommand::compile(graft(), &backbone, &data, &artifact)
            .args(["--cache-dir".as_ref(), cache.as_os_str()])
            .arg("--no-verify")
            .args(flags)
            .run()
            .expect_code(0)
            .stderr
    };
    let epoch_line = "epoch    1  train loss ";
    let default = compile(&[]);
    assert!(default.contains("kept      epoch "), "{default}");
    assert!(!default.contains(epoch_line), "{default}");
    assert!(!default.contains("stage     "), "{default}");

    let stages = compile(&["-v"]);
    assert!(!stages.contains(epoch_line), "{stages}");
    for name in [
        "import",
        "cut",
        "normalize",
        "extract",
        "train",
        "fold",
        "write",
    ] {
        let line = format!("stage     {name} ");
        assert!(
            stages
                .lines()
                .any(|l| l.starts_with(&line) && l.ends_with(" s")),
            "no {line:?}\n{stages}"
        );
    }
    assert!(
        stages.contains(
            "\nlog       features extracted images=72 cache_hits=72 computed=0 skipped=0"
        ),
        "{stages}"
    );
    assert!(
        !stages.contains("INFO") && !stages.contains("graft_compiler::"),
        "{stages}"
    );

    let epochs = compile(&["-vv"]);
    assert!(epochs.contains(epoch_line), "{epochs}");
    assert!(epochs.contains("\nstage     train "), "{epochs}");
    let both = run(graft(), &["-q", "-v", "inspect", "x.graft"]).expect_code(1);
    assert!(
        both.stderr
            .contains("the argument '--quiet' cannot be used with '--verbose...'"),
        "{}",
        both.stderr
    );
}

/// `graft ... | head -1`: when the reader closes the pipe, graft stops quietly with success
/// (no "error: Broken pipe"), for every command that writes a listing.
#[test]
fn a_closed_output_pipe_is_not_an_error() {
    use std::process::{Command, Stdio};
    for args in [
        vec![std::ffi::OsString::from("inspect-backbone"), lite0().into()],
        vec!["inspect-backbone".into(), lite0().into(), "--json".into()],
        vec![
            "check-data".into(),
            hymenoptera_mini().into(),
            "--json".into(),
        ],
        vec!["completions".into(), "bash".into()],
    ] {
        for _ in 0..3 {
            let mut child = Command::new(graft())
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && !stderr.contains("error"),
                "{args:?}: {:?} {stderr}",
                out.status
            );
        }
    }
}

/// `graft demo` from an installed binary: `--fixtures` names the checkout's fixtures folder, the
/// demo runs from any working directory, and a folder without them is an error saying so.
#[test]
fn demo_runs_from_another_folder_with_fixtures_given() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(graft())
        .current_dir(dir.path())
        .args(["demo", "--quiet", "--out", "demo", "--fixtures"])
        .arg(fixtures())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("demo/hymenoptera.graft").is_file());
    let wrong = run(
        graft(),
        &["demo", "--fixtures", dir.path().to_str().unwrap(), "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.path().join("x").to_string_lossy().into_owned()])
            .collect::<Vec<_>>(),
    )
    .expect_code(1);
    assert_eq!(
        wrong.error_line(),
        format!(
            "error: the demo needs the fixtures folder of a graft checkout ({} has no efficientnet_lite0.onnx and hymenoptera-mini); pass --fixtures DIR",
            dir.path().display()
        )
    );
}

/// `graft compile --help` groups its options by stage, in pipeline order.
#[test]
fn compile_help_groups_options_by_stage() {
    let help = run(graft(), &["compile", "--help"]).expect_code(0).stdout;
    let headings: Vec<&str> = help
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':'))
        .collect();
    assert_eq!(
        headings,
        [
            "Options:",
            "Preprocessing:",
            "Head training:",
            "Fine-tuning:",
            "Precision:",
            "Output:",
            "Examples:"
        ],
        "{help}"
    );
}
