//! Terminal output for the `graft` binary: progress bars (indicatif, drawn only on a terminal),
//! information lines and per-epoch lines on stderr, all silenced by `--quiet`.

use std::sync::Mutex;

use graft_runtime::artifact::EpochRecord;
use graft_runtime::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pipeline::Reporter;

/// Draws progress and prints messages on stderr.
pub struct TerminalUi {
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl TerminalUi {
    /// A UI that prints nothing when `quiet`.
    pub fn new(quiet: bool) -> TerminalUi {
        TerminalUi {
            quiet,
            bar: Mutex::new(None),
        }
    }

    fn println(&self, text: &str) {
        if self.quiet {
            return;
        }
        match self.bar.lock().expect("bar lock").as_ref() {
            Some(bar) => bar.suspend(|| graft_runtime::progress::note(format_args!("{text}"))),
            None => graft_runtime::progress::note(format_args!("{text}")),
        }
    }
}

impl Progress for TerminalUi {
    fn start(&self, what: &str, total: usize) {
        let target = if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>22} [{bar:30}] {pos}/{len} ({elapsed} elapsed, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        *self.bar.lock().expect("bar lock") = Some(bar);
    }

    fn advance(&self) {
        if let Some(bar) = self.bar.lock().expect("bar lock").as_ref() {
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("bar lock").take() {
            bar.finish_and_clear();
        }
    }

    fn cancelled(&self) -> bool {
        crate::interrupt::requested()
    }
}

impl Reporter for TerminalUi {
    fn message(&self, text: &str) {
        self.println(text);
    }

    fn epoch(&self, r: &EpochRecord) {
        self.println(&format!(
            "epoch {:>4}  train loss {:.4} acc {:.4}  selection loss {:.4} acc {:.4}",
            r.epoch, r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy
        ));
    }
}
