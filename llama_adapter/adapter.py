"""LLaMA-Adapter's zero-initialised attention: the whole method in one module.

Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
https://arxiv.org/abs/2303.16199, section 3.2 (eq. 6-9).

Each of the top L layers of a frozen LLaMA learns K prompt vectors P_l (K, dim). The layer projects them with
its own frozen k/v projections -- with no rotary embedding, prompts have no position -- and every query
attends to them with a softmax of its own. That result is scaled per head by tanh(g_l), with g_l initialised
to zero, and added to the layer's ordinary attention output before the output projection:

    out = softmax(Q K^T / sqrt(d) + mask) V  +  tanh(g_l) * softmax(Q (P_l W_k)^T / sqrt(d)) (P_l W_v)

so an untrained adapter is exactly the base model, and training grows the prompts' influence from zero.

Multimodal (section 3.3): a frozen CLIP encoder's global image feature goes through a small trainable projection
(`VisualProjection`) to the LLM width and is added to every adapted layer's K prompts, P_l + repeat_K(I_p), so
each sample attends to prompts shifted by its own image. Rows without an image add nothing. The projected features
come with each call, never stored on the module.
Because the same I_p shifts all K prompts, and the projections are linear, the shift adds the same q . (I_p W_k) to
every prompt's score -- which the softmax over the K prompts cancels -- and the same I_p W_v to every value, whose
attention weights sum to one. So the image's whole effect is tanh(g_l) * I_p W_v, added at every position:

    out = (text-only prompt term above)  +  tanh(g_l) * (I_p W_v)

which is how it is computed: the prompts' keys and values stay the same for every image (and are cached), and each
position may carry its own image, as the rows packed into one sequence do.

LLaMA-Adapter V2 (Gao et al. 2023, https://arxiv.org/abs/2304.15010, section 3) keeps those prompts and unlocks
more of the frozen model, every piece starting where it changes nothing:
- bias and scale on every linear layer (`BiasScale`): y = s * (W x + b), s = 1 and b = 0 at first (eq. 4);
- the normalisation layers' weights (`NormShift`): the RMSNorm weight w trains as w + d, d = 0 at first;
- early fusion: the image shifts the prompts of the first V adapted layers only, the later prompts stay text-only.
Biases and scales fold into the weights they follow (W' = diag(s) W, b' = s (b0 + b)), norm shifts into the norm's
weight, so only the prompts remain an adapter (methods/llama_adapter_v2.py).

The bottleneck adapters of LLM-Adapters (Hu et al. 2023, https://arxiv.org/abs/2304.01933), which PEFT lacks,
live here too: each decoder layer's MLP gets a small residual branch f(z W_down) W_up, with W_up zero-initialised
so that, like the gates above, an untrained adapter is exactly the base model. Series reads the MLP's output h
(h <- h + f(h W_down) W_up), Parallel reads the MLP's input x (h <- h + f(x W_down) W_up).

DyLoRA (Valipour et al. 2023, https://arxiv.org/abs/2210.07558) is LoRA trained for every rank at once: each
training step draws a rank b from 1..r and uses only the first b rows of A and columns of B,

    W x + (alpha / b) B[:, :b] A[:b, :] x,

so that afterwards any b <= r serves, the leading ranks carrying the most. (The paper also offers updating only the
b-th row and column each step; here all of the first b train.) LoRA, AdaLoRA, prefix and prompt tuning come from
PEFT (methods/peft_methods.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdaptionPrompt(nn.Module):
    """The K learnable prompt vectors and per-head gates of one adapted attention layer."""

    def __init__(self, adapter_len: int, hidden_size: int, num_heads: int, takes_image: bool = True):
        super().__init__()
        # N(0, 1) like the reference implementation's nn.Embedding; harmless because the gate starts at zero.
        self.adapter_prompt = nn.Parameter(torch.randn(adapter_len, hidden_size))
        self.adapter_gate = nn.Parameter(torch.zeros(num_heads))
        self.takes_image = takes_image  # False: a V2 late layer, whose prompt stays text-only
        self.projection_tuning: tuple[nn.Module, ...] = ()  # V2's BiasScale of k and v: the projections' own part
        self._cached_kv: tuple | None = None  # (key, keys, values): see _keys_values

    def forward(
        self,
        query: torch.Tensor,
        k_proj: nn.Module,
        v_proj: nn.Module,
        scaling: float,
        visual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gated attention of `query` (B, H, T, hd), rotary already applied, over the prompt.

        `visual`: projected image features added to the prompt, (B, dim) one per row or (B, T, dim) one per position,
        or None (text only). Returns (B, T, H, hd), the layout in which attention functions return their output.
        """
        num_heads, head_dim = query.shape[1], query.shape[3]
        keys, values = self._keys_values(k_proj, v_proj, query.dtype, num_heads, head_dim)
        batch = (query.shape[0], -1, -1, -1)
        # No mask: every position sees the whole prompt. One fused kernel (fp32 softmax inside) instead of
        # matmul, softmax, matmul: it halves the prompt term's cost per decoded token.
        out = F.scaled_dot_product_attention(query, keys.expand(batch), values.expand(batch), scale=scaling)
        out = out.transpose(1, 2)
        if visual is None or not self.takes_image:
            return out
        shift = self._image_values(v_proj, visual.to(query.dtype), num_heads, head_dim)  # (B, [T,] H, hd)
        return out + (shift[:, None] if visual.dim() == 2 else shift)

    def _keys_values(self, k_proj, v_proj, dtype: torch.dtype, num_heads: int, head_dim: int):
        """The prompt projected by the layer's k/v for every query head, (H, K, hd) each.

        The gate is folded into the values -- tanh(g) softmax(.) V equals softmax(.) (tanh(g) V) since the gate is
        per head -- so the gated prompt term is plain attention over these keys and values.
        Without gradients (generation, evaluation) they are computed once and reused while the prompt, the gate and
        the projections stay the same: decoding a token would otherwise cost K extra rows of k/v projection in every
        adapted layer. Version counters see in-place updates (an optimizer step, loading weights), data pointers see
        moved or cast weights.
        """
        caching = not torch.is_grad_enabled()  # training recomputes every step: no key to build, nothing to keep
        if caching:
            tuning = [p for module in self.projection_tuning for p in module.parameters()]
            weights = [self.adapter_prompt, self.adapter_gate, *k_proj.parameters(), *v_proj.parameters(), *tuning]
            key = (dtype, num_heads, head_dim, *((w.device, w.data_ptr(), w._version) for w in weights))
            if self._cached_kv is not None and self._cached_kv[0] == key:
                return self._cached_kv[1:]
        prompt = self.adapter_prompt.to(dtype)  # params stay fp32; compute runs in the base's dtype
        # Grouped-query attention: each key/value head serves num_heads // H_kv consecutive query heads.
        keys = _query_heads(k_proj(prompt), head_dim, num_heads)
        values = self._gate(dtype)[:, None, None] * _query_heads(v_proj(prompt), head_dim, num_heads)
        self._cached_kv = (key, keys, values) if caching else None
        return keys, values

    def _image_values(self, v_proj, visual: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
        """tanh(g) * (I_p W_v) per query head: (..., dim) image features -> (..., H, hd)."""
        # v(P + I) - v(P) for an affine v: the constant part (a bias, V2's scaled bias) belongs to the prompt alone.
        projected = v_proj(visual) - v_proj(visual.new_zeros(1, visual.shape[-1]))
        kv_heads = projected.unflatten(-1, (-1, head_dim))  # (..., H_kv, hd)
        heads = kv_heads.repeat_interleave(num_heads // kv_heads.shape[-2], dim=-2)
        return self._gate(visual.dtype)[:, None] * heads

    def _gate(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.tanh(self.adapter_gate).to(dtype)


class BiasScale(nn.Module):
    """LLaMA-Adapter V2 on one linear layer: its output y becomes s * (y + b), with s = 1 and b = 0 at first."""

    def __init__(self, out_features: int):
        super().__init__()
        self.adapter_bias = nn.Parameter(torch.zeros(out_features))
        self.adapter_scale = nn.Parameter(torch.ones(out_features))

    def forward(self, layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
        dtype = layer_output.dtype
        return self.adapter_scale.to(dtype) * (layer_output + self.adapter_bias.to(dtype))


class NormShift(nn.Module):
    """LLaMA-Adapter V2 on one RMSNorm: its weight w trains, as w + d with d = 0 at first (w stays the base's).

    The norm's output w * n(x) becomes w * n(x) + d * n(x), n(x) = x / rms(x) recomputed here in fp32 as the norm
    does: the same function as a norm whose weight is w + d, without touching the shared base's weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight_shift = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
        x = layer_input.float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(layer_output.dtype)
        return layer_output + self.weight_shift.to(layer_output.dtype) * normed


class Bottleneck(nn.Module):
    """One layer's bottleneck adapter: z -> tanh(z W_down) W_up, added to the MLP's output by the model."""

    def __init__(self, hidden_size: int, size: int, parallel: bool):
        super().__init__()
        self.parallel = parallel  # reads the MLP's input (Parallel) or its output (Series)
        self.down = nn.Linear(hidden_size, size, bias=False)  # PyTorch's default (Kaiming-uniform) init
        self.up = nn.Linear(size, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, mlp_input: torch.Tensor, mlp_output: torch.Tensor) -> torch.Tensor:
        """The MLP's output with this adapter's branch added."""
        z = mlp_input if self.parallel else mlp_output
        return mlp_output + self.up(torch.tanh(self.down(z.to(self.down.weight.dtype)))).to(mlp_output.dtype)


class TruncatedLora(nn.Module):
    """DyLoRA on one linear layer: (alpha / b) B[:, :b] A[:b] x added to its output, for whichever rank b is set."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT's LoRA initialise A
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # zero: an untrained adapter is the base
        self.alpha = alpha
        self.dropout = nn.Dropout(dropout)
        self.rank = rank  # b when answering: any of 1..r, all of them by default
        self.training_rank = rank  # b in training mode: drawn for each step

    def forward(self, layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
        """The layer's output with this adapter's rank-b update added."""
        b = self.training_rank if self.training else self.rank
        down = F.linear(self.dropout(layer_input.to(self.lora_A.dtype)), self.lora_A[:b])
        return layer_output + (F.linear(down, self.lora_B[:, :b]) * (self.alpha / b)).to(layer_output.dtype)


class VisualProjection(nn.Module):
    """CLIP image feature (B, clip_dim) -> LLM width (B, dim): linear then LayerNorm, the only trainable visual part."""

    def __init__(self, clip_dim: int, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(clip_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(features))


def _query_heads(projected: torch.Tensor, head_dim: int, num_heads: int) -> torch.Tensor:
    """([B,] K, H_kv * hd) -> ([B,] H, K, hd), each key/value head repeated for its group of query heads."""
    heads = projected.unflatten(-1, (-1, head_dim)).transpose(-3, -2)
    return heads.repeat_interleave(num_heads // heads.shape[-3], dim=-3)
