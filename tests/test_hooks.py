"""recording/hooks.py: one way to touch a layer (selectors with globs, put-back, early stop, checks, torch.compile)."""

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons.evaluation.ablation_check import ablation_drops
from lightning_neurons.evaluation.harness import EvaluationConfig, evaluate_round
from lightning_neurons.explanation.pipeline import ExplainConfig, explain_recording
from lightning_neurons.recording.hooks import (
    LayerTaps,
    check_compiled,
    check_layer_outputs,
    compiled_parts,
    prepare_inputs,
    resolve_selectors,
    selector_for,
)
from lightning_neurons.recording.recorder import ActivationRecorder, collect_top_k
from lightning_neurons.recording.samples import DataLoaderSampleSource


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class Block(nn.Module):
    """A conv block returning ``(features, summary)``: a tuple output, as many real blocks have."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.relu(self.conv(x))
        return y, y.mean(dim=(1, 2, 3))


class TupleNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block0 = Block(3, 6)
        self.block1 = Block(6, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.block0(x)
        h, _ = self.block1(h)
        return self.head(h.amax(dim=(2, 3)))


def probe_data(n: int = 40, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % classes


# ---------------------------------------------------------------- selectors
def test_selector_for_exact_key_wins_over_glob_and_unknown_key_fails():
    spec = {"block*": 0, "block1": "hidden"}
    assert selector_for(spec, "block0") == 0 and selector_for(spec, "block1") == "hidden"
    assert selector_for(spec, "head") is None and selector_for(2, "head") == 2
    assert resolve_selectors(["block0", "block1", "head"], spec) == {"block0": 0, "block1": "hidden"}
    with pytest.raises(ValueError, match="matches none"):
        resolve_selectors(["head"], {"blocks.*": 0})


def test_explain_config_selector_for_matches_globs():
    # Bug: ExplainConfig.selector_for matched exact names only, so a glob key failed in the explanation stage.
    cfg = ExplainConfig(output_selector={"block*": 0})
    assert cfg.selector_for("block1") == 0


# ---------------------------------------------------------------- hooks
def test_tap_replacement_is_put_back_into_tuple_and_dict_outputs():
    class DictOut(nn.Module):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"hidden": x * 2, "aux": x + 1}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block(3, 2)
            self.dict_out = DictOut()

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            h, summary = self.block(x)
            d = self.dict_out(h)
            return d["hidden"], d["aux"], summary

    model = Net().train()
    taps = LayerTaps(model, ["block", "dict_out"], output_selector={"block": 0, "dict_*": "hidden"})
    with taps.hooks(lambda name, out: torch.zeros_like(out)) as run:
        hidden, aux, summary = run(torch.rand(2, 3, 4, 4))
        assert not model.training
    assert torch.equal(hidden, torch.zeros_like(hidden))  # dict part replaced
    assert torch.equal(aux, torch.ones_like(aux))  # block's tensor was zeroed before dict_out saw it
    assert summary.abs().sum() > 0  # the tuple's other item is the original one
    assert model.training and hook_count(model) == 0


def test_hooks_removed_and_mode_restored_on_error_and_stop_early_skips_the_rest():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[str] = []
    model[2].register_forward_pre_hook(lambda m, a: calls.append("2"))
    taps = LayerTaps(model, ["0", "1"])
    with taps.hooks(lambda name, out: None, stop_early=True) as run:
        assert run(torch.zeros(3, 4)) is None
    assert calls == [] and hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with taps.hooks(lambda name, out: (_ for _ in ()).throw(RuntimeError("boom"))) as run:
            run(torch.zeros(3, 4))
    assert model.training and hook_count(model) == 0


def test_inputs_follow_the_parameter_dtype():
    model = nn.Linear(2, 2).double()
    assert prepare_inputs(model, torch.zeros(1, 2)).dtype == torch.float64
    assert prepare_inputs(model, torch.zeros(1, 2, dtype=torch.long)).dtype == torch.long  # token ids stay


# ---------------------------------------------------------------- the glob + tuple layer through every stage
def test_tuple_layer_with_glob_selector_through_recording_explanation_evaluation_and_ablation():
    model = TupleNet()
    x, y = probe_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    selector = {"block*": 0}
    layers = ["block0", "block1"]
    recording = collect_top_k(model, loader, layers, top_k=4, output_selector=selector, show_progress=False)
    assert set(recording.layers) == {"block0", "block1"} and recording.layers["block1"].num_units == 8

    from _cheap import cheap_backend

    backend = cheap_backend()
    cfg = ExplainConfig(
        output_selector=selector, crop_size=16, preview_size=16, show_progress=False, ablation=True, ablation_top=2
    )
    rnd = explain_recording(
        model, recording, DataLoaderSampleSource(loader), backend, ["red", "dark", "stripes"], cfg
    )  # failed before: the explanation stage looked the selector up by exact name only
    assert len(rnd.layer("block1")) == 8 and rnd.meta["timings"]["ablation"] >= 0

    eval_cfg = EvaluationConfig(output_selector=selector, min_probe_samples=2)
    metrics = evaluate_round(
        model, rnd, (x, y), backend, layers, ["a", "b", "c"], config=eval_cfg
    )  # failed before: the evaluation applied no selector to the tuple output
    assert set(metrics["layers"]) == {"block0", "block1"} and "ablation_units" in metrics["layers"]["block1"]
    drops = ablation_drops(model, "block1", [0, 1], x, y, ["a", "b", "c"], output_selector=selector)
    assert set(drops) == {0, 1}
    assert model.training and hook_count(model) == 0


def test_explain_end_to_end_with_tuple_layer_glob_selector_and_evaluate(tmp_path):
    from _cheap import cheap_backend
    from lightning_neurons import explain

    model = TupleNet()
    x, y = probe_data(n=48)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    rnd = explain(
        model,
        loader,
        "block*",
        top_k=4,
        backend=cheap_backend(),
        vocabulary=["classes"],
        class_names=["cat", "dog", "car"],
        output_selector={"block*": 0},
        evaluate=True,
        ablation=True,
        show_progress=False,
    )
    assert len(rnd.layer("block0")) == 6 and len(rnd.layer("block1")) == 8
    assert len(rnd.layer("block0.conv")) == 6  # the glob also matches the plain conv: its tensor output is kept
    assert rnd.meta.get("evaluation") or getattr(rnd, "evaluation", None)


# ---------------------------------------------------------------- forward_fn
class KeywordNet(nn.Module):
    """Hugging Face style: the network is called with ``pixel_values=`` and returns an object with ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TupleNet()

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # the steps pass whole batches
        return self.model(batch["pixel_values"])


