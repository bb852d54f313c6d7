#!/usr/bin/env bash
# End-to-end tests of the browser client, the demo page, the React files and the Node
# publisher: headless Chromium (Debian's package) against the real server binary.
#
#   bash tests/e2e/run.sh                       # after `cargo build --bin nomey-sse`
#   bash tests/e2e/run.sh --update-screenshot   # also refresh docs/demo.png
#
# NOMEY_SSE_BIN names the server binary (default: target/debug/nomey-sse of this checkout).
# Installs what is missing (chromium, the npm packages); builds nothing.
set -euo pipefail
# A relative NOMEY_SSE_BIN means relative to where this was started.
if [[ -n "${NOMEY_SSE_BIN:-}" ]]; then
    NOMEY_SSE_BIN="$(realpath -m -- "$NOMEY_SSE_BIN")"
    export NOMEY_SSE_BIN
fi
cd "$(dirname "$0")"

if [[ "${1:-}" == "--update-screenshot" ]]; then
    export E2E_SCREENSHOT="$PWD/../../docs/demo.png"
fi

bin="${NOMEY_SSE_BIN:-../../target/debug/nomey-sse}"
if [[ ! -x "$bin" ]]; then
    echo "run.sh: no server binary at $bin; run \`cargo build --bin nomey-sse\` first or set NOMEY_SSE_BIN" >&2
    exit 1
fi

if [[ ! -x /usr/bin/chromium ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# npm leaves this copy of the lock file in node_modules after an install.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
    npm ci --no-audit --no-fund
fi

# One file at a time: each starts its own servers and browser, and the machine is small.
exec node --test --test-concurrency=1 ./*.test.mjs
