//! Weight storage: large f32 tensors of the graph's NNEF archive stored as f16 or int8 to make the
//! artifact smaller, and widened back to f32 before tract reads the graph, so inference runs at
//! f32 speed and precision from the widened values.
//!
//! A narrowed tensor replaces `NAME.dat` in the archive by `NAME.graft-f16` (the original 128-byte
//! NNEF header, then the values as little-endian f16) or `NAME.graft-i8` (the original header,
//! one f32 scale per row of the first axis, then the values as i8: `value = i8 * scale`,
//! symmetric; rows are the leading axes up to the first longer than 1, e.g. output channels).
//! Only f32 tensors of at least [`MIN_NARROWED`] values are narrowed; the int8 tensors of an int8
//! graph and small tensors (biases, scales) stay as they are, int8 storage leaves vectors
//! (biases) in f32, and so does a tensor whose int8 form
//! would be more than [`MAX_INT8_ERROR`] off (e.g. a trained head whose folded standardisation
//! gives a few features much larger weights than the rest).

use std::borrow::Cow;
use std::io::Read;

use half::f16;
use serde::{Deserialize, Serialize};

/// Tensors with fewer values than this stay f32.
pub const MIN_NARROWED: usize = 1024;

/// Largest relative error (L2 norm of the difference over L2 norm of the tensor) accepted for a
/// tensor stored as int8.
pub const MAX_INT8_ERROR: f32 = 0.01;

const HEADER: usize = 128;
const F16_SUFFIX: &str = ".graft-f16";
const I8_SUFFIX: &str = ".graft-i8";

/// How the artifact stores its large weight tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightStorage {
    /// As tract wrote them.
    #[default]
    F32,
    /// Half precision: half the size, ~3 significant digits.
    F16,
    /// Symmetric int8 with one scale per output channel (row): a quarter of the size.
    Int8,
}

impl WeightStorage {
    /// The spelling used by `--weights` and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            WeightStorage::F32 => "f32",
            WeightStorage::F16 => "f16",
            WeightStorage::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for WeightStorage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightStorage::F32),
            "f16" => Ok(WeightStorage::F16),
            "int8" => Ok(WeightStorage::Int8),
            _ => Err(format!(
                "unknown weight storage {s:?}: expected f32, f16 or int8"
            )),
        }
    }
}

/// One archive entry: its path and content.
struct Entry {
    path: String,
    data: Vec<u8>,
}

fn read_entries(archive: &[u8]) -> Result<Vec<Entry>, String> {
    let mut tar = tar::Archive::new(archive);
    let mut entries = Vec::new();
    for entry in tar.entries().map_err(|e| format!("graph archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("graph archive: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("graph archive entry name: {e}"))?
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::with_capacity(entry.size().min(archive.len() as u64) as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("graph archive entry {path:?}: {e}"))?;
        entries.push(Entry { path, data });
    }
    Ok(entries)
}

/// A tar archive with the fixed metadata tract's deterministic writer uses.
fn write_entries(entries: &[Entry]) -> Result<Vec<u8>, String> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(entry.data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(315_532_800);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &entry.path, &entry.data[..])
            .map_err(|e| format!("graph archive entry {:?}: {e}", entry.path))?;
    }
    builder
        .into_inner()
        .map_err(|e| format!("graph archive: {e}"))
}

fn field(header: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"))
}

/// Rows of the int8 scales: the product of the leading dimensions up to the first that is longer
/// than 1 (`[Co, Ci, kh, kw]` -> `Co`, `[1, 1, classes, features]` -> `classes`).
fn rows_of(header: &[u8], rank: usize) -> usize {
    let mut rows = 1usize;
    for i in 0..rank.saturating_sub(1) {
        let dim = field(header, 12 + 4 * i) as usize;
        rows = rows.saturating_mul(dim);
        if dim > 1 {
            break;
        }
    }
    rows
}

/// `(values, rows)` of an f32 NNEF tensor worth narrowing, or `None`.
fn narrowable(data: &[u8]) -> Option<(usize, usize)> {
    if data.len() < HEADER || data[..2] != [0x4e, 0xef] {
        return None;
    }
    let (bits, item_type) = (field(data, 44), u16::from_le_bytes([data[48], data[49]]));
    let rank = field(data, 8) as usize;
    if bits != 32 || item_type != 0 || rank == 0 || rank > 8 {
        return None;
    }
    let values = (data.len() - HEADER) / 4;
    let rows = rows_of(data, rank);
    (values >= MIN_NARROWED
        && rows > 0
        && values.is_multiple_of(rows)
        && field(data, 4) as usize == 4 * values)
        .then_some((values, rows))
}

