"""A map of all units in TensorBoard's Projector: one point per unit, per layer and explained epoch.

Each point is a unit; its vector is the text embedding of its description (``embed``, e.g.
``backend.encode_descriptions``: units with similar meanings lie close together) or, without an embedder, its
concept-score vector (the scores of its description and alternatives over the union of all units' concepts). The
unit's top region crop is its sprite thumbnail; ``unit``, ``description`` (the shown text), ``kind``, ``score``,
``q_value``, ``changed``, ``gained``, ``lost`` and ``previous`` are its metadata columns, taken from the row every sink
shows (:func:`~lightning_neurons.logging.rows.unit_row`), so the Projector can colour by kind or change and search
descriptions.

Files, next to the TensorBoard event files of the run (``writer.log_dir``)::

    projector_config.pbtxt                          one embedding per layer and epoch, "<prefix>/<layer>:<epoch>"
    <prefix>_projector/<layer>/<step>/tensors.tsv   [units, dim]
    <prefix>_projector/<layer>/<step>/metadata.tsv  header + one row per unit
    <prefix>_projector/<layer>/<step>/sprite.png    thumbnails, row-major, square grid

The config is read back and extended (not kept in memory), so a resumed run, several explainers or the user's own
``add_embedding`` calls on the same folder keep each other's entries; an entry of the same name is replaced.
``max_units`` caps very large layers (the first units by index, so that the same units are mapped every epoch;
the sprite also grows with the square root of the units: 2,000 units of 32 px make a 1,440 px sprite, and
TensorBoard's limit is 8,192 px).

Cost, measured on 2 CPU cores: see the README's logger section (units and seconds per call).

Example:
    >>> from torch.utils.tensorboard import SummaryWriter  # doctest: +SKIP
    >>> projector = ProjectorWriter(SummaryWriter("runs/x"), embed=backend.encode_descriptions)  # doctest: +SKIP
    >>> projector.write_round(output)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_neurons.files import write_text_atomic
from lightning_neurons.logging.base import RoundOutput
from lightning_neurons.logging.rows import round_threshold, unit_row
from lightning_neurons.results import UnitExplanation

#: The projector plugin's config file name (``tensorboard.plugins.projector.metadata.PROJECTOR_FILENAME``).
PROJECTOR_FILENAME = "projector_config.pbtxt"

#: Metadata columns of every point.
METADATA_COLUMNS = ("unit", "description", "kind", "score", "q_value", "changed", "gained", "lost", "previous")

#: Thumbnail of a unit without a crop preview (mid grey).
_BLANK = 0.5


def _tsv_cell(value: Any) -> str:
    # The projector splits rows on newlines and columns on tabs.
    return re.sub(r"[\t\r\n]+", " ", str(value)).strip() or "–"


def concept_vectors(units: Sequence[UnitExplanation], max_concepts: int = 256) -> tuple[Tensor, list[str]]:
    """Concept-score vectors of ``units`` over the union of their description and alternative concepts.

    Args:
        units: The units of one map.
        max_concepts: Keep the concepts that most units scored (ties alphabetical), so that a large layer with
            thousands of distinct concepts gives a compact tensor file.

    Returns:
        ``[len(units), len(concepts)]`` scores (0 where a unit did not score a concept) and the concepts.

    Example:
        >>> from lightning_neurons.results import Alternative
        >>> u = UnitExplanation("fc", 0, 0, "dots", 0.8, concept_score=0.3, alternatives=[Alternative("mesh", 0.1)])
        >>> vectors, concepts = concept_vectors([u])
        >>> concepts, vectors.tolist()
        (['dots', 'mesh'], [[0.30000001192092896, 0.10000000149011612]])
    """
    counts = Counter(t for u in units for t in {u.description, *(a.text for a in u.alternatives)} if t)
    concepts = sorted(sorted(counts, key=lambda c: (-counts[c], c))[:max_concepts])
    index = {c: i for i, c in enumerate(concepts)}
    out = torch.zeros(len(units), max(len(concepts), 1))
    for row, u in enumerate(units):
        for a in u.alternatives:
            if a.text in index:
                out[row, index[a.text]] = max(float(out[row, index[a.text]]), float(a.score))
        if u.description in index:
            out[row, index[u.description]] = float(u.concept_score)
    return out, concepts


def _thumbnails(output: RoundOutput, units: Sequence[UnitExplanation], size: int) -> Tensor:
    """``[N, 3, size, size]`` float thumbnails of the units' top crops (grey without a preview)."""
    thumbs = torch.full((len(units), 3, size, size), _BLANK)
    by_shape: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    for row, u in enumerate(units):
        previews = output.round.previews.get(u.key)
        if previews is not None and previews.numel() > 0:
            by_shape.setdefault(tuple(previews.shape[1:]), []).append((row, previews[0]))
    for group in by_shape.values():  # crops of one size are resized in one call
        rows = [r for r, _ in group]
        crops = torch.stack([c for _, c in group]).float() / 255.0
        thumbs[rows] = torch.nn.functional.interpolate(crops, size=(size, size), mode="bilinear", antialias=True)
    return thumbs.clamp(0, 1)


