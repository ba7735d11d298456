"""Backends for real: the offline pack, and tiny random-weight open_clip / BLIP / causal-LM models."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lightning_neurons.backends import Backend, ModelLoadError, load_backend
from lightning_neurons.backends.base import prepare_images, resolve_device


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    array = torch.from_numpy(getattr(skimage.data, name)()).float() / 255
    if array.dim() == 2:
        array = array[..., None].expand(-1, -1, 3)
    return array[..., :3].permute(2, 0, 1)


@pytest.fixture(scope="module")
def embedded() -> Backend:
    return load_backend("embedded", device="cpu")


def test_prepare_images_shapes_and_grayscale() -> None:
    out = prepare_images(torch.rand(2, 1, 40, 90), 32, (0.5,) * 3, (0.5,) * 3)
    assert out.shape == (2, 3, 32, 32)
    squash = prepare_images(torch.ones(1, 3, 10, 50), (16, 24), (0.0,) * 3, (1.0,) * 3, resize_mode="squash")
    assert squash.shape == (1, 3, 16, 24) and torch.allclose(squash, torch.ones_like(squash))
    with pytest.raises(ValueError, match="resize_mode"):
        prepare_images(torch.rand(1, 3, 8, 8), 4, (0,) * 3, (1,) * 3, resize_mode="crop")


def test_resolve_device_and_unknown_backend() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match=r"embedded.*clip.*hf"):
        load_backend("nope")


def test_backend_instance_passes_through(embedded: Backend) -> None:
    assert load_backend(embedded) is embedded


def test_embedded_encoder_matches_photos_to_text(embedded: Backend) -> None:
    encoder = embedded.encoder
    images = [_photo("chelsea"), _photo("coffee")]
    emb = torch.cat([encoder.encode_images(img[None]) for img in images])
    texts = encoder.encode_texts(["cat", "car", "coffee cup"])
    dim = 1011  # the default class space: 1,000 ImageNet classes and 11 colour terms (384 in space="text")
    assert emb.shape == (2, dim) and texts.shape == (3, dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    sims = emb @ texts.T
    assert sims[0, 0] > sims[0, 1]  # the cat photo is closer to "cat" than to "car"
    assert sims[1, 2] > sims[1, 0] and sims[1, 2] > sims[1, 1]  # coffee photo -> "coffee cup"
    assert encoder.encode_images(torch.empty(0, 3, 32, 32)).shape == (0, dim)


def test_conse_temperature_flattens_the_mixture(embedded: Backend) -> None:
    from lightning_neurons.backends.embedded import load_conse_encoder

    # In ConSE's text space, where an image embedding is a mixture of class-name embeddings.
    encoder = load_conse_encoder("cpu", temperature=1.0, space="text", hypernym_weight=0.0)
    warm = load_conse_encoder("cpu", temperature=4.0, space="text", hypernym_weight=0.0)
    assert "T4" in embedded.encoder.name and "T4" in warm.name and "-T" not in encoder.name
    probs = encoder.class_probabilities(_photo("chelsea")[None])
    sharp, flat = encoder.embed_probabilities(probs), warm.embed_probabilities(probs)
    top = encoder.class_embeddings[probs.argmax()]
    assert torch.allclose(flat.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert float(sharp @ top) > float(flat @ top)  # T > 1 leans less on the single most probable class name
    texts = encoder.encode_texts(["cat", "car"])
    assert float(flat @ texts[0]) > float(flat @ texts[1])
    with pytest.raises(ValueError, match="temperature"):
        load_conse_encoder("cpu", temperature=0.0)


def test_embedded_captioner_names_the_cat(embedded: Backend) -> None:
    assert embedded.captioner is not None
    (caption,) = embedded.captioner.caption(_photo("chelsea")[None])
    assert caption.startswith("a photo of a") and "cat" in caption


def test_embedded_descriptions_use_minilm(embedded: Backend) -> None:
    d = embedded.encode_descriptions(["a striped cat", "a tabby cat", "a red truck"])
    assert d.shape == (3, 384)
    assert d[0] @ d[1] > d[0] @ d[2]


def test_smollm2_generator_answers(embedded: Backend) -> None:
    assert embedded.generator is not None and embedded.generator.name == "smollm2-135m-instruct-q4_1"
    answer = embedded.generator.generate("Name three colours.", max_new_tokens=24)
    assert isinstance(answer, str) and answer.strip()


# ----------------------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("clip_cfg") / "ln-test-tiny-vit.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "ln-test-tiny-vit"


def test_clip_random_weights_shapes_and_norm(tiny_clip_name: str) -> None:
    backend = load_backend("clip", device="cpu", model_name=tiny_clip_name, pretrained=None, batch_size=2)
    encoder = backend.encoder
    assert encoder.name == f"open_clip:{tiny_clip_name}:random" and encoder.cacheable is False
    images = encoder.encode_images(torch.rand(5, 3, 48, 80))  # 3 batches of <= 2, non-square input
    texts = encoder.encode_texts(["a cat", "a striped texture", "red"])
    assert images.shape == (5, 32) and texts.shape == (3, 32)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.allclose(images.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert backend.captioner is None and backend.generator is None


def test_clip_local_checkpoint_round_trip(tiny_clip_name: str, tmp_path: Path) -> None:
    from lightning_neurons.backends.clip import load_clip_encoder

    random_encoder = load_clip_encoder(tiny_clip_name, None, "cpu")
    checkpoint = tmp_path / "open_clip_model.pt"
    torch.save(random_encoder.model.state_dict(), checkpoint)
    loaded = load_clip_encoder(tiny_clip_name, checkpoint, "cpu")
    assert loaded.cacheable and str(checkpoint.resolve()) in loaded.name
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.encode_images(x), random_encoder.encode_images(x), atol=1e-5)


def test_clip_missing_weights_error_is_helpful(tiny_clip_name: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "open_clip_model.safetensors"
    with pytest.raises(ModelLoadError) as info:
        load_backend("clip", device="cpu", model_name=tiny_clip_name, pretrained=str(missing))
    message = str(info.value)
    assert tiny_clip_name in message and str(missing) in message
    assert 'backend_kwargs={"pretrained": "/path/to/open_clip_model.safetensors"}' in message
    assert 'backend="embedded"' in message


def test_clip_unknown_architecture_lists_close_matches() -> None:
    with pytest.raises(ModelLoadError, match="ViT-B-16"):
        load_backend("clip", device="cpu", model_name="ViT-B-61", pretrained=None)


# ----------------------------------------------------------------------------------------------- transformers


def _write_bert_vocab(path: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red", "the"]
    words += [f"w{i}" for i in range(64 - len(words))]
    path.write_text("\n".join(words) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    root = tmp_path_factory.mktemp("tiny_blip")
    tokenizer = BertTokenizer(str(_write_bert_vocab(root / "vocab.txt")), bos_token="[DEC]")
    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "encoder_hidden_size": 32,
        "max_position_embeddings": 64,
        "bos_token_id": 5,
        "pad_token_id": 0,
        "sep_token_id": 3,
        "eos_token_id": 3,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(root / "model")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(root / "model")
    return root / "model"


def test_blip_captioner_from_local_dir(tiny_blip_dir: Path) -> None:
    from lightning_neurons.backends.hf import load_blip_captioner

    captioner = load_blip_captioner(str(tiny_blip_dir), "cpu", max_new_tokens=5)
    assert captioner.size == (32, 32)
    captions = captioner.caption(torch.rand(3, 3, 40, 50))
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    prompted = load_blip_captioner(str(tiny_blip_dir), "cpu", prompt="a photo of", max_new_tokens=4)
    assert len(prompted.caption(torch.rand(2, 3, 32, 32))) == 2
    assert load_blip_captioner(str(tiny_blip_dir), "cpu").model is captioner.model  # cached per process


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_llama")
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "red", "cat"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_causal_lm_generator_from_local_dir(tiny_llama_dir: Path) -> None:
    from lightning_neurons.backends.hf import load_text_generator

    generator = load_text_generator(str(tiny_llama_dir), "cpu")
    assert generator.name == f"causal_lm:{tiny_llama_dir}"
    first = generator.generate("red cat", max_new_tokens=6)
    assert isinstance(first, str)
    assert generator.generate("red cat", max_new_tokens=6) == first  # greedy: deterministic
    n_new = len(generator.tokenizer(first, add_special_tokens=False)["input_ids"])
    assert n_new <= 6


def test_hf_backend_composes_parts(tiny_blip_dir: Path, tiny_llama_dir: Path, tiny_clip_name: str) -> None:
    backend = load_backend(
        "hf",
        device="cpu",
        encoder="clip",
        model_name=tiny_clip_name,
        pretrained=None,
        captioner=str(tiny_blip_dir),
        generator=str(tiny_llama_dir),
    )
    assert backend.name == "hf" and backend.captioner is not None and backend.generator is not None
    assert backend.encoder.encode_texts(["x"]).shape == (1, 32)
    assert backend.basis_concepts == frozenset()  # CLIP embeds images directly: no vocabulary filter
    # With the embedded encoder, its basis names (the ImageNet classes) leave the general vocabulary here too.
    offline = load_backend("hf", device="cpu", encoder="embedded", captioner=str(tiny_blip_dir), generator=None)
    assert "espresso" in offline.basis_concepts and offline.generator is None


def test_hf_missing_models_raise_model_load_error(tmp_path: Path) -> None:
    from lightning_neurons.backends.hf import load_blip_captioner, load_text_generator

    with pytest.raises(ModelLoadError) as info:
        load_blip_captioner(str(tmp_path / "missing_blip"), "cpu")
    message = str(info.value)
    assert "missing_blip" in message and '"captioner"' in message and 'backend="embedded"' in message
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_text_generator("no-such-org/no-such-model", "cpu")
