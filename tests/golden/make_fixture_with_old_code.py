"""Regenerate the golden fixture with the code before the redesign (see tests/test_golden.py).

    git worktree add /tmp/golden 8e45e94
    PYTHONPATH=/tmp/golden/src python tests/golden/make_fixture_with_old_code.py tests/golden/quickstart_history.jsonl
"""

import shutil
import sys
import tempfile
from pathlib import Path


def main(target: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_neurons
    from golden.reduced_quickstart import run
    from lightning_neurons.backends import load_backend

    if "/tmp/golden/" not in lightning_neurons.__file__:
        raise SystemExit(f"run this with the old code first on PYTHONPATH, not {lightning_neurons.__file__}")
    # Models built before the run: the old code's setup then draws nothing from the global RNG, as the new code's.
    load_backend("embedded", image_size=128, template_weight=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(run(Path(tmp)), target)


if __name__ == "__main__":
    main(sys.argv[1])
