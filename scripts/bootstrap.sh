#!/usr/bin/env bash
# Idempotent project bootstrap: PostgreSQL server binaries, .venv, locked install.
# Safe to run repeatedly from any directory; quiet unless something fails.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

run_quiet() {
  # Run a command, showing its output only when it fails.
  local out
  if ! out="$("$@" 2>&1)"; then
    printf '%s\n' "$out" >&2
    log "command failed: $*"
    return 1
  fi
}

# 1. PostgreSQL server binaries (initdb/pg_ctl) -------------------------------------------
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    log "PostgreSQL server binaries missing and not root: install the 'postgresql' package"
    exit 1
  fi
  log "installing PostgreSQL server (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  run_quiet apt-get update
  run_quiet apt-get install -y --no-install-recommends postgresql
fi
if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
  log "creating unprivileged OS user 'postgres'"
  run_quiet useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

# 2. Virtualenv ------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  PY="$(command -v python3.11 || command -v python3)"
  log "creating .venv with $PY"
  run_quiet "$PY" -m venv .venv
fi

# 3. Locked install, only when the lock or pyproject.toml changed since the last one ----------
# requirements/dev.lock pins every package (with hashes) so two fresh machines get the same
# versions; the project itself goes in editable, without dependencies or build isolation
# (hatchling is in the lock). Regenerate the lock with `bash scripts/lock`.
LOCK=requirements/dev.lock
STAMP=.venv/.trace-install-stamp
HASH="$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ] || [ ! -x .venv/bin/trace ]; then
  log "installing $LOCK and the project (editable) into .venv"
  run_quiet .venv/bin/python -m pip install --disable-pip-version-check -q \
    --require-hashes -r "$LOCK"
  run_quiet .venv/bin/python -m pip install --disable-pip-version-check -q \
    --no-deps --no-build-isolation -e .
  printf '%s\n' "$HASH" >"$STAMP"
fi

# 4. Local EVM node for chain ingest (anvil from npm, into .trace/node) -------------------------
# The platform binary is run directly (node_modules/.bin/anvil is a node wrapper).
NODE_DIR=.trace/node
ANVIL_VERSION=1.7.1
if [ -z "${TRACE_SKIP_NODE:-}" ] && command -v npm >/dev/null \
  && [ "$(cat "$NODE_DIR/.anvil-version" 2>/dev/null)" != "$ANVIL_VERSION" ]; then
  log "installing anvil $ANVIL_VERSION (npm) into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  [ -f "$NODE_DIR/package.json" ] || printf '{"private": true}\n' >"$NODE_DIR/package.json"
  run_quiet npm install --prefix "$NODE_DIR" --no-audit --no-fund --no-save --silent \
    "@foundry-rs/anvil@$ANVIL_VERSION"
  printf '%s\n' "$ANVIL_VERSION" >"$NODE_DIR/.anvil-version"
fi

# 5. Build tools of the Node UDF SDK (typescript, esbuild from npm; pinned by its package-lock) --
# `npm ci` into sdks/node/node_modules, again only when the lock changed.
NODE_SDK=sdks/node
if [ -z "${TRACE_SKIP_NODE:-}" ] && command -v npm >/dev/null; then
  NODE_LOCK_HASH="$(sha256sum "$NODE_SDK/package-lock.json" | cut -d' ' -f1)"
  if [ "$(cat "$NODE_SDK/node_modules/.trace-lock-hash" 2>/dev/null)" != "$NODE_LOCK_HASH" ]; then
    log "installing the Node UDF SDK's build tools (npm ci) into $NODE_SDK/node_modules"
    run_quiet npm ci --prefix "$NODE_SDK" --no-audit --no-fund --silent
    printf '%s\n' "$NODE_LOCK_HASH" >"$NODE_SDK/node_modules/.trace-lock-hash"
  fi
fi
