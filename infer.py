"""Stage 6: inference, from a checkpoint to text as fast as memory bandwidth allows (lecture 10).

Decoding reads every weight and the whole KV cache to make one token per sequence, so it is
memory-bound and the lecture's arithmetic (bytes moved / bandwidth) predicts its speed. In teaching
order: 1. sampling; 2. a static KV cache: prefill, then one token a step, each row at its own
position, the step compiled once and replayed as a CUDA graph (at batch 1 on CUDA: kernels.py's
one persistent kernel for all the layers); 3. generate_batch: many prompts, n
samples each, stop strings, log-probs; 4. continuous batching over a paged KV cache; 5. speculative
decoding; 6. int8 and int4 weights; 7. checkpoints, ours and GPT-2's; 8. roofline and benchmark.

Commands (CPU or one GPU, chosen automatically; settings are --key=value):
    python infer.py --prompt="Once upon a time" --max_new_tokens=256 --temperature=0.8 \\
        --top_p=0.9   [--ckpt=out/ckpt.pt --top_k=50 --seed=0 --num_samples=2 --stop='\\n\\n']
    python infer.py --hf_dir=DIR --prompt="Hello"       # GPT-2 weights in Hugging Face's layout
    python infer.py --draft_ckpt=out_small/ckpt.pt       # speculative decoding with a draft
    python infer.py quantize [--ckpt=... | --hf_dir=...]  # perplexity and speed, int8 and int4
    python infer.py roofline [--gpu=H100 --seq_len=1024]  # the lecture's Llama-2-13B table
    python infer.py bench                # one H200, about 4 min: GPT-2-medium shape, bf16
    python infer.py bench --batch_sizes=1 --decode_only=True --profile=True  # where a step goes
    python infer.py bench --compare_hf   # and transformers' generate on the same weights
    python infer.py bench --device=cpu --preset=tiny     # a minute on a CPU
Reads   out/ckpt.pt (from `python train.py`) and the tokenizer folder it was trained with (found
        under data_cache/ by its fingerprint, or --tokenizer_dir); a GPT-2 folder (config.json,
        vocab.json, merges.txt, model.safetensors or pytorch_model.bin). Writes nothing.

Papers: Pope et al. 2022 (Efficiently Scaling Transformer Inference); Holtzman et al. 2020
(nucleus sampling); Kwon et al. 2023, vLLM (PagedAttention); Yu et al. 2022, Orca (continuous
batching); Leviathan et al. 2023, Chen et al. 2023 (speculative decoding); Dettmers et al. 2022
(LLM.int8()); Frantar et al. 2023 (GPTQ: int4 groups); Radford et al. 2019 (GPT-2).
"""

import copy
import functools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import (PRESETS, Linear, LinearAttention, ModelConfig, MultiHeadLatentAttention,
                   MultiHeadSelfAttention, TransformerLM, _split_heads, apply_rotary,
                   autocast_dtype, causal_linear_attention, count_params,
                   linear_attention_feature_map, triton_kernels)
from tokenizer import DATA_DIR, Tokenizer, UsageError, parse_command, run_cli
from train import EOT, read_checkpoint, resolve_device, resolve_dtype, use_compile


# 1. Sampling: one token per row of logits ---------------------------------------------------------
def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th too), -inf elsewhere."""
    kth_best = logits.topk(min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # the mass before a token; the first stays
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def probabilities(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float = 1.0) -> Tensor:
    """softmax(logits / T) after the top-k and top-p filters, in float32; T = 0: the argmax."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    return (top_p_filter(logits, top_p) if top_p < 1 else logits).softmax(-1)


def sample_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of logits (B, V), drawn from probabilities(...); greedy at T = 0."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


# 2. A static KV cache: each row keeps the token at position p in slot p ---------------------------
# Rows sit at their own positions, so prompts of different lengths decode together without padding;
# the mask comes from the position each slot holds (-1: empty). A sliding window W needs only
# W + chunk - 1 slots, used as a ring (slot = position mod slots), since a forward writes at most
# `chunk` tokens before attending. Token-carrying buffers are (B, slots, ...).
PREFILL_CHUNK = 512  # the most tokens one forward writes into a sliding-window ring


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def cache_buffers(attn: nn.Module, batch_size: int, slots: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, Tensor]:
    """A layer's buffers: keys and values (GQA/MQA: fewer heads), MLA's latent and shared RoPE
    key, or linear attention's constant-size state (float32: a running sum)."""
    kind = dict(device=device, dtype=dtype)
    if isinstance(attn, LinearAttention):
        shape = (batch_size, attn.num_heads, attn.head_dim)
        return {"state": torch.zeros(*shape, attn.head_dim, device=device),
                "normalizer": torch.zeros(shape, device=device)}
    if isinstance(attn, MultiHeadLatentAttention):
        return {"latent": torch.zeros(batch_size, slots, attn.kv_down_proj.weight.shape[0], **kind),
                "k_rope": torch.zeros(batch_size, slots, attn.rope_dim, **kind)}
    if isinstance(attn, MultiHeadSelfAttention):
        shape = (batch_size, slots, attn.num_kv_heads, attn.head_dim)
        return {"k": torch.zeros(shape, **kind), "v": torch.zeros(shape, **kind)}
    raise NotImplementedError(f"{type(attn).__name__} has no KV cache (Hyena's long convolution "
                              "sees the whole sequence): generation recomputes the forward")


def caches_keys(attn: nn.Module) -> bool:
    """Softmax attention (kernels.py's subclass too), whose cache holds keys per token; not linear
    attention (a subclass with a running state instead) or Hyena."""
    return (isinstance(attn, (MultiHeadSelfAttention, MultiHeadLatentAttention))
            and not isinstance(attn, LinearAttention))


def causal_mask(key_positions: Tensor, positions: Tensor, window: int | None) -> Tensor:
    """(B, 1, T, S): may the query at positions[b, t] see the key at key_positions[b, s]?"""
    keys, queries = key_positions[:, None, :], positions[:, :, None]  # (B, 1, S), (B, T, 1)
    allowed = (keys <= queries) & (keys >= 0)
    if window:
        allowed &= keys > queries - window
    return allowed[:, None]  # a head axis


