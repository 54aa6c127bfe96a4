//! Paths in output: always written, never a panic.
//!
//! A Unix path is bytes, not UTF-8; serde refuses to serialize one that is not valid UTF-8, so a
//! photo named `a\xff.jpg` would abort `--json` output. Paths in JSON go through these helpers
//! (`#[serde(serialize_with = ...)]`), which write them lossily (U+FFFD for each invalid byte),
//! as `Path::display` does in text output.

use std::path::{Path, PathBuf};

use serde::ser::{SerializeSeq, Serializer};

/// `path` as a string, invalid UTF-8 replaced by U+FFFD.
pub fn lossy(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Serializes a path lossily.
pub fn serialize<P: AsRef<Path>, S: Serializer>(path: &P, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.as_ref().to_string_lossy())
}

/// Serializes a list of paths lossily.
pub fn serialize_all<S: Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(paths.len()))?;
    for p in paths {
        seq.serialize_element(&p.to_string_lossy())?;
    }
    seq.end()
}

/// Serializes `(path, message)` pairs lossily in their path.
pub fn serialize_pairs<S: Serializer>(
    pairs: &[(PathBuf, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(pairs.len()))?;
    for (p, m) in pairs {
        seq.serialize_element(&(p.to_string_lossy(), m))?;
    }
    seq.end()
}

#[cfg(all(test, unix))]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[derive(serde::Serialize)]
    struct Doc {
        #[serde(serialize_with = "serialize")]
        one: PathBuf,
        #[serde(serialize_with = "serialize_all")]
        many: Vec<PathBuf>,
        #[serde(serialize_with = "serialize_pairs")]
        pairs: Vec<(PathBuf, String)>,
    }

    #[test]
    fn invalid_utf8_is_replaced_not_refused() {
        let odd = PathBuf::from(OsStr::from_bytes(b"a\xff.jpg"));
        assert!(
            serde_json::to_string(&odd).is_err(),
            "serde's own impl refuses it"
        );
        let doc = Doc {
            one: odd.clone(),
            many: vec![odd.clone()],
            pairs: vec![(odd, "bad".into())],
        };
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r#"{"one":"a\u{fffd}.jpg","many":["a\u{fffd}.jpg"],"pairs":[["a\u{fffd}.jpg","bad"]]}"#
                .replace("\\u{fffd}", "\u{fffd}")
        );
    }
}
