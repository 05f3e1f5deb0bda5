"""Tokenizers for the data tests: the built-in byte tokenizer, and a real SentencePiece Llama tokenizer (the
`tokenizer.model.v1` that `mistral-common` ships, Mistral-7B-v0.1's 32k vocab), cached like the other fixtures."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

CACHE_DIR = Path(os.environ.get("JAXALIGN_TEST_CACHE", Path.home() / ".cache" / "jaxalign-tests"))


@pytest.fixture(scope="session")
def byte_tok():
    from jaxalign.data import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="session")
def sp_tokenizer_dir() -> Path:
    out = CACHE_DIR / "mistral-sp-tokenizer"
    if (out / "tokenizer.model").is_file():
        return out
    downloads = CACHE_DIR / "downloads" / "mistral-common"
    downloads.mkdir(parents=True, exist_ok=True)
    if not list(downloads.glob("*.whl")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads)]
        cmd.append("mistral-common==1.13.1")
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not list(downloads.glob("*.whl")):
            pytest.skip(f"could not download mistral-common: {result.stderr.strip()[-300:]}")
    wheel = next(downloads.glob("*.whl"))
    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open("mistral_common/data/tokenizer.model.v1") as src:
        with open(tmp / "tokenizer.model", "wb") as dst:
            shutil.copyfileobj(src, dst)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def sp_tok(sp_tokenizer_dir):
    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(sp_tokenizer_dir))


@pytest.fixture(scope="session")
def smol_tok(smollm2_dir):
    from jaxalign.data import load_tokenizer

    return load_tokenizer(str(smollm2_dir))
