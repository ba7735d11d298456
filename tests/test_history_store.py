"""The history file as a crash-safe store: partial rounds, cut and corrupted bytes, a full disk, two writers.

Each test injects one fault into a real history file written by :class:`RunHistory` and checks what a reader and
the next writer make of it: a round is visible complete or not at all, and the file never loses a complete round.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import lightning_neurons.drift.store as history_module
from _rounds import bow_embed, make_round
from lightning_neurons.drift.history import (
    HISTORY_FILENAME,
    HistoryLockedError,
    HistoryWriteError,
    RunHistory,
    load_history,
)
from lightning_neurons.results import ExplanationRound, UnitExplanation

UNITS_PER_ROUND = 5  # make_round: 3 units of features.3 and 2 of head.fc


def _written(path: Path, epochs) -> RunHistory:
    history = RunHistory(path=path)
    for e in epochs:
        history.add_round(make_round(e), bow_embed)
    history.close()
    return history


def _reference(epochs) -> RunHistory:
    history = RunHistory()
    for e in epochs:
        history.add_round(make_round(e), bow_embed)
    return history


def _records_per_epoch(history: RunHistory) -> dict[int, int]:
    return {e: len(history.drift(e)) for e in history.epochs}


def test_partial_round_is_not_shown_and_a_resume_completes_it(tmp_path):
    path = tmp_path / HISTORY_FILENAME
    _written(path, range(2))
    # The write of epoch 2 stopped after 3 of its 5 records and in the middle of the 4th (a crash or kill).
    (round_bytes,) = history_module._encode_rounds(_reference(range(3)).records[2 * UNITS_PER_ROUND :])
    lines = round_bytes.split(b"\n")
    with path.open("ab") as f:
        f.write(b"\n".join(lines[:3]) + b"\n" + lines[3][:20])

    with pytest.warns(
        UserWarning,
        match=r"history\.jsonl: skipped .*line 14 is not valid JSON.*incomplete round of "
        r"epoch 2 \(3 of 5 records\)",
    ):
        loaded = load_history(tmp_path)
    assert _records_per_epoch(loaded) == {0: 5, 1: 5}  # no partial epoch 2

    # Resume from the epoch-1 state: epoch 2 is written again after the cut line, and reads back whole.
    resumed = RunHistory.from_state_dict(loaded.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.attach(path)
    resumed.add_round(make_round(2), bow_embed)
    resumed.close()
    with pytest.warns(UserWarning, match="incomplete round"):
        again = load_history(path)
    assert again.state_dict() == _reference(range(3)).state_dict()


def test_append_after_a_cut_line_keeps_the_new_first_record(tmp_path):
    # An old-format file (no round ids) whose last line was cut: the next round must not glue onto it.
    path = tmp_path / HISTORY_FILENAME
    _written(path, range(1))
    old = [json.loads(x) for x in path.read_text().splitlines()]
    legacy = [{k: v for k, v in r.items() if not k.startswith("round_")} for r in old]
    path.write_text("\n".join(json.dumps(r) for r in legacy) + "\n" + json.dumps(legacy[0])[:30])
    history = RunHistory()
    history.load_state_dict(_reference(range(1)).state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history.attach(path)
    history.add_round(make_round(1), bow_embed)
    history.close()
    with pytest.warns(UserWarning, match="line 6 is not valid JSON"):
        loaded = load_history(path)
    assert _records_per_epoch(loaded) == {0: 5, 1: 5}


def test_cut_multibyte_character_and_corrupted_bytes(tmp_path):
    path = tmp_path / HISTORY_FILENAME
    history = RunHistory(path=path)
    for e in range(3):
        rnd = make_round(e)
        rnd.units[0].description = "café ☕ " + rnd.units[0].description
        history.add_round(rnd, bow_embed)
    history.close()
    data = path.read_bytes()
    lines = data.split(b"\n")
    # Corrupt one byte inside epoch 1's round (line 7) and cut the last line inside the 3-byte "☕".
    lines[6] = lines[6].replace(b'"unit"', b'"un\xff\xfe"', 1)
    first_of_epoch2 = 2 * UNITS_PER_ROUND
    cut = lines[first_of_epoch2].index("☕".encode()) + 1
    path.write_bytes(b"\n".join(lines[:first_of_epoch2]) + b"\n" + lines[first_of_epoch2][:cut])

    with pytest.warns(UserWarning) as caught:
        loaded = load_history(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and str(path) in messages[0]
    assert "line 7 is not valid UTF-8" in messages[0] and "line 11 is not valid UTF-8" in messages[0]
    assert "incomplete round of epoch 1 (4 of 5 records)" in messages[0]
    assert loaded.epochs == [0]  # epoch 1 lost a record: the whole round is left out, never shown as 4 of 5

    # The CLI reads it too (one warning, no crash), and a resumed writer carries on.
    from lightning_neurons.cli import main

    with pytest.warns(UserWarning, match="not valid UTF-8"):
        assert main(["history", str(path), "--csv", str(tmp_path / "h.csv"), "--json", str(tmp_path / "h.json")]) == 0
    resumed = RunHistory.from_state_dict(loaded.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.attach(path)
        resumed.add_round(make_round(1), bow_embed)
        assert _records_per_epoch(load_history(path)) == {0: 5, 1: 5}
    resumed.close()


def test_injected_full_disk_leaves_file_and_memory_as_they_were(tmp_path, monkeypatch):
    path = tmp_path / HISTORY_FILENAME
    history = RunHistory(path=path)
    history.add_round(make_round(0), bow_embed)
    before, state = path.read_bytes(), history.state_dict()

    def write_half_then_fail(fd, data):
        import os

        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(history_module, "_write_all", write_half_then_fail)
    with pytest.raises(HistoryWriteError, match="No space left on device") as err:
        history.add_round(make_round(1), bow_embed)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_bytes() == before  # the half-written round was taken back
    assert history.state_dict() == state  # and memory did not keep a round the file lacks
    monkeypatch.undo()
    history.add_round(make_round(1), bow_embed)  # space again: the run goes on
    history.close()
    assert load_history(path).state_dict() == _reference(range(2)).state_dict()


def test_real_full_disk_on_a_small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the injected test covers it")
    try:
        path = mount / HISTORY_FILENAME
        history = RunHistory(path=path)
        history.add_round(make_round(0), bow_embed)
        filler = mount / "filler"
        with filler.open("wb", buffering=0) as f:  # fill the disk to the last byte
            for size in (4096, 512, 1):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)
        big = ExplanationRound(1, [UnitExplanation("fc", u, 1, "x" * 500, 0.5) for u in range(64)])
        before = path.read_bytes()
        with pytest.raises(HistoryWriteError) as err:
            history.add_round(big, bow_embed)
        assert err.value.errno == errno.ENOSPC
        assert path.read_bytes() == before and load_history(path).epochs == [0]
        filler.unlink()
        history.add_round(big, bow_embed)
        history.close()
        assert _records_per_epoch(load_history(path)) == {0: 5, 1: 64}
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_second_writer_process_is_refused(tmp_path):
    path = tmp_path / HISTORY_FILENAME
    holder = textwrap.dedent(
        f"""
        import sys
        from lightning_neurons.drift.history import RunHistory
        h = RunHistory()
        h.attach({str(path)!r})
        print("attached", flush=True)
        sys.stdin.readline()  # hold the file until told to stop
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
        other = RunHistory()
        with pytest.raises(HistoryLockedError, match=r"history\.jsonl is being written by another process"):
            other.attach(path)
        assert path.with_name(HISTORY_FILENAME + ".lock").exists()
    finally:
        proc.communicate("stop\n", timeout=30)
    assert proc.returncode == 0
    other.attach(path)  # the other process ended: its lock went with it
    other.add_round(make_round(0), bow_embed)
    other.close()
    assert load_history(path).epochs == [0]
