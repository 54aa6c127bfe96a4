//! ONNX external data: the weight files beside a large model, checked before tract reads them.
//!
//! tract opens every `location` an initializer names and reads `length` bytes from `offset`. A
//! location that is a FIFO blocks that read forever (and Ctrl-C with it), one that is a device
//! reads without end, and one edited after a compile would leave cached features computed with
//! the old weights. So before the import hands the model to tract, every location must be a
//! regular file inside the model's folder, within [`MAX_EXTERNAL_BYTES`], with the named range
//! inside it; and the files' contents join the backbone's identity (its SHA-256, the feature
//! cache key).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tract_onnx::pb;

use crate::error::{CompileError, Result};

/// Largest external-data file read (16 GiB: the weights of a 4-billion-parameter model).
pub const MAX_EXTERNAL_BYTES: u64 = 16 << 30;

/// The external-data files `proto` names, checked, in a stable order. `model` is the ONNX file
/// (locations are relative to its folder).
pub fn external_files(model: &Path, proto: &pb::ModelProto) -> Result<Vec<PathBuf>> {
    let invalid = |reason: String| CompileError::InvalidBackbone {
        path: model.to_path_buf(),
        reason,
    };
    let Some(graph) = proto.graph.as_ref() else {
        return Ok(Vec::new());
    };
    let dir = model.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for tensor in graph
        .initializer
        .iter()
        .filter(|t| !t.external_data.is_empty())
    {
        let entry = |key: &str| {
            tensor
                .external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let location = entry("location").ok_or_else(|| {
            invalid(format!(
                "initializer {:?} has external data without a location",
                tensor.name
            ))
        })?;
        let relative = Path::new(location);
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(invalid(format!(
                "initializer {:?}: external data location {location:?} must be a relative path inside the model's folder",
                tensor.name
            )));
        }
        let path = dir.join(relative);
        let size = graft_runtime::read::check_regular(&path, MAX_EXTERNAL_BYTES, "external data")?;
        let number = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        invalid(format!(
                            "initializer {:?}: external data {key} {v:?} is not a byte count",
                            tensor.name
                        ))
                    })
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        let end = match length {
            Some(length) => offset.checked_add(length),
            None => Some(size),
        };
        if offset > size || end.is_none_or(|end| end > size) {
            return Err(invalid(format!(
                "initializer {:?}: external data range from byte {offset} ({} bytes) lies outside {} ({size} bytes)",
                tensor.name,
                length.map_or("to the end".into(), |l| l.to_string()),
                path.display()
            )));
        }
        files.insert(path);
    }
    Ok(files.into_iter().collect())
}

/// Feeds the names and contents of `files` into `hasher`, streaming (bounded memory).
pub fn hash_files(files: &[PathBuf], hasher: &mut Sha256) -> Result<()> {
    for path in files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        let mut file = std::fs::File::open(path).map_err(|e| CompileError::io(path, e))?;
        std::io::copy(&mut file, hasher).map_err(|e| CompileError::io(path, e))?;
    }
    Ok(())
}
