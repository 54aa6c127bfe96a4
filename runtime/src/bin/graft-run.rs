//! `graft-run`: the edge runtime's command line. Classifies images with a graft artifact.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use graft_runtime::bench::BenchArgs;
use graft_runtime::commands::{self, EvalArgs, InspectArgs, NoProgress, Outcome, PredictArgs};

/// Run a graft artifact: top-k labels for images, accuracy on a labelled folder, or what is
/// inside the file.
///
/// Exit codes: 0 success, 1 bad input (unreadable or corrupt files, some images skipped),
/// 2 internal error.
#[derive(Parser)]
#[command(
    name = "graft-run",
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  graft-run model.graft bee.jpg ant.png\n  graft-run model.graft photos/ --json\n  graft-run eval model.graft data/val\n  graft-run inspect model.graft\n  graft-run bench model.graft --threads 2 --json"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    predict: Option<PredictArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Top-k labels for images (the default when no command is named).
    Predict(PredictArgs),
    /// Accuracy, per-class precision/recall and confusion matrix on labelled images.
    Eval(EvalArgs),
    /// Show what an artifact contains.
    Inspect(InspectArgs),
    /// Load time, latency percentiles, throughput and memory of an artifact on this machine.
    Bench(BenchArgs),
}

/// Keeps freed memory in the process (glibc): tract allocates every tensor of a run afresh, and
/// by default glibc serves the large ones (the 4.8 MB activations of Lite0's first blocks) with
/// fresh `mmap`s or trims them back to the kernel when freed, so each inference paid about 300
/// page faults (measured with `perf stat`; 2-5 % of the f32 latency, EPYC-VNNI). With these
/// thresholds they come from the heap, which stays at its peak size.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let mut stdout = std::io::stdout().lock();
    let result = match (cli.command, cli.predict) {
        (Some(Command::Predict(args)), _) | (None, Some(args)) => {
            commands::predict(&args, &mut stdout, &NoProgress)
        }
        (Some(Command::Eval(args)), _) => commands::eval(&args, &mut stdout, &NoProgress),
        (Some(Command::Inspect(args)), _) => commands::inspect(&args, &mut stdout),
        (Some(Command::Bench(args)), _) => graft_runtime::bench::bench(&args, &mut stdout),
        (None, None) => {
            graft_runtime::progress::note(format_args!(
                "error: name an artifact and images; see graft-run --help"
            ));
            return ExitCode::from(1);
        }
    };
    match result {
        Ok(Outcome::Complete) => ExitCode::SUCCESS,
        Ok(Outcome::Partial) => ExitCode::from(1),
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            graft_runtime::progress::note(format_args!("error: {e}"));
            ExitCode::from(if e.is_user_error() { 1 } else { 2 })
        }
    }
}
