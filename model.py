"""model.py: the Transformer LM, built from its parts, with every variant the course compares.

Read top to bottom: the config, then the parts bottom-up (Linear, Embedding, norms, activations,
feed-forward nets, rotary positions, attention), then the sequence mixers the lecture compares
(softmax attention with GQA/MQA and sliding windows, multi-head latent attention, causal linear
attention, a Hyena-style long convolution), the mixture of experts, the block, the language model,
generation with a KV cache, and finally the accounting of parameters, FLOPs and memory.

The default `TransformerLM(ModelConfig())` is the course's TinyStories model: pre-norm RMSNorm
blocks, SwiGLU, RoPE, untied head, final norm; its state_dict uses the course's reference names.
Every hand-written part has a readable reference; where speed matters (attention) the fast path
sits right after it and the tests check that both agree.

Commands:
    python model.py                          # accounting for the default (course TinyStories) model
    python model.py --preset gpt2-xl         # the lecture's "transformer accounting" exercise
    python model.py --preset gpt2-small --tie_weights=True --d_ff=2048 --batch_size=16
    python model.py --num_experts=8 --experts_top_k=2 --mixer=attention --n_kv_heads=4
Reads and writes no files.

Papers:
    Vaswani et al. 2017, Attention Is All You Need (the Transformer, sinusoidal positions)
    Zhang & Sennrich 2019, Root Mean Square Layer Normalization
    Shazeer 2020, GLU Variants Improve Transformer (SwiGLU)
    Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding
    Katharopoulos et al. 2020, Transformers are RNNs (causal linear attention)
    Beltagy et al. 2020, Longformer (sliding-window attention)
    Shazeer 2019, Fast Transformer Decoding (multi-query attention); Ainslie et al. 2023 (GQA)
    DeepSeek-AI 2024, DeepSeek-V2 (multi-head latent attention)
    Shazeer et al. 2017; Fedus et al. 2021, Switch Transformers (mixture of experts, balancing loss)
    Poli et al. 2023, Hyena Hierarchy (implicit long convolutions)
    Dao et al. 2022, FlashAttention; Chowdhery et al. 2022, PaLM (the 6N + 12LHQT FLOP count)
    Kaplan et al. 2020; Hoffmann et al. 2022 (parameter and FLOP accounting)
"""

import argparse
import difflib
import math
import typing
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config: every architectural choice lives here, with the course's names for the course's fields.

