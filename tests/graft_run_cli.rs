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

/// The section names of an ELF64 little-endian file (the section header string table).
fn elf_sections(bytes: &[u8]) -> Vec<String> {
    let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap()) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    assert_eq!(&bytes[..5], b"\x7fELF\x02", "an ELF64 file");
    let (table, size, count, names) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| table + i * size;
    let strings = u64_at(header(names) + 0x18);
    (0..count)
        .map(|i| {
            let start = strings + u32_at(header(i));
            let end = start + bytes[start..].iter().position(|&b| b == 0).unwrap();
            String::from_utf8_lossy(&bytes[start..end]).into_owned()
        })
        .collect()
}

/// What a release build produces is what users install and ship: no debug info (issue 19; the
/// line tables alone made `graft-run` 126 MB), symbols kept for profilers. Checked in release
/// builds on Linux (the dev profile keeps its debug info).
#[test]
#[cfg(target_os = "linux")]
fn release_binary_ships_without_debug_info() {
    if cfg!(debug_assertions) {
        return;
    }
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_graft-run"));
    let bytes = std::fs::read(path).unwrap();
    let sections = elf_sections(&bytes);
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    assert!(
        sections.iter().any(|s| s == ".symtab"),
        "symbols kept: {sections:?}"
    );
    // `.debug_gdb_scripts` is loaded data (the debugger's pretty-printer list), not debug info.
    let debug: Vec<&String> = sections
        .iter()
        .filter(|s| s.starts_with(".debug") && *s != ".debug_gdb_scripts")
        .collect();
    assert!(debug.is_empty(), "{} carries {debug:?}", path.display());
    let mb = bytes.len() as f64 / 1e6;
    assert!(mb < 60.0, "graft-run is {mb:.1} MB");
}
