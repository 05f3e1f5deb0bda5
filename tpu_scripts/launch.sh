#!/usr/bin/env bash
# Starts a jaxalign command on every worker at once, in the background.
SCRIPT_SUMMARY="Runs COMMAND (e.g. jaxalign sft configs/pods/llama2_7b_sft_v4-8.yaml model.path=... data.train=...)
on every worker of the TPU VM at once, in ~/jaxalign-tpu/src with the venv of setup.sh, in the background under
nohup: closing the ssh connection does not stop it. Each worker logs to ~/jaxalign-tpu/logs/<time>.log
(tpu_scripts/logs.sh follows worker 0's) and keeps the process's pid for tpu_scripts/stop.sh. Refuses to start
while a command it started still runs.

Outputs: with RUN_DIR set, output_dir=RUN_DIR is added to COMMAND (unless COMMAND has its own output_dir=...);
jaxalign writes a gs://BUCKET/PATH output_dir straight to Cloud Storage, which every worker shares and which
outlives the VM. Without RUN_DIR the config's output_dir is a folder on each worker's own disk: lost with the VM,
and on a multi-host slice not shared, which checkpoints need.

After a preemption or a stop, the same COMMAND (same output_dir) resumes from the latest complete checkpoint."
SCRIPT_USAGE="[--env FILE] [--dry-run] [--] COMMAND..."
SCRIPT_OPTIONS=""
SCRIPT_SETTINGS="  TPU_NAME, PROJECT, ZONE (required)
  RUN_DIR   the run's output_dir: gs://BUCKET/PATH, or a folder all workers share"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
((${#ARGS[@]})) || usage_error "no command given: tpu_scripts/launch.sh jaxalign sft CONFIG [key=value ...] (see --help)"
command=("${ARGS[@]}")

require TPU_NAME PROJECT ZONE
has_output_dir=0
for word in "${command[@]}"; do
  case "$word" in
    output_dir=*) has_output_dir=1 ;;
  esac
done
if [[ -n "${RUN_DIR:-}" ]]; then
  if ((has_output_dir)); then
    say "note: COMMAND sets output_dir itself; RUN_DIR=$RUN_DIR is not used for it"
  else
    command+=("output_dir=${RUN_DIR%/}")
  fi
elif ((!has_output_dir)); then
  say "warning: RUN_DIR is not set: outputs go to the config's output_dir on each worker's disk, which is lost with the VM (and not shared between the hosts of a multi-host slice)"
fi
need_gcloud

remote="bash $WORKER_SCRIPT launch -- $(quote_words "${command[@]}")"
tpu_ssh all "$remote"
((DRY_RUN)) || say "launched on every worker; follow it with tpu_scripts/logs.sh, stop it with tpu_scripts/stop.sh"