def test_forward_fn_is_used_by_recording_probe_and_ablation():
    model = KeywordNet()
    x, y = probe_data()
    forward_fn = lambda m, images: {"logits": m.model(images)}  # noqa: E731
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises((TypeError, IndexError)):
        collect_top_k(model, loader, "model.head", top_k=2, show_progress=False)
    taps = LayerTaps(model, "model.head")
    with pytest.raises(ValueError, match="pass forward_fn="):  # the set-up check says what to do
        check_layer_outputs(model, taps, x[:4])
    assert check_layer_outputs(model, taps, x[:4], forward_fn=forward_fn) == {"model.head": "linear"}
    rec = collect_top_k(model, loader, "model.head", top_k=2, show_progress=False, forward_fn=forward_fn)
    plain = collect_top_k(model.model, loader, "head", top_k=2, show_progress=False)
    assert torch.equal(rec.layers["model.head"].sample_ids, plain.layers["head"].sample_ids)
    drops = ablation_drops(model, "model.block1", [0], x, y, ["a", "b", "c"], output_selector=0, forward_fn=forward_fn)
    assert drops == ablation_drops(model.model, "block1", [0], x, y, ["a", "b", "c"], output_selector=0)


# ---------------------------------------------------------------- set-up check
class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Block(3, 4)
        self.video = nn.Identity()
        self.tokens = nn.Identity()
        self.seq_first = nn.Identity()
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.pair(x)
        self.video(h[:, :, None])  # [B, C, 1, H, W]
        self.tokens(h.flatten(2).transpose(1, 2)[:, :10])  # [B, 10, C]: no square grid
        self.seq_first(h.flatten(2).permute(2, 0, 1))  # [T, B, C]
        return h.mean()


