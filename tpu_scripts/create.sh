#!/usr/bin/env bash
# Creates the TPU VM (or requests it as a queued resource).
SCRIPT_SUMMARY="Creates the TPU VM TPU_NAME: \`gcloud compute tpus tpu-vm create\`, or with QUEUED=1 a queued resource
of the same name (\`gcloud compute tpus queued-resources create\`), which Cloud TPU fills when capacity is free
(tpu_scripts/status.sh shows its state; ACTIVE means the VM exists). SPOT=1 or PREEMPTIBLE=1 ask for a cheaper VM
that can be preempted at any time (see README: Running on Cloud TPU)."
SCRIPT_USAGE="[--env FILE] [--dry-run]"
SCRIPT_OPTIONS=""
SCRIPT_SETTINGS="  TPU_NAME, PROJECT, ZONE, ACCELERATOR_TYPE (required)
  RUNTIME_VERSION  (default by generation: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e,
                   v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  SPOT, PREEMPTIBLE, QUEUED  (1 or 0, default 0)"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
no_more_args

require TPU_NAME PROJECT ZONE ACCELERATOR_TYPE
version="$(runtime_version)"
tier=()
if flag SPOT && flag PREEMPTIBLE; then
  usage_error "SPOT and PREEMPTIBLE are both set: choose one (Spot VMs are the newer kind of preemptible VM)"
fi
if flag SPOT; then
  tier=(--spot)
elif flag PREEMPTIBLE; then
  tier=(--preemptible)
fi
if flag QUEUED && flag PREEMPTIBLE; then
  usage_error "PREEMPTIBLE=1 cannot be combined with QUEUED=1: use SPOT=1 for a preemptible queued resource"
fi
mapfile -t location < <(location_flags)
need_gcloud

if flag QUEUED; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME" "${location[@]}" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$version" ${tier[@]+"${tier[@]}"}
  ((DRY_RUN)) || say "queued resource $TPU_NAME requested; tpu_scripts/status.sh shows its state (the VM exists once it is ACTIVE), then run tpu_scripts/setup.sh"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${location[@]}" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--version=$version" ${tier[@]+"${tier[@]}"}
  ((DRY_RUN)) || say "TPU VM $TPU_NAME created; next: tpu_scripts/setup.sh"
fi