@dataclass
class ModelConfig:
    vocab_size: int = 10000  # course TinyStories tokenizer size
    context_length: int = 256  # longest sequence the model sees (RoPE tables are this long)
    d_model: int = 512  # width of the residual stream
    num_layers: int = 4  # number of Transformer blocks
    num_heads: int = 16  # query heads; head_dim = d_model // num_heads
    d_ff: int = 1344  # hidden width of each feed-forward net (about 8/3 d_model for SwiGLU)
    rope_theta: float = 10000.0  # RoPE base: angle for dims (2i, 2i+1) is pos * theta^(-2i/d)
    # --- variants the lecture compares; the defaults give the course's model ---
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" | "none"
    norm_position: str = "pre"  # "pre" (norm inside the residual branch) | "post" (after the add)
    norm_eps: float = 1e-5  # added to the variance inside every norm
    ffn: str = "swiglu"  # "swiglu" (w1, w2, w3) | "gelu" | "relu" (w1, w2)
    positions: str = "rope"  # "rope" | "sinusoidal" | "learned" | "none" (hyena ignores "rope")
    mixer: str = "attention"  # "attention" (softmax) | "linear_attention" | "hyena"
    sliding_window: int | None = None  # None: full causal; W: each token sees its last W tokens
    n_kv_heads: int | None = None  # None: = num_heads (MHA); 1 < g < num_heads: GQA; 1: MQA
    kv_latent_dim: int | None = None  # None: plain attention; an int: MLA with this KV latent width
    mla_rope_dim: int | None = None  # MLA's decoupled RoPE width per head; None: head_dim // 2
    num_experts: int = 0  # 0: dense FFN; E > 0: mixture of E experts in every block
    experts_top_k: int = 2  # experts each token is routed to
    shared_expert: bool = False  # add one always-on expert next to the routed ones (DeepSeekMoE)
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss left in model.aux_loss
    hyena_order: int = 2  # number of (long convolution, gate) steps in the Hyena operator
    hyena_filter_hidden: int = 64  # width of the MLP that generates the implicit long filters
    tie_weights: bool = False  # share token_embeddings.weight with lm_head.weight
    attn_impl: str = "sdpa"  # "manual" (hand-written) | "sdpa" (torch, flash) | "triton" (kernels)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff",
                     "experts_top_k", "hyena_order", "hyena_filter_hidden"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("num_experts", self.num_experts, minimum=0)
        for name in ("sliding_window", "n_kv_heads", "kv_latent_dim", "mla_rope_dim"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        for name in ("rope_theta", "norm_eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.moe_aux_loss_coef >= 0:
            raise ValueError(f"moe_aux_loss_coef must be >= 0, got {self.moe_aux_loss_coef!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                             f"({self.num_heads})")
        attention = self.mixer == "attention"
        if self.positions == "rope" and self.mixer != "hyena" and self.rope_dim % 2:
            source = ("mla_rope_dim" if self.mla_rope_dim is not None else
                      "the head dim d_model/num_heads" + (" // 2 (MLA's default mla_rope_dim)"
                                                          if self.kv_latent_dim else ""))
            raise ValueError(f"RoPE rotates pairs of dimensions, so {source} = {self.rope_dim} "
                             f"must be even")
        if self.n_kv_heads is not None:
            if not attention or self.kv_latent_dim is not None:
                raise ValueError("n_kv_heads applies to softmax attention without MLA "
                                 "(mixer='attention', kv_latent_dim=None)")
            if self.n_kv_heads > self.num_heads or self.num_heads % self.n_kv_heads:
                raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of n_kv_heads "
                                 f"({self.n_kv_heads})")
        if self.sliding_window is not None and not attention:
            raise ValueError("sliding_window applies to softmax attention (mixer='attention')")
        if self.kv_latent_dim is not None:
            if not attention:
                raise ValueError("kv_latent_dim (MLA) applies to mixer='attention'")
            if self.positions != "rope":
                raise ValueError("kv_latent_dim (MLA) uses a decoupled RoPE part: "
                                 "set positions='rope'")
            if self.sliding_window is not None:
                raise ValueError("sliding_window is not implemented for MLA (kv_latent_dim)")
        elif self.mla_rope_dim is not None:
            raise ValueError("mla_rope_dim is only used with kv_latent_dim (MLA)")
        if self.num_experts and self.experts_top_k > self.num_experts:
            raise ValueError(f"experts_top_k ({self.experts_top_k}) must be <= num_experts "
                             f"({self.num_experts})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.num_heads

    @property
    def rope_dim(self) -> int:
        """Width that RoPE rotates per head: the head dim, or MLA's decoupled part."""
        if self.kv_latent_dim is None:
            return self.head_dim
        return self.mla_rope_dim or self.head_dim // 2

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """GPT-2 shapes with the course's architecture (as in its accounting exercise)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_CHOICES = {
    "norm": ("rmsnorm", "layernorm", "none"),
    "norm_position": ("pre", "post"),
    "ffn": ("swiglu", "gelu", "relu"),
    "positions": ("rope", "sinusoidal", "learned", "none"),
    "mixer": ("attention", "linear_attention", "hyena"),
    "attn_impl": ("manual", "sdpa", "triton"),
}

# Every model shape in the repository, by name: `--preset=NAME` in any stage that builds a model,
# with `--field=value` overriding single fields. train.py sets vocab_size from its tokenizer.
PRESETS = {
    # the main job's CPU model: small enough for ~10k tokens/s on 2 CPU cores
    "tiny": dict(context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=384),
    # CS336 assignment 1's TinyStories model (the ModelConfig defaults)
    "tinystories": dict(vocab_size=10000, context_length=256, d_model=512, num_layers=4,
                        num_heads=16, d_ff=1344),
    # GPT-2 small as nanoGPT trains it: vocab 50257 padded to a multiple of 64, tied embeddings,
    # SwiGLU at ~8/3 d_model (the throughput benchmark's shape)
    "nanogpt": dict(vocab_size=50304, context_length=1024, d_model=768, num_layers=12,
                    num_heads=12, d_ff=2048, tie_weights=True),
    # The GPT-2 sizes (Radford et al. 2019) with the course's architecture, d_ff = 4 d_model,
    # untied head, vocab 50257: the lecture's accounting exercise.
    **{name: dict(vocab_size=50257, context_length=1024, d_model=d, num_layers=n, num_heads=h,
                  d_ff=4 * d)
       for name, (n, d, h) in {"gpt2-small": (12, 768, 12), "gpt2-medium": (24, 1024, 16),
                               "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25)}.items()},
    # CS336 assignment 2's benchmark sizes (its Table 1), vocab 10,000
    **{name: dict(vocab_size=10000, context_length=512, d_model=d, d_ff=f, num_layers=n,
                  num_heads=h)
       for name, (d, f, n, h) in {"small": (768, 3072, 12, 12), "medium": (1024, 4096, 24, 16),
                                  "large": (1280, 5120, 36, 20), "xl": (1600, 6400, 48, 25),
                                  "2.7B": (2560, 10240, 32, 32)}.items()},
}


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Basic parts. Hand-written on purpose: no nn.Linear / nn.Embedding / nn.LayerNorm.

class Linear(nn.Module):
    """y = x W^T without bias; W is (d_out, d_in) like the course and torch."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        # Xavier-like variance keeps activations O(1) through the stack; the cut at 3 std avoids
        # rare huge weights.
        std = math.sqrt(2.0 / (d_in + d_out))
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class Embedding(nn.Module):
    """A lookup table: row i of weight is the vector of token i."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g. Computed in float32 (squares overflow/underflow in bf16),
    returned in the input dtype so the next matmul stays in the autocast dtype."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rms_inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * rms_inv * self.weight).to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * g + b, in float32 like RMSNorm."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean = x32.mean(-1, keepdim=True)
        var = (x32 - mean).pow(2).mean(-1, keepdim=True)
        return ((x32 - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(x) / sum exp(x); subtracting the max first changes nothing mathematically and keeps
    exp from overflowing (a row of -inf stays NaN-free as long as one entry is finite)."""
    exp = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return exp / exp.sum(dim=dim, keepdim=True)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): a gated FFN; three matrices, so d_ff ~ 8/3 d_model matches the
    parameters of a 4 d_model two-matrix FFN."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)
        self.w3 = Linear(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu(self.w1(x)) * self.w3(x))


class FeedForward(nn.Module):
    """The original non-gated FFN, w2(act(w1 x)), with ReLU (Vaswani) or GELU (GPT-2)."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)
        self.activation = torch.relu if activation == "relu" else gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)))


def make_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "swiglu":
        return SwiGLU(config.d_model, config.d_ff)
    return FeedForward(config.d_model, config.d_ff, config.ffn)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    if config.norm == "layernorm":
        return LayerNorm(config.d_model, config.norm_eps)
    return nn.Identity()


# ----------------------------------------------------------------------------------------------
# Positions.

class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair (x[2i], x[2i+1]) of a query/key by the angle pos * theta^(-2i/d_k).
    A rotation by angle a on q and b on k leaves q.k depending only on a - b, so attention sees
    relative positions. cos/sin are precomputed once; non-persistent buffers keep them out of the
    state_dict (the course's checkpoint layout has no RoPE keys)."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64) / d_k)  # (d_k/2,)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (L, d_k/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def cos_sin(self, token_positions: torch.Tensor | None, seq_len: int):
        """Tables for the given positions (..., T), or for 0..seq_len-1 when None (a slice)."""
        if token_positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]
        return self.cos[token_positions], self.sin[token_positions]

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., T, d_k); token_positions: (..., T), broadcastable to x's leading dims."""
        cos, sin = self.cos_sin(token_positions, x.shape[-2])
        return apply_rotary(x, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., T, d) by tables (..., T, d/2): elementwise only, which
    torch.compile fuses into one kernel. Done in float32, returned in x's dtype."""
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (..., T, d/2)
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def sinusoidal_table(max_seq_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s fixed positions: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos."""
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq
    table = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : d_model // 2]
    return table.float()


# ----------------------------------------------------------------------------------------------
# Attention: the hand-written reference, then the dispatcher that picks the fast kernel.

def scaled_dot_product_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V. Q: (..., T, d_k), K: (..., S, d_k), V: (..., S, d_v);
    mask (T, S) or broadcastable, True = may attend. Softmax in float32 for bf16 inputs."""
    scores = (Q @ K.transpose(-2, -1)).float() / math.sqrt(Q.shape[-1])  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1).to(V.dtype) @ V


def attention_mask(seq_len: int, kv_len: int, start: int, window: int | None,
                   device: torch.device | None = None) -> torch.Tensor:
    """(T, S) boolean mask: query i sits at cache slot start + i and may see keys at slots
    j <= start + i, and with a sliding window only the last `window` of them."""
    q_slot = torch.arange(start, start + seq_len, device=device)[:, None]
    k_slot = torch.arange(kv_len, device=device)[None, :]
    allowed = k_slot <= q_slot
    if window is not None:
        allowed = allowed & (k_slot > q_slot - window)
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0,
           window: int | None = None, impl: str = "sdpa") -> torch.Tensor:
    """Causal attention of q (..., H, T, d) over k, v (..., H_kv, S, d), with H a multiple of H_kv
    (grouped-query: query head h reads key-value head h // (H / H_kv)).

    impl="manual" is the reference above; "sdpa" uses torch's fused kernels: with no cache and no
    window, is_causal=True and no mask lets torch pick FlashAttention; "triton" calls kernels.py's
    FlashAttention for that same plain causal case and torch's kernel for the rest (cache, window).
    """
    num_heads, num_kv_heads = q.shape[-3], k.shape[-3]
    if num_kv_heads != num_heads:
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=-3)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=-3)
    seq_len, kv_len = q.shape[-2], k.shape[-2]
    if impl == "manual":
        return scaled_dot_product_attention(
            q, k, v, attention_mask(seq_len, kv_len, start, window, q.device))
    if window is None and start == 0 and seq_len == kv_len:
        if impl == "triton":
            return _triton_flash_attention()(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if window is None and seq_len == 1:  # one new token sees the whole cache: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    mask = attention_mask(seq_len, kv_len, start, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _triton_flash_attention():
    """kernels.py (a later stage) provides flash_attention(q, k, v, is_causal) on (..., T, d)."""
    try:
        from kernels import flash_attention
    except ImportError as error:
        raise ImportError(
            "attn_impl='triton' needs kernels.py with flash_attention(q, k, v, is_causal) "
            f"(the kernels stage); it could not be imported ({error}). "
            "Use attn_impl='sdpa' or 'manual'.") from error
    return flash_attention


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., T, H*d) -> (..., H, T, d): a view and a transpose, no copy."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., H, T, d) -> (..., T, H*d)."""
    return x.transpose(-3, -2).flatten(-2)


