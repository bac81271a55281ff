"""Training: from raw text to a language model that writes stories, in one command.

The training half of CS336 assignment 1, written from scratch: the cross-entropy loss, learning-rate
schedules (cosine with warm-up, warm-up-stable-decay), gradient clipping, random batches from a
token array, checkpoints that resume bit for bit, and the training loop with bf16 autocast,
torch.compile, gradient accumulation, an MoE auxiliary loss and data-parallel training (torchrun).

Commands
    python train.py                        # CPU, ~5 min: download, tokenizer, encode, train, sample
    python train.py --data=notes.txt       # any text file
    python train.py --dataset=owt --max_text_mb=0 --vocab_size=32000 --d_model=768 ...   # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset=owt ...                   # 8 GPUs
    python train.py run.json --lr=3e-4     # a config file (JSON or `key = value` lines), then flags
    python train.py --resume               # continue out_dir/ckpt.pt where it stopped
    python train.py bench                  # GPU throughput, GPT-2-small and TinyStories shapes
    python train.py bench --shape=gpt2 --batch_size=32 --compile=False   # one variant
Every knob lives in TrainConfig below; `--key=value` sets any of them or any ModelConfig field.

Reads   data_cache/ (made on first use: downloaded text, the BPE tokenizer, token .bin arrays),
        or --train_bin/--val_bin/--tokenizer_dir written by `python tokenizer.py encode`.
Writes  out_dir/ckpt.pt (model, optimizer, config, RNG and data state), out_dir/metrics.jsonl
        (one JSON object per log line: plot loss against tokens), out_dir/samples.txt.

Papers  Kingma & Ba 2015 (Adam); Loshchilov & Hutter 2019 (AdamW, cosine schedules);
        Hu et al. 2024 (MiniCPM: warm-up-stable-decay); Pascanu et al. 2013 (gradient clipping);
        Jordan et al. 2024 (Muon, blog); Liu et al. 2025 (Muon is Scalable for LLM Training);
        Vyas et al. 2024 (SOAP: Improving and Stabilizing Shampoo using Adam);
        Micikevicius et al. 2018 (mixed precision); Li et al. 2020 (PyTorch DDP);
        Chowdhery et al. 2022 (PaLM: model FLOPs utilisation); Eldan & Li 2023 (TinyStories).
"""

import ast
import contextlib
import dataclasses
import datetime
import difflib
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from model import ModelConfig, TransformerLM, count_params, generate, mfu_flops_per_token
from tokenizer import Tokenizer, encode_file, token_dtype, train_bpe

# ----------------------------------------------------------------------------------------------
# Config: every knob of a run, in one place. `--key=value` overrides any of them (typed from the
# default, so `--lr=1` is a float and `--compile=False` a bool), and so does a config file.


@dataclass
class TrainConfig:
    # data
    dataset: str = "tinystories"  # "tinystories" (offline: pydoc), "owt" (OpenWebText), "pydoc"
    data: str = ""  # a text file to train on instead of `dataset`
    train_bin: str = ""  # token arrays from `tokenizer.py encode` instead of text...
    val_bin: str = ""  # ...with their validation split...
    tokenizer_dir: str = ""  # ...and the tokenizer that wrote them
    cache_dir: str = "data_cache"  # downloads, tokenizers and .bin arrays are kept here
    max_text_mb: float = 8.0  # train on at most this much text (0 = all): keeps CPU runs short
    val_fraction: float = 0.05  # share of a single text file held out for validation
    vocab_size: int = 2048  # BPE vocabulary, special tokens included
    # model: any ModelConfig field (model.py) may be set, e.g. --d_model=512 --tie_weights=True
    model: dict = field(default_factory=lambda: dict(
        context_length=128,  # tokens per training window
        d_model=128,  # residual stream width: small enough for ~10k tokens/s on 2 CPU cores
        num_layers=4,  # transformer blocks
        num_heads=4,  # attention heads (head dim 32)
        d_ff=384,  # SwiGLU hidden width, ~8/3 d_model rounded up to a multiple of 64
        rope_theta=10000.0,  # RoPE base
    ))
    # optimisation
    optimizer: str = "adamw"  # "adamw", "muon" (AdamW for non-matrix weights), "soap"
    lr: float = 2e-3  # peak learning rate (Muon scales its updates to match, so one knob)
    min_lr: float = 2e-4  # floor of the schedule, a tenth of the peak as in Chinchilla
    schedule: str = "cosine"  # "cosine" (warm-up, cosine to min_lr) or "wsd" (warm-up-stable-decay)
    warmup_iters: int = 50  # linear warm-up steps
    decay_frac: float = 0.2  # wsd: the last fifth of the run decays linearly to min_lr
    weight_decay: float = 0.1  # decoupled, on matrices only (not gains, biases or embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # second-moment decay; 0.95 is steadier than 0.999 for transformers
    eps: float = 1e-8  # AdamW denominator guard
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    batch_size: int = 32  # sequences per micro-batch, per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 600  # optimizer steps: 2.5M tokens, about 4 minutes on 2 CPU cores
    # evaluation, logging, checkpoints, samples
    eval_interval: int = 100  # steps between validation losses
    eval_iters: int = 20  # batches per validation loss
    log_interval: int = 10  # steps between progress-bar updates (each costs one GPU sync)
    checkpoint_interval: int = 200  # steps between checkpoints (0 = only at the end)
    out_dir: str = "out"  # checkpoint, metrics and samples go here
    resume: bool = False  # continue from out_dir/ckpt.pt
    num_samples: int = 3  # texts generated at the end
    sample_tokens: int = 160  # new tokens per sample
    sample_prompt: str = ""  # "" starts each sample at <|endoftext|>, i.e. a fresh document
    temperature: float = 0.8  # sampling temperature
    top_k: int = 50  # sample from the k most likely tokens (0 = all)
    # runtime
    device: str = "auto"  # "auto" = CUDA, then MPS, then CPU
    dtype: str = "auto"  # "auto" = bf16 autocast on GPUs that have it, else "float32"
    compile: str = "auto"  # "auto" = torch.compile on CUDA only; or True / False
    seed: int = 1337  # model init, batches (offset by rank) and samples


@dataclass
class BenchConfig(TrainConfig):
    shape: str = "both"  # "gpt2" (GPT-2 small), "tinystories" (the course's shape), or "both"
    batch_size: int = 0  # micro-batch; 0 = the shape's own (16 for gpt2, 128 for tinystories)
    vocab_size: int = 0  # the model's vocabulary; 0 = the shape's own (50304, 10000)
    steps: int = 20  # timed optimizer steps
    warmup_steps: int = 5  # untimed steps first: compilation, allocator and autotuning settle
    profile: int = 0  # > 0: profile this many more steps and print the kernels that take the time
    # empty: the shapes below set the model; fields given here (e.g. --num_layers=2) override them
    model: dict = field(default_factory=dict)


BENCH_SHAPES = {
    # nanoGPT's GPT-2 small: vocab 50257 padded to a multiple of 64, SwiGLU at ~8/3 d_model.
    "gpt2": dict(vocab_size=50304, context_length=1024, d_model=768, num_layers=12, num_heads=12,
                 d_ff=2048, rope_theta=10000.0, tie_weights=True),
    # CS336 assignment 1's TinyStories model.
    "tinystories": dict(vocab_size=10000, context_length=256, d_model=512, num_layers=4,
                        num_heads=16, d_ff=1344, rope_theta=10000.0),
}
BENCH_BATCH = {"gpt2": 16, "tinystories": 128}
TINYSTORIES_TOKENS = 327_680_000  # the course's TinyStories budget: 5000 steps x 256 x 256

TINYSTORIES_URL = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
                   "TinyStories-valid.txt")
OWT_URL = "https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main/owt_{}.txt.gz"
EOT = "<|endoftext|>"

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU. Unknown GPU -> None.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}

