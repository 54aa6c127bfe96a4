//! Ctrl-C handling for the `graft` binary: the first SIGINT (or SIGTERM) asks the compiler to stop
//! at the next safe point, so it can save the features computed so far to the cache and leave no
//! temporary file; a second one exits at once. The library never reads this flag directly: it
//! asks its [`Progress`](graft_runtime::progress::Progress) whether it was cancelled, and the
//! terminal UI answers from here.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Exit status of an interrupted command (128 + SIGINT).
pub const EXIT_CODE: u8 = 130;

/// Installs the signal handler (once per process; later calls do nothing).
pub fn install_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_CODE as i32);
        }
        graft_runtime::progress::note(format_args!(
            "\ninterrupted: stopping at the next safe point (press Ctrl-C again to quit now)"
        ));
    });
}

/// Whether an interrupt was requested.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
