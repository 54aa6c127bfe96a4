#!/usr/bin/env bash
# The long soak run recorded in docs/RELIABILITY.md: 10,000 predictions of the fixture artifact on
# 4 threads sharing one model, every answer compared with the single-thread one, RSS compared
# before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAFT_SOAK_PREDICTIONS=${1:-10000} cargo test --release -p graft-compiler --test soak -- --nocapture 2>&1 |
  grep -E "^soak:|test result"
