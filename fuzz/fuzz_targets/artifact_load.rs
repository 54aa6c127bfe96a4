//! Any bytes given to the artifact loader: an error or a model, never a panic, a hang or an
//! allocation larger than the input justifies. Each input is tried twice: as it is (exercising the
//! container checks), and with its trailing checksum recomputed, so that mutations of the manifest
//! and of the NNEF graph get past the checksum and reach the JSON and tract parsers. A model that
//! loads is run once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fn load(bytes: Vec<u8>) {
    let Ok(artifact) = graft_runtime::Artifact::from_bytes(bytes, "fuzz.graft") else {
        return;
    };
    let Ok(model) = graft_runtime::Model::from_artifact(artifact) else {
        return;
    };
    let len = model.manifest().preprocessing.tensor_len();
    if len <= 1 << 16 {
        let _ = model.classify_tensor(&vec![0.5; len]);
    }
}

fuzz_target!(|data: &[u8]| {
    // The runtime turns tract panics into errors (catch_unwind); libFuzzer's panic hook would
    // abort on them before that, so it is replaced: a panic that escapes still aborts the run.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    load(data.to_vec());
    if data.len() > 32 {
        let mut resealed = data.to_vec();
        let body = resealed.len() - 32;
        let sum = Sha256::digest(&resealed[..body]);
        resealed[body..].copy_from_slice(&sum);
        load(resealed);
    }
});
