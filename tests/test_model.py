"""Base model loading: the embedded model's cached conversion is checksummed and rebuilt when corrupt;
the fingerprint tells bases apart; `auto` quantizes on CUDA only."""

import shutil

import pytest

from assistant.engine.model import _manifest_ok, ensure_embedded, fingerprint, load_base, resolve_quantization
from assistant.errors import ModelLoadError
from assistant.settings import Settings


@pytest.mark.slow
def test_corrupt_cache_is_detected_and_rebuilt(embedded_path, tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "models" / embedded_path.name
    shutil.copytree(embedded_path, folder)
    assert _manifest_ok(folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()[-4096:]
    with open(weights, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\x00" * 50)
    assert not _manifest_ok(folder)
    rebuilt = ensure_embedded(cache)
    assert _manifest_ok(rebuilt)
    assert (rebuilt / "model.safetensors").read_bytes()[-4096:] == original


def test_fingerprint_differs_for_other_weights_same_shapes(tiny_llama, tmp_path):
    from conftest import build_tiny_llama
    other = build_tiny_llama(tmp_path / "other", tiny_llama, seed=3)
    a = load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)
    b = load_base(Settings(base_model=str(other), dtype="float32"), verbose=False)
    assert a.fingerprint["shapes"] == b.fingerprint["shapes"]
    assert a.fingerprint["config_hash"] == b.fingerprint["config_hash"]
    assert a.fingerprint["weights_hash"] != b.fingerprint["weights_hash"]
    assert fingerprint(a.model, "x")["weights_hash"] == a.fingerprint["weights_hash"]


def test_quantization_auto_is_nf4_on_cuda_only_and_explicit_runs_anywhere():
    assert resolve_quantization("auto", "cpu") == "none"
    assert resolve_quantization("auto", "cuda") == "nf4"
    assert resolve_quantization("nf4", "cpu") == "nf4" and resolve_quantization("int8", "cpu") == "int8"


def test_missing_folder_and_bad_settings_have_clear_messages(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base(Settings(base_model=str(tmp_path / "empty")), verbose=False)
    with pytest.raises(ValueError, match="--auth"):
        Settings(share=True)
    with pytest.raises(ValueError, match="quantization"):
        Settings(quantization="fp3")


def test_a_base_described_from_its_files_has_the_loaded_base_fingerprint_and_shapes(tiny_settings):
    """vLLM serving checks adapters against a base it never loads: its files must say what loading says."""
    from assistant.engine.model import describe_base, load_base
    from assistant.engine.runner import LlamaRunner
    loaded, described = load_base(tiny_settings, verbose=False), describe_base(tiny_settings)
    assert described.model is None and described.fingerprint == loaded.fingerprint
    runner = LlamaRunner(loaded.model, max_slots=1, max_batch=1, device="cpu")
    assert described.extra["module_shapes"] == runner.module_shapes()


def test_the_fingerprint_read_from_files_equals_the_loaded_models(tiny_llama):
    """One fingerprint, computed from the loaded model or from its safetensors files (a vLLM base)."""
    from assistant.engine.model import file_fingerprint, fingerprint, load_base
    from assistant.settings import Settings
    loaded = load_base(Settings(base_model=str(tiny_llama), dtype="float32"), verbose=False)
    assert fingerprint(loaded.model, "tiny") == file_fingerprint(tiny_llama, "tiny")
    assert file_fingerprint(tiny_llama, "tiny")["weights_hash"] == loaded.fingerprint["weights_hash"]
