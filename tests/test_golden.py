"""Behaviour is unchanged where it was right: a reduced quickstart gives the history committed before the redesign.

The fixture ``golden/quickstart_history.jsonl`` was written by ``golden/reduced_quickstart.py`` on the code before
the settings/session redesign (commit 8e45e94), with the offline models built before the run
(``golden/make_fixture_with_old_code.py``): the old callback's setup drew from the global RNG when it built them
(weight init before the weights are read), which shifted the training's random stream whenever a process had not
built them yet; the callback now keeps that stream untouched, so the fixture is the old code's run in the state where
it did so too. Texts, sample ids and drift flags must match exactly; scores within float tolerance (the same kernels
on another CPU may round differently in the last bits).
"""

import json
import math
from pathlib import Path

import pytest

from golden.reduced_quickstart import run

FIXTURE = Path(__file__).parent / "golden" / "quickstart_history.jsonl"
EXACT = (
    "layer",
    "unit",
    "epoch",
    "description",
    "source",
    "top_sample_ids",
    "previous_epoch",
    "previous_description",
    "changed",
)
CLOSE = ("score", "margin", "concept_score", "similarity", "jaccard", "score_delta")


def _records(path: Path) -> dict[tuple, dict]:
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[(rec["layer"], rec["unit"], rec["epoch"])] = rec
    return records


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.slow
def test_reduced_quickstart_history_is_unchanged(tmp_path):
    expected = _records(FIXTURE)
    got = _records(run(tmp_path))
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        for field in EXACT:
            assert have[field] == want[field], (key, field)
        for field in CLOSE:
            assert _close(have[field], want[field]), (key, field, have[field], want[field])
        assert [a["text"] for a in have["alternatives"]] == [a["text"] for a in want["alternatives"]], key
