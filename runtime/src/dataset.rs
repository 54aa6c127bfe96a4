//! Labelled image folders: `DIR/<class>/*`, `DIR/{train,val}/<class>/*` or
//! `DIR/{train,val,test}/<class>/*`.
//!
//! Class names are the sorted folder names of the training split. Files are matched by extension
//! (jpg, jpeg, png, gif, webp, any case); everything else is counted as ignored. Files are listed
//! in sorted order so every run sees the same sequence.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// File extensions treated as images.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "gif", "webp"];
/// Folder names recognised as the validation split, in order of preference.
/// A `test` folder is the validation split only when there is no other; beside one it is kept
/// apart as [`ImageFolder::test`].
pub const VAL_SPLIT_NAMES: [&str; 4] = ["val", "valid", "validation", "test"];

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Image file.
    pub path: PathBuf,
    /// Index into [`ImageFolder::classes`].
    pub label: usize,
}

/// A scanned image folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The folder that was scanned.
    pub root: PathBuf,
    /// Sorted class names.
    pub classes: Vec<String>,
    /// Training images (all images when there is no split).
    pub train: Vec<Sample>,
    /// Validation images, when the folder has a validation split.
    pub val: Option<Vec<Sample>>,
    /// Name of the validation split folder, when there is one.
    pub val_split: Option<String>,
    /// Test images, when the folder has a `test` split beside a validation split (a `test`
    /// split alone is the validation split).
    pub test: Option<Vec<Sample>>,
    /// Files skipped because their extension is not an image extension.
    pub ignored_files: usize,
}

impl ImageFolder {
    /// Every image of every split: training, then validation, then test.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.train
            .iter()
            .chain(self.val.iter().flatten())
            .chain(self.test.iter().flatten())
    }

    /// Scans `root`. With `train/` and one of [`VAL_SPLIT_NAMES`] inside, those are the splits;
    /// with `train/` alone, it is the training split (validation is held out of it); otherwise
    /// every sub-folder of `root` is a class.
    ///
    /// Errors: `root` unreadable, fewer than two classes, a class without images, or a
    /// validation class that has no training folder.
    pub fn scan(root: &Path) -> Result<ImageFolder> {
        let train_dir = root.join("train");
        let val_name = VAL_SPLIT_NAMES
            .iter()
            .find(|name| root.join(name).is_dir())
            .map(|s| s.to_string());
        let mut ignored_files = 0;
        if train_dir.is_dir() {
            if let Some(val_name) = val_name {
                let classes = class_dirs(&train_dir)?;
                check_class_count(&train_dir, &classes)?;
                let train = list_split(&train_dir, &classes, &mut ignored_files)?;
                let val_dir = root.join(&val_name);
                check_split_classes(&val_dir, &train_dir, &classes)?;
                let val = list_split(&val_dir, &classes, &mut ignored_files)?;
                let test_dir = root.join("test");
                let test = if val_name != "test" && test_dir.is_dir() {
                    check_split_classes(&test_dir, &train_dir, &classes)?;
                    Some(list_split(&test_dir, &classes, &mut ignored_files)?)
                } else {
                    None
                };
                return Ok(ImageFolder {
                    root: root.to_path_buf(),
                    classes,
                    train,
                    val: Some(val),
                    val_split: Some(val_name),
                    test,
                    ignored_files,
                });
            }
        }
        // `DIR/train/<class>` alone: the training split, validation held out of it.
        let class_root = if train_dir.is_dir() && class_dirs(root)? == ["train"] {
            train_dir
        } else {
            root.to_path_buf()
        };
        let classes = class_dirs(&class_root)?;
        check_class_count(&class_root, &classes)?;
        let train = list_split(&class_root, &classes, &mut ignored_files)?;
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes,
            train,
            val: None,
            val_split: None,
            test: None,
            ignored_files,
        })
    }

    /// The images to evaluate on: the validation split when there is one, else every image.
    pub fn evaluation_samples(&self) -> &[Sample] {
        self.val.as_deref().unwrap_or(&self.train)
    }

    /// Number of training images per class.
    pub fn train_counts(&self) -> Vec<usize> {
        counts(&self.train, self.classes.len())
    }
}

/// Number of samples per label.
pub fn counts(samples: &[Sample], classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for s in samples {
        counts[s.label] += 1;
    }
    counts
}

/// Every class folder of `split_dir` must be a training class.
fn check_split_classes(split_dir: &Path, train_dir: &Path, classes: &[String]) -> Result<()> {
    for c in class_dirs(split_dir)? {
        if !classes.contains(&c) {
            let split = split_dir
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            let what = if split == "test" {
                "test"
            } else {
                "validation"
            };
            return Err(Error::dataset(
                split_dir.join(&c),
                format!(
                    "{what} class {c:?} has no folder in {}",
                    train_dir.display()
                ),
            ));
        }
    }
    Ok(())
}

