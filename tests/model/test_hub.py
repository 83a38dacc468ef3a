"""Model ids as well as directories: `owner/name` resolves through a Hugging Face cache laid out in tmp_path.

Hermetic: HF_HUB_OFFLINE=1 and the cache is built by hand in the layout huggingface_hub reads
(models--owner--name/refs/main + snapshots/<commit>/), so nothing is ever downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

hub_constants = pytest.importorskip("huggingface_hub.constants")

from tinychat.cli import main  # noqa: E402
from tinychat.errors import UserError  # noqa: E402
from tinychat.model import Model  # noqa: E402
from tinychat.model.hub import hub_id, model_name, resolve_model_dir  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding the tiny model as `owner/tiny` (revision main), offline."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--owner--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.chdir(tmp_path)
    return repo / "snapshots" / COMMIT


def test_hub_id_shapes() -> None:
    assert hub_id("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert hub_id("owner/name@v1.0") == ("owner/name", "v1.0")
    for not_an_id in ("tiny", "runs/demo/checkpoints/sft", "./owner/name", "/abs/name", "owner/", "a b/c"):
        assert hub_id(not_an_id) is None, not_an_id


def test_cached_id_loads_in_python_and_generate(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_model_dir("owner/tiny") == hub_cache
    assert resolve_model_dir("owner/tiny@main") == hub_cache
    assert model_name(resolve_model_dir("owner/tiny")) == "owner/tiny"
    assert Model.from_pretrained("owner/tiny").cfg.n_layer == 2
    argv = ["generate", "--model", "owner/tiny", "--prompt", "the", "--max_new_tokens", "3", "--temperature", "0"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_uncached_id_offline_is_one_sentence(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"owner/missing is not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        Model.from_pretrained("owner/missing")
    assert main(["generate", "--model", "owner/missing", "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model owner/missing") and "pass a model directory" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(UserError, match="does not exist"):
        Model.from_pretrained("no-such-dir")  # not shaped like an id: the usual error


def test_existing_directory_named_like_an_id_wins(hub_cache: Path, tiny_model_dir: Path) -> None:
    local = Path("owner/tiny")
    shutil.copytree(tiny_model_dir, local)
    cfg = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    assert resolve_model_dir("owner/tiny") == local
    with pytest.raises(UserError, match="unexpected tensor"):  # the local one-layer config, not the cached model
        Model.from_pretrained("owner/tiny")


def test_adapter_base_may_be_a_hub_id(hub_cache: Path) -> None:
    from tinychat.model.peft.common import adapter_base

    adapter = Path("adapter")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "owner/tiny"})
    )
    assert adapter_base(adapter) == hub_cache