# ----------------------------------------------------------------------------------------------
# Loss


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean of -log softmax(logits)[target] over every position whose target is not ignored.

    logits (..., V) in any float dtype, targets (...) integer ids. Computed in float32: bf16 keeps
    only 8 bits of mantissa, too few to tell a loss of 3.01 from 3.02. Under torch.compile the cast,
    max, exp and sum fuse into one pass over the logits, so no float32 copy of them is made.
    """
    logits = logits.float()
    # log softmax_i = x_i - log sum_j exp(x_j). Subtracting the max first keeps exp from
    # overflowing (logits of 1e4 would give inf) without changing the result.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    log_sum_exp = shifted.exp().sum(dim=-1).log()
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)  # ignored positions still need a valid index
    target_logit = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    losses = (log_sum_exp - target_logit) * keep
    return losses.sum() / keep.sum().clamp(min=1)


class _FusedCrossEntropy(torch.autograd.Function):
    """cross_entropy with a hand-written backward: d loss / d logits = softmax - one_hot.

    Autograd through the reference saves float32 log-probabilities for backward: for GPT-2 small
    (16 x 1024 tokens x 50304) that is 3.3 GB written and read again each step. Here backward
    recomputes the softmax from the saved (bf16) logits and one float per row, log-sum-exp, so
    the logits are read twice and never copied; under torch.compile each direction is one fused
    kernel (1.1 ms less per GPT-2-small step on an H200).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        keep = targets != ignore_index
        safe_targets = torch.where(keep, targets, 0)
        logits32 = logits.float()
        log_sum_exp = torch.logsumexp(logits32, dim=-1)  # (...,), max-shifted inside
        target_logit = logits32.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
        count = keep.sum().clamp(min=1)
        ctx.save_for_backward(logits, safe_targets, keep, log_sum_exp, count)
        return ((log_sum_exp - target_logit) * keep).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        logits, safe_targets, keep, log_sum_exp, count = ctx.saved_tensors
        grad = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1))  # softmax, (..., V)
        # - one_hot, as a comparison with the vocabulary index: elementwise, so torch.compile
        # fuses the whole backward into one pass (a scatter would split it in two)
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        grad.sub_((vocab == safe_targets.unsqueeze(-1)).to(grad.dtype))
        grad.mul_((keep * grad_loss / count).unsqueeze(-1))  # ignored rows get no gradient
        return grad.to(logits.dtype), None, None


def fused_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """cross_entropy (same arguments, same value) with the lean backward: the training loss."""
    return _FusedCrossEntropy.apply(logits, targets, ignore_index)


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy in nats): the branching factor the model is left with per token."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf  # exp(710) overflows a double


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats/token of the token frequencies: the loss of a model that ignores context.

    A language model that has learnt anything beyond word counts must go well below this.
    """
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules


def lr_cosine(t: int, lr_max: float, lr_min: float, warmup_iters: int,
              cosine_cycle_iters: int) -> float:
    """Linear warm-up to lr_max, cosine down to lr_min at cosine_cycle_iters, then lr_min."""
    if t < warmup_iters:
        return t / warmup_iters * lr_max
    if t <= cosine_cycle_iters:
        progress = (t - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
        return lr_min + 0.5 * (1 + math.cos(math.pi * progress)) * (lr_max - lr_min)
    return lr_min


def lr_wsd(t: int, lr_max: float, lr_min: float, warmup_iters: int, total_iters: int,
           decay_iters: int) -> float:
    """Warm-up-stable-decay: linear warm-up, lr_max for most of the run, a short linear decay.

    The stable phase does not depend on the run length, so one run can be branched into decays at
    several lengths (MiniCPM; Hagele et al. 2024), which the cosine schedule cannot.
    """
    if t < warmup_iters:
        return t / warmup_iters * lr_max
    decay_start = total_iters - decay_iters
    if t < decay_start:
        return lr_max
    if t < total_iters:
        return lr_max + (t - decay_start) / decay_iters * (lr_min - lr_max)
    return lr_min


# ----------------------------------------------------------------------------------------------
# Gradient clipping


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients in place so their global L2 norm is at most max_norm; return the norm.

    The norm is taken over all parameters together, so clipping changes the step's length, never
    its direction. It stays a tensor (no `if norm > max_norm` on the host) so the GPU never waits.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # The norm of the per-tensor norms is the norm of everything, without concatenating.
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)
    return total


# ----------------------------------------------------------------------------------------------
# Optimizers: AdamW, Muon and SOAP, each a torch.optim.Optimizer.
#
# An optimizer turns the gradient g of each parameter into an update. SGD takes a step along -g;
# everything below takes a step along a *better-shaped* direction built from g:
#   AdamW divides each coordinate by a running RMS of its own gradient (a diagonal preconditioner),
#         so every weight moves at about the same speed whatever the scale of its gradient.
#   Muon  treats a weight matrix as a matrix: it replaces the (momentum-averaged) gradient U S V^T
#         by U V^T, the nearest orthogonal matrix, so every direction of the matrix moves equally.
#   SOAP  learns a rotation per weight matrix (Shampoo's Kronecker factors) and runs Adam in it,
#         a full-matrix-like preconditioner at the cost of two small eigenbases per matrix.
# All three decay the weights *decoupled* from the gradient (w <- w * (1 - lr * wd)), keep their
# step count per parameter (so a checkpoint resumes exactly), and do no host-device syncs in a
# step beyond SOAP's one eigendecomposition at its first step; nothing is rank-specific, so they
# work unchanged on DDP's averaged gradients.

Params = Iterable[torch.Tensor] | Iterable[dict]


def _check_range(group: dict, key: str, low: float, high: float, include_high: bool) -> None:
    """Raise a ValueError naming `key` unless low <= group[key] < high (or <= high)."""
    value = group[key]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # `not (a <= b)` rather than `a > b`, so that NaN is rejected too.
    if not is_number or not (low <= value and (value <= high if include_high else value < high)):
        closing = "]" if include_high else ")"
        raise ValueError(f"{key} must be a number in [{low}, {high}{closing}, got {value!r}")


def _check_int(group: dict, key: str, low: int) -> None:
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")


def _check_adamw_hyperparameters(group: dict) -> None:
    _check_range(group, "lr", 0.0, math.inf, include_high=False)
    _check_range(group, "eps", 0.0, math.inf, include_high=False)
    _check_range(group, "weight_decay", 0.0, math.inf, include_high=False)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_range({"betas[0]": betas[0]}, "betas[0]", 0.0, 1.0, include_high=False)
    _check_range({"betas[1]": betas[1]}, "betas[1]", 0.0, 1.0, include_high=False)


def _check_params(group: dict) -> None:
    for p in group["params"]:
        if p.is_complex():
            raise ValueError(f"complex parameters are not supported (shape {tuple(p.shape)})")


def _params_with_grads(optimizer: torch.optim.Optimizer) -> list[tuple[dict, list]]:
    """(group, its parameters that have a gradient) for every group, checked before any update.

    A parameter without a gradient (unused this step, or frozen) is left alone and its step count
    does not advance: torch.optim.AdamW's convention. Sparse gradients are refused up front, so a
    step that fails has changed nothing.
    """
    groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in optimizer.param_groups]
    if any(p.grad.is_sparse for _, params in groups for p in params):
        raise ValueError("sparse gradients are not supported (e.g. nn.Embedding(sparse=True)); "
                         "use dense gradients")
    return groups


def _use_foreach(foreach: bool | None, params: list[torch.Tensor]) -> bool:
    # The foreach kernels launch one CUDA kernel per *list* instead of one per tensor, which is
    # what pays on a GPU; on CPU they fall back to a loop, so there the plain loop is the default.
    return all(p.is_cuda for p in params) if foreach is None else foreach


def _adamw_state(state: dict, p: torch.Tensor) -> None:
    if "step" not in state:
        # A Python int: it travels through state_dict() as is and reading it needs no host sync.
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def adamw_update_reference(params: list[torch.Tensor], grads: list[torch.Tensor],
                           exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                           steps: list[int], *, lr: float, beta1: float, beta2: float,
                           eps: float, weight_decay: float) -> None:
    """One AdamW step, parameter by parameter, in place. `steps` are already incremented.

    The order of operations is torch.optim.AdamW's, so the two agree to float rounding (bit for
    bit on CPU, in our tests).
    """
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        # Decoupled weight decay: shrink the weights directly instead of adding wd * w to the
        # gradient, where Adam's division by sqrt(v) would weaken the decay of weights with large
        # gradients (Loshchilov & Hutter's point: L2 regularisation != weight decay for Adam).
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)                           # m = beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)   # v = beta2 v + (1 - beta2) g^2
        # m and v start at zero, so early on they underestimate E[g] and E[g^2] by the factors
        # (1 - beta^t); dividing those out makes the very first steps full-sized.
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)


def adamw_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                         exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                         steps: list[int], *, lr: float, beta1: float, beta2: float,
                         eps: float, weight_decay: float) -> None:
    """adamw_update_reference with each line applied to the whole list by one torch._foreach_* op.

    Same math, same order (tested equal); lists mixing devices or dtypes still work (torch falls
    back to a loop for them), they are just not faster.
    """
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**t) for t in steps])


def _adamw_fused_math(params: list[torch.Tensor], grads: list[torch.Tensor],
                      exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                      h: torch.Tensor) -> None:
    """adamw_update_reference's lines with the step's numbers read from the float32 tensor
    h = [1 - lr*wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps, lr / (1 - beta1^t)]."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(h[0])
        m.lerp_(g, h[1])
        v.mul_(h[2]).addcmul_(g, g * h[3])
        p.sub_(m / (v.sqrt() / h[4] + h[5]) * h[6])