def _write_cache(buffer: torch.Tensor, new: torch.Tensor, start: int, dim: int) -> torch.Tensor:
    """Store `new` at slots start.. of a preallocated buffer; return the filled prefix."""
    end = start + new.shape[dim]
    buffer.narrow(dim, start, new.shape[dim]).copy_(new)
    return buffer.narrow(dim, 0, end)


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE, grouped/multi-query key-value heads
    (n_kv_heads < num_heads shrinks k_proj, v_proj and the KV cache) and an optional sliding
    window. Names follow the course: q_proj, k_proj, v_proj, output_proj. (With a window the KV
    cache still keeps every token; a rolling buffer of W slots would bound its memory.)"""

    def __init__(self, d_model: int, num_heads: int, n_kv_heads: int | None = None,
                 use_rope: bool = True, window: int | None = None,
                 attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, n_kv_heads or num_heads
        self.head_dim = d_model // num_heads
        self.use_rope, self.window, self.attn_impl = use_rope, window, attn_impl
        self.q_proj = Linear(d_model, num_heads * self.head_dim)
        self.k_proj = Linear(d_model, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(d_model, self.num_kv_heads * self.head_dim)
        self.output_proj = Linear(num_heads * self.head_dim, d_model)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        q = _split_heads(self.q_proj(x), self.num_heads)  # (B, H, T, d)
        k = _split_heads(self.k_proj(x), self.num_kv_heads)  # (B, H_kv, T, d)
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        if self.use_rope and rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k = _write_cache(cache["k"], k, start, dim=2).to(q.dtype)  # (B, H_kv, start+T, d)
            v = _write_cache(cache["v"], v, start, dim=2).to(q.dtype)
        out = attend(q, k, v, start, self.window, self.attn_impl)  # (B, H, T, d)
        return self.output_proj(_merge_heads(out))

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        shape = (batch_size, self.num_kv_heads, max_seq_len, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2's MLA. Keys and values are up-projected from one small latent c = W_dkv x
    (width kv_latent_dim), so the KV cache stores c plus a single shared RoPE key of width
    rope_dim per token instead of 2 * H * d. RoPE does not commute with the up-projection, so
    position goes in a separate ("decoupled") part: q = [q_C ; RoPE(q_R)], k = [k_C ; RoPE(k_R)]
    with k_R shared by all heads. (We skip the paper's query compression, as DeepSeek-V2-Lite
    does, and recompute K, V from the cached latent instead of absorbing W_uk into W_q.)"""

    def __init__(self, d_model: int, num_heads: int, latent_dim: int, rope_dim: int,
                 attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.rope_dim, self.attn_impl = rope_dim, attn_impl
        inner = num_heads * self.head_dim
        self.q_proj = Linear(d_model, inner)
        self.q_rope_proj = Linear(d_model, num_heads * rope_dim)
        self.kv_down_proj = Linear(d_model, latent_dim)
        self.k_up_proj = Linear(latent_dim, inner)
        self.v_up_proj = Linear(latent_dim, inner)
        self.k_rope_proj = Linear(d_model, rope_dim)
        self.output_proj = Linear(inner, d_model)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        latent = self.kv_down_proj(x)  # (B, T, latent)
        # One RoPE key shared by the heads: a head axis of size 1, so per-sequence RoPE tables
        # (B, 1, T, rope_dim/2) apply to it as they do to the queries.
        k_rope = apply_rotary(self.k_rope_proj(x).unsqueeze(-3), *rope)  # (B, 1, T, rope_dim)
        if cache is not None:
            dtype = latent.dtype
            latent = _write_cache(cache["latent"], latent, start, dim=1).to(dtype)  # (B, S, .)
            k_rope = _write_cache(cache["k_rope"], k_rope, start, dim=2).to(dtype)
        q = torch.cat((_split_heads(self.q_proj(x), self.num_heads),
                       apply_rotary(_split_heads(self.q_rope_proj(x), self.num_heads), *rope)),
                      dim=-1)  # (B, H, T, d + rope_dim)
        k_content = _split_heads(self.k_up_proj(latent), self.num_heads)  # (B, H, S, d)
        k_rope = k_rope.expand(*k_content.shape[:-1], self.rope_dim)
        k = torch.cat((k_content, k_rope), dim=-1)  # (B, H, S, d + rope_dim)
        v = _split_heads(self.v_up_proj(latent), self.num_heads)  # (B, H, S, d)
        out = attend(q, k, v, start, None, self.attn_impl)
        return self.output_proj(_merge_heads(out))

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        latent_dim = self.kv_down_proj.weight.shape[0]
        return {"latent": torch.zeros(batch_size, max_seq_len, latent_dim, device=device,
                                      dtype=dtype),
                "k_rope": torch.zeros(batch_size, 1, max_seq_len, self.rope_dim, device=device,
                                      dtype=dtype)}


# ----------------------------------------------------------------------------------------------
# Causal linear attention (Katharopoulos et al. 2020): replace exp(q.k) by phi(q).phi(k) with
# phi = elu + 1 > 0. Then out_i = phi(q_i) S_i / phi(q_i) z_i with S_i = sum_{j<=i} phi(k_j) v_j^T
# and z_i = sum_{j<=i} phi(k_j): an RNN with a (d x d) state, O(1) memory per generated token.

def linear_attention_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def causal_linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      eps: float = 1e-6) -> torch.Tensor:
    """The RNN form, one token at a time (the reference). q, k, v: (..., T, d) features."""
    state = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])  # S: (..., d, d_v)
    normalizer = q.new_zeros(*q.shape[:-2], q.shape[-1])  # z: (..., d)
    outputs = []
    for t in range(q.shape[-2]):
        state = state + k[..., t, :, None] * v[..., t, None, :]
        normalizer = normalizer + k[..., t, :]
        numerator = (q[..., t, :, None] * state).sum(-2)
        outputs.append(numerator / ((q[..., t, :] * normalizer).sum(-1, keepdim=True) + eps))
    return torch.stack(outputs, dim=-2)


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            state: torch.Tensor | None = None,
                            normalizer: torch.Tensor | None = None, eps: float = 1e-6):
    """The parallel (quadratic) form used for training: (phi(Q) phi(K)^T masked causally) V,
    plus the contribution of an earlier state when continuing from a cache.
    Returns (output, new_state, new_normalizer)."""
    scores = (q @ k.transpose(-2, -1)).tril()  # (..., T, T): phi(q_i).phi(k_j) for j <= i
    numerator, denominator = scores @ v, scores.sum(-1, keepdim=True)
    if state is not None:
        numerator = numerator + q @ state
        denominator = denominator + (q @ normalizer.unsqueeze(-1))
        state = state + k.transpose(-2, -1) @ v
        normalizer = normalizer + k.sum(-2)
    return numerator / (denominator + eps), state, normalizer


