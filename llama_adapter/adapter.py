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

    def __init__(self, adapter_len: int, hidden_size: int, num_heads: int):
        super().__init__()
        # N(0, 1) like the reference implementation's nn.Embedding; harmless because the gate starts at zero.
        self.adapter_prompt = nn.Parameter(torch.randn(adapter_len, hidden_size))
        self.adapter_gate = nn.Parameter(torch.zeros(num_heads))
        self._cached_kv: tuple | None = None  # (key, image, keys, values): see _keys_values

    def forward(
        self,
        query: torch.Tensor,
        k_proj: nn.Module,
        v_proj: nn.Module,
        scaling: float,
        visual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gated attention of `query` (B, H, T, hd), rotary already applied, over the prompt.

        `visual`: (B, dim) projected image features added to the prompt of each row, or None (text only).
        Returns (B, T, H, hd), the layout in which attention functions return their output, ready to be added.
        """
        keys, values = self._keys_values(k_proj, v_proj, visual, query.dtype, query.shape[1], query.shape[3])
        batch = (query.shape[0], -1, -1, -1)
        # No mask: every position sees the whole prompt. One fused kernel (fp32 softmax inside) instead of
        # matmul, softmax, matmul: it halves the prompt term's cost per decoded token.
        out = F.scaled_dot_product_attention(query, keys.expand(batch), values.expand(batch), scale=scaling)
        return out.transpose(1, 2)

    def _keys_values(self, k_proj, v_proj, visual, dtype: torch.dtype, num_heads: int, head_dim: int):
        """The prompt projected by the layer's k/v for every query head, ([B,] H, K, hd) each.

        The gate is folded into the values -- tanh(g) softmax(.) V equals softmax(.) (tanh(g) V) since the gate is
        per head -- so the gated prompt term is plain attention over these keys and values.
        Without gradients (generation, evaluation) they are computed once and reused while the prompt, the gate,
        the image and the projections stay the same: decoding a token would otherwise cost K extra rows of k/v
        projection in every adapted layer. Version counters see in-place updates (an optimizer step, loading
        weights), data pointers see moved or cast weights; the image is compared by identity, and the cache holds
        it so that its memory (and so a look-alike new tensor) cannot come back at the same address.
        """
        caching = not torch.is_grad_enabled()  # training recomputes every step: no key to build, nothing to keep
        if caching:
            weights = [self.adapter_prompt, self.adapter_gate, *k_proj.parameters(), *v_proj.parameters()]
            key = (dtype, num_heads, head_dim, *((w.device, w.data_ptr(), w._version) for w in weights))
            cached = self._cached_kv
            if cached is not None and cached[0] == key and cached[1] is visual:
                return cached[2:]
        prompt = self.adapter_prompt.to(dtype)  # params stay fp32; compute runs in the base's dtype
        if visual is not None:
            prompt = prompt + visual[:, None].to(dtype)  # (K, dim) + (B, 1, dim) -> (B, K, dim)
        # Grouped-query attention: each key/value head serves num_heads // H_kv consecutive query heads.
        keys = _query_heads(k_proj(prompt), head_dim, num_heads)
        gate = torch.tanh(self.adapter_gate).to(dtype)[:, None, None]  # (H, 1, 1)
        values = gate * _query_heads(v_proj(prompt), head_dim, num_heads)
        self._cached_kv = (key, visual, keys, values) if caching else None
        return keys, values


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