class StaticCache:
    """batch_size rows of up to max_len tokens, in the autocast (else the weights') dtype. A forward
    calls begin(positions, rows) once (slots and mask), then each layer writes and reads."""
    def __init__(self, model: TransformerLM, batch_size: int, max_len: int,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        device, self.window = model_device(model), model.config.sliding_window
        self.prefill_chunk = prefill_chunk if self.window else max_len
        self.num_slots = min(max_len, self.window + prefill_chunk - 1) if self.window else max_len
        dtype = autocast_dtype(device.type, next(model.parameters()).dtype)
        self.layers = [cache_buffers(layer.attn, batch_size, self.num_slots, device, dtype)
                       for layer in model.layers]
        self.slot_positions = torch.full((batch_size, self.num_slots), -1, device=device)
        self.rows, self.slots, self.kv_len, self.fused = None, None, self.num_slots, None

    def begin(self, positions: Tensor, rows: Tensor | None = None,
              kv_len: int | None = None) -> Tensor:
        """Place tokens at positions (B, T); return the mask. kv_len: slots to read, if known."""
        self.rows, self.slots = rows, positions % self.num_slots
        self.kv_len = self.num_slots if self.window or kv_len is None else kv_len
        self.write(self.slot_positions, positions)
        return causal_mask(self.read(self.slot_positions), positions, self.window)

    def write(self, buffer: Tensor, values: Tensor) -> None:
        rows = torch.arange(len(buffer), device=buffer.device) if self.rows is None else self.rows
        buffer.index_put_((rows[:, None], self.slots), values.to(buffer.dtype))

    def read(self, buffer: Tensor) -> Tensor:
        buffer = buffer[:, : self.kv_len]
        return buffer if self.rows is None else buffer[self.rows]

    def copy_rows(self, source: Tensor, dest: Tensor) -> None:
        """Rows dest become copies of rows source (the n samples of one prefilled prompt)."""
        for buffer in [self.slot_positions, *(b for layer in self.layers for b in layer.values())]:
            buffer[dest] = buffer[source]


# The forward against a cache: model.py's blocks, with attention reading the cache -----------------
def attend_cached(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, H, T, d) over k, v (B, H_kv, S, d). With GQA the G = H / H_kv query heads that share
    a key-value head become G x T query rows of it: no copy of the cache per head."""
    (batch, num_heads, seq_len, _), num_kv_heads = q.shape, k.shape[1]
    group = num_heads // num_kv_heads
    q = q.reshape(batch, num_kv_heads, group * seq_len, -1)
    mask = mask.repeat(1, 1, group, 1) if group > 1 else mask
    k, v = k.to(q.dtype), v.to(q.dtype)
    if seq_len == 1 and torch.compiler.is_compiling():  # decode: torch.compile turns these
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # vector products
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # into fused reductions
        return (probs.to(v.dtype) @ v).reshape(batch, num_heads, seq_len, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, num_heads, seq_len, -1)


@torch.no_grad()
def fuse_qkv(model: TransformerLM) -> list[tuple | None]:
    """Per layer, q_proj | k_proj | v_proj stacked into one matrix (and bias): one matmul instead
    of three, and at batch 1 a kernel's fixed cost is most of its time. A copy: made per Decoder."""
    fused = []
    for layer in model.layers:
        attn, parts = layer.attn, [getattr(layer.attn, f"{n}_proj", None) for n in "qkv"]
        ok = caches_keys(attn) and all(type(p) is Linear for p in parts)
        fused.append((torch.cat([p.weight for p in parts]), None if parts[0].bias is None else
                      torch.cat([p.bias for p in parts])) if ok else None)
    return fused


def mixer_step(attn: nn.Module, x: Tensor, rope: tuple | None, buffers: dict,
               cache: StaticCache, mask: Tensor, fused: tuple | None = None) -> Tensor:
    """One layer's sequence mixer on new tokens x (B, T, D), reading and extending the cache."""
    if isinstance(attn, LinearAttention):  # a constant-size state instead of keys and values
        q, k, v = attn.project(x, rope)
        q, k = linear_attention_feature_map(q.float()), linear_attention_feature_map(k.float())
        rows = slice(None) if cache.rows is None else cache.rows
        out, buffers["state"][rows], buffers["normalizer"][rows] = causal_linear_attention(
            q, k, v.float(), buffers["state"][rows], buffers["normalizer"][rows])
        return attn.output_proj(out.to(x.dtype).transpose(1, 2).flatten(2))
    if isinstance(attn, MultiHeadLatentAttention):  # cache the latent and one RoPE key
        cache.write(buffers["latent"], attn.kv_down_proj(x))
        cache.write(buffers["k_rope"], apply_rotary(attn.k_rope_proj(x)[:, None], *rope)[:, 0])
        latent, k_rope = cache.read(buffers["latent"]).to(x.dtype), cache.read(buffers["k_rope"])
        q = torch.cat((_split_heads(attn.q_proj(x), attn.num_heads),
                       apply_rotary(_split_heads(attn.q_rope_proj(x), attn.num_heads), *rope)), -1)
        k = _split_heads(attn.k_up_proj(latent), attn.num_heads)
        k = torch.cat((k, k_rope[:, None].expand(*k.shape[:-1], -1).to(x.dtype)), -1)
        v = _split_heads(attn.v_up_proj(latent), attn.num_heads)
    else:  # softmax attention, MHA / GQA / MQA, with or without a sliding window
        if fused is None:
            q, k, v = attn.project(x, rope)  # (B, H, T, d), (B, H_kv, T, d)
        else:  # attn.project with fuse_qkv's one matrix
            qkv = x @ fused[0].T if fused[1] is None else x @ fused[0].T + fused[1]
            kv_width = attn.num_kv_heads * attn.head_dim
            q, k, v = qkv.split([qkv.shape[-1] - 2 * kv_width, kv_width, kv_width], dim=-1)
            heads = (attn.num_heads, attn.num_kv_heads, attn.num_kv_heads)
            q, k, v = (_split_heads(t, h) for t, h in zip((q, k, v), heads))
            if attn.use_rope and rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        cache.write(buffers["k"], k.transpose(1, 2))
        cache.write(buffers["v"], v.transpose(1, 2))
        k, v = cache.read(buffers["k"]).transpose(1, 2), cache.read(buffers["v"]).transpose(1, 2)
    return attn.output_proj(attend_cached(q, k, v, mask).transpose(1, 2).flatten(2))


def forward_cached(model: TransformerLM, cache: StaticCache, token_ids: Tensor, positions: Tensor,
                   rows: Tensor | None = None, kv_len: int | None = None,
                   last_only: bool = False) -> Tensor:
    """Logits (B, T, V) of new tokens (B, T) at positions (B, T), continuing row b (or rows[b])
    of the cache: model.forward's arithmetic, one position per row; last_only: (B, 1, V)."""
    config = model.config
    mask = cache.begin(positions, rows, kv_len)
    x = model.token_embeddings(token_ids)  # (B, T, D)
    if config.positions in ("learned", "sinusoidal"):
        table = (model.position_embeddings.weight if config.positions == "learned"
                 else model.sinusoidal)
        x = x + table[positions].to(x.dtype)
    rope = None
    if model.rope is not None:
        cos, sin = model.rope.cos_sin(positions, token_ids.shape[-1])  # (B, T, rope_dim / 2)
        rope = (cos[:, None], sin[:, None])  # a head axis
    fused = getattr(cache, "fused", None) or [None] * len(cache.layers)
    for block, buffers, qkv in zip(model.layers, cache.layers, fused):
        if block.pre_norm:
            x = x + mixer_step(block.attn, block.ln1(x), rope, buffers, cache, mask, qkv)
            x = x + block.ffn(block.ln2(x))
        else:
            x = block.ln1(x + mixer_step(block.attn, x, rope, buffers, cache, mask, qkv))
            x = block.ln2(x + block.ffn(x))
    return model.lm_head(model.ln_final(x[:, -1:] if last_only else x))


def prefill(model: TransformerLM, cache: StaticCache, token_ids: Tensor,
            rows: Tensor | None = None) -> Tensor:
    """Equal-length prompts (B, T) into the cache (rows: which rows); the last logits (B, V)."""
    for start in range(0, token_ids.shape[1], cache.prefill_chunk):
        piece = token_ids[:, start: start + cache.prefill_chunk]
        positions = torch.arange(start, start + piece.shape[1], device=token_ids.device)
        logits = forward_cached(model, cache, piece, positions.expand_as(piece), rows,
                                start + piece.shape[1], last_only=True)
    return logits[:, -1]


# The decode step, compiled once and replayed as a CUDA graph --------------------------------------
# At batch 1 a decode step is hundreds of small kernels, and launching them from Python costs more
# than running them. torch.compile fuses the elementwise ones; a CUDA graph records the whole step
# once and replays it with one launch. Both need static shapes: the cache is preallocated, the step
# reads all its slots (masked), and tokens and positions are copied into fixed input buffers.
def decode_step(model: TransformerLM, cache: StaticCache, token_ids: Tensor, positions: Tensor,
                greedy: bool = False, kv_len: int | None = None) -> Tensor:
    """Logits (B, V), or (B, T, V) for T tokens a row. greedy: the argmax and the next position
    go back into the input buffers inside the step, so replays chain with no host work at all."""
    logits = forward_cached(model, cache, token_ids, positions, None, kv_len).squeeze(1)
    if greedy:
        token_ids.copy_(logits.argmax(-1).view_as(token_ids))
        positions.add_(1)
    return logits


@functools.cache
def compiled_decode_step() -> Callable:
    """One compiled function, a graph per batch size and cache length (a dynamic batch compiles
    slower code, and failed on the H200). Coordinate-descent tuning makes each batch-1 matrix-vector
    product a tuned reduction folding in biases, activations and int8/int4 unpacking."""
    return torch.compile(decode_step, dynamic=False, options={"coordinate_descent_tuning": True})


# Even compiled, a batch-1 step is ~400 kernels, and each one's ramp-up, drain and wait for its
# inputs costs more than its bytes (bench --profile). kernels.py's FusedDecode runs the layers as
# one persistent kernel (a program per SM streaming its weight tiles seven ahead through TMA,
# three grid barriers a layer) and the head as a second: fused=None uses it on a Hopper GPU at
# batch 1 when the model is one it supports (GPT-2's and Llama's blocks), else says why.
class Decoder:
    """A StaticCache and its decode step of tokens_per_step tokens per row (speculative decoding
    verifies several): eager, compiled, or (batch 1) the fused kernel; on CUDA captured as a CUDA
    graph. A failed compile or capture is reported in one line (and in .mode) and the step falls
    back: the fused kernel to the compiled step, that to the eager one."""
    def __init__(self, model: TransformerLM, batch_size: int, max_len: int, compile: bool = False,
                 cuda_graph: bool | None = None, tokens_per_step: int = 1,
                 greedy: bool = False, fused: bool | None = None) -> None:
        self.model, self.cache, self.greedy = model, StaticCache(model, batch_size, max_len), greedy
        self.cache.fused = fuse_qkv(model)
        device = model_device(model)
        self.step, self.failed = None, ""  # kernels.py's one-kernel step: batch 1, CUDA (auto)
        wanted = device.type == "cuda" if fused is None else fused
        if wanted and batch_size == tokens_per_step == 1:
            try:
                kernels = triton_kernels("the fused decode step")
                why = kernels.fused_decode_unsupported(model, kernels.decode_programs(device))
            except ImportError as error:  # no triton: auto falls back, a request fails
                if fused:
                    raise
                why = str(error)
            if why:
                self.failed = f" ({why})" if fused else ""
            else:
                self.step = kernels.FusedDecode(model, self.cache.layers)
        self.token_ids = torch.zeros(batch_size, tokens_per_step, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.token_ids)
        self.fn = compiled_decode_step() if compile else decode_step
        self.use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph, self.logits = None, None
        self.ready = not (self.use_graph or compile or self.step)

    @property
    def mode(self) -> str:
        return ("fused kernel" if self.step else "compiled" if self.fn is not decode_step
                else "eager") + (" + CUDA graph" if self.graph is not None else "") + self.failed

    def _run(self, kv_len: int | None = None) -> Tensor:
        if self.step is None:
            return self.fn(self.model, self.cache, self.token_ids, self.positions, self.greedy,
                           kv_len)
        logits = self.step(self.token_ids, self.positions)
        if self.greedy:  # as decode_step does
            self.token_ids.copy_(logits.argmax(-1).view_as(self.token_ids))
            self.positions.add_(1)
        return logits

    def _prepare(self) -> None:
        """Compile and capture. Warm-up steps rewrite the same slots with the same tokens, but
        would add to a linear-attention state and advance a greedy step's inputs: kept aside."""
        states = [(b, b.clone()) for b in (self.token_ids, self.positions, *(
            b for layer in self.cache.layers for name, b in layer.items()
            if name in ("state", "normalizer")))]
        for stage in ("compile", "capture"):
            try:
                if stage == "compile":
                    self._run()
                elif self.use_graph:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        self._run()
                    torch.cuda.current_stream().wait_stream(side)
                    self.graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self.graph):
                        self.logits = self._run()
            except Exception as error:
                if stage == "compile" and self.fn is decode_step and self.step is None:
                    raise
                self.failed += f" ({stage} failed: {type(error).__name__})"
                print(f"warning: {stage} failed, decoding without it ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[0][:200]})", file=sys.stderr)
                if stage == "compile" and self.step is not None:
                    self.step = None  # the fused step falls back to self.fn (compiled or not)
                elif stage == "compile":
                    self.fn = decode_step
                self.graph = None
            for buffer, saved in states:
                buffer.copy_(saved)
        self.ready = True

    @torch.no_grad()
    def decode(self, tokens: Tensor | None = None, positions: Tensor | None = None,
               kv_len: int | None = None) -> Tensor:
        """Logits (B, V) after tokens (B,) at positions (B,), or (B, T, V) for (B, T); None: what
        a greedy step left. The next step overwrites them. kv_len: slots an eager step reads."""
        if tokens is not None:
            self.token_ids.copy_(tokens.view_as(self.token_ids))
            self.positions.copy_(positions.view_as(self.positions))
        if not self.ready:
            self._prepare()
        if self.graph is None:
            return self._run(kv_len if self.fn is decode_step else None)
        self.graph.replay()
        return self.logits


