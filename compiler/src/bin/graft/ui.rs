//! Terminal output for the `graft` binary, on stderr: progress bars (indicatif, drawn only on a
//! terminal) and information lines by default, nothing with `-q`, a line per pipeline stage with
//! its duration and counts with `-v` ([`LogLines`]), and a line per epoch with `-vv`.

use std::sync::Mutex;

use graft_runtime::artifact::EpochRecord;
use graft_runtime::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use graft_compiler::pipeline::Reporter;

/// How much the binary prints on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// `-q`: results and errors only.
    Quiet,
    /// Progress bars and one line per result of a stage.
    Normal,
    /// `-v`: also a log line per pipeline stage, with its duration and counts.
    Stages,
    /// `-vv`: also a line per training epoch.
    Epochs,
}

impl Verbosity {
    /// From the `-q` flag and the number of `-v`s.
    pub fn from_flags(quiet: bool, verbose: u8) -> Verbosity {
        match (quiet, verbose) {
            (true, _) => Verbosity::Quiet,
            (false, 0) => Verbosity::Normal,
            (false, 1) => Verbosity::Stages,
            (false, _) => Verbosity::Epochs,
        }
    }

    /// Whether nothing but results and errors is printed.
    pub fn quiet(self) -> bool {
        self == Verbosity::Quiet
    }
}

/// Draws progress and prints messages on stderr.
pub struct TerminalUi {
    verbosity: Verbosity,
    bar: Mutex<Option<ProgressBar>>,
}

impl TerminalUi {
    /// A UI that prints what `verbosity` asks for.
    pub fn new(verbosity: Verbosity) -> TerminalUi {
        TerminalUi {
            verbosity,
            bar: Mutex::new(None),
        }
    }

    fn println(&self, text: &str) {
        if self.verbosity.quiet() {
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
        let target = if self.verbosity.quiet() {
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
        if self.verbosity < Verbosity::Epochs {
            return;
        }
        self.println(&format!(
            "epoch {:>4}  train loss {:.4} acc {:.4}  selection loss {:.4} acc {:.4}",
            r.epoch, r.train_loss, r.train_accuracy, r.val_loss, r.val_accuracy
        ));
    }
}

/// The `-v` log's line format: `stage     import 0.33 s` for a finished pipeline stage
/// ([`graft_compiler::pipeline::STAGE_LOG`]), `log       features extracted images=72 ...` for other
/// events; no timestamps, levels or module paths.
pub struct LogLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LogLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let label = if event.metadata().target() == graft_compiler::pipeline::STAGE_LOG {
            "stage"
        } else {
            "log"
        };
        write!(writer, "{label:<9} ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
