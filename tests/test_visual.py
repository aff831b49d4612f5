"""The multimodal adapter on a tiny random LLaMA and a tiny random CLIP: zero-init, per-row images, save/load, cache."""

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from test_adapter import random_batch, reference_attention

from llama_adapter.adapter_files import CONFIG_NAME
from llama_adapter.base import routing
from llama_adapter.config import SamplingConfig, VisualConfig, add_arguments, from_arguments
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.visual import FeatureCache, load_image


def save_and_reload(model, tokenizer, folder) -> LlamaAdapterModel:
    """Save the tiny base where the adapter can name it, save the adapter, and load it back."""
    model.base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    model.base.name_or_path = str(folder / "base")
    model.save(folder / "adapter")
    return LlamaAdapterModel.load(folder / "adapter", device="cpu")


def test_zero_gates_reproduce_the_base_exactly_with_images(multimodal, make_base, tokenizer, images):
    model = multimodal()
    ids, mask = random_batch(len(tokenizer))
    features = model.encode_images(images)
    with torch.no_grad():
        expected = make_base()(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(ids, mask, features), expected)
        for prompt in model.prompts.values():
            prompt.adapter_gate.fill_(0.5)
        assert not torch.allclose(model(ids, mask, features), expected, atol=1e-3)


def test_each_row_attends_to_prompts_shifted_by_its_own_image(multimodal, tokenizer, randomize_adapter, images):
    model = multimodal()
    randomize_adapter(model)
    ids, _ = random_batch(len(tokenizer), batch=2, length=9)
    features = model.encode_images(images)
    layer = max(model.prompts)
    attention = model.base.model.layers[layer].self_attn
    captured = {}
    hook = attention.register_forward_hook(
        lambda module, args, kwargs, output: captured.update(hidden=kwargs["hidden_states"], out=output[0]),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(ids, image_features=features)
        hook.remove()
        prompt = model.prompts[layer]
        visual = model.visual_proj(features)
        for row in range(2):
            expected = reference_attention(
                attention,
                model.base.model.rotary_emb,
                captured["hidden"][row : row + 1],
                prompt.adapter_prompt + visual[row],  # the paper's P_l + repeat_K(I_p)
                prompt.adapter_gate,
            )
            torch.testing.assert_close(captured["out"][row : row + 1], expected, atol=1e-5, rtol=1e-5)


def test_rows_without_an_image_equal_the_text_only_forward(multimodal, tokenizer, randomize_adapter, images):
    model = multimodal()
    randomize_adapter(model)
    ids, mask = random_batch(len(tokenizer))
    features = model.encode_images(images)
    has_image = torch.tensor([True, False])
    with torch.no_grad():
        text_only = model(ids, mask)
        mixed = model(ids, mask, features, has_image)
        both = model(ids, mask, features)
    real = mask.bool()
    torch.testing.assert_close(mixed[1][real[1]], text_only[1][real[1]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[0], both[0], atol=1e-6, rtol=1e-6)
    assert (mixed[0] - text_only[0]).abs().max() > 1e-3  # the image really changed row 0


def test_trainable_parameters_are_prompts_gates_and_projection(multimodal):
    model = multimodal()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_qualified(model))
    clip_dim, hidden = model.image_encoder.clip_dim, model.base.config.hidden_size
    prompts_and_gates = 3 * (4 * hidden + 4)
    projection = clip_dim * hidden + hidden + 2 * hidden  # linear weight and bias, LayerNorm scale and shift
    assert model.num_trainable_parameters() == prompts_and_gates + projection
    assert all(not p.requires_grad for p in model.image_encoder.parameters())


def _qualified(model):
    """Full module-tree names of the adapter's parameters."""
    ids = {id(p) for p in model.adapter_state().values()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def test_loss_trains_the_projection_through_the_prompts(multimodal, tokenizer, randomize_adapter, images):
    model = multimodal()
    randomize_adapter(model)
    ids, mask = random_batch(len(tokenizer))
    labels = ids.masked_fill(mask == 0, -100)
    model.loss(ids, mask, labels, model.encode_images(images)).backward()
    assert model.visual_proj.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert not any(hasattr(prompt, "visual") for prompt in model.prompts.values())  # images travel with the call


def test_gradient_checkpointing_gives_the_same_multimodal_gradients(multimodal, tokenizer, randomize_adapter, images):
    """The recomputed layers see the batch's image features: they travel with the call (R1)."""
    model = multimodal()
    randomize_adapter(model)
    model.train()
    ids, mask = random_batch(len(tokenizer))
    labels = ids.masked_fill(mask == 0, -100)
    features = model.encode_images(images)

    def gradients():
        model.zero_grad(set_to_none=True)
        model.loss(ids, mask, labels, features).backward()
        return {name: p.grad.clone() for name, p in model.adapter_state().items()}

    expected = gradients()
    routing.enable_gradient_checkpointing(model.base)
    actual = gradients()
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    assert expected["visual_proj.linear.weight"].abs().sum() > 0


def test_generate_with_an_image(multimodal, randomize_adapter, images):
    model = multimodal()
    randomize_adapter(model, seed=4)
    sampling = SamplingConfig(max_new_tokens=12)
    red, blue = (model.generate("Colour?", image=path, sampling=sampling) for path in images)
    assert red and blue and red != blue
    assert model.generate("Colour?", image=Image.open(images[0]), sampling=sampling) == red


def test_save_and_load_rebuild_the_same_random_encoder(multimodal, tokenizer, randomize_adapter, images, tmp_path):
    model = multimodal()
    randomize_adapter(model)
    with torch.no_grad():
        model.visual_proj.linear.weight.normal_()
    reloaded = save_and_reload(model, tokenizer, tmp_path)
    ids, mask = random_batch(len(tokenizer))
    with torch.no_grad():
        expected = model(ids, mask, model.encode_images(images))
        actual = reloaded(ids, mask, reloaded.encode_images(images))
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    assert '"clip_model": "tiny-test-clip"' in (tmp_path / "adapter" / CONFIG_NAME).read_text()


def test_text_only_adapter_refuses_images(make_model, images):
    model = make_model()
    with pytest.raises(ValueError, match="text-only"):
        model.generate("Colour?", image=images[0])


def test_clip_weights_need_an_architecture():
    with pytest.raises(ValueError, match="clip_model"):
        VisualConfig(clip_weights="weights.safetensors")


def test_unreadable_images_name_the_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("side", [9_000, 14_000])  # over our limit; over Pillow's own bomb limit too
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb)  # tens of megapixels in a few kilobytes
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match="bomb.png: too many pixels"):
        load_image(bomb)
    Image.new("1", (7_000, 7_000)).save(bomb)  # 49 megapixels: a large photo, accepted
    assert load_image(bomb).size == (7_000, 7_000)


