#!/usr/bin/env bash
# Regenerates runtime/include/graft.h from runtime/src/capi.rs (needs `cargo install cbindgen`).
set -euo pipefail
cd "$(dirname "$0")/../runtime"
cbindgen --config cbindgen.toml --crate graft-runtime --output include/graft.h
