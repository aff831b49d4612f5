"""LlamaAdapterModel: one adapter on a frozen Hugging Face causal LM, and its adapter-only checkpoints."""

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import adapter_files, files, methods, shelf
from .adapter import VisualProjection
from .adapter_files import WEIGHTS_NAME
from .base import loading, routing, structure
from .base.shared import SharedBase
from .config import DEFAULT_BASE, SamplingConfig, VisualConfig, check_argument, default_device, from_dict
from .data import templates
from .methods import AdapterConfig
from .visual import FeatureCache, ImageEncoder


class LlamaAdapterModel(nn.Module):
    """A trainable adapter on a frozen causal LM: LLaMA-Adapter's prompts, or another `--method` (methods/).

    >>> model = LlamaAdapterModel.from_base()            # the embedded SmolLM2, fresh (zero-gated) adapter
    >>> model = LlamaAdapterModel.load("runs/alpaca")    # a trained adapter on the base it was trained on
    >>> model.generate("Name three primary colours.")
    >>> model.generate("What colour is the shape?", image="shape.png")   # a multimodal adapter (clip_model set)

    Adapters built on the same base object share it (`shared`, a SharedBase): each call on this model runs this
    adapter, whatever other threads run. `unload` takes it off, `disabled` runs the plain base, and `use` makes
    calls of the base itself (`model.base(...)`) run this adapter.
    """

    def __init__(
        self, base, tokenizer, config: AdapterConfig | None = None, visual: VisualConfig | None = None, name=None
    ):
        super().__init__()
        config = config or AdapterConfig()
        config.check_fits(base.config.hidden_size, structure.context_length(base))
        method = methods.get(config.method)
        self.visual_config = visual or VisualConfig()
        if self.visual_config.clip_model and not method.takes_images:
            takes = " or ".join(repr(name) for name in methods.with_capability("takes_images"))
            raise ValueError(f"an image encoder (clip_model) needs method {takes}, not {config.method!r}")
        self.shared = SharedBase.of(base, tokenizer)
        self.base = base
        self.method = method(base, config.method_config())
        self.config = dataclasses.replace(config, **dataclasses.asdict(self.method.config))  # e.g. L clamped
        self.image_encoder = self.visual_proj = None
        self.template = "alpaca"  # the prompt template it answers in (templates.TEMPLATES): the one it was trained in
        if self.visual_config.clip_model:
            device = base.get_input_embeddings().weight.device
            self.image_encoder = ImageEncoder(self.visual_config).to(device)
            self.visual_proj = VisualProjection(self.image_encoder.clip_dim, base.config.hidden_size).to(device)
        self.name = self.shared.add(self.method, name)  # last: a failure above leaves the base untouched
        self.eval()  # no dropout (LoRA's) until training asks for it

    @property
    def tokenizer(self):
        return self.shared.tokenizer

    @property
    def multimodal(self) -> bool:
        return self.visual_proj is not None

    @property
    def prompts(self) -> dict[int, nn.Module]:
        """LLaMA-Adapter's AdaptionPrompt per adapted layer; {} for other methods."""
        return self.method.layer_prompts()

    @property
    def device(self) -> torch.device:
        return self.base.device

    def can_lend_a_copy(self, base: str, dtype: torch.dtype, device, quantize: str) -> bool:
        """Whether a copy of this model's base (`structure.copy_base`) is what loading `base` would give: the same base,
        dtype and device, in full precision, with modules this model's method leaves alone."""
        return (
            self.method.shares_base and quantize == "none" and loading.quantization(self.base) == "none"
            and self.base.name_or_path == loading.base_name(base) and self.base.dtype == dtype
            and torch.device(device or default_device()) == self.device
        )  # fmt: skip

    @property
    def context_length(self) -> int:
        """Positions the base handles: a prompt and its answer together must fit."""
        return structure.context_length(self.base)

    # ------------------------------------------------------------------------------------------------------
    # Construction, saving and loading

    @classmethod
    def from_base(
        cls,
        base: str = DEFAULT_BASE,
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
        model, tokenizer = loading.load_base(base, dtype, attn_implementation, quantize, device)
        return cls(model, tokenizer, config, visual).to(device)

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

        `adapter_dir`: an adapter folder, or the name of an adapter on the shelf (`llama_adapter.shelf`), e.g. "alpaca".

        `clip_weights` points a multimodal adapter at this machine's copy of the CLIP weights it was trained with.
        `alongside`: a loaded model whose base (and so dtype and device) this adapter shares instead of loading
        its own copy, if both methods can share one; switching between such models costs nothing.
        `quantize`: see `from_base`; an adapter trained on a quantised base loads onto a full-precision one too.
        """
        adapter_dir = shelf.resolve(adapter_dir)
        saved = adapter_files.read_config(adapter_dir)
        where = adapter_files.config_path(adapter_dir)
        config = AdapterConfig.from_saved(saved["adapter"], where)
        visual = from_dict(VisualConfig, saved.get("visual", {}), f"{where}: field 'visual'")
        visual = dataclasses.replace(visual, clip_weights=clip_weights) if clip_weights else visual
        sharing = alongside is not None and alongside.shared.can_take(methods.get(config.method))
        name = saved["base"]["name"] if base is None else base
        if sharing:
            model, tokenizer = alongside.base, alongside.tokenizer
        elif alongside is not None and alongside.can_lend_a_copy(name, dtype, device, quantize):
            model, tokenizer, device = structure.copy_base(alongside.base), alongside.tokenizer, alongside.device
        else:
            device = torch.device(device or default_device())
            named_by = "--base" if base is not None else f"{where}: base"
            model, tokenizer = loading.load_base(name, dtype, None, quantize, device, named_by)
        adapter_files.check_same_base(saved["base"], structure.base_identity(model), where)
        template = adapter_files.usable_template(saved, tokenizer, where)
        try:
            loaded = cls(model, tokenizer, config, visual)
        except ValueError as err:  # a setting of the file that this base cannot take
            raise ValueError(f"{where}: {err}") from None
        loaded.template = template
        try:
            loaded.load_adapter_weights(adapter_dir / WEIGHTS_NAME)
        except Exception:
            loaded.unload()  # a failed load leaves a shared base as it was
            raise
        return loaded if sharing else loaded.to(device)

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write the adapter folder (adapter_files.py): ours, and PEFT's files for PEFT's methods; atomically each."""
        files.check_can_write(out_dir, "out_dir", folder=True)
        adapter_files.write(out_dir, self.adapter_state(), self.saved_config(), self.method.peft_files())

    def saved_config(self) -> dict:
        """Our config, as `save` writes it: the method and its settings, the image encoder, the base."""
        return {
            "adapter": self.config.to_dict(),
            "visual": dataclasses.asdict(self.visual_config),
            "base": structure.base_identity(self.base),
            "trainable_parameters": self.num_trainable_parameters(),
            "template": self.template,
        }

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Set the adapter's parameters from a weights file; a file that does not fit changes nothing."""
        files.check_path(path, "path")
        expected = self.adapter_state()
        tensors = adapter_files.read_tensors(path, expected)
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(tensors[name])

    def unload(self) -> None:
        """Take this adapter off its base (which is exactly the loaded model again once no adapter is left)."""
        self.shared.remove(self.name)

    def disabled(self):
        """A context in which every call of the base runs the plain model: `model.base(...)`, and this model's (or any
        other adapter model's on the same base) own calls too. Blocks nest."""
        return self.shared.disabled()

    def use(self):
        """A context in which calls of the base itself (`model.base(...)`, `model.base.generate(...)`) run this adapter.
        Blocks nest: after an inner block, the outer block's adapter runs again."""
        return self.shared.use(self.method)

    # ------------------------------------------------------------------------------------------------------
    # What trains and what is saved: the adapter's parameters, nothing else

    def adapter_state(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by checkpoint name, e.g. 'layers.29.adapter_gate', 'visual_proj.linear.weight'."""
        state = dict(self.method.parameters_by_name())
        if self.visual_proj is not None:
            state |= {f"visual_proj.{name}": param for name, param in self.visual_proj.named_parameters()}
        return state

    def image_parameter_names(self) -> set[str]:
        """The parameters that joint training (--image-data) updates on image-text batches only: the visual
        projection and the method's own image side (V2's early prompts); the rest train on instructions."""
        visual = {name for name in self.adapter_state() if name.startswith("visual_proj.")}
        return visual | self.method.image_parameters()

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_state().values())

    def gates(self) -> dict[int, torch.Tensor]:
        """tanh(gate) per adapted layer and head: how much each head listens to its prompts (LLaMA-Adapter only)."""
        return {idx: torch.tanh(prompt.adapter_gate.detach()).cpu() for idx, prompt in self.prompts.items()}

    # ------------------------------------------------------------------------------------------------------
    # Forward, loss, generation

    @contextmanager
    def running(
        self, image_features: torch.Tensor | None = None, has_image: torch.Tensor | None = None, image_index=None
    ) -> Iterator[None]:
        """Within this block, calls of the base run this adapter with these images (inside `disabled()`, the plain
        model), and no other call runs on the base.

        `image_features` (N, clip_dim), and `has_image` (N,) False for rows without an image; image n belongs to row n,
        or with `image_index` (B, T) to the positions that hold n (packed rows).
        """
        with self.shared.reserved():
            part = self.part(slice(None), image_features, has_image)  # first: a removed adapter is refused
            if part.visual is not None and image_index is not None:
                part = dataclasses.replace(part, visual=part.visual[image_index])  # each position its own row's image
            if torch.is_grad_enabled() and self.base.training:
                routing.check_checkpointing(self.base)
            with self.shared.running([part]):
                yield

    def part(
        self, rows: slice, image_features: torch.Tensor | None = None, has_image: torch.Tensor | None = None
    ) -> routing.Part:
        """Rows `rows` of a call of the shared base, run with this adapter and these rows' images (see `running`)."""
        return routing.Part(self.shared.placements(self.method), rows, self._projected(image_features, has_image))

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
        with self.running(image_features, has_image):
            logits = self.base(**self.method.inputs(input_ids, attention_mask)).logits
        return logits[:, self.method.virtual_tokens :]

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_features: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        eos_weight: float = 1.0,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions whose label is not -100 (the responses).

        `eos_weight` multiplies the loss of each EOS label (the end of a response), the mean still dividing by the
        number of labels, so the other tokens weigh as before and every batch's loss stays on one scale.

        In training mode, plus the method's penalty if it has one (AdaLoRA's orthogonality term).
        Packed rows (`batching.collate_packed`): `position_ids` (B, T) restart at each row, and a position attends only
        to earlier ones of its own row (and to the prompts); `image_index` (B, T) says whose image each one sees.
        """
        logits, targets, _ = self._response_logits(
            input_ids, attention_mask, labels, image_features, has_image, position_ids, image_index
        )
        losses = F.cross_entropy(logits, targets, reduction="none")
        if eos_weight != 1.0:
            losses = losses * torch.where(targets == self.tokenizer.eos_token_id, eos_weight, 1.0)
        loss = losses.mean()
        penalty = self.method.penalty() if self.training else None
        return loss if penalty is None else loss + penalty

    def response_logprobs(self, input_ids, attention_mask, labels, **images) -> torch.Tensor:
        """(B,) summed log-probability of each row's labelled tokens: how likely the model finds each response.

        Takes the same arguments as `loss`.
        """
        logits, targets, rows = self._response_logits(input_ids, attention_mask, labels, **images)
        token_logprobs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        return torch.zeros(input_ids.shape[0], device=logits.device).index_add_(0, rows, token_logprobs)

    def _response_logits(
        self,
        input_ids,
        attention_mask,
        labels,
        image_features=None,
        has_image=None,
        position_ids=None,
        image_index=None,
    ):
        """fp32 logits (N, vocab) at the N scored positions, their targets (N,) and row indices (N,).

        Only the scored positions are projected onto the vocabulary: prompts and padding need no logits. That is
        the model's own head only where the head is a plain projection, which structure.MODEL_TYPES guarantees.
        """
        if position_ids is None:
            inputs = self.method.inputs(input_ids, attention_mask)
        elif self.method.tokens_only:
            inputs = routing.packed_inputs(input_ids, position_ids)
        else:
            raise ValueError(f"--method {self.config.method} cannot train on packed rows (--packing)")
        with self.running(image_features, has_image, image_index):
            hidden = structure.decoder(self.base)(**inputs).last_hidden_state
        hidden = hidden[:, self.method.virtual_tokens :]
        targets = labels[:, 1:]
        scored = targets != -100
        logits = self.base.get_output_embeddings()(hidden[:, :-1][scored]).float()
        return logits, targets[scored], scored.nonzero()[:, 0]

    def stream(
        self, instruction: str, input: str = "", sampling: SamplingConfig | None = None, image=None
    ) -> Iterator[str]:
        """Yield the answer to an Alpaca-style instruction piece by piece as it is generated.

        `image`: a file path or PIL image, for a multimodal adapter.
        """
        from .serving.generation import stream

        # The rules of `llama-adapter chat`'s flags, so that a wrong argument is named here, not deep in tokenising.
        check_argument("instruction", instruction, str)
        check_argument("input", input, str, default="")
        check_argument("sampling", sampling, SamplingConfig | None, default=None)
        features = None if image is None else self.encode_images([image])
        prompt = templates.instruction_prompt(self.template, self.tokenizer, instruction, input)
        return stream(self, prompt, sampling or SamplingConfig(), features)

    def generate(self, instruction: str, input: str = "", sampling: SamplingConfig | None = None, image=None) -> str:
        """The whole answer to an Alpaca-style instruction (about `image`, if given)."""
        return "".join(self.stream(instruction, input, sampling, image))

    # ------------------------------------------------------------------------------------------------------
    # Images

    def feature_cache(self) -> FeatureCache | None:
        """The on-disk cache of this adapter's image features (under the user cache dir); None if text-only."""
        return FeatureCache(self.image_encoder, loading.cache_dir() / "clip-features") if self.multimodal else None

    def encode_images(self, images: list) -> torch.Tensor:
        """(N, clip_dim) CLIP features of image files or PIL images."""
        self._check_takes_images()
        if not isinstance(images, (list, tuple)):  # a single path would be taken for a list of its characters
            raise ValueError(f"images must be a list, got {type(images).__name__} {images!r:.60}")
        return self.image_encoder(images)

    def _projected(self, features: torch.Tensor | None, has_image: torch.Tensor | None) -> torch.Tensor | None:
        """(B, dim) image features at the LLM's width, zero for rows without an image; None without images."""
        if features is None:
            return None
        self._check_takes_images()
        visual = self.visual_proj(features.to(self.visual_proj.linear.weight))
        return visual if has_image is None else visual * has_image.to(visual)[:, None]

    def _check_takes_images(self) -> None:
        if not self.multimodal:
            raise ValueError("this adapter is text-only (trained without --clip-model); it cannot take images")
