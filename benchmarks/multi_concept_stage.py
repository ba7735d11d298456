"""Time the pipeline's multi-concept stage (``explanation.multi_concept.combine_units``) on a synthetic layer.

The stage's inputs are built directly, at the sizes of a wide layer explained with the callback's defaults:
``--units`` units (default 4,096) with ``--top-k`` top crops each (16) and ``--reservoir`` reservoir images (64),
14 x 14 maps (every reservoir position kept), ``--concepts`` concepts (2,000, about the general vocabulary plus
class names) in a 384-d space (MiniLM). Random embeddings and activations: the figure is the stage's cost (the
similarity product of every crop with every concept, the held-out fit, the keep decision and the refit), not its
quality (``benchmarks/quality.py`` measures that). Prints one JSON object.

    python benchmarks/multi_concept_stage.py [--units 4096] [--concepts 2000] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--reservoir", type=int, default=64)
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from lightning_neurons.concepts.concept_set import ConceptSet
    from lightning_neurons.explanation.crops import CropEmbeddings, Regions
    from lightning_neurons.explanation.forward import ForwardResult, LayerMaps, RoundSamples
    from lightning_neurons.explanation.multi_concept import combine_units
    from lightning_neurons.explanation.settings import ExplainConfig
    from lightning_neurons.explanation.units import RoundEvidence, crop_similarities
    from lightning_neurons.recording.types import LayerTopK
    from lightning_neurons.results import UnitExplanation

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    units, k, reservoir, hw = args.units, args.top_k, args.reservoir, 14 * 14
    gen = torch.Generator().manual_seed(0)
    crops = units * k  # no two units share a crop: the largest case
    embeddings = torch.nn.functional.normalize(torch.randn(crops + 2 * reservoir, args.dim, generator=gen), dim=1)
    texts = tuple(f"concept {i}" for i in range(args.concepts))
    concepts = ConceptSet(
        texts, torch.nn.functional.normalize(torch.randn(args.concepts, args.dim, generator=gen), dim=1)
    )
    values = torch.rand(units, k, generator=gen).sort(dim=1, descending=True).values
    topk = LayerTopK(
        "layer",
        "conv",
        units,
        (14, 14),
        values,
        torch.randint(0, 10_000, (units, k), generator=gen),
        torch.zeros(units, k),
    )
    control = torch.rand(units, reservoir * hw, generator=gen).to(device)
    maps = LayerMaps(topk, topk.sample_ids.to(device), torch.empty(0, device=device), control=[control])
    ids = torch.arange(10_000)
    samples = RoundSamples({"layer": topk}, ids, torch.arange(reservoir))
    bank = torch.zeros(10_000, 3, 2, 2, dtype=torch.uint8, device=device)
    forward = ForwardResult(samples, ids.to(device), bank, None, {"layer": maps})
    index = torch.arange(crops, device=device).reshape(units, k)
    empty = torch.empty(0, dtype=torch.long)
    regions = Regions(empty, empty.reshape(0, 4), {"layer": slice(0, crops)}, {"layer": index}, empty, empty, {})
    crop_embeddings = CropEmbeddings(embeddings, crops, 2 * reservoir)
    sims = crop_similarities(crop_embeddings, concepts, device)  # the score stage's product, made before the stage
    evidence = RoundEvidence(forward, regions, crop_embeddings, concepts, {}, sims)
    explanations = [UnitExplanation("layer", u, 0, texts[u % args.concepts], 0.7) for u in range(units)]
    start = time.perf_counter()
    kept = combine_units(explanations, evidence, ExplainConfig())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({**vars(args), "seconds": round(seconds, 2), "combinations_kept": kept}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
