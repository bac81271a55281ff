"""Stage 2: the Transformer language model from its parts, and the variants the course compares.

The course's model, in lecture order: the config (`ModelConfig`; `PRESETS`, every model shape by
name); the parts, hand-written (Linear, Embedding, RMSNorm, softmax, SwiGLU); RoPE; attention, the
reference and then the fast dispatch; the block; `TransformerLM` (the course's state_dict names);
`generate` with a KV cache; parameter, FLOP and memory accounting from the config alone; then the
variants the lecture compares. `TransformerLM(ModelConfig())` is the course's TinyStories model.

Commands (CPU, no files read or written; any ModelConfig field as --key=value):
    python model.py                                    # accounting of the TinyStories model
    python model.py --preset=gpt2-xl                   # the lecture's transformer accounting
    python model.py --preset=gpt2-small --tie_weights=True --d_ff=2048 --batch_size=16
    python model.py --num_experts=8 --experts_top_k=2 --num_kv_heads=4 --seq_len=128

Papers: Vaswani et al. 2017 (Transformer); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020
(SwiGLU); Su et al. 2021 (RoPE); Dao et al. 2022 (FlashAttention); Chowdhery et al. 2022, PaLM
(6N + 12LHQT); Kaplan et al. 2020, Hoffmann et al. 2022 (accounting); Shazeer 2019 (MQA);
Ainslie et al. 2023 (GQA); Beltagy et al. 2020 (sliding windows); DeepSeek-AI 2024, DeepSeek-V2
(MLA); Katharopoulos et al. 2020 (linear attention); Poli et al. 2023 (Hyena); Shazeer et al.
2017, Fedus et al. 2021 (mixture of experts, Switch load balancing).
"""

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import UsageError, parse_args, run_cli