def _sprite(thumbs: Tensor) -> np.ndarray:
    """Tile thumbnails row-major into the square sprite the projector expects (``uint8 [H, W, 3]``)."""
    n, _, size, _ = thumbs.shape
    side = max(1, math.ceil(math.sqrt(n)))
    tiles = torch.zeros(side * side, 3, size, size)
    tiles[:n] = thumbs
    # [side*side, 3, s, s] -> [side, side, 3, s, s] -> [3, side, s, side, s] -> [3, side*s, side*s]
    sprite = tiles.reshape(side, side, 3, size, size).permute(2, 0, 3, 1, 4).reshape(3, side * size, side * size)
    return (sprite * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class ProjectorWriter:
    """Writes a TensorBoard Projector map of every unit of every layer after each round.

    Args:
        writer: The run's ``SummaryWriter`` (files go into its ``log_dir``), or a folder path.
        max_units: Cap of units per layer and map (the first units by index); ``None`` maps all.
        embed: Text embedder of the descriptions (``Callable[[list[str]], Tensor]``, e.g.
            ``backend.encode_descriptions``); ``None`` maps concept-score vectors (:func:`concept_vectors`).
        thumbnail: Sprite thumbnail side in pixels.

    Raises:
        ValueError: If ``max_units`` or ``thumbnail`` is not positive.
    """

    def __init__(
        self,
        writer: Any,
        max_units: int | None = 2000,
        embed: Callable[[list[str]], Any] | None = None,
        thumbnail: int = 32,
    ) -> None:
        if max_units is not None and max_units < 1:
            raise ValueError(f"max_units must be None or >= 1, got {max_units}")
        if thumbnail < 1:
            raise ValueError(f"thumbnail must be >= 1 pixel, got {thumbnail}")
        self.writer = writer
        self.max_units = max_units
        self.embed = embed
        self.thumbnail = thumbnail

    @property
    def log_dir(self) -> Path:
        """The folder that holds ``projector_config.pbtxt``."""
        if isinstance(self.writer, (str, Path)):
            return Path(self.writer)
        get_logdir = getattr(self.writer, "get_logdir", None)
        return Path(get_logdir() if callable(get_logdir) else self.writer.log_dir)

    def vectors(self, units: Sequence[UnitExplanation]) -> Tensor:
        """One row per unit: the description's text embedding, or the concept-score vector without ``embed``."""
        if self.embed is None:
            return concept_vectors(units)[0]
        texts = sorted({u.description for u in units if u.description})
        if not texts:
            return torch.zeros(len(units), 1)
        emb = torch.as_tensor(self.embed(texts)).detach().float().cpu()
        row = {t: i for i, t in enumerate(texts)}
        out = torch.zeros(len(units), emb.shape[1])
        for i, u in enumerate(units):
            if u.description:
                out[i] = emb[row[u.description]]
        return out

    def write_round(self, output: RoundOutput) -> None:
        """Write one map per layer of the round at ``output.step`` and update ``projector_config.pbtxt``."""
        from google.protobuf import text_format
        from tensorboard.plugins.projector import EmbeddingInfo, ProjectorConfig

        root = self.log_dir
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / PROJECTOR_FILENAME
        config = ProjectorConfig()
        if config_path.is_file():
            text_format.Parse(config_path.read_text(), config)
        by_key = {(d.layer, d.unit): d for d in output.drift}
        for layer in output.round.layers:
            units = output.round.layer(layer)
            if self.max_units is not None:
                units = units[: self.max_units]
            if not units:
                continue
            rel = Path(f"{output.prefix}_projector") / _safe(layer) / f"{output.step:05d}"
            folder = root / rel
            folder.mkdir(parents=True, exist_ok=True)
            mat = self.vectors(units).numpy()
            np.savetxt(folder / "tensors.tsv", mat, fmt="%.6g", delimiter="\t")
            rows = ["\t".join(METADATA_COLUMNS)]
            threshold = round_threshold(output)
            for u in units:
                row = unit_row(u, by_key.get(u.key), epoch=output.epoch, confidence_threshold=threshold)  # every sink's
                score = "nan" if row["score"] is None else f"{row['score']:.3f}"
                q = "" if row["q_value"] is None else f"{row['q_value']:.3g}"
                cells = [u.unit, row["description"], row["kind"] or "", score, q, row["changed"], row["gained"]]
                cells += [row["lost"], row["previous_description"] or ""]
                rows.append("\t".join(_tsv_cell(c) for c in cells))
            (folder / "metadata.tsv").write_text("\n".join(rows) + "\n")
            from PIL import Image

            Image.fromarray(_sprite(_thumbnails(output, units, self.thumbnail))).save(folder / "sprite.png")
            name = f"{output.prefix}/{layer}:{output.step:05d}"
            kept = [e for e in config.embeddings if e.tensor_name != name]
            del config.embeddings[:]
            config.embeddings.extend(kept)
            info = EmbeddingInfo(
                tensor_name=name,
                tensor_path=(rel / "tensors.tsv").as_posix(),
                metadata_path=(rel / "metadata.tsv").as_posix(),
            )
            info.tensor_shape.extend(mat.shape)
            info.sprite.image_path = (rel / "sprite.png").as_posix()
            info.sprite.single_image_dim.extend([self.thumbnail, self.thumbnail])
            config.embeddings.append(info)
        write_text_atomic(config_path, text_format.MessageToString(config))  # TensorBoard may read it at any time

    def close(self) -> None:
        """Nothing is buffered (every call writes its files)."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


__all__ = ["METADATA_COLUMNS", "PROJECTOR_FILENAME", "ProjectorWriter", "concept_vectors"]
