#!/usr/bin/env bash
# Deletes the TPU VM (or its queued resource), after asking.
SCRIPT_SUMMARY="Deletes the TPU VM TPU_NAME (with QUEUED=1 its queued resource and the VM in it). Everything on the
VM's disks goes with it: outputs not in RUN_DIR's bucket are lost. Asks for confirmation (an answer read from
standard input) unless --yes is given."
SCRIPT_USAGE="[--env FILE] [--dry-run] [--yes]"
SCRIPT_OPTIONS="  --yes, -y      do not ask for confirmation"
SCRIPT_SETTINGS="  TPU_NAME, PROJECT, ZONE (required)
  QUEUED  (1: delete the queued resource TPU_NAME and its VM)"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
yes=0
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$arg" in
    --yes | -y) yes=1 ;;
    *) usage_error "unexpected argument '$arg' (see --help)" ;;
  esac
done

require TPU_NAME PROJECT ZONE
mapfile -t location < <(location_flags)
if flag QUEUED; then
  what="queued resource $TPU_NAME and its TPU VM"
  command=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${location[@]}" --force --quiet)
else
  what="TPU VM $TPU_NAME"
  command=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${location[@]}" --quiet)
fi
need_gcloud
if ((!yes && !DRY_RUN)); then
  printf 'Delete the %s (zone %s, project %s) and everything on its disks? [y/N] ' "$what" "$ZONE" "$PROJECT" >&2
  answer=""
  read -r answer || true
  case "$answer" in
    y | Y | yes | YES | Yes) ;;
    *) die "not deleted" ;;
  esac
fi
run "${command[@]}"
