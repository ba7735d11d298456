"""Candidate concepts for explanations, composed from sources, with disk-cached text embeddings.

Sources, in the order given (duplicates keep their first position):

- ``"general"``: the built-in visual vocabulary shipped with the package (colours, textures, materials,
  shapes, object parts, objects, scenes and simplified ImageNet class names; about 2,100 concepts).
- ``"classes"``: the dataset's class names (``class_names``); skipped when none are given.
- ``"llm"``: the paper's step: a text generator is asked which visual concepts, parts, textures and scenes the
  classes involve; its answer is parsed, cleaned and cached on disk.
- any other entry: a text file, one concept per line, ``#`` starts a comment.

Example:
    >>> vocab = Vocabulary(sources=["general", "classes"], class_names=["cat", "tabby_cat"])
    >>> len(vocab) > 1000, "tabby cat" in vocab
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from lightning_neurons.backends.base import ImageTextEncoder, TextGenerator

BUILTIN_SOURCES = ("general", "classes", "llm")

# Phrased for very small models too: SmolLM2-135M answers this one with parseable "Part: tail" lines.
#: The vocabulary prompt, sent once per class by default. Small instruct models (SmolLM2-135M in the offline pack)
#: ignore "N concepts for these classes" and echo the class names; asked about one class's parts, textures,
#: colours and surroundings they answer with usable items (58 concepts for the 12 demo classes against 10 echoed
#: class names with the older 8-classes-per-prompt wording). ``{count}`` is also available to custom templates.
LLM_PROMPT = "List the visual parts, textures, colours and surroundings of {classes}, one per line."

_MAX_WORDS = 4
_MAX_CHARS = 40
_BULLET = re.compile(r"^\s*(?:[-*\u2022>#]+|\(?\d+[.)\]:]?|\(?[a-zA-Z][.)]\s)\s*")
_ALLOWED = re.compile(r"^[a-z][a-z' -]*[a-z]$")
_STOP_PHRASES = ("here are", "here is", "sure", "visual concepts", "the classes", "i hope", "note", "list of")
# The prompt's own category words, which small models echo back.
_CATEGORY_WORDS = {
    "part",
    "parts",
    "object parts",
    "shape",
    "shapes",
    "colour",
    "colours",
    "color",
    "colors",
    "texture",
    "textures",
    "material",
    "materials",
    "scene",
    "scenes",
    "typical scenes",
    "concept",
    "concepts",
    "class",
    "classes",
    "object",
    "objects",
    "visual part",
    "visual parts",
    "surrounding",
    "surroundings",
}


def default_cache_dir() -> Path:
    """``$LIGHTNING_NEURONS_CACHE`` or ``~/.cache/lightning_neurons``.

    Example:
        >>> default_cache_dir().name in ("lightning_neurons",) or "LIGHTNING_NEURONS_CACHE" in os.environ
        True
    """
    env = os.environ.get("LIGHTNING_NEURONS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_neurons"


def normalize_concept(text: str) -> str:
    """Canonical form of a concept: lowercase, underscores to spaces, single spaces, stripped.

    Example:
        >>> normalize_concept("  Tabby_Cat ")
        'tabby cat'
    """
    return " ".join(text.replace("_", " ").lower().split())


def dedupe(concepts: Iterable[str]) -> list[str]:
    """Normalised concepts without duplicates or empty entries, in first-seen order.

    Example:
        >>> dedupe(["Cat", "dog", "cat ", ""])
        ['cat', 'dog']
    """
    seen: dict[str, None] = {}
    for concept in concepts:
        key = normalize_concept(concept)
        if key:
            seen.setdefault(key, None)
    return list(seen)


def read_concept_file(path: str | os.PathLike[str]) -> list[str]:
    """Concepts of a text file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        FileNotFoundError: If the file does not exist (the message names the path and the valid source names).
        ValueError: If the file is not UTF-8 text (the message names the file and the offending byte), or holds no
            concept.

    Example:
        >>> read_concept_file("my_concepts.txt")  # doctest: +SKIP
        ['rust', 'rivet']
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"concept file not found: {file} (a vocabulary source is one of {list(BUILTIN_SOURCES)} "
            "or a text file with one concept per line)"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a BOM from Windows editors is not a concept
    except UnicodeDecodeError as err:
        line = file.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(
            f"concept file {file} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); "
            "save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    concepts = dedupe(lines)
    if not concepts:
        raise ValueError(
            f"concept file {file} holds no concepts (it is empty, or only blank lines and # comments); "
            "write one concept per line, or leave the file out of the vocabulary"
        )
    return concepts


def general_concepts() -> list[str]:
    """The built-in general visual vocabulary shipped in ``concepts/data/general_concepts.txt``.

    Example:
        >>> len(general_concepts()) >= 1000
        True
    """
    data = resources.files("lightning_neurons.concepts").joinpath("data/general_concepts.txt")
    with resources.as_file(data) as path:
        return read_concept_file(path)


def _label_and_detail(piece: str) -> list[str]:
    """Split ``"Label: detail"`` / ``"Label - detail"`` / ``"**Label** detail"`` into the parts worth keeping.

    A short detail is the concept ("Texture: fur" -> "fur"; the label too unless it is a category word); a long
    one is prose that small models write after the concept they were asked for ("Eyes: the most visible part of
    ...") and only the label is kept.
    """
    bold = re.match(r"^\*\*([^*]+)\*\*:?\s*(.*)$", piece)
    if bold:
        label, detail = bold.group(1), bold.group(2).strip(" -\u2013\u2014:")
        if not detail:  # "**Fur**"
            return [label]
    else:
        parts = re.split(r":|\s[-\u2013\u2014]\s", piece, maxsplit=1)
        if len(parts) == 1:
            return [piece]
        label, detail = parts[0], parts[1].strip(" -\u2013\u2014:")
        if not detail:  # "Cat:" is a heading
            return []
    if len(detail.split()) <= _MAX_WORDS:
        return [detail, label]
    return [label]


def parse_llm_concepts(answer: str, max_words: int = _MAX_WORDS) -> list[str]:
    r"""Clean a language model's list answer into concepts.

    Splits on lines, commas and semicolons; strips numbering, bullets, quotes and parentheticals; reads
    ``Label: detail`` items as the detail when it is short and as the label when it is prose; drops entries that
    are too long, not alphabetic, chatter ("here are ...") or the prompt's own category words; lowercases and
    dedupes.

    Example:
        >>> parse_llm_concepts("Here are some:\n1. Pointed ears\n- striped fur, Whiskers\n3) a very long phrase "
        ...                    "that goes on and on\n4. 42\n5. Eyes: the most visible part is their eyes that shine")
        ['pointed ears', 'striped fur', 'whiskers', 'eyes']
    """
    concepts = []
    for line in answer.splitlines():
        line = _BULLET.sub("", line.strip())
        # A "Label: prose, with commas" item is one item: split on commas only when there is no label.
        head = re.split(r":|\s[-\u2013\u2014]\s|\*\*\s", line, maxsplit=1)[0]
        pieces = [line] if head != line and len(line.split()) > max_words else re.split(r"[,;]", line)
        for raw in pieces:
            for piece in _label_and_detail(_BULLET.sub("", raw.strip())):
                piece = re.sub(r"\(.*?\)|\[.*?\]", " ", piece)  # drop parentheticals: "Fur (soft)" -> "Fur"
                piece = normalize_concept(piece.strip(" \t\"'`*.()[]"))
                piece = re.sub(r"^(?:a|an|the)\s+", "", piece)
                if not piece or len(piece) > _MAX_CHARS or len(piece.split()) > max_words:
                    continue
                if not _ALLOWED.match(piece) or piece.startswith(_STOP_PHRASES) or piece in _CATEGORY_WORDS:
                    continue
                concepts.append(piece)
    return dedupe(concepts)


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def llm_concepts(
    generator: TextGenerator,
    class_names: Sequence[str],
    *,
    classes_per_prompt: int = 1,
    concepts_per_prompt: int = 20,
    max_new_tokens: int = 160,
    prompt: str = LLM_PROMPT,
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> list[str]:
    """Ask a text generator for the visual concepts of a set of classes (the paper's vocabulary step).

    Classes go to the model in chunks of ``classes_per_prompt`` (default one: small models lose track of lists;
    raise it for a large LLM to save prompts). The
    cleaned answer is cached on disk, keyed by a hash of (model name, prompt, class names, settings), so a run
    repeats the generation only when one of them changes.

    Args:
        generator: The text generator.
        class_names: The dataset's class names.
        classes_per_prompt: Classes per prompt.
        concepts_per_prompt: How many concepts each prompt asks for.
        max_new_tokens: Generation limit per prompt.
        prompt: Template with ``{classes}`` and ``{count}`` fields; default :data:`LLM_PROMPT`.
        cache_dir: Cache root; default :func:`default_cache_dir`.
        show_progress: Show a progress bar over prompts.

    Returns:
        Cleaned, deduplicated concepts.

    Example:
        >>> llm_concepts(backend.generator, ["cat", "dog"])  # doctest: +SKIP
        ['whiskers', 'pointed ears', 'fur', ...]
    """
    from tqdm.auto import tqdm

    classes = dedupe(class_names)
    if not classes:
        raise ValueError("the 'llm' vocabulary source needs class_names to prompt the text generator with")
    key = _hash(generator.name, prompt, classes, classes_per_prompt, concepts_per_prompt, max_new_tokens)
    cache_file = Path(cache_dir or default_cache_dir()) / "llm_vocabulary" / f"{_safe(generator.name)}-{key}.json"
    if cache_file.is_file():
        try:
            return list(json.loads(cache_file.read_text(encoding="utf-8"))["concepts"])
        except (ValueError, KeyError, TypeError):  # a damaged cache is regenerated, never trusted
            warnings.warn(f"ignoring the unreadable LLM vocabulary cache {cache_file}; regenerating it", stacklevel=2)
    chunks = [classes[i : i + classes_per_prompt] for i in range(0, len(classes), classes_per_prompt)]
    concepts: list[str] = []
    for chunk in tqdm(chunks, desc="LLM vocabulary", disable=not show_progress or len(chunks) < 2):
        text = prompt.format(classes=", ".join(chunk), count=concepts_per_prompt)
        concepts.extend(parse_llm_concepts(generator.generate(text, max_new_tokens=max_new_tokens)))
    concepts = dedupe(concepts)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": generator.name, "classes": classes, "concepts": concepts}
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(cache_file)  # atomic: a crash never leaves half a cache file
    return concepts


class Vocabulary:
    """An ordered, deduplicated set of candidate concepts with cached text embeddings.

    Concepts are built lazily on first use (the ``"llm"`` source runs the text generator then).

    Args:
        sources: Sources in priority order: ``"general"``, ``"classes"``, ``"llm"`` or paths of concept files
            (one per line, ``#`` comments). A single string is one source.
        class_names: The dataset's class names (for ``"classes"`` and ``"llm"``).
        generator: Text generator for ``"llm"`` (e.g. ``load_backend("embedded").generator``).
        concepts: Extra concepts appended after the sources.
        exclude: Concepts to drop (e.g. words that match everything).
        exclude_general: Concepts to drop from the built-in ``"general"`` source only (the same words from the
            other sources stay): a backend's :attr:`~lightning_neurons.backends.Backend.basis_concepts`.
        cache_dir: Cache root for LLM answers and embeddings; default ``$LIGHTNING_NEURONS_CACHE`` or
            ``~/.cache/lightning_neurons``.
        llm_classes_per_prompt: Classes per LLM prompt.
        llm_concepts_per_prompt: Concepts asked for per LLM prompt.
        show_progress: Progress bars for the LLM and the embedding.

    Raises:
        ValueError: For an empty source list, or ``"llm"`` without a generator.
        FileNotFoundError: (on first use) for a missing concept file.

    Example:
        >>> vocab = Vocabulary(["general", "classes"], class_names=["rusty_bolt", "airplane"])
        >>> vocab.concepts[-1], vocab.origin("airplane")
        ('rusty bolt', 'general')
        >>> emb = vocab.embed(backend.encoder)  # doctest: +SKIP
    """

    def __init__(
        self,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = ("general", "classes"),
        class_names: Sequence[str] | None = None,
        generator: TextGenerator | None = None,
        concepts: Sequence[str] = (),
        exclude: Sequence[str] = (),
        exclude_general: Iterable[str] = (),
        cache_dir: str | os.PathLike[str] | None = None,
        llm_classes_per_prompt: int = 1,
        llm_concepts_per_prompt: int = 20,
        show_progress: bool = True,
    ) -> None:
        if isinstance(sources, str | os.PathLike):
            sources = [sources]
        self.sources = [os.fspath(s) for s in sources]
        if not self.sources and not concepts:
            raise ValueError(f"a vocabulary needs at least one source ({list(BUILTIN_SOURCES)} or a file path)")
        if "llm" in self.sources and generator is None:
            raise ValueError(
                "the 'llm' vocabulary source needs a text generator, e.g. generator=load_backend('embedded').generator"
            )
        self.class_names = list(class_names or [])
        self.generator = generator
        self.extra = list(concepts)
        self.exclude = {normalize_concept(c) for c in exclude}
        self.exclude_general = {normalize_concept(c) for c in exclude_general}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.llm_classes_per_prompt = llm_classes_per_prompt
        self.llm_concepts_per_prompt = llm_concepts_per_prompt
        self.show_progress = show_progress
        self._concepts: list[str] | None = None
        self._origins: dict[str, str] = {}

    def _source_concepts(self, source: str) -> list[str]:
        if source == "general":
            return general_concepts()
        if source == "classes":
            return dedupe(self.class_names)
        if source == "llm":
            assert self.generator is not None  # checked in __init__
            return llm_concepts(
                self.generator,
                self.class_names,
                classes_per_prompt=self.llm_classes_per_prompt,
                concepts_per_prompt=self.llm_concepts_per_prompt,
                cache_dir=self.cache_dir,
                show_progress=self.show_progress,
            )
        return read_concept_file(source)

    @property
    def concepts(self) -> list[str]:
        """The concepts, deduplicated, in source order (built on first access)."""
        if self._concepts is None:
            origins: dict[str, str] = {}
            for source in self.sources:
                skip = self.exclude | self.exclude_general if source == "general" else self.exclude
                for concept in self._source_concepts(source):
                    if concept not in skip:
                        origins.setdefault(concept, source)
            for concept in dedupe(self.extra):
                if concept not in self.exclude:
                    origins.setdefault(concept, "extra")
            self._origins = origins
            self._concepts = list(origins)
        return self._concepts

    def origin(self, concept: str) -> str:
        """The source a concept came from (``"general"``, ``"classes"``, ``"llm"``, a file path or ``"extra"``)."""
        _ = self.concepts
        return self._origins[normalize_concept(concept)]

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.concepts)

    def __getitem__(self, index: int) -> str:
        return self.concepts[index]

    def __contains__(self, concept: object) -> bool:
        return isinstance(concept, str) and normalize_concept(concept) in set(self.concepts)

    def __repr__(self) -> str:
        size = len(self._concepts) if self._concepts is not None else "?"
        return f"Vocabulary(sources={self.sources}, concepts={size})"

    @property
    def fingerprint(self) -> str:
        """A short hash of the concept list (the embedding cache key)."""
        return _hash(self.concepts)

    def embed(
        self,
        encoder: ImageTextEncoder,
        cache_dir: str | os.PathLike[str] | None = None,
        batch_size: int = 1024,
    ) -> Tensor:
        """Text embeddings ``[len(self), D]`` of the concepts, cached on disk per (vocabulary, encoder name).

        Encoders with ``cacheable = False`` (e.g. random weights) are never read from or written to the cache.

        Args:
            encoder: The image-text encoder that scores concepts.
            cache_dir: Cache root; default this vocabulary's ``cache_dir``, else :func:`default_cache_dir`.
            batch_size: Concepts per ``encode_texts`` call (the progress-bar step).

        Example:
            >>> emb = Vocabulary().embed(load_backend("embedded").encoder)  # doctest: +SKIP
            >>> emb.shape  # doctest: +SKIP
            torch.Size([2102, 384])
        """
        from tqdm.auto import tqdm

        concepts = self.concepts
        root = Path(cache_dir).expanduser() if cache_dir is not None else self.cache_dir or default_cache_dir()
        key = _hash(encoder.name, self.fingerprint)
        cache_file = root / "embeddings" / f"{_safe(encoder.name)}-{key}.pt"
        cacheable = bool(getattr(encoder, "cacheable", True))
        if cacheable and cache_file.is_file():
            try:  # weights_only: the cache holds one tensor and must never run code
                cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):
                warnings.warn(f"ignoring the unreadable embedding cache {cache_file}; recomputing it", stacklevel=2)
                cached = None
            if isinstance(cached, Tensor) and cached.ndim == 2 and cached.shape[0] == len(concepts):
                return cached
        parts = []
        steps = range(0, len(concepts), batch_size)
        for start in tqdm(steps, desc="Embedding concepts", disable=not self.show_progress or len(steps) < 2):
            parts.append(encoder.encode_texts(concepts[start : start + batch_size]).float().cpu())
        embeddings = torch.cat(parts) if parts else torch.empty(0, 0)
        if cacheable:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            torch.save(embeddings, tmp)
            tmp.replace(cache_file)
        return embeddings
