//! `graft check-data`: a folder with planted problems (train/val leakage, a label conflict, a
//! near-duplicate, a broken file, a blank frame, a tiny photo) is reported problem by problem and
//! exits 1 (and `compile` warns about the leak and the conflict); the real hymenoptera dataset's
//! placeholder GIF is found.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

fn photos(split: &str, class: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(hymenoptera_mini().join(split).join(class))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[derive(serde::Deserialize)]
struct Report {
    classes: Vec<ClassCount>,
    findings: Vec<Finding>,
}

#[derive(serde::Deserialize)]
struct ClassCount {
    class: String,
    train: usize,
    val: usize,
}

#[derive(serde::Deserialize)]
struct Finding {
    severity: String,
    kind: String,
    paths: Vec<PathBuf>,
}

#[test]
fn planted_problems_are_each_reported_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (split, class, n) in [
        ("train", "ants", 4),
        ("train", "bees", 4),
        ("val", "ants", 2),
        ("val", "bees", 2),
    ] {
        let to = data.join(split).join(class);
        std::fs::create_dir_all(&to).unwrap();
        for photo in photos(split, class).iter().take(n) {
            std::fs::copy(photo, to.join(photo.file_name().unwrap())).unwrap();
        }
    }
    let ants = data.join("train/ants");
    let bees = data.join("train/bees");
    // A validation photo also in training; a bee photo also filed as an ant.
    let leaked = photos("val", "ants")[0].clone();
    std::fs::copy(&leaked, ants.join("leaked.jpg")).unwrap();
    let conflict = photos("train", "bees")[0].clone();
    std::fs::copy(&conflict, ants.join("conflict.jpg")).unwrap();
    // The same bee photo again, smaller and re-encoded as PNG.
    let bee = image::open(photos("train", "bees")[1].clone()).unwrap();
    bee.resize(200, 200, image::imageops::FilterType::Triangle)
        .save(bees.join("smaller-copy.png"))
        .unwrap();
    std::fs::write(bees.join("broken.jpg"), b"this is not a JPEG").unwrap();
    image::RgbImage::from_pixel(120, 90, image::Rgb([200, 200, 200]))
        .save(ants.join("blank.png"))
        .unwrap();
    image::open(photos("train", "ants")[5].clone())
        .unwrap()
        .crop_imm(0, 0, 40, 30)
        .save(ants.join("tiny.png"))
        .unwrap();

    let out = run(
        graft(),
        &[
            std::ffi::OsStr::new("check-data"),
            data.as_os_str(),
            std::ffi::OsStr::new("--json"),
        ],
    )
    .expect_code(1);
    let report: Report = serde_json::from_str(&out.stdout).unwrap();
    let counts: Vec<(&str, usize, usize)> = report
        .classes
        .iter()
        .map(|c| (c.class.as_str(), c.train, c.val))
        .collect();
    assert_eq!(counts, [("ants", 8, 2), ("bees", 6, 2)]);
    let finding = |kind: &str| {
        report
            .findings
            .iter()
            .find(|f| f.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} finding in {}", out.stdout))
    };
    let names = |f: &Finding| -> Vec<String> {
        f.paths
            .iter()
            .map(|p| p.strip_prefix(&data).unwrap().display().to_string())
            .collect()
    };
    let leak = finding("exact-duplicate-train-val");
    assert_eq!(leak.severity, "error");
    assert_eq!(
        names(leak),
        [
            "train/ants/leaked.jpg".to_string(),
            format!("val/ants/{}", leaked.file_name().unwrap().to_string_lossy())
        ]
    );
    let conflict_finding = finding("exact-duplicate-cross-class");
    assert_eq!(conflict_finding.severity, "error");
    assert_eq!(
        names(conflict_finding),
        [
            "train/ants/conflict.jpg".to_string(),
            format!(
                "train/bees/{}",
                conflict.file_name().unwrap().to_string_lossy()
            )
        ]
    );
    let near = finding("near-duplicate-within-class");
    assert_eq!(near.severity, "warning");
    assert!(
        names(near).contains(&"train/bees/smaller-copy.png".to_string()),
        "{:?}",
        names(near)
    );
    assert_eq!(names(finding("undecodable")), ["train/bees/broken.jpg"]);
    assert_eq!(names(finding("few-colours")), ["train/ants/blank.png"]);
    assert_eq!(names(finding("tiny")), ["train/ants/tiny.png"]);
    assert_eq!(
        report
            .findings
            .iter()
            .filter(|f| f.severity == "error")
            .count(),
        3
    );

    let text = run(
        graft(),
        &[std::ffi::OsStr::new("check-data"), data.as_os_str()],
    )
    .expect_code(1);
    assert!(
        text.stdout.ends_with("3 errors, 3 warnings\n"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains(
        "error     1 pairs of identical images in both the training and the validation split"
    ));
}

#[test]
fn the_fixture_is_clean_and_the_real_placeholder_gif_is_found() {
    let clean = run(
        graft(),
        &[
            std::ffi::OsStr::new("check-data"),
            hymenoptera_mini().as_os_str(),
        ],
    )
    .expect_code(0);
    assert!(
        clean.stdout.ends_with("0 errors, 0 warnings\n"),
        "{}",
        clean.stdout
    );
    let Some(shared) = shared() else {
        eprintln!("../shared not present: skipping the hymenoptera check");
        return;
    };
    let out = run(
        graft(),
        &[
            std::ffi::OsStr::new("check-data"),
            shared.join("datasets/hymenoptera").as_os_str(),
        ],
    )
    .expect_code(0);
    assert!(
        out.stdout
            .contains("warning   1 images with fewer than 64 distinct colours")
            && out.stdout.contains("train/ants/imageNotFound.gif"),
        "{}",
        out.stdout
    );
}
