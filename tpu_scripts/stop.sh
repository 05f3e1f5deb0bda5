#!/usr/bin/env bash
# Stops the launched command on every worker with SIGTERM.
SCRIPT_SUMMARY="Sends SIGTERM, once, to the command tpu_scripts/launch.sh started on every worker (the process named
in its pid file, never found by name). A jaxalign training command then finishes its current step, saves a
checkpoint and exits with status 143 (before its first step it exits at once); the same launch command resumes
it later. --wait returns only when the command has ended on every worker (wait before tpu_scripts/delete.sh)."
SCRIPT_USAGE="[--env FILE] [--dry-run] [--wait]"
SCRIPT_OPTIONS="  --wait         wait until the command has exited on every worker and show its exit status"
SCRIPT_SETTINGS="  TPU_NAME, PROJECT, ZONE (required)"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
wait_flag=""
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$arg" in
    --wait) wait_flag=" --wait" ;;
    *) usage_error "unexpected argument '$arg' (see --help)" ;;
  esac
done

require TPU_NAME PROJECT ZONE
need_gcloud
tpu_ssh all "bash $WORKER_SCRIPT stop$wait_flag"