# 3. Batched generation: the API align.py's rollouts use -------------------------------------------
@dataclass
class Completion:
    prompt_index: int  # which prompt this continues
    text: str  # generated text (prompt excluded); the stop string kept only with include_stop
    token_ids: list[int]  # generated ids, cut like text; they end with eos_id on finish "eos"
    logprobs: list[float] | None  # log p(token) under the raw model (fp32 log_softmax of logits)
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class Sampling:
    """How to continue a prompt: the sampling filters and when each sequence stops."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop: Sequence[str] = ()
    include_stop: bool = False
    min_tokens: int = 0  # no eos before this many tokens; a stop string must end at or after it
    eos_id: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"need 0 <= min_tokens <= max_new_tokens, got {self.min_tokens} "
                             f"and {self.max_new_tokens}")


@dataclass
class Generation:
    """One sequence being generated: its tokens so far, and why it stopped."""
    prompt_index: int
    limit: int  # the most tokens it may generate (max_new_tokens, or what the context leaves)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    def add(self, token: int, logprob: float, tokenizer, sampling: Sampling) -> None:
        """Append a token; stop at eos, at the earliest stop string ending in this token (from
        min_tokens on; without include_stop cut from the text, with the tokens that overlap it),
        or at the limit. tokenizer None: ids only (benchmarks)."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        if token == sampling.eos_id:
            self.finish_reason = "eos"
            return
        if tokenizer is not None:  # U+FFFD ends the text until a multi-byte character completes
            before, self.text = len(self.text.rstrip("\ufffd")), tokenizer.decode(self.ids)
            found = [(at, s) for s in sampling.stop  # occurrences ending after text[:before]
                     if (at := self.text.find(s, max(0, before - len(s) + 1))) != -1]
            if found and len(self.ids) >= sampling.min_tokens:
                at, stop = min(found)
                self.finish_reason, keep = "stop", len(self.ids)
                self.text = self.text[: at + len(stop) if sampling.include_stop else at]
                while not sampling.include_stop and keep and len(tokenizer.decode(
                        self.ids[:keep])) > at:  # keep the tokens wholly before it
                    keep -= 1
                del self.ids[keep:], self.logprobs[keep:]
        if self.finish_reason is None and len(self.ids) >= self.limit:
            self.finish_reason = "length"

    def completion(self, sampling: Sampling) -> Completion:
        return Completion(self.prompt_index, self.text, self.ids,
                          self.logprobs if sampling.return_logprobs else None,
                          self.finish_reason or "length")


def eos_of(tokenizer) -> int | None:
    """Ours: the id of <|endoftext|> if it is a special token; Hugging Face's: eos_token_id."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.token_id(EOT) if EOT in tokenizer.special_tokens else None
    return getattr(tokenizer, "eos_token_id", None)


def choose_tokens(logits: Tensor, rows: list[Generation], sampling: Sampling,
                  generator: torch.Generator | None) -> tuple[Tensor, list[float]]:
    """Each row's next token (no eos before min_tokens), and its log-prob under the raw logits."""
    raw = allowed = logits.float()
    early = [i for i, row in enumerate(rows) if len(row.ids) < sampling.min_tokens]
    if early and sampling.eos_id is not None:
        allowed = raw.clone()
        allowed[early, sampling.eos_id] = float("-inf")
    tokens = sample_token(allowed, sampling.temperature, sampling.top_k, sampling.top_p,
                          generator)
    if not sampling.return_logprobs:
        return tokens, [0.0] * len(rows)
    return tokens, raw.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()


def decode_loop(rows: list[Generation], logits: Tensor, advance: Callable[[Tensor], Tensor],
                tokenizer, sampling: Sampling, generator: torch.Generator | None,
                on_token: Callable[[int, Generation], None] | None = None) -> None:
    """Sample a token per row and feed them back (advance: (B,) -> logits (B, V)) until all stop."""
    while True:
        tokens, logprobs = choose_tokens(logits, rows, sampling, generator)
        for i, (row, token, logprob) in enumerate(zip(rows, tokens.tolist(), logprobs)):
            if row.finish_reason is None:
                row.add(token, logprob, tokenizer, sampling)
                if on_token is not None:
                    on_token(i, row)
        if all(row.finish_reason is not None for row in rows):
            return
        logits = advance(tokens)


def generate_cached(model: TransformerLM, prompts: list[list[int]], rows: list[Generation],
                    n: int, tokenizer, sampling: Sampling, generator: torch.Generator | None,
                    compile: bool = False, on_token: Callable | None = None) -> None:
    """Our model: prompts of one length prefill together into their first samples' rows, copied
    to the other samples'; then every row decodes at its own position."""
    device = model_device(model)
    lengths = torch.tensor([len(p) for p in prompts for _ in range(n)], device=device)
    max_len = min(model.config.context_length, int(lengths.max()) + sampling.max_new_tokens)
    decoder = Decoder(model, len(rows), max_len, compile)
    logits = torch.empty(len(rows), model.config.vocab_size, device=device)
    for length in sorted(set(map(len, prompts))):
        group = [i for i, p in enumerate(prompts) if len(p) == length]
        first = torch.tensor([i * n for i in group], device=device)
        last = prefill(model, decoder.cache, torch.tensor([prompts[i] for i in group],
                                                          device=device), first).float()
        for j in range(n):
            logits[first + j] = last
        if n > 1:
            dest = torch.arange(1, n, device=device)[None] + first[:, None]
            decoder.cache.copy_rows(first.repeat_interleave(n - 1), dest.flatten())
    positions, furthest = lengths - 1, max(map(len, prompts)) - 1  # the latter on the host

    def advance(tokens: Tensor) -> Tensor:  # no host sync: the sampler's is the only one
        nonlocal positions, furthest
        positions, furthest = (positions + 1).clamp(max=max_len - 1), furthest + 1
        return decoder.decode(tokens, positions, min(max_len, furthest + 1))

    decode_loop(rows, logits, advance, tokenizer, sampling, generator, on_token)


