//! The C ABI: `runtime/examples/c/classify.c` is compiled against `runtime/include/graft.h` and
//! linked both with `libgraft_runtime.so` and with `libgraft_runtime.a`, run on the fixture
//! artifact (loaded from a memory buffer), and must print what `graft-run` and the Rust API give.

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

/// `cargo build` puts the libraries beside the binaries; `cargo test` leaves them in `deps/`.
fn built(name: &str) -> PathBuf {
    let candidates = [target_dir(), target_dir().join("deps")].map(|d| d.join(name));
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

fn library() -> PathBuf {
    built("libgraft_runtime.so")
}

fn static_library() -> PathBuf {
    built("libgraft_runtime.a")
}

/// The fixture photos compiled into `dir/bees.graft` (Lite0, linear head, f32).
fn fixture_artifact(dir: &Path) -> PathBuf {
    let artifact = dir.join("bees.graft");
    let options = CompileOptions {
        data: Some(hymenoptera_mini()),
        normalization: Some(Normalization::tf()),
        verify: false,
        ..CompileOptions::new(lite0(), &artifact)
    };
    compile(&options, &NoProgress).unwrap();
    artifact
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
    assert_eq!(declared.len(), 14);
}

#[test]
fn c_example_prints_what_graft_run_prints() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = fixture_artifact(dir.path());

    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/examples/c/classify.c");
    let build = |exe: &Path, link: &[std::ffi::OsString]| {
        let cc = Command::new("cc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
            .arg(header().parent().unwrap())
            .arg(&source)
            .args(link)
            .arg("-o")
            .arg(exe)
            .output()
            .expect("a C compiler (cc) is needed for this test");
        assert!(
            cc.status.success(),
            "{}",
            String::from_utf8_lossy(&cc.stderr)
        );
    };
    let exe = dir.path().join("classify");
    build(
        &exe,
        &[
            library().into(),
            format!("-Wl,-rpath,{}", library().parent().unwrap().display()).into(),
        ],
    );
    // Statically linked: no libgraft_runtime.so needed at run time.
    let static_exe = dir.path().join("classify-static");
    let mut link: Vec<std::ffi::OsString> = vec![static_library().into()];
    link.extend(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s"].map(Into::into));
    build(&static_exe, &link);
    let ldd = Command::new("ldd").arg(&static_exe).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("graft_runtime"),
        "{}",
        String::from_utf8_lossy(&ldd.stdout)
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
    let c_static = Command::new(&static_exe)
        .arg(&artifact)
        .args(&images)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&c_static.stdout), c_out);
    let graft_run = target_dir().join("graft-run");
    let rust = Command::new(graft_run)
        .arg(&artifact)
        .args(&images)
        .output()
        .unwrap();
    let rust_out = String::from_utf8_lossy(&rust.stdout).into_owned();
    let (file_lines, raw_lines) = c_out.split_once("gradient: ").unwrap();
    assert_eq!(file_lines, rust_out);

    // The raw-buffer path (BGRA, padded rows) gives what the Rust API gives for the same RGB
    // picture: top class, logits, and the input size.
    let picture = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(4 * x) as u8, (5 * y) as u8, (2 * (x + y)) as u8])
    });
    let model = graft_runtime::Model::load(&artifact).unwrap();
    let result = model
        .classify(&image::DynamicImage::ImageRgb8(picture))
        .unwrap();
    let top = &result.top_k(1, model.labels())[0];
    let logits: Vec<String> = result.logits.iter().map(|l| format!(" {l:.4}")).collect();
    let [height, width] = model.manifest().preprocessing.crop;
    assert_eq!(
        raw_lines,
        format!(
            "{} {:.3}\nlogits:{}\ninput: {width}x{height}\n",
            top.label,
            top.probability,
            logits.concat()
        )
    );

    // The README's "From C" example, as printed there, linked statically.
    let readme = std::fs::read_to_string(fixtures().join("../README.md")).unwrap();
    let block = readme
        .split("<!-- c-example -->")
        .nth(1)
        .and_then(|b| b.split("<!-- /c-example -->").next())
        .expect("README has the c-example block");
    let code = block
        .split("```c\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let readme_source = dir.path().join("classify_one.c");
    std::fs::write(&readme_source, code).unwrap();
    let readme_exe = dir.path().join("classify_one");
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(header().parent().unwrap())
        .arg(&readme_source)
        .args(&link)
        .arg("-o")
        .arg(&readme_exe)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let one = Command::new(&readme_exe)
        .arg(&artifact)
        .arg(&images[1])
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let bee = model.classify_path(&images[1]).unwrap();
    let top = &bee.top_k(1, model.labels())[0];
    assert_eq!(
        String::from_utf8_lossy(&one.stdout),
        format!("{} {:.3}\n", top.label, top.probability)
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
        "error: (memory buffer): not a graft artifact (missing the GRAFTART magic bytes)"
    );
}