_fused_adamw_kernels = None  # torch.compile(_adamw_fused_math), made at the first fused step


def adamw_update_fused(params: list[torch.Tensor], grads: list[torch.Tensor],
                       exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                       steps: list[int], *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float) -> None:
    """adamw_update_reference compiled by torch.compile into one kernel per parameter.

    The foreach path is ~8 passes over memory (each line reads and writes whole lists): 2.8 ms per
    GPT-2-small step on an H200. Compiled, each parameter's update is one fused kernel that reads
    p, g, m, v once and writes p, m, v once: 1.8 ms, and about 1.6 ms less per training step
    (numbers in the README). The numbers that change every step (lr, the bias corrections) travel
    in one small tensor: passed as Python floats they would be baked into the compiled code and
    recompile it at every step. Parameters are bucketed by step count (normally one bucket).
    """
    global _fused_adamw_kernels
    if _fused_adamw_kernels is None:
        # dynamic=False: shapes are fixed, so every kernel is specialised to its tensor's size
        _fused_adamw_kernels = torch.compile(_adamw_fused_math, dynamic=False)
    buckets: dict[int, list[int]] = {}
    for i, t in enumerate(steps):
        buckets.setdefault(t, []).append(i)
    for t, idx in buckets.items():
        h = torch.tensor([1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
                          math.sqrt(1 - beta2**t), eps, lr / (1 - beta1**t)], dtype=torch.float32)
        device = params[idx[0]].device
        # pinned memory lets the copy run behind the queued GPU work instead of waiting for it
        h = h.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else h.to(device)
        _fused_adamw_kernels(*([lst[i] for i in idx] for lst in
                               (params, grads, exp_avgs, exp_avg_sqs)), h)


def _adamw_group_step(optimizer: torch.optim.Optimizer, group: dict,
                      params: list[torch.Tensor]) -> None:
    """The AdamW step for `params` (all with a gradient) of one group; shared by all three."""
    if not params:
        return
    grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
    for p in params:
        state = optimizer.state[p]
        _adamw_state(state, p)
        state["step"] += 1
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
    if group["fused"]:
        update = adamw_update_fused
    elif _use_foreach(group["foreach"], params):
        update = adamw_update_foreach
    else:
        update = adamw_update_reference
    beta1, beta2 = group["betas"]
    update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


class _Optimizer(torch.optim.Optimizer):
    """What the three optimizers share: every parameter group is validated as it is added (a bad
    one is removed again and the error names the field), and step() runs the optional closure,
    then _update() with no autograd."""

    # How a step is computed, not which step: a loaded state_dict keeps the current choices, so a
    # checkpoint written on a GPU (fused) resumes on a CPU (loop) and the other way round.
    RUNTIME_KEYS = ("foreach", "fused")

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _update(self) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:  # validated after torch fills in the defaults, so per-group values are checked too
            self._check_group(self.param_groups[-1])
            _check_params(self.param_groups[-1])
            if not isinstance(self.param_groups[-1]["fused"], bool):
                raise ValueError(f"fused must be True or False, got "
                                 f"{self.param_groups[-1]['fused']!r}")
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        runtime = [{k: g[k] for k in self.RUNTIME_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, runtime):
            group.update(keys)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._update()
        return loss


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): torch.optim.AdamW's math.

    Per parameter: m and v are running averages of g and g^2; the update is
    -lr * m_hat / (sqrt(v_hat) + eps) with bias-corrected m_hat, v_hat, and the weights are first
    shrunk by (1 - lr * weight_decay). foreach=None uses the foreach fast path when every parameter
    of a group is on CUDA, the per-parameter loop otherwise; True/False force one. fused=True
    runs the update compiled by torch.compile (adamw_update_fused), the fastest on a GPU; its first
    step spends seconds compiling.
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, foreach: bool | None = None,
                 fused: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_adamw_hyperparameters(group)

    def _update(self) -> None:
        for group, params in _params_with_grads(self):
            _adamw_group_step(self, group, params)


# --- Muon ---------------------------------------------------------------------

def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise G: U S V^T -> U S' V^T with every S' near 1 (about 0.7 to 1.2).

    The exact answer U V^T needs an SVD, which is slow on a GPU. The iteration
        X <- a X + b (X X^T) X + c (X X^T)^2 X
    only needs matmuls, and acts on each singular value s of X separately: s <- a s + b s^3 + c s^5.
    Dividing G by its Frobenius norm first puts every s in [0, 1] (the spectral norm is at most the
    Frobenius norm). Jordan et al. tuned (a, b, c) = (3.4445, -4.7750, 2.0315) to make the slope
    at 0 as large as possible (a: small singular values grow ~3.4x per step, so 5 steps lift
    anything above ~1e-3 of the norm into the band; smaller ones stay small) while keeping every
    s inside a band around 1 instead of converging exactly (p(1) = a + b + c = 0.70: 1 is not a
    fixed point): training does not need exact orthogonality, it needs it fast.
    Runs in bfloat16 on CUDA (the iteration tolerates it; tensor cores make it cheap) and float32
    elsewhere (bfloat16 matmuls are slow on CPUs). Returns G's dtype and shape.
    """
    if G.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(G.shape)}")
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(0) > X.size(1)
    if tall:  # work with the smaller Gram matrix X X^T: (min, min) instead of (max, max)
        X = X.T
    X = X / (X.norm() + 1e-7)  # the eps keeps a zero gradient at zero instead of NaN
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.T
    return X.to(G.dtype)


def _check_muon_group(group: dict) -> None:
    _check_adamw_hyperparameters(group)
    _check_range(group, "momentum", 0.0, 1.0, include_high=False)
    _check_int(group, "ns_steps", 1)
    if not isinstance(group["use_muon"], bool) or not isinstance(group["nesterov"], bool):
        raise ValueError("use_muon and nesterov must be booleans, got "
                         f"{group['use_muon']!r} and {group['nesterov']!r}")
    if group["use_muon"]:
        for p in group["params"]:
            if p.ndim < 2:
                raise ValueError(
                    f"a use_muon=True group holds a parameter of shape {tuple(p.shape)}; Muon "
                    "only orthogonalises matrices: put vectors in a use_muon=False group "
                    "(param_groups_for_muon(model, ...) does the split)")


class Muon(_Optimizer):
    """Muon (Jordan et al. 2024): momentum, then orthogonalise the update, for hidden matrices.

    For a weight matrix W in a use_muon=True group:
        buf <- momentum * buf + (1 - momentum) * g                 (an EMA, like Adam's m)
        u   <- (1 - momentum) * g + momentum * buf  if nesterov else buf
        W   <- W * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(rows, cols)) * NS(u)
    NS(u) (zeropower_via_newtonschulz) keeps u's singular vectors and sets its singular values near
    1, so rare directions of the gradient get as large a step as the dominant one. Parameters with
    more than 2 dims are flattened to (size(0), -1), the convention for convolutions.

    The scale is Moonshot's (Liu et al. 2025): an orthogonal (rows, cols) matrix has RMS entry
    1/sqrt(max(rows, cols)), so the factor makes every update's RMS 0.2, the size of a typical
    AdamW update. That lets Muon share AdamW's learning rate and weight decay (one lr knob and
    one schedule in train.py), and keeps step sizes comparable across shapes. (Keller Jordan's
    max(1, rows/cols)**0.5 gives an update RMS of about lr/sqrt(cols), so it needs its own,
    larger lr: 0.02 to 0.05 in modded-nanogpt.)

    Groups with use_muon=False (embeddings, the output head, gains, biases: not hidden matrices,
    or not matrices at all) get a plain AdamW step with the group's lr, betas, eps and
    weight_decay. param_groups_for_muon(model, ...) builds both kinds of group.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 use_muon: bool = True, foreach: bool | None = None,
                 fused: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, betas=betas, eps=eps, use_muon=use_muon,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_muon_group(group)

    def _update(self) -> None:
        for group, params in _params_with_grads(self):
            if not group["use_muon"]:
                _adamw_group_step(self, group, params)
                continue
            lr, momentum = group["lr"], group["momentum"]
            for p in params:
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - momentum)
                # Nesterov: look one step ahead by mixing the fresh gradient back in; u is a new
                # tensor, so p.grad is left as the caller's (e.g. for logging its norm).
                u = g.lerp(buf, momentum) if group["nesterov"] else buf
                matrix = u.reshape(u.size(0), -1)  # (rows, cols)
                scale = 0.2 * max(matrix.shape) ** 0.5
                update = zeropower_via_newtonschulz(matrix, group["ns_steps"]).reshape(p.shape)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)


# --- SOAP ---------------------------------------------------------------------

