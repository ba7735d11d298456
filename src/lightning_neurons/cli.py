"""The ``lightning-neurons`` command: ``fit`` (LightningCLI), ``explain``, ``history``, ``report``, ``evaluate``.

Only this module prints. User mistakes end in one ``error:`` line (set ``LIGHTNING_NEURONS_TRACEBACK=1`` for the
full traceback); the exit status is 2 for usage errors and 1 for failures.

Example:
    $ lightning-neurons fit --config configs/quickstart.yaml
    $ lightning-neurons history lightning_logs/version_0
    $ lightning-neurons report lightning_logs/version_0 -o report.html
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_neurons.results import dumps_strict

_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, KeyError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        return _guard(lambda: _fit(argv[1:]))
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return _guard(lambda: args.handler(args))


def _guard(run: Any) -> int:
    # A user error becomes one `error: ...` line with the fix (LIGHTNING_NEURONS_TRACEBACK=1 re-raises it);
    # anything else is a bug and keeps its traceback.
    import errno
    import pickle

    from lightning_neurons.backends.base import ModelLoadError
    from lightning_neurons.checkpoints import summarize_error
    from lightning_neurons.drift.history import HistoryLockedError

    try:
        return int(run() or 0)
    except BrokenPipeError:  # output piped into `head` & co.: stop quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        text = str(err).strip() or type(err).__name__
        if isinstance(err, ModelLoadError):
            # A short paragraph (which model, where it was looked for, what to do): keep it whole.
            message, code = " ".join(text.split()), 1
        elif isinstance(err, (*_USER_ERRORS, HistoryLockedError)):
            message, code = text.splitlines()[0], 2
        elif isinstance(err, pickle.UnpicklingError):  # e.g. Lightning resuming `fit --ckpt_path` from it
            message = f"refused to unpickle a checkpoint ({summarize_error(err)}); use a checkpoint you trust"
            code = 2
        elif isinstance(err, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
            message, code = f"{summarize_error(err)}; use a checkpoint of this model and config", 2
        elif isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            message, code = f"{err.strerror}: {err.filename or 'output'}; free some space and run again", 1
        elif isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            message, code = f"{err.strerror}: {err.filename or 'output'}; check the folder's permissions", 1
        else:
            raise
        if os.environ.get("LIGHTNING_NEURONS_TRACEBACK"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return code


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-neurons",
        description="Explain what the neurons of a vision network mean, while it trains or from checkpoints.",
        epilog="`lightning-neurons fit --help` shows the LightningCLI options (trainer, model, data, callbacks).",
    )
    sub = parser.add_subparsers(title="commands", metavar="{fit,explain,history,report,evaluate}")
    sub.add_parser("fit", help="train with LightningCLI (configs/quickstart.yaml is the offline quickstart)")

    explain = sub.add_parser("explain", help="explain a saved checkpoint (or a directory of them) post hoc")
    explain.add_argument("--checkpoint", required=True, help="a .ckpt file, or a directory explained in epoch order")
    explain.add_argument("--model-class", required=True, help="import path of the LightningModule, pkg.module.Class")
    explain.add_argument("--data", required=True, help="import path of a LightningDataModule (its val_dataloader)")
    explain.add_argument("--data-args", default="{}", help="JSON keyword arguments of the data module")
    explain.add_argument(
        "--model-args",
        default="{}",
        help="""JSON keyword arguments of the model class, e.g. '{"num_classes": 10}' (they override a """
        "LightningModule's saved hyperparameters; a module without save_hyperparameters needs them all)",
    )
    explain.add_argument("--layers", required=True, nargs="+", help="layer names or glob patterns")
    explain.add_argument("--top-k", type=int, default=16, help="top samples per unit (default 16)")
    explain.add_argument(
        "--backend",
        default="auto",
        help="auto (open_clip if its weights are cached or can be fetched, else embedded), embedded (offline), clip "
        "or hf (default auto)",
    )
    explain.add_argument("--backend-args", default="{}", help="JSON keyword arguments of the backend")
    explain.add_argument("--vocabulary", nargs="*", default=None, help="general, classes, llm and/or concept files")
    explain.add_argument(
        "--class-names", nargs="+", default=None, help="class names by index (default: the data module's classes)"
    )
    explain.add_argument("--seed", type=int, default=0, help="seed of the reservoir and of any sampling (default 0)")
    explain.add_argument(
        "--reservoir-size", type=int, default=256, help="random validation images used as control set (default 256)"
    )
    explain.add_argument(
        "--log-units",
        nargs="+",
        default=["8"],
        help="units per layer with TensorBoard cards and crops: a count, unit indices, or 'all' (default 8)",
    )
    explain.add_argument("--image-mean", type=float, nargs=3, default=None, help="input normalisation mean")
    explain.add_argument("--image-std", type=float, nargs=3, default=None, help="input normalisation std")
    explain.add_argument("--describe", action="store_true", help="caption crops and summarise them with the LLM")
    explain.add_argument(
        "--no-multi-concept",
        dest="multi_concept",
        action="store_false",
        help="do not fit multi-concept explanations (weighted combinations of up to 3 concepts)",
    )
    explain.add_argument(
        "--evaluate", action="store_true", help="also measure explanation quality on held-out probe samples"
    )
    explain.add_argument("-o", "--output-dir", default="neurons_posthoc", help="where history/TensorBoard/report go")
    explain.set_defaults(handler=_explain)

    history = sub.add_parser(
        "history",
        help="print per-layer drift summaries of a run (changes of meaning, and apart the multi-concept "
        "combinations whose concept set changed); --export writes CSV/JSON",
    )
    history.add_argument("run_dir", help="a run's log directory (or its history.jsonl)")
    history.add_argument("--layer", action="append", default=None, help="only this layer (repeat for several)")
    history.add_argument(
        "--limit", type=int, default=20, help="units listed per section (meaning changes, ...; default 20, 0: all)"
    )
    history.add_argument(
        "--export",
        action="append",
        default=None,
        metavar="PATH",
        help="also write the history to PATH (.csv, .json or .jsonl; repeat for several); nothing is written unasked",
    )
    history.add_argument("--csv", default=None, help="write a CSV export here (same as --export PATH.csv)")
    history.add_argument("--json", default=None, help="write a JSON export here (same as --export PATH.json)")
    history.set_defaults(handler=_history)

    report = sub.add_parser("report", help="write a self-contained HTML report of a run")
    report.add_argument("run_dir", help="a run's log directory (or its history.jsonl)")
    report.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    report.add_argument(
        "--max-units", type=int, default=None, help="units shown per layer (default 256, watched units first; 0: all)"
    )
    report.set_defaults(handler=_report)

    evaluate = sub.add_parser(
        "evaluate",
        help="measure explanation quality against baselines (built-in benchmark)",
        epilog="Without RUN_DIR: the built-in benchmark against baselines. Any checkpoint: explain ... --evaluate",
    )
    evaluate.add_argument(
        "run_dir", nargs="?", help="a `lightning-neurons fit` run: evaluate its newest checkpoint with its settings"
    )
    evaluate.add_argument("--checkpoint", default=None, help="evaluate this checkpoint of the run instead")
    evaluate.add_argument(
        "--data-args",
        default="{}",
        help="""RUN_DIR: JSON data-module arguments replacing the run's, e.g. '{"val_per_class": 96}' (more held-out """
        "samples)",
    )
    evaluate.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="built-in benchmark: seeds to average (default 0 1 2)"
    )
    evaluate.add_argument(
        "--protocol",
        choices=["final-layer", "simulation"],
        default=None,
        help="a published protocol on your model and data: CLIP-Dissect's final-layer accuracy or Linear "
        "Explanations' simulation correlation (needs --model and --probe)",
    )
    evaluate.add_argument("--model", default=None, help="--protocol: torchvision:<name> (e.g. torchvision:resnet50)")
    evaluate.add_argument("--weights", default="DEFAULT", help="--protocol: torchvision weights tag, 'none' for random")
    evaluate.add_argument("--probe", default=None, help="--protocol: an ImageFolder (one folder per class)")
    evaluate.add_argument("--layer", default=None, help="--protocol: the layer (default: the last Linear)")
    evaluate.add_argument("--backend", default="clip", help="--protocol: clip (open_clip) or embedded")
    evaluate.add_argument("--backend-args", default="{}", help="--protocol: JSON backend arguments")
    evaluate.add_argument("--max-images", type=int, default=None, help="--protocol: a seeded subset of the probe")
    evaluate.add_argument("--image-size", type=int, default=224, help="--protocol: input side (default 224)")
    evaluate.add_argument("--top-k", type=int, default=10, help="--protocol: top samples per unit (default 10)")
    evaluate.add_argument("-o", "--output", default=None, help="write the JSON result here")
    evaluate.set_defaults(handler=_evaluate)
    return parser


