import pytest
from torch import nn

from lightning_neurons.recording.layers import resolve_layers


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.layer1 = nn.Sequential(Block(), Block())
        self.layer2 = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 2)


def test_exact_names_keep_model_order():
    assert list(resolve_layers(Net(), ["head", "stem"])) == ["stem", "head"]
    assert list(resolve_layers(Net(), "layer2.0")) == ["layer2.0"]


def test_glob_pattern():
    assert list(resolve_layers(Net(), "layer*.1.conv2")) == ["layer1.1.conv2", "layer2.1.conv2"]
    assert list(resolve_layers(Net(), ["layer1.?.conv1", "head"])) == ["layer1.0.conv1", "layer1.1.conv1", "head"]


def test_predicate():
    model = Net()
    got = resolve_layers(model, lambda name, m: isinstance(m, nn.Conv2d) and name.startswith("layer2"))
    assert list(got) == ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]
    assert got["layer2.0.conv1"] is model.layer2[0].conv1


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="layer1.0.conv2") as err:
        resolve_layers(Net(), "layer1.0.cnv2")
    assert "matches no module" in str(err.value)
    with pytest.raises(ValueError, match="layer3"):
        resolve_layers(Net(), ["stem", "layer3"])
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(Net(), "nothing*here")


def test_bad_specs():
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(Net(), [])
    with pytest.raises(ValueError, match="predicate selected no module"):
        resolve_layers(Net(), lambda name, m: False)
    with pytest.raises(TypeError):
        resolve_layers(Net(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        resolve_layers(Net(), "")  # the root module is never a layer