/// Every new C function on a real model, called as C calls it: buffer loading, the input size,
/// logits of a file and of a gray buffer, and their NULL and wrong-size arguments.
#[test]
fn c_functions_on_a_real_model() {
    use graft_runtime::capi::*;
    use std::ffi::{CStr, CString};

    let dir = tempfile::tempdir().unwrap();
    let artifact = fixture_artifact(dir.path());
    let rust = graft_runtime::Model::load(&artifact).unwrap();
    let photo = hymenoptera_mini().join("val/bees/1181173278_23c36fac71.jpg");
    let expected = rust.classify_path(&photo).unwrap();
    let error = || {
        // SAFETY: graft_last_error returns a valid C string.
        unsafe { CStr::from_ptr(graft_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    let bytes = std::fs::read(&artifact).unwrap();
    // SAFETY: the pointers below are valid for the sizes passed, or NULL where the test says so.
    unsafe {
        let model = graft_model_load_buffer(bytes.as_ptr(), bytes.len());
        assert!(!model.is_null(), "{}", error());
        let truncated = graft_model_load_buffer(bytes.as_ptr(), bytes.len() - 1);
        assert!(truncated.is_null());
        assert!(
            error().starts_with("(memory buffer): artifact is"),
            "{}",
            error()
        );

        let (mut width, mut height) = (0u32, 0u32);
        assert_eq!(graft_model_input_size(model, &mut width, &mut height), 0);
        assert_eq!([height, width], rust.manifest().preprocessing.crop);
        assert_eq!(
            graft_model_input_size(model, std::ptr::null_mut(), &mut height),
            -1
        );
        assert_eq!(error(), "graft_model_input_size: width or height is NULL");

        let path = CString::new(photo.to_str().unwrap()).unwrap();
        let mut logits = [0f32; 2];
        assert_eq!(
            graft_logits_file(model, path.as_ptr(), logits.as_mut_ptr(), 2),
            2
        );
        assert_eq!(logits.to_vec(), expected.logits);
        assert_eq!(
            graft_logits_file(model, path.as_ptr(), logits.as_mut_ptr(), 1),
            -1
        );
        assert_eq!(
            error(),
            "graft_logits_file: out holds 1 floats, the model has 2 classes"
        );
        assert_eq!(
            graft_logits_file(model, std::ptr::null(), logits.as_mut_ptr(), 2),
            -1
        );
        assert_eq!(error(), "graft_logits_file: path is NULL");

        // A gray buffer answers as the RGB image with the gray value in every channel.
        let gray: Vec<u8> = (0..40 * 30).map(|i| (i % 251) as u8).collect();
        let rgb =
            image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([gray[(y * 40 + x) as usize]; 3]));
        let from_rgb = rust.classify(&image::DynamicImage::ImageRgb8(rgb)).unwrap();
        let format = GraftPixelFormat::Gray8 as u32;
        let n = graft_logits_pixels(
            model,
            gray.as_ptr(),
            40,
            30,
            40,
            format,
            logits.as_mut_ptr(),
            2,
        );
        assert_eq!((n, logits.to_vec()), (2, from_rgb.logits.clone()));
        let mut top = [GraftLabelScore::default(); 2];
        let n = graft_classify_pixels(
            model,
            gray.as_ptr(),
            40,
            30,
            40,
            format,
            top.as_mut_ptr(),
            2,
        );
        assert_eq!(n, 2);
        assert_eq!(top[0].index as usize, from_rgb.top1());
        // Wrong sizes: a stride shorter than a row, an unknown format, k = 0.
        let n = graft_classify_pixels(
            model,
            gray.as_ptr(),
            40,
            30,
            39,
            format,
            top.as_mut_ptr(),
            2,
        );
        assert_eq!(n, -1);
        assert_eq!(
            error(),
            "graft_classify_pixels: stride 39 is less than a row of 40 Gray8 pixels (40 bytes)"
        );
        let n = graft_classify_pixels(model, gray.as_ptr(), 40, 30, 40, 7, top.as_mut_ptr(), 2);
        assert_eq!(
            (n, error().as_str()),
            (-1, "graft_classify_pixels: unknown pixel format 7")
        );
        let n = graft_classify_pixels(
            model,
            gray.as_ptr(),
            40,
            30,
            40,
            format,
            top.as_mut_ptr(),
            0,
        );
        assert_eq!(
            (n, error().as_str()),
            (
                -1,
                "graft_classify_pixels: the output array is NULL or k is 0"
            )
        );
        graft_model_free(model);
    }
}
