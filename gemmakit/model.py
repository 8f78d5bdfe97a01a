"""The Gemma transformer: token ids in, logits out. One `Block` class serves every generation.

Where it sits: after `config`, before `checkpoint`/`quantize`/`infer`. The model knows nothing
about tokenization, chat formatting or sampling; a KV cache, when given, is any object with
`update(layer, k, v, positions) -> (k_all, v_all, key_positions)` (see `infer.kv_cache`).

Numerics follow HF transformers' eager Gemma implementation op for op, so float32 logits are
bit-identical to it (reference §1.0): scores are scaled *after* QK^T by a Python float, the
attention soft-cap divides by the cap, RMSNorm is `x * rsqrt(mean(x^2) + eps) * (1 + w)` in
float32 with the downcast last, the embedding scale is fp32(sqrt(dim)) cast to the weight dtype,
GELU is `F.gelu(approximate="tanh")` (a hand-written tanh formula differs by 1 ulp on ~0.9% of
elements), and masks add `finfo(dtype).min`.

Key trade-off: the exact "eager" path materialises (B, H, T, S) scores and repeats kv heads; the
"sdpa" path is ~2-4x faster at long T but only agrees to ~5e-6, and cannot express Gemma 2's
soft-cap, so soft-capped models always run eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.config import LOCAL, ModelConfig

ATTN_IMPLS = ("eager", "sdpa")


class RMSNorm(nn.Module):
    """Gemma RMSNorm: computed in float32, multiplied by (1 + w), cast back last."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero-centred: a fresh norm is the identity scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_inv_freq(
    head_dim: int, theta: float, factor: float, device: torch.device | None = None
) -> torch.Tensor:
    """RoPE inverse frequencies in float32; linear scaling divides the frequencies, not the positions."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if factor != 1.0:
        inv_freq = inv_freq / factor
    return inv_freq


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, head_dim) for half-split ("NeoX") rotation, computed in float32."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate element i with element i + head_dim/2 (every Gemma reference pairs halves)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, d) -> (B, n_kv * n_rep, S, d); kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1."""
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, S): key j visible to query i iff 0 <= pos_j <= pos_i (and pos_j > pos_i - W).

    Position -1 marks padding. Padding keys are never visible; padding queries see every key so
    their (discarded) rows stay finite and cannot leak NaN into real rows through `p @ v`.
    """
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, S)
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed &= kp > qp - window
    allowed |= qp < 0
    return allowed[:, None]


class Embedding(nn.Embedding):
    """The token embedding; `attend` is the tied output projection (a quantized table swaps in both)."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Block(nn.Module):
    """One decoder layer. Norm layout, QK-norm, window, RoPE base and soft-cap all come from the config."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.local = cfg.layer_types[layer] == LOCAL
        self.window = cfg.sliding_window if self.local else None
        d, eps = cfg.head_dim, cfg.norm_eps
        self.attn_norm = RMSNorm(cfg.dim, eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * d, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * d, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * d, bias=False)
        self.wo = nn.Linear(cfg.n_heads * d, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(cfg.dim, eps)
            self.post_mlp_norm = RMSNorm(cfg.dim, eps)
        self.mlp_norm = RMSNorm(cfg.dim, eps)
        self.w_gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w_down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                cache: object | None, impl: str) -> torch.Tensor:  # fmt: skip
        h = self.attention(self.attn_norm(x), rope, positions, cache, impl)
        if self.cfg.sandwich_norm:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp_norm(x)
        h = self.w_down(F.gelu(self.w_gate(h), approximate="tanh") * self.w_up(h))
        if self.cfg.sandwich_norm:
            h = self.post_mlp_norm(h)
        return x + h

    def attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                  cache: object | None, impl: str) -> torch.Tensor:  # fmt: skip
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, n_heads, T, d)
        k = self.wk(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, d)
        v = self.wv(x).view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, d)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pos = positions
        if cache is not None:
            k, v, k_pos = cache.update(self.layer, k, v, positions)  # (B, n_kv, S, d), (B, S)
        allowed = attention_mask(positions, k_pos, self.window)  # (B, 1, T, S)
        if impl == "sdpa" and cfg.attn_softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=cfg.scaling, enable_gqa=cfg.n_rep > 1
            )
        else:
            out = self._eager(q, k, v, allowed)
        out = out.transpose(1, 2).reshape(b, t, -1)  # (B, T, n_heads * d)
        return self.wo(out)

    def _eager(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """The reference path: HF eager's exact op order."""
        cfg = self.cfg
        k, v = repeat_kv(k, cfg.n_rep), repeat_kv(v, cfg.n_rep)
        scores = torch.matmul(q, k.transpose(2, 3)) * cfg.scaling  # (B, H, T, S); scale after the matmul
        if cfg.attn_softcap is not None:
            scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
        mask = torch.where(allowed, zero, torch.finfo(scores.dtype).min)  # additive, as HF's eager mask
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)  # (B, H, T, d)


class Gemma(nn.Module):
    """tokens (B, T) -> logits (B, T, V). Positions default to 0..T-1; -1 marks left padding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.attn_impl = "eager"  # runtime choice, not a model property; see ATTN_IMPLS
        self.embed = Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: object | None = None,
                last_only: bool = False) -> torch.Tensor:  # fmt: skip
        """Logits (B, T, V) in float32-or-model dtype; `last_only` returns (B, 1, V) (saves T x V at prefill)."""
        x = self.hidden(tokens, positions, cache)
        return self.head(x[:, -1:] if last_only else x)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               cache: object | None = None) -> torch.Tensor:  # fmt: skip
        """The final-normed hidden states (B, T, dim) that `head` turns into logits.

        Split from `forward` so a training loss can run the (dim x 256k) head chunk by chunk.
        """
        cfg = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected a (batch, time) LongTensor, got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        x = self.embed(tokens)
        x = x * torch.tensor(cfg.dim**0.5).to(x.dtype)  # fp32(sqrt(H)), then the embedding's dtype
        ropes = {}
        for kind, theta, factor in (
            (False, cfg.rope_theta, cfg.rope_scaling),
            (True, cfg.rope_local_theta, 1.0),
        ):
            inv_freq = rope_inv_freq(cfg.head_dim, theta, factor, tokens.device)
            ropes[kind] = rope_cos_sin(positions, inv_freq, x.dtype)
        for block in self.blocks:
            x = block(x, ropes[block.local], positions, cache, self.attn_impl)
        return self.final_norm(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., dim) -> logits (..., V), soft-capped where the config says so."""
        cfg = self.config
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)  # both are F.linear(x, W)
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def set_attn_impl(self, impl: str) -> Gemma:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {impl!r}")
        self.attn_impl = impl
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Gemma:
        """Random initialisation for training from scratch: N(0, std) linears/embedding, zero norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self


def param_count(cfg: ModelConfig) -> int:
    """Parameters of `cfg` counted on the meta device (nothing allocated); a tied embedding counts once."""
    with torch.device("meta"):
        model = Gemma(cfg)
    return sum(p.numel() for p in model.parameters())
