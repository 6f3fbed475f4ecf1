#!/bin/sh
# Run every benchmark in bench/ with modest settings and print each table (about 12 minutes).
# usage: bench/run_all.sh            (PYTHON=/path/to/python to pick the interpreter)
# bench_eventloop.py needs the real libvirtd at qemu:///system; it is skipped when that does not answer.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
failed=""

run() {
    name="$1"
    shift
    echo
    echo "=== $name $* ($(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg))"
    start=$(date +%s)
    if "$PY" "bench/$name" "$@"; then
        echo "--- $name took $(($(date +%s) - start)) s"
    else
        echo "--- $name FAILED (exit $?)"
        failed="$failed $name"
    fi
}

run bench_startup.py --runs 3
run bench_unary.py --seconds 10 --rounds 10 --concurrency 1,8,64
run bench_vms.py --sizes 1000,5000 --runs 5 --calls 200
run bench_events.py --toggles 200 --burst 5000
run bench_reactor_lag.py --clients 200 --seconds 5
run bench_metrics.py --domains 1000 --subscribers 1,50 --seconds 8 --rounds 3
run bench_agent.py --pings 1000 --agents 500 --window 10
run bench_codec.py --mib 4 --runs 3
run bench_download.py --size 1024 --small 128
if "$PY" -c "import libvirt, sys; libvirt.registerErrorHandler(lambda *a: None, None); libvirt.open('qemu:///system').close()" 2>/dev/null; then
    run bench_eventloop.py --pairs 4000 --threads 1 4 --runs 1
else
    echo
    echo "=== bench_eventloop.py skipped: qemu:///system does not answer"
fi
if [ "$(id -u)" = 0 ] && unshare --net --mount --uts true 2>/dev/null; then
    run bench_migration.py --runs 3
else
    echo
    echo "=== bench_migration.py skipped: needs root and namespaces"
fi

echo
if [ -n "$failed" ]; then
    echo "failed:$failed"
    exit 1
fi
echo "all benchmarks ran"