# ----------------------------------------------------------------------------------------------------------
# load_image shows what an image viewer shows: upright by EXIF, 16-bit grey in its shades, transparency on white.
# Property tests: the same examples every run (derandomize), and no failing examples saved to replay (database).

IMAGE_PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None)
EXIF_ORIENTATION = 0x0112

# What a viewer shows for each EXIF orientation, from the stored pixel rows (y) and columns (x): the EXIF spec's
# words spelt as numpy flips and quarter turns (np.rot90 turns counter-clockwise), not as PIL's transposes.
SHOWN_FOR_ORIENTATION = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: np.rot90(a, 2),  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: np.rot90(a[:, ::-1], 1),  # mirrored left-right, then a quarter turn counter-clockwise
    6: lambda a: np.rot90(a, -1),  # a quarter turn clockwise (a phone held upright)
    7: lambda a: np.rot90(a[:, ::-1], -1),  # mirrored left-right, then a quarter turn clockwise
    8: lambda a: np.rot90(a, 1),  # a quarter turn counter-clockwise
}

byte = st.integers(0, 255)
grey16 = hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6))  # the full 0..65535


@st.composite
def wide_pictures(draw) -> np.ndarray:
    """Small RGB pixel arrays wider than tall, so a quarter turn changes the shape as well as the pixels."""
    height = draw(st.integers(1, 5))
    width = draw(st.integers(height + 1, height + 4))
    return draw(hnp.arrays(np.uint8, (height, width, 3)))


