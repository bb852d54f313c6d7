#!/usr/bin/env bash
# Fuzzes the running API against its own OpenAPI description with schemathesis: no 5xx,
# every status, header and body as described, invalid input refused, valid input taken.
#
#   bash tests/openapi.sh            # after `cargo build` (uses target/debug/nomey-sse)
#
# Installs schemathesis into a virtual environment under target/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${NOMEY_SSE_BIN:-target/debug/nomey-sse}"
venv=target/schemathesis-venv
if [[ ! -x "$venv/bin/schemathesis" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q schemathesis==4.32.5
fi
db="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
run() {
    local key="$1"
    rm -f "$db"/*
    # Streams end after 200 ms, so that the fuzzer can read whole responses.
    BIND_ADDR="127.0.0.1:$port" DATABASE_URL="sqlite://$db/st.db" ENABLE_LOGGING=false \
        MAX_STREAM_DURATION_MS=200 SSE_PUBLISH_KEY="$key" "$bin" &
    local pid=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
        sleep 0.1
    done
    local auth=()
    [[ -n "$key" ]] && auth=(-H "Authorization: Bearer $key")
    # ASCII strings: the description counts characters, the service's limits count bytes.
    local status=0
    "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" "${auth[@]}" \
        --checks all --max-examples 50 --seed 1 --generation-codec ascii || status=$?
    kill -TERM "$pid"
    wait "$pid" || true
    return "$status"
}
run ""                 # open, as in development
run "openapi-test-key" # with a publish key, sent on every request
rm -rf "$db"
