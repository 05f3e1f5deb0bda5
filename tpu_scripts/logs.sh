#!/usr/bin/env bash
# Follows the log of the launched command on one worker.
SCRIPT_SUMMARY="Shows the log of the command tpu_scripts/launch.sh started, on worker 0 (the one that prints the
progress) unless --worker N is given, and follows it as it grows (Ctrl-C stops following; the command keeps
running). Logs are in ~/jaxalign-tpu/logs/ on each worker."
SCRIPT_USAGE="[--env FILE] [--dry-run] [--worker N] [--no-follow]"
SCRIPT_OPTIONS="  --worker N     the worker whose log to show (default 0)
  --no-follow    print the last 100 lines and return"
SCRIPT_SETTINGS="  TPU_NAME, PROJECT, ZONE (required)"
VALUE_OPTIONS=(--worker)
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
worker=0
follow=(--follow)
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case "$1" in
    --worker)
      [[ "$2" =~ ^[0-9]+$ ]] || usage_error "--worker $2: expected a worker number (0, 1, ...)"
      worker="$2"
      shift
      ;;
    --no-follow) follow=() ;;
    *) usage_error "unexpected argument '$1' (see --help)" ;;
  esac
  shift
done

require TPU_NAME PROJECT ZONE
need_gcloud
tpu_ssh "$worker" "bash $WORKER_SCRIPT logs${follow[*]+ ${follow[*]}}"
