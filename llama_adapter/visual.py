"""The frozen CLIP image encoder (open_clip) and an on-disk cache of its features.

The encoder gives one global feature per image: the CLIP image embedding, optionally concatenated with the
class tokens of earlier ViT blocks (the paper's multi-scale global features); `adapter.VisualProjection` maps
it to the LLM width. Without pretrained weights the encoder is randomly initialised from a saved seed: a random
but fixed feature extractor, enough to test the wiring and to learn simple visual tasks, not to understand
pictures. Every such load says so on stderr.
"""

import hashlib
import json
import os
import sys
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import files
from .base import loading
from .config import VisualConfig

# CLIP sees 224x224 pixels; an image file decoding to more than this is far more likely a decompression bomb
# (a few kilobytes that expand to gigabytes) than a photo, so it is refused before its pixels are decoded.
MAX_PIXELS = 64_000_000


def load_image(source: "str | os.PathLike | typing.BinaryIO | Image.Image") -> Image.Image:
    """An RGB image from a path, an open binary file (the server's decoded upload) or a PIL image (any format PIL
    reads: PNG, JPEG, GIF, WebP, ...), as a viewer shows it.

    Upright by its EXIF orientation, 16- and 32-bit integer grey scaled down to 8 bits, transparency composited
    onto white. Float ("F") images are left to PIL's conversion, which clips to 0..255: their range is not
    written in the file (0..1 and 0..255 are both common), so there is nothing sure to scale by.
    """
    if isinstance(source, Image.Image):
        return _as_shown(source)
    if not hasattr(source, "read"):
        files.check_path(source, "image")
    try:
        with warnings.catch_warnings():  # PIL warns of big images; ours is the stricter check, right below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)  # reads the header only: the size is known before decoding
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height}")
            return _as_shown(image)  # decodes the pixels: only now, after the size check
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{source}: not a readable image ({err})") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{source}: too many pixels (over {MAX_PIXELS:,}) for an image; refused") from None


def _as_shown(image: Image.Image) -> Image.Image:
    """The RGB pixels an image viewer shows for this image; a new image, the argument is left unchanged."""
    image = ImageOps.exif_transpose(image)  # a phone's sideways JPEG says "rotate me" in EXIF, not in its pixels
    image = _grey_to_8_bits(image)
    if _has_transparency(image):
        image = _on_white(image)
    return image.convert("RGB")


def _grey_to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit grey ("I;16*") and 32-bit integer grey ("I") as 8-bit "L"; any other image as it is.

    PIL's convert() clips these at 255, so all but the darkest pixels come out white. "I" is how older Pillows
    loaded 16-bit PNGs, so it is read as 0..65535 too (values outside are clipped). Keeping the high byte (v >> 8)
    gives 256 equal bins, and it gives back the 8-bit value of a 16-bit image made from an 8-bit one by either
    common expansion, v * 257 or v << 8; rounding v / 257 undoes only the first.
    """
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)  # any byte order in, native uint16 out
    return Image.fromarray((values >> 8).astype(np.uint8))  # 2-D uint8: mode "L"


def _has_transparency(image: Image.Image) -> bool:
    """An alpha channel, an alpha palette, or one colour or palette entry marked transparent."""
    palette_alpha = image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    return image.mode in ("RGBA", "RGBa", "LA", "PA") or palette_alpha or "transparency" in image.info


def _on_white(image: Image.Image) -> Image.Image:
    """The image composited onto white, as a browser shows it on a white page.

    convert("RGB") would drop the alpha and show whatever colour the transparent pixels happen to hold,
    often black, so the encoder would see a picture nobody sees.
    """
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)


class ImageEncoder(nn.Module):
    """CLIP's image tower and preprocessing, frozen: images -> (N, clip_dim) float32 features."""

    def __init__(self, config: VisualConfig):
        super().__init__()
        import open_clip  # heavy import, only for multimodal adapters

        self.config = config
        _check_weights(config, open_clip)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.clip_seed)  # a reproducible random encoder when no weights are given
            clip, _, self.preprocess = open_clip.create_model_and_transforms(
                config.clip_model, pretrained=config.clip_weights
            )
        self.tower = clip.visual.requires_grad_(False).eval()
        self.clip_dim = self.tower.output_dim + len(config.clip_layers) * self._block_width(open_clip)
        if not config.clip_weights:
            print(
                f"WARNING: CLIP {config.clip_model} is randomly initialised (seed {config.clip_seed}), not pretrained: "
                "image features carry no learnt meaning. Give --clip-weights for real results.",
                file=sys.stderr,
            )

    def train(self, mode: bool = True) -> "ImageEncoder":
        return super().train(False)  # frozen: always in eval mode, whatever the surrounding model does

    def _block_width(self, open_clip) -> int:
        """Width of the ViT blocks whose class tokens `clip_layers` adds; checks the blocks exist."""
        layers = self.config.clip_layers
        if not layers:
            return 0
        if not isinstance(self.tower, open_clip.transformer.VisionTransformer):
            # A bad setting, not a bad argument type: ValueError like every other config check.
            raise ValueError(f"clip_layers needs a ViT image tower; {self.config.clip_model} has none")  # noqa: TRY004
        depth = len(self.tower.transformer.resblocks)
        if not all(0 <= layer < depth for layer in layers):
            raise ValueError(f"clip_layers {list(layers)}: {self.config.clip_model} has blocks 0..{depth - 1}")
        return self.tower.transformer.width

    @torch.no_grad()
    def forward(self, images: list) -> torch.Tensor:
        weight = next(self.tower.parameters())
        pixels = torch.stack([self.preprocess(load_image(image)) for image in images]).to(weight)
        if not self.config.clip_layers:
            return self.tower(pixels).float()
        out = self.tower.forward_intermediates(
            pixels, indices=list(self.config.clip_layers), normalize_intermediates=True, output_extra_tokens=True
        )
        class_tokens = [tokens[:, 0] for tokens in out["image_intermediates_prefix"]]
        return torch.cat([out["image_features"], *class_tokens], dim=-1).float()

    def identity(self) -> str:
        """A short key for this encoder's features: architecture, weights, seed and the blocks it reads."""
        config = self.config
        key = json.dumps([config.clip_model, config.clip_weights, config.clip_seed, list(config.clip_layers)])
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _check_weights(config: VisualConfig, open_clip) -> None:
    """Refuse, in one line, CLIP weights that open_clip cannot have: a name that is neither a file nor one of the
    architecture's pretrained tags, or a tag's weights that are not in the Hugging Face cache while the hub cannot be
    reached (open_clip would retry for a minute, then fail with three chained tracebacks)."""
    weights, model = config.clip_weights, config.clip_model
    if not weights or Path(weights).is_file() or model.startswith(("hf-hub:", "local-dir:")):
        return  # a file, or an architecture that brings its own weights (open_clip ignores the tag)
    tag = open_clip.get_pretrained_cfg(model, weights)
    if not tag:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ValueError(f"--clip-weights {weights!r}: no such file, nor pretrained weights of {model} (its: {known})")
    repo, filename = os.path.split(tag.get("hf_hub", ""))
    if not repo:
        return  # downloaded from a URL, not from the hub
    names = (filename,) if filename else (open_clip.constants.HF_SAFE_WEIGHTS_NAME, open_clip.constants.HF_WEIGHTS_NAME)
    cached = any(loading.hub_cached_file(repo, name) is not None for name in names)
    if not cached and not loading.hub_reachable():
        raise FileNotFoundError(
            f"--clip-weights {weights!r}: {model}'s weights are not in the Hugging Face cache and the hub cannot be "
            f"reached; download them where it can be (hf download {repo}), then HF_HUB_OFFLINE=1 reads them"
        )