/// `value / scale` rounded to the symmetric int8 range `[-127, 127]` (0 for a zero scale).
pub fn to_int8(value: f32, scale: f32) -> i8 {
    if scale > 0.0 {
        (value / scale).round().clamp(-127.0, 127.0) as i8
    } else {
        0
    }
}

/// The int8 scale of one row: the largest magnitude over 127, or a slightly smaller one when
/// clipping the few largest values costs less squared error than the coarser steps would.
fn row_scale(row: &[f32]) -> f32 {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let error = |scale: f32| -> f32 {
        row.iter()
            .map(|&v| (v - to_int8(v, scale) as f32 * scale).powi(2))
            .sum()
    };
    [1.0f32, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7]
        .iter()
        .map(|f| max * f / 127.0)
        .min_by(|a, b| error(*a).total_cmp(&error(*b)))
        .unwrap_or(0.0)
}

/// Rewrites the large f32 tensors of an NNEF tar archive in `storage` (see the module docs).
pub fn narrow(archive: &[u8], storage: WeightStorage) -> Result<Vec<u8>, String> {
    if storage == WeightStorage::F32 {
        return Ok(archive.to_vec());
    }
    let mut entries = read_entries(archive)?;
    for entry in &mut entries {
        let Some(stem) = entry.path.strip_suffix(".dat") else {
            continue;
        };
        let Some((values, rows)) = narrowable(&entry.data) else {
            continue;
        };
        let floats: Vec<f32> = entry.data[HEADER..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let mut data = entry.data[..HEADER].to_vec();
        let suffix = match storage {
            WeightStorage::F16 => {
                data.extend(floats.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()));
                F16_SUFFIX
            }
            // Biases are small and feed every output: they stay f32.
            WeightStorage::Int8 if field(&entry.data, 8) < 2 => continue,
            WeightStorage::Int8 => {
                let per_row = values / rows;
                let scales: Vec<f32> = floats.chunks(per_row).map(row_scale).collect();
                let quantized: Vec<i8> = floats
                    .chunks(per_row)
                    .zip(&scales)
                    .flat_map(|(row, &scale)| row.iter().map(move |&v| to_int8(v, scale)))
                    .collect();
                let (mut error, mut norm) = (0f64, 0f64);
                for (i, (&v, &q)) in floats.iter().zip(&quantized).enumerate() {
                    let back = q as f32 * scales[i / per_row];
                    error += ((v - back) as f64).powi(2);
                    norm += (v as f64).powi(2);
                }
                if error.sqrt() > MAX_INT8_ERROR as f64 * norm.sqrt() {
                    continue;
                }
                data.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
                data.extend(quantized.iter().map(|&q| q as u8));
                I8_SUFFIX
            }
            WeightStorage::F32 => unreachable!("returned above"),
        };
        entry.path = format!("{stem}{suffix}");
        entry.data = data;
    }
    write_entries(&entries)
}

/// The f32 `.dat` content of a narrowed entry.
fn widen_entry(path: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let bad = || format!("narrowed tensor {path:?} is damaged");
    if data.len() < HEADER || data[..2] != [0x4e, 0xef] {
        return Err(bad());
    }
    let rank = field(data, 8) as usize;
    if rank == 0 || rank > 8 {
        return Err(bad());
    }
    let values = (0..rank)
        .try_fold(1usize, |n, i| {
            n.checked_mul(field(data, 12 + 4 * i) as usize)
        })
        .ok_or_else(bad)?;
    if values == 0 || field(data, 4) as usize != values.checked_mul(4).ok_or_else(bad)? {
        return Err(bad());
    }
    let body = &data[HEADER..];
    let rows = rows_of(data, rank);
    let expected = if path.ends_with(F16_SUFFIX) {
        Some(2 * values)
    } else {
        (rows > 0 && values.is_multiple_of(rows)).then(|| 4 * rows + values)
    };
    if expected != Some(body.len()) {
        return Err(bad());
    }
    // Sizes are now bounded by the bytes present.
    let mut out = Vec::with_capacity(HEADER + 4 * values);
    out.extend_from_slice(&data[..HEADER]);
    if path.ends_with(F16_SUFFIX) {
        out.extend(
            body.chunks_exact(2)
                .flat_map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes()),
        );
    } else {
        let (scales, ints) = body.split_at(4 * rows);
        let per_row = values / rows;
        for (row, scale) in ints.chunks(per_row).zip(scales.chunks_exact(4)) {
            let scale = f32::from_le_bytes(scale.try_into().expect("4 bytes"));
            out.extend(
                row.iter()
                    .flat_map(|&q| (q as i8 as f32 * scale).to_le_bytes()),
            );
        }
    }
    Ok(out)
}

