"""backend="auto": a cached open_clip model is picked, offline with no cache falls back with one warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lightning_neurons.backends import auto as auto_module
from lightning_neurons.backends import load_backend
from lightning_neurons.backends.auto import PREFETCH_COMMAND, AutoBackendWarning, choose_auto

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache and open_clip download folder, offline, the warning memory cleared."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(auto_module, "OPEN_CLIP_URL_CACHE", tmp_path / "clip")
    monkeypatch.setattr(auto_module, "_WARNED", set())
    return cache


def put_tiny_checkpoint(cache: Path, repo: str = "ln-test/tiny-clip") -> torch.nn.Module:
    """A tiny open_clip model with random weights, stored as a Hugging Face hub snapshot in ``cache``."""
    import open_clip

    config_dir = cache.parent / "cfg"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "ln-auto-tiny-vit.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(config_dir / "ln-auto-tiny-vit.json")  # the registered tiny architecture
    torch.manual_seed(0)
    model = open_clip.create_model("ln-auto-tiny-vit", pretrained=None).eval()
    org, name = repo.split("/")
    repo_dir = cache / f"models--{org}--{name}"
    snapshot = repo_dir / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123456789abcdef")
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    return model


def test_a_cached_open_clip_checkpoint_is_picked_offline(empty_cache: Path) -> None:
    model = put_tiny_checkpoint(empty_cache)
    choice = choose_auto()
    assert (choice.backend, choice.model_name, choice.reason) == ("clip", "hf-hub:ln-test/tiny-clip", "cached")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoBackendWarning)
        backend = load_backend("auto", device="cpu", generator=False)
    assert backend.name == "clip" and "hf-hub:ln-test/tiny-clip" in backend.encoder.name
    tokens = backend.encoder.tokenizer(["a cat"])
    with torch.no_grad():  # the checkpoint's weights, not a fresh random init
        expected = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    assert torch.allclose(backend.encoder.encode_texts(["a cat"]), expected, atol=1e-5)


def test_offline_with_no_cache_falls_back_with_one_warning(empty_cache: Path) -> None:
    choice = choose_auto()
    assert choice.backend == "embedded" and str(empty_cache) in choice.reason and "HF_HUB_OFFLINE" in choice.reason
    with pytest.warns(AutoBackendWarning) as record:
        backend = load_backend("auto", device="cpu", generator=False)
        again = load_backend("auto", device="cpu", generator=False)
    assert len(record) == 1  # once per process, not at every fit / validate / explain
    message = str(record[0].message)
    assert "0.345" in message and "much weaker" in message  # the README's measured figure
    assert PREFETCH_COMMAND in message and 'backend="clip"' in message and str(empty_cache) in message
    assert backend.name == again.name == "embedded"


def test_offline_with_nothing_cached_decides_without_importing_open_clip(tmp_path: Path) -> None:
    """Importing open_clip (and timm) costs 1.5 s of every fit on 2 CPU cores; with no file it could load, skip it."""
    import subprocess
    import sys

    (tmp_path / "hub").mkdir()
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from lightning_neurons.backends import auto\n"
        f"auto.OPEN_CLIP_URL_CACHE = Path({str(tmp_path / 'clip')!r})\n"
        f"choice = auto.choose_auto(cache_dir={str(tmp_path / 'hub')!r}, offline=True)\n"
        "print(choice.backend, 'open_clip' in sys.modules)\n"
        "Path(auto.OPEN_CLIP_URL_CACHE).mkdir()\n"
        "(Path(auto.OPEN_CLIP_URL_CACHE) / 'unrelated.pt').write_bytes(b'')\n"
        f"choice = auto.choose_auto(cache_dir={str(tmp_path / 'hub')!r}, offline=True)\n"
        "print(choice.backend, 'open_clip' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    # Nothing cached: no import. A file in open_clip's folder: open_clip looks (and finds no weights of its own).
    assert done.stdout.split() == ["embedded", "False", "embedded", "True"], done.stderr


def test_an_open_clip_that_fails_to_import_counts_as_not_installed(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    broken = tmp_path / "site" / "open_clip"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('No module named timm')\n")
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")  # something to look at: the import is tried
    script = (
        "from lightning_neurons.backends.auto import choose_auto\n"
        f"print(choose_auto(cache_dir={str(tmp_path / 'hub')!r}, offline=True).reason)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, env=env
    )
    assert done.stdout.strip() == "open_clip is not installed (pip install open_clip_torch)", done.stderr


def test_online_without_cache_chooses_to_fetch_the_default_clip(empty_cache: Path) -> None:
    choice = choose_auto(offline=False)
    assert (choice.backend, choice.model_name, choice.pretrained, choice.reason) == (
        "clip",
        "ViT-B-16",
        "laion2b_s34b_b88k",
        "fetch",
    )


def test_explicit_backends_keep_working_without_the_auto_warning(empty_cache: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoBackendWarning)
        assert load_backend("embedded", device="cpu", generator=False).name == "embedded"
        put_tiny_checkpoint(empty_cache)
        clip = load_backend("clip", device="cpu", model_name="ln-auto-tiny-vit", pretrained=None)
    assert clip.name == "clip" and clip.encoder.name == "open_clip:ln-auto-tiny-vit:random"


def test_auto_is_the_default_of_the_callback_explain_and_the_cli() -> None:
    import inspect

    from lightning_neurons import NeuronExplainer
    from lightning_neurons.config import BackendConfig
    from lightning_neurons.posthoc import explain

    assert inspect.signature(NeuronExplainer.__init__).parameters["backend"].default == "auto"
    assert inspect.signature(explain).parameters["backend"].default == "auto"
    assert BackendConfig().backend == "auto"


def test_the_callback_default_picks_the_cached_clip_in_a_real_fit(empty_cache: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_neurons import NeuronExplainer, load_history
    from lightning_neurons.demo import PhotoPatchesDataModule, SmallCNN

    put_tiny_checkpoint(empty_cache)
    explainer = NeuronExplainer(  # backend left at its default
        layers=["head"],
        top_k=3,
        reservoir_size=8,
        vocabulary=["classes"],
        show_progress=False,
        on_error="raise",
        # Off: with 2 concepts from a random tiny CLIP the multi-concept stage's solve is singular (reported).
        multi_concept=False,
    )
    data = PhotoPatchesDataModule(classes=["cat", "grass"], train_per_class=8, val_per_class=6, image_size=32)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=TensorBoardLogger(str(empty_cache.parent / "runs"), name="auto", version=0),
        callbacks=[explainer],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoBackendWarning)
        trainer.fit(SmallCNN(num_classes=2, width=4), data)
    (round_,) = explainer.rounds
    assert round_.meta["backend"] == "clip" and len(round_.layer("head")) == 2
    assert load_history(Path(trainer.log_dir) / "neurons").epochs == [0]