def _fit(argv: list[str]) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    import lightning_neurons.callback  # noqa: F401  (registers NeuronExplainer for --trainer.callbacks+=)
    from lightning_neurons.callback import NeuronExplainer

    with warnings.catch_warnings():
        # We hand LightningCLI the arguments after `fit` ourselves; its warning about sys.argv is moot here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = LightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["fit", *argv],
            save_config_kwargs={"overwrite": True},
        )
    explainers = [cb for cb in cli.trainer.callbacks if isinstance(cb, NeuronExplainer)]  # type: ignore[attr-defined]
    from lightning_neurons.logging.tensorboard import TENSORBOARD_SAMPLES_FLAG

    if cli.trainer.log_dir:
        print(f"\nTensorBoard logs:  tensorboard --logdir {cli.trainer.log_dir} {TENSORBOARD_SAMPLES_FLAG}")
    for explainer in explainers:
        for label, path in explainer.outputs().items():
            print(f"{label + ':':<18} {path}")
    close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the default process group once a fit has ended well on this rank (every rank gets here).

    Left to interpreter shutdown, gloo's worker threads are torn down while Python is being finalised, which now and
    then aborts a DDP run that succeeded ("terminate called without an active exception", exit code -6; PyTorch asks
    programs to call ``destroy_process_group`` at the end of ``main``). Not called after a failure: a rank that
    raised must not wait on ranks still inside a collective.

    Example:
        >>> close_process_group()  # no process group: nothing to do
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not an import path like package.module.Class")
    return getattr(importlib.import_module(module), name)