/// Whether any entry name is a narrowed tensor: reads the tar headers only, seeking over the data.
fn has_narrowed_entries(archive: &[u8]) -> Result<bool, String> {
    let mut tar = tar::Archive::new(std::io::Cursor::new(archive));
    for entry in tar
        .entries_with_seek()
        .map_err(|e| format!("graph archive: {e}"))?
    {
        let entry = entry.map_err(|e| format!("graph archive: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("graph archive entry name: {e}"))?;
        let path = path.to_string_lossy();
        if path.ends_with(F16_SUFFIX) || path.ends_with(I8_SUFFIX) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The archive as tract must read it: narrowed tensors widened back to f32 `.dat` files. Borrows
/// the input when nothing is narrowed (the memory-mapped artifact is then used in place).
pub fn widen(archive: &[u8]) -> Result<Cow<'_, [u8]>, String> {
    if !has_narrowed_entries(archive)? {
        return Ok(Cow::Borrowed(archive));
    }
    let widened = read_entries(archive)?
        .into_iter()
        .map(|entry| {
            let stem = entry
                .path
                .strip_suffix(F16_SUFFIX)
                .or_else(|| entry.path.strip_suffix(I8_SUFFIX));
            match stem {
                Some(stem) => Ok(Entry {
                    path: format!("{stem}.dat"),
                    data: widen_entry(&entry.path, &entry.data)?,
                }),
                None => Ok(entry),
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    write_entries(&widened).map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(rows: u32, cols: u32, values: &[f32]) -> Vec<u8> {
        let mut data = vec![0u8; HEADER];
        data[..2].copy_from_slice(&[0x4e, 0xef]);
        data[4..8].copy_from_slice(&(4 * values.len() as u32).to_le_bytes());
        data[8..12].copy_from_slice(&2u32.to_le_bytes());
        data[12..16].copy_from_slice(&rows.to_le_bytes());
        data[16..20].copy_from_slice(&cols.to_le_bytes());
        data[44..48].copy_from_slice(&32u32.to_le_bytes());
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        data
    }

    fn archive(values: &[f32], rows: u32) -> Vec<u8> {
        write_entries(&[
            Entry {
                path: "graph.nnef".into(),
                data: b"version 1.0;".to_vec(),
            },
            Entry {
                path: "w.dat".into(),
                data: tensor(rows, values.len() as u32 / rows, values),
            },
            Entry {
                path: "b.dat".into(),
                data: tensor(1, 3, &[1.0, 2.0, 3.0]),
            },
        ])
        .unwrap()
    }

    fn values_of(archive: &[u8], path: &str) -> Vec<f32> {
        let entries = read_entries(archive).unwrap();
        let entry = entries.iter().find(|e| e.path == path).unwrap();
        entry.data[HEADER..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn narrowed_weights_widen_back_within_their_precision() {
        let values: Vec<f32> = (0..2048)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let original = archive(&values, 16);
        for (storage, ratio, tolerance) in [
            (WeightStorage::F16, 0.55, 4e-3),
            (WeightStorage::Int8, 0.32, 7.2 / 127.0 / 2.0 + 1e-6),
        ] {
            let narrowed = narrow(&original, storage).unwrap();
            assert!(
                (narrowed.len() as f64) < ratio * original.len() as f64 + 4096.0,
                "{storage:?}: {} vs {}",
                narrowed.len(),
                original.len()
            );
            let widened = widen(&narrowed).unwrap();
            assert!(matches!(widened, Cow::Owned(_)));
            let back = values_of(&widened, "w.dat");
            assert_eq!(back.len(), values.len());
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tolerance, "{storage:?}: {a} vs {b}");
            }
            assert_eq!(
                values_of(&widened, "b.dat"),
                [1.0, 2.0, 3.0],
                "small tensors stay"
            );
        }
    }

    #[test]
    fn f32_archives_are_used_in_place_and_damage_is_named() {
        let original = archive(&vec![0.5; 1024], 4);
        assert!(matches!(widen(&original).unwrap(), Cow::Borrowed(_)));
        let mut entries = read_entries(&narrow(&original, WeightStorage::Int8).unwrap()).unwrap();
        let w = entries.iter_mut().find(|e| e.path == "w.graft-i8").unwrap();
        w.data.truncate(w.data.len() - 1);
        let damaged = write_entries(&entries).unwrap();
        assert_eq!(
            widen(&damaged).unwrap_err(),
            "narrowed tensor \"w.graft-i8\" is damaged"
        );
    }
}