class LinearAttention(nn.Module):
    """Multi-head causal linear attention with the same projections as softmax attention."""

    def __init__(self, d_model: int, num_heads: int, use_rope: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.use_rope = num_heads, d_model // num_heads, use_rope
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        q = _split_heads(self.q_proj(x), self.num_heads)  # (B, H, T, d)
        k = _split_heads(self.k_proj(x), self.num_heads)
        v = _split_heads(self.v_proj(x), self.num_heads)
        if self.use_rope and rope is not None:  # positions before the positive feature map
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # float32: the running sums lose precision in bf16.
        q, k = linear_attention_feature_map(q.float()), linear_attention_feature_map(k.float())
        if cache is None:
            out, _, _ = causal_linear_attention(q, k, v.float())
        else:
            out, state, normalizer = causal_linear_attention(q, k, v.float(), cache["state"],
                                                             cache["normalizer"])
            cache["state"].copy_(state)
            cache["normalizer"].copy_(normalizer)
        return self.output_proj(_merge_heads(out.to(x.dtype)))

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        """The whole past fits in a fixed-size state, whatever max_seq_len is."""
        shape = (batch_size, self.num_heads, self.head_dim)
        return {"state": torch.zeros(*shape, self.head_dim, device=device),
                "normalizer": torch.zeros(shape, device=device)}


# ----------------------------------------------------------------------------------------------
# A Hyena-style long-convolution mixer (Poli et al. 2023): no attention at all. Project x to
# (v, x_1 .. x_N), then repeat v <- x_i * (h_i conv v) with long causal filters h_i computed
# by a small MLP of the position (implicit: parameters do not grow with length), via FFT.

HYENA_FREQS = 8  # sine/cosine frequencies in the filter MLP's positional features
HYENA_SHORT_KERNEL = 3  # width of the short depthwise convolution on each stream


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y[..., c, t] = sum_{s<=t} h[c, s] u[..., c, t-s] in O(T log T): zero-padding to 2T turns the
    FFT's circular convolution into a linear one, so no future sample wraps around into the past."""
    seq_len = u.shape[-1]
    u_freq = torch.fft.rfft(u.float(), n=2 * seq_len)
    h_freq = torch.fft.rfft(h.float(), n=2 * seq_len)
    return torch.fft.irfft(u_freq * h_freq, n=2 * seq_len)[..., :seq_len].to(u.dtype)


def causal_conv_direct(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The O(T^2) definition of the same convolution (the test's reference)."""
    seq_len = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(seq_len):
        y[..., t] = (h[..., : t + 1].flip(-1) * u[..., : t + 1]).sum(-1)
    return y


class HyenaFilter(nn.Module):
    """Implicit filters: h(t) = MLP(features(t)) * exp(-decay_c * t), t in [0, 1). The features
    are t and sines/cosines of t; the decays, fixed and spread across channels, give a mix of
    short and long memories."""

    def __init__(self, channels: int, max_seq_len: int, hidden: int,
                 num_freqs: int = HYENA_FREQS) -> None:
        super().__init__()
        t = torch.arange(max_seq_len, dtype=torch.float32)[:, None] / max_seq_len  # (L, 1)
        angles = 2 * math.pi * torch.arange(1, num_freqs + 1) * t  # (L, F)
        self.register_buffer("features", torch.cat((t, angles.sin(), angles.cos()), -1),
                             persistent=False)
        # Decay from 1e-2 over 30% of the context (fast) to over 150% (slow), as in the paper.
        decay = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, channels).abs()
        self.register_buffer("decay", decay[:, None], persistent=False)  # (C, 1)
        self.mlp_in = Linear(1 + 2 * num_freqs, hidden)
        self.mlp_hidden = Linear(hidden, hidden)
        self.mlp_out = Linear(hidden, channels)

    def forward(self, seq_len: int) -> torch.Tensor:
        z = self.features[:seq_len]
        h = self.mlp_out(torch.sin(self.mlp_hidden(torch.sin(self.mlp_in(z)))))  # (T, C)
        return h.T * torch.exp(-self.decay * self.features[:seq_len, 0])  # (C, T)


class HyenaMixer(nn.Module):
    """Order-N Hyena operator: in_proj to N+1 streams, a short causal depthwise conv (kernel 3) on
    each, then N rounds of (long FFT convolution + skip, elementwise gate), then output_proj."""

    def __init__(self, d_model: int, max_seq_len: int, order: int = 2, filter_hidden: int = 64,
                 short_kernel: int = HYENA_SHORT_KERNEL) -> None:
        super().__init__()
        self.d_model, self.order = d_model, order
        self.in_proj = Linear(d_model, (order + 1) * d_model)
        self.short_filter = nn.Parameter(torch.randn((order + 1) * d_model, 1, short_kernel)
                                         / math.sqrt(short_kernel))
        self.long_filter = HyenaFilter(order * d_model, max_seq_len, filter_hidden)
        self.skip = nn.Parameter(torch.zeros(order * d_model))  # y = h * u + skip * u
        self.output_proj = Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        seq_len = x.shape[-2]
        u = self.in_proj(x).transpose(-2, -1)  # (B, (N+1) D, T)
        lead = u.shape[:-2]
        u = u.reshape(-1, *u.shape[-2:])
        kernel = self.short_filter.shape[-1]
        u = F.conv1d(F.pad(u, (kernel - 1, 0)), self.short_filter.to(u.dtype), groups=u.shape[1])
        v, *gates = u.split(self.d_model, dim=1)  # each (B, D, T)
        filters = self.long_filter(seq_len).view(self.order, self.d_model, seq_len)
        skips = self.skip.view(self.order, self.d_model, 1)
        for gate, h, skip in zip(gates, filters, skips):
            v = gate * (fft_causal_conv(v, h) + skip.to(v.dtype) * v)
        return self.output_proj(v.reshape(*lead, self.d_model, seq_len).transpose(-2, -1))

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        raise NotImplementedError("mixer='hyena' has no KV cache: its long convolution sees the "
                                  "whole sequence; decode by re-running the full forward")


# ----------------------------------------------------------------------------------------------
# Mixture of experts.

class MixtureOfExperts(nn.Module):
    """Top-k routing: a router scores the E experts per token; each token goes through its k best
    and the outputs are summed with the router probabilities renormalised over those k (so k
    identical experts reproduce one dense FFN). Only the chosen experts run: the compute per token
    is that of k FFNs while the parameters are those of E. The Switch load-balancing loss
    E * sum_e f_e P_e (f_e: share of assignments to e, P_e: mean router probability) is smallest
    when tokens spread evenly; it is left in self.aux_loss, already weighted."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.aux_loss_coef = config.experts_top_k, config.moe_aux_loss_coef
        self.router = Linear(config.d_model, config.num_experts)
        self.experts = nn.ModuleList(make_ffn(config) for _ in range(config.num_experts))
        self.shared_expert = make_ffn(config) if config.shared_expert else None
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (N, D)
        probs = softmax(self.router(tokens).float(), dim=-1)  # (N, E)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        gates = (top_probs / top_probs.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(top_experts == e)  # tokens routed to expert e
            out.index_add_(0, token_idx, expert(tokens[token_idx]) * gates[token_idx, slot, None])
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        num_experts = probs.shape[-1]
        assigned = F.one_hot(top_experts, num_experts).float().sum((0, 1)) / top_experts.numel()
        self.aux_loss = self.aux_loss_coef * num_experts * (assigned * probs.mean(0)).sum()
        return out.view_as(x)


# ----------------------------------------------------------------------------------------------
# The block and the language model.

class TransformerBlock(nn.Module):
    """Pre-norm: x + mixer(ln1(x)), then + ffn(ln2(x)) (the residual stream is never normalised,
    which keeps deep stacks trainable). Post-norm (original Transformer): ln1(x + mixer(x)), ..."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln1 = make_norm(config)
        self.attn = make_mixer(config)
        self.ln2 = make_norm(config)
        self.ffn = MixtureOfExperts(config) if config.num_experts else make_ffn(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), rope, cache, start)
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, rope, cache, start))
        return self.ln2(x + self.ffn(x))