def _rotate_second_moment(v: torch.Tensor, rotation_left: torch.Tensor | None,
                          rotation_right: torch.Tensor | None) -> torch.Tensor:
    """Re-express Adam's diagonal second moment v after a change of basis X_new = Rl X Rr^T.

    Only v's diagonal (per-coordinate) part is kept, so it cannot be rotated exactly; treating the
    coordinates as independent, var(X_new[i, k]) = sum_jl Rl[i, j]^2 Rr[k, l]^2 v[j, l].
    Exact when the new basis is a permutation or sign flip of the old one (eigh's ordering).
    """
    if rotation_left is not None:
        v = rotation_left.square() @ v
    if rotation_right is not None:
        v = v @ rotation_right.square().T
    return v


def _sorted_eigenbasis(statistic: torch.Tensor) -> torch.Tensor:
    # eigh returns ascending eigenvalues; largest first is the order power iteration keeps.
    return torch.linalg.eigh(statistic).eigenvectors.flip(-1)


def _power_iteration(statistic: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """One step of subspace iteration: refresh the eigenbasis Q of a slowly changing statistic.

    Much cheaper than a new eigh, and Q is already nearly right (the statistic is an EMA). The QR
    orthonormalises columns in order, so they are first sorted by estimated eigenvalue, largest
    first, letting the dominant directions claim their place before the small ones.
    """
    estimated_eigenvalues = (Q.T @ statistic @ Q).diagonal()
    Q = Q[:, torch.argsort(estimated_eigenvalues, descending=True)]
    return torch.linalg.qr(statistic @ Q).Q


def _refresh_basis(state: dict, key: str, statistic: torch.Tensor | None) -> torch.Tensor | None:
    """Recompute state[key], the eigenbasis of `statistic`; return new^T @ old (None: no change)."""
    if statistic is None:
        return None
    old = state[key]
    state[key] = _sorted_eigenbasis(statistic) if old is None else _power_iteration(statistic, old)
    return None if old is None else state[key].T @ old


class SOAP(_Optimizer):
    """SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's preconditioner.

    For a weight matrix with gradient G (rows, cols), Shampoo keeps L = EMA(G G^T) (rows, rows)
    and R = EMA(G^T G) (cols, cols); their eigenvectors Q_L, Q_R are the directions in which G
    varies most. SOAP rotates into that basis, G' = Q_L^T G Q_R, where the curvature is close to
    diagonal, and runs ordinary Adam (with bias correction and decoupled weight decay) on G',
    rotating the update back with Q_L (.) Q_R^T. The bases are computed with eigh from the first
    gradient, which only seeds them (that step does not move the weights: in a basis built from
    G itself, G' is diagonal up to rounding, and Adam's per-coordinate normalisation would blow
    that rounding noise up into full-sized steps), and are refreshed every
    `precondition_frequency` steps by one power-iteration step, after the Adam step, so each
    update uses a basis built from earlier gradients only.

    The first moment is kept in the parameter's own coordinates and projected each step, which is
    the exact rotation when the basis changes; the second moment lives in the basis and is rotated
    approximately (_rotate_second_moment). A side longer than max_precond_dim keeps the identity
    as its basis: 4096 covers the hidden sizes of GPT-2-sized models and leaves out vocabularies
    (the paper's code uses 10000, which would precondition the course's 10K vocabulary with a
    10000 x 10000 eigendecomposition). Vectors (gains, biases) get plain AdamW. Tensors
    with more than 2 dims are flattened to (size(0), -1). Preconditioner state is kept in float32
    whatever the parameter dtype. shampoo_beta (the EMA factor of L and R) defaults to betas[1].
    """

    def __init__(self, params: Params, lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), shampoo_beta: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 max_precond_dim: int = 4096, foreach: bool | None = None,
                 fused: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_adamw_hyperparameters(group)
        if group["shampoo_beta"] is not None:
            _check_range(group, "shampoo_beta", 0.0, 1.0, include_high=False)
        _check_int(group, "precondition_frequency", 1)
        _check_int(group, "max_precond_dim", 0)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating-point state tensor to its parameter's dtype; SOAP keeps its
        # statistics in float32 whatever the parameter dtype (bfloat16 eigenvectors would be
        # noise), so take those tensors again from the saved copy, only moved to the device.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if p.ndim >= 2:
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(p.device)

    def _init_matrix_state(self, state: dict, rows: int, cols: int, device: torch.device,
                           max_precond_dim: int) -> None:
        state["step"] = 0
        zeros = dict(device=device, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(rows, cols, **zeros)     # in the parameter's coordinates
        state["exp_avg_sq"] = torch.zeros(rows, cols, **zeros)  # in the eigenbasis
        # None = this side is not preconditioned (identity basis)
        state["L"] = torch.zeros(rows, rows, **zeros) if rows <= max_precond_dim else None
        state["R"] = torch.zeros(cols, cols, **zeros) if cols <= max_precond_dim else None
        state["Q_L"] = state["Q_R"] = None

    def _update(self) -> None:
        for group, params in _params_with_grads(self):
            _adamw_group_step(self, group, [p for p in params if p.ndim < 2])
            for p in params:
                if p.ndim >= 2:
                    self._matrix_step(p, group)

    def _matrix_step(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        G = p.grad.reshape(p.size(0), -1).float()  # (rows, cols)
        state = self.state[p]
        if "step" not in state:
            self._init_matrix_state(state, *G.shape, G.device, group["max_precond_dim"])
            if state["L"] is not None or state["R"] is not None:
                self._update_preconditioner(state, G, shampoo_beta, refresh=True)
                return  # the first gradient only seeds the bases (see the class docstring)
        state["step"] += 1
        t = state["step"]
        Q_L, Q_R = state["Q_L"], state["Q_R"]

        def rotate(X: torch.Tensor) -> torch.Tensor:  # into the eigenbasis: Q_L^T X Q_R
            X = X if Q_L is None else Q_L.T @ X
            return X if Q_R is None else X @ Q_R

        def rotate_back(X: torch.Tensor) -> torch.Tensor:  # out of it: Q_L X Q_R^T
            X = X if Q_L is None else Q_L @ X
            return X if Q_R is None else X @ Q_R.T

        # Adam, with its moments measured in the eigenbasis (exactly AdamW when both Q are None).
        G_rotated = rotate(G)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(G, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(G_rotated, G_rotated, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"])
        update = rotate_back(rotate(exp_avg) / denom)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.reshape(p.shape).to(p.dtype), alpha=-group["lr"] / bias_correction1)

        refresh = t % group["precondition_frequency"] == 0
        self._update_preconditioner(state, G, shampoo_beta, refresh)

    @staticmethod
    def _update_preconditioner(state: dict, G: torch.Tensor, shampoo_beta: float,
                               refresh: bool) -> None:
        """Shampoo's statistics L, R; when `refresh`, new bases and the second moment moved in."""
        if state["L"] is not None:
            state["L"].lerp_(G @ G.T, 1 - shampoo_beta)
        if state["R"] is not None:
            state["R"].lerp_(G.T @ G, 1 - shampoo_beta)
        if refresh:
            rotation_left = _refresh_basis(state, "Q_L", state["L"])
            rotation_right = _refresh_basis(state, "Q_R", state["R"])
            state["exp_avg_sq"] = _rotate_second_moment(state["exp_avg_sq"], rotation_left,
                                                        rotation_right)


# --- Parameter groups -----------------------------------------------------------

def _named_parameters_with_modules(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """(name, parameter, owning module) for each trainable parameter, tied ones listed once."""
    seen, result = set(), []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                result.append((f"{module_name}.{name}" if module_name else name, p, module))
    return result


def _is_embedding(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or "embed" in name


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for AdamW or SOAP: matrices decay, vectors and embedding tables do not.

    Weight decay is there to keep the matrices that mix features small. A gain (RMSNorm weight)
    or bias is a per-feature scale or offset whose natural value is 1 or 0, not a mixer: pulling
    it to 0 only fights the normalisation. An embedding table is a lookup, and decoupled decay
    shrinks *every* row every step while only the rows of tokens in the batch get a gradient, so
    rare tokens would fade away. Embeddings are recognised by type (nn.Embedding) or by "embed"
    in the name (model.py's token_embeddings); an output head tied to the embedding is the same
    tensor and is not decayed either. Empty groups are left out.
    """
    decay, no_decay = [], []
    for name, p, module in _named_parameters_with_modules(model):
        (decay if p.ndim >= 2 and not _is_embedding(name, module) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_groups_for_muon(model: nn.Module, lr: float, adam_lr: float | None = None,
                          weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.9, 0.999),
                          adam_eps: float = 1e-8) -> list[dict]:
    """Split a model's parameters into Muon groups (use_muon=True) and AdamW groups (False).

    Muon: the 2-D hidden weight matrices (attention projections, FFN weights, in any nn.Module).
    AdamW: embeddings (nn.Embedding, or "embed" in the name) and the output head ("lm_head" in the
    name), whose rows are per-token vectors rather than a linear map between hidden features, so
    orthogonalising them has no meaning; and everything that is not 2-D (gains, biases, scalars,
    and tensors with more than 2 dims, e.g. stacked experts, which Muon would flatten wrongly).
    Weight decay follows decay_param_groups: matrices (the head included) decay, embeddings and
    vectors do not. adam_lr defaults to lr (Muon's update RMS is scaled to match AdamW's).
    """
    adam_lr = lr if adam_lr is None else adam_lr
    muon, adam_decay, adam_no_decay = [], [], []
    for name, p, module in _named_parameters_with_modules(model):
        if _is_embedding(name, module) or p.ndim < 2:
            adam_no_decay.append(p)
        elif "lm_head" in name or p.ndim > 2:
            adam_decay.append(p)
        else:
            muon.append(p)
    adam = dict(use_muon=False, lr=adam_lr, betas=adam_betas, eps=adam_eps)
    groups = [dict(params=muon, use_muon=True, lr=lr, weight_decay=weight_decay),
              dict(params=adam_decay, weight_decay=weight_decay, **adam),
              dict(params=adam_no_decay, weight_decay=0.0, **adam)]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optimizer; weight decay on matrices, not gains or embeddings."""
    betas = (cfg.beta1, cfg.beta2)
    # foreach: one kernel launch per step for all tensors of a group instead of one per tensor;
    # fused: the AdamW update compiled, one kernel per tensor, whenever the model is compiled.
    foreach = device.type == "cuda"
    runtime = dict(foreach=foreach, fused=use_compile(cfg.compile, device))
    if cfg.optimizer == "adamw":
        return AdamW(decay_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas,
                     eps=cfg.eps, weight_decay=cfg.weight_decay, **runtime)
    if cfg.optimizer == "muon":
        # Muon scales its updates to AdamW's size, so both kinds of group share lr and schedule.
        groups = param_groups_for_muon(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       adam_betas=betas, adam_eps=cfg.eps)
        return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **runtime)
    if cfg.optimizer == "soap":
        return SOAP(decay_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas,
                    eps=cfg.eps, weight_decay=cfg.weight_decay, **runtime)
    raise ValueError(f"optimizer={cfg.optimizer!r}: expected 'adamw', 'muon' or 'soap'")


# ----------------------------------------------------------------------------------------------
# Data: batches, token arrays, and the text they come from


def get_batch(tokens: np.ndarray, batch_size: int, context_length: int, device: torch.device | str,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """batch_size random windows of the token array: inputs (B, T) and next-token targets (B, T).

    Targets are the inputs shifted by one token, so every position is a training example.
    `generator` fixes which windows are drawn; saving its state is what makes resuming exact.
    """
    if len(tokens) <= context_length:
        raise ValueError(f"{len(tokens)} tokens cannot fill one window of context_length="
                         f"{context_length}: use more text or a shorter context_length")
    starts = torch.randint(len(tokens) - context_length, (batch_size,), generator=generator)
    windows = np.stack([tokens[s:s + context_length + 1] for s in starts.tolist()])
    windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        # Page-locked memory lets the copy run asynchronously while the GPU still computes.
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


def load_tokens(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """Memory-map a .bin written by tokenizer.py, after checking its sidecar matches `tokenizer`.

    Ids from another tokenizer would train without any error and learn nonsense, so every field
    of the sidecar is checked.
    """
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.exists():
        raise FileNotFoundError(f"token file {path} does not exist")
    if not meta_path.exists():
        raise ValueError(f"{path} has no sidecar {meta_path.name}: re-encode it with tokenizer.py")
    meta = json.loads(meta_path.read_text())
    expected = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint(),
                "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name}
    for key, want in expected.items():
        if meta.get(key) != want:
            raise ValueError(f"{path} was encoded with {key}={meta.get(key)!r} but the tokenizer "
                             f"has {key}={want!r}: re-encode it with this tokenizer")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size != meta["num_tokens"] * dtype.itemsize:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes, but its sidecar promises "
                         f"{meta['num_tokens']} {dtype.name} tokens: the file is truncated")
    if meta["num_tokens"] == 0:
        raise ValueError(f"{path} holds no tokens: its text was empty")
    return np.memmap(path, dtype=dtype, mode="r")


def download(url: str, dest: Path, timeout: float = 10.0) -> Path:
    """Fetch url to dest with a progress bar; an interrupted download resumes where it stopped.

    Bytes go to dest.part (HTTP Range asks only for the missing tail); dest appears only once the
    length matches Content-Length, so a half-downloaded corpus is never mistaken for a whole one.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at or past the end: begin again
            part.unlink()
            return download(url, dest, timeout)
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"download of {url} stopped at {part.stat().st_size} of {total} bytes; "
                      f"run again to resume it")
    os.replace(part, dest)
    return dest


def gunzip(src: Path, dest: Path) -> Path:
    """Decompress src to dest (via a temporary name, so dest is always complete)."""
    if not dest.exists():
        part = dest.with_name(dest.name + ".part")
        with gzip.open(src, "rb") as fin, open(part, "wb") as fout, \
                tqdm(desc=f"gunzip {src.name}", unit="B", unit_scale=True) as bar:
            while chunk := fin.read(1 << 22):
                fout.write(chunk)
                bar.update(len(chunk))
        os.replace(part, dest)
    return dest


def pydoc_text(dest: Path, seed: int = 0) -> Path:
    """Python's own documentation topics (pydoc_data.topics, ~465 KB), one document each.

    It ships with every Python, so the main job runs without a network. The topics are shuffled
    so the validation tail is a random sample of them, not the alphabet's end.
    """
    if not dest.exists():
        from pydoc_data.topics import topics
        docs = [topics[k].strip() for k in sorted(topics)]
        random.Random(seed).shuffle(docs)
        _write_atomic(dest, f"\n{EOT}\n".join(docs) + "\n")
    return dest


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _file_key(path: Path) -> str:
    """A short content hash (size, first and last MB) naming what was built from this file."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:10]


def _line_start(path: Path, offset: int) -> int:
    """The first line start at or after offset (the file size if there is none)."""
    if offset <= 0 or offset >= path.stat().st_size:
        return min(max(offset, 0), path.stat().st_size)
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()
        return f.tell()


def _copy_range(src: Path, dest: Path, start: int, end: int) -> Path:
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fin.seek(start)
            while (left := end - fin.tell()) > 0:
                fout.write(fin.read(min(left, 1 << 22)))
        os.replace(tmp, dest)
    return dest


def split_text(src: Path, out_dir: Path, val_fraction: float, max_bytes: int,
               val_src: Path | None = None) -> tuple[Path, Path]:
    """Write out_dir/train.txt and val.txt, cut at line starts, from at most max_bytes of text.

    One file is split into its head (train) and tail (validation); a ready split (val_src) keeps
    the first max_bytes of train and the first val_fraction of that of validation.
    """
    end = _line_start(src, max_bytes) if max_bytes > 0 else src.stat().st_size
    if val_src is not None:
        val_end = _line_start(val_src, int(max_bytes * val_fraction)) if max_bytes > 0 else None
        return (_copy_range(src, out_dir / "train.txt", 0, end),
                _copy_range(val_src, out_dir / "val.txt", 0, val_end or val_src.stat().st_size))
    cut = _line_start(src, int(end * (1 - val_fraction)))
    if not 0 < cut < end:
        raise ValueError(f"{src} is too small to split into train and validation text "
                         f"(val_fraction={val_fraction}): it needs several lines")
    return (_copy_range(src, out_dir / "train.txt", 0, cut),
            _copy_range(src, out_dir / "val.txt", cut, end))


def source_text(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """The text to train on: (file, None) for one file to split, (train, val) for a ready split."""
    cache = Path(cfg.cache_dir)
    if cfg.data:
        if not Path(cfg.data).is_file():
            raise FileNotFoundError(f"--data={cfg.data}: no such file")
        return Path(cfg.data), None
    if cfg.dataset == "pydoc":
        return pydoc_text(cache / "pydoc_topics.txt"), None
    if cfg.dataset == "tinystories":
        try:
            return download(TINYSTORIES_URL, cache / "TinyStories-valid.txt"), None
        except (OSError, urllib.error.URLError) as e:  # DNS, refused, timeout, cut off
            reason = getattr(e, "reason", e)
            print(f"offline ({reason}): training on Python's documentation (pydoc_data.topics) "
                  f"instead of TinyStories")
            return pydoc_text(cache / "pydoc_topics.txt"), None
    if cfg.dataset == "owt":
        train, val = (gunzip(download(OWT_URL.format(s), cache / f"owt_{s}.txt.gz"),
                             cache / f"owt_{s}.txt") for s in ("train", "valid"))
        return train, val
    raise ValueError(f"dataset={cfg.dataset!r}: expected 'tinystories', 'owt' or 'pydoc'")


def prepare_data(cfg: TrainConfig) -> tuple[str, str, str]:
    """Text -> BPE tokenizer -> train/val .bin arrays, each step cached in cfg.cache_dir.

    Returns (tokenizer_dir, train_bin, val_bin). Cached results are named after a hash of the text
    and the vocabulary size, so a changed corpus or vocab_size never reuses stale files.
    """
    if cfg.train_bin or cfg.val_bin or cfg.tokenizer_dir:
        if not (cfg.train_bin and cfg.val_bin and cfg.tokenizer_dir):
            raise ValueError("--train_bin, --val_bin and --tokenizer_dir go together")
        return cfg.tokenizer_dir, cfg.train_bin, cfg.val_bin
    text, val_text = source_text(cfg)
    max_bytes = int(cfg.max_text_mb * 2**20)
    work = Path(cfg.cache_dir) / f"{text.stem}-{_file_key(text)}-{max_bytes}-{cfg.val_fraction}"
    text, val_text = split_text(text, work, cfg.val_fraction, max_bytes, val_text)
    tok_dir = work / f"bpe{cfg.vocab_size}"
    if not tok_dir.exists():  # written under a temporary name, so it exists only when complete
        print(f"training a {cfg.vocab_size}-token BPE tokenizer on {text}")
        vocab, merges = train_bpe(str(text), cfg.vocab_size, [EOT])
        tmp = tok_dir.with_name(tok_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        Tokenizer(vocab, merges, [EOT]).save_dir(str(tmp))
        os.replace(tmp, tok_dir)
    tok = Tokenizer.from_dir(str(tok_dir))
    bins = []
    for split, path in (("train", text), ("val", val_text)):
        out = tok_dir / f"{split}.bin"
        try:
            load_tokens(out, tok)
        except FileNotFoundError:
            encode_file(tok, str(path), str(out))
        except ValueError as e:  # written by another version of the tokenizer: never reuse it
            print(f"{e}; re-encoding")
            encode_file(tok, str(path), str(out))
        bins.append(str(out))
    return str(tok_dir), bins[0], bins[1]


# ----------------------------------------------------------------------------------------------
# Checkpoints


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DDP's wrappers: what checkpoints store."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, LossModel)):
            model = model.module if hasattr(model, "module") else model.model
        else:
            return model


def rng_state() -> dict:
    """Every random-number state a training step can touch."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x
                       for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    path: str | Path, **extra) -> None:
    """Write model, optimizer, iteration, RNG states and `extra` (config, data state) to path.

    Written to a temporary file and renamed over path: the rename is atomic, so a crash mid-save
    leaves the previous checkpoint intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "iteration": iteration, "rng": rng_state(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only: loading a checkpoint never runs code from it.
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_checkpoint(state: dict, model: nn.Module,
                       optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a read_checkpoint() dict into model (and optimizer) and restore the RNG states."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["iteration"]


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore a save_checkpoint() file into model and optimizer; return its iteration."""
    return restore_checkpoint(read_checkpoint(path), model, optimizer)


def check_resumable(state: dict, model_config: dict, tokenizer_fingerprint: str,
                    cfg: "TrainConfig", world_size: int) -> None:
    """Refuse to resume into a different run: name each field that changed.

    attn_impl only picks a kernel for the same math, so it may change between runs. The
    optimizer (its state), the batch shape and the number of processes (one batch stream each)
    must stay, or the resumed run is not the one that was interrupted.
    """
    saved = state.get("model_config", {})
    changed = [f"{k}={saved.get(k)!r} in the checkpoint but {v!r} now"
               for k, v in model_config.items() if saved.get(k) != v and k != "attn_impl"]
    saved_run = state.get("config", {})
    changed += [f"{k}={saved_run.get(k)!r} in the checkpoint but {getattr(cfg, k)!r} now"
                for k in ("optimizer", "batch_size", "grad_accum_steps")
                if k in saved_run and saved_run[k] != getattr(cfg, k)]
    saved_ranks = len(state.get("data_generators", [None]))
    if saved_ranks != world_size:
        changed.append(f"{saved_ranks} process(es) in the checkpoint but {world_size} now")
    if changed:
        raise ValueError("cannot resume: the run changed: " + "; ".join(changed)
                         + ". Pass the checkpoint's values, or a new --out_dir")
    if state.get("tokenizer") != tokenizer_fingerprint:
        raise ValueError("cannot resume: the checkpoint was trained with another tokenizer "
                         f"({state.get('tokenizer')!r}, now {tokenizer_fingerprint!r})")


# ----------------------------------------------------------------------------------------------
# The training step: the same function runs in the loop and in `bench`.


class LossModel(nn.Module):
    """The language model and its loss as one module.

    torch.compile then sees the last matmul and the loss together and fuses them, and DDP wraps one
    module whose forward returns what backward needs: (cross-entropy, auxiliary loss).
    """

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)  # (B, T, V)
        return fused_cross_entropy(logits, y), self.model.aux_loss


def train_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor],
               next_batch: Callable[[], tuple[Tensor, Tensor]], accum_steps: int,
               grad_clip: float, autocast: contextlib.AbstractContextManager,
               no_sync: Callable | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer step over accum_steps micro-batches: returns (mean loss, gradient norm).

    Both stay on the device; reading them (.item()) makes the CPU wait for the GPU, so the loop
    does it only every log_interval steps.
    """
    loss_sum = 0.0
    for micro in range(accum_steps):
        x, y = next_batch()
        # DDP averages gradients across processes in backward; on all but the last micro-batch
        # that would be wasted traffic, since the gradients keep accumulating locally.
        last = micro == accum_steps - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with autocast:
                loss, aux_loss = step_model(x, y)
            ((loss + aux_loss) / accum_steps).backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of writing zeros
    return loss_sum / accum_steps, grad_norm


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Scale every parameter group's peak rate by the schedule's factor (Muon's groups differ)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


# ----------------------------------------------------------------------------------------------
# Runtime: device, precision, processes


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 has float32's range, so unlike fp16 it needs no loss scaling. CPUs and MPS run it
        # slower than float32 in practice, so "auto" uses it on CUDA only.
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype={name!r}: expected 'auto', 'float32' or 'bfloat16'")
    return dtypes[name]


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Matmuls in dtype, reductions and the loss in float32; parameters stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_compile(setting: str | bool, device: torch.device) -> bool:
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"compile={setting!r}: expected 'auto', True or False")
    # Compilation pays back in minutes on a GPU; on a CPU it costs more than a short run saves.
    return device.type == "cuda"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU, or None where it is not known (CPU, MPS, others)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def setup_distributed(device_name: str = "auto") -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device); joins the process group when run by torchrun.

    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` does not and gets one process.
    """
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # NCCL moves CUDA tensors over NVLink; gloo is the CPU backend.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Replicate module on every process; backward averages the gradients across them."""
    device_ids = [device.index] if device.type == "cuda" else None
    # The only buffers (RoPE and position tables) are constants: no need to broadcast them.
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               broadcast_buffers=False)


# ----------------------------------------------------------------------------------------------
# The training loop


@torch.no_grad()
def estimate_loss(step_model: nn.Module, tokens: np.ndarray, cfg: TrainConfig, context: int,
                  device: torch.device, autocast: contextlib.AbstractContextManager,
                  seed: int) -> float:
    """Mean validation loss over cfg.eval_iters batches, averaged over processes.

    The batches come from their own generator, seeded the same at every evaluation: each eval sees
    the same windows (comparable numbers) and the training batches are not disturbed.
    """
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=device)
    for _ in range(cfg.eval_iters):
        x, y = get_batch(tokens, cfg.batch_size, context, device, generator)
        with autocast:
            loss, _ = step_model(x, y)
        total += loss.float()
    if dist.is_initialized():
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item() / cfg.eval_iters


def build_model_config(overrides: dict, vocab_size: int) -> ModelConfig:
    return ModelConfig(**{"vocab_size": vocab_size, **overrides})


def train(cfg: TrainConfig,
          wrap_model: Callable[[nn.Module, torch.device], nn.Module] = wrap_ddp) -> dict:
    """Run one training job; return {"model", "tokenizer", "iteration", "val_loss", ...}.

    wrap_model is the data-parallel hook (torch's DDP here; ddp.py passes its own).
    """
    rank, _, world_size, device = setup_distributed(cfg.device)
    master = rank == 0
    try:
        result = _train(cfg, rank, world_size, device, master, wrap_model)
        if dist.is_initialized():
            # Rank 0 is still writing samples: leave together, or a rank that tears its
            # connections down early can abort the other's (seen with gloo).
            dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_config(cfg: TrainConfig) -> None:
    """Fail before any data is prepared, naming the knob."""
    choices = {"optimizer": ("adamw", "muon", "soap"), "schedule": ("cosine", "wsd"),
               "dataset": ("tinystories", "owt", "pydoc")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r}: expected one of {allowed}")
    for key in ("batch_size", "grad_accum_steps", "log_interval", "eval_iters", "vocab_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")


def _train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device, master: bool,
           wrap_model: Callable[[nn.Module, torch.device], nn.Module]) -> dict:
    check_config(cfg)
    log = print if master else (lambda *a, **k: None)
    dtype = resolve_dtype(cfg.dtype, device)
    compile_model = use_compile(cfg.compile, device)
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls on Ampere and later

    # Data: rank 0 prepares (downloads, tokenizer, encoding) and tells the others where it is.
    # Downloading and tokenizing a big corpus can take hours, far past NCCL's default timeout:
    # the other ranks wait for it on a CPU (gloo) group created with a patient timeout.
    patient = (dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
               if world_size > 1 else None)
    paths = [prepare_data(cfg) if master else None]
    if patient is not None:
        dist.broadcast_object_list(paths, src=0, group=patient)
    tok_dir, train_bin, val_bin = paths[0]
    tok = Tokenizer.from_dir(tok_dir)
    if EOT not in tok.special_tokens:  # fail now, not when sampling after the whole run
        raise ValueError(f"the tokenizer in {tok_dir} has no {EOT} special token; samples start "
                         f"from it (train one with --special-token '{EOT}')")
    train_tokens, val_tokens = load_tokens(train_bin, tok), load_tokens(val_bin, tok)
    baseline = unigram_entropy(train_tokens[:10_000_000], tok.vocab_size)

    # Model: same seed on every rank, so all replicas start equal.
    torch.manual_seed(cfg.seed)
    model_config = build_model_config(cfg.model, tok.vocab_size)
    context = model_config.context_length
    model = TransformerLM(model_config).to(device)
    optimizer = build_optimizer(model, cfg, device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    params = [p for p in model.parameters() if p.requires_grad]
    # Each rank draws its own windows: same stream of seeds, offset by rank.
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * rank)

    out_dir = Path(cfg.out_dir)
    ckpt_path, metrics_path = out_dir / "ckpt.pt", out_dir / "metrics.jsonl"
    model_fields = dataclasses.asdict(model_config)
    start_iter = 0
    if cfg.resume:
        state = read_checkpoint(ckpt_path)
        check_resumable(state, model_fields, tok.fingerprint(), cfg, world_size)
        start_iter = restore_checkpoint(state, model, optimizer)
        generator.set_state(state["data_generators"][rank])
        log(f"resuming {ckpt_path} at iteration {start_iter}")
    elif ckpt_path.exists():
        log(f"note: {ckpt_path} exists and will be replaced (pass --resume to continue it)")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start_iter)

    # Compile inside DDP (as nanoGPT does): DDP's gradient hooks stay outside the compiled graph.
    step_model = LossModel(model)
    if compile_model:
        step_model = torch.compile(step_model)
    no_sync = None
    if world_size > 1:
        step_model = wrap_model(step_model, device)
        no_sync = getattr(step_model, "no_sync", None)
    autocast = autocast_for(device, dtype)

    tokens_per_step = cfg.batch_size * context * cfg.grad_accum_steps * world_size
    flops_per_token = mfu_flops_per_token(model_config, context)
    peak = peak_flops(device)
    log(f"model: {count_params(model_config)['total'] / 1e6:.2f}M parameters | "
        f"{train_tokens.size:,} train / {val_tokens.size:,} val tokens | device {device}, "
        f"{str(dtype).removeprefix('torch.')}, compile={compile_model}, {world_size} process(es)")
    log(f"unigram baseline: {baseline:.3f} nats/token (a model that ignores context)")

    def schedule(t: int) -> float:
        if cfg.schedule == "wsd":
            return lr_wsd(t, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters,
                          max(1, int(cfg.decay_frac * cfg.max_iters)))
        return lr_cosine(t, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)

    def next_batch() -> tuple[Tensor, Tensor]:
        return get_batch(train_tokens, cfg.batch_size, context, device, generator)

    def evaluate(iteration: int) -> float:
        model.eval()
        val_loss = estimate_loss(step_model, val_tokens, cfg, context, device, autocast,
                                 cfg.seed + 7 + rank)
        model.train()
        if master:
            bar.write(f"iter {iteration}: val loss {val_loss:.3f} (perplexity "
                      f"{perplexity(val_loss):.1f}) | unigram baseline {baseline:.3f}")
        _append_jsonl(metrics_path, {"iter": iteration, "val_loss": val_loss,
                                     "val_ppl": perplexity(val_loss),
                                     "unigram_entropy": baseline}, master)
        return val_loss

    def checkpoint(iteration: int, loss: Tensor, grad_norm: Tensor) -> None:
        # Never save weights a non-finite step may have spoilt: keep the last good checkpoint.
        check_finite(loss, grad_norm, iteration)
        generators = [generator.get_state()]
        if world_size > 1:
            generators = [None] * world_size
            dist.all_gather_object(generators, generator.get_state())
        if master:
            save_checkpoint(model, optimizer, iteration, ckpt_path,
                            config=dataclasses.asdict(cfg), model_config=model_fields,
                            tokenizer=tok.fingerprint(), data_generators=generators)

    def check_finite(loss: Tensor, grad_norm: Tensor, iteration: int) -> None:
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
            kept = (f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists()
                    else "no checkpoint was written")
            raise FloatingPointError(
                f"loss {loss.item()} / gradient norm {grad_norm.item()} at iteration {iteration}:"
                f" training diverged; {kept}. Try a lower --lr or a longer --warmup_iters")

    model.train()
    val_loss = math.nan
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, desc="train",
               dynamic_ncols=True)
    last_time, last_iter = time.perf_counter(), start_iter
    loss = grad_norm = torch.zeros(())
    for it in range(start_iter, cfg.max_iters):
        lr = schedule(it)
        set_lr(optimizer, base_lrs, lr / cfg.lr if cfg.lr else 0.0)
        loss, grad_norm = train_step(step_model, optimizer, params, next_batch,
                                     cfg.grad_accum_steps, cfg.grad_clip, autocast, no_sync)
        done = it + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            if world_size > 1:  # log the mean over ranks; every rank then sees the same NaN
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world_size
            check_finite(loss, grad_norm, done)
            now = time.perf_counter()
            tok_per_s = tokens_per_step * (done - last_iter) / (now - last_time)
            last_time, last_iter = now, done
            mfu = (flops_per_token * tok_per_s / (peak * world_size)) if peak else None
            row = {"iter": done, "tokens": done * tokens_per_step, "loss": loss.item(), "lr": lr,
                   "grad_norm": grad_norm.item(), "tok_per_s": tok_per_s, "mfu": mfu}
            _append_jsonl(metrics_path, row, master)
            postfix = {"loss": f"{row['loss']:.3f}", "lr": f"{lr:.2e}",
                       "tok/s": f"{tok_per_s:,.0f}"}
            if mfu is not None:
                postfix["mfu"] = f"{mfu:.1%}"
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        pause = time.perf_counter()
        if cfg.eval_interval and (done % cfg.eval_interval == 0 or done == cfg.max_iters):
            val_loss = evaluate(done)
        if done == cfg.max_iters or (cfg.checkpoint_interval
                                     and done % cfg.checkpoint_interval == 0):
            checkpoint(done, loss, grad_norm)
        last_time += time.perf_counter() - pause  # tokens/s counts training time only
    bar.close()

    samples = write_samples(model, tok, cfg, device, autocast, out_dir) if master else []
    return {"model": model, "tokenizer": tok, "iteration": max(start_iter, cfg.max_iters),
            "val_loss": val_loss, "unigram_entropy": baseline, "samples": samples}


def _append_jsonl(path: Path, row: dict, master: bool) -> None:
    if master:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, keep_through: int) -> None:
    """Drop metric rows past keep_through: a resumed run redoes the steps after its checkpoint."""
    rows = path.read_text().splitlines() if path.exists() and keep_through else []
    rows = [r for r in rows if json.loads(r)["iter"] <= keep_through]
    _write_atomic(path, "".join(r + "\n" for r in rows))


@torch.no_grad()
def write_samples(model: TransformerLM, tok: Tokenizer, cfg: TrainConfig, device: torch.device,
                  autocast: contextlib.AbstractContextManager, out_dir: Path) -> list[str]:
    """Generate cfg.num_samples texts, print them and write them to out_dir/samples.txt."""
    model.eval()
    prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [tok.token_id(EOT)]
    torch.manual_seed(cfg.seed)
    samples = []
    eot = tok.token_id(EOT)
    for _ in range(cfg.num_samples):
        with autocast:
            ids = generate(model, torch.tensor([prompt], device=device), cfg.sample_tokens,
                           temperature=cfg.temperature, top_k=cfg.top_k or None, eos_id=eot)
        new = ids[0, len(prompt):].tolist()
        new = new[:new.index(eot)] if eot in new else new  # a document ends at <|endoftext|>
        samples.append(cfg.sample_prompt + tok.decode(new))
    text = "".join(f"--- sample {i + 1} ---\n{s.strip()}\n" for i, s in enumerate(samples))
    print(text, end="")
    _write_atomic(out_dir / "samples.txt", text)
    return samples


# ----------------------------------------------------------------------------------------------
# Benchmark: the training step on random tokens, timed with the GPU synchronised.


def print_profile(run: Callable[[], None], steps: int, device: torch.device) -> None:
    """Where a step's time goes: torch.profiler's table of the ops/kernels with the most self
    time, per step. On a GPU these are kernels (matmuls, attention, fused elementwise code)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # Only the kernels themselves: an operator row repeats the time of the kernels it launched,
    # and an annotation (Optimizer.step#AdamW.step) spans kernels already counted.
    kernels = [e for e in events if not cuda or (e.device_type == torch.autograd.DeviceType.CUDA
                                                 and not e.is_user_annotation)]
    total_ms = sum(getattr(e, key) for e in kernels) / 1e3 / steps
    print(f"  profile of {steps} steps: {total_ms:.1f} ms of {'GPU' if cuda else 'CPU'} time "
          f"per step; the top entries (times summed over the {steps} steps):")
    print(events.table(sort_by=key, row_limit=20, max_name_column_width=70))


def bench(cfg: BenchConfig) -> list[dict]:
    """Tokens/s, ms/step and MFU of train_step for each shape in cfg.shape; returns the rows."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    compile_model = use_compile(cfg.compile, device)
    autocast = autocast_for(device, dtype)
    torch.set_float32_matmul_precision("high")
    shapes = list(BENCH_SHAPES) if cfg.shape == "both" else [cfg.shape]
    if any(s not in BENCH_SHAPES for s in shapes):
        raise ValueError(f"shape={cfg.shape!r}: expected one of {[*BENCH_SHAPES, 'both']}")
    peak = peak_flops(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for shape in shapes:
        torch.manual_seed(cfg.seed)
        vocab = {"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}
        model_config = ModelConfig(**{**BENCH_SHAPES[shape], **vocab, **cfg.model})
        batch_size = cfg.batch_size or BENCH_BATCH[shape]
        model = TransformerLM(model_config).to(device)
        optimizer = build_optimizer(model, cfg, device)
        params = list(model.parameters())
        step_model = LossModel(model)
        if compile_model:
            step_model = torch.compile(step_model)
        T, V = model_config.context_length, model_config.vocab_size
        # A fixed set of random batches already on the device: measures the step, not the loader.
        batches = [(torch.randint(V, (batch_size, T), device=device),
                    torch.randint(V, (batch_size, T), device=device)) for _ in range(4)]
        counter = iter(range(10**9))

        def next_batch() -> tuple[Tensor, Tensor]:
            return batches[next(counter) % len(batches)]

        def run(steps: int) -> None:
            for _ in range(steps):
                train_step(step_model, optimizer, params, next_batch, cfg.grad_accum_steps,
                           cfg.grad_clip, autocast)

        start = time.perf_counter()
        run(cfg.warmup_steps)
        sync()
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        run(cfg.steps)
        sync()
        step_s = (time.perf_counter() - start) / cfg.steps
        tok_per_s = batch_size * T * cfg.grad_accum_steps / step_s
        flops = mfu_flops_per_token(model_config, T)
        row = {"shape": shape, "params": count_params(model_config)["total"],
               "batch_size": batch_size, "context_length": T, "ms_per_step": step_s * 1e3,
               "tok_per_s": tok_per_s, "tflops": flops * tok_per_s / 1e12,
               "mfu": flops * tok_per_s / peak if peak else None, "warmup_s": warmup_s,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).removeprefix("torch."), "compile": compile_model,
               "optimizer": cfg.optimizer}
        if shape == "tinystories":
            row["minutes_for_327M_tokens"] = TINYSTORIES_TOKENS / tok_per_s / 60
        rows.append(row)
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (unknown peak)"
        print(f"{shape}: {row['params'] / 1e6:.1f}M params, batch {batch_size}x{T} | "
              f"{row['ms_per_step']:.1f} ms/step | {tok_per_s:,.0f} tok/s | "
              f"{row['tflops']:.1f} TFLOP/s | MFU {mfu} | {row['device']}, {row['dtype']}, "
              f"compile={compile_model}, {cfg.optimizer} (warm-up {warmup_s:.1f} s)")
        if shape == "tinystories":
            print(f"  {TINYSTORIES_TOKENS:,} tokens (the course's TinyStories run) take "
                  f"{row['minutes_for_327M_tokens']:.1f} min at this speed")
        if shape == "gpt2":
            print("  nanoGPT on one H200 at this shape: ~503,000 tok/s (~43% MFU)")
        if cfg.profile:
            print_profile(lambda: run(cfg.profile), cfg.profile, device)
        del model, optimizer, step_model, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Command line: `python train.py [train|bench] [CONFIG_FILE] [--key=value | --key value | --flag]`


def _typed(key: str, value, default):
    """value (a command-line string or a config-file value) as the type of the field's default."""
    if isinstance(value, str) and value.lower() in ("true", "false") and (
            default is None or isinstance(default, bool) or default == "auto"):
        return value.lower() == "true"  # --compile=False
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = ast.literal_eval(value)  # "1" -> 1, "3e-4" -> 0.0003, "(0.9, 0.95)" -> tuple
        except (ValueError, SyntaxError):
            if default is None:
                return value  # a string for a field without a typed default
            raise ValueError(f"{key} expects a {type(default).__name__}, got {value!r}") from None
    if default is None or (default == "auto" and isinstance(value, bool)):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)  # --lr=1
    if type(default) is int and isinstance(value, float) and value.is_integer():
        return int(value)  # --max_iters=1e4
    if type(value) is not type(default):
        raise ValueError(f"{key} expects a {type(default).__name__}, got {value!r}")
    return value


def apply_override(cfg: TrainConfig, key: str, value) -> None:
    """Set cfg.key, or the ModelConfig field cfg.model[key], typed from its default."""
    own = {f.name: f.default for f in dataclasses.fields(cfg) if f.name != "model"}
    model = {f.name: None if f.default is dataclasses.MISSING else f.default
             for f in dataclasses.fields(ModelConfig)}
    if key == "model" and isinstance(value, dict):  # e.g. a checkpoint's saved config
        for model_key, model_value in value.items():
            apply_override(cfg, model_key, model_value)
    elif key in own:
        setattr(cfg, key, _typed(key, value, own[key]))
    elif key in model:
        cfg.model[key] = _typed(key, value, model[key])
    else:
        names = [*own, *model]
        close = difflib.get_close_matches(key, names, n=1)
        if close:
            raise ValueError(f"unknown config key {key!r}; did you mean {close[0]!r}?")
        raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(names)}")


def read_config_file(path: str) -> dict:
    """A JSON object, or `key = value` lines with Python literal values (# comments allowed).

    Values go through ast.literal_eval, never exec: a config file cannot run code.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        return json.loads(text)
    values = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{n}: expected `key = value`, got {line!r}")
        # Try the whole value first, so a "#" inside a string is not taken for a comment.
        for candidate in (value, value.split("#", 1)[0]):
            try:
                values[key.strip()] = ast.literal_eval(candidate.strip())
                break
            except (ValueError, SyntaxError):
                continue
        else:
            raise ValueError(f"{path}:{n}: {value.strip()!r} is not a Python literal")
    return values


def parse_config(argv: list[str], cfg: TrainConfig) -> TrainConfig:
    """Config files and --key=value overrides, applied in the order given (later wins)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            for key, value in read_config_file(arg).items():
                apply_override(cfg, key, value)
        elif "=" in arg:
            apply_override(cfg, *arg[2:].split("=", 1))
        elif (i + 1 < len(argv) and not argv[i + 1].startswith("--")
              and not isinstance(getattr(cfg, arg[2:], None), bool)):
            apply_override(cfg, arg[2:], argv[i + 1])  # --data notes.txt
            i += 1
        else:
            apply_override(cfg, arg[2:], "True")  # --resume
        i += 1
    return cfg


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("defaults:", json.dumps(dataclasses.asdict(TrainConfig()), indent=1))
        return
    command = argv[0] if argv and argv[0] in ("train", "bench") else "train"
    argv = argv[1:] if argv and argv[0] == command else argv
    if command == "bench":
        bench(parse_config(argv, BenchConfig()))
    else:
        train(parse_config(argv, TrainConfig()))


if __name__ == "__main__":
    main(sys.argv[1:])
