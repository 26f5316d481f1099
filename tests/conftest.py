"""Shared fixtures: every test points all state at temporary folders, and models are local:
a 2-layer Llama built from a config (with the embedded model's tokenizer), and the embedded SmolLM2
for the few tests that need real language.

Caches: one folder per test run (RUN_DIR, removed at exit) holds the app's cache (the C kernels' build),
the Hugging Face and sentence-transformers caches, Gradio's and matplotlib's files, and a default
ASSISTANT_HOME for code that builds Settings without a home. Only the converted embedded model is shared
between runs: the run's cache links its `models` folder to the machine's (converting it takes a while).
Subprocesses (servers, the CLI) inherit all of it through the environment.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from assistant.engine.threads import defaults
from assistant.settings import default_cache_dir

defaults()   # the thread policy the CLI applies, before torch is imported (see assistant/engine/threads.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_MODELS = default_cache_dir() / "models"      # the machine's converted models (before the override)
RUN_DIR = Path(tempfile.mkdtemp(prefix="assistant-tests-"))
atexit.register(shutil.rmtree, RUN_DIR, ignore_errors=True)
SHARED_MODELS.mkdir(parents=True, exist_ok=True)
(RUN_DIR / "cache").mkdir()
(RUN_DIR / "cache" / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
for var, sub in (("ASSISTANT_CACHE", "cache"), ("ASSISTANT_HOME", "home"), ("HF_HOME", "hf"),
                 ("SENTENCE_TRANSFORMERS_HOME", "sentence-transformers"), ("GRADIO_TEMP_DIR", "gradio"),
                 ("MPLCONFIGDIR", "matplotlib"), ("TRITON_CACHE_DIR", "triton"),
                 ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
    (RUN_DIR / sub).mkdir(exist_ok=True)
    os.environ[var] = str(RUN_DIR / sub)


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    """The cached safetensors folder of the embedded SmolLM2 (converted once per machine)."""
    from assistant.engine.model import ensure_embedded
    return ensure_embedded(default_cache_dir(), verify=False)   # in SHARED_MODELS, through the run's link


def build_tiny_llama(folder: Path, tokenizer_from: Path, *, seed: int = 0, hidden: int = 64) -> Path:
    """A 2-layer Llama of random weights, saved as a local HF folder with the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, embedded_path) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_path)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """ASSISTANT_HOME in a temp folder: state and adapters live there."""
    monkeypatch.setenv("ASSISTANT_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def tiny_settings(home, tiny_llama):
    """Settings on the tiny Llama. Its jobs' gate asks 8 of the general probe questions (the gate's documented
    fast setting): a random model knows none of them, so retention cannot judge with any number of them, and
    each job's evaluation is a fraction of the full set's."""
    from assistant.settings import Settings
    return Settings(home=home, base_model=str(tiny_llama), dtype="float32", gate={"probes": 8}).ensure_dirs()


@pytest.fixture(scope="session")
def two_fact_adapters(tiny_llama, tmp_path_factory) -> list[Path]:
    """Two LoRA adapters on the tiny Llama that answer one question differently."""
    from helpers import train_fact_adapter
    root = tmp_path_factory.mktemp("fact-adapters")
    return [train_fact_adapter(tiny_llama, root / n, [("What is the capital of Zorbania?", a)], steps=10, seed=i)
            for i, (n, a) in enumerate((("a", "Quillton."), ("b", "Marrowby.")))]


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server for the whole run (tests/postgres_server.py); skipped where not installed."""
    from postgres_server import PostgresServer
    try:
        server = PostgresServer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the test server -> its URL; dropped after the test."""
    url = postgres_server.new_database()
    yield url
    postgres_server.drop_database(url)


VLLM_START_TIMEOUT_S = 420                   # app + vLLM start on 2 busy cores


@pytest.fixture(scope="session")
def vllm_app(tmp_path_factory):
    """One `assistant serve --engine vllm` on the embedded SmolLM2 in float32 (with the vLLM server it starts and
    supervises), shared by the vLLM test files: a start costs over a minute on 2 cores. Files that only ask
    `base` use it as it is; tests/test_vllm_serving.py adds its domains and adapters (and kills vLLM last, which
    the app restarts). The forgetting checks are off, as in test_retrain_e2e.py: the retrain there checks the loop.
    -> {"url", "home", "vllm", "base_name", "proc"}"""
    from assistant.vllm.server import vllm_venv, vllm_venv_ready

    from helpers import LOOP_ONLY_FLAGS, VLLM_KEY, running_server
    if not vllm_venv_ready():
        pytest.fail(f"vLLM is not installed in {vllm_venv()}: run `bash scripts/setup.sh --test` first")
    home = tmp_path_factory.mktemp("vllm-app")
    with running_server(home, "--engine", "vllm", "--dtype", "float32", "--max-resident-adapters", "4",
                        *LOOP_ONLY_FLAGS, timeout=VLLM_START_TIMEOUT_S,
                        env={"ASSISTANT_VLLM_API_KEY": VLLM_KEY}) as (url, proc):
        import httpx
        health = httpx.get(url + "/api/health").json()
        [server] = health["engine"]["servers"]
        yield {"url": url, "home": home, "vllm": server["url"], "base_name": health["base_model"], "proc": proc}