def make_mixer(config: ModelConfig) -> nn.Module:
    use_rope = config.positions == "rope"
    if config.mixer == "linear_attention":
        return LinearAttention(config.d_model, config.num_heads, use_rope)
    if config.mixer == "hyena":
        return HyenaMixer(config.d_model, config.context_length, config.hyena_order,
                          config.hyena_filter_hidden)
    if config.kv_latent_dim is not None:
        return MultiHeadLatentAttention(config.d_model, config.num_heads, config.kv_latent_dim,
                                        config.rope_dim, config.attn_impl)
    return MultiHeadSelfAttention(config.d_model, config.num_heads, config.n_kv_heads, use_rope,
                                  config.sliding_window, config.attn_impl)


class KVCache:
    """Preallocated per-layer tensors for incremental decoding (made by model.make_kv_cache).
    Token number n of the sequence lives in slot n; seq_len counts the slots filled so far and
    advances with every forward that is given this cache."""

    def __init__(self, layers: list[dict], batch_size: int, max_seq_len: int) -> None:
        self.layers, self.batch_size, self.max_seq_len = layers, batch_size, max_seq_len
        self.seq_len = 0

    def reset(self) -> None:
        self.seq_len = 0
        for layer in self.layers:
            for tensor in layer.values():
                tensor.zero_()  # the linear-attention state is a running sum