# Config: every architectural choice, with the course's names for the course's fields --------------
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
    ffn: str = "swiglu"  # "swiglu" (w1, w2, w3) | "gelu" | "gelu_tanh" (GPT-2) | "relu" (w1, w2)
    positions: str = "rope"  # "rope" | "sinusoidal" | "learned" | "none" (hyena ignores "rope")
    mixer: str = "attention"  # "attention" (softmax) | "linear_attention" | "hyena"
    sliding_window: int | None = None  # None: full causal; W: each token sees its last W tokens
    num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA; a divisor in between: GQA
    kv_latent_dim: int | None = None  # None: plain attention; an int: MLA with this KV latent width
    mla_rope_dim: int | None = None  # MLA's decoupled RoPE width per head; None: head_dim // 2
    num_experts: int = 0  # 0: dense FFN; E > 0: mixture of E experts in every block
    experts_top_k: int = 2  # experts each token is routed to
    shared_expert: bool = False  # add one always-on expert next to the routed ones (DeepSeekMoE)
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss left in model.aux_loss
    hyena_order: int = 2  # number of (long convolution, gate) steps in the Hyena operator
    hyena_filter_hidden: int = 64  # width of the MLP that generates the implicit long filters
    tie_weights: bool = False  # share token_embeddings.weight with lm_head.weight
    bias: bool = False  # biases in the attention and FFN linears (GPT-2 has them)
    attn_impl: str = "sdpa"  # "manual" (hand-written) | "sdpa" (torch, flash) | "triton" (kernels)
    kernels: str = "torch"  # "torch" | "triton" (kernels.py: RMSNorm, add+norm, RoPE, SwiGLU, CE)
    fp8: bool = False  # train the FFN's and the head's matmuls in FP8 (kernels.py; Ada, Hopper)

    def __post_init__(self) -> None:
        """Fail at construction, naming the field: types first, then the rules between fields."""
        for name, minimum in _MINIMUM.items():
            value, optional = getattr(self, name), getattr(ModelConfig, name) is None
            if not (value is None and optional or type(value) is int and value >= minimum):
                raise ValueError(f"{name} must be an integer >= {minimum}"
                                 f"{' or None' if optional else ''}, got {value!r}")
        attention, mla = self.mixer == "attention", self.kv_latent_dim is not None
        rope = self.positions == "rope" and self.mixer != "hyena"
        width = "mla_rope_dim (or head dim // 2)" if mla else "the head dim d_model / num_heads"
        rules = [  # (field, rule holds, what the field must do), checked in order
            *((name, getattr(self, name) in allowed, f"be one of {allowed}")
              for name, allowed in _CHOICES.items()),
            *((name, getattr(self, name) > 0, "be > 0") for name in ("rope_theta", "norm_eps")),
            ("moe_aux_loss_coef", self.moe_aux_loss_coef >= 0, "be >= 0"),
            ("num_heads", self.d_model % self.num_heads == 0, f"divide d_model ({self.d_model})"),
            ("num_kv_heads", self.num_heads % (self.num_kv_heads or 1) == 0,
             f"divide num_heads ({self.num_heads})"),
            *((name, getattr(self, name) is None or attention and not mla,
               "be None unless mixer='attention' without MLA (kv_latent_dim)")
              for name in ("num_kv_heads", "sliding_window")),
            ("kv_latent_dim", not mla or attention, "be None unless mixer='attention'"),
            ("bias", not self.bias or attention and not mla and self.ffn != "swiglu",
             "be False unless mixer='attention' without MLA and ffn is gelu, gelu_tanh or relu"),
            ("positions", not mla or self.positions == "rope", "be 'rope' with kv_latent_dim"),
            ("mla_rope_dim", mla or self.mla_rope_dim is None, "be None without kv_latent_dim"),
            ("mla_rope_dim" if mla else "num_heads", not rope or self.rope_dim % 2 == 0,
             f"make {width} even, as RoPE rotates pairs (it is {self.rope_dim})"),
            ("experts_top_k", not self.num_experts or self.experts_top_k <= self.num_experts,
             f"be <= num_experts ({self.num_experts})"),
            ("fp8", not (self.fp8 and (self.num_experts or self.d_model % 16 or self.d_ff % 16)),
             "be False unless the FFN is dense and d_model and d_ff are multiples of 16"),
        ]
        for name, holds, requirement in rules:
            if not holds:
                raise ValueError(f"{name} must {requirement}, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rope_dim(self) -> int:  # the width RoPE rotates per head: the head dim, or MLA's part
        return (self.mla_rope_dim or self.head_dim // 2) if self.kv_latent_dim else self.head_dim

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_MINIMUM = dict(vocab_size=1, context_length=1, d_model=1, num_layers=1, num_heads=1, d_ff=1,
                num_experts=0, experts_top_k=1, hyena_order=1, hyena_filter_hidden=1,
                sliding_window=1, num_kv_heads=1, kv_latent_dim=1, mla_rope_dim=1)
_CHOICES = {"norm": ("rmsnorm", "layernorm", "none"), "norm_position": ("pre", "post"),
            "ffn": ("swiglu", "gelu", "gelu_tanh", "relu"),
            "mixer": ("attention", "linear_attention", "hyena"),
            "positions": ("rope", "sinusoidal", "learned", "none"),
            "attn_impl": ("manual", "sdpa", "triton"), "kernels": ("torch", "triton")}


# Every model shape in the repository, by name: `--preset=NAME` in any stage that builds a model,
# with `--field=value` overriding single fields. train.py sets vocab_size from its tokenizer.
PRESETS = {
    # the main job's CPU model: small enough for ~10k tokens/s on 2 CPU cores
    "tiny": dict(context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=384),
    # CS336 assignment 1's TinyStories model (the ModelConfig defaults)
    "tinystories": dict(vocab_size=10000, context_length=256, d_model=512, num_layers=4,
                        num_heads=16, d_ff=1344),
    # the throughput benchmark: GPT-2 small as nanoGPT trains it (vocab padded to 50304, tied)
    "nanogpt": dict(vocab_size=50304, context_length=1024, d_model=768, num_layers=12,
                    num_heads=12, d_ff=2048, tie_weights=True),
    # GPT-2's sizes with the course's architecture, d_ff = 4 d_model: the accounting exercise
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


# The parts, hand-written on purpose: no nn.Linear, nn.Embedding or nn.LayerNorm -------------------
class Linear(nn.Module):
    """y = x W^T, + b with bias=True (GPT-2); W is (d_out, d_in) like the course and torch."""
    fp8 = False  # set on the FFN's linears by fp8=True: their training matmuls run in FP8

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.register_parameter("bias", nn.Parameter(torch.zeros(d_out)) if bias else None)
        # Xavier-like variance keeps activations O(1) through the stack; cut at 3 std: no outliers
        std = math.sqrt(2.0 / (d_in + d_out))
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp8 = self.fp8 and self.training  # evaluation and inference keep autocast's dtype
        y = triton_kernels("fp8=True").fp8_linear(x, self.weight) if fp8 else x @ self.weight.T
        return y if self.bias is None else y + self.bias.to(y.dtype)  # autocast: y's dtype


def stacked_linear(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    """cat([m(x) for m in layers], -1); in training one matmul on the stacked weights (copied each
    call: not for decoding), faster than narrow ones, its backward summing x's gradients itself."""
    if torch.is_grad_enabled() and all(type(m) is Linear and isinstance(m.weight, nn.Parameter)
                                       and m.bias is None and not m.fp8 for m in layers):
        return x @ torch.cat([m.weight for m in layers]).T
    return torch.cat([m(x) for m in layers], dim=-1)


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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU (Hugging Face's "gelu_new")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): a gated FFN; three matrices, so d_ff ~ 8/3 d_model matches the
    parameters of a 4 d_model two-matrix FFN."""
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)
        self.w3 = Linear(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = stacked_linear(x, self.w1, self.w3).chunk(2, dim=-1)
        return self.w2(silu(a) * b)


class FeedForward(nn.Module):
    """The original non-gated FFN, w2(act(w1 x)), with ReLU (Vaswani) or GELU (GPT-2)."""
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False) -> None:
        super().__init__()
        self.w1, self.w2 = Linear(d_model, d_ff, bias), Linear(d_ff, d_model, bias)
        self.activation = {"relu": torch.relu, "gelu": gelu, "gelu_tanh": gelu_tanh}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)))


def triton_kernels(flag: str = "kernels='triton'"):
    """kernels.py, a later stage, imported only when a flag asks for its Triton kernels."""
    try:
        import kernels
    except ImportError as error:
        raise ImportError(f"{flag} needs kernels.py (the kernels stage) and triton: {error}; "
                          "leave the flag at its default") from error
    return kernels


def make_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "swiglu":
        swiglu = triton_kernels().TritonSwiGLU if config.kernels == "triton" else SwiGLU
        return swiglu(config.d_model, config.d_ff)
    return FeedForward(config.d_model, config.d_ff, config.ffn, config.bias)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm" and config.kernels == "triton":
        # pre-norm with a dense FFN: the output goes only into matmuls (post-norm: it is the
        # residual stream; MoE sums experts in its dtype), so it may leave in their dtype
        return triton_kernels().TritonRMSNorm(config.d_model, config.norm_eps, feeds_matmul=(
            config.norm_position == "pre" and not config.num_experts))
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    if config.norm == "layernorm":
        return LayerNorm(config.d_model, config.norm_eps)
    return nn.Identity()


# Rotary positions (RoPE) --------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """Rotate each pair (x[2i], x[2i+1]) of a query or key by the angle pos * theta^(-2i/d_k): q.k
    then depends only on the difference of positions. cos/sin are precomputed, in non-persistent
    buffers (the course's checkpoints have no RoPE keys)."""
    def __init__(self, theta: float, d_k: int, max_seq_len: int) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64) / d_k)  # (d_k/2,)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (L, d_k/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def cos_sin(self, token_positions: torch.Tensor | None, seq_len: int):
        """Tables for the given positions (..., T), or for 0..seq_len-1 when None (a slice)."""
        index = slice(seq_len) if token_positions is None else token_positions
        return self.cos[index], self.sin[index]

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        return apply_rotary(x, *self.cos_sin(token_positions, x.shape[-2]))  # x: (..., T, d_k)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., T, d) by tables (..., T, d/2): elementwise only, which
    torch.compile fuses into one kernel. Done in float32, returned in x's dtype."""
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (..., T, d/2)
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# Attention, the reference: softmax(Q K^T / sqrt(d_k)) V under a causal mask -----------------------
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
    return allowed if window is None else allowed & (k_slot > q_slot - window)


# Fast attention: one dispatch to torch's fused kernels or kernels.py's FlashAttention-2 -----------
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0,
           window: int | None = None, impl: str = "sdpa") -> torch.Tensor:
    """Causal attention of q (..., H, T, d) over k, v (..., H_kv, S, d); query head h reads
    key-value head h // (H / H_kv) (GQA). impl="manual": the reference above; "sdpa": torch's fused
    kernels (with no cache or window, is_causal=True and no mask, so torch can pick FlashAttention);
    "triton": kernels.py's FlashAttention-2 when the queries are the last keys, with no window."""
    (num_heads, seq_len), (num_kv_heads, kv_len) = q.shape[-3:-1], k.shape[-3:-1]
    if impl == "triton" and window is None and start + seq_len == kv_len:  # GQA in the kernel
        return triton_kernels("attn_impl='triton'").flash_attention(q, k, v, True)
    if num_kv_heads != num_heads:
        k, v = (t.repeat_interleave(num_heads // num_kv_heads, dim=-3) for t in (k, v))
    if impl == "manual":
        return scaled_dot_product_attention(
            q, k, v, attention_mask(seq_len, kv_len, start, window, q.device))
    if window is None and start == 0 and seq_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if window is None and seq_len == 1:  # one new token sees the whole cache: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    mask = attention_mask(seq_len, kv_len, start, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# Multi-head self-attention, with GQA/MQA and sliding windows inline -------------------------------
def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:  # (.., T, H*d) -> (.., H, T, d)
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def _write_cache(buffer: torch.Tensor, new: torch.Tensor, start: int, dim: int) -> torch.Tensor:
    """Store `new` at slots start.. of a preallocated buffer; return the filled prefix."""
    buffer.narrow(dim, start, new.shape[dim]).copy_(new)
    return buffer.narrow(dim, 0, start + new.shape[dim])


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention (q_proj, k_proj, v_proj, output_proj) with RoPE. Grouped or
    multi-query attention (num_kv_heads < num_heads) shrinks k_proj, v_proj and the KV cache; a
    sliding window shows each query only its last `window` keys (the cache still keeps all)."""
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None,
                 use_rope: bool = True, window: int | None = None,
                 attn_impl: str = "sdpa", bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim = d_model // num_heads
        self.use_rope, self.window, self.attn_impl = use_rope, window, attn_impl
        self.q_proj = Linear(d_model, num_heads * self.head_dim, bias)
        self.k_proj = Linear(d_model, self.num_kv_heads * self.head_dim, bias)
        self.v_proj = Linear(d_model, self.num_kv_heads * self.head_dim, bias)
        self.output_proj = Linear(num_heads * self.head_dim, d_model, bias)

    def project(self, x: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, ...]:
        """q, k, v split into heads, RoPE applied (LinearAttention shares this step)."""
        q = _split_heads(self.q_proj(x), self.num_heads)  # (B, H, T, d)
        k = _split_heads(self.k_proj(x), self.num_kv_heads)  # (B, H_kv, T, d)
        v = _split_heads(self.v_proj(x), self.num_kv_heads)
        if self.use_rope and rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        if cache is not None:
            k = _write_cache(cache["k"], k, start, dim=2).to(q.dtype)  # (B, H_kv, start+T, d)
            v = _write_cache(cache["v"], v, start, dim=2).to(q.dtype)
        out = attend(q, k, v, start, self.window, self.attn_impl)  # (B, H, T, d)
        return self.output_proj(out.transpose(-3, -2).flatten(-2))  # heads merged: (B, T, H*d)

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        shape = (batch_size, self.num_kv_heads, max_seq_len, self.head_dim)
        return {name: torch.zeros(shape, device=device, dtype=dtype) for name in ("k", "v")}


# The block: a sequence mixer and a feed-forward net, each in a residual branch --------------------
class TransformerBlock(nn.Module):
    """Pre-norm: x + mixer(ln1(x)), then + ffn(ln2(x)) (the residual stream is never normalised,
    which keeps deep stacks trainable). Post-norm (original Transformer): ln1(x + mixer(x)), ...
    kernels="triton", defer: returns (x, ffn branch) unsummed, for the next fused norm to add."""
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln1 = make_norm(config)
        self.attn = make_mixer(config)
        self.ln2 = make_norm(config)
        self.ffn = MixtureOfExperts(config) if config.num_experts else make_ffn(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0, defer: bool = False) -> torch.Tensor | tuple:
        if self.pre_norm and hasattr(self.ln2, "add_and_norm"):  # kernels="triton"
            normed, x = self.ln1.add_and_norm(*x) if isinstance(x, tuple) else (self.ln1(x), x)
            normed, x = self.ln2.add_and_norm(x, self.attn(normed, rope, cache, start))
            return (x, self.ffn(normed)) if defer else x + self.ffn(normed)
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), rope, cache, start)
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, rope, cache, start))
        return self.ln2(x + self.ffn(x))


def make_mixer(config: ModelConfig) -> nn.Module:
    """The sequence mixer of a block: softmax attention, or a variant defined further down."""
    use_rope = config.positions == "rope"
    if config.mixer == "linear_attention":
        return LinearAttention(config.d_model, config.num_heads, use_rope=use_rope)
    if config.mixer == "hyena":
        return HyenaMixer(config.d_model, config.context_length, config.hyena_order,
                          config.hyena_filter_hidden)
    if config.kv_latent_dim is not None:
        return MultiHeadLatentAttention(config.d_model, config.num_heads, config.kv_latent_dim,
                                        config.rope_dim, config.attn_impl)
    attention = (triton_kernels().TritonSelfAttention if config.kernels == "triton"
                 else MultiHeadSelfAttention)  # the same weights; q | k | v as one matmul
    return attention(config.d_model, config.num_heads, config.num_kv_heads, use_rope,
                     config.sliding_window, config.attn_impl, config.bias)


# The language model: embeddings, the blocks, the final norm and the head --------------------------
def autocast_dtype(device_type: str, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or default where it is off."""
    return (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
            else default)


class KVCache:
    """Per-layer buffers for incremental decoding, from model.make_kv_cache. Token n lives in slot
    n; seq_len counts the slots filled and advances with every forward given this cache."""
    def __init__(self, layers: list[dict], batch_size: int, max_seq_len: int) -> None:
        self.layers, self.batch_size, self.max_seq_len = layers, batch_size, max_seq_len
        self.seq_len = 0

    def reset(self) -> None:
        self.seq_len = 0
        for tensor in (tensor for layer in self.layers for tensor in layer.values()):
            tensor.zero_()  # the linear-attention state is a running sum


class TransformerLM(nn.Module):
    """token ids (..., T) -> logits (..., T, vocab_size), or with return_hidden the final normed
    states (..., T, D) lm_head reads. After each forward, self.aux_loss holds the weighted MoE
    load-balancing loss (a zero tensor without MoE) for train.py to add."""
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # A tied matrix gets the head's small init: std 1 would start with logits ~ sqrt(d_model).
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
        for linear in [m for b in self.layers for m in b.ffn.modules() if isinstance(m, Linear)]:
            linear.fp8 = config.fp8  # the head's: train.py's LossModel (not kernels.py's CE)
        # Post-norm blocks already end in a norm, so only pre-norm needs a final one.
        self.ln_final = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = Linear(config.d_model, config.vocab_size)
        if config.tie_weights:
            self.lm_head.weight = self.token_embeddings.weight
        if config.attn_impl == "triton" and config.mixer == "attention":
            triton_kernels("attn_impl='triton'")  # fail now, not at the first forward
        self.aux_loss = torch.zeros(())

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
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
        rope = None if self.rope is None else self.rope.cos_sin(positions, seq_len)  # cos, sin
        if rope is not None and rope[0].dim() > 2:  # per-row positions (B, T): add the head axis
            rope = tuple(table.unsqueeze(-3) for table in rope)
        defer = hasattr(self.ln_final, "add_and_norm")  # fused norms: adds inside them (blocks)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if kv_cache is None else kv_cache.layers[i], start, defer)
        moe_losses = [layer.ffn.aux_loss for layer in self.layers] if config.num_experts else []
        self.aux_loss = sum(moe_losses, torch.zeros((), device=token_ids.device))
        if kv_cache is not None:
            kv_cache.seq_len = start + seq_len
        x = self.ln_final.add_and_norm(*x)[0] if isinstance(x, tuple) else self.ln_final(x)
        return x if return_hidden else self.lm_head(x)

    def _check_inputs(self, token_ids: torch.Tensor, positions: torch.Tensor | None,
                      kv_cache: KVCache | None, start: int) -> None:
        """Shape checks are free; value checks need the data on the host, so they only run on CPU
        tensors in eager mode (never a GPU sync, never a graph break under torch.compile)."""
        config, seq_len = self.config, token_ids.shape[-1]
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be an int64 or int32 tensor, got {token_ids.dtype}")
        if seq_len > config.context_length:
            raise ValueError(f"sequence length {seq_len} > context_length={config.context_length}")
        if kv_cache is not None and token_ids.shape[:-1] != (kv_cache.batch_size,):
            raise ValueError(f"with a kv_cache token_ids must be (batch={kv_cache.batch_size}, T), "
                             f"got shape {tuple(token_ids.shape)}")
        if kv_cache is not None and start + seq_len > kv_cache.max_seq_len:
            raise ValueError(f"kv_cache holds {kv_cache.max_seq_len} tokens; {start} are cached "
                             f"and {seq_len} more do not fit")
        if positions is not None and positions.shape[-1] != seq_len:
            raise ValueError(f"positions must end in seq_len={seq_len}: {tuple(positions.shape)}")
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
        """Static buffers for up to max_seq_len (default context_length) tokens, in the autocast
        dtype if called under autocast, else the weights'. NotImplementedError for hyena."""
        max_seq_len = max_seq_len or self.config.context_length
        if not 1 <= max_seq_len <= self.config.context_length:
            raise ValueError(f"max_seq_len must lie in [1, context_length="
                             f"{self.config.context_length}], got {max_seq_len}")
        weight = self.lm_head.weight
        device = torch.device(device) if device is not None else weight.device
        dtype = dtype or autocast_dtype(device.type, weight.dtype)  # k, v's: no cast per step
        layers = [layer.attn.make_cache(batch_size, max_seq_len, device, dtype)
                  for layer in self.layers]
        return KVCache(layers, batch_size, max_seq_len)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """torch's loader, plus: strips the `_orig_mod.` (torch.compile) and `module.` (DDP)
        prefixes, and names every missing, unexpected or mis-shaped key in one clear error."""
        cleaned = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in state_dict.items()}
        expected = self.state_dict()
        problems = {"missing keys": sorted(expected.keys() - cleaned.keys()) if strict else [],
                    "unexpected keys": sorted(cleaned.keys() - expected.keys()) if strict else [],
                    "mis-shaped keys": [f"{k} (checkpoint {tuple(v.shape)}, model "
                                        f"{tuple(expected[k].shape)})" for k, v in cleaned.items()
                                        if k in expected and v.shape != expected[k].shape]}
        if any(problems.values()):
            raise ValueError("state dict does not fit this TransformerLM config; " + "; ".join(
                f"{label}: {', '.join(keys)}" for label, keys in problems.items() if keys))
        return super().load_state_dict(cleaned, strict=strict, assign=assign)


# Generation with the KV cache ---------------------------------------------------------------------
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
    """Continue prompt_ids (B, T) by up to max_new_tokens: the prompt goes through once, then each
    token costs one forward of length 1 against the KV cache. A row that produced eos_id is padded
    with it; generation stops when every row did. A full context restarts the cache from the last
    half-context (nanoGPT's cropping, amortised); mixers without a cache re-run the crop."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (batch, T >= 1), got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 (or None)")
    context = model.config.context_length
    try:
        cache = model.make_kv_cache(prompt_ids.shape[0], device=prompt_ids.device)
    except NotImplementedError:
        cache = None
    out, feed = prompt_ids, prompt_ids[:, -context:]  # feed: the tokens the next forward reads
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        if cache is not None and cache.seq_len == cache.max_seq_len:  # full: restart from half
            cache.reset()
            feed = out[:, -max(1, context // 2):]
        next_ids = sample_next(model(feed, kv_cache=cache)[:, -1], temperature, top_k)
        if eos_id is not None:
            next_ids = torch.where(finished, eos_id, next_ids)
            finished = finished | (next_ids == eos_id)
        out = torch.cat((out, next_ids[:, None]), dim=1)
        if eos_id is not None and bool(finished.all()):
            break
        feed = out[:, -context:] if cache is None else next_ids[:, None]
    return out


# Accounting: parameters, FLOPs and memory, from the config alone ----------------------------------
def _ffn_params(config: ModelConfig, active: bool = False) -> int:
    """FFN parameters of a block, or with active=True those one token multiplies: for MoE the
    k experts it is routed to (not all E), the shared expert and the router."""
    ffn = (3 if config.ffn == "swiglu" else 2) * config.d_model * config.d_ff
    ffn += config.bias * (config.d_ff + config.d_model)  # only the two-matrix FFNs have biases
    experts = config.experts_top_k if active else config.num_experts
    return ((experts + config.shared_expert) * ffn + config.d_model * config.num_experts
            if config.num_experts else ffn)


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
    kv_width = (config.num_kv_heads or heads) * head_dim
    biases = config.bias * (heads * head_dim + 2 * kv_width + d)
    return 2 * d * heads * head_dim + 2 * d * kv_width + biases


def count_params(config: ModelConfig) -> dict[str, int]:
    """Parameters by component; "total" equals TransformerLM(config)'s (a tied matrix once)."""
    d, layers = config.d_model, config.num_layers
    norm = {"rmsnorm": d, "layernorm": 2 * d, "none": 0}[config.norm]
    counts = {"token_embeddings": config.vocab_size * d,
              "position_embeddings": (config.positions == "learned") * config.context_length * d,
              "attention": layers * _mixer_params(config), "ffn": layers * _ffn_params(config),
              "norms": 2 * layers * norm + (norm if config.norm_position == "pre" else 0),
              "lm_head": 0 if config.tie_weights else config.vocab_size * d}
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (2 per multiply-add, matmuls only: norms, softmax and
    activations are a few percent), "forward", and "train" = 3 x forward (backward does two matmuls
    per forward one). Attention counts the full T x T, not halved for causality, as PaLM's 6N +
    12LHQT does; a sliding window min(T, W) keys; linear attention its quadratic training form."""
    d, layers, heads = config.d_model, config.num_layers, config.num_heads
    keys = min(seq_len, config.sliding_window or seq_len)
    flops = {"attention_proj": 2.0 * layers * _mixer_params(config), "attention_scores": 0.0,
             "attention_values": 0.0, "long_conv": 0.0}
    if config.mixer == "hyena":
        # attention_proj: 2 per mixer parameter, the filter MLP's too (it runs once per position).
        # Each long convolution: two real FFTs of length n = 2T (~2.5 n log2 n each) per channel,
        # plus the spectral product (6 per complex bin), shared by the T tokens.
        n_fft = 2 * seq_len
        per_channel = (2 * 2.5 * n_fft * math.log2(n_fft) + 6 * (n_fft // 2 + 1)) / seq_len
        flops["long_conv"] = layers * config.hyena_order * d * per_channel
    else:
        qk_dim = config.head_dim + (config.rope_dim if config.kv_latent_dim is not None else 0)
        flops["attention_scores"] = 2.0 * layers * keys * heads * qk_dim
        flops["attention_values"] = 2.0 * layers * keys * heads * config.head_dim
    flops["ffn"] = 2.0 * layers * _ffn_params(config, active=True)
    flops["lm_head"] = 2.0 * d * config.vocab_size
    flops["forward"] = sum(flops.values())
    flops["train"] = 3 * flops["forward"]
    return flops


def mfu_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """The PaLM / nanoGPT training FLOPs per token, 6 N + 12 L H Q T, with N the parameters used
    in matmuls (everything but the input embedding and the norm gains; a tied matrix counts once
    as the head; for MoE the active ones). MFU = tokens/s * this / peak FLOP/s."""
    per_layer = _mixer_params(config) + _ffn_params(config, active=True)
    matmul_params = config.num_layers * per_layer + config.vocab_size * config.d_model
    return 6.0 * matmul_params + 12.0 * config.num_layers * config.d_model * seq_len


def memory_estimate(config: ModelConfig, batch_size: int, seq_len: int, param_bytes: int = 4,
                    activation_bytes: int = 4, stores_attention_matrix: bool = True) -> dict:
    """Bytes to train with AdamW (the course's accounting): parameters, gradients, AdamW's two fp32
    moments, and the activations saved for backward: per block the norm inputs, Q/K/V, attention
    scores and probabilities (H x T x T each, unless a fused kernel recomputes them), attention
    output and projection, the FFN's hidden tensors; then the final norm, logits and softmax."""
    params, d, tokens = count_params(config)["total"], config.d_model, batch_size * seq_len
    ffn_hidden = 4 * config.d_ff if config.ffn == "swiglu" else 2 * config.d_ff
    ffn_hidden *= (config.experts_top_k + config.shared_expert) if config.num_experts else 1
    per_token = 2 * d + 5 * d + ffn_hidden + d  # ln1+ln2 inputs, QKV/attn out/proj, FFN, W2 out
    attention_matrix = 2 * config.num_heads * seq_len * batch_size * seq_len
    per_layer = tokens * per_token + (attention_matrix if stores_attention_matrix else 0)
    activation_elements = config.num_layers * per_layer + tokens * (d + 2 * config.vocab_size)
    memory = {"params": params * param_bytes, "grads": params * param_bytes,
              "adamw_state": params * 2 * 4, "activations": activation_elements * activation_bytes}
    memory["total"] = sum(memory.values())
    return memory


# Variant: fixed (sinusoidal) and learned positions ------------------------------------------------
# Learned positions are an Embedding of context_length rows; TransformerLM.forward adds either
# to the token embeddings, instead of rotating queries and keys.
def sinusoidal_table(max_seq_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos: RoPE's angles."""
    rope = RotaryEmbedding(10000.0, d_model, max_seq_len)
    return torch.stack((rope.sin, rope.cos), dim=-1).flatten(-2)[:, :d_model]  # (L, d_model)


# Variant: multi-head latent attention (DeepSeek-V2), a smaller KV cache than GQA's ----------------
class MultiHeadLatentAttention(nn.Module):
    """Keys and values are up-projected from one small latent c = W_dkv x (width kv_latent_dim),
    so the cache keeps c and one shared RoPE key of width rope_dim per token instead of 2 H d.
    RoPE does not commute with the up-projection, so position goes in a decoupled part:
    q = [q_C ; RoPE(q_R)], k = [k_C ; RoPE(k_R)], k_R shared by all heads. (Like DeepSeek-V2-Lite
    we skip query compression; K, V are recomputed from the latent, W_uk is not absorbed.)"""
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
            latent = _write_cache(cache["latent"], latent, start, dim=1).to(latent.dtype)
            k_rope = _write_cache(cache["k_rope"], k_rope, start, dim=2).to(latent.dtype)
        q_rope = apply_rotary(_split_heads(self.q_rope_proj(x), self.num_heads), *rope)
        q = torch.cat((_split_heads(self.q_proj(x), self.num_heads), q_rope), -1)  # (B, H, T, d+r)
        k_content = _split_heads(self.k_up_proj(latent), self.num_heads)  # (B, H, S, d)
        k = torch.cat((k_content, k_rope.expand(*k_content.shape[:-1], -1)), -1)  # (.., d + rope)
        v = _split_heads(self.v_up_proj(latent), self.num_heads)  # (B, H, S, d)
        out = attend(q, k, v, start, None, self.attn_impl)  # (B, H, T, d)
        return self.output_proj(out.transpose(-3, -2).flatten(-2))

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        latent_dim, kind = self.kv_down_proj.weight.shape[0], dict(device=device, dtype=dtype)
        return {"latent": torch.zeros(batch_size, max_seq_len, latent_dim, **kind),
                "k_rope": torch.zeros(batch_size, 1, max_seq_len, self.rope_dim, **kind)}


# Variant: causal linear attention (Katharopoulos et al. 2020) -------------------------------------
# Replace exp(q.k) by phi(q).phi(k) with phi = elu + 1 > 0. Then out_i = phi(q_i) S_i / phi(q_i) z_i
# with S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j): an RNN with a (d x d) state,
# O(1) memory per generated token. The recurrent form is the reference; the parallel form trains.
def linear_attention_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def causal_linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      eps: float = 1e-6) -> torch.Tensor:
    """The RNN form, one token at a time. q, k, v: (..., T, d) features."""
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
    """The parallel (quadratic) form: (phi(Q) phi(K)^T masked causally) V, plus the contribution
    of an earlier state when continuing from a cache. Returns (output, state, normalizer)."""
    scores = (q @ k.transpose(-2, -1)).tril()  # (..., T, T): phi(q_i).phi(k_j) for j <= i
    numerator, denominator = scores @ v, scores.sum(-1, keepdim=True)
    if state is not None:
        numerator = numerator + q @ state
        denominator = denominator + (q @ normalizer.unsqueeze(-1))
        state = state + k.transpose(-2, -1) @ v
        normalizer = normalizer + k.sum(-2)
    return numerator / (denominator + eps), state, normalizer


class LinearAttention(MultiHeadSelfAttention):
    """Multi-head causal linear attention, with the projections of softmax attention."""
    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0) -> torch.Tensor:
        q, k, v = self.project(x, rope)  # RoPE goes before the positive feature map
        q, k = (linear_attention_feature_map(t.float()) for t in (q, k))  # fp32: sums drift in bf16
        state = () if cache is None else (cache["state"], cache["normalizer"])  # S, z so far
        out, *new_state = causal_linear_attention(q, k, v.float(), *state)
        for buffer, new in zip(state, new_state):  # the cache keeps the running sums
            buffer.copy_(new)
        return self.output_proj(out.to(x.dtype).transpose(-3, -2).flatten(-2))

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        shape = (batch_size, self.num_heads, self.head_dim)  # the whole past in a fixed size
        return {"state": torch.zeros(*shape, self.head_dim, device=device),
                "normalizer": torch.zeros(shape, device=device)}


# Variant: Hyena, a long-convolution mixer (Poli et al. 2023), no attention at all -----------------
# Project x to (v, x_1 .. x_N), then repeat v <- x_i * (h_i conv v) with long causal filters h_i
# made by a small MLP of the position (implicit: parameters do not grow with length).
HYENA_FREQS = 8  # sine/cosine frequencies in the filter MLP's positional features
HYENA_SHORT_KERNEL = 3  # width of the short depthwise convolution on each stream


def causal_conv_direct(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y[..., c, t] = sum_{s<=t} h[c, s] u[..., c, t-s], by its definition in O(T^2)."""
    y = torch.zeros_like(u)
    for t in range(u.shape[-1]):
        y[..., t] = (h[..., : t + 1].flip(-1) * u[..., : t + 1]).sum(-1)
    return y


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The same convolution in O(T log T): zero-padding to 2T turns the FFT's circular convolution
    into a linear one, so no future sample wraps around into the past."""
    seq_len = u.shape[-1]
    u_freq, h_freq = (torch.fft.rfft(t.float(), n=2 * seq_len) for t in (u, h))
    return torch.fft.irfft(u_freq * h_freq, n=2 * seq_len)[..., :seq_len].to(u.dtype)


class HyenaFilter(nn.Module):
    """Implicit filters h(t) = MLP(t, sin/cos of t) * exp(-decay_c * t), t in [0, 1); the decays,
    fixed and spread across channels, mix short and long memories."""
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
        u = self.in_proj(x.reshape(-1, *x.shape[-2:])).transpose(-2, -1)  # (B, (N+1) D, T)
        kernel = self.short_filter.shape[-1]
        u = F.conv1d(F.pad(u, (kernel - 1, 0)), self.short_filter.to(u.dtype), groups=u.shape[1])
        v, *gates = u.split(self.d_model, dim=1)  # each (B, D, T)
        filters = self.long_filter(seq_len).view(self.order, self.d_model, seq_len)
        skips = self.skip.view(self.order, self.d_model, 1)
        for gate, h, skip in zip(gates, filters, skips):
            v = gate * (fft_causal_conv(v, h) + skip.to(v.dtype) * v)
        return self.output_proj(v.transpose(-2, -1)).reshape(x.shape)

    def make_cache(self, batch_size: int, max_seq_len: int, device, dtype) -> dict:
        raise NotImplementedError("mixer='hyena' has no KV cache: its long convolution sees the "
                                  "whole sequence; decode by re-running the full forward")


# Variant: mixture of experts, in place of each block's FFN ----------------------------------------
class MixtureOfExperts(nn.Module):
    """Top-k routing: a router scores the E experts per token; each token goes through its k best,
    summed with the router probabilities renormalised over those k (k identical experts give one
    dense FFN). A token costs k FFNs while the parameters are E. The Switch load-balancing loss
    E * sum_e f_e P_e (f_e: share of assignments to e, P_e: mean router probability), smallest
    when tokens spread evenly, is left in self.aux_loss, already weighted."""
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
        out = out if self.shared_expert is None else out + self.shared_expert(tokens)
        assigned = F.one_hot(top_experts, probs.shape[-1]).float().sum((0, 1)) / top_experts.numel()
        self.aux_loss = self.aux_loss_coef * probs.shape[-1] * (assigned * probs.mean(0)).sum()
        return out.view_as(x)


# Command line: the lecture's transformer accounting, parsed like every stage's --------------------
CLI_DEFAULTS = {"preset": None,  # a PRESETS name; the --field=value options override its fields
                "batch_size": 1,  # sequences per step, for the memory estimate
                "seq_len": 0,  # tokens per sequence for FLOPs and memory; 0: the context length
                **asdict(ModelConfig())}


def print_accounting(config: ModelConfig, batch_size: int, seq_len: int) -> None:
    """The lecture's transformer accounting: parameters, FLOPs per token, training memory."""
    flops, memory = flops_per_token(config, seq_len), memory_estimate(config, batch_size, seq_len)
    print("config:", ", ".join(f"{k}={v}" for k, v in asdict(config).items()))
    for title, rows, total, unit in (
            ("parameters", count_params(config), "total", "{:,}".format),
            (f"forward FLOPs per token at seq_len={seq_len}", flops, "forward",
             lambda v: f"{v / 1e9:.4f} G"),
            (f"training memory with AdamW, fp32, batch {batch_size} x {seq_len}", memory, "total",
             lambda v: f"{v / 2**30:.2f} GiB")):
        print(f"\n{title}")
        for name, value in rows.items():
            share = f"{100 * value / rows[total]:6.2f}%" if name not in (total, "train") else ""
            print(f"  {name:<22}{unit(value):>16}  {share}".rstrip())
    print(f"\ntrain = 3 x forward; PaLM's 6N + 12LHQT for MFU: "
          f"{mfu_flops_per_token(config, seq_len) / 1e9:.4f} G per token; "
          f"the forward of one sequence: {flops['forward'] * seq_len / 1e12:.3f} TFLOPs")


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    positional, options = parse_args(argv, CLI_DEFAULTS)
    if positional:
        raise UsageError(f"unexpected argument {positional[0]!r}; write options as --key=value")
    preset, batch_size, seq_len = (options.pop(key, CLI_DEFAULTS[key])
                                   for key in ("preset", "batch_size", "seq_len"))
    if batch_size < 1 or seq_len < 0:
        raise UsageError(f"need --batch_size >= 1 and --seq_len >= 0, got {batch_size}, {seq_len}")
    try:
        config = ModelConfig.preset(preset, **options) if preset else ModelConfig(**options)
    except ValueError as error:  # a bad field value is bad usage: one line naming the field
        raise UsageError(str(error)) from None
    print_accounting(config, batch_size, seq_len or config.context_length)


if __name__ == "__main__":
    run_cli(main)
