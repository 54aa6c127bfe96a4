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
