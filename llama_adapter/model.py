"""LlamaAdapterModel: a frozen Hugging Face LLaMA with LLaMA-Adapter prompts, and its adapter-only checkpoints."""

import dataclasses
import json
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import data, hf, methods
from .adapter import VisualProjection
from .config import PRECISIONS, AdapterConfig, ModelConfig, SamplingConfig, VisualConfig, default_device
from .visual import FeatureCache, ImageEncoder

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


class LlamaAdapterModel(nn.Module):
    """A frozen causal LM with a trainable adapter: LLaMA-Adapter's prompts, or another `--method` (methods.py).

    >>> model = LlamaAdapterModel.from_base()            # the embedded SmolLM2, fresh (zero-gated) adapter
    >>> model = LlamaAdapterModel.load("runs/alpaca")    # a trained adapter on the base it was trained on
    >>> model.generate("Name three primary colours.")
    >>> model.generate("What colour is the shape?", image="shape.png")   # a multimodal adapter (clip_model set)
    """

    def __init__(
        self,
        base,
        tokenizer,
        config: AdapterConfig,
        visual: VisualConfig | None = None,
        alongside: "LlamaAdapterModel | None" = None,
    ):
        """`alongside`: another model on the same `base` object; the two take turns and never run at once."""
        super().__init__()
        depth = base.config.num_hidden_layers
        self.config = dataclasses.replace(config, adapter_layers=min(config.adapter_layers, depth))
        self.visual_config = visual or VisualConfig()
        if self.visual_config.clip_model and self.config.method != "llama-adapter":
            raise ValueError(f"an image encoder (clip_model) needs method 'llama-adapter', not {self.config.method!r}")
        if alongside is not None and not methods.can_share(config.method, alongside.method):
            raise ValueError(f"a {config.method} adapter cannot share a base with a {alongside.config.method} adapter")
        self.base = base
        self.tokenizer = tokenizer
        self.method = methods.attach(base, self.config)
        # LLaMA-Adapter's prompts, which also carry the image features; no other method has any.
        self.prompts = getattr(self.method, "prompts", {})
        self.image_encoder = self.visual_proj = None
        if self.visual_config.clip_model:
            device = base.get_input_embeddings().weight.device
            self.image_encoder = ImageEncoder(self.visual_config).to(device)
            self.visual_proj = VisualProjection(self.image_encoder.clip_dim, base.config.hidden_size).to(device)
        # The prompts read the batch's image features from an attribute (see `images`), and adapters sharing a
        # base put their prompts on its layers for each call: one batch at a time on a base.
        self._base_lock = alongside._base_lock if alongside is not None else threading.RLock()
        self.eval()  # no dropout (LoRA's) until training asks for it

    @property
    def multimodal(self) -> bool:
        return self.visual_proj is not None

    # ------------------------------------------------------------------------------------------------------
    # Construction, saving and loading

    @classmethod
    def from_base(
        cls,
        base: str = hf.DEFAULT_BASE,
        config: AdapterConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
        visual: VisualConfig | None = None,
        quantize: str = "none",
    ) -> "LlamaAdapterModel":
        """Load a base model by name or folder and attach a fresh adapter (gates at zero).

        `quantize` ("int8", "nf4") stores the base's linear weights in 8 or 4 bits; the adapter stays in full
        precision.
        """
        device = torch.device(device or default_device())
        model, tokenizer = hf.load_base(base, dtype, attn_implementation, quantize, device)
        return cls(model, tokenizer, config or AdapterConfig(), visual).to(device)

    @classmethod
    def load(
        cls,
        adapter_dir: str | os.PathLike,
        base: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        clip_weights: str | None = None,
        alongside: "LlamaAdapterModel | None" = None,
        quantize: str = "none",
    ) -> "LlamaAdapterModel":
        """Load a saved adapter onto `base` (default: the base named in its config); refuses a different base.

        `clip_weights` points a multimodal adapter at this machine's copy of the CLIP weights it was trained with.
        `alongside`: a loaded model whose base (and so dtype and device) this adapter shares instead of loading
        its own copy; switching between such models costs nothing, each call puts its own prompts in place.
        `quantize`: see `from_base`; an adapter trained on a quantised base loads onto a full-precision one too.
        """
        adapter_dir = Path(adapter_dir)
        saved = read_adapter_config(adapter_dir)
        visual = VisualConfig(**saved.get("visual", {}))
        if clip_weights:
            visual = dataclasses.replace(visual, clip_weights=clip_weights)
        config = AdapterConfig(**saved["adapter"])
        if not methods.can_share(config.method, alongside and alongside.method):
            model = cls.from_base(base or saved["base"]["name"], config, dtype, device, None, visual, quantize)
        else:
            model = cls(alongside.base, alongside.tokenizer, config, visual, alongside)
        check_same_base(saved["base"], hf.base_identity(model.base), adapter_dir / CONFIG_NAME)
        model.load_adapter_weights(adapter_dir / WEIGHTS_NAME)
        return model

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write adapter.safetensors and adapter_config.json; each file is replaced atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.adapter_state().items()}
        _write_atomically(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config = {
            "format_version": FORMAT_VERSION,
            "adapter": self.config.to_dict(),
            "visual": dataclasses.asdict(self.visual_config),
            "base": hf.base_identity(self.base),
            "trainable_parameters": self.num_trainable_parameters(),
        }
        _write_atomically(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        expected = self.adapter_state()
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"{path}: missing tensors {sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}"
            )
        for name, param in expected.items():  # check every shape first: a failed load must change nothing
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"{path}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(param.shape)}"
                )
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(tensors[name])

    # ------------------------------------------------------------------------------------------------------
    # What trains and what is saved: the adapter's parameters, nothing else

    def adapter_state(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by checkpoint name, e.g. 'layers.29.adapter_gate', 'visual_proj.linear.weight'."""
        state = dict(self.method.parameters_by_name())
        if self.visual_proj is not None:
            state |= {f"visual_proj.{name}": param for name, param in self.visual_proj.named_parameters()}
        return state

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_state().values())

    def gates(self) -> dict[int, torch.Tensor]:
        """tanh(gate) per adapted layer and head: how much each head listens to its prompts (LLaMA-Adapter only)."""
        return {idx: torch.tanh(prompt.adapter_gate.detach()).cpu() for idx, prompt in self.prompts.items()}

    # ------------------------------------------------------------------------------------------------------
    # Forward, loss, generation

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def context_length(self) -> int:
        """Positions the base handles: a prompt and its answer together must fit."""
        return hf.context_length(self.base)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab); with image features (B, clip_dim), rows where `has_image` is False have none."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.images(image_features, has_image):
            return self.base(**self.method.inputs(input_ids, attention_mask)).logits[:, self.method.virtual_tokens :]

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_features: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions whose label is not -100 (the responses).

        In training mode, plus the method's penalty if it has one (AdaLoRA's orthogonality term).
        """
        logits, targets, _ = self._response_logits(input_ids, attention_mask, labels, image_features, has_image)
        loss = F.cross_entropy(logits, targets)
        penalty = self.method.penalty() if self.training else None
        return loss if penalty is None else loss + penalty

    def response_logprobs(self, input_ids, attention_mask, labels, **images) -> torch.Tensor:
        """(B,) summed log-probability of each row's labelled tokens: how likely the model finds each response.

        Takes the same arguments as `loss`.
        """
        logits, targets, rows = self._response_logits(input_ids, attention_mask, labels, **images)
        token_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        return torch.zeros(input_ids.shape[0], device=logits.device).index_add_(0, rows, token_logprobs)

    @torch.no_grad()
    def continuation_logprobs(
        self, prompt: str, continuations: list[str], image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n,) log-probability of each continuation text (plus EOS) after a formatted prompt; the prompt runs once.

        `image_features` (1, clip_dim) for a multimodal adapter; the same image serves every continuation.
        """
        prompt_ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        tokens = [data.response_ids(self.tokenizer, text) for text in continuations]
        with self.images(image_features):
            prompt = self.method.inputs(prompt_ids, torch.ones_like(prompt_ids))
            return hf.continuation_logprobs(self.base, prompt, tokens).cpu()

    def _response_logits(self, input_ids, attention_mask, labels, image_features=None, has_image=None):
        """fp32 logits (N, vocab) at the N scored positions, their targets (N,) and row indices (N,)."""
        with self.images(image_features, has_image):
            hidden = hf.decoder(self.base)(**self.method.inputs(input_ids, attention_mask)).last_hidden_state
        hidden = hidden[:, self.method.virtual_tokens :]
        targets = labels[:, 1:]
        scored = targets != -100
        # Project only the scored positions onto the vocabulary: prompts and padding need no logits.
        logits = self.base.get_output_embeddings()(hidden[:, :-1][scored]).float()
        return logits, targets[scored], scored.nonzero()[:, 0]

    def stream(
        self, instruction: str, input: str = "", sampling: SamplingConfig | None = None, image=None
    ) -> Iterator[str]:
        """Yield the answer to an Alpaca-style instruction piece by piece as it is generated.

        `image`: a file path or PIL image, for a multimodal adapter.
        """
        from .generation import stream

        features = None if image is None else self.encode_images([image])
        return stream(self, data.format_prompt(instruction, input), sampling or SamplingConfig(), features)

    def generate(self, instruction: str, input: str = "", sampling: SamplingConfig | None = None, image=None) -> str:
        """The whole answer to an Alpaca-style instruction (about `image`, if given)."""
        return "".join(self.stream(instruction, input, sampling, image))

    # ------------------------------------------------------------------------------------------------------
    # Images

    def feature_cache(self) -> "FeatureCache | None":
        """The on-disk cache of this adapter's image features (under the user cache dir); None if text-only."""
        return FeatureCache(self.image_encoder, hf.cache_dir() / "clip-features") if self.multimodal else None

    def encode_images(self, images: list) -> torch.Tensor:
        """(N, clip_dim) CLIP features of image files or PIL images."""
        if not self.multimodal:
            raise ValueError("this adapter is text-only (trained without --clip-model); it cannot take images")
        return self.image_encoder(images)

    @contextmanager
    def images(self, features: torch.Tensor | None, has_image: torch.Tensor | None = None):
        """Within this block the base runs with this adapter, and its prompts are shifted by each row's image feature.

        features: (B, clip_dim) or None (text only); has_image: (B,) bool, False rows get no image.
        """
        with self._base_lock:
            self.method.activate()
            visual = None
            if features is not None:
                if not self.multimodal:
                    raise ValueError("this adapter is text-only (trained without --clip-model); it cannot take images")
                visual = self.visual_proj(features.to(self.visual_proj.linear.weight))
                if has_image is not None:
                    visual = visual * has_image.to(visual)[:, None]
            for prompt in self.prompts.values():
                prompt.visual = visual
            try:
                yield
            finally:
                for prompt in self.prompts.values():
                    prompt.visual = None


def load_model(cfg: ModelConfig, adapter: str | None, alongside: LlamaAdapterModel | None = None) -> LlamaAdapterModel:
    """The model a command answers with: `adapter` on the configured base, or the base alone without one.

    `alongside`: a loaded model whose base object to share (see `LlamaAdapterModel.load`). A LoRA adapter is folded
    into its base's weights, so it answers at the base's speed, unless those are quantised: folding would round
    the update away.
    """
    dtype = PRECISIONS[cfg.precision]
    if adapter:
        model = LlamaAdapterModel.load(
            adapter, cfg.base, dtype, clip_weights=cfg.clip_weights, alongside=alongside, quantize=cfg.quantize
        )
        if model.config.method == "lora" and hf.quantization(model.base) == "none":
            model.method.merge()
        if cfg.dylora_rank is not None:
            if model.config.method != "dylora":
                raise ValueError(f"--dylora-rank: {adapter} is a {model.config.method} adapter, not a DyLoRA one")
            model.method.set_rank(cfg.dylora_rank)
        return model
    # A fresh adapter has zero gates, so this is exactly the base model.
    if alongside is not None:
        return LlamaAdapterModel(alongside.base, alongside.tokenizer, AdapterConfig(), alongside=alongside)
    return LlamaAdapterModel.from_base(cfg.base or hf.DEFAULT_BASE, dtype=dtype, quantize=cfg.quantize)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint helpers


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (is {adapter_dir} an adapter folder?)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    for key in ("adapter", "base"):
        if not isinstance(saved.get(key), dict):
            raise ValueError(f"{path}: field '{key}' is missing or not an object")  # noqa: TRY004 - a bad file, not a bad call
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    return saved


def check_same_base(saved: dict, actual: dict, where: Path) -> None:
    """Refuse a base whose shape differs from the one the adapter was trained on; warn if only the name differs."""
    differences = [
        f"{key}: adapter has {saved.get(key)!r}, base has {actual[key]!r}"
        for key in actual
        if key != "name" and saved.get(key) != actual[key]
    ]
    if differences:
        raise ValueError(
            f"{where}: this adapter was trained on a different base model ({saved.get('name')!r}); "
            + "; ".join(differences)
        )
    if saved.get("name") != actual["name"]:
        warnings.warn(
            f"{where}: adapter was trained on {saved.get('name')!r}, loading onto {actual['name']!r} of the same shape"
        )


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