def model_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Our TransformerLM returns logits; a Hugging Face model, an object holding .logits."""
    out = model(input_ids)
    return out if isinstance(out, Tensor) else out.logits


def generate_recompute(model, prompts: list[list[int]], rows: list[Generation], n: int,
                       tokenizer, sampling: Sampling, generator: torch.Generator | None,
                       on_token: Callable | None = None) -> None:
    """Any causal LM (and Hyena): each step re-runs the whole forward. Prompts of one length form
    a batch: equally long forever, no padding."""
    for length in sorted(set(map(len, prompts))):
        group = [i * n + j for i, p in enumerate(prompts) if len(p) == length for j in range(n)]
        ids = torch.tensor([prompts[r // n] for r in group], device=model_device(model))

        def advance(tokens: Tensor) -> Tensor:
            nonlocal ids
            ids = torch.cat((ids, tokens[:, None]), dim=1)
            return model_logits(model, ids)[:, -1]

        decode_loop([rows[r] for r in group], model_logits(model, ids)[:, -1], advance,
                    tokenizer, sampling, generator,
                    on_token and (lambda i, row: on_token(group[i], row)))


def generate_batch(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                   n: int = 1, max_new_tokens: int = 128, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float = 1.0, stop: Sequence[str] = (),
                   include_stop: bool = False, min_tokens: int = 0, eos_id: int | None = None,
                   seed: int | None = None, return_logprobs: bool = False, compile: bool = False,
                   on_token: Callable[[int, Generation], None] | None = None
                   ) -> list[list[Completion]]:
    """Continue every prompt (a string, or token ids) n times: result[i][j] is sample j of
    prompt i. Each sequence stops on its own: at eos (eos_id, by default the tokenizer's), at the
    first stop string, or after max_new_tokens (or a full context); neither eos nor a stop string
    before min_tokens. Greedy at temperature 0; a seed makes the draws reproducible. model: our
    TransformerLM (static KV cache; compile: a compiled step and CUDA graph) or any causal LM
    returning logits (recomputed each step). on_token(i * n + j, generation) after each token."""
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of lists of token ids")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got {n} and {max_new_tokens}")
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, stop, include_stop, min_tokens,
                        eos_of(tokenizer) if eos_id is None else eos_id, return_logprobs)
    ids = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    if empty := [i for i, p in enumerate(ids) if not p]:
        raise ValueError(f"prompt {empty[0]} is empty: give at least one token")
    ours = isinstance(model, TransformerLM)
    context = model.config.context_length if ours else math.inf
    if too_long := [i for i, p in enumerate(ids) if len(p) >= context]:
        raise ValueError(f"prompt {too_long[0]} has {len(ids[too_long[0]])} tokens; the context "
                         f"holds {context}, with room for at least one new token")
    rows = [Generation(i, min(max_new_tokens, context - len(p)))
            for i, p in enumerate(ids) for _ in range(n)]
    generator = None if seed is None else torch.Generator(model_device(model)).manual_seed(seed)
    with torch.no_grad():
        if ours and model.config.mixer != "hyena":
            generate_cached(model, ids, rows, n, tokenizer, sampling, generator, compile,
                            on_token)
        else:
            generate_recompute(model, ids, rows, n, tokenizer, sampling, generator, on_token)
    return [[rows[i * n + j].completion(sampling) for j in range(n)] for i in range(len(ids))]


# 4. Continuous batching over a paged KV cache -----------------------------------------------------
# A static batch waits for its longest sequence and reserves max_len slots a row. A paged cache
# (vLLM) pools fixed-size blocks of keys and values: a sequence's block table lists the blocks it
# filled, and attention gathers them. Continuous batching (Orca) admits waiting requests as soon as
# rows and blocks free up, and retires each sequence at the step it finishes.
class PagedCache:
    """Buffers (num_blocks, block_size, ...) per layer for up to max_seqs sequences. Sequence r's
    logical block i (positions i*P .. i*P + P-1) is physical block tables[r, i]; block 0 is never
    handed out (unused entries point to it, masked). Blocks count their references: the n samples
    of a prompt share its blocks, and a shared block is copied before one writes to it."""
    def __init__(self, model: TransformerLM, num_blocks: int, block_size: int, max_seqs: int,
                 max_blocks_per_seq: int) -> None:
        if not all(caches_keys(layer.attn) for layer in model.layers):
            raise NotImplementedError("a paged cache needs softmax attention (keys per token)")
        self.block_size, self.window = block_size, model.config.sliding_window
        self.layers = StaticCache(model, num_blocks, block_size).layers  # (blocks, P, ...)
        self.tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.long,
                                  device=model_device(model))
        self.owned: list[list[int]] = [[] for _ in range(max_seqs)]  # the tables, on the host
        self.refs, self.free = [0] * num_blocks, list(range(num_blocks - 1, 0, -1))

    def share(self, source: int, dest: int) -> None:
        """dest starts with source's blocks (the prompt they have in common)."""
        self.owned[dest] = list(self.owned[source])
        self.tables[dest] = self.tables[source]
        for block in self.owned[source]:
            self.refs[block] += 1

    def prepare_write(self, seq: int, position: int) -> int:
        """Make position's block writable for seq: a new block at a boundary, a private copy of a
        shared one (copy-on-write). Returns the blocks taken from the pool (0 or 1)."""
        logical, owned = position // self.block_size, self.owned[seq]
        shared = owned[logical] if logical < len(owned) else None
        if shared is not None and self.refs[shared] == 1:
            return 0
        block = self.free.pop()
        self.refs[block], self.tables[seq, logical] = 1, block
        owned[logical: logical + 1] = [block]
        if shared is not None:
            self.refs[shared] -= 1
            for buffer in (b for layer in self.layers for b in layer.values()):
                buffer[block] = buffer[shared]
        return 1

    def release(self, seq: int) -> None:
        for block in self.owned[seq]:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free.append(block)
        self.owned[seq] = []

    def begin(self, positions: Tensor, rows: Tensor, kv_len: int) -> Tensor:
        """As StaticCache.begin for sequences rows, reading their first ceil(kv_len / P) blocks."""
        table = self.tables[rows]
        self.write_at = (table.gather(1, positions // self.block_size),
                         positions % self.block_size)
        self.read_table = table[:, : -(-kv_len // self.block_size)]
        slots = torch.arange(self.read_table.shape[1] * self.block_size, device=rows.device)
        return causal_mask(slots.expand(len(rows), -1), positions, self.window)

    def write(self, buffer: Tensor, values: Tensor) -> None:
        buffer.index_put_(self.write_at, values.to(buffer.dtype))

    def read(self, buffer: Tensor) -> Tensor:
        return buffer[self.read_table].flatten(1, 2)  # (B, blocks * P, ...)


@dataclass
class Request:
    prompt: list[int]  # token ids
    max_new_tokens: int
    n: int = 1  # samples, sharing the prompt's blocks


def serve(model: TransformerLM, tokenizer, requests: list[Request], sampling: Sampling,
          max_seqs: int = 64, block_size: int = 16, generator: torch.Generator | None = None,
          continuous: bool = True) -> list[list[Generation]]:
    """Each step: admit waiting requests in order while rows and blocks are free (prefilled, their
    n samples sharing the blocks); decode one token for every running sequence; free finished
    ones. Admission reserves the blocks a request may need, so nothing waits for memory (vLLM
    admits more and preempts). continuous=False, the baseline: admit only into an empty batch."""
    device, P, context = model_device(model), block_size, model.config.context_length
    if (longest := max(len(r.prompt) + r.max_new_tokens for r in requests)) > context:
        raise ValueError(f"a request needs {longest} positions; the context holds {context}")
    # block 0 is never handed out; admission reserves a partial last prompt block twice (shared,
    # then each sample's copy), so a lone request may take one block more than its positions
    cache = PagedCache(model, max_seqs * -(-longest // P) + 2, P, max_seqs, -(-longest // P))
    results = [[Generation(i, r.max_new_tokens) for _ in range(r.n)]
               for i, r in enumerate(requests)]
    waiting, free_rows = list(range(len(requests)))[::-1], list(range(max_seqs))[::-1]
    running: dict[int, tuple[Generation, int]] = {}  # row -> (sequence, prompt length)
    reserved: dict[int, int] = {}  # row -> blocks it may still take
    while waiting or running:
        admitting = continuous or not running
        while waiting and admitting:
            request = requests[waiting[-1]]
            length, n = len(request.prompt), request.n
            own = -(-(length + request.max_new_tokens) // P) - length // P  # per sample, at most
            if n > max_seqs:
                raise ValueError(f"request {waiting[-1]} has n={n} > max_seqs={max_seqs}")
            available = len(cache.free) - sum(reserved.values())
            if len(free_rows) < n or available < -(-length // P) + n * own:
                break
            index, rows = waiting.pop(), [free_rows.pop() for _ in range(n)]
            for position in range(0, length, P):  # the prompt's blocks
                cache.prepare_write(rows[0], position)
            logits = forward_cached(model, cache, torch.tensor([request.prompt], device=device),
                                    torch.arange(length, device=device)[None],
                                    torch.tensor(rows[:1], device=device), length, True)[:, -1]
            for row, sequence in zip(rows, results[index]):
                if row != rows[0]:
                    cache.share(rows[0], row)
                running[row], reserved[row] = (sequence, length), own
                tokens, logprobs = choose_tokens(logits, [sequence], sampling, generator)
                sequence.add(int(tokens[0]), logprobs[0], tokenizer, sampling)
        for row in [r for r, (sequence, _) in running.items() if sequence.finish_reason]:
            cache.release(row)
            del running[row], reserved[row]
            free_rows.append(row)
        if not running:
            continue
        rows, sequences = list(running), [sequence for sequence, _ in running.values()]
        positions = [start + len(seq.ids) - 1 for seq, start in running.values()]  # last token
        for row, position in zip(rows, positions):
            reserved[row] -= cache.prepare_write(row, position)
        last = torch.tensor([[s.ids[-1]] for s in sequences], device=device)
        logits = forward_cached(model, cache, last, torch.tensor(positions, device=device)[:, None],
                                torch.tensor(rows, device=device), max(positions) + 1)[:, 0]
        tokens, logprobs = choose_tokens(logits, sequences, sampling, generator)
        for sequence, token, logprob in zip(sequences, tokens.tolist(), logprobs):
            sequence.add(token, logprob, tokenizer, sampling)
    return results


# 5. Speculative decoding: a small draft proposes, the target checks k tokens in one forward -------
# Decode is memory-bound, so the target scores k + 1 positions for about the price of one. Draft
# tokens x_i ~ q_i pass with probability min(1, p_i(x) / q_i(x)); the first rejected one is redrawn
# from norm(max(0, p_i - q_i)), and if all k pass a bonus token comes from p_{k+1}. Every token then
# has exactly the target's distribution, whatever the draft; a good draft only lets more pass.
def speculative_accept(p: Tensor, q: Tensor, draft: Tensor,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """For B rows: target distributions p (B, k+1, V), the draft's q (B, k, V), draft tokens
    (B, k) drawn from q. Returns (drafts accepted (B,), the next token (B,))."""
    k = draft.shape[1]
    p_draft = p[:, :k].gather(-1, draft[..., None])[..., 0]  # (B, k)
    q_draft = q.gather(-1, draft[..., None])[..., 0]
    uniform = torch.rand(draft.shape, device=p.device, generator=generator)
    accepted = (uniform * q_draft < p_draft).long().cumprod(-1).sum(-1)  # u < p/q, leading ones
    # q_{k+1} = 0 makes the bonus the same formula: norm(max(0, p_{k+1} - 0)) = p_{k+1}
    q = torch.cat((q, torch.zeros_like(q[:, :1])), dim=1)
    rows = torch.arange(len(draft), device=p.device)
    residual = (p[rows, accepted] - q[rows, accepted]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, accepted])
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


def speculative_generate(target: TransformerLM, draft: TransformerLM, prompt: list[int],
                         max_new_tokens: int, k: int = 4, temperature: float = 1.0,
                         top_k: int | None = None, top_p: float = 1.0,
                         eos_id: int | None = None, generator: torch.Generator | None = None,
                         compile: bool = False) -> tuple[list[int], Counter]:
    """Continue one prompt with the target's distribution, k draft tokens per target forward;
    stats: draft tokens proposed and accepted, rounds (target forwards), and the seconds and
    tokens after the first round (which compiles and captures both steps): the steady speed.
    A rejected suffix needs no undo: a slot holding a later position stays masked until it is
    rewritten (so softmax attention only: a linear-attention state cannot forget)."""
    check_sampling(temperature, top_k, top_p)
    if not all(caches_keys(layer.attn) for model in (target, draft) for layer in model.layers):
        raise ValueError("speculative decoding rolls caches back: it needs softmax attention")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the "
                         f"target's ({target.config.vocab_size})")
    max_len = len(prompt) + max_new_tokens + k + 1
    if max_len > min(target.config.context_length, draft.config.context_length):
        raise ValueError(f"prompt + max_new_tokens + k + 1 = {max_len} exceeds a context length")
    device = model_device(target)
    proposer = Decoder(draft, 1, max_len, compile)
    verifier = Decoder(target, 1, max_len, compile, tokens_per_step=k + 1)
    # No wait for the GPU inside a round: the position, the last token, the output and the count
    # stay on the device, so Python queues the next round while the GPU runs this one (on an H200
    # a round of a 24 x 1,024 target took 1.76 ms this way, 1.96-2.10 waiting every round).
    ids, steps = torch.tensor(prompt, device=device), torch.arange(k + 1, device=device)
    out = torch.zeros(max_new_tokens + k + 1, dtype=torch.long, device=device)
    count, passed_sum = (torch.zeros(1, dtype=torch.long, device=device) for _ in range(2))
    position, last = torch.full((1,), len(prompt) - 1, device=device), ids[-1:]
    stats, done = Counter(), 0
    with torch.no_grad():
        if len(prompt) > 1:
            prefill(target, verifier.cache, ids[None, :-1])
            prefill(draft, proposer.cache, ids[None, :-1])
        while done < max_new_tokens:
            # A chunk of rounds, then one wait. The first round goes alone: it compiles and
            # captures the steps, and the steady clock starts after it. Then as many rounds as
            # cannot pass max_new_tokens (each makes at most k + 1 tokens; at least one, whose
            # surplus is cut at the end), and at most 8 when an end-of-text would stop us early.
            rounds = max(1, (max_new_tokens - done) // (k + 1)) if done else 1
            for _ in range(min(rounds, 8) if eos_id is not None else rounds):
                tokens, q = [last], []
                for i in range(k + 1):
                    logits = proposer.decode(tokens[-1], position + i)
                    if i == k:  # this step only writes the k-th draft's keys and values, so
                        break  # when all k pass, the draft's cache is already up to date
                    if temperature == 0:  # greedy needs no distributions: far fewer kernels a
                        tokens.append(logits.argmax(-1))  # round, and on a GPU each launch costs
                    else:
                        q.append(probabilities(logits, temperature, top_k, top_p))
                        tokens.append(torch.multinomial(q[-1], 1, generator=generator)[0])
                tokens = torch.cat(tokens)  # (k + 1,): the last token and k drafts
                logits = verifier.decode(tokens[None], (position + steps)[None])
                if temperature == 0:  # one-hot p and q: drafts equal to the argmax pass
                    made = logits[0].argmax(-1)  # [:passed]: the drafts; [passed]: the next
                    passed = (made[:k] == tokens[1:]).long().cumprod(0).sum().view(1)
                else:
                    passed, token = speculative_accept(
                        probabilities(logits, temperature, top_k, top_p), torch.stack(q, 1),
                        tokens[None, 1:], generator)
                    made = torch.where(steps < passed, torch.cat((tokens[1:], token)), token)
                # All k + 1 written: those past the round's passed + 1 are overwritten next round.
                out.scatter_(0, count + steps, made)
                last = made.gather(0, passed)
                count += passed + 1
                position += passed + 1
                passed_sum += passed
                stats["rounds"] += 1
            before, done = done, int(count)  # the one wait for the GPU per chunk of rounds
            if stats["rounds"] == 1:  # the clock is honest: int() waited for the GPU
                first_round = time.perf_counter(), done
            if eos_id is not None and eos_id in out[before:done].tolist():
                break  # (the stats count the chunk's rounds after it)
        stats.update(proposed=k * stats["rounds"], accepted=int(passed_sum))
        if stats["rounds"] > 1:
            stats.update(steady_seconds=time.perf_counter() - first_round[0],
                         steady_tokens=done - first_round[1])
    new = out[:min(done, max_new_tokens)].tolist()
    return new[: new.index(eos_id) + 1 if eos_id in new else len(new)], stats


# 6. Weight-only quantization: fewer bytes per weight, so fewer bytes per decode step --------------
# Decode time is bytes / bandwidth, so 8- or 4-bit weights (multiplied in bf16) approach 2x or 4x
# where weights dominate the bytes. Symmetric round-to-nearest: int8 with one scale per output
# channel; int4 with one scale per group of inputs, lest a row's outliers flatten its 15 levels.
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (int8 q, scale (out,)) with W ~ q * scale[:, None]."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    return (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (two 4-bit codes per byte (out, in / 2), scale (out, in / group)) with
    W ~ (code - 8) * its group's scale."""
    groups = weight.float().unflatten(1, (-1, group_size))  # (out, in / group, group)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7
    codes = ((groups / scale[..., None]).round().clamp(-8, 7) + 8).to(torch.uint8).flatten(1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale


def dequantize_int4(packed: Tensor, scale: Tensor, group_size: int) -> Tensor:
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(1)  # (out, in)
    groups = (codes.to(scale.dtype) - 8).unflatten(1, (-1, group_size))
    return (groups * scale[..., None]).flatten(1)


class QuantLinear(nn.Module):
    """model.py's Linear with int8 (per channel) or int4 (grouped) weights. int8 scales after the
    matmul, so under torch.compile the int8 -> bf16 conversion can fuse into the matmul's loads;
    int4 dequantizes at every call (readable; a fused kernel would unpack in registers)."""
    def __init__(self, linear: Linear, bits: int, group_size: int = 128) -> None:
        super().__init__()
        weight, self.bits, self.group_size = linear.weight.detach(), bits, group_size
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        q, scale = quantize_int8(weight) if bits == 8 else quantize_int4(weight, group_size)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def dequantized(self) -> Tensor:
        if self.bits == 8:
            return self.weight.to(self.scale.dtype) * self.scale[:, None]
        return dequantize_int4(self.weight, self.scale, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 8:
            y = (x @ self.weight.to(x.dtype).T) * self.scale.to(x.dtype)
        else:
            y = x @ self.dequantized().to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_model(model: TransformerLM, bits: int, group_size: int = 128) -> TransformerLM:
    """Replace in place every Linear (whose input width the group divides) by a QuantLinear; a
    tied head gets its own quantized copy, the embedding lookup stays as it is."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) and (bits == 8 or child.weight.shape[1] % group_size == 0):
                setattr(module, name, QuantLinear(child, bits, group_size))
    return model


def weight_bytes(model: TransformerLM) -> int:
    """Weight bytes a decode step reads: all but lookup tables (B rows each), a tied head once."""
    lookups = [model.token_embeddings.weight, getattr(model, "sinusoidal", None),
               getattr(getattr(model, "position_embeddings", None), "weight", None),
               *((model.rope.cos, model.rope.sin) if model.rope is not None else ())]
    skip = {id(t) for t in lookups if t is not None and t is not model.lm_head.weight}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def perplexity(model: nn.Module, tokens: Tensor, context: int, max_windows: int = 32) -> float:
    """exp(mean cross-entropy) over up to max_windows disjoint windows of held-out tokens."""
    windows = min(max_windows, (len(tokens) - 1) // context)
    if windows < 1:
        raise ValueError(f"{len(tokens)} held-out tokens are fewer than a window of {context + 1}")
    x, y = (tokens[i: i + windows * context].view(windows, context).to(model_device(model))
            for i in (0, 1))
    logits = torch.cat([model(x[i: i + 4]).float() for i in range(0, windows, 4)])
    return math.exp(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())


# 7. Checkpoints: ours from train.py, and GPT-2's in Hugging Face's layout -------------------------
def find_tokenizer(state: dict, tokenizer_dir: str = "") -> tuple[Tokenizer, Path]:
    """A checkpoint's tokenizer and its folder: --tokenizer_dir, the run's tokenizer_dir, or the
    folder under its cache_dir with the fingerprint the checkpoint holds."""
    config, fingerprint = state.get("config", {}), state.get("tokenizer")
    folders = [Path(d) for d in (tokenizer_dir, config.get("tokenizer_dir", "")) if d]
    folders += [] if tokenizer_dir else sorted(Path(config.get("cache_dir", "data_cache"))
                                               .glob("*/bpe*"))
    for folder in folders:
        if (folder / "vocab.json").exists():
            tokenizer = Tokenizer.from_dir(folder)
            if tokenizer_dir or fingerprint in (None, tokenizer.fingerprint()):
                return tokenizer, folder
    raise FileNotFoundError(f"no tokenizer with the checkpoint's fingerprint {fingerprint} in "
                            f"{', '.join(map(str, folders)) or 'data_cache/'}: pass "
                            "--tokenizer_dir=DIR (the folder train.py trained it in)")


def load_checkpoint_model(path: str, tokenizer_dir: str = "") -> tuple[TransformerLM, Tokenizer]:
    """A train.py checkpoint as (model on the CPU, tokenizer), or an error naming what misfits."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python train.py` "
                                "(it writes out/ckpt.pt), or pass --ckpt=PATH or --hf_dir=DIR")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or not {"model", "model_config"} <= state.keys():
        raise ValueError(f"{path} is not a train.py checkpoint (no model or model_config)")
    try:
        model = TransformerLM(ModelConfig(**state["model_config"]))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its model config does not fit this model.py: {error}") from None
    model.load_state_dict(state["model"])  # names any missing or mis-shaped weight
    tokenizer = find_tokenizer(state, tokenizer_dir)[0]
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"{path} has vocab_size={model.config.vocab_size} but its tokenizer "
                         f"has {tokenizer.vocab_size} ids: another vocabulary")
    return model.eval(), tokenizer


GPT2_SHAPES = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16),  # layers, width, heads
               "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25)}


def gpt2_config(num_layers: int, d_model: int, num_heads: int, vocab_size: int = 50257,
                context_length: int = 1024, d_ff: int | None = None,
                norm_eps: float = 1e-5) -> ModelConfig:
    """GPT-2 as a ModelConfig: pre-LayerNorm, biases, tanh-GELU, learned positions, tied head."""
    return ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=d_model,
                       num_layers=num_layers, num_heads=num_heads, d_ff=d_ff or 4 * d_model,
                       norm="layernorm", norm_eps=norm_eps, ffn="gelu_tanh", positions="learned",
                       tie_weights=True, bias=True)


def gpt2_state_dict(hf: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Hugging Face's GPT-2 names -> ours. Its Conv1D stores W as (in, out), so each matrix is
    transposed; c_attn holds q, k and v side by side."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    ours = {"token_embeddings.weight": hf["wte.weight"], "lm_head.weight": hf["wte.weight"],
            "position_embeddings.weight": hf["wpe.weight"]}
    names = [("ln_f", "ln_final")] + [
        (f"h.{i}.{theirs}", f"layers.{i}.{mine}") for i in range(num_layers)
        for theirs, mine in (("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_proj", "attn.output_proj"),
                             ("mlp.c_fc", "ffn.w1"), ("mlp.c_proj", "ffn.w2"))]
    for theirs, mine in names:
        weight, ours[f"{mine}.bias"] = hf[f"{theirs}.weight"], hf[f"{theirs}.bias"]
        ours[f"{mine}.weight"] = weight.T if weight.dim() == 2 else weight
    for i in range(num_layers):
        weights = hf[f"h.{i}.attn.c_attn.weight"].T.chunk(3)
        for name, weight, bias in zip("qkv", weights, hf[f"h.{i}.attn.c_attn.bias"].chunk(3)):
            ours[f"layers.{i}.attn.{name}_proj.weight"] = weight
            ours[f"layers.{i}.attn.{name}_proj.bias"] = bias
    return {k: v.contiguous() for k, v in ours.items()}


def load_gpt2(folder: str | Path) -> tuple[TransformerLM, Tokenizer]:
    """A GPT-2 folder in Hugging Face's layout as our (TransformerLM, Tokenizer)."""
    folder = Path(folder)
    if missing := [n for n in ("config.json", "vocab.json", "merges.txt")
                   if not (folder / n).exists()]:
        raise FileNotFoundError(f"GPT-2 folder {folder} lacks {', '.join(missing)}")
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type", "gpt2") != "gpt2" or hf.get("scale_attn_by_inverse_layer_idx") or \
            hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{folder / 'config.json'} is not a plain GPT-2")
    config = gpt2_config(hf["n_layer"], hf["n_embd"], hf["n_head"], hf["vocab_size"],
                         hf["n_positions"], hf.get("n_inner"), hf.get("layer_norm_epsilon", 1e-5))
    if (folder / "model.safetensors").exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError(f"{folder}/model.safetensors needs: pip install safetensors") from None
        weights = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").exists():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} lacks model.safetensors and pytorch_model.bin")
    try:
        state = gpt2_state_dict(weights, config.num_layers)
    except KeyError as error:
        raise ValueError(f"{folder}: the weights lack {error.args[0]}") from None
    model = TransformerLM(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    tokenizer = Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt", [EOT])
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{folder}: vocab.json has {tokenizer.vocab_size} tokens, config.json "
                         f"{config.vocab_size}")
    return model.eval(), tokenizer


# 8. The lecture's arithmetic: what the memory bandwidth allows ------------------------------------
# A decode step reads every weight and every sequence's KV cache once, and does 2 FLOPs per weight
# per sequence. With B sequences of S tokens:
#   bytes = weights + B * S * kv_bytes_per_token      time >= bytes / bandwidth
#   flops = B * (2 * params + 4 * layers * S * d)     time >= flops / peak
# Batching shares the weight reads, so tokens/s grows with B until the cache dominates the bytes
# (or fills the memory); decode turns compute-bound only if a sequence's matmul time exceeds the
# time to read its cache, which a long cache prevents.
GPUS = {"H100": dict(bandwidth=3.35e12, peak_flops=989e12, memory=80e9),  # data sheets: HBM B/s,
        "H200": dict(bandwidth=4.8e12, peak_flops=989e12, memory=141e9),  # dense bf16 FLOP/s,
        "A100": dict(bandwidth=2.0e12, peak_flops=312e12, memory=80e9)}  # bytes of memory
LLAMA2_13B = dict(vocab_size=32000, context_length=4096, d_model=5120, num_layers=40,
                  num_heads=40, d_ff=13824)  # the lecture's example: MHA, SwiGLU, untied head


def kv_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> int:
    """Cache bytes a token adds over all layers: K and V per KV head, or MLA's latent and RoPE
    key; linear attention and Hyena none (a fixed state, or no cache)."""
    if config.mixer != "attention":
        return 0
    if config.kv_latent_dim is not None:
        return config.num_layers * (config.kv_latent_dim + config.rope_dim) * bytes_per_value
    return (config.num_layers * 2 * (config.num_kv_heads or config.num_heads) * config.head_dim
            * bytes_per_value)


def decode_roofline(config: ModelConfig, batch_size: int, seq_len: int, bandwidth: float,
                    peak_flops: float, bytes_per_param: float = 2) -> dict:
    """One decode step by the lecture's count: memory held (every weight, plus the cache), time
    and tokens/s, what bounds it, and the batch from which it would be compute-bound."""
    params = count_params(config)["total"]
    weights, kv = params * bytes_per_param, seq_len * kv_bytes_per_token(config)
    flops = 2 * params + 4 * config.num_layers * seq_len * config.d_model  # per sequence
    memory_time = (weights + batch_size * kv) / bandwidth
    compute_time = batch_size * flops / peak_flops
    per_sequence = flops / peak_flops - kv / bandwidth  # compute-bound once B * this > weights/bw
    return {"memory": weights + batch_size * kv, "step": max(memory_time, compute_time),
            "tokens_per_s": batch_size / max(memory_time, compute_time),
            "bound": "memory" if memory_time >= compute_time else "compute",
            "compute_bound_from": (weights / bandwidth / per_sequence if per_sequence > 0
                                   else math.inf)}


def roofline_command(cfg: dict) -> None:
    """The lecture's Llama-2-13B table, batch by batch, on the chosen GPU."""
    gpu, seq_len, config = cfg["gpu"], cfg["seq_len"], ModelConfig(**LLAMA2_13B)
    if gpu not in GPUS:
        raise UsageError(f"unknown --gpu={gpu}; choose from {', '.join(GPUS)}")
    hw = GPUS[gpu]
    print(f"Llama-2-13B: {count_params(config)['total'] / 1e9:.2f}B parameters on {gpu} ("
          f"{hw['bandwidth'] / 1e12:.2f} TB/s, {hw['peak_flops'] / 1e12:.0f} TFLOP/s, "
          f"{hw['memory'] / 1e9:.0f} GB); bf16 weights and cache, {seq_len} tokens a sequence, "
          f"{kv_bytes_per_token(config) / 1e6:.2f} MB of cache a token")
    print(f"{'batch':>6} {'memory GB':>10} {'fits':>5} {'ms/step':>8} {'tokens/s':>10} bound")
    for batch in cfg["batch_sizes"]:
        r = decode_roofline(config, batch, seq_len, hw["bandwidth"], hw["peak_flops"])
        fits = "yes" if r["memory"] <= hw["memory"] else "no"
        print(f"{batch:>6} {r['memory'] / 1e9:>10.1f} {fits:>5} {r['step'] * 1e3:>8.2f} "
              f"{r['tokens_per_s']:>10,.0f} {r['bound']}")
    bound = [decode_roofline(config, 1, s, hw["bandwidth"], hw["peak_flops"])["compute_bound_from"]
             for s in (seq_len, 0)]
    print(f"compute-bound from batch {bound[0]:,.0f} with this cache (inf: never, a sequence's "
          f"cache takes longer to read than its matmuls to run), {bound[1]:,.0f} without")


# The benchmark: `python infer.py bench` -----------------------------------------------------------
def timed(fn: Callable, device: torch.device, warmup: bool = True) -> float:
    """Seconds of one call of fn (after a warm-up call), waiting for the GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(2 if warmup else 1):  # the last call is timed
        sync()
        start = time.perf_counter()
        fn()
        sync()
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s (read + write) of a large on-device copy: the bandwidth decode can hope for."""
    source = torch.empty((1 << 30) if device.type == "cuda" else (64 << 20), dtype=torch.uint8,
                         device=device)
    dest = torch.empty_like(source)
    return 2 * source.numel() * 10 / timed(lambda: [dest.copy_(source) for _ in range(10)], device)


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters in dtype (a decode step should read 2-byte weights, not cast 4-byte ones under
    autocast); the RoPE and position tables, buffers, stay float32."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def measure_decode(model: TransformerLM, batch_size: int, prompt_len: int, new_tokens: int,
                   compile: bool, profile: bool = False, fused: bool | None = None,
                   tokens_per_step: int = 1) -> dict:
    """Prefill a random batch, time the first decode step (it compiles and captures) apart, then
    time greedy steps chained inside the step: nothing leaves the GPU between them, so the time
    is the GPU's. bytes: what a step reads, every weight and every cache slot. tokens_per_step
    > 1: steps as speculative decoding's verifier takes them (their cache as long as its)."""
    device, per = model_device(model), tokens_per_step
    decoder = Decoder(model, batch_size, prompt_len + new_tokens + per - 1, compile, greedy=True,
                      fused=fused, tokens_per_step=per)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device=device)
    first = prompt_len + torch.arange(per, device=device).expand(batch_size, per)
    with torch.no_grad():
        tokens = []  # the warm-up prefill fills the same slots with the same values
        ttft = timed(lambda: tokens.append(prefill(model, decoder.cache, prompt).argmax(-1)),
                     device)
        setup = timed(lambda: decoder.decode(tokens[-1][:, None].expand(-1, per), first), device,
                      warmup=False)
        step = timed(lambda: [decoder.decode() for _ in range(new_tokens - 1)], device,
                     warmup=False) / (new_tokens - 1)
    kv_bytes = sum(b.numel() * b.element_size() for layer in decoder.cache.layers
                   for b in layer.values())
    return {"ttft": ttft, "step": step, "setup": setup, "mode": decoder.mode,
            "bytes": weight_bytes(model) + kv_bytes,
            "profile": profile_decode(decoder, step) if profile else ""}


def profile_decode(decoder: Decoder, step: float, steps: int = 20) -> str:
    """Where a greedy step's time goes: its kernels (CPU ops without a GPU) per step, their busy
    time against the step's, and the five slowest. Busy far below the step: launch gaps."""
    cuda, kind = decoder.token_ids.is_cuda, "CUDA" if decoder.token_ids.is_cuda else "CPU"
    activity = getattr(torch.profiler.ProfilerActivity, kind)
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(steps):
            decoder.decode()
        if cuda:
            torch.cuda.synchronize()

    def busy(event) -> float:  # microseconds a step
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / steps

    events = sorted((e for e in prof.key_averages()
                     if e.device_type == getattr(torch.autograd.DeviceType, kind)),
                    key=busy, reverse=True)
    head = (f"    {sum(e.count for e in events) / steps:.0f} {'kernels' if cuda else 'ops'} a "
            f"step, busy {sum(map(busy, events)):,.0f} us of {step * 1e6:,.0f} us; the slowest:")
    return "\n".join([head] + [f"    {busy(e):>8,.1f} us {e.count / steps:>5.1f}x  {e.key[:70]}"
                               for e in events[:5]])


def tokens_per_round(acceptance: float, k: int) -> float:
    """Expected tokens a round when each draft passes with this probability, independently:
    1 + a + ... + a^k (Leviathan et al.: the accepted drafts, and one token from the target)."""
    return sum(acceptance ** i for i in range(k + 1))


def speculative_speed(target: TransformerLM, draft: TransformerLM, prompt: list[int],
                      new_tokens: int, k: int, compile: bool, **sampling) -> tuple[list[int], str]:
    """speculative_generate's tokens, and a report: its speed against plain decoding, both after
    their first step, which compiles, captures and tunes (timing it made a trained pair on an
    H200 look hundreds of times slower); then where a round's time goes, and the tokens a round
    (and the acceptance) at which speculation would pay: a round must make more tokens than
    plain decoding makes in the same time."""
    start = time.perf_counter()
    ids, stats = speculative_generate(target, draft, prompt, new_tokens, k, compile=compile,
                                      **sampling)
    seconds, tokens = stats["steady_seconds"], stats["steady_tokens"]
    if not seconds:  # one round in all: nothing but it to time
        seconds, tokens = time.perf_counter() - start, len(ids)
    plain = measure_decode(target, 1, len(prompt), max(2, len(ids)), compile)["step"]
    # tokens the rounds made, with any surplus past max_new_tokens or an end-of-text
    rate = stats["accepted"] / stats["proposed"]
    per_round = (stats["accepted"] + stats["rounds"]) / stats["rounds"]
    report = (f"acceptance {rate:.2f}, {per_round:.2f} tokens a target forward, "
              f"{tokens / seconds:,.1f} tokens/s against {1 / plain:,.1f} plain "
              f"({plain * tokens / seconds:.2f}x)")
    if stats["rounds"] == 1:  # its time includes compiling: nothing to split
        return ids, report
    # the steps timed alone, with caches as long as speculative_generate's (a step reads them all)
    drafting = measure_decode(draft, 1, len(prompt), new_tokens + k + 1, compile)["step"]
    verify = measure_decode(target, 1, len(prompt), new_tokens + 1, compile,
                            tokens_per_step=k + 1)["step"]
    round_s = seconds / (stats["rounds"] - 1)
    need = round_s / plain  # tokens a round must make to beat plain decoding
    low, high = 0.0, 1.0  # the acceptance that makes them: tokens_per_round rises with it
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if tokens_per_round(mid, k) < need else (low, mid)
    pays = (f" (acceptance {high:.2f})" if need <= k + 1 else
            f": more than k + 1 = {k + 1}, so not at any acceptance")
    return ids, (f"{report}\n  a round {round_s * 1e3:.3f} ms: {k + 1} draft steps of "
                 f"{drafting * 1e3:.3f}, a verify step ({k + 1} tokens) of {verify * 1e3:.3f}, "
                 f"the rest {(round_s - (k + 1) * drafting - verify) * 1e3:.3f} (the accept "
                 f"rule, launches, waits); a plain step {plain * 1e3:.3f} ms, so speculation "
                 f"pays above {need:.2f} tokens a round{pays}")


def quantization_table(model: TransformerLM, group_size: int, prompt_len: int, new_tokens: int,
                       compile: bool, held_out: Tensor | None = None) -> None:
    """Unquantized, int8 and int4 weights: bytes a decode step reads, batch-1 decode speed, and
    what is lost: perplexity on held-out tokens, or else the logits' error on random tokens."""
    x = torch.randint(0, model.config.vocab_size, (4, prompt_len), device=model_device(model))
    print(f"{'weights':>12} {'GB a step':>9} {'decode tok/s':>12} {'speed-up':>8}  "
          + ("perplexity" if held_out is not None else "logits off, top-1 agrees"))
    base = reference = None
    for bits in (None, 8, 4):
        quantized = model if bits is None else quantize_model(copy.deepcopy(model), bits,
                                                               group_size)
        # fused=False: the fused step reads no int8/int4 weights, so all three rows compile
        r = measure_decode(quantized, 1, prompt_len, new_tokens, compile, fused=False)
        base = base or r
        if held_out is not None:
            context = min(256, model.config.context_length)
            quality = f"{perplexity(quantized, held_out, context):.2f}"
        else:
            with torch.no_grad():
                logits = quantized(x).float()
            reference = logits if reference is None else reference
            quality = (f"{float((logits - reference).norm() / reference.norm()):.1%}, "
                       f"{float((logits.argmax(-1) == reference.argmax(-1)).float().mean()):.1%}")
        name = {None: "unquantized", 8: "int8/channel", 4: f"int4/g{group_size}"}[bits]
        print(f"{name:>12} {r['bytes'] / 1e9:>9.3f} {1 / r['step']:>12,.0f} "
              f"{base['step'] / r['step']:>7.2f}x  {quality}", flush=True)


def bench(cfg: dict) -> None:
    """On one random model: decode speed by batch size against the copy bandwidth (--profile:
    where a step goes), transformers (--compare_hf), and unless --decode_only continuous
    batching, speculative decoding and quantization."""
    device, start = resolve_device(cfg["device"]), time.perf_counter()
    cuda, dtype = device.type == "cuda", resolve_dtype("auto", device)
    preset = cfg["preset"] or ("gpt2-medium" if cuda else "tiny")
    if preset not in {**GPT2_SHAPES, **PRESETS}:
        raise UsageError(f"unknown --preset={preset}; choose from GPT-2's own "
                         f"{', '.join(GPT2_SHAPES)} or model.py's {', '.join(PRESETS)}")
    # "auto" on CUDA compiles the decode steps of the target model, plain and quantized;
    # speculative decoding's two more models (draft, k+1-token verify) only with --compile=True
    compile = use_compile(cfg["compile"], device)
    for limit in ("cache_size_limit", "recompile_limit"):  # a graph per model and step shape
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    torch.manual_seed(0)
    config = (gpt2_config(*GPT2_SHAPES[preset]) if preset in GPT2_SHAPES
              else ModelConfig.preset(preset))
    model, hf_model = cast_weights(TransformerLM(config).to(device).eval(), dtype), None
    if cfg["compare_hf"] and preset in GPT2_SHAPES:  # transformers' model, our weights
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError:
            raise UsageError("--compare_hf needs: pip install transformers") from None
        hf_model = GPT2LMHeadModel(GPT2Config(
            n_layer=config.num_layers, n_embd=config.d_model, n_head=config.num_heads,
            vocab_size=config.vocab_size, n_positions=config.context_length)).to(device, dtype)
        hf_model.eval()  # no dropout
        model.load_state_dict(gpt2_state_dict(hf_model.state_dict(), config.num_layers))
    prompt_len = new_tokens = min(128, config.context_length // 4)
    bandwidth = copy_bandwidth(device)
    print(f"{preset}: {count_params(config)['total'] / 1e6:.0f}M parameters, "
          f"{str(dtype).removeprefix('torch.')} weights ({weight_bytes(model) / 1e9:.3f} GB read "
          f"a step), {torch.cuda.get_device_name(device) if cuda else 'CPU'}, measured copy "
          f"bandwidth {bandwidth / 1e9:,.0f} GB/s\n\nprefill {prompt_len} tokens, decode "
          f"{new_tokens} (greedy); roofline = batch x copy bandwidth / bytes read a step")
    print(f"{'batch':>5} {'TTFT ms':>8} {'prefill tok/s':>13} {'ms/token':>9} {'decode tok/s':>12} "
          f"{'GB/step':>8} {'GB/s':>6} {'of copy':>7} {'roofline tok/s':>14}  mode")
    results, runs = {}, []
    for batch in cfg["batch_sizes"] or ([1, 16, 64, 256] if cuda else [1, 4]):
        runs.append((batch, None))  # batch 1 on CUDA: the fused step, where the model allows
        if batch == 1 and cuda:
            runs.append((batch, False))  # and the compiled step beside it
    for batch, fused in runs:
        r = measure_decode(model, batch, prompt_len, new_tokens, compile, cfg["profile"], fused)
        results.setdefault(batch, r)  # transformers is compared with the first of a batch size
        print(f"{batch:>5} {r['ttft'] * 1e3:>8.1f} {batch * prompt_len / r['ttft']:>13,.0f} "
              f"{r['step'] * 1e3:>9.3f} {batch / r['step']:>12,.0f} {r['bytes'] / 1e9:>8.3f} "
              f"{r['bytes'] / r['step'] / 1e9:>6,.1f} {r['bytes'] / r['step'] / bandwidth:>7.1%} "
              f"{batch * bandwidth / r['bytes']:>14,.0f}  {r['mode']}, setup {r['setup']:.1f} s"
              + (f"\n{r['profile']}" if r["profile"] else ""), flush=True)
    if hf_model is not None:
        print(f"\ntransformers {sys.modules['transformers'].__version__} generate against ours, "
              f"tokens/s end to end ({prompt_len} + {new_tokens} tokens, greedy, same weights)")
        for batch, r in results.items():  # the batch sizes measured above: no compiling again
            prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
            with torch.no_grad():
                seconds = timed(lambda: hf_model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0), device)
            ours = batch * new_tokens / (r["ttft"] + new_tokens * r["step"])
            print(f"  batch {batch:>3}: transformers {batch * new_tokens / seconds:>8,.0f}, ours "
                  f"{ours:>8,.0f} ({ours * seconds / batch / new_tokens:.1f}x)", flush=True)
    if cfg["decode_only"]:
        return print(f"\n[{time.perf_counter() - start:.0f} s]")
    # serving: requests of mixed prompt and output lengths, static against continuous batching
    generator, top = torch.Generator().manual_seed(0), min(256, config.context_length // 2)
    num_requests, max_seqs = cfg["requests"] or (96 if cuda else 8), 32 if cuda else 4
    lengths = torch.stack((torch.randint(16, top + 1, (num_requests,), generator=generator),
                           torch.randint(16, top // 2 + 1, (num_requests,), generator=generator)),
                          1).tolist()
    requests = [Request(torch.randint(config.vocab_size, (p,), generator=generator).tolist(), m)
                for p, m in lengths]
    tokens = sum(m for _, m in lengths)
    print(f"\n[{time.perf_counter() - start:.0f} s]\nserving {num_requests} requests, prompts of "
          f"16-{top} tokens, outputs of 16-{top // 2} ({tokens:,} to generate), {max_seqs} at a "
          "time, paged cache of 16-token blocks")
    for continuous in (False, True):
        with torch.no_grad():
            seconds = timed(lambda: serve(model, None, requests, Sampling(top, temperature=0),
                                          max_seqs, continuous=continuous), device, warmup=False)
        print(f"  {'continuous' if continuous else 'static':>10} batching: "
              f"{tokens / seconds:>9,.0f} tokens/s ({seconds:.1f} s)", flush=True)
    draft = TransformerLM(replace(config, num_layers=max(1, config.num_layers // 4)))
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(
        "layers.") or int(k.split(".")[1]) < draft.config.num_layers})  # the first layers
    draft, prompt = cast_weights(draft.to(device).eval(), dtype), torch.randint(
        config.vocab_size, (16,)).tolist()
    print(f"\n[{time.perf_counter() - start:.0f} s]\nspeculative decoding, batch 1, greedy, k=4, "
          f"draft: the target's first {draft.config.num_layers} layers (random weights: the "
          "acceptance says little; a trained pair: --draft_ckpt)", flush=True)
    print("  " + speculative_speed(model, draft, prompt, new_tokens, 4, cfg["compile"] is True,
                                   temperature=0)[1])
    print(f"\n[{time.perf_counter() - start:.0f} s]\nweight-only quantization, batch 1 "
          f"(perplexity: python infer.py quantize)")
    quantization_table(model, cfg["group_size"], prompt_len, new_tokens, compile)
    print(f"[{time.perf_counter() - start:.0f} s in all]")


# Command line -------------------------------------------------------------------------------------
COMMANDS = {  # each command's settings and their defaults
    "generate": {"ckpt": "out/ckpt.pt", "hf_dir": "", "tokenizer_dir": "",  # train.py's output
                 "prompt": "", "max_new_tokens": 256,  # "": start a new document (<|endoftext|>)
                 "temperature": 0.8, "top_k": 0, "top_p": 1.0,  # top_k 0: all tokens
                 "seed": -1, "num_samples": 1, "stop": [], "include_stop": False,  # seed -1: random
                 "min_tokens": 0, "quantize": "", "group_size": 128,  # quantize: int8 | int4
                 "draft_ckpt": "", "speculate_k": 4,  # a draft model: speculative decoding
                 "device": "auto", "dtype": "auto", "compile": "auto"},  # compile auto: on CUDA
    "quantize": {"ckpt": "out/ckpt.pt", "hf_dir": "", "tokenizer_dir": "", "group_size": 128,
                 "text": "", "device": "auto"},  # "": the run's val.txt (GPT-2: Shakespeare)
    "roofline": {"gpu": "H100", "seq_len": 1024, "batch_sizes": [1, 8, 16, 32, 64, 128]},
    "bench": {"device": "auto", "preset": "", "batch_sizes": [], "compile": "auto",  # or True
              "compare_hf": False, "requests": 0, "group_size": 128,
              "profile": False, "decode_only": False},  # decode: kernels a step; skip the rest
}


def load_model(cfg: dict, device: torch.device) -> tuple[TransformerLM, Tokenizer]:
    model, tokenizer = (load_gpt2(cfg["hf_dir"]) if cfg["hf_dir"] else
                        load_checkpoint_model(cfg["ckpt"], cfg["tokenizer_dir"]))
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    return cast_weights(model.to(device), dtype), tokenizer


class StreamPrinter:
    """on_token for one sample: prints text as it grows, holding back what may still turn out to
    start a stop string or to be an unfinished UTF-8 character (U+FFFD until it completes)."""
    def __init__(self, prompt: str, stop: Sequence[str]) -> None:
        self.shown, self.hold = 0, max(map(len, stop), default=1) - 1
        print(prompt, end="", flush=True)

    def __call__(self, row: int, generation: Generation) -> None:
        text, done = generation.text, generation.finish_reason is not None
        end = len(text) if done else max(self.shown, len(text.rstrip("\ufffd")) - self.hold)
        print(text[self.shown: end] + (f"\n[{generation.finish_reason}]" if done else ""),
              end="\n" if done else "", flush=True)
        self.shown = end


def generate_command(cfg: dict) -> None:
    sampling = dict(temperature=cfg["temperature"], top_k=cfg["top_k"] or None, top_p=cfg["top_p"])
    check_sampling(**sampling)
    if cfg["quantize"] not in ("", "int8", "int4"):
        raise UsageError(f"--quantize must be int8 or int4, got {cfg['quantize']!r}")
    device = resolve_device(cfg["device"])
    model, tokenizer = load_model(cfg, device)
    if cfg["quantize"]:
        quantize_model(model, 8 if cfg["quantize"] == "int8" else 4, cfg["group_size"])
    if not cfg["prompt"] and eos_of(tokenizer) is None:
        raise UsageError(f"give a --prompt: the tokenizer has no {EOT} to start a document from")
    prompt = tokenizer.encode(cfg["prompt"]) if cfg["prompt"] else [eos_of(tokenizer)]
    seed, stop = (None if cfg["seed"] < 0 else cfg["seed"]), [  # --stop='\n': a newline
        s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in cfg["stop"]]
    compile = use_compile(cfg["compile"], device)
    if cfg["draft_ckpt"]:
        draft, draft_tokenizer = load_model({**cfg, "ckpt": cfg["draft_ckpt"], "hf_dir": ""},
                                            device)
        if draft_tokenizer.vocab != tokenizer.vocab:
            raise ValueError(f"{cfg['draft_ckpt']} was trained with another tokenizer")
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        if compile:  # a 24-layer target's three compiles took minutes on an H200, silently
            print("speculative decoding: compiling the draft's step, the target's verify step "
                  "and its plain step (for the report) before any text", file=sys.stderr)
        ids, report = speculative_speed(model, draft, prompt, cfg["max_new_tokens"],
                                        cfg["speculate_k"], compile, **sampling,
                                        generator=generator, eos_id=eos_of(tokenizer))
        print(cfg["prompt"] + tokenizer.decode([t for t in ids if t != eos_of(tokenizer)]))
        return print(f"speculative: {report}", file=sys.stderr)
    start = time.perf_counter()
    stream = StreamPrinter(cfg["prompt"], stop) if cfg["num_samples"] == 1 else None
    out = generate_batch(model, tokenizer, [prompt], n=cfg["num_samples"],
                         max_new_tokens=cfg["max_new_tokens"], **sampling, stop=stop,
                         include_stop=cfg["include_stop"], min_tokens=cfg["min_tokens"],
                         seed=seed, compile=compile, on_token=stream)[0]
    seconds = time.perf_counter() - start
    for i, completion in enumerate(out if stream is None else []):
        print(f"--- sample {i + 1} ---\n{cfg['prompt']}{completion.text}\n"
              f"[{completion.finish_reason}]")
    tokens = sum(len(c.token_ids) for c in out)
    print(f"{tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s on {device.type}"
          f"{', compiled' if compile else ''}", file=sys.stderr)


def quantize_command(cfg: dict) -> None:
    """Perplexity on held-out text and batch-1 decode speed: unquantized, int8, int4."""
    device = resolve_device(cfg["device"])
    model, tokenizer = load_model(cfg, device)
    path = Path(cfg["text"]) if cfg["text"] else DATA_DIR / "tinyshakespeare.txt"
    if not cfg["text"] and not cfg["hf_dir"]:  # the run's validation split, beside its tokenizer
        state = read_checkpoint(cfg["ckpt"], mmap=True)
        path = find_tokenizer(state, cfg["tokenizer_dir"])[1].parent / "val.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no held-out text at {path}: pass --text=FILE")
    text = path.read_text(encoding="utf-8")[-200_000:]
    tokens = torch.tensor(tokenizer.encode(text))
    print(f"held-out text: the last {len(text):,} characters of {path} ({len(tokens):,} tokens)")
    context = model.config.context_length
    quantization_table(model, cfg["group_size"], min(16, context // 4), min(64, context // 2),
                       device.type == "cuda", tokens)


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, cfg, _, _ = parse_command(argv, COMMANDS, "generate")
    {"generate": generate_command, "quantize": quantize_command, "roofline": roofline_command,
     "bench": bench}[command](cfg)


if __name__ == "__main__":
    run_cli(main)
