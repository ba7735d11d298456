r"""Write the WordNet hypernyms of the 1,000 ImageNet classes (the embedded encoder's ``hypernym_weight``).

ImageNet's classes are WordNet 3.0 noun synsets sorted by id (``n`` + the synset's offset in ``data.noun``), and
torchvision's class names are lemmas of those synsets (two renamed duplicates match by their first word). Each
name is matched to the synsets holding it as a lemma, taking the smallest offset above the previous class's (the
offsets increase with the class index); the output has one line per class, in class order: the class name, then,
tab-separated, ``level:lemma`` for every hypernym up to ``--levels`` levels above it (first lemma of each synset,
underscores as spaces).

Usage (WordNet 3.0's ``data.noun``, e.g. from Debian's ``wordnet-base``)::

    python scripts/imagenet_hypernyms.py /usr/share/wordnet/data.noun \
        > src/lightning_neurons/backends/data/imagenet_hypernyms.tsv
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict


def read_nouns(path: str) -> tuple[dict[int, list[str]], dict[int, list[int]], dict[int, str]]:
    """Lemmas, hypernym offsets (``@`` and ``@i`` pointers) and gloss of every noun synset."""
    lemmas: dict[int, list[str]] = {}
    hypernyms: dict[int, list[int]] = {}
    glosses: dict[int, str] = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.startswith(" "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            glosses[int(fields[0])] = gloss.split(";")[0].strip()
            offset, count = int(fields[0]), int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(count)]
            lemmas[offset] = [w.split("(")[0].replace("_", " ") for w in words]
            at = 4 + 2 * count
            pointers = int(fields[at])
            hypernyms[offset] = [
                int(fields[at + 1 + 4 * i + 1]) for i in range(pointers) if fields[at + 1 + 4 * i] in ("@", "@i")
            ]
    return lemmas, hypernyms, glosses


def match_classes(names: list[str], lemmas: dict[int, list[str]]) -> list[int]:
    """The synset offset of each class name, increasing with the class index."""
    index: dict[str, list[int]] = defaultdict(list)
    for offset, words in lemmas.items():
        for word in words:
            index[word.lower()].append(offset)
    chosen, previous = [], -1
    for name in names:
        # torchvision renamed two duplicated names ("crane bird", "maillot tank suit"): then the first word.
        holders = index.get(name.lower()) or index.get(name.lower().split()[0], [])
        candidates = sorted(o for o in holders if o > previous)
        if not candidates:
            raise ValueError(f"no WordNet noun synset after offset {previous} holds the lemma {name!r}")
        previous = candidates[0]
        chosen.append(previous)
    return chosen


def main() -> None:
    """Write the table to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_noun", help="WordNet 3.0 data.noun")
    parser.add_argument("--levels", type=int, default=8)
    args = parser.parse_args()
    from lightning_neurons.backends.embedded import imagenet_class_names

    names = imagenet_class_names()
    lemmas, hypernyms, _ = read_nouns(args.data_noun)
    for name, offset in zip(names, match_classes(names, lemmas)):
        seen, frontier, parts = {offset}, [offset], []
        for level in range(1, args.levels + 1):
            frontier = [h for o in frontier for h in hypernyms[o] if h not in seen]
            seen.update(frontier)
            parts += [f"{level}:{lemmas[h][0]}" for h in dict.fromkeys(frontier)]
        sys.stdout.write("\t".join([name, *parts]) + "\n")


if __name__ == "__main__":
    main()
