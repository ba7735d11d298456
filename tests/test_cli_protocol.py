"""`lightning-neurons evaluate --protocol ...` on a random torchvision model, a tiny open_clip and an ImageFolder."""

import json

from lightning_neurons.cli import main
from test_protocols import image_folder, tiny_clip_name  # noqa: F401


def test_evaluate_protocol_prints_the_published_table(tmp_path, capsys, tiny_clip_name, image_folder):  # noqa: F811
    out = tmp_path / "protocol.json"
    code = main(
        [
            "evaluate",
            "--protocol",
            "final-layer",
            "--model",
            "torchvision:resnet18",
            "--weights",
            "none",
            "--probe",
            str(image_folder),
            "--backend",
            "clip",
            "--backend-args",
            json.dumps({"model_name": tiny_clip_name, "pretrained": None}),
            "--image-size",
            "32",
            "--top-k",
            "4",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| method | top-1 | top-5 |" in table
    result = json.loads(out.read_text())
    assert result["protocol"] == "final-layer" and result["metrics"]["units"] == 1000


def test_evaluate_protocol_without_model_says_what_is_missing(capsys):
    import pytest

    with pytest.raises(SystemExit, match="--model"):
        main(["evaluate", "--protocol", "simulation"])
