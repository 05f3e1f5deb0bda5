#!/usr/bin/env bash
# Describes the TPU VM (or lists them all, or shows what runs on its workers).
SCRIPT_SUMMARY="Describes the TPU VM TPU_NAME (with QUEUED=1 its queued resource: WAITING_FOR_RESOURCES,
PROVISIONING, ACTIVE, SUSPENDED...; a preempted VM shows state PREEMPTED). --list lists the TPU VMs (and queued
resources) of the zone; --workers shows on every worker whether the command tpu_scripts/launch.sh started still runs."
SCRIPT_USAGE="[--env FILE] [--dry-run] [--list | --workers]"
SCRIPT_OPTIONS="  --list         list the TPU VMs and queued resources in ZONE instead (TPU_NAME not needed)
  --workers      ask every worker whether the launched command runs, and the last line of its log"
SCRIPT_SETTINGS="  PROJECT, ZONE (required), TPU_NAME (required but for --list), QUEUED"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
mode=describe
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$arg" in
    --list) mode=list ;;
    --workers) mode=workers ;;
    *) usage_error "unexpected argument '$arg' (see --help)" ;;
  esac
done

require PROJECT ZONE
mapfile -t location < <(location_flags)
need_gcloud
case "$mode" in
  list)
    run gcloud compute tpus tpu-vm list "${location[@]}"
    if flag QUEUED; then
      run gcloud compute tpus queued-resources list "${location[@]}"
    fi
    ;;
  describe)
    require TPU_NAME
    if flag QUEUED; then
      run gcloud compute tpus queued-resources describe "$TPU_NAME" "${location[@]}"
    else
      run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${location[@]}"
    fi
    ;;
  workers)
    require TPU_NAME
    tpu_ssh all "bash $WORKER_SCRIPT status"
    ;;
esac
