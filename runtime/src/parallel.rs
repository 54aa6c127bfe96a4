//! Worker threads for independent items (images to decode, classify or extract): a scoped
//! pool that keeps the input order. The model, the evaluation and the compiler's stages all fan
//! out through it, so it sits below them all.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Applies `f` to every item on `threads` worker threads, keeping the input order, and calls
/// `on_done` after each item.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
    on_done: impl Fn() + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut local = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        local.push((i, f(item)));
                        on_done();
                    }
                    local
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker thread panicked"))
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Number of worker threads to use by default: the available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_order_and_counts_progress() {
        let done = AtomicUsize::new(0);
        let items: Vec<u32> = (0..100).collect();
        let out = par_map(
            &items,
            3,
            |x| x * 2,
            || {
                done.fetch_add(1, Ordering::Relaxed);
            },
        );
        assert_eq!(out, (0..100).map(|x| x * 2).collect::<Vec<_>>());
        assert_eq!(done.load(Ordering::Relaxed), 100);
        assert!(par_map(&[] as &[u32], 4, |x| *x, || {}).is_empty());
    }
}
