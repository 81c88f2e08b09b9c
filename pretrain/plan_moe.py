"""What a mixture of experts adds to `pretrain plan` (pretrain/plan.py): the experts' sharding, their and the
router's activations, and the all-to-all buffers of expert parallelism.

- Sharding. With `model.moe.expert_parallel` EP > 1 each rank holds E / EP experts of every MoE layer, and ZeRO 1-2
  partition their optimizer state over the expert-data-parallel group (the world / EP ranks holding the same
  experts), everything else over all ranks (pretrain/train/expert_parallel.py). The model states are the dense
  part's at `world` ranks plus the experts' (1 / EP of them) at world / EP.
- Activations of an MoE layer per token, in place of a dense MLP's: the k routed copies of the row (lp k d, the
  grouped product's input), each expert's gate and up outputs and their SwiGLU product (lp 3 k d_e), the expert
  outputs before the weighted sum (lp k d), a shared expert's as a dense SwiGLU's (lp 3 s), and the router's
  fp32 logits and probabilities (8 E) with the top-k indices and weights (12 k).
- All-to-all buffers (EP > 1): one MoE layer at a time sends the k d-wide rows of every token to the ranks of their
  experts and receives as many, then the results go back the same way: a send and a receive buffer of lp k d per
  token. This assumes balanced routing; a rank whose experts draw more than their share receives more.
"""

from __future__ import annotations


def moe_layers(m) -> int:
    """How many of the model's layers are mixtures of experts (0 for a dense model)."""
    moe = getattr(m, "moe", None)
    return 0 if moe is None else sum(moe.is_moe_layer(i) for i in range(m.n_layers))


def expert_parallel(m) -> int:
    moe = getattr(m, "moe", None)
    return 1 if moe is None else moe.expert_parallel


def moe_layer_bytes_per_token(m, d_ff: int, lp: int) -> int:
    """Bytes one MoE layer's feed-forward keeps per token for the backward (see the module docstring)."""
    moe = m.moe
    k, d, de = moe.top_k, m.d_model, moe.d_expert or d_ff
    return lp * (k * d + 3 * k * de + k * d + 3 * moe.shared_width) + 8 * moe.n_experts + 12 * k


def all_to_all_bytes(m, tokens: int, lp: int) -> int:
    """The all-to-all send and receive buffers of one MoE layer for `tokens` tokens (0 without expert parallelism)."""
    if expert_parallel(m) == 1 or not moe_layers(m):
        return 0
    return 2 * lp * tokens * m.moe.top_k * m.d_model
