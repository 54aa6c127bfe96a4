//! `graft inspect-backbone` lists where Lite0 can be cut, and a compile at an earlier cut point
//! (a block end, 192 channels at 7x7) trains and runs end to end.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;

fn graft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_graft"))
}

#[derive(serde::Deserialize)]
struct Listing {
    default_cut: String,
    cut_points: Vec<Point>,
}

#[derive(serde::Deserialize)]
struct Point {
    tensor: String,
    op: String,
    shape: Vec<usize>,
}

#[test]
fn lite0_cut_points_are_listed_and_an_earlier_cut_compiles() {
    let out = run(
        graft(),
        &[
            OsStr::new("inspect-backbone"),
            lite0().as_os_str(),
            OsStr::new("--json"),
        ],
    )
    .expect_code(0);
    let listing: Listing = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(listing.default_cut, "features");
    assert_eq!(listing.cut_points.len(), 26);
    let first = &listing.cut_points[0];
    assert_eq!(first.shape, [1, 32, 112, 112]);
    let shape_of = |tensor: &str| {
        listing
            .cut_points
            .iter()
            .find(|p| p.tensor == tensor)
            .map(|p| (p.op.clone(), p.shape.clone()))
    };
    assert_eq!(
        shape_of("features"),
        Some(("Flatten".into(), vec![1, 1280]))
    );
    let block = "/_blocks.14/Add_output_0";
    assert_eq!(shape_of(block), Some(("Add".into(), vec![1, 192, 7, 7])));
    let text = run(
        graft(),
        &[OsStr::new("inspect-backbone"), lite0().as_os_str()],
    )
    .expect_code(0);
    assert!(text.stdout.contains("features") && text.stdout.contains("<- default cut"));

    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("early.graft");
    let compile = TestCommand::compile(graft(), &lite0(), &hymenoptera_mini(), &artifact)
        .args(["--cut", block, "--normalize", "tf", "--no-cache"])
        .run()
        .expect_code(0);
    let said = format!("{}{}", compile.stdout, compile.stderr);
    assert!(
        said.contains("features [1, 192, 7, 7] (global average pooled)"),
        "{said}"
    );
    let model = graft_runtime::Model::load(&artifact).unwrap();
    assert_eq!(model.manifest().backbone.feature_shape, [1, 192, 7, 7]);
    let accuracy = model.manifest().metrics.as_ref().unwrap().val_accuracy;
    assert!(
        accuracy >= 0.75,
        "validation accuracy {accuracy} at {block}"
    );
}
