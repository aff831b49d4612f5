"""LLaMA-Adapter's zero-initialised attention: the whole method in one module.

Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention",
https://arxiv.org/abs/2303.16199, section 3.2 (eq. 6-9).

Each of the top L layers of a frozen LLaMA learns K prompt vectors P_l (K, dim). The layer projects them with
its own frozen k/v projections -- with no rotary embedding, prompts have no position -- and every query
attends to them with a softmax of its own. That result is scaled per head by tanh(g_l), with g_l initialised
to zero, and added to the layer's ordinary attention output before the output projection:

    out = softmax(Q K^T / sqrt(d) + mask) V  +  tanh(g_l) * softmax(Q (P_l W_k)^T / sqrt(d)) (P_l W_v)

so an untrained adapter is exactly the base model, and training grows the prompts' influence from zero.
"""

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

    def forward(self, query: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module, scaling: float) -> torch.Tensor:
        """Gated attention of `query` (B, H, T, hd), rotary already applied, over the prompt.

        Returns (B, T, H, hd), the layout in which attention functions return their output, ready to be added.
        """
        num_heads, head_dim = query.shape[1], query.shape[3]
        prompt = self.adapter_prompt.to(query.dtype)  # params stay fp32; compute runs in the base's dtype
        keys = _heads(k_proj(prompt), head_dim)  # (H_kv, K, hd)
        values = _heads(v_proj(prompt), head_dim)
        # Grouped-query attention: each key/value head serves num_heads // H_kv consecutive query heads.
        groups = num_heads // keys.shape[0]
        keys = keys.repeat_interleave(groups, dim=0)  # (H, K, hd)
        values = values.repeat_interleave(groups, dim=0)

        scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling  # (B, H, T, K)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        gate = torch.tanh(self.adapter_gate).to(query.dtype).view(1, num_heads, 1, 1)
        out = torch.matmul(gate * probs, values)  # (B, H, T, hd)
        return out.transpose(1, 2)


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(K, H_kv * hd) -> (H_kv, K, hd)."""
    return projected.view(projected.shape[0], -1, head_dim).transpose(0, 1)
