# shellcheck shell=bash
# Shared by every tpu_scripts/*.sh: settings, option parsing, --help, --dry-run, and printing / running commands.
#
# A script sets SCRIPT_SUMMARY, SCRIPT_USAGE, SCRIPT_OPTIONS (its own option lines) and SCRIPT_SETTINGS (the
# settings it reads), sources this file, calls `parse_common_options "$@"` and then works with the words that are
# left in ARGS. Every command that reaches Google Cloud goes through `run`, which prints it (shell-quoted, one per
# line) and runs it; with --dry-run it prints `dry-run: COMMAND` and runs nothing.

set -euo pipefail

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$TPU_SCRIPTS_DIR/.." && pwd)"
SCRIPT_NAME="tpu_scripts/$(basename "$0")"

# Where things live on every worker of the TPU VM (paths under the ssh user's home directory).
WORKER_HOME_NAME="jaxalign-tpu"               # ~/jaxalign-tpu: worker.sh, venv/, src/, logs/, jaxalign.pid
# shellcheck disable=SC2088,SC2034  # the tilde is for the remote shell to expand
WORKER_SCRIPT="~/$WORKER_HOME_NAME/worker.sh"

# Every setting the scripts read; a value set in the environment overrides the env file's.
SETTING_NAMES=(TPU_NAME PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION SPOT PREEMPTIBLE QUEUED JAXALIGN_REF
  JAXALIGN_REPO RUN_DIR PYTHON_VERSION)

DRY_RUN=0
ENV_FILE=""
ENV_FILE_SHOWN="tpu_scripts/tpu.env"
ARGS=()

say() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }

# Usage errors (a missing setting, an unknown option): exit status 2.
usage_error() {
  say "$*"
  exit 2
}

# Other failures: exit status 1.
die() {
  say "$*"
  exit 1
}

print_help() {
  cat <<EOF
Usage: $SCRIPT_NAME $SCRIPT_USAGE

$SCRIPT_SUMMARY

Options:
$SCRIPT_OPTIONS
  --env FILE     read settings from FILE (default: tpu_scripts/tpu.env when it exists); the environment
                 overrides the file
  --dry-run      print every command it would run (lines starting with 'dry-run: ') and run nothing
  -h, --help     show this help

Settings it reads (see tpu_scripts/tpu.env.example):
$SCRIPT_SETTINGS
EOF
}

# Reads --env/--dry-run/--help and leaves the script's own options in ARGS, up to the first word that is not an
# option (or `--`, which is dropped): that word and everything after it go to ARGS unread (launch.sh's command).
# Options of the script that take a value are listed in VALUE_OPTIONS. Then loads the settings.
VALUE_OPTIONS=()
parse_common_options() {
  ARGS=()
  while (($#)); do
    case "$1" in
      -h | --help)
        print_help
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --env)
        (($# >= 2)) || usage_error "--env needs a file name"
        ENV_FILE="$2"
        shift
        ;;
      --env=*) ENV_FILE="${1#--env=}" ;;
      --)
        shift
        ARGS+=("$@")
        break
        ;;
      -*)
        ARGS+=("$1")
        if [[ " ${VALUE_OPTIONS[*]-} " == *" $1 "* ]]; then
          (($# >= 2)) || usage_error "$1 needs a value"
          ARGS+=("$2")
          shift
        fi
        ;;
      *)
        ARGS+=("$@")
        break
        ;;
    esac
    shift
  done
  load_settings
}

load_settings() {
  if [[ -n "$ENV_FILE" ]]; then
    [[ -f "$ENV_FILE" ]] || usage_error "--env $ENV_FILE: no such file"
    ENV_FILE_SHOWN="$ENV_FILE"
  elif [[ -f "$TPU_SCRIPTS_DIR/tpu.env" ]]; then
    ENV_FILE="$TPU_SCRIPTS_DIR/tpu.env"
  fi
  if [[ -n "$ENV_FILE" ]]; then
    # Values set (not empty) in the environment win over the file.
    local name saved=()
    for name in "${SETTING_NAMES[@]}"; do
      if [[ -n "${!name:-}" ]]; then
        saved+=("$name=${!name}")
      fi
    done
    # shellcheck source=/dev/null
    source "$ENV_FILE"
    local entry
    for entry in ${saved[@]+"${saved[@]}"}; do
      printf -v "${entry%%=*}" '%s' "${entry#*=}"
    done
  fi
  PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
}

# The value of setting $1, or a usage error naming it.
require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      usage_error "$name is not set (set it in $ENV_FILE_SHOWN or the environment)"
    fi
  done
}

# True for 1/true/yes/on, false for 0/false/no/off/empty; anything else is a usage error naming the setting.
flag() {
  local name="$1" value
  value="$(printf '%s' "${!name:-}" | tr '[:upper:]' '[:lower:]')"
  case "$value" in
    1 | true | yes | on) return 0 ;;
    "" | 0 | false | no | off) return 1 ;;
    *) usage_error "$name=${!name}: expected 1 or 0 (true/false, yes/no)" ;;
  esac
}

# The runtime (software) version: RUNTIME_VERSION, else the one Google documents for the TPU generation of
# ACCELERATOR_TYPE (https://cloud.google.com/tpu/docs/runtimes).
runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    printf '%s\n' "$RUNTIME_VERSION"
    return
  fi
  case "$ACCELERATOR_TYPE" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) usage_error "RUNTIME_VERSION is not set and ACCELERATOR_TYPE=$ACCELERATOR_TYPE has no default (set it in $ENV_FILE_SHOWN or the environment)" ;;
  esac
}

# The flags every gcloud command takes.
location_flags() {
  printf '%s\n' "--zone=$ZONE" "--project=$PROJECT"
}

# One word, quoted for the shell (and for Python's shlex) only when it needs it.
quote() {
  local word="$1"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,^-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Prints a command (one line, shell-quoted) and runs it; with --dry-run only prints it, to stdout, after 'dry-run: '.
# Commands run for real are echoed to stderr after '+ ', so stdout stays the command's own output.
run() {
  if ((DRY_RUN)); then
    printf 'dry-run: %s\n' "$(quote_words "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_words "$@")" >&2
  "$@"
}

need_gcloud() {
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}

# `gcloud compute tpus tpu-vm ssh` on the workers named by $1 (all, or a number) running the command $2.
tpu_ssh() {
  local workers="$1" command="$2"
  local location
  mapfile -t location < <(location_flags)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${location[@]}" "--worker=$workers" --command "$command"
}

no_more_args() {
  if ((${#ARGS[@]})); then
    usage_error "unexpected argument '${ARGS[0]}' (see --help)"
  fi
}
