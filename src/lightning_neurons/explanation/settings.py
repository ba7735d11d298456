"""Settings of the explanation stage: :class:`ExplainConfig` (importable from ``explanation.pipeline`` too).

Example:
    >>> ExplainConfig(quantile=0.99).correction_value.name
    'control'
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from lightning_neurons.backends.base import DEFAULT_CROP_SIDE, encoder_input_side
from lightning_neurons.explanation.ablation import HurtMeasure
from lightning_neurons.explanation.correction import Correction, CorrectionName, as_correction
from lightning_neurons.recording.hooks import ForwardFn, SelectorSpec
from lightning_neurons.recording.hooks import selector_for as _selector_for
from lightning_neurons.recording.units import OutputSelector, TokenMode


@dataclass
class ExplainConfig:
    """Settings of the explanation stage.

    Args:
        crop_size: Side of the square crops given to the image encoder; ``None`` (the default): the side the encoder
            embeds images at (:func:`~lightning_neurons.backends.base.encoder_input_side`, 224 where it does not
            say), so that no crop is resized twice (:meth:`for_encoder` resolves it).
        quantile: Per-unit activation quantile that defines the activated region (Network Dissection: 0.995).
        relative_threshold: Fallback threshold, as a fraction of a map's range, where the quantile leaves nothing.
        padding: Padding added on each side of a region box, as a fraction of its size.
        min_box: Minimum box side as a fraction of the image's shorter side.
        mask_size: Long side of the resolution at which region masks are computed.
        component: ``"peak"`` (the connected component holding the peak) or ``"all"`` (the whole mask's box).
        dedupe_iou: Boxes of the same sample overlapping more than this become one crop (the larger box stands for
            the group). 0.7 was chosen on the development split (``benchmarks/quality.py --quick --crop-size encoder
            --dedupe-iou``, 10 seeds: against 0.8 every figure within a fraction of its seed-to-seed spread, 0.6
            lower on all three conv-layer figures), for 17% fewer crops to embed in the fine-tune's first round.
        box_grid: Region box edges move to the nearest line of a grid of this many steps per image side, half as
            many along a side the box covers at least half of (0: exact boxes; see
            :func:`~lightning_neurons.regions.snap_boxes`). A region that moves a little between rounds keeps its
            crop, which the region-embedding cache then embeds once. 16 was chosen on the development split
            (``benchmarks/quality.py --quick``: no figure moved beyond one unit's worth against exact boxes).
        num_alternatives: Runner-up concepts kept per unit.
        correction: The correction for concepts that match everything: a value,
            :class:`~lightning_neurons.explanation.correction.ControlCorrection` (minus the mean similarity on
            control crops) or :class:`~lightning_neurons.explanation.correction.SoftWPMI` (CLIP-Dissect), or the
            name ``"control"`` / ``"soft_wpmi"``. :attr:`correction_value` is the value the stage uses.
        wpmi_temperature: Softmax scale for soft-WPMI when ``correction`` is the name ``"soft_wpmi"`` (a
            ``SoftWPMI`` value carries its own ``temperature``).
        control_crops_per_image: Random crops per reservoir image added to the control set (besides the whole image).
        confidence_threshold: Deprecated: what a unit shows is decided by its ``kind`` (``selection``,
            ``permutations``, ``q_threshold``, ``gain_margin``). Still accepted; only read, by writers of older
            rounds, when ``confidence_samples > 0`` (a value other than the default warns).
        confidence_samples: Random top-crop sets of the old confidence null (``0``, the default: no confidence,
            ``UnitExplanation.confidence`` is ``None``). It decides nothing any more; kept for callers that read it.
        frequency_penalty: Weight of the penalty on concepts that win across a layer: each unit's concept scores
            minus this times the concept's mean score over the layer's other units, leaving out the units that
            share the unit's top samples (a concept the units really share keeps winning). ``0``: off.
        shared_overlap: Fraction of the smaller top-sample set two units must have in common to count as sharing.
        selection: How a unit's description is chosen: ``"concept_score"`` (the default: the corrected top-crop
            concept score of ``correction``, with the frequency penalty; it reads the unit's top-k crops, which do
            not depend on the seed, so descriptions are stable across seeds) or ``"correlation"`` (the concept whose
            whole-image similarity correlates best with the unit's activations over the reservoir and its top
            samples; measured on MobileNetV2 ``features.16`` with 128 reservoir images, only 60% of the concept-kind
            units kept their description between two seeds, against 94% with ``"concept_score"``). Either way
            ``UnitExplanation.score`` is the correlation of the shown description and its p-value compares that
            correlation with the best correlation over all concepts of permuted activations.
        permutations: Permutations of each unit's activations in the significance test
            (:func:`~lightning_neurons.explanation.significance.permutation_test`); the smallest p-value is
            ``1 / (permutations + 1)``. A unit that could not be significant stops early
            (:func:`~lightning_neurons.explanation.significance.sequential_stop`: its p-value is then at least twice
            ``q_threshold``). ``0``: no test (every unit is kind ``"unclear"`` unless dead).
        q_threshold: Benjamini-Hochberg false discovery rate over a layer's units: units with ``q_value`` above it
            are kind ``"unclear"`` ("no clear concept").
        gain_margin: Cross-validated correlation the concept must add beyond simple image statistics for a
            significant unit to be kind ``"concept"``; at or below it the unit is ``"low_level"``.
        cv_folds: Folds of that cross-validation (folds follow the probe sample ids and the seed).
        ridge: Ridge penalty (per training sample, on standardised columns) of the cross-validated regressions.
        max_control_values: Reservoir activations kept per unit for the quantile threshold.
        multi_concept: Fit each unit's multi-concept explanation (``UnitExplanation.combination``, e.g.
            "stripes (0.62) + zebra (0.38)"): a sparse non-negative combination of up to ``max_concepts`` concepts
            fitted to the unit's activations on its top crops and the reservoir images, kept only where it
            predicts held-out samples better than the description (:mod:`.multi_concept`).
        max_concepts: Largest number of concepts in a combination.
        combination_margin: Held-out correlation a combination must gain over the description to be kept.
        describe: Run the caption-and-summarise stage (needs a captioner and a text generator in the backend).
        describe_crops: Top crops captioned per unit.
        ablation: Run the ablation check (needs labels in the recording source).
        ablation_units: Units to ablate per layer; ``None`` = the preview units.
        ablation_top: Classes reported per ablated unit.
        ablation_measure: How much zeroing a unit hurts a class: ``"probability"`` (default), the drop of the
            class's mean true-class softmax probability; ``"accuracy"``, the drop of its top-1 accuracy, which
            moves in steps of one image per class and is mostly noise on a reservoir of a few hundred samples.
        batch_size: Probe samples per model forward.
        encoder_batch_size: Crops per image-encoder call.
        region_chunk: ``(unit, sample)`` pairs per vectorised region step.
        image_mean: Per-channel mean the model inputs were normalised with (``None``: per-image min-max).
        image_std: Per-channel standard deviation of that normalisation.
        token_mode: How token outputs become patch grids (as in recording).
        output_selector: Which part of a layer's output holds the units: one selector or
            ``{layer name or glob: selector}`` (as in recording).
        forward_fn: How to run the model on a batch of probe inputs, ``forward_fn(model, inputs)`` (``None``:
            ``model(inputs)``), for models whose ``forward`` is not ``forward(images)``; used by the forward
            pass and the ablation.
        preview_size: Side of the preview images.
        preview_count: Previews per unit.
        preview_units: ``{layer: [units]}`` to make previews for; ``None`` = the first 8 units of every layer.
        device: Device for region extraction and scoring; ``None`` = the model's device.
        truncate_forward: Stop each explanation forward pass as soon as every recorded layer has produced its
            output (the rest of the network is not needed: explaining early layers then costs a fraction of a
            full forward). Leave ``False`` for models that call a recorded module more than once per forward.
        seed: Seed of every random draw (control positions and crops, splits, permutations, folds); each layer
            draws from its own generator derived from the seed and its name
            (:mod:`~lightning_neurons.explanation.seeding`), so a layer's records do not depend on the other layers.
        show_progress: Show tqdm progress bars.

    Example:
        >>> ExplainConfig(correction="soft_wpmi", crop_size=128).crop_size
        128
        >>> ExplainConfig(correction="soft_wpmi", wpmi_temperature=5.0).correction_value
        SoftWPMI(temperature=5.0, lam=1.0, p_start=0.998, p_end=0.97, tie_break=0.001)
    """

    crop_size: int | None = None
    quantile: float = 0.995
    relative_threshold: float = 0.5
    padding: float = 0.1
    min_box: float = 0.1
    mask_size: int = 112
    component: Literal["peak", "all"] = "peak"
    dedupe_iou: float = 0.7
    box_grid: int = 16
    num_alternatives: int = 4
    correction: Correction | CorrectionName = "control"
    wpmi_temperature: float = 10.0
    control_crops_per_image: int = 1
    confidence_threshold: float | None = 0.85
    confidence_samples: int = 0
    selection: Literal["correlation", "concept_score"] = "concept_score"
    permutations: int = 200
    q_threshold: float = 0.05
    gain_margin: float = 0.05
    cv_folds: int = 5
    ridge: float = 0.1
    frequency_penalty: float = 0.5
    shared_overlap: float = 0.5
    max_control_values: int = 65536
    multi_concept: bool = True
    max_concepts: int = 3
    combination_margin: float = 0.05
    describe: bool = False
    describe_crops: int = 5
    ablation: bool = False
    ablation_units: dict[str, list[int]] | None = None
    ablation_top: int = 3
    ablation_measure: HurtMeasure = "probability"
    batch_size: int = 64
    encoder_batch_size: int = 256
    region_chunk: int = 1024
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    token_mode: TokenMode = "auto"
    output_selector: SelectorSpec = None
    forward_fn: ForwardFn | None = None
    preview_size: int = 64
    preview_count: int = 8
    preview_units: dict[str, list[int]] | None = None
    device: str | None = None
    truncate_forward: bool = False
    seed: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if not 0.0 <= self.relative_threshold <= 1.0:
            raise ValueError(f"relative_threshold must be in [0, 1], got {self.relative_threshold}")
        self.correction_value  # noqa: B018 - validates the correction (raises for an unknown name or value)
        if self.component not in ("peak", "all"):
            raise ValueError(f"component must be 'peak' or 'all', got {self.component!r}")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] or None, got {self.confidence_threshold}")
        if self.box_grid < 0:
            raise ValueError(f"box_grid must be >= 0 (0: exact boxes), got {self.box_grid}")
        if self.confidence_samples < 0:
            raise ValueError(f"confidence_samples must be >= 0, got {self.confidence_samples}")
        if self.confidence_threshold != 0.85:
            warnings.warn(
                "confidence_threshold is deprecated: what a unit shows follows its kind (q_threshold, gain_margin)",
                DeprecationWarning,
                stacklevel=3,
            )
        if self.selection not in ("correlation", "concept_score"):
            raise ValueError(f"selection must be 'correlation' or 'concept_score', got {self.selection!r}")
        if self.permutations < 0:
            raise ValueError(f"permutations must be >= 0, got {self.permutations}")
        if not 0.0 < self.q_threshold <= 1.0:
            raise ValueError(f"q_threshold must be in (0, 1], got {self.q_threshold}")
        if not -1.0 <= self.gain_margin < 2.0:
            raise ValueError(f"gain_margin must be in [-1, 2), got {self.gain_margin}")
        if not 2 <= self.cv_folds <= 20:
            raise ValueError(f"cv_folds must be an integer in [2, 20], got {self.cv_folds}")
        if not self.ridge >= 0.0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if not self.frequency_penalty >= 0.0:
            raise ValueError(f"frequency_penalty must be >= 0, got {self.frequency_penalty}")
        if not 0.0 < self.shared_overlap <= 1.0:
            raise ValueError(f"shared_overlap must be in (0, 1], got {self.shared_overlap}")
        if not 1 <= self.max_concepts <= 5:
            raise ValueError(f"max_concepts must be an integer in [1, 5], got {self.max_concepts}")
        if not 0.0 <= self.combination_margin < 2.0:
            raise ValueError(f"combination_margin must be in [0, 2), got {self.combination_margin}")
        for name in ("crop_size", "batch_size", "encoder_batch_size", "region_chunk", "mask_size", "preview_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def for_encoder(self, encoder: Any) -> ExplainConfig:
        """These settings with ``crop_size`` resolved for ``encoder`` (unchanged when it is set).

        Example:
            >>> class Encoder:
            ...     image_size = 128
            >>> ExplainConfig().for_encoder(Encoder()).crop_size
            128
            >>> ExplainConfig(crop_size=96).for_encoder(Encoder()).crop_size
            96
        """
        if self.crop_size is not None:
            return self
        resolved = copy.copy(self)  # not dataclasses.replace: that validates again and repeats deprecation warnings
        resolved.crop_size = encoder_input_side(encoder) or DEFAULT_CROP_SIDE
        return resolved

    @property
    def crop_side(self) -> int:
        """``crop_size`` of settings resolved for their encoder (:meth:`for_encoder`).

        Raises:
            ValueError: If ``crop_size`` is ``None`` (the stages get settings resolved by the pipeline).
        """
        if self.crop_size is None:
            raise ValueError("crop_size is not resolved for an encoder yet: use ExplainConfig.for_encoder(encoder)")
        return self.crop_size

    @property
    def correction_value(self) -> Correction:
        """The correction as a value: ``correction`` itself, or the value its name stands for."""
        if isinstance(self.correction, str):
            return as_correction(self.correction, temperature=self.wpmi_temperature)
        return as_correction(self.correction)

    def selector_for(self, layer: str) -> OutputSelector | None:
        """The output selector of one layer: an exact key of ``output_selector``, else its first matching glob."""
        return _selector_for(self.output_selector, layer)


__all__ = ["ExplainConfig"]
