"""Small models and offline datasets for the quickstart, the examples and the tests."""

from lightning_neurons.demo.data import PhotoPatches, PhotoPatchesDataModule
from lightning_neurons.demo.models import ImageClassifier, SmallCNN, TinyViT

__all__ = ["ImageClassifier", "PhotoPatches", "PhotoPatchesDataModule", "SmallCNN", "TinyViT"]