class TransformerLM(nn.Module):
    """token ids (..., T) -> logits (..., T, vocab_size). After each forward, self.aux_loss holds
    the weighted MoE load-balancing loss (a zero tensor without MoE) for train.py to add."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # A tied matrix also produces the logits, so it gets the head's small init: the course's
        # std-1 embedding would start with logits of size sqrt(d_model).
        embed_std = math.sqrt(2.0 / (config.vocab_size + config.d_model))
        self.token_embeddings = Embedding(config.vocab_size, config.d_model,
                                          std=embed_std if config.tie_weights else 1.0)
        if config.positions == "learned":
            self.position_embeddings = Embedding(config.context_length, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(config.context_length,
                                                                config.d_model), persistent=False)
        self.rope = (RotaryEmbedding(config.rope_theta, config.rope_dim, config.context_length)
                     if config.positions == "rope" and config.mixer != "hyena" else None)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        # Post-norm blocks already end in a norm, so only pre-norm needs a final one.
        self.ln_final = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = Linear(config.d_model, config.vocab_size)
        if config.tie_weights:
            self.lm_head.weight = self.token_embeddings.weight
        if config.attn_impl == "triton" and config.mixer == "attention":
            _triton_flash_attention()  # fail now, not at the first forward
        self.aux_loss = torch.zeros(())

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        config, seq_len = self.config, token_ids.shape[-1]
        start = 0 if kv_cache is None else kv_cache.seq_len
        self._check_inputs(token_ids, positions, kv_cache, start)
        if positions is None and kv_cache is not None and start > 0:
            positions = torch.arange(start, start + seq_len, device=token_ids.device)
        x = self.token_embeddings(token_ids)  # (..., T, D)
        if config.positions in ("learned", "sinusoidal"):
            table = (self.position_embeddings.weight if config.positions == "learned"
                     else self.sinusoidal)
            x = x + (table[:seq_len] if positions is None else table[positions]).to(x.dtype)
        rope = None
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(positions, seq_len)  # (..., T, rope_dim / 2)
            if cos.dim() > 2:  # per-sequence positions (B, T): make room for the head axis
                cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
            rope = (cos, sin)
        aux_loss = torch.zeros((), device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if kv_cache is None else kv_cache.layers[i], start)
            if config.num_experts:
                aux_loss = aux_loss + layer.ffn.aux_loss
        self.aux_loss = aux_loss
        if kv_cache is not None:
            kv_cache.seq_len = start + seq_len
        return self.lm_head(self.ln_final(x))

    def _check_inputs(self, token_ids: torch.Tensor, positions: torch.Tensor | None,
                      kv_cache: KVCache | None, start: int) -> None:
        """Shape checks are free; value checks need the data on the host, so they only run on CPU
        tensors in eager mode (never a GPU sync, never a graph break under torch.compile)."""
        config, seq_len = self.config, token_ids.shape[-1]
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be an int64 or int32 tensor, got {token_ids.dtype}")
        if seq_len > config.context_length:
            raise ValueError(f"sequence length {seq_len} exceeds context_length "
                             f"{config.context_length}")
        if kv_cache is not None:
            if token_ids.dim() != 2 or token_ids.shape[0] != kv_cache.batch_size:
                raise ValueError(f"with a kv_cache token_ids must be (batch={kv_cache.batch_size},"
                                 f" T), got shape {tuple(token_ids.shape)}")
            if start + seq_len > kv_cache.max_seq_len:
                raise ValueError(f"kv_cache holds {kv_cache.max_seq_len} tokens; {start} are "
                                 f"cached and {seq_len} more do not fit")
        if positions is not None and positions.shape[-1] != seq_len:
            raise ValueError(f"positions must end in the sequence length {seq_len}, "
                             f"got shape {tuple(positions.shape)}")
        if torch.compiler.is_compiling() or token_ids.device.type != "cpu":
            return
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= config.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={config.vocab_size}), got "
                             f"min {int(token_ids.min())}, max {int(token_ids.max())}")
        if positions is not None and positions.numel() and (
                positions.min() < 0 or positions.max() >= config.context_length):
            raise ValueError(f"positions must lie in [0, context_length={config.context_length})")

    def make_kv_cache(self, batch_size: int, max_seq_len: int | None = None,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> KVCache:
        """Static per-layer buffers for up to max_seq_len (default context_length) tokens.
        dtype defaults to the autocast dtype when called under autocast, else the weights'.
        Raises NotImplementedError for mixers without a cache (hyena)."""
        max_seq_len = max_seq_len or self.config.context_length
        if not 1 <= max_seq_len <= self.config.context_length:
            raise ValueError(f"max_seq_len must lie in [1, context_length="
                             f"{self.config.context_length}], got {max_seq_len}")
        weight = self.lm_head.weight
        device = torch.device(device) if device is not None else weight.device
        if dtype is None:  # the dtype keys and values are computed in, so no cast per step
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        layers = [layer.attn.make_cache(batch_size, max_seq_len, device, dtype)
                  for layer in self.layers]
        return KVCache(layers, batch_size, max_seq_len)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """torch's loader, plus: strips the `_orig_mod.` (torch.compile) and `module.` (DDP)
        prefixes, and names every missing, unexpected or mis-shaped key in one clear error."""
        cleaned = {}
        for key, value in state_dict.items():
            while key.startswith(("_orig_mod.", "module.")):  # DDP around compile, or reverse
                key = key.split(".", 1)[1]
            cleaned[key] = value
        expected = self.state_dict()
        missing = sorted(expected.keys() - cleaned.keys()) if strict else []
        unexpected = sorted(cleaned.keys() - expected.keys()) if strict else []
        mis_shaped = [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                      for k, v in cleaned.items()
                      if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        problems = [f"{label}: {', '.join(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("mis-shaped keys", mis_shaped)) if keys]
        if problems:
            raise ValueError("state dict does not fit this TransformerLM config; "
                             + "; ".join(problems))
        return super().load_state_dict(cleaned, strict=strict, assign=assign)


# ----------------------------------------------------------------------------------------------
# Generation with the KV cache.

def sample_next(logits: torch.Tensor, temperature: float = 1.0,
                top_k: int | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy at temperature 0, else softmax(logits / T)
    restricted to the top_k most likely tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return torch.multinomial(softmax(logits, dim=-1), num_samples=1).squeeze(-1)


@torch.no_grad()
def generate(model: TransformerLM, prompt_ids: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Continue prompt_ids (B, T) by up to max_new_tokens; returns (B, T + generated). The prompt
    goes through once, then each new token costs one forward of length 1 against the KV cache.
    A row that produced eos_id is padded with eos_id; generation stops when every row did.
    When the context fills up, the cache restarts from the last half-context of tokens (like
    nanoGPT's cropping, but amortised); mixers without a cache re-run the cropped sequence."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (batch, T >= 1), got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 (or None)")
    context = model.config.context_length
    try:
        cache = model.make_kv_cache(prompt_ids.shape[0], device=prompt_ids.device)
    except NotImplementedError:
        cache = None
    out = prompt_ids
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    logits = model(out[:, -context:], kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k)
        if eos_id is not None:
            next_ids = torch.where(finished, eos_id, next_ids)
            finished = finished | (next_ids == eos_id)
        out = torch.cat((out, next_ids[:, None]), dim=1)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            break
        if cache is None:
            logits = model(out[:, -context:])[:, -1]
        elif cache.seq_len == cache.max_seq_len:
            cache.reset()
            logits = model(out[:, -max(1, context // 2):], kv_cache=cache)[:, -1]
        else:
            logits = model(next_ids[:, None], kv_cache=cache)[:, -1]
    return out


# ----------------------------------------------------------------------------------------------
# Accounting: parameters, FLOPs and memory, computed from the config alone (the tests check the
# parameter counts against the built module).

def _ffn_params(config: ModelConfig) -> int:
    return (3 if config.ffn == "swiglu" else 2) * config.d_model * config.d_ff


def _mixer_params(config: ModelConfig) -> int:
    d, heads, head_dim = config.d_model, config.num_heads, config.head_dim
    if config.mixer == "hyena":
        n, hidden = config.hyena_order, config.hyena_filter_hidden
        filter_mlp = (1 + 2 * HYENA_FREQS) * hidden + hidden * hidden + hidden * n * d
        short_filters = (n + 1) * d * HYENA_SHORT_KERNEL
        return d * (n + 1) * d + short_filters + filter_mlp + n * d + d * d
    if config.kv_latent_dim is not None:
        latent, rope = config.kv_latent_dim, config.rope_dim
        return (d * heads * head_dim + d * heads * rope + d * latent + 2 * latent * heads * head_dim
                + d * rope + heads * head_dim * d)
    kv_width = config.kv_heads * head_dim
    return 2 * d * heads * head_dim + 2 * d * kv_width


def count_params(config: ModelConfig) -> dict[str, int]:
    """Parameters by component; "total" equals sum(p.numel()) of TransformerLM(config), tied
    weights counted once (in token_embeddings)."""
    d, layers = config.d_model, config.num_layers
    norm = {"rmsnorm": d, "layernorm": 2 * d, "none": 0}[config.norm]
    ffn = _ffn_params(config)
    if config.num_experts:
        ffn = (config.num_experts * ffn + d * config.num_experts
               + (ffn if config.shared_expert else 0))
    counts = {
        "token_embeddings": config.vocab_size * d,
        "position_embeddings": config.context_length * d if config.positions == "learned" else 0,
        "attention": layers * _mixer_params(config),
        "ffn": layers * ffn,
        "norms": 2 * layers * norm + (norm if config.norm_position == "pre" else 0),
        "lm_head": 0 if config.tie_weights else config.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    return counts


def _active_ffn_params(config: ModelConfig) -> int:
    """FFN parameters a token actually multiplies: k experts (+ shared) and the router."""
    ffn = _ffn_params(config)
    if not config.num_experts:
        return ffn
    return ((config.experts_top_k + config.shared_expert) * ffn
            + config.d_model * config.num_experts)


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (2 per multiply-add, matmuls only; norms, softmax and
    activations are a few percent and left out), plus "forward" and "train" (= 3 x forward: the
    backward pass costs two matmuls per forward matmul). Attention scores and values count the
    full T x T (not halved for causality), as in PaLM's 6N + 12 L H Q T; a sliding window counts
    min(T, W) keys. Linear attention is counted in the quadratic form that trains it."""
    d, layers, heads = config.d_model, config.num_layers, config.num_heads
    head_dim = config.head_dim
    keys = min(seq_len, config.sliding_window or seq_len)
    flops = {"attention_proj": 2.0 * layers * _mixer_params(config), "attention_scores": 0.0,
             "attention_values": 0.0, "long_conv": 0.0}
    if config.mixer == "hyena":
        # attention_proj counts 2 FLOPs per mixer parameter: the projections, and the filter MLP,
        # which runs once per position (so once per token) to make the filters. Each
        # long convolution is two real FFTs of length 2T (~ 2.5 n log2 n each) per channel,
        # amortised over the T tokens, plus the spectral product (6 FLOPs per complex bin).
        n_fft = 2 * seq_len
        per_channel = (2 * 2.5 * n_fft * math.log2(n_fft) + 6 * (n_fft // 2 + 1)) / seq_len
        flops["long_conv"] = layers * config.hyena_order * d * per_channel
    else:
        qk_dim = head_dim + (config.rope_dim if config.kv_latent_dim is not None else 0)
        flops["attention_scores"] = 2.0 * layers * keys * heads * qk_dim
        flops["attention_values"] = 2.0 * layers * keys * heads * head_dim
    flops["ffn"] = 2.0 * layers * _active_ffn_params(config)
    flops["lm_head"] = 2.0 * d * config.vocab_size
    flops["forward"] = sum(flops.values())
    flops["train"] = 3 * flops["forward"]
    return flops


def mfu_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """The PaLM / nanoGPT training FLOPs per token, 6 N + 12 L H Q T, with N the parameters used
    in matmuls (everything but the input embedding and the norm gains; a tied matrix counts once
    as the head; for MoE the active ones). MFU = tokens/s * this / peak FLOP/s."""
    counts = count_params(config)
    matmul_params = (counts["attention"] + config.num_layers * _active_ffn_params(config)
                     + config.vocab_size * config.d_model)
    return 6.0 * matmul_params + 12.0 * config.num_layers * config.d_model * seq_len


def memory_estimate(config: ModelConfig, batch_size: int, seq_len: int, param_bytes: int = 4,
                    activation_bytes: int = 4, stores_attention_matrix: bool = True) -> dict:
    """Bytes to train with AdamW (the course's accounting): parameters, gradients (same dtype),
    AdamW's two moments (fp32), and the activations saved for backward. Per block the saved
    activations are the norm inputs, Q/K/V, the attention scores and probabilities
    (H x T x T each, unless a fused kernel recomputes them: stores_attention_matrix=False), the
    attention output and projection, and the FFN's hidden tensors; then the final norm, the
    logits and their softmax for the cross-entropy."""
    counts = count_params(config)
    d, tokens = config.d_model, batch_size * seq_len
    ffn_hidden = 4 * config.d_ff if config.ffn == "swiglu" else 2 * config.d_ff
    if config.num_experts:
        ffn_hidden *= config.experts_top_k + config.shared_expert
    per_token = 2 * d + 5 * d + ffn_hidden + d  # ln1+ln2 inputs, QKV/attn out/proj, FFN, W2 out
    attention_matrix = 2 * config.num_heads * seq_len * batch_size * seq_len
    per_layer = tokens * per_token + (attention_matrix if stores_attention_matrix else 0)
    activation_elements = config.num_layers * per_layer + tokens * (d + 2 * config.vocab_size)
    memory = {
        "params": counts["total"] * param_bytes,
        "grads": counts["total"] * param_bytes,
        "adamw_state": counts["total"] * 2 * 4,
        "activations": activation_elements * activation_bytes,
    }
    memory["total"] = sum(memory.values())
    return memory


# ----------------------------------------------------------------------------------------------
# Command line: the lecture's transformer-accounting exercise for any config.

def parse_config(args: list[str], preset: str | None = None) -> ModelConfig:
    """--key=value overrides of ModelConfig fields, typed from the field's annotation."""
    hints = typing.get_type_hints(ModelConfig)
    overrides = {}
    for arg in args:
        key, sep, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise ValueError(f"expected --key=value, got {arg!r}")
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.0)
            raise ValueError(f"unknown config key {key!r}; the closest valid key is --{close[0]}")
        overrides[key] = _parse_value(key, hints[key], text)
    return ModelConfig.preset(preset, **overrides) if preset else ModelConfig(**overrides)


def _parse_value(key: str, annotation, text: str):
    kinds = typing.get_args(annotation) or (annotation,)
    if type(None) in kinds and text.lower() == "none":
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} expects True or False, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} expects {kind.__name__}, got {text!r}") from None


