"""Small models and offline datasets for the quickstart, the examples and the tests."""

from lightning_neurons.demo.data import PhotoPatches, PhotoPatchesDataModule
from lightning_neurons.demo.models import FineTunedMobileNetV2, ImageClassifier, SmallCNN, TinyViT

__all__ = ["FineTunedMobileNetV2", "ImageClassifier", "PhotoPatches", "PhotoPatchesDataModule", "SmallCNN", "TinyViT"]
