//! Progress reporting hooks for long loops; the runtime itself never draws anything.

/// Receives progress of long loops; the CLI draws bars with it, libraries pass [`NoProgress`].
pub trait Progress: Sync {
    /// A loop over `total` items named `what` begins.
    fn start(&self, what: &str, total: usize);
    /// One more item is done.
    fn advance(&self);
    /// The loop is over.
    fn finish(&self);
    /// Whether the user asked to stop; loops skip their remaining items when it is true.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: usize) {}
    fn advance(&self) {}
    fn finish(&self) {}
}

/// `n` and `noun`, plural unless `n` is 1: `count(1, "image")` is "1 image", `count(3, "val
/// image")` is "3 val images".
pub fn count<N: Copy + std::fmt::Display + TryInto<u64>>(n: N, noun: &str) -> String {
    let one = n.try_into().ok() == Some(1);
    format!("{n} {noun}{}", if one { "" } else { "s" })
}

/// Writes `args` and a newline to stderr, ignoring errors: a closed stderr (`graft ... 2>&1 |
/// head -1`) must not stop work whose result goes to stdout or a file, and `eprintln!` would
/// panic there.
pub fn note(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_fmt(args)
        .and_then(|()| stderr.write_all(b"\n"));
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_are_singular_for_one_only() {
        assert_eq!(count(1usize, "image"), "1 image");
        assert_eq!(count(0usize, "image"), "0 images");
        assert_eq!(count(3u64, "val image"), "3 val images");
        assert_eq!(count(1u32, "thread"), "1 thread");
    }
}
