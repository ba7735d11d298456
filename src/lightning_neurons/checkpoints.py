"""Reading checkpoints without running their code.

A ``.ckpt`` file is a pickle: loading it with ``torch.load(weights_only=False)`` runs whatever the file asks for,
and checkpoints are shared and downloaded. Every checkpoint this library reads goes through :func:`load_checkpoint`,
which only unpickles tensors and plain Python types (``weights_only=True``). Lightning checkpoints written with
:class:`~lightning_neurons.NeuronExplainer` hold only such types (the callback state is tensors, numbers, strings,
lists and dicts), so they load; a file that needs more fails with one :class:`CheckpointError` line that names the
file, says why, and what to do.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
    >>> torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)}}, path)
    >>> load_checkpoint(path)["epoch"]
    3
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint", "load_model", "load_model_weights", "summarize_error"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely: not a PyTorch file, truncated, or holding arbitrary objects."""


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dictionary with ``torch.load(weights_only=True)``.

    Args:
        path: The ``.ckpt`` / ``.pt`` file.
        map_location: Where tensors go (default CPU).

    Returns:
        The checkpoint's top-level dictionary.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        CheckpointError: If the file needs more than tensors and plain types to unpickle (it would run code), is
            not a PyTorch file, is truncated, or is not a dictionary.

    Example:
        >>> state = load_checkpoint("runs/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
        >>> state["epoch"], sorted(state["state_dict"])[:1]  # doctest: +SKIP
        (4, ['features.block1.bn.bias'])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _GLOBAL.search(str(err)):  # a bad opcode: bytes that are no pickle, not a hostile one
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({summarize_error(err)}); it may be truncated or corrupt: "
                "use another checkpoint or save it again"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load, it holds Python objects that could run code when unpickled "
            f"({summarize_error(err)}); re-save its weights from a trusted copy with "
            "torch.save({'state_dict': model.state_dict()}, path), or allow known classes with "
            "torch.serialization.add_safe_globals"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({summarize_error(err)}); it may be truncated or corrupt: "
            "use another checkpoint or save it again"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: holds a {type(state).__name__}, not a checkpoint dictionary; save a dict such as "
            "{'state_dict': model.state_dict()}"
        )
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike[str], state: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's ``state_dict`` into ``model`` (safely, see :func:`load_checkpoint`).

    Args:
        model: The network (a LightningModule or any ``nn.Module``).
        path: The checkpoint (named in errors).
        state: The already loaded checkpoint, to avoid reading it twice.

    Raises:
        CheckpointError: If the checkpoint has no ``state_dict`` or it does not fit the model.

    Example:
        >>> load_model_weights(SmallCNN(num_classes=4), "epoch=3.ckpt")  # doctest: +SKIP
    """
    state = load_checkpoint(path) if state is None else state
    weights = state.get("state_dict", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: has no 'state_dict' of tensors; is it a model checkpoint?")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its weights do not fit {type(model).__name__} ({summarize_error(err)}); pass the model class and "
            "arguments the checkpoint was trained with"
        ) from None


def load_model(
    model_class: type[nn.Module], path: str | os.PathLike[str], model_args: dict[str, Any] | None = None
) -> nn.Module:
    """Build ``model_class`` from a checkpoint, in eval mode, without unpickling anything but weights.

    A LightningModule class is rebuilt with its ``load_from_checkpoint`` (so the saved hyperparameters apply),
    after :func:`load_checkpoint` has checked that the file holds only tensors and plain types; Lightning is asked
    for ``weights_only=True`` too where it supports it. Any other ``nn.Module`` class is built without arguments
    and gets the checkpoint's ``state_dict`` (so does a LightningModule class given a plain weights file).

    Args:
        model_class: The LightningModule or ``nn.Module`` class the checkpoint was trained with.
        path: The checkpoint.
        model_args: Keyword arguments of ``model_class`` (for a LightningModule they override the saved
            hyperparameters; a module that did not call ``save_hyperparameters`` needs them all).

    Raises:
        CheckpointError: If the file is unsafe or unreadable (see :func:`load_checkpoint`) or its weights do not
            fit the model.

    Example:
        >>> model = load_model(SmallCNN, "runs/version_0/checkpoints/epoch=3-step=40.ckpt")  # doctest: +SKIP
    """
    state = load_checkpoint(path)
    loader = getattr(model_class, "load_from_checkpoint", None)
    if loader is None or "pytorch-lightning_version" not in state:  # a plain {"state_dict": ...} file
        model = model_class(**(model_args or {}))
        load_model_weights(model, path, state)
        return model.eval()
    # The file passed the weights_only check above, so Lightning's own unpickling of it cannot run code either.
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    if "weights_only" in inspect.signature(loader).parameters:
        kwargs["weights_only"] = True
    try:
        model = loader(str(path), **(model_args or {}), **kwargs)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path}: cannot rebuild {model_class.__name__} from it ({summarize_error(err)}); pass the model class the "
            "checkpoint was trained with, and its arguments where it did not save them (--model-args / model_args)"
        ) from None
    return model.eval()


# How torch's weights-only unpickler names a class or function it refused to import.
_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global:(?: GLOBAL)?) ([\w.]+)", re.IGNORECASE)


def summarize_error(err: BaseException) -> str:
    r"""The line of a (multi-line) torch loading error that says what was found, at most 200 characters.

    Example:
        >>> summarize_error(RuntimeError("Error(s) in loading state_dict for M:\n\tMissing key(s): 'w'."))
        "Error(s) in loading state_dict for M: Missing key(s): 'w'"
    """
    # torch's messages run over many lines of advice; keep the line that says what was found.
    text = str(err).strip()
    found = _GLOBAL.search(text)
    operand = re.search(r"Unsupported operand [^\n]+", text)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if found:
        line = f"it would import {found.group(1)}"
    elif operand:
        line = operand.group(0)
    elif not lines:
        line = type(err).__name__
    else:  # "Error(s) in loading state_dict for M:" says nothing without the line after it
        line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    line = line.rstrip(".")
    return line if len(line) <= 200 else line[:197] + "..."
