"""The `lightning-neurons` command: shipped configs parse, the quickstart runs, user errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_neurons
from lightning_neurons import NeuronExplainer
from lightning_neurons.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Overrides that make every config instantiable on a CPU-only machine (ddp.yaml asks for 2 GPUs).
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]


def test_all_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"quickstart", "clip", "vit", "ddp"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_instantiates(config, tmp_path):
    import lightning.pytorch as pl

    cli = LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(config), *CPU, f"--trainer.default_root_dir={tmp_path}"],
    )
    explainers = [cb for cb in cli.trainer.callbacks if isinstance(cb, NeuronExplainer)]
    assert len(explainers) == 1
    explainer = explainers[0]
    assert explainer.top_k > 0 and explainer.layers
    # The configured layers exist in the configured model (resolved as the callback does in setup).
    from lightning_neurons.recording.layers import resolve_layers

    assert resolve_layers(cli.model, explainer.layers)


def test_fit_help_lists_callback_arguments_with_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "NeuronExplainer"])
    out = capsys.readouterr().out
    significance = ("selection", "permutations", "q_threshold", "gain_margin")
    for arg in ("layers", "top_k", "backend", "on_error", "every_n_epochs", "describe", *significance):
        assert f"--trainer.callbacks.{arg}" in out
    assert "Show progress bars while explaining" in out  # Google-style Args docstrings become the help


def test_quickstart_command_runs_end_to_end(tmp_path):
    """The README's main job, reduced through a config override, in a fresh process."""
    override = tmp_path / "small.yaml"
    override.write_text(
        f"""
trainer:
  max_epochs: 2
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path / "runs"}, name: quickstart}}
  callbacks:
    - class_path: lightning_neurons.NeuronExplainer
      init_args:
        layers: [features.block4]
        top_k: 2
        reservoir_size: 8
        vocabulary: [classes]
        image_mean: [0.485, 0.456, 0.406]
        image_std: [0.229, 0.224, 0.225]
        log_units: 2
        show_progress: false
        on_error: raise
        evaluate: true
        ablation: true
model:
  init_args: {{width: 4}}
data:
  init_args: {{train_per_class: 8, val_per_class: 12, image_size: 32, classes: [cat, grass, rocket, coins]}}
"""
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_neurons.cli",
        "fit",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--config",
        str(override),
        "--model.init_args.num_classes=4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert "tensorboard --logdir" in result.stdout and str(run_dir / "neurons" / "report.html") in result.stdout
    history = lightning_neurons.load_history(run_dir)
    assert history.epochs == [0, 1] and len(history.units("features.block4")) == 32
    # ablation=True: the two logged units carry the classes their ablation hurts, the others none
    hurt = [history.get("features.block4", u, 1).explanation.ablation for u in range(4)]
    assert any(hurt[:2]) and hurt[2:] == [None, None]
    assert all(c in ("cat", "grass", "rocket", "coins") and d > 0 for h in hurt[:2] for c, d in h or [])
    assert (run_dir / "neurons" / "report.html").is_file()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert "evaluation/embedded/simulation" in scalars  # evaluate=True logs quality metrics each round
    for baseline in ("random", "constant", "label"):  # ... next to its baselines on the same held-out samples
        steps = [e.step for e in events.Scalars(f"evaluation/{baseline}/simulation")]
        assert steps == [e.step for e in events.Scalars("evaluation/embedded/simulation")]
    assert [e.step for e in events.Scalars("neurons/features.block4/mean_score")] == [0, 1]
    texts = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    for unit in (0, 1):
        card = texts.Tensors(f"neurons/features.block4/{unit}/description/text_summary")[-1]
        assert ("zeroing it hurts" in card.tensor_proto.string_val[0].decode()) == bool(hurt[unit])

    # `history` and `report` subcommands on that run.
    assert main(["history", str(run_dir), "--csv", str(tmp_path / "h.csv"), "--json", str(tmp_path / "h.json")]) == 0
    assert (tmp_path / "h.csv").read_text().count("\n") >= 64
    assert json.loads((tmp_path / "h.json").read_text())
    assert main(["report", str(run_dir), "-o", str(tmp_path / "r.html")]) == 0
    assert "features.block4" in (tmp_path / "r.html").read_text()

    # `evaluate RUN_DIR`: the run's own config and newest checkpoint, metrics on held-out validation samples.
    assert main(["evaluate", str(run_dir), "-o", str(tmp_path / "evaluation.json")]) == 0
    evaluated = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluated["epoch"] == 1 and -1.0 <= evaluated["evaluation"]["simulation"] <= 1.0
    assert sorted(evaluated["baselines"]) == ["constant", "label", "random"]
    for metrics in evaluated["baselines"].values():  # measured on the same held-out samples as the explanations
        assert metrics["probe_samples"] == evaluated["evaluation"]["probe_samples"]
        assert metrics["layers"].keys() == evaluated["evaluation"]["layers"].keys()
    # --data-args: a larger validation set than the run's (48 samples) leaves more held-out samples.
    larger = ["evaluate", str(run_dir), "--data-args", '{"val_per_class": 24}', "-o", str(tmp_path / "e96.json")]
    assert main(larger) == 0
    held_out = json.loads((tmp_path / "e96.json").read_text())["evaluation"]["probe_samples"]
    rnd = lightning_neurons.ExplanationRound.from_json(run_dir / "evaluation" / "round_epoch=1.json")
    explained = {i for u in rnd for i in u.top_sample_ids if i >= 0}
    assert held_out == 96 - len(explained)  # 4 classes x 24 validation samples, the top-k sets left out

    # Post hoc on the saved checkpoint directory: one round per checkpoint, in epoch order.
    checkpoints = run_dir / "checkpoints"
    code = main(
        [
            "explain",
            "--checkpoint",
            str(checkpoints),
            "--model-class",
            "lightning_neurons.demo.SmallCNN",
            "--data",
            "lightning_neurons.demo.PhotoPatchesDataModule",
            "--data-args",
            json.dumps(
                {
                    "train_per_class": 8,
                    "val_per_class": 12,
                    "image_size": 32,
                    "classes": ["cat", "grass", "rocket", "coins"],
                }
            ),
            "--layers",
            "features.block4",
            "--top-k",
            "2",
            "--vocabulary",
            "classes",
            "--evaluate",
            "-o",
            str(tmp_path / "posthoc"),
        ]
    )
    assert code == 0
    assert lightning_neurons.load_history(tmp_path / "posthoc").epochs == [1]
    rnd = lightning_neurons.ExplanationRound.from_json(tmp_path / "posthoc" / "round_epoch=1.json")
    assert -1.0 <= rnd.meta["evaluation"]["simulation"] <= 1.0  # --evaluate measured the checkpoint's round


def test_user_errors_are_one_line(capsys, tmp_path):
    assert main(["history", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "history.jsonl" in err[0]
    assert (
        main(
            [
                "explain",
                "--checkpoint",
                str(tmp_path / "missing.ckpt"),
                "--model-class",
                "x.Y",
                "--data",
                "lightning_neurons.demo.PhotoPatchesDataModule",
                "--layers",
                "a",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.startswith("error:")


def test_unknown_layer_fails_before_training_with_close_matches(tmp_path, capsys):
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            *CPU,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks.init_args.layers=[features.blok4]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "features.block4" in err


def test_missing_model_fails_in_setup_with_the_whole_fix(tmp_path, capsys):
    """No download possible: the run stops before training with what was looked for and how to fix it."""
    code = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            *CPU,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks.init_args.backend=clip",
            "--trainer.callbacks.init_args.backend_kwargs={}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: Could not load the open_clip model ViT-B-16")
    assert "pretrained" in err and 'backend="embedded"' in err and "Looked for it in" in err
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained


def test_evaluate_arguments_parse():
    from lightning_neurons.cli import _build_parser

    args = _build_parser().parse_args(["evaluate", "--seeds", "3", "4"])
    assert args.run_dir is None and args.seeds == [3, 4] and json.loads(args.data_args) == {}
    args = _build_parser().parse_args(["evaluate", "run", "--data-args", '{"val_per_class": 96}'])
    assert args.run_dir == "run" and args.seeds == [0, 1, 2] and json.loads(args.data_args) == {"val_per_class": 96}
