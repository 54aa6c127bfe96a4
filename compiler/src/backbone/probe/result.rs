//! What the normalisation probe decides, as written to and read back from its cache file.
//!
//! Kept free of graft's other modules (serde and the runtime's [`Normalization`] only) so that
//! the fuzz target `fuzz/fuzz_targets/probe_cache.rs` compiles this very file: a cache file is
//! user-writable input, and [`ProbeResult::is_valid`] decides whether one can be trusted.

use graft_runtime::preprocess::Normalization;
use serde::{Deserialize, Serialize};

/// What the probe measured and chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Score per candidate, in candidate order (higher is better).
    pub scores: Vec<(String, f32)>,
    /// Name of the chosen normalisation.
    pub chosen: String,
    /// What the scores mean, for the user.
    pub method: String,
}

impl ProbeResult {
    /// A result read back from a cache file's bytes: `None` unless they are JSON of a result
    /// that [`Self::is_valid`].
    pub fn from_cache(bytes: &[u8]) -> Option<ProbeResult> {
        serde_json::from_slice::<ProbeResult>(bytes)
            .ok()
            .filter(ProbeResult::is_valid)
    }

    /// The chosen normalisation.
    pub fn normalization(&self) -> Normalization {
        candidates()
            .into_iter()
            .find(|c| c.name == self.chosen)
            .unwrap_or_else(|| panic!("probe chose {:?}, not a candidate", self.chosen))
    }

    /// Whether a result read back from the cache is one the probe could have written: the
    /// chosen name is a candidate and every score is finite. A damaged or edited cache file is
    /// not, and the probe runs again.
    pub fn is_valid(&self) -> bool {
        candidates().iter().any(|c| c.name == self.chosen)
            && self.scores.iter().all(|(_, score)| score.is_finite())
    }
}

/// The presets the probe chooses from.
pub fn candidates() -> Vec<Normalization> {
    vec![
        Normalization::imagenet(),
        Normalization::tf(),
        Normalization::unit(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edited_cache_results_are_not_valid() {
        let good: ProbeResult = serde_json::from_str(
            r#"{"scores": [["imagenet", -0.8], ["tf", -0.5]], "chosen": "tf", "method": "m"}"#,
        )
        .unwrap();
        assert!(good.is_valid());
        assert_eq!(good.normalization(), Normalization::tf());
        let bogus = ProbeResult {
            chosen: "bogus".into(),
            ..good.clone()
        };
        assert!(!bogus.is_valid());
        let custom = ProbeResult {
            chosen: "0.5,0.5".into(),
            ..good.clone()
        };
        assert!(!custom.is_valid());
        let nan = ProbeResult {
            scores: vec![("tf".into(), f32::NAN)],
            ..good
        };
        assert!(!nan.is_valid());
    }
}
