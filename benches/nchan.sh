#!/bin/sh
# Starts nginx with nchan (benches/nchan.conf) on 127.0.0.1:8090, in the background, and
# prints the pid of its one worker process: the process whose memory the load tool reads
# (`--pid`). `benches/nchan.sh stop` stops it.
#
#   PID=$(benches/nchan.sh)
#   cargo bench --bench load -- streams --target nchan --url http://127.0.0.1:8090 --pid "$PID"
#
# Needs Debian's `nginx` and `libnginx-mod-nchan` packages. Run from anywhere; logs and the
# pid file are under $NCHAN_PREFIX (default /tmp/nchan).
set -eu

prefix=${NCHAN_PREFIX:-/tmp/nchan}
conf=$(cd "$(dirname "$0")" && pwd)/nchan.conf
pidfile=$prefix/nginx.pid

running() {
    [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

if [ "${1:-start}" = stop ]; then
    if running; then
        nginx -c "$conf" -p "$prefix" -s stop
    fi
    exit 0
fi

mkdir -p "$prefix"
if running; then
    echo "nchan: already running (master $(cat "$pidfile")); '$0 stop' first" >&2
    exit 1
fi
nginx -c "$conf" -p "$prefix"

# The master writes its pid file, then forks the worker.
tries=0
while :; do
    if running; then
        worker=$(pgrep -P "$(cat "$pidfile")" | head -n 1 || true)
        [ -n "$worker" ] && break
    fi
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then
        echo "nchan: no worker after 10 s; see $prefix/error.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "$worker"