def shown_both_ways(path) -> np.ndarray:
    """load_image's pixels for a file, read by its path and as an opened PIL image, which must agree."""
    by_path = np.asarray(load_image(path))
    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(load_image(opened)), by_path)
    return by_path


def on_white(colour, alpha) -> np.ndarray:
    return np.array(colour) * alpha / 255 + 255 * (1 - alpha / 255)


@IMAGE_PROPERTY
@given(grey=grey16)
def test_sixteen_bit_grey_png_keeps_its_shades(grey):
    """A 16-bit grey v shows as the 8-bit v >> 8 in all three channels (convert() made every v over 255 white)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "grey16.png"
        Image.fromarray(grey).save(path)
        with Image.open(path) as stored:
            assert stored.mode.startswith("I")  # really a 16-bit file, not one PIL cut to 8 bits on saving
        shown = shown_both_ways(path)
    assert np.array_equal(shown, np.stack([grey // 256] * 3, axis=-1))


@IMAGE_PROPERTY
@given(grey=grey16, mode=st.sampled_from(["I;16", "I;16L", "I;16B", "I"]))
def test_integer_grey_images_in_memory_keep_their_shades(grey, mode):
    """Every integer grey mode PIL has, built from raw bytes in its own byte order; "I" holds 0..65535 too."""
    byte_order = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "=i4"}[mode]
    image = Image.frombytes(mode, grey.shape[::-1], grey.astype(byte_order).tobytes())
    assert np.array_equal(np.asarray(load_image(image)), np.stack([grey // 256] * 3, axis=-1))


@IMAGE_PROPERTY
@given(pixels=wide_pictures(), orientation=st.integers(1, 8), file_format=st.sampled_from(["PNG", "JPEG"]))
def test_exif_orientation_turns_the_image_upright(pixels, orientation, file_format):
    """PNG compared exactly; JPEG, being lossy, with its own pixels as decoded before any turn."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"photo.{file_format.lower()}"
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        Image.fromarray(pixels).save(path, format=file_format, exif=exif)
        with Image.open(path) as stored:
            assert stored.getexif()[EXIF_ORIENTATION] == orientation
            stored_pixels = np.asarray(stored.convert("RGB"))  # as decoded, unturned: JPEG changes the pixels
        shown = shown_both_ways(path)
    assert np.array_equal(shown, SHOWN_FOR_ORIENTATION[orientation](stored_pixels))


def palette_image(mode, colour, alpha=None) -> Image.Image:
    """A 3x2 image of palette entry 0, which holds `colour`; a "PA" image gives each pixel `alpha`."""
    image = Image.new(mode, (3, 2), 0 if alpha is None else (0, alpha))
    image.putpalette(colour)
    return image


@IMAGE_PROPERTY
@given(colour=st.tuples(byte, byte, byte), alpha=byte)
def test_translucent_pixels_show_on_white(colour, alpha):
    """RGBA, LA and palette pixels with alpha, in memory and from PNGs, as a browser shows them on a white page."""
    grey = colour[0]
    rgba, la = Image.new("RGBA", (3, 2), (*colour, alpha)), Image.new("LA", (3, 2), (grey, alpha))
    shown = [(load_image(rgba), colour), (load_image(la), (grey,) * 3)]
    shown.append((load_image(palette_image("PA", colour, alpha)), colour))
    with tempfile.TemporaryDirectory() as folder:
        rgba.save(Path(folder) / "rgba.png")
        la.save(Path(folder) / "la.png")
        # PNG cannot hold "PA": a palette with an alpha per entry, which PIL reads back as "P" plus transparency.
        palette_image("P", colour).save(Path(folder) / "p.png", transparency=bytes([alpha]))
        shown += [(shown_both_ways(Path(folder) / name), colour) for name in ("rgba.png", "p.png")]
        shown.append((shown_both_ways(Path(folder) / "la.png"), (grey,) * 3))
    for pixels, visible in shown:
        assert np.abs(np.asarray(pixels).astype(float) - on_white(visible, alpha)).max() <= 1, visible