class FeatureCache:
    """Image features on disk, keyed by the image file's content hash and the encoder, so repeated epochs and
    evaluations skip the encoder. Each entry is written to a temporary file and renamed: never read half-written."""

    def __init__(self, encoder: ImageEncoder, folder: Path):
        self.encoder = encoder
        self.folder = Path(folder) / encoder.identity()
        self.memory: dict[str, torch.Tensor] = {}

    def features(self, paths: list[str]) -> torch.Tensor:
        """(N, clip_dim) features of the image files, encoding only those not cached yet."""
        keys = [_content_hash(path) for path in paths]
        missing = [(key, path) for key, path in zip(keys, paths) if self._lookup(key) is None]
        if missing:
            encoded = self.encoder([path for _, path in missing]).cpu()
            for (key, _), feature in zip(missing, encoded):
                self._store(key, feature)
        return torch.stack([self.memory[key] for key in keys])

    def precompute(self, paths: list[str], batch_size: int = 32, show_progress: bool = True) -> dict[str, str]:
        """Encode every image not cached yet, a batch at a time; returns {path: why} for those that cannot be used.

        Training runs this before its first step: a missing, unreadable, corrupt or oversized image is found, and
        its row reported, before any work is done, and no training step waits for the encoder.
        """
        failed, todo = {}, {}
        for path in dict.fromkeys(paths):
            try:
                key = _content_hash(path)
            except (FileNotFoundError, ValueError) as err:
                failed[path] = str(err)
                continue
            if self._lookup(key) is None:
                todo[key] = path
        pending = list(todo.items())
        for start in tqdm(
            range(0, len(pending), batch_size), desc="encode images", unit="batch", disable=not show_progress
        ):
            keys, images = [], []
            for key, path in pending[start : start + batch_size]:
                try:
                    images.append(load_image(path))  # decodes every pixel: a truncated file fails here
                    keys.append(key)
                except (FileNotFoundError, ValueError) as err:
                    failed[path] = str(err)
            if images:
                for key, feature in zip(keys, self.encoder(images).cpu()):
                    self._store(key, feature)
        return failed

    def model_inputs(self, paths: list[str | None]) -> dict[str, torch.Tensor]:
        """`image_features` (B, clip_dim) and `has_image` (B,) for rows that may name an image; {} if none does."""
        present = [i for i, path in enumerate(paths) if path]
        if not present:
            return {}
        features = torch.zeros(len(paths), self.encoder.clip_dim)
        features[present] = self.features([paths[i] for i in present])
        has_image = torch.zeros(len(paths), dtype=torch.bool)
        has_image[present] = True
        return {"image_features": features, "has_image": has_image}

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key not in self.memory:
            file = self.folder / f"{key}.safetensors"
            if file.is_file():
                self.memory[key] = load_file(file)["feature"]
        return self.memory.get(key)

    def _store(self, key: str, feature: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.folder / f"{key}.safetensors"
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        save_file({"feature": feature.contiguous()}, str(tmp))
        os.replace(tmp, file)
        self.memory[key] = feature


def _content_hash(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