def _explain(args: argparse.Namespace) -> int:
    from lightning_neurons.posthoc import explain_checkpoints

    model_class = _import(args.model_class)
    datamodule = _import(args.data)(**json.loads(args.data_args))
    datamodule.setup("validate")
    rounds = explain_checkpoints(
        args.checkpoint,
        model_class,
        datamodule.val_dataloader(),
        args.layers,
        output_dir=args.output_dir,
        top_k=args.top_k,
        backend=args.backend,
        backend_kwargs=json.loads(args.backend_args),
        vocabulary=args.vocabulary,
        class_names=args.class_names or getattr(datamodule, "classes", None),
        model_args=_json_object(args.model_args, "--model-args"),
        seed=args.seed,
        reservoir_size=args.reservoir_size,
        log_units=_log_units(args.log_units),
        image_mean=args.image_mean,
        image_std=args.image_std,
        describe=args.describe,
        multi_concept=args.multi_concept,
        evaluate=args.evaluate,
    )
    from lightning_neurons.logging.printout import round_lines

    for rnd in rounds:
        for line in round_lines(rnd):  # the rows every sink shows
            print(line)
        if rnd.evaluation is not None:
            methods = {"explanations": rnd.evaluation.metrics, **rnd.evaluation.baselines}
            for name, values in methods.items():
                metrics = {k: round(v, 4) for k, v in values.items() if isinstance(v, (int, float))}
                print(f"  evaluation ({name}): " + dumps_strict(metrics))
    print(f"outputs: {Path(args.output_dir).resolve()}")
    return 0


