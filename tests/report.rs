//! `--report DIR`: a real compile (Lite0 + the fixture ant/bee photos) writes an offline HTML page
//! and metrics.json whose numbers equal what the compiler printed; `graft eval --report` on
//! deliberately mislabelled photos shows every one of them in the misclassified grid. Both
//! pages render in headless Chromium without console errors.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

#[derive(serde::Deserialize)]
struct Metrics {
    images: u64,
    accuracy: f32,
    confusion: Vec<Vec<u64>>,
    head_history: Vec<serde_json::Value>,
    latency: Option<serde_json::Value>,
    mistakes: Vec<Mistake>,
}

#[derive(serde::Deserialize)]
struct Mistake {
    truth: String,
    predicted: String,
    probability: f32,
}

fn read_metrics(dir: &Path) -> Metrics {
    serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap()
}

/// The `<svg>...</svg>` elements of a page.
fn svgs(html: &str) -> Vec<&str> {
    html.match_indices("<svg")
        .map(|(start, _)| {
            let end = html[start..].find("</svg>").expect("svg closed") + start;
            &html[start..end]
        })
        .collect()
}

#[test]
fn compile_and_eval_reports_show_the_printed_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("bees.graft");
    let report = dir.path().join("report");
    let compile = |extra: &[&OsStr]| {
        TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &artifact)
            .args(extra)
            .arg("--report")
            .arg(&report)
            .run()
    };
    let compiled = compile(&[OsStr::new("--no-cache")]).expect_code(0);
    let printed = compiled
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("validation accuracy "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the compiler prints the validation accuracy")
        .to_string();
    assert!(compiled.stderr.contains(&format!(
        "report    {}",
        report.join("index.html").display()
    )));
    let metrics = read_metrics(&report);
    assert_eq!(format!("{:.4}", metrics.accuracy), printed);
    assert_eq!(metrics.images, 24);
    assert_eq!(metrics.confusion.iter().flatten().sum::<u64>(), 24);
    assert!(metrics.latency.is_some());
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(
        html.contains(&format!("<td>{printed} on 24 images")),
        "the page shows the printed accuracy"
    );
    assert!(
        !html.contains("src=\"http") && !html.contains("href=") && !html.contains("<script"),
        "nothing to fetch, nothing to run"
    );
    let charts = svgs(&html);
    assert_eq!(
        charts.len(),
        4,
        "head loss, head accuracy, confusion, per-class"
    );
    let epochs = metrics.head_history.len();
    for chart in &charts[..2] {
        assert_eq!(
            chart.matches("<circle").count(),
            2 * epochs,
            "train and validation points for each of the {epochs} epochs"
        );
    }
    for (count, cell) in metrics.confusion.iter().flatten().zip(
        charts[2]
            .split("</title></rect><text")
            .skip(1)
            .map(|rest| rest.split('>').nth(1).unwrap().split('<').next().unwrap()),
    ) {
        assert_eq!(cell, count.to_string(), "heat map cells show the counts");
    }
    assert_eq!(charts[3].matches("<rect x=").count(), 2 * 2 + 2);
    assert_eq!(
        charts[3].matches("class=\"value\"").count(),
        2 * 2,
        "precision and recall bars carry their values"
    );
    for chart in &charts[..2] {
        // The kept epoch is marked on the validation curve (one red point, a tooltip saying so),
        // and the axis says epochs: the head is linear.
        assert_eq!(chart.matches("#d62728").count(), 1, "{chart}");
        assert!(chart.contains("kept: epoch "), "{chart}");
        assert!(!chart.contains("L2 path"), "{chart}");
    }

    // The validation photos with their labels swapped: every photo the model gets right is a
    // mistake here, shown with its image.
    let swapped = dir.path().join("swapped");
    for (from, to) in [("ants", "bees"), ("bees", "ants")] {
        std::fs::create_dir_all(swapped.join(to)).unwrap();
        for entry in std::fs::read_dir(hymenoptera_mini().join("val").join(from)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, swapped.join(to).join(path.file_name().unwrap())).unwrap();
        }
    }
    let eval_report = dir.path().join("eval-report");
    let evaluated = run(
        graft(),
        &[
            OsStr::new("eval"),
            artifact.as_os_str(),
            swapped.as_os_str(),
            OsStr::new("--report"),
            eval_report.as_os_str(),
        ],
    )
    .expect_code(0);
    let metrics = read_metrics(&eval_report);
    assert!(evaluated
        .stdout
        .starts_with(&format!("accuracy {:.4} on 24 images", metrics.accuracy)));
    let wrong = ((1.0 - metrics.accuracy) * 24.0).round() as usize;
    assert!(wrong >= 20, "the photos are recognised as what they show");
    assert_eq!(metrics.mistakes.len(), wrong);
    assert!(metrics.mistakes.iter().all(|m| m.truth != m.predicted));
    assert!(
        metrics
            .mistakes
            .windows(2)
            .all(|w| w[0].probability >= w[1].probability),
        "the most confident mistakes first"
    );
    let html = std::fs::read_to_string(eval_report.join("index.html")).unwrap();
    assert_eq!(html.matches("<figure").count(), wrong);
    assert_eq!(html.matches("src=\"data:image/jpeg;base64,").count(), wrong);

    for page in [report.join("index.html"), eval_report.join("index.html")] {
        render_in_chromium(&page, &dir.path().join("screenshot.png"));
    }

    let conflict = compile(&[OsStr::new("--no-verify")]).expect_code(1);
    assert!(
        conflict
            .stderr
            .contains("the argument '--no-verify' cannot be used with '--report <DIR>'"),
        "{}",
        conflict.stderr
    );
}

/// Debian's Chromium, or `None` (then the rendering check is skipped with a note, unless
/// `GRAFT_REQUIRE_BROWSER` is set, as `.ci/run` does after installing it).
fn chromium() -> Option<&'static str> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("GRAFT_REQUIRE_BROWSER").is_none(),
            "GRAFT_REQUIRE_BROWSER is set but Chromium is not installed (apt-get install chromium)"
        );
        eprintln!("note: Chromium not installed; the report was not rendered in a browser");
    }
    found
}

/// Renders `page` headless, takes a screenshot, and checks that the page logged nothing to the
/// console and that the screenshot shows the charts (many non-white pixels).
fn render_in_chromium(page: &Path, screenshot: &Path) {
    let Some(chromium) = chromium() else {
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1360,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .expect("chromium runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed:\n{log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let shot = image::open(screenshot).expect("a PNG screenshot").to_rgb8();
    let coloured = shot
        .pixels()
        .filter(|p| p.0.iter().any(|&c| c < 200))
        .count();
    assert!(
        coloured * 50 > (shot.width() * shot.height()) as usize,
        "the screenshot is nearly blank ({coloured} non-white pixels)"
    );
}