fn check_class_count(dir: &Path, classes: &[String]) -> Result<()> {
    match classes {
        [] => Err(Error::dataset(
            dir,
            "no class folders found: expected DIR/<class>/<image> or DIR/{train,val}/<class>/<image>",
        )),
        [only] => {
            // A wrapper folder (`--data parent` for `parent/data/train/...`) looks like one
            // class holding folders: say which --data was probably meant.
            let inner = dir.join(only);
            let hint = match class_dirs(&inner) {
                Ok(sub) if !sub.is_empty() => format!(
                    "; it holds folders ({}), so --data {} may be what was meant",
                    sub.join(", "),
                    inner.display()
                ),
                _ => String::new(),
            };
            Err(Error::dataset(
                dir,
                format!("found only one class ({only:?}): a classifier needs at least two{hint}"),
            ))
        }
        _ => Ok(()),
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

fn is_hidden(entry: &std::fs::DirEntry) -> bool {
    entry.file_name().to_string_lossy().starts_with('.')
}

/// Sorted names of the non-hidden sub-folders of `dir`.
fn class_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut classes = Vec::new();
    for entry in read_dir_sorted(dir)? {
        if is_hidden(&entry) || !entry.path().is_dir() {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|name| {
            Error::dataset(
                dir,
                format!("class folder name {name:?} is not valid UTF-8"),
            )
        })?;
        if let Some(reason) = crate::artifact::label_problem(&name) {
            return Err(Error::dataset(
                dir,
                format!("class folder name {name:?} {reason}; rename the folder"),
            ));
        }
        classes.push(name);
    }
    Ok(classes)
}

fn list_split(dir: &Path, classes: &[String], ignored: &mut usize) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let class_dir = dir.join(class);
        let before = samples.len();
        if class_dir.is_dir() {
            collect_images(&class_dir, label, &mut samples, ignored, 0)?;
        }
        if samples.len() == before {
            return Err(Error::dataset(
                &class_dir,
                format!("class {class:?} has no images (expected files ending in .jpg, .jpeg, .png, .gif or .webp)"),
            ));
        }
    }
    Ok(samples)
}

/// Collects image files below `dir`, descending into real sub-folders (not symbolic links, so a
/// link loop cannot trap the scan) up to a fixed depth.
fn collect_images(
    dir: &Path,
    label: usize,
    out: &mut Vec<Sample>,
    ignored: &mut usize,
    depth: usize,
) -> Result<()> {
    const MAX_DEPTH: usize = 8;
    for entry in read_dir_sorted(dir)? {
        if is_hidden(&entry) {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if file_type.is_dir() {
            if depth < MAX_DEPTH {
                collect_images(&path, label, out, ignored, depth + 1)?;
            }
        } else if has_image_extension(&path) {
            out.push(Sample { path, label });
        } else {
            *ignored += 1;
        }
    }
    Ok(())
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, rel: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn flat_layout_has_no_validation_split() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "b/2.jpg",
            "b/1.PNG",
            "a/x.jpeg",
            "a/notes.txt",
            "a/.hidden.jpg",
        ] {
            touch(dir.path(), f);
        }
        let folder = ImageFolder::scan(dir.path()).unwrap();
        assert_eq!(folder.classes, ["a", "b"]);
        assert!(folder.val.is_none());
        let names: Vec<_> = folder
            .train
            .iter()
            .map(|s| (s.path.file_name().unwrap().to_str().unwrap(), s.label))
            .collect();
        assert_eq!(names, [("x.jpeg", 0), ("1.PNG", 1), ("2.jpg", 1)]);
        assert_eq!(folder.ignored_files, 1);
    }

    #[test]
    fn train_folder_alone_is_the_training_split() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["train/a/1.jpg", "train/a/2.jpg", "train/b/3.jpg"] {
            touch(dir.path(), f);
        }
        let folder = ImageFolder::scan(dir.path()).unwrap();
        assert_eq!(folder.classes, ["a", "b"]);
        assert!(folder.val.is_none(), "validation is held out of train/");
        assert_eq!(folder.train.len(), 3);
        assert_eq!(folder.root, dir.path());
    }

    #[test]
    fn a_wrapper_folder_names_the_data_folder_meant() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["data/train/a/1.jpg", "data/val/a/2.jpg"] {
            touch(dir.path(), f);
        }
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: found only one class (\"data\"): a classifier needs at least two; it holds folders (train, val), so --data {} may be what was meant",
                dir.path().display(),
                dir.path().join("data").display()
            )
        );
    }

    #[test]
    fn split_layout_accepts_test_as_validation() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "train/a/1.jpg",
            "train/b/1.jpg",
            "test/a/2.jpg",
            "test/b/2.jpg",
        ] {
            touch(dir.path(), f);
        }
        let folder = ImageFolder::scan(dir.path()).unwrap();
        assert_eq!(folder.val_split.as_deref(), Some("test"));
        assert_eq!(folder.val.unwrap().len(), 2);
        assert!(folder.test.is_none());
    }

    #[test]
    fn train_val_test_layout_keeps_test_apart() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "train/a/1.jpg",
            "train/b/1.jpg",
            "val/a/2.jpg",
            "val/b/2.jpg",
            "test/a/3.jpg",
            "test/b/3.jpg",
            "test/b/4.jpg",
        ] {
            touch(dir.path(), f);
        }
        let folder = ImageFolder::scan(dir.path()).unwrap();
        assert_eq!(folder.val_split.as_deref(), Some("val"));
        assert_eq!(folder.val.unwrap().len(), 2);
        assert_eq!(folder.test.unwrap().len(), 3);
        touch(dir.path(), "test/c/5.jpg");
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(err.contains("test class \"c\" has no folder in"), "{err}");
    }

    #[test]
    fn empty_and_single_classes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "a/1.jpg");
        std::fs::create_dir(dir.path().join("b")).unwrap();
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("class \"b\" has no images (expected files ending in .jpg, .jpeg, .png, .gif or .webp)"), "{err}");
        std::fs::remove_dir(dir.path().join("b")).unwrap();
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(
            err.ends_with("found only one class (\"a\"): a classifier needs at least two"),
            "{err}"
        );
    }

    #[test]
    fn unknown_validation_class_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["train/a/1.jpg", "train/b/1.jpg", "val/c/1.jpg"] {
            touch(dir.path(), f);
        }
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("validation class \"c\" has no folder in"),
            "{err}"
        );
    }
}
