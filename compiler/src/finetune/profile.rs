//! Where a training step's time goes, by operator: set `GRAFT_TRAINING_PROFILE=1` and every
//! fine-tuning compile prints, after training, the seconds spent in each of graft's fused
//! kernels (forward and backward, by kind), in the rest of the forward and backward passes
//! (candle's own ops and its gradient bookkeeping) and in the optimizer step.
//!
//! Off by default: then [`timed`] costs one relaxed atomic load. Only training steps count
//! (between [`start`] and [`stop`]), not the evaluation passes between epochs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

/// Whether `GRAFT_TRAINING_PROFILE` asks for the profile, read once.
static ENABLED: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("GRAFT_TRAINING_PROFILE").is_some_and(|v| v != "0"));
/// Whether training steps are being counted now: only while profiling, between [`start`] and
/// [`stop`].
static RECORDING: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

/// Whether `GRAFT_TRAINING_PROFILE` asks for the profile.
pub fn enabled() -> bool {
    *ENABLED
}

/// Counts what runs from now until [`stop`]: the training steps, not the evaluation passes.
pub fn start() {
    RECORDING.store(enabled(), Ordering::Relaxed);
}

/// Stops counting.
pub fn stop() {
    RECORDING.store(false, Ordering::Relaxed);
}

/// Runs `f`, adding its wall time to `what` when profiling.
pub fn timed<R>(what: &'static str, f: impl FnOnce() -> R) -> R {
    let _timer = Timer::start(what);
    f()
}

/// Adds the time until it is dropped to `what`, when profiling.
pub struct Timer(Option<(&'static str, Instant)>);

impl Timer {
    pub fn start(what: &'static str) -> Timer {
        let on = RECORDING.load(Ordering::Relaxed);
        Timer(on.then(|| (what, Instant::now())))
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((what, started)) = self.0 {
            let seconds = started.elapsed().as_secs_f64();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals.entry(what).or_default();
            entry.0 += 1;
            entry.1 += seconds;
        }
    }
}

/// The profile so far as a table, and resets it; `None` when not profiling.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let step: f64 = ["forward", "backward", "optimizer"]
        .iter()
        .filter_map(|k| totals.get(k).map(|t| t.1))
        .sum();
    let mut out = format!(
        "training profile (GRAFT_TRAINING_PROFILE): {step:.2} s in training steps\n\
         {:<28} {:>7} {:>9} {:>7}\n",
        "what", "calls", "seconds", "share"
    );
    for (what, (calls, seconds)) in totals.iter() {
        let share = if step > 0.0 {
            100.0 * seconds / step
        } else {
            0.0
        };
        out += &format!("{what:<28} {calls:>7} {seconds:>9.3} {share:>6.1}%\n");
    }
    totals.clear();
    Some(out)
}