def _history(args: argparse.Namespace) -> int:
    from lightning_neurons.drift.history import load_history, resolve_history_path
    from lightning_neurons.logging.printout import history_lines

    path = resolve_history_path(args.run_dir)
    history = load_history(path)
    if args.layer:
        history = _only_layers(history, args.layer)
    for line in _limited(history_lines(history), args.limit):  # the rows every sink shows
        print(line)
    rounds, needed = len(history.epochs), history.stable_rounds
    if len(history) and rounds <= needed:
        print(
            f"stable: units whose meaning held for the last {needed} comparisons; that needs {needed + 1} explained "
            f"rounds, this history has {rounds}, so it is 0 until then"
        )
    # Exports only when asked, never over the history that was read.
    exports = [*(args.export or []), *([args.csv] if args.csv else []), *([args.json] if args.json else [])]
    for target in map(Path, exports):
        if isinstance(path, Path) and target.resolve() == path.resolve():
            raise ValueError(f"--export {target} is the history being read; export to another file")
        if target.suffix == ".csv":
            history.to_csv(target)
        elif target.suffix == ".json":
            history.to_json(target)
        elif target.suffix == ".jsonl":
            history.to_jsonl(target)
        else:
            raise ValueError(f"--export {target}: use a .csv, .json or .jsonl file name")
        print(f"wrote {target}")
    return 0


def _only_layers(history: Any, layers: list[str]) -> Any:
    """The history of the given layers only (an unknown name lists the layers there are)."""
    from lightning_neurons.drift.history import RunHistory

    unknown = [name for name in layers if name not in history.layers]
    if unknown:
        raise ValueError(f"--layer {', '.join(unknown)}: not in this history; its layers are {history.layers}")
    state = history.state_dict()
    state["records"] = [r for r in state["records"] if r["layer"] in layers]
    return RunHistory.from_state_dict(state)


def _limited(lines: list[str], limit: int) -> list[str]:
    """At most ``limit`` indented lines per section of the printout (0: all), with a count of the rest."""
    if limit <= 0:
        return lines
    out: list[str] = []
    shown = hidden = 0
    for line in [*lines, ""]:
        if line.startswith("  "):
            if shown < limit:
                out.append(line)
                shown += 1
            else:
                hidden += 1
            continue
        if hidden:
            out.append(f"  ... and {hidden} more (--limit 0 shows all)")
        shown = hidden = 0
        out.append(line)
    return out[:-1]


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{{\"k\": 1}}', got {text!r}")
    return value


def _log_units(values: list[str]) -> int | list[int] | None:
    """``--log-units``: ``all``, a count, or unit indices."""
    if values == ["all"]:
        return None
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--log-units takes a count, unit indices or 'all', got {' '.join(values)}") from None
    return numbers[0] if len(numbers) == 1 else numbers


def _report(args: argparse.Namespace) -> int:
    from lightning_neurons.logging.report import write_report

    limit: dict[str, Any] = {} if args.max_units is None else {"max_units": args.max_units or None}
    path = write_report(args.run_dir, args.output, **limit)
    print(f"wrote {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.protocol is not None:
        return _protocol(args)
    if args.run_dir is not None:
        from lightning_neurons.posthoc import evaluate_run

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            rnd = evaluate_run(args.run_dir, checkpoint=args.checkpoint, data_args=json.loads(args.data_args))
        evaluation = rnd.evaluation
        result = {
            "epoch": rnd.epoch,
            "evaluation": evaluation.metrics if evaluation is not None else {},
            "baselines": evaluation.baselines if evaluation is not None else {},
        }
    else:
        from lightning_neurons.benchmark import run_benchmark_seeds

        result = run_benchmark_seeds(args.seeds)
    text = dumps_strict(result, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


def _protocol(args: argparse.Namespace) -> int:
    from lightning_neurons.evaluation.protocols import run_protocol

    if not args.model or not args.probe:
        raise SystemExit("error: --protocol needs --model (e.g. torchvision:resnet50) and --probe (an ImageFolder)")
    result = run_protocol(
        args.protocol,
        args.model,
        args.probe,
        args.backend,
        layer=args.layer,
        weights=None if str(args.weights).lower() == "none" else args.weights,
        max_images=args.max_images,
        image_size=args.image_size,
        top_k=args.top_k,
        backend_kwargs=json.loads(args.backend_args),
    )
    print(result["table"])
    if args.output:
        Path(args.output).write_text(dumps_strict(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
