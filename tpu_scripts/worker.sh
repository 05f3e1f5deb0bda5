#!/usr/bin/env bash
# Runs on every worker of a TPU VM (setup.sh copies it to ~/jaxalign-tpu/worker.sh); the other tpu_scripts call it
# over `gcloud compute tpus tpu-vm ssh --worker=...`. Not meant to be run on your own machine.
#
#   worker.sh setup [--python VERSION] [--package SPEC]
#   worker.sh launch -- COMMAND...
#   worker.sh stop [--wait]
#   worker.sh logs [--follow]
#   worker.sh status
#
# Layout under ~/jaxalign-tpu (JAXALIGN_TPU_HOME): venv/ (Python with jax[tpu] and jaxalign), src/ (the jaxalign
# source or, with --package, just its configs/; COMMAND runs here; setup replaces all of it but src/runs/),
# logs/ (one log per launch, latest.log links to the newest), jaxalign.pid (the process launch started: its pid
# and start time).

set -euo pipefail

HOME_DIR="${JAXALIGN_TPU_HOME:-$HOME/jaxalign-tpu}"
VENV="$HOME_DIR/venv"
SRC="$HOME_DIR/src"
LOGS="$HOME_DIR/logs"
PID_FILE="$HOME_DIR/jaxalign.pid"
HOST="$(hostname)"

say() { printf '%s: %s\n' "$HOST" "$*"; }
fail() {
  printf '%s: %s\n' "$HOST" "$*" >&2
  exit 1
}

# setup: a Python venv with jax[tpu] and jaxalign with its Cloud Storage extra (from ~/jaxalign-src.tar.gz, or the
# pip SPEC given with --package) and the configs from ~/jaxalign-configs.tar.gz.
setup() {
  local python_version=3.12 package=""
  while (($#)); do
    case "$1" in
      --python) python_version="$2"; shift ;;
      --package) package="$2"; shift ;;
      *) fail "setup: unknown argument $1" ;;
    esac
    shift
  done
  mkdir -p "$HOME_DIR" "$LOGS"
  # TPU VM images ship an older system Python; uv provides the version jaxalign needs.
  if [[ ! -x "$HOME/.local/bin/uv" ]]; then
    python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import sys; assert sys.version.startswith('$python_version')" 2>/dev/null; then
    rm -rf "$VENV"
    "$HOME/.local/bin/uv" venv --seed --python "$python_version" "$VENV"
  fi
  # A fresh copy of the source; a runs/ folder (outputs of configs with a relative output_dir) is kept.
  mkdir -p "$SRC"
  find "$SRC" -mindepth 1 -maxdepth 1 ! -name runs -exec rm -rf {} +
  if [[ -z "$package" ]]; then
    tar -xzf "$HOME/jaxalign-src.tar.gz" -C "$SRC"
    package="${SRC}[gcs]"
  fi
  tar -xzf "$HOME/jaxalign-configs.tar.gz" -C "$SRC"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "jax[tpu]" "$package"
  say "ready: $("$VENV/bin/python" -c 'import jax, jaxalign; print("jaxalign", jaxalign.__version__, "jax", jax.__version__)')"
}

# The pid in the pid file when that process still runs (same pid and start time), else nothing.
running_pid() {
  [[ -f "$PID_FILE" ]] || return 0
  local pid started now
  read -r pid started <"$PID_FILE" || true
  [[ -n "${pid:-}" ]] || return 0
  now="$(ps -o lstart= -p "$pid" 2>/dev/null | tr -s ' ')" || return 0
  if [[ -n "$now" && "$now" == "${started//_/ }" ]]; then
    printf '%s\n' "$pid"
  fi
}

# launch: COMMAND in the background, detached from the ssh session (setsid + nohup), in src/ with the venv first on
# PATH, writing to logs/<time>.log; refuses while a command it launched still runs.
launch() {
  while (($#)); do
    case "$1" in
      --) shift; break ;;
      *) fail "launch: unknown argument $1 (the command goes after --)" ;;
    esac
    shift
  done
  (($#)) || fail "launch: no command given"
  [[ -d "$SRC" ]] || fail "$SRC does not exist: run tpu_scripts/setup.sh first"
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    fail "a command launched earlier still runs (pid $pid, $(readlink -f "$LOGS/latest.log")); stop it first with tpu_scripts/stop.sh"
  fi
  mkdir -p "$LOGS"
  local log
  log="$LOGS/$(date -u +%Y%m%d-%H%M%S).log"
  ln -sfn "$log" "$LOGS/latest.log"
  # The runner starts the command as its child, records the child's pid (stop signals that process only) and, when
  # it ends, its exit status (143 after SIGTERM, 130 after SIGINT).
  # shellcheck disable=SC2016  # expanded by the runner
  local runner='
    cd "$1"; shift
    pid_file="$1"; shift
    printf "%s launching:" "$(date -u +%FT%TZ)"; printf " %q" "$@"; echo
    "$@" &
    child=$!
    printf "%s %s\n" "$child" "$(ps -o lstart= -p "$child" | tr -s " " | tr " " _)" > "$pid_file"
    status=0
    wait "$child" || status=$?
    printf "%s exited with status %s\n" "$(date -u +%FT%TZ)" "$status"
    exit "$status"'
  PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" setsid nohup bash -c "$runner" jaxalign-runner "$SRC" "$PID_FILE" "$@" \
    >"$log" 2>&1 </dev/null &
  # Wait (briefly) for the pid file so that stop.sh right after launch.sh finds the process.
  local waited=0
  until [[ -n "$(running_pid)" ]] || ((waited >= 50)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  say "launched (pid $(running_pid || true)), log $log"
}

# stop: SIGTERM to the process launch started (found by its pid file, never by name): a jaxalign training command
# finishes its step, saves a checkpoint and exits with status 143. Only one signal is sent: a second one would
# make jaxalign exit at once. With --wait, returns when the process has ended.
stop() {
  local wait=0
  while (($#)); do
    case "$1" in
      --wait) wait=1 ;;
      *) fail "stop: unknown argument $1" ;;
    esac
    shift
  done
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    say "nothing to stop (no command launched by tpu_scripts/launch.sh runs)"
    return 0
  fi
  kill -TERM "$pid"
  say "sent SIGTERM to pid $pid"
  if ((wait)); then
    while kill -0 "$pid" 2>/dev/null; do
      sleep 2
    done
    sleep 1
    say "$(tail -n 1 "$LOGS/latest.log")"
  fi
}

logs() {
  [[ -e "$LOGS/latest.log" ]] || fail "no log yet: nothing was launched on this worker"
  if [[ "${1:-}" == "--follow" ]]; then
    exec tail -n 100 -F "$LOGS/latest.log"
  fi
  tail -n 100 "$LOGS/latest.log"
}

status() {
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    say "running (pid $pid), log $(readlink -f "$LOGS/latest.log")"
  elif [[ -e "$LOGS/latest.log" ]]; then
    say "not running; last log $(readlink -f "$LOGS/latest.log"): $(tail -n 1 "$LOGS/latest.log")"
  else
    say "not running; nothing launched yet"
  fi
}

(($#)) || fail "usage: worker.sh setup|launch|stop|logs|status ..."
command="$1"
shift
case "$command" in
  setup) setup "$@" ;;
  launch) launch "$@" ;;
  stop) stop "$@" ;;
  logs) logs "$@" ;;
  status) status "$@" ;;
  *) fail "unknown command $command" ;;
esac
