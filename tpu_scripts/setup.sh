#!/usr/bin/env bash
# Installs jaxalign on every worker of the TPU VM.
SCRIPT_SUMMARY="Installs jaxalign on every worker of the TPU VM at once (gcloud compute tpus tpu-vm scp/ssh
--worker=all): a Python venv (~/jaxalign-tpu/venv, Python PYTHON_VERSION from uv) with jax[tpu] (the TPU build
of JAX) and jaxalign[gcs] (gs:// outputs, data and models), and ~/jaxalign-tpu/src, where launched commands run. jaxalign comes from this checkout (its
committed HEAD, sent as a \`git archive\` tarball: commit changes to jaxalign/ first), or with JAXALIGN_REF set,
from \`pip install \"jaxalign @ git+JAXALIGN_REPO@JAXALIGN_REF\"\`. configs/ is sent as it is in this working tree,
so a config you just wrote goes along. Run it again after changing the code; outputs in src/runs/ are kept."
SCRIPT_USAGE="[--env FILE] [--dry-run]"
SCRIPT_OPTIONS=""
SCRIPT_SETTINGS="  TPU_NAME, PROJECT, ZONE (required)
  JAXALIGN_REF     git ref to install instead of this checkout (a branch, tag or commit)
  JAXALIGN_REPO    git URL for JAXALIGN_REF (default: this checkout's origin remote)
  PYTHON_VERSION   Python of the venv (default 3.12)"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_options "$@"
no_more_args

require TPU_NAME PROJECT ZONE
git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
  usage_error "$REPO_ROOT is not a git checkout: set JAXALIGN_REF (and JAXALIGN_REPO) to install from a repository"
package_spec=""
if [[ -n "${JAXALIGN_REF:-}" ]]; then
  if [[ -z "${JAXALIGN_REPO:-}" ]]; then
    JAXALIGN_REPO="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)"
    [[ -n "$JAXALIGN_REPO" ]] ||
      usage_error "JAXALIGN_REPO is not set (set it in $ENV_FILE_SHOWN or the environment); this checkout has no origin remote to take it from"
    # pip needs a URL: git@host:owner/repo.git -> ssh://git@host/owner/repo.git
    if [[ "$JAXALIGN_REPO" =~ ^([^/:@]+@)?([^/:]+):(.+)$ && "$JAXALIGN_REPO" != *://* ]]; then
      JAXALIGN_REPO="ssh://${BASH_REMATCH[1]}${BASH_REMATCH[2]}/${BASH_REMATCH[3]}"
    fi
  fi
  package_spec="jaxalign[gcs] @ git+$JAXALIGN_REPO@$JAXALIGN_REF"
elif ! git -C "$REPO_ROOT" diff-index --quiet HEAD -- jaxalign pyproject.toml 2>/dev/null; then
  say "warning: jaxalign/ or pyproject.toml has uncommitted changes, which are not sent (the workers get HEAD, $(git -C "$REPO_ROOT" rev-parse --short HEAD))"
fi
need_gcloud

staging="$(mktemp -d "${TMPDIR:-/tmp}/jaxalign-tpu-setup.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
uploads=("$staging/jaxalign-tpu-worker.sh" "$staging/jaxalign-configs.tar.gz")
run cp "$TPU_SCRIPTS_DIR/worker.sh" "$staging/jaxalign-tpu-worker.sh"
run tar -czf "$staging/jaxalign-configs.tar.gz" -C "$REPO_ROOT" configs
if [[ -z "$package_spec" ]]; then
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$staging/jaxalign-src.tar.gz" HEAD
  uploads+=("$staging/jaxalign-src.tar.gz")
fi

mapfile -t location < <(location_flags)
run gcloud compute tpus tpu-vm scp "${uploads[@]}" "$TPU_NAME:~/" "${location[@]}" --worker=all
# ~ is expanded by the remote shell; the values are quoted for it.
remote="mkdir -p ~/$WORKER_HOME_NAME && mv ~/jaxalign-tpu-worker.sh $WORKER_SCRIPT"
remote+=" && bash $WORKER_SCRIPT setup --python $(quote "$PYTHON_VERSION")"
if [[ -n "$package_spec" ]]; then
  remote+=" --package $(quote "$package_spec")"
fi
tpu_ssh all "$remote"
((DRY_RUN)) || say "every worker is set up; next: tpu_scripts/launch.sh jaxalign sft CONFIG ..."