def test_check_layer_outputs_names_every_unsupported_layer_with_the_fix():
    model = Odd().train()
    taps = LayerTaps(model, ["pair", "video", "tokens", "seq_first", "unused"], token_mode="keep_all")
    with pytest.raises(ValueError) as err:
        check_layer_outputs(model, taps, torch.rand(3, 3, 4, 4))
    message = str(err.value)
    assert "5 chosen layer(s)" in message
    assert "output_selector" in message and "(5, 4, 1, 4, 4)" not in message  # batch of 3
    assert "(3, 4, 1, 4, 4)" in message and "square patch grid" in message
    assert "first dimension 16 for a batch of 3" in message and "did not run" in message
    assert model.training and hook_count(model) == 0
    ok = LayerTaps(model, ["pair"], output_selector={"p*": 0})
    assert check_layer_outputs(model, ok, torch.rand(3, 3, 4, 4)) == {"pair": "conv"}


# ---------------------------------------------------------------- torch.compile
def test_recording_a_compiled_model_sees_the_hooks_and_matches_eager():
    torch._dynamo.reset()
    model = TupleNet().eval()
    compiled = torch.compile(model, backend="eager")
    x, y = probe_data(n=40)
    with torch.no_grad():
        compiled(x[:16])  # compiled without hooks, like Lightning's sanity check before a recorded pass
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 16, 16, 8: same shape as the warm-up first
    got = collect_top_k(compiled, loader, "_orig_mod.block1", top_k=3, output_selector=0, show_progress=False)
    want = collect_top_k(model, loader, "block1", top_k=3, output_selector=0, show_progress=False)
    # Before: the warm graph did not see the hooks; only the last (new-shape) batch was recorded.
    assert got.num_samples == 40
    assert torch.equal(got.layers["_orig_mod.block1"].sample_ids, want.layers["block1"].sample_ids)
    assert compiled_parts(compiled) == [""]
    check_compiled(compiled)  # torch >= 2.6: hooks force eager mode, so a compiled model is accepted
    torch._dynamo.reset()


def test_recorder_warns_when_a_layer_misses_batches():
    model = nn.Sequential(nn.Linear(4, 3))
    rec = ActivationRecorder(model, "0", top_k=2).attach()
    rec.begin_batch(2)
    model(torch.rand(2, 4))
    rec.begin_batch(2)  # this batch's forward never reaches the layer (as when a compiled graph hides the hook)
    rec.detach()
    with pytest.warns(RuntimeWarning, match="ran in only 1 of 2 probe batches"):
        rec.result()


def test_fit_of_a_compiled_lightning_module_records_what_eager_records(tmp_path):
    import lightning.pytorch as pl

    from _cheap import cheap_backend
    from lightning_neurons import NeuronExplainer

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TupleNet()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: list[Tensor], _idx: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: list[Tensor], _idx: int) -> None:
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay: eager recompute is comparable

    torch._dynamo.reset()
    x, y = probe_data(n=40)
    val = DataLoader(TensorDataset(x, y), batch_size=16)  # 16, 16, 8: the sanity check compiles the 16-graph
    module = Module()
    explainer = NeuronExplainer(
        layers="net.block1",
        output_selector={"*": 0},
        top_k=3,
        backend=cheap_backend(),
        vocabulary=["general"],
        history_dir=str(tmp_path / "neurons"),
        show_progress=False,
        on_error="raise",
    )
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[explainer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(torch.compile(module, backend="eager"), DataLoader(TensorDataset(x, y), batch_size=16), val)
    assert explainer.last_recording is not None
    got = explainer.last_recording.layers["net.block1"].sample_ids
    want = collect_top_k(module.net, val, "block1", top_k=3, output_selector=0, show_progress=False)
    assert torch.equal(got, want.layers["block1"].sample_ids)
    torch._dynamo.reset()
