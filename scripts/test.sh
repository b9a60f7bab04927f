#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, starts the services the
# tests talk to when they are not running, then runs the gates and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis-server on 127.0.0.1:6379"
  mkdir -p /tmp/mmagg-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/mmagg-redis --logfile /tmp/mmagg-redis/redis.log
fi

if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
  log "starting PostgreSQL"
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$version" ]; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
fi

log "pip install -e .[dev]"
python -m pip install -q --disable-pip-version-check -e '.[dev]'

log "ruff"
ruff check src tests benchmarks
log "mypy"
mypy

log "benchmarks (smoke)"
# soak.py is by hand only (minutes long).
for bench in hot_path ingest redis_scale load first_call; do
  python "benchmarks/$bench.py" --smoke
done
python benchmarks/ingest.py --smoke --workers 2  # one process, then two workers
python benchmarks/hot_path.py --smoke --sweep
python benchmarks/hot_path.py --smoke --faults

# The suite runs in parallel worker processes, one per core up to 4 (override with
# MMAGG_TEST_WORKERS; 0 runs it in this process). Files stay whole on one worker
# (--dist loadfile): their module-scoped backends start once.
workers=${MMAGG_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}
[ "$workers" -gt 4 ] && workers=4
log "pytest ($workers workers)"
if [ "$workers" -gt 1 ]; then
  python -m pytest -q -n "$workers" --dist loadfile "$@"
else
  python -m pytest -q "$@"
fi
