"""Each shipped config runs one reduced epoch through the CLI (ddp.yaml: tests/test_ddp.py, 2 CPU processes;
quickstart.yaml: tests/test_golden.py and tests/test_cli.py).

clip.yaml needs downloads, so its backend points at tiny random-weight open_clip / BLIP / Llama models built from
configs (the same `hf` backend, describe stage, LLM vocabulary and soft-WPMI correction the config asks for).
"""

from pathlib import Path

import pytest

from lightning_neurons import load_history
from lightning_neurons.cli import main
from test_backends import _write_bert_vocab, tiny_blip_dir, tiny_clip_name, tiny_llama_dir  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def reduced(config: str, save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / config),
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.callbacks.init_args.every_n_epochs=1",
        "--trainer.callbacks.init_args.top_k=3",
        "--trainer.callbacks.init_args.show_progress=false",
        "--trainer.callbacks.init_args.on_error=raise",
        "--data.init_args.train_per_class=3",
        "--data.init_args.val_per_class=3",
        *extra,
    ]


def test_vit_config_runs_one_reduced_epoch(tmp_path):
    args = reduced(
        "vit.yaml",
        tmp_path,
        "--trainer.callbacks.init_args.vocabulary=[classes]",
        "--trainer.callbacks.init_args.backend_kwargs={image_size: 64}",
        "--trainer.callbacks.init_args.layers=[backbone.encoder.layers.encoder_layer_*.mlp]",
    )
    assert main(args) == 0
    history = load_history(tmp_path / "vit" / "version_0" / "neurons")
    assert history.epochs == [0]
    assert len(history.layers) == 3 and all(r.explanation.description for r in history.records)


@pytest.mark.slow  # the real hf backend: open_clip, BLIP captioner and causal LM (tiny random weights)
def test_clip_config_runs_one_reduced_epoch_with_tiny_models(tmp_path, tiny_clip_name, tiny_blip_dir, tiny_llama_dir):  # noqa: F811
    kwargs = (
        f"{{encoder: clip, model_name: {tiny_clip_name}, pretrained: null, captioner: {tiny_blip_dir}, "
        f"generator: {tiny_llama_dir}}}"
    )
    args = reduced(
        "clip.yaml",
        tmp_path,
        f"--trainer.callbacks.init_args.backend_kwargs={kwargs}",
        "--trainer.callbacks.init_args.log_units=2",
        "--trainer.callbacks.init_args.layers=[features.block4]",
        "--model.init_args.width=8",
        "--data.init_args.image_size=32",
    )
    assert main(args) == 0
    history = load_history(tmp_path / "clip" / "version_0" / "neurons")
    assert history.epochs == [0] and history.layers == ["features.block4"]