@IMAGE_PROPERTY
@given(
    hidden=st.tuples(byte, byte, byte), kept=st.tuples(byte, byte, byte), file_format=st.sampled_from(["PNG", "GIF"])
)
def test_transparent_palette_entry_shows_white(hidden, kept, file_format):
    """A palette image whose entry 0 is marked transparent: those pixels are white, whatever colour entry 0 holds."""
    image = Image.new("P", (2, 1))
    image.putpalette([*hidden, *kept])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    expected = np.array([[[255, 255, 255], kept]])
    assert np.array_equal(np.asarray(load_image(image)), expected)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"palette.{file_format.lower()}"
        image.save(path, transparency=0)
        assert np.array_equal(shown_both_ways(path), expected)


def test_feature_cache_encodes_each_image_content_once(multimodal, images, tmp_path):
    model = multimodal()
    calls = []
    encoder = model.image_encoder
    encoder.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    cache = FeatureCache(encoder, tmp_path / "cache")
    first = cache.features([str(p) for p in images])
    assert calls == [2]
    torch.testing.assert_close(first, encoder(images))
    calls.clear()

    copy = shutil.copy(images[0], tmp_path / "same-content.png")
    fresh = FeatureCache(encoder, tmp_path / "cache")  # a new process: only the files on disk remain
    again = fresh.features([str(copy), str(images[1])])
    assert calls == []
    assert torch.equal(again, first)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_multi_scale_features_append_chosen_blocks_class_tokens(make_model, tiny_clip, images):
    plain = make_model(visual=VisualConfig(clip_model=tiny_clip)).image_encoder
    multi = make_model(visual=VisualConfig(clip_model=tiny_clip, clip_layers=[1, 0, 1])).image_encoder
    assert multi.config.clip_layers == (0, 1)
    assert (plain.clip_dim, multi.clip_dim) == (24, 24 + 2 * 32)

    captured = []
    for block in multi.tower.transformer.resblocks:
        block.register_forward_hook(lambda module, args, output: captured.append(output))
    features = multi(images)
    tower = multi.tower
    class_tokens = [tower.ln_post(tokens if tower.transformer.batch_first else tokens.transpose(0, 1))[:, 0]
                    for tokens in captured]  # fmt: skip
    torch.testing.assert_close(features, torch.cat([plain(images), *class_tokens], dim=-1))


def test_multi_scale_adapter_round_trips_and_refuses_missing_blocks(make_model, tiny_clip, tokenizer, images, tmp_path):
    model = make_model(visual=VisualConfig(clip_model=tiny_clip, clip_layers=(0,)))
    assert model.visual_proj.linear.in_features == 24 + 32
    reloaded = save_and_reload(model, tokenizer, tmp_path)
    assert reloaded.visual_config.clip_layers == (0,)
    torch.testing.assert_close(reloaded.encode_images(images), model.encode_images(images))

    with pytest.raises(ValueError, match=r"clip_layers \[5\]: tiny-test-clip has blocks 0..1"):
        make_model(visual=VisualConfig(clip_model=tiny_clip, clip_layers=(5,)))
    with pytest.raises(ValueError, match="clip_layers needs clip_model"):
        VisualConfig(clip_layers=(0,))


def test_clip_layers_flag_takes_several_block_numbers():
    parser = argparse.ArgumentParser()
    add_arguments(parser, VisualConfig)
    visual = from_arguments(VisualConfig, parser.parse_args(["--clip-model", "ViT-L-14", "--clip-layers", "7", "3"]))
    assert visual.clip_layers == (3, 7)
    assert from_arguments(VisualConfig, parser.parse_args([])).clip_layers == ()


def test_prompt_cache_never_mixes_up_images(multimodal, tokenizer, randomize_adapter, images):
    """Evaluation projects a new image batch each step; freed tensors' addresses come back, the cache must not."""
    model = multimodal()
    randomize_adapter(model)
    ids, mask = random_batch(len(tokenizer), batch=1)
    features = model.encode_images(images)
    with torch.no_grad():
        alone = [model(ids, mask, features[i : i + 1]) for i in range(2)]
        assert not torch.allclose(alone[0], alone[1], atol=1e-4)
        for step in range(6):
            assert torch.equal(model(ids, mask, features[step % 2 : step % 2 + 1]), alone[step % 2])