def _print_table(title: str, rows: dict, total: float, fmt) -> None:
    print(f"\n{title}")
    for name, value in rows.items():
        share = f"{100 * value / total:6.2f}%" if total else ""
        print(f"  {name:<22}{fmt(value):>16}  {share}")


def main(config: ModelConfig, batch_size: int, seq_len: int) -> None:
    print("config:", ", ".join(f"{k}={v}" for k, v in asdict(config).items()))
    counts = count_params(config)
    _print_table("parameters", {k: v for k, v in counts.items() if k != "total"},
                 counts["total"], lambda v: f"{v:,}")
    print(f"  {'total':<22}{counts['total']:>16,}  ({counts['total'] / 1e6:.1f}M)")
    flops = flops_per_token(config, seq_len)
    parts = {k: v for k, v in flops.items() if k not in ("forward", "train")}
    _print_table(f"forward FLOPs per token at seq_len={seq_len}", parts, flops["forward"],
                 lambda v: f"{v / 1e9:.4f} G")
    print(f"  {'forward':<22}{flops['forward'] / 1e9:>14.4f} G")
    print(f"  {'train (3x)':<22}{flops['train'] / 1e9:>14.4f} G   6N+12LHQT (MFU): "
          f"{mfu_flops_per_token(config, seq_len) / 1e9:.4f} G")
    print(f"  forward of one sequence of {seq_len} tokens: "
          f"{flops['forward'] * seq_len / 1e12:.3f} TFLOPs")
    memory = memory_estimate(config, batch_size, seq_len)
    _print_table(f"training memory with AdamW, fp32, batch {batch_size} x {seq_len}",
                 {k: v for k, v in memory.items() if k != "total"}, memory["total"],
                 lambda v: f"{v / 2**30:.2f} GiB")
    print(f"  {'total':<22}{memory['total'] / 2**30:>12.2f} GiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="any ModelConfig field as --key=value")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--batch_size", type=int, default=1, help="for the memory estimate")
    parser.add_argument("--seq_len", type=int, default=None, help="default: context_length")
    known, rest = parser.parse_known_args()
    try:
        model_config = parse_config(rest, known.preset)
    except ValueError as error:
        parser.error(str(error))
    main(model_config, known.batch_size, known.seq_len or model_config.context_length)
