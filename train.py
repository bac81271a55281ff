"""Stage 3: training, from raw text to a language model that writes stories, in one command.

The training half of CS336 assignment 1, in teaching order: the cross-entropy loss, AdamW
(reference, foreach, fused), learning-rate schedules and clipping, batches, checkpoints that resume
exactly, the training step and the loop (bf16 autocast, torch.compile, gradient accumulation, data
parallelism under torchrun); then Muon and SOAP, the pre-run checks, the data and the command line.

    python train.py                        # CPU, ~5 min: download, tokenizer, encode, train, sample
    python train.py --data=notes.txt       # any UTF-8 text file
    python train.py --preset=nanogpt --dataset=pycode --max_text_mb=0 --vocab_size=32000  # 1 GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=nanogpt ...                # 8 GPUs
    python train.py run.json --lr=3e-4     # a config file (JSON or `key = value` lines), then flags
    python train.py --resume               # continue out_dir/ckpt.pt with the run's own config
    python train.py plot [out_dir]         # loss and learning rate against tokens -> loss.png
`--key=value` sets any TrainConfig field, or any ModelConfig field over the preset. Errors print
one line (`--debug`: the traceback); Ctrl-C saves a checkpoint and exits with 130.

Reads   data_cache/ (made on first use: text, BPE tokenizer, token .bin arrays), or the
        --train_bin/--val_bin/--tokenizer_dir written by `python tokenizer.py encode` or data.py;
        --tokenizer_dir alone: that tokenizer (GPT-2's: tokenizer.gpt2_tokenizer) encodes the text.
Writes  out_dir/ckpt.pt (model, optimizer, config, RNG and data state), metrics.jsonl, samples.txt;
        another run's results are replaced only with --overwrite. Resuming repeats the
        uninterrupted run bit for bit on one CPU thread (tested). kernels.py benchmarks the step.
Papers  Kingma & Ba 2015 (Adam); Loshchilov & Hutter 2019 (AdamW); Hu et al. 2024 (MiniCPM: WSD);
        Jordan et al. 2024 (Muon); Liu et al. 2025 (Muon is Scalable); Vyas et al. 2024 (SOAP);
        Micikevicius et al. 2018 (mixed precision); Li et al. 2020 (PyTorch DDP); Chowdhery et al.
        2022 (PaLM: MFU); Eldan & Li 2023 (TinyStories).
"""
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from model import (PRESETS, ModelConfig, TransformerLM, count_params, generate, mfu_flops_per_token,
                   triton_kernels)
from tokenizer import (Tokenizer, UsageError, atomic_output, encode_file, parse_args, run_cli,
                       token_dtype, train_bpe, write_atomic)

# Config: every knob of a run, in one place --------------------------------------------------------
# Overridden by `--key=value` (typed from the default: `--lr=1` is a float) or a config file.
@dataclass
class TrainConfig:
    # data
    dataset: str = "tinystories"  # "tinystories" (offline: "pycode"), "pycode", "pydoc"
    data: str = ""  # a UTF-8 text file to train on instead of `dataset`
    train_bin: str = ""  # token arrays from `tokenizer.py encode` instead of text...
    val_bin: str = ""  # ...with their validation split...
    tokenizer_dir: str = ""  # ...and the tokenizer that wrote them; alone: it encodes the text
    cache_dir: str = "data_cache"  # downloads, tokenizers and .bin arrays are kept here
    max_text_mb: float = 8.0  # train on at most this much text (0 = all): keeps CPU runs short
    val_fraction: float = 0.05  # share of a single text file held out for validation
    vocab_size: int = 2048  # BPE vocabulary, special tokens included
    # model: a shape from model.py's PRESETS, and any ModelConfig field over it (--d_model=256)
    preset: str = "tiny"  # 128 wide, 4 layers, context 128: ~10k tokens/s on 2 CPU cores
    model: dict = field(default_factory=dict)  # the ModelConfig fields set by flags
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
    eval_interval: int = 100  # steps between validation losses (0 = never)
    eval_iters: int = 20  # batches per validation loss
    log_interval: int = 10  # steps between progress-bar updates (each costs one GPU sync)
    checkpoint_interval: int = 200  # steps between checkpoints (0 = only at the end)
    out_dir: str = "out"  # checkpoint, metrics and samples go here
    resume: bool = False  # continue out_dir/ckpt.pt, with the configuration saved in it
    overwrite: bool = False  # let a new run replace the results of another one in out_dir
    num_samples: int = 3  # texts generated at the end
    sample_tokens: int = 160  # new tokens per sample
    sample_prompt: str = ""  # "" starts each sample at <|endoftext|>, i.e. a fresh document
    temperature: float = 0.8  # sampling temperature
    top_k: int = 50  # sample from the k most likely tokens (0 = all)
    # runtime
    device: str = "auto"  # "auto" = CUDA, then MPS, then CPU
    dtype: str = "auto"  # "auto" = bf16 autocast on GPUs that have it, else "float32"
    compile: str = "auto"  # "auto" = torch.compile on CUDA only; or True / False; "graphs":
    # compiled and replayed as CUDA graphs, so the GPU waits less for Python (one CUDA process)
    seed: int = 1337  # model init, batches and samples
    parallel: str = "torch"  # under torchrun: torch's DDP, or ddp.py's "ddp", "zero1", "fsdp"


# What --resume may change: how long the run goes on, what it reports, where and how it runs.
# Anything else (model, optimizer, data, batch shape, schedule shape) would make it another run.
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "checkpoint_interval",
             "num_samples", "sample_tokens", "sample_prompt", "temperature", "top_k", "out_dir",
             "resume", "overwrite", "device", "dtype", "compile", "cache_dir", "train_bin",
             "val_bin", "tokenizer_dir", "parallel"}
EOT = "<|endoftext|>"


def build_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig.preset(cfg.preset, **{**cfg.model, "vocab_size": vocab_size})


# Loss: the reference, then the fused training loss ------------------------------------------------
def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean of -log softmax(logits)[target] over the positions whose target is not ignored.
    In float32: bf16's 8 bits of mantissa cannot tell a loss of 3.01 from 3.02."""
    logits = logits.float()
    # log softmax_i = x_i - log sum_j exp(x_j). Subtracting the max first keeps exp from
    # overflowing (logits of 1e4 would give inf) without changing the result.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    log_sum_exp = shifted.exp().sum(dim=-1).log()
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)  # ignored positions still need a valid index
    target_logit = shifted.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return ((log_sum_exp - target_logit) * keep).sum() / keep.sum().clamp(min=1)


def _float_masked(logits: Tensor, vocab_size: int) -> Tensor:
    """float32 logits; those past vocab_size (a head padded for speed: LossModel) set to -inf,
    probability 0, in the one float32 copy."""
    if vocab_size >= logits.shape[-1]:
        return logits.float()
    padding = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
    return logits.to(torch.float32, copy=True).masked_fill_(padding, -math.inf)


class _FusedCrossEntropy(torch.autograd.Function):
    """cross_entropy with a hand-written backward: d loss / d logits = softmax - one_hot.
    Autograd through the reference saves float32 log-probabilities: 3.3 GB written and read again
    per GPT-2-small step (16 x 1024 x 50304). Here backward recomputes the softmax from the bf16
    logits and one log-sum-exp per row; compiled, each direction is one fused kernel."""
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int, vocab_size: int) -> Tensor:
        keep = targets != ignore_index
        safe_targets = torch.where(keep, targets, 0)
        logits32 = _float_masked(logits, vocab_size)
        log_sum_exp = torch.logsumexp(logits32, dim=-1)  # (...,), max-shifted inside
        target_logit = logits32.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
        count = keep.sum().clamp(min=1)
        ctx.save_for_backward(logits, safe_targets, keep, log_sum_exp, count)
        ctx.vocab_size = vocab_size
        return ((log_sum_exp - target_logit) * keep).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        logits, safe_targets, keep, log_sum_exp, count = ctx.saved_tensors
        logits32 = _float_masked(logits, ctx.vocab_size)
        grad = torch.exp(logits32 - log_sum_exp.unsqueeze(-1))  # softmax, (..., V)
        # - one_hot as a comparison with the vocabulary index: elementwise, so the whole backward
        # fuses into one pass (a scatter would split it in two)
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        grad.sub_((vocab == safe_targets.unsqueeze(-1)).to(grad.dtype))
        grad.mul_((keep * grad_loss / count).unsqueeze(-1))  # ignored rows get no gradient
        return grad.to(logits.dtype), None, None, None


def fused_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                        vocab_size: int | None = None) -> Tensor:
    """cross_entropy (same arguments, same value) with the lean backward: the training loss.
    vocab_size: only the first vocab_size logits count; the rest are padding (gradient 0)."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    return _FusedCrossEntropy.apply(logits, targets, ignore_index, vocab_size)


def perplexity(mean_loss: float) -> float:  # the branching factor left per token
    return math.exp(mean_loss) if mean_loss < 700 else math.inf  # exp(710) overflows a double


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# AdamW: the reference, a foreach version, a compiled (fused) one, and the optimizer class ---------
# SGD steps along -g. AdamW divides each coordinate by a running RMS of its own gradient (a
# diagonal preconditioner), so every weight moves at about the same speed whatever its gradient's
# scale, and it decays weights *decoupled* from the gradient (w <- w * (1 - lr * wd)). Muon and
# SOAP, which shape the step of a whole matrix, come after the training loop.
Params = Iterable[torch.Tensor] | Iterable[dict]


def adamw_update_reference(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                           exp_avg_sqs: list[Tensor], steps: list[int], *, lr: float,
                           beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step, parameter by parameter, in place (`steps` already incremented), in
    torch.optim.AdamW's order of operations: the two agree bit for bit on CPU (tested)."""
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        # Decoupled: adding wd * w to the gradient instead, Adam's division by sqrt(v) would
        # weaken the decay of weights with large gradients (Loshchilov & Hutter's point).
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)                           # m = beta1 m + (1 - beta1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)   # v = beta2 v + (1 - beta2) g^2
        # m and v start at zero, so early on they underestimate E[g] and E[g^2] by the factors
        # (1 - beta^t); dividing those out makes the very first steps full-sized.
        bias_correction1, bias_correction2 = 1 - beta1**t, 1 - beta2**t
        denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias_correction1)


def adamw_update_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], steps: list[int], *, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The reference with each line applied to the whole list by one torch._foreach_* op."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / (1 - beta1**t) for t in steps])


def _adamw_fused_math(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], numbers: Tensor,
                      grad_scale: Tensor | None) -> None:
    """The reference's lines, with the step's numbers read from one float32 tensor; each
    gradient times grad_scale (clipping's factor) as it is read."""
    decay, one_minus_beta1, beta2, one_minus_beta2, sqrt_bias_correction2, eps, step_size = (
        numbers.unbind())
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        g = g if grad_scale is None else g * grad_scale
        p.mul_(decay)
        m.lerp_(g, one_minus_beta1)
        v.mul_(beta2).addcmul_(g, g * one_minus_beta2)
        p.sub_(m / (v.sqrt() / sqrt_bias_correction2 + eps) * step_size)


@functools.cache
def _compiled_adamw_math() -> Callable:  # compiled once per process; the shapes never change
    return torch.compile(_adamw_fused_math, dynamic=False)


def _to_device(numbers: Tensor, device: torch.device) -> Tensor:
    """A step's numbers on the device. Pinned memory lets the copy run behind the queued GPU
    work instead of waiting for it."""
    return (numbers.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
            else numbers.to(device))


def adamw_update_fused(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], steps: list[int], *, lr: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float,
                       grad_scale: Tensor | None = None) -> None:
    """The reference compiled into one kernel per parameter: it reads p, g, m, v once and writes
    p, m, v once, where foreach makes ~8 passes (1.8 ms against 2.8 per GPT-2-small step on an
    H200). The numbers that change every step travel in a tensor: as Python floats they would be
    baked into the compiled code, one recompile per step. Parameters are bucketed by step.
    grad_scale (a device scalar: clipping's factor) multiplies each gradient as it is read."""
    buckets: dict[int, list[int]] = {}
    for i, t in enumerate(steps):
        buckets.setdefault(t, []).append(i)
    for t, idx in buckets.items():
        numbers = torch.tensor([1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2,
                                math.sqrt(1 - beta2**t), eps, lr / (1 - beta1**t)],
                               dtype=torch.float32)
        numbers = _to_device(numbers, params[idx[0]].device)
        _compiled_adamw_math()(*([lst[i] for i in idx] for lst in
                                 (params, grads, exp_avgs, exp_avg_sqs)), numbers, grad_scale)


def _number(low: float, high: float = math.inf, optional: bool = False,
            integer: bool = False) -> tuple[Callable, str]:
    """A hyperparameter rule: a number in [low, high) (NaN fails), or None when optional."""
    def ok(v: object) -> bool:
        number = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
        return (optional and v is None) or (number and low <= v < high)
    return ok, f"an integer >= {low}" if integer else f"a number in [{low}, {high})"


BOOL = (lambda v: isinstance(v, bool), "True or False")
ADAMW_RULES = {"lr": _number(0), "eps": _number(0), "weight_decay": _number(0),
               "betas[0]": _number(0, 1), "betas[1]": _number(0, 1), "fused": BOOL}


def check_hyperparameters(group: dict, rules: dict[str, tuple[Callable, str]]) -> None:
    """Raise a ValueError naming the first value of a parameter group that breaks its rule."""
    betas = group.get("betas", (0.0, 0.0))
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    values = {**group, "betas[0]": betas[0], "betas[1]": betas[1]}
    for key, (ok, expected) in rules.items():
        if not ok(values[key]):
            raise ValueError(f"{key} must be {expected}, got {values[key]!r}")


class _Optimizer(torch.optim.Optimizer):
    """What AdamW, Muon and SOAP share: each parameter group is checked against RULES as it is
    added (a bad one is removed again); step() runs the closure, then _update() without autograd.
    Step counts are kept per parameter, so a checkpoint resumes exactly."""
    RULES = ADAMW_RULES
    # How a step is computed, not which step: a loaded state_dict keeps the current choices, so a
    # checkpoint written on a GPU (fused) resumes on a CPU (loop) and the other way round.
    RUNTIME_KEYS = ("foreach", "fused")

    def _check_params(self, group: dict) -> None:
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"complex parameters are not supported (shape {tuple(p.shape)})")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:  # checked after torch fills in the defaults, so per-group values are checked too
            check_hyperparameters(self.param_groups[-1], self.RULES)
            self._check_params(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        runtime = [{k: g[k] for k in self.RUNTIME_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, runtime):
            group.update(keys)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None,
             grad_scale: Tensor | None = None) -> Tensor | None:
        """grad_scale: a factor for every gradient (clipping's: train_step). Fused AdamW and Muon
        apply it as they read each gradient, which saves clipping's own pass over all of them
        (0.27 ms of a GPT-2-small step on an H200); other paths scale the gradients in place
        first. A subclass's _update must apply it."""
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        self._update(grad_scale)
        return loss

    @staticmethod
    def _scale_in_place(grads: list[Tensor], grad_scale: Tensor | None) -> None:
        if grad_scale is not None and grads:
            torch._foreach_mul_(grads, grad_scale)

    def _groups_with_grads(self) -> list[tuple[dict, list]]:
        """(group, its parameters with a gradient): the others keep their step count, as in
        torch.optim.AdamW. Sparse gradients are refused before any update."""
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        if any(p.grad.is_sparse for _, params in groups for p in params):
            raise ValueError("sparse gradients are not supported (e.g. nn.Embedding(sparse=True)); "
                             "use dense gradients")
        return groups

    def _adamw_step(self, group: dict, params: list[Tensor], grad_scale: Tensor | None) -> None:
        """AdamW on `params` (all with a gradient) of one group; Muon and SOAP use it for their
        non-matrix parameters."""
        if not params:
            return
        states = [self.state[p] for p in params]
        for state, p in zip(states, params):
            if "step" not in state:  # a Python int: it needs no host sync and saves as is
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        grads = [p.grad for p in params]
        # foreach launches one kernel per *list* instead of one per tensor, which pays on a GPU;
        # on a CPU it falls back to a loop, so there the plain loop is the default.
        if group["fused"]:
            update = functools.partial(adamw_update_fused, grad_scale=grad_scale)
        else:
            self._scale_in_place(grads, grad_scale)
            foreach = group["foreach"]
            if foreach is None:  # the default: foreach when every tensor is on a GPU
                foreach = all(p.is_cuda for p in params)
            update = adamw_update_foreach if foreach else adamw_update_reference
        beta1, beta2 = group["betas"]
        update(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
               [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2,
               eps=group["eps"], weight_decay=group["weight_decay"])


class AdamW(_Optimizer):
    """Adam with decoupled weight decay: torch.optim.AdamW's math. foreach=None takes the foreach
    path when a group's parameters are all on CUDA; fused=True runs adamw_update_fused, the
    fastest on a GPU (its first step compiles for seconds)."""
    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, foreach: bool | None = None,
                 fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach, fused=fused))

    def _update(self, grad_scale: Tensor | None) -> None:
        for group, params in self._groups_with_grads():
            self._adamw_step(group, params, grad_scale)


# Learning-rate schedules and gradient clipping ----------------------------------------------------
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
    The stable phase does not depend on the run's length, so one run can branch into decays at
    several lengths (MiniCPM; Hagele et al. 2024), which the cosine schedule cannot."""
    if t < warmup_iters:
        return t / warmup_iters * lr_max
    decay_start = total_iters - decay_iters
    if t < decay_start:
        return lr_max
    if t < total_iters:
        return lr_max + (t - decay_start) / decay_iters * (lr_min - lr_max)
    return lr_min


def lr_at(cfg: TrainConfig, t: int) -> float:
    if cfg.schedule == "wsd":
        return lr_wsd(t, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters,
                      max(1, int(cfg.decay_frac * cfg.max_iters)))
    return lr_cosine(t, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients in place so their global L2 norm is at most max_norm; return the norm.
    Global: clipping changes the step's length, never its direction."""
    grads = [p.grad for p in params if p.grad is not None]
    total, scale = grad_norm_and_clip_scale(grads, max_norm)
    if grads:
        torch._foreach_mul_(grads, scale)
    return total


def grad_norm_and_clip_scale(grads: list[Tensor], max_norm: float) -> tuple[Tensor, Tensor]:
    """(the global L2 norm of grads, the factor min(1, max_norm / norm) that clips it). Both stay
    tensors (no `if norm > max_norm` on the host), so the GPU never waits."""
    if not grads:
        return torch.zeros(()), torch.ones(())
    # The norm of the per-tensor norms is the norm of everything, without concatenating.
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return total, (max_norm / (total + 1e-6)).clamp(max=1.0)


# Batches: random windows of a token array ---------------------------------------------------------
def get_batch(tokens: np.ndarray, batch_size: int, context_length: int, device: torch.device | str,
              generator: torch.Generator | None = None, rank: int = 0,
              world_size: int = 1) -> tuple[Tensor, Tensor]:
    """batch_size random windows: inputs (B, T) and the next-token targets (B, T), the inputs
    shifted by one, so every position is a training example. Saving `generator`'s state makes
    resuming exact. With several processes each draws the same global batch and keeps its slice."""
    if len(tokens) <= context_length:
        raise ValueError(f"{len(tokens)} tokens cannot fill one window of context_length="
                         f"{context_length}: use more text or a shorter context_length")
    starts = torch.randint(len(tokens) - context_length, (batch_size * world_size,),
                           generator=generator)[rank * batch_size:(rank + 1) * batch_size]
    windows = np.stack([tokens[s:s + context_length + 1] for s in starts.tolist()])
    windows = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    device = torch.device(device)
    if pin := device.type == "cuda":  # page-locked memory: the copy runs while the GPU computes
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)


# Checkpoints: everything needed to continue the run as if it had never stopped --------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's, DDP's and LossModel's wrappers: what is saved."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, LossModel)):
            model = model.module if hasattr(model, "module") else model.model
        else:
            return model


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    path: str | Path, **extra) -> None:
    """Write model, optimizer, iteration, every RNG state and `extra` (config, data state) to
    path.tmp, then rename it over path: a crash mid-save leaves the previous checkpoint whole."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [x.tolist() if isinstance(x, np.ndarray) else x
                     for x in np.random.get_state()]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "iteration": iteration, "rng": rng, **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:  # weights_only: loading a checkpoint never runs code from it
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several kinds for a cut-off or foreign file
        raise ValueError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): "
                         f"{e}") from e


def restore_checkpoint(state: dict, model: nn.Module,
                       optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a read_checkpoint() dict into model (and optimizer), restore the RNG states and
    return the iteration."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["iteration"]


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> int:
    return restore_checkpoint(read_checkpoint(path), model, optimizer)


# The training step: the same function runs in the loop and in kernels.py's bench ------------------
class LossModel(nn.Module):
    """The language model and its loss as one module: torch.compile sees the last matmul and the
    loss together, and DDP wraps one module that returns what backward needs."""
    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model
        # kernels="triton": kernels.py's head and loss in one, never making the (B, T, V) logits
        self.linear_cross_entropy = (triton_kernels().fused_linear_cross_entropy
                                     if model.config.kernels == "triton" else None)
        # Tensor cores like sizes that are multiples of 64: GPT-2's 50,257-token head made the
        # step 9% slower than 50,304 (nanoGPT pads its vocabulary). Here the head's matmul alone
        # runs padded, with zero rows, and the loss gives the extra logits probability 0: the
        # model, its checkpoints and its samples keep the tokenizer's vocabulary. (Slicing the
        # logits back to 50,257 for the loss instead: 33.94 ms a step against 33.07 on an H200.)
        self.pad_rows = -model.config.vocab_size % 64 if model.lm_head.bias is None else 0
        # fp8=True: the head's matmul in FP8 too while training (sizes padded to 64 as FP8 needs)
        self.fp8_linear = (triton_kernels("fp8=True").fp8_linear
                           if model.config.fp8 and model.lm_head.bias is None else None)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # (loss, auxiliary loss)
        if self.linear_cross_entropy is not None:
            hidden = self.model(x, return_hidden=True)  # (B, T, D)
            loss = self.linear_cross_entropy(hidden.flatten(0, -2), self.model.lm_head.weight,
                                             y.flatten())
        # (ddp.py's FSDP gathers the head's weight only inside lm_head's call: None here)
        elif (self.pad_rows or self.fp8_linear) and self.model.lm_head.weight is not None:
            hidden = self.model(x, return_hidden=True)
            weight = nn.functional.pad(self.model.lm_head.weight, (0, 0, 0, self.pad_rows))
            logits = (self.fp8_linear(hidden, weight) if self.fp8_linear and self.model.training
                      else hidden @ weight.T)  # (B, T, V + pad_rows)
            loss = fused_cross_entropy(logits, y, vocab_size=self.model.config.vocab_size)
        else:
            loss = fused_cross_entropy(self.model(x), y)
        return loss, self.model.aux_loss


def loss_model(model: TransformerLM, compiled: bool | str) -> nn.Module:
    """LossModel(model), compiled if asked; "graphs": its forward and backward replayed as CUDA
    graphs (mode="reduce-overhead"), one launch each instead of hundreds."""
    return torch.compile(LossModel(model), mode="reduce-overhead" if compiled == "graphs" else
                         None) if compiled else LossModel(model)


def clip_and_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor],
                  grad_clip: float) -> Tensor:
    """Clip the gradients to a global norm of grad_clip (0: no clipping), then step; return the
    norm. Our optimizers take clipping's factor into their update (step's grad_scale), so the
    gradients are not rewritten first; ddp.py's wrappers clip themselves, having to finish
    averaging the gradients first (FSDP: the norm spans every rank's shards)."""
    max_norm = grad_clip if grad_clip > 0 else math.inf
    clip = getattr(step_model, "clip_grad_norm", None)
    if clip is None and isinstance(optimizer, _Optimizer):
        grad_norm, scale = grad_norm_and_clip_scale(
            [p.grad for p in params if p.grad is not None], max_norm)
        optimizer.step(grad_scale=scale)
    else:
        grad_norm = (clip or clip_grad_norm)(params, max_norm)
        optimizer.step()
    return grad_norm


def train_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, params: list[Tensor],
               next_batch: Callable[[], tuple[Tensor, Tensor]], accum_steps: int,
               grad_clip: float, autocast: contextlib.AbstractContextManager,
               no_sync: Callable | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer step over accum_steps micro-batches: (mean loss, gradient norm), both left
    on the device: reading them makes the CPU wait for the GPU, so the loop does it rarely."""
    loss_sum = 0.0
    for micro in range(accum_steps):
        x, y = next_batch()
        # DDP averages gradients across processes in backward; before the last micro-batch that
        # is wasted traffic, since the gradients keep accumulating locally.
        last = micro == accum_steps - 1
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()):
            with autocast:
                loss, aux_loss = step_model(x, y)
            ((loss + aux_loss) / accum_steps).backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = clip_and_step(step_model, optimizer, params, grad_clip)
    optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of writing zeros
    return loss_sum / accum_steps, grad_norm


# The training loop --------------------------------------------------------------------------------
# setup() readies the run (output folder, resumed checkpoint, data, model, optimizer);
# log_progress, evaluate and save report and keep it.
class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised after the final checkpoint was saved."""


def train(cfg: TrainConfig,
          wrap_model: Callable[[nn.Module, torch.device], nn.Module] | None = None) -> dict:
    """Run one training job; return {"model", "tokenizer", "iteration", "val_loss", ...}.
    wrap_model is --parallel=torch's data-parallel hook (torch's DDP by default)."""
    check_config(cfg)  # every knob, before any work
    rank, _, world_size, device = setup_distributed(cfg.device)
    run = None
    try:
        run = setup(cfg, rank, world_size, device, wrap_model or wrap_ddp)
        bar = tqdm(total=cfg.max_iters, initial=run.start_iter, disable=rank != 0, desc="train",
                   dynamic_ncols=True)
        val_loss, loss, grad_norm = math.nan, torch.zeros(()), torch.zeros(())
        with CtrlC() as ctrl_c:
            for it in range(run.start_iter, cfg.max_iters):
                lr = lr_at(cfg, it)  # each group's peak rate (Muon's differ) scaled alike
                for group, base in zip(run.optimizer.param_groups, run.base_lrs):
                    group["lr"] = base * (lr / cfg.lr if cfg.lr else 0.0)
                loss, grad_norm = train_step(run.step_model, run.optimizer, run.params,
                                             run.next_batch, cfg.grad_accum_steps,
                                             cfg.grad_clip, run.autocast, run.no_sync)
                done, last = it + 1, it + 1 == cfg.max_iters
                if done % cfg.log_interval == 0 or last:
                    log_progress(run, bar, done, loss, grad_norm, lr)
                bar.update(1)
                stop = ctrl_c.pressed(run, done)
                if cfg.eval_interval and (done % cfg.eval_interval == 0 or last):
                    val_loss = evaluate(run, bar, done)
                if last or stop or (cfg.checkpoint_interval
                                    and done % cfg.checkpoint_interval == 0):
                    save(run, done, loss, grad_norm)
                if stop:
                    bar.close()
                    raise TrainingInterrupted(f"interrupted: iteration {done} saved to "
                                              f"{run.ckpt_path}; continue it with --resume")
        bar.close()
        if hasattr(run.step_model, "unshard"):  # FSDP: whole weights, for samples on rank 0
            run.step_model.unshard()
        samples = (write_samples(run.model, run.tok, cfg, device, run.autocast, run.out_dir)
                   if rank == 0 else [])
        if dist.is_initialized():  # leave together: a rank that tears its connections down
            dist.barrier()         # while rank 0 writes samples can abort it (seen with gloo)
        return {"model": run.model, "tokenizer": run.tok, "val_loss": val_loss,
                "iteration": max(run.start_iter, cfg.max_iters),
                "unigram_entropy": run.baseline, "samples": samples}
    finally:
        if run is not None:  # the prefetch thread, also after an error or Ctrl-C
            run.loader.shutdown(cancel_futures=True)
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """What the loop and its helpers share; made by setup()."""
    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    out_dir: Path
    tok: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    model_config: ModelConfig
    model: TransformerLM
    optimizer: torch.optim.Optimizer
    step_model: nn.Module  # LossModel, compiled, wrapped for data parallelism
    no_sync: Callable | None  # DDP's "do not average gradients yet", for gradient accumulation
    autocast: contextlib.AbstractContextManager
    generator: torch.Generator  # draws the training batches; the same on every rank
    start_iter: int
    base_lrs: list[float]  # each parameter group's peak rate, which the schedule scales
    cpu_group: object  # a gloo group: ranks agree on CPU-side things without touching the GPU

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ckpt_path = self.out_dir / "ckpt.pt"
        self.tokens_per_step = (self.cfg.batch_size * self.model_config.context_length
                                * self.cfg.grad_accum_steps * self.world_size)
        self.baseline = unigram_entropy(self.train_tokens[:10_000_000], self.tok.vocab_size)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.start_iter, self.rank)
        self.clock = (time.perf_counter(), self.start_iter)  # where tokens/s is measured from
        self.ahead = None  # next_batch's thread pins memory on the run's GPU, not on GPU 0
        self.loader = ThreadPoolExecutor(1, initializer=torch.cuda.set_device if self.device.type
                                         == "cuda" else None, initargs=(self.device.index or 0,))
        self.batches_left = (self.cfg.max_iters - self.start_iter) * self.cfg.grad_accum_steps

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next training batch, drawn, pinned and copied by a worker thread while the GPU
        ran the step before; self.generator is set just after it: checkpoints resume exactly."""
        if self.ahead is None:  # the first batch (or one past the run's last)
            self.ahead = self.loader.submit(self._draw, self.generator.get_state())
        (x, y), state = self.ahead.result()
        self.generator.set_state(state)
        self.batches_left -= 1  # none drawn past the run's last: one get_batch per batch used
        self.ahead = self.loader.submit(self._draw, state) if self.batches_left > 0 else None
        return x, y

    def _draw(self, state: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        gen = torch.Generator().set_state(state)
        return (get_batch(self.train_tokens, self.cfg.batch_size, self.model_config.context_length,
                          self.device, gen, self.rank, self.world_size), gen.get_state())


def setup(cfg: TrainConfig, rank: int, world_size: int, device: torch.device,
          wrap_model: Callable[[nn.Module, torch.device], nn.Module]) -> Run:
    """Everything the loop needs, checked cheapest first: the output folder, the checkpoint to
    resume, then the data (hours, for a big corpus), the model and the optimizer."""
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = resolve_dtype(cfg.dtype, device)
    compile_model = "graphs" if cfg.compile == "graphs" else use_compile(cfg.compile, device)
    if compile_model == "graphs" and (device.type != "cuda" or world_size > 1):
        raise ValueError(f"--compile=graphs (CUDA graphs) needs one process on a CUDA GPU, not "
                         f"{world_size} on {device.type}")
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls on Ampere and later
    out_dir = prepare_out_dir(cfg, rank == 0)
    state = read_checkpoint(out_dir / "ckpt.pt") if cfg.resume else None
    if state is not None:
        check_resumable(state, cfg, world_size)
    # Preparing a big corpus can take hours, far past NCCL's default timeout: the other ranks
    # wait for rank 0 on a CPU (gloo) group created with a patient timeout.
    cpu_group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
                 if world_size > 1 else None)
    tok, train_tokens, val_tokens = load_data(cfg, rank == 0, cpu_group)
    if state is not None and state.get("tokenizer") != tok.fingerprint():
        raise ValueError("cannot resume: the checkpoint was trained with another tokenizer "
                         f"({state.get('tokenizer')!r}, now {tok.fingerprint()!r})")
    model_config = build_model_config(cfg, tok.vocab_size)
    for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) <= model_config.context_length:
            raise ValueError(f"the {split} split has {len(tokens):,} tokens, too few for one "
                             f"window of context_length={model_config.context_length}: use more "
                             "text (--max_text_mb, --val_fraction) or a shorter context_length")
    torch.manual_seed(cfg.seed)  # the same on every rank, so all replicas start equal
    model = TransformerLM(model_config).to(device)
    optimizer = build_optimizer(model, cfg, device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a checkpoint sets others
    generator, start_iter = torch.Generator().manual_seed(cfg.seed), 0
    if state is not None:
        start_iter = restore_checkpoint(state, model, optimizer)
        generator.set_state(state["data_generator"])
        log(f"resuming {out_dir / 'ckpt.pt'} at iteration {start_iter}")
    # Compile inside DDP (as nanoGPT does): DDP's gradient hooks stay outside the compiled graph.
    step_model = loss_model(model, compile_model)
    if world_size > 1 and cfg.parallel != "torch":  # ddp.py's: a later stage, loaded on demand
        import ddp
        step_model, optimizer = ddp.parallelize(cfg.parallel, step_model, optimizer)
    elif world_size > 1:
        step_model = wrap_model(step_model, device)
    run = Run(cfg, rank, world_size, device, out_dir, tok, train_tokens, val_tokens,
              model_config, model, optimizer, step_model, getattr(step_model, "no_sync", None),
              autocast_for(device, dtype), generator, start_iter, base_lrs, cpu_group)
    model.train()
    log(f"model: {count_params(model_config)['total'] / 1e6:.2f}M parameters | "
        f"{train_tokens.size:,} train / {val_tokens.size:,} val tokens | device {device}, "
        f"{str(dtype).removeprefix('torch.')}, compile={compile_model}, {world_size} process(es)")
    log(f"unigram baseline: {run.baseline:.3f} nats/token (a model that ignores context)")
    return run


def log_progress(run: Run, bar: tqdm, iteration: int, loss: Tensor, grad_norm: Tensor,
                 lr: float) -> None:
    """A metrics row and the progress bar's numbers; .item() here is the loop's only GPU sync."""
    if run.world_size > 1:  # the mean over ranks; every rank then sees the same NaN
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= run.world_size
    check_finite(run, loss, grad_norm, iteration)
    (start, start_iter), now = run.clock, time.perf_counter()
    tok_per_s = run.tokens_per_step * (iteration - start_iter) / max(now - start, 1e-9)
    run.clock, peak = (now, iteration), peak_flops(run.device)
    flops = mfu_flops_per_token(run.model_config, run.model_config.context_length) * tok_per_s
    row = {"iter": iteration, "tokens": iteration * run.tokens_per_step, "loss": loss.item(),
           "lr": lr, "grad_norm": grad_norm.item(), "tok_per_s": tok_per_s,
           "mfu": flops / (peak * run.world_size) if peak else None}
    run.metrics.append(row)
    postfix = {"loss": f"{row['loss']:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_per_s:,.0f}"}
    bar.set_postfix(postfix | ({"mfu": f"{row['mfu']:.1%}"} if peak else {}), refresh=False)


def check_finite(run: Run, loss: Tensor, grad_norm: Tensor, iteration: int) -> None:
    if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
        kept = (f"the last good checkpoint {run.ckpt_path} is kept" if run.ckpt_path.exists()
                else "no checkpoint was written")
        raise FloatingPointError(
            f"loss {loss.item()} / gradient norm {grad_norm.item()} at iteration {iteration}: "
            f"training diverged; {kept}. Try a lower --lr or a longer --warmup_iters")


@torch.no_grad()
def evaluate(run: Run, bar: tqdm, iteration: int) -> float:
    """Mean validation loss over eval_iters global batches, averaged over processes. The batches
    come from their own generator, seeded alike at every evaluation: each sees the same windows
    (comparable numbers) and the training batches are not disturbed."""
    run.model.eval()
    generator = torch.Generator().manual_seed(run.cfg.seed + 7)
    total = torch.zeros((), device=run.device)
    for _ in range(run.cfg.eval_iters):
        x, y = get_batch(run.val_tokens, run.cfg.batch_size, run.model_config.context_length,
                         run.device, generator, run.rank, run.world_size)
        with run.autocast:
            total += run.step_model(x, y)[0].float()
    if run.world_size > 1:
        dist.all_reduce(total)
        total /= run.world_size
    val_loss = total.item() / run.cfg.eval_iters
    run.model.train()
    if run.rank == 0:
        bar.write(f"iter {iteration}: val loss {val_loss:.3f} (perplexity "
                  f"{perplexity(val_loss):.1f}) | unigram baseline {run.baseline:.3f}")
    run.metrics.append({"iter": iteration, "tokens": iteration * run.tokens_per_step,
                        "val_loss": val_loss, "val_ppl": perplexity(val_loss),
                        "unigram_entropy": run.baseline})
    run.metrics.flush()
    run.clock = (time.perf_counter(), iteration)  # tokens/s counts training time only
    return val_loss


def save(run: Run, iteration: int, loss: Tensor, grad_norm: Tensor) -> None:
    """Checkpoint and metrics; never weights that a non-finite step may have spoilt."""
    check_finite(run, loss, grad_norm, iteration)
    full = getattr(run.step_model, "full_state", None)  # ddp.py's: gathered by every rank
    model, optimizer = full(run.model, run.optimizer) if full else (run.model, run.optimizer)
    if run.rank == 0:
        save_checkpoint(model, optimizer, iteration, run.ckpt_path,
                        config=dataclasses.asdict(run.cfg),
                        model_config=dataclasses.asdict(run.model_config),
                        tokenizer=run.tok.fingerprint(), data_generator=run.generator.get_state(),
                        world_size=run.world_size)
        run.metrics.flush()
    run.clock = (time.perf_counter(), iteration)


class MetricsLog:
    """out_dir/metrics.jsonl: a resumed run's rows up to its checkpoint, then this run's, written
    again in one atomic rename at each evaluation and checkpoint. Till the first of those, an
    earlier run's file stays whole."""
    def __init__(self, path: Path, resume_from: int, rank: int) -> None:
        self.path, self.master = path, rank == 0
        old = path.read_text().splitlines() if resume_from and path.exists() else []
        self.rows = [r + "\n" for r in old if json.loads(r)["iter"] <= resume_from]

    def append(self, row: dict) -> None:
        self.rows.append(json.dumps(row) + "\n")

    def flush(self) -> None:
        if self.master:
            write_atomic(self.path, "".join(self.rows))


class CtrlC:
    """Within `with CtrlC()`, the first Ctrl-C only sets a flag that the loop reads after the
    step, so the final checkpoint holds whole steps; a second one interrupts at once."""
    def __enter__(self) -> "CtrlC":
        self.flag, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # where signals are handled
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum: int, frame: object) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def pressed(self, run: Run, iteration: int) -> bool:
        """Whether to stop after this step. Processes must stop at the same step, so several
        agree at log steps, over the CPU group (no wait for the GPU)."""
        if run.world_size == 1 or iteration % run.cfg.log_interval:
            return self.flag and run.world_size == 1
        flag = torch.tensor([int(self.flag)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.cpu_group)
        return bool(flag.item())


@torch.no_grad()
def write_samples(model: TransformerLM, tok: Tokenizer, cfg: TrainConfig, device: torch.device,
                  autocast: contextlib.AbstractContextManager, out_dir: Path) -> list[str]:
    """Generate cfg.num_samples texts, print them and write them to out_dir/samples.txt."""
    model.eval()
    eot = tok.token_id(EOT)
    prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [eot]
    torch.manual_seed(cfg.seed)
    samples = []
    for _ in range(cfg.num_samples):
        with autocast:
            ids = generate(model, torch.tensor([prompt], device=device), cfg.sample_tokens,
                           temperature=cfg.temperature, top_k=cfg.top_k or None, eos_id=eot)
        new = ids[0, len(prompt):].tolist()
        new = new[:new.index(eot)] if eot in new else new  # a document ends at <|endoftext|>
        samples.append(cfg.sample_prompt + tok.decode(new))
    text = "".join(f"--- sample {i + 1} ---\n{s.strip()}\n" for i, s in enumerate(samples))
    print(text, end="")
    write_atomic(out_dir / "samples.txt", text)
    return samples


# Beyond AdamW: optimizers that shape the step of a whole weight matrix ----------------------------
#   Muon replaces the (momentum-averaged) gradient U S V^T by U V^T, the nearest orthogonal
#        matrix, so every direction of the matrix moves equally.
#   SOAP learns a rotation per weight matrix (Shampoo's Kronecker factors) and runs Adam in it,
#        a full-matrix-like preconditioner at the cost of two small eigenbases per matrix.
# Both give non-matrix parameters (and, for Muon, embeddings and the head) a plain AdamW step.
def zeropower_via_newtonschulz(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise G: U S V^T -> U S' V^T with every S' near 1 (0.7 to 1.2).
    The exact U V^T needs an SVD, slow on a GPU. X <- a X + b (X X^T) X + c (X X^T)^2 X needs only
    matmuls and maps each singular value s <- a s + b s^3 + c s^5, after G / ||G||_F put them in
    [0, 1]. Jordan et al. tuned (a, b, c) for the steepest slope at 0 while keeping every s in a
    band around 1: fast, not exact. bf16 on CUDA (float16 for wide matrices: newtonschulz_gram),
    else float32; G may be a stack (..., m, n)."""
    if G.ndim < 2:
        raise ValueError(f"expected a matrix or a stack of them, got shape {tuple(G.shape)}")
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G  # work with the smaller Gram matrix X X^T: (min, min), not (max, max)
    m, n = X.shape[-2:]
    gram = n >= 2.5 * m  # see newtonschulz_gram: a fifth of the flops or more saved
    # one batch dim, as baddbmm wants; normalised in float32 before the cast, where a tiny
    # gradient would underflow float16 (eps: a zero gradient stays zero, no NaN)
    flat = X.reshape(-1, m, n).float()
    flat = flat / (flat.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    flat = flat.to((torch.float16 if gram else torch.bfloat16) if G.is_cuda else torch.float32)
    if gram:
        flat = newtonschulz_gram(flat, steps)
    else:
        for _ in range(steps):
            flat = _newtonschulz_polynomial(flat @ flat.mT) @ flat
    X = flat.view(X.shape)
    return (X.mT if tall else X).to(G.dtype)


def _newtonschulz_polynomial(A: Tensor) -> Tensor:
    """B = a I + b A + c A A for a stack of symmetric A; then X <- B X. baddbmm(C, P, Q, beta=s,
    alpha=t) = s C + t P Q sums inside the matmul, with no extra pass over memory; A A^T (= A A)
    lets cuBLAS read both operands along the summed dimension; a I goes on the small matrix's
    diagonal rather than a X into the large product (the README's table: 3.26 ms a step against
    3.94, GPT-2 small on an H200), which in bf16 costs a little precision (1.2% off float64's
    result instead of 1.0%; Jordan et al.'s reference does every sum in bf16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    B = torch.baddbmm(A, A, A.mT, beta=b, alpha=c)
    B.diagonal(dim1=-2, dim2=-1).add_(a)
    return B


def newtonschulz_gram(X: Tensor, steps: int = 5, restart: int = 3) -> Tensor:
    """Newton-Schulz for a stack of normalised wide X (m x n, n >= 2.5 m) on m x m matrices only.
    Each step multiplies X by B, a polynomial of R = X X^T; so X_k = Q X with Q = B_k ... B_0,
    and R's next value is B R B^T = B R B (B is symmetric). A step costs 4 m^3 multiply-adds
    instead of 2 m^2 n + m^3, plus X X^T and Q X at the ends and at each restart: GPT-2 small's
    (768, 2048) stack in 22% fewer flops, 1.53 ms instead of 1.86 on an H200. But R squares X's
    condition number (a singular value of 1e-2 becomes 1e-4, below bf16's resolution of 4e-3,
    within float16's 5e-4), and R <- B R B never corrects its own rounding, whose error about
    doubles a step. Hence float16, and every `restart` steps Q folded into X and R recomputed
    exactly (after the third of five steps), by when small singular values have grown x3.4 a
    step; Q grows at most 3.44^3 = 41 in between, far below float16's 65504. 0.2-0.4% off
    float64 on the H200, against 1.2-3.2% for the bf16 plain iteration."""
    R, Q = X @ X.mT, None
    for k in range(steps):
        B = _newtonschulz_polynomial(R)
        Q = B if Q is None else B @ Q
        if k == steps - 1:
            break
        if k % restart == restart - 1:  # fold Q into X and start afresh from the exact X X^T
            X, Q = Q @ X, None
            R = X @ X.mT
        else:
            R = B @ R @ B
    return X if Q is None else Q @ X


def _muon_math(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], numbers: Tensor,
               nesterov: bool, ns_steps: int, grad_scale: Tensor | None = None) -> None:
    """Muon's update (the class docstring's lines) for one stack of equal-shaped matrices, tall
    ones transposed, so that a (2048, 768) matrix joins the (768, 2048) ones. The step's numbers
    come in one float32 tensor: compiled, floats would be baked in (see adamw_update_fused).
    Each gradient is multiplied by grad_scale (clipping's factor) as it is read."""
    decay, one_minus_momentum, momentum, step_size = numbers.unbind()
    updates = []
    for p, g, buf in zip(params, grads, bufs):
        g = g if grad_scale is None else g * grad_scale
        buf.lerp_(g, one_minus_momentum)
        # Nesterov: mix the fresh gradient back in, into a new tensor (p.grad stays the caller's)
        u = (g.lerp(buf, momentum) if nesterov else buf).reshape(p.size(0), -1)
        updates.append(u.mT if u.size(0) > u.size(1) else u)
    ortho = zeropower_via_newtonschulz(torch.stack(updates), ns_steps)
    for p, o in zip(params, ortho.unbind(0)):
        o = o.mT if p.size(0) > p[0].numel() else o  # a tall p's update was transposed
        p.mul_(decay).sub_(o.reshape(p.shape) * step_size)


@functools.cache
def _compiled_muon_math() -> Callable:  # one compilation per stack shape
    return torch.compile(_muon_math, dynamic=False)


def muon_update(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float,
                momentum: float, nesterov: bool, ns_steps: int, weight_decay: float,
                fused: bool, grad_scale: Tensor | None = None) -> None:
    """A Muon group's step: one stack per matrix shape, orthogonalised in one batched call.
    fused=True compiles it: the momentum, stacking, casts and weight update fuse into a few
    kernels around cuBLAS's batched matmuls, which then are most of the time."""
    stacks: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        rows, cols = p.size(0), p[0].numel()
        stacks.setdefault((min(rows, cols), max(rows, cols)), []).append(i)
    for (_, longest), idx in stacks.items():
        numbers = _to_device(torch.tensor([1 - lr * weight_decay, 1 - momentum, momentum,
                                           lr * 0.2 * longest ** 0.5]), params[idx[0]].device)
        (_compiled_muon_math() if fused else _muon_math)(
            *([lst[i] for i in idx] for lst in (params, grads, bufs)), numbers, nesterov, ns_steps,
            grad_scale)


class Muon(_Optimizer):
    """Muon (Jordan et al. 2024): momentum, then orthogonalise the update, for hidden matrices.
    For a weight matrix W in a use_muon=True group (more than 2 dims: flattened to (size(0), -1)):
        buf <- momentum * buf + (1 - momentum) * g                 (an EMA, like Adam's m)
        u   <- (1 - momentum) * g + momentum * buf  if nesterov else buf
        W   <- W * (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(rows, cols)) * NS(u)
    Rare directions of the gradient get as large a step as the dominant one. Moonshot's scale
    (Liu et al. 2025) makes the update's RMS 0.2 * lr, a typical AdamW update, so Muon shares
    AdamW's lr and schedule. use_muon=False groups get AdamW (param_groups_for_muon)."""
    RULES = {**ADAMW_RULES, "momentum": _number(0, 1), "ns_steps": _number(1, integer=True),
             "use_muon": BOOL, "nesterov": BOOL}

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 use_muon: bool = True, foreach: bool | None = None,
                 fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, weight_decay=weight_decay, betas=betas,
                                      eps=eps, use_muon=use_muon, foreach=foreach, fused=fused))

    def _check_params(self, group: dict) -> None:
        super()._check_params(group)
        for p in group["params"] if group["use_muon"] else []:
            if p.ndim < 2:
                raise ValueError(
                    f"a use_muon=True group holds a parameter of shape {tuple(p.shape)}; Muon "
                    "only orthogonalises matrices: put vectors in a use_muon=False group "
                    "(param_groups_for_muon(model, ...) does the split)")

    def _update(self, grad_scale: Tensor | None) -> None:
        for group, params in self._groups_with_grads():
            if not group["use_muon"] or not params:  # no gradients: _adamw_step does nothing
                self._adamw_step(group, params, grad_scale)
                continue
            lr, momentum, grads = group["lr"], group["momentum"], [p.grad for p in params]
            for p in [p for p in params if "momentum_buffer" not in self.state[p]]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            muon_update(params, grads, bufs, lr=lr, momentum=momentum, nesterov=group["nesterov"],
                        ns_steps=group["ns_steps"], weight_decay=group["weight_decay"],
                        fused=group["fused"], grad_scale=grad_scale)


def _rotate_second_moment(v: Tensor, rotation_left: Tensor | None,
                          rotation_right: Tensor | None) -> Tensor:
    """Re-express Adam's diagonal second moment v after a change of basis X_new = Rl X Rr^T.
    Treating coordinates as independent, var(X_new[i, k]) = sum_jl Rl[i, j]^2 Rr[k, l]^2 v[j, l]:
    exact when the new basis is a permutation or sign flip of the old one (eigh's ordering)."""
    if rotation_left is not None:
        v = rotation_left.square() @ v
    if rotation_right is not None:
        v = v @ rotation_right.square().T
    return v


def _power_iteration(statistic: Tensor, Q: Tensor) -> Tensor:
    """One step of subspace iteration: refresh the eigenbasis Q of a slowly changing statistic,
    far cheaper than a new eigh. Columns are sorted by estimated eigenvalue first, so the QR lets
    the dominant directions claim their place before the small ones."""
    estimated_eigenvalues = (Q.T @ statistic @ Q).diagonal()
    Q = Q[:, torch.argsort(estimated_eigenvalues, descending=True)]
    return torch.linalg.qr(statistic @ Q).Q


def _refresh_basis(state: dict, key: str, statistic: Tensor | None) -> Tensor | None:
    """Recompute state[key], the eigenbasis of `statistic`; return new^T @ old (None: no change)."""
    if statistic is None:
        return None
    old = state[key]
    # eigh returns ascending eigenvalues; largest first is the order power iteration keeps
    new = (torch.linalg.eigh(statistic).eigenvectors.flip(-1) if old is None
           else _power_iteration(statistic, old))
    state[key] = new
    return None if old is None else new.T @ old


class SOAP(_Optimizer):
    """SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's preconditioner.
    For a gradient G (rows, cols), Shampoo keeps L = EMA(G G^T) and R = EMA(G^T G), whose
    eigenvectors Q_L, Q_R are the directions in which G varies most. SOAP runs Adam on
    G' = Q_L^T G Q_R, where the curvature is close to diagonal, and rotates the update back. The
    first gradient only seeds the bases (in a basis built from G itself, Adam would blow rounding
    noise up into full steps); every `precondition_frequency` steps a power-iteration step
    refreshes them and the second moment is rotated along. A side longer than max_precond_dim
    keeps the identity; vectors get AdamW; statistics stay float32; shampoo_beta: betas[1]."""
    RULES = {**ADAMW_RULES, "shampoo_beta": _number(0, 1, optional=True),
             "precondition_frequency": _number(1, integer=True),
             "max_precond_dim": _number(0, integer=True)}

    def __init__(self, params: Params, lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), shampoo_beta: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 max_precond_dim: int = 4096, foreach: bool | None = None,
                 fused: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                      weight_decay=weight_decay, foreach=foreach, fused=fused,
                                      precondition_frequency=precondition_frequency,
                                      max_precond_dim=max_precond_dim))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its parameter's dtype; SOAP's statistics stay
        # float32 (bf16 eigenvectors would be noise): take them again, only moved to the device.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if p.ndim >= 2 and isinstance(value, Tensor):
                    self.state[p][key] = value.to(p.device)

    def _update(self, grad_scale: Tensor | None) -> None:
        for group, params in self._groups_with_grads():
            self._adamw_step(group, [p for p in params if p.ndim < 2], grad_scale)
            self._scale_in_place([p.grad for p in params if p.ndim >= 2], grad_scale)
            for p in params:
                if p.ndim >= 2:
                    self._matrix_step(p, group)

    def _matrix_step(self, p: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        G = p.grad.reshape(p.size(0), -1).float()  # (rows, cols)
        state = self.state[p]
        if "step" not in state:
            rows, cols, limit = *G.shape, group["max_precond_dim"]
            zeros = dict(device=G.device, dtype=torch.float32)
            state.update(step=0, exp_avg=torch.zeros_like(G), exp_avg_sq=torch.zeros_like(G),
                         Q_L=None, Q_R=None,  # None: this side keeps the identity basis
                         L=torch.zeros(rows, rows, **zeros) if rows <= limit else None,
                         R=torch.zeros(cols, cols, **zeros) if cols <= limit else None)
            if state["L"] is not None or state["R"] is not None:
                self._update_preconditioner(state, G, shampoo_beta, refresh=True)
                return  # the first gradient only seeds the bases (see the class docstring)
        state["step"] += 1
        t, Q_L, Q_R = state["step"], state["Q_L"], state["Q_R"]

        def rotate(X: Tensor, back: bool = False) -> Tensor:  # Q_L^T X Q_R, or back: Q_L X Q_R^T
            X = X if Q_L is None else (Q_L if back else Q_L.T) @ X
            return X if Q_R is None else X @ (Q_R.T if back else Q_R)

        # Adam, with its moments measured in the eigenbasis (exactly AdamW when both Q are None).
        G_rotated = rotate(G)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(G, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(G_rotated, G_rotated, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        update = rotate(rotate(exp_avg) / denom, back=True)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.reshape(p.shape).to(p.dtype), alpha=-group["lr"] / (1 - beta1**t))
        self._update_preconditioner(state, G, shampoo_beta,
                                    refresh=t % group["precondition_frequency"] == 0)

    @staticmethod
    def _update_preconditioner(state: dict, G: Tensor, shampoo_beta: float,
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


# Parameter groups: which weights decay, which Muon orthogonalises ---------------------------------
def _trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, whether it is an embedding table: an nn.Embedding's, or "embed" in the
    name) for each trainable parameter, tied ones listed once."""
    seen, result = set(), []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                name = f"{module_name}.{name}" if module_name else name
                result.append((name, p, isinstance(module, nn.Embedding) or "embed" in name))
    return result


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for AdamW or SOAP: matrices decay, vectors and embedding tables do not.
    Weight decay keeps the matrices that mix features small. A gain or bias has a natural value of
    1 or 0: pulling it to 0 only fights the normalisation. Decoupled decay shrinks *every* row of
    an embedding table (nn.Embedding, or "embed" in the name; a tied head too) every step while
    only the rows of tokens in the batch get a gradient, so rare tokens would fade away."""
    decay, no_decay = [], []
    for _, p, embedding in _trainable_parameters(model):
        (decay if p.ndim >= 2 and not embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_groups_for_muon(model: nn.Module, lr: float, adam_lr: float | None = None,
                          weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.9, 0.999),
                          adam_eps: float = 1e-8) -> list[dict]:
    """Muon groups (use_muon=True: the 2-D hidden matrices) and AdamW groups: embeddings and the
    head ("lm_head"), whose rows are per-token vectors, not maps between hidden features, and all
    that is not 2-D. Weight decay follows decay_param_groups; adam_lr defaults to lr."""
    adam_lr = lr if adam_lr is None else adam_lr
    muon, adam_decay, adam_no_decay = [], [], []
    for name, p, embedding in _trainable_parameters(model):
        if embedding or p.ndim < 2:
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
    # foreach: one kernel launch per step for all tensors of a group instead of one per tensor;
    # fused: the AdamW update compiled, one kernel per tensor, whenever the model is compiled.
    common = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=device.type == "cuda",
                  fused=use_compile(cfg.compile, device))
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        # Muon scales its updates to AdamW's size, so both kinds of group share lr and schedule.
        return Muon(param_groups_for_muon(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          adam_betas=betas, adam_eps=cfg.eps), **common)
    if cfg.optimizer not in ("adamw", "soap"):
        raise ValueError(f"optimizer={cfg.optimizer!r}: expected 'adamw', 'muon' or 'soap'")
    optimizer = AdamW if cfg.optimizer == "adamw" else SOAP
    return optimizer(decay_param_groups(model, cfg.weight_decay), betas=betas, eps=cfg.eps,
                     **common)


# Before a run: the checks, the output folder, the data's arrival, devices and processes -----------
def check_config(cfg: TrainConfig) -> ModelConfig:
    """Check every knob before any work, naming it; return the model's config (built with the
    BPE vocabulary size, so that a bad shape fails now, not after the data)."""
    choices = {"optimizer": ("adamw", "muon", "soap"), "schedule": ("cosine", "wsd"),
               "dataset": ("tinystories", "pycode", "pydoc"),
               "dtype": ("auto", "float32", "bfloat16"), "preset": tuple(PRESETS),
               "compile": ("auto", True, False, "graphs"),
               "parallel": ("torch", "ddp", "zero1", "fsdp")}
    at_least = {"max_iters": 1, "batch_size": 1, "grad_accum_steps": 1, "log_interval": 1,
                "eval_iters": 1, "vocab_size": 257, "warmup_iters": 0, "eval_interval": 0,
                "checkpoint_interval": 0, "num_samples": 0, "sample_tokens": 0, "top_k": 0,
                "lr": 0, "min_lr": 0, "weight_decay": 0, "grad_clip": 0, "max_text_mb": 0}
    problems = [f"--{k}={getattr(cfg, k)!r}: expected one of {v}" for k, v in choices.items()
                if getattr(cfg, k) not in v]
    problems += [f"--{k} must be at least {low}, got {getattr(cfg, k)}"
                 for k, low in at_least.items() if not getattr(cfg, k) >= low]  # NaN too
    problems += [f"--{k} must be {expected}, got {getattr(cfg, k)}" for k, ok, expected in (
        ("val_fraction", 0 < cfg.val_fraction < 1, "in (0, 1)"),
        ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
        ("decay_frac", 0 < cfg.decay_frac <= 1, "in (0, 1]"), ("eps", cfg.eps > 0, "> 0"),
        ("temperature", cfg.temperature > 0, "> 0"),  # FSDP would keep FP8 copies whole:
        ("parallel", cfg.parallel != "fsdp" or not cfg.model.get("fp8"),
         "torch, ddp or zero1 with --fp8=True")) if not ok]
    if problems:
        raise UsageError("; ".join(problems))
    try:
        resolve_device(cfg.device)
    except RuntimeError as e:
        raise UsageError(f"--device={cfg.device}: {e}") from None
    try:
        return build_model_config(cfg, cfg.vocab_size)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--preset={cfg.preset} with {cfg.model or 'no changes'}: {e}") from None


def prepare_out_dir(cfg: TrainConfig, master: bool) -> Path:
    """A new run does not take over another run's results unless told to (--overwrite), and then
    replaces them only as it writes its own. Temporary files a killed run left are removed."""
    out_dir = Path(cfg.out_dir)
    if cfg.resume and not (out_dir / "ckpt.pt").exists():
        raise FileNotFoundError(f"--resume: {out_dir / 'ckpt.pt'} does not exist")
    found = [n for n in ("ckpt.pt", "metrics.jsonl", "samples.txt") if (out_dir / n).exists()]
    if found and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"--out_dir={out_dir} holds another run's results ({', '.join(found)}):"
                         " pass --resume to continue it, --overwrite to replace it, or choose "
                         "another --out_dir")
    if master:
        require_writable(out_dir, "out_dir")
        for stale in out_dir.glob("*.tmp"):
            stale.unlink()
    return out_dir


def require_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / ".write_test", "")
        (folder / ".write_test").unlink()
    except OSError as e:
        raise UsageError(f"--{flag}={folder} is not a writable folder ({e.strerror or e})") \
            from None


def check_resumable(state: dict, cfg: TrainConfig, world_size: int) -> None:
    """Refuse to resume into another run, naming each field that changed: only RESUMABLE ones and
    attn_impl (a kernel for the same math) may. Checkpoints hold the whole state, and batches are
    drawn globally, so another number of processes resumes exactly if the global batch stays:
    2 processes of batch_size=4 continue as 1 of 8 (up to float rounding)."""
    saved_model, saved_run = state.get("model_config", {}), state.get("config", {})
    now = dataclasses.asdict(build_model_config(cfg, saved_model.get("vocab_size", 1)))
    changed = [f"{k}={saved_model.get(k)!r} in the checkpoint but {v!r} now"
               for k, v in now.items() if saved_model.get(k) != v and k != "attn_impl"]
    changed += [f"{k}={v!r} in the checkpoint but {getattr(cfg, k)!r} now"
                for k, v in saved_run.items() if hasattr(cfg, k) and v != getattr(cfg, k)
                and k not in RESUMABLE | {"model", "preset", "batch_size"}]
    batch, processes = saved_run.get("batch_size", cfg.batch_size), state.get("world_size", 1)
    if batch * processes != cfg.batch_size * world_size:
        changed.append(f"batch_size={batch} in the checkpoint but {cfg.batch_size} now, with "
                       f"{processes} process(es) then and {world_size} now (the product must stay)")
    if changed:
        raise UsageError("cannot resume: the run changed: " + "; ".join(changed)
                         + ". Pass the checkpoint's values, or a new --out_dir")


def load_data(cfg: TrainConfig, master: bool,
              cpu_group: object) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Rank 0 prepares the data (download, tokenizer, encoding) and tells the other ranks where
    it is, or that it failed; then every rank loads the tokenizer and maps the token arrays."""
    paths, error = [None], None
    if master:
        try:
            paths = [prepare_data(cfg)]
        except Exception as e:
            error, paths = e, [f"rank 0 could not prepare the data: {e}"]
    if cpu_group is not None:
        dist.broadcast_object_list(paths, src=0, group=cpu_group)
    if error is not None or isinstance(paths[0], str):
        raise error or RuntimeError(paths[0])
    tok_dir, train_bin, val_bin = paths[0]
    tok = tokenizer_with_eot(tok_dir)
    return tok, load_tokens(train_bin, tok), load_tokens(val_bin, tok)


def tokenizer_with_eot(tok_dir: str) -> Tokenizer:
    tok = Tokenizer.from_dir(tok_dir)
    if EOT not in tok.special_tokens:  # fail now, not when sampling after the whole run
        raise ValueError(f"the tokenizer in {tok_dir} has no {EOT} special token; samples start "
                         f"from it (python tokenizer.py train --special_tokens='{EOT}' ...)")
    return tok


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU. Unknown GPU -> None.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    # bf16 has float32's range, so unlike fp16 it needs no loss scaling. CPUs and MPS run it
    # slower than float32 in practice, so "auto" uses it on CUDA only.
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Matmuls in dtype, reductions and the loss in float32; parameters stay float32."""
    return (contextlib.nullcontext() if dtype == torch.float32
            else torch.autocast(device_type=device.type, dtype=dtype))


def use_compile(setting: str | bool, device: torch.device) -> bool:
    # Compilation pays back in minutes on a GPU; on a CPU it costs more than a short run saves.
    return setting if isinstance(setting, bool) else device.type == "cuda"


@functools.cache
def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of this GPU, or None where it is not known (CPU, MPS, others)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def setup_distributed(device_name: str = "auto") -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device): joins the process group under torchrun (which sets
    RANK, LOCAL_RANK and WORLD_SIZE); plain `python` gets one process. NCCL for GPUs, else gloo."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, int(os.environ["WORLD_SIZE"]), device


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """Replicate module on every process; backward averages the gradients across them. The only
    buffers (RoPE and position tables) are constants: no need to broadcast them."""
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False)


# Data preparation: text -> BPE tokenizer -> token arrays, cached ----------------------------------
TINYSTORIES_URL = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
                   "TinyStories-valid.txt")


def load_tokens(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """Memory-map a .bin written by tokenizer.py, after checking that it belongs to `tokenizer`:
    ids from another tokenizer would train without error and learn nonsense, and an id past the
    vocabulary would fail only at the step that first samples it."""
    path, meta_path = Path(path), Path(str(path) + ".json")
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
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if (top := int(tokens.max())) >= tokenizer.vocab_size:
        raise ValueError(f"{path} holds token id {top}, but the tokenizer has only "
                         f"{tokenizer.vocab_size} ids: re-encode it with this tokenizer")
    return tokens


def download(url: str, dest: Path, timeout: float = 10.0) -> Path:
    """Fetch url to dest.part, resuming an interrupted download with an HTTP Range request; dest
    appears only once the length matches Content-Length, never as a half-downloaded corpus."""
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


def pydoc_text(dest: Path, seed: int = 0) -> Path:
    """Python's documentation topics (pydoc_data.topics, ~465 KB), one document each, shuffled:
    the validation tail is a random sample of them, not the alphabet's end."""
    if not dest.exists():
        from pydoc_data.topics import topics
        docs = [topics[k].strip() for k in sorted(topics)]
        random.Random(seed).shuffle(docs)
        write_atomic(dest, f"\n{EOT}\n".join(docs) + "\n")
    return dest


def pycode_text(dest: Path, max_bytes: int, seed: int = 0, max_file_bytes: int = 100_000) -> Path:
    """The .py files of the running Python (stdlib and site-packages, ~160 MB), one document
    each, up to max_bytes (0 = all): offline, and more than a small model learns by heart. Sorted
    by their path inside their root, then shuffled with a fixed seed: the same packages give the
    same text wherever installed. Files over max_file_bytes (generated tables) could fill half a
    validation split and are skipped, as are non-UTF-8 ones; a literal <|endoftext|> is removed."""
    if dest.exists():
        return dest
    paths = sysconfig.get_paths()
    roots = {Path(paths[key]).resolve(): key for key in ("stdlib", "purelib", "platlib")}
    names = {}  # file -> (root kind, path inside it); the deepest root names a file
    for root in sorted(roots, key=lambda r: len(r.parts)):
        names.update({f: (roots[root], f.relative_to(root).as_posix()) for f in root.rglob("*.py")})
    files = sorted(names, key=names.get)
    random.Random(seed).shuffle(files)
    docs, size = [], 0
    for path in files:
        try:
            if path.stat().st_size > max_file_bytes:
                continue
            text = path.read_text(encoding="utf-8").replace(EOT, "").strip()
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(text)
        size += len(text.encode("utf-8"))
        if max_bytes and size >= max_bytes:
            break
    write_atomic(dest, f"\n{EOT}\n".join(d for d in docs if d) + "\n")
    return dest


def split_text(src: Path, out_dir: Path, val_fraction: float, max_bytes: int) -> tuple[Path, Path]:
    """out_dir/train.txt and val.txt: the head and the tail of at most max_bytes of src, cut at
    line starts, each copied once and atomically."""
    def line_start(offset: int) -> int:  # the first line start at or after offset
        if offset <= 0 or offset >= src.stat().st_size:
            return min(max(offset, 0), src.stat().st_size)
        with open(src, "rb") as f:
            f.seek(offset - 1)
            f.readline()
            return f.tell()

    end = line_start(max_bytes) if max_bytes > 0 else src.stat().st_size
    cut = line_start(int(end * (1 - val_fraction)))
    if not 0 < cut < end:
        raise ValueError(f"{src} is too small to split into train and validation text "
                         f"(val_fraction={val_fraction}): it needs several lines")
    out_dir.mkdir(parents=True, exist_ok=True)
    for dest, start, stop in ((out_dir / "train.txt", 0, cut), (out_dir / "val.txt", cut, end)):
        if not dest.exists():
            with open(src, "rb") as fin, atomic_output(dest) as tmp, open(tmp, "wb") as fout:
                fin.seek(start)
                while (left := stop - fin.tell()) > 0:
                    fout.write(fin.read(min(left, 1 << 22)))
    return out_dir / "train.txt", out_dir / "val.txt"


def source_text(cfg: TrainConfig) -> Path:
    """The text file to train on: --data, or the dataset's file (made or downloaded once)."""
    cache, max_bytes = Path(cfg.cache_dir), int(cfg.max_text_mb * 2**20)
    if cfg.data:  # must be UTF-8: say so about the user's file now, not about a copy later
        path = Path(cfg.data)
        if not path.is_file():
            raise FileNotFoundError(f"--data={path}: no such file")
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 3:  # not just a character cut in two at the end of the read
                hint = " (token arrays go in --train_bin, --val_bin and --tokenizer_dir)"
                raise UsageError(f"--data={path} is not UTF-8 text (byte {e.start})"
                                 f"{hint if path.suffix == '.bin' else ''}") from None
        return path
    if cfg.dataset == "pydoc":
        return pydoc_text(cache / "pydoc_topics.txt")
    if cfg.dataset == "tinystories":
        try:
            return download(TINYSTORIES_URL, cache / "TinyStories-valid.txt")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # not a disk error
            print(f"offline ({getattr(e, 'reason', e)}): training on this Python's source code "
                  f"(--dataset=pycode) instead of TinyStories")
    return pycode_text(cache / f"pycode-{max_bytes or 'all'}.txt", max_bytes)


def prepare_data(cfg: TrainConfig) -> tuple[str, str, str]:
    """Text -> BPE tokenizer (or --tokenizer_dir's) -> train/val .bin arrays: (tokenizer_dir,
    train_bin, val_bin). Each is cached under a name made of the text's hash and the settings (and
    the given tokenizer's fingerprint): never stale."""
    if cfg.train_bin or cfg.val_bin:
        if not (cfg.train_bin and cfg.val_bin and cfg.tokenizer_dir):
            raise UsageError("--train_bin, --val_bin and --tokenizer_dir go together")
        return cfg.tokenizer_dir, cfg.train_bin, cfg.val_bin
    require_writable(Path(cfg.cache_dir), "cache_dir")
    # A given tokenizer (GPT-2's, say) encodes the text and none is trained; loaded first to fail
    # before a download or a copy.
    given = tokenizer_with_eot(cfg.tokenizer_dir) if cfg.tokenizer_dir else None
    text, max_bytes = source_text(cfg), int(cfg.max_text_mb * 2**20)
    digest = hashlib.sha256(str(text.stat().st_size).encode())  # size, first and last MB
    with open(text, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, text.stat().st_size - (1 << 20)))
        digest.update(f.read())
    name = f"{text.stem}-{digest.hexdigest()[:10]}-{max_bytes}-{cfg.val_fraction}"
    work = Path(cfg.cache_dir) / name
    text, val_text = split_text(text, work, cfg.val_fraction, max_bytes)
    if given is not None:
        bin_dir = work / f"tokenizer-{given.fingerprint()}"
        bin_dir.mkdir(exist_ok=True)
        return cfg.tokenizer_dir, *tokenize_splits(text, val_text, Path(cfg.tokenizer_dir),
                                                   given.vocab_size, bin_dir)
    tok_dir = work / f"bpe{cfg.vocab_size}"
    return str(tok_dir), *tokenize_splits(text, val_text, tok_dir, cfg.vocab_size, tok_dir)


def tokenize_splits(train_text: Path, val_text: Path, tok_dir: Path, vocab_size: int,
                    bin_dir: Path, workers: int | None = None,
                    progress: bool = True) -> tuple[str, str]:
    """A vocab_size BPE tokenizer trained on train_text into tok_dir, unless one is there, and
    both texts encoded with it into bin_dir/train.bin and val.bin, unless load_tokens accepts
    the ones there: (train_bin, val_bin). That they came from these very texts is the caller's
    to ensure (prepare_data: the folder's name holds the text's hash)."""
    if not tok_dir.exists():  # written under a temporary name, so it exists only when complete
        print(f"training a {vocab_size}-token BPE tokenizer on {train_text}")
        vocab, merges = train_bpe(str(train_text), vocab_size, [EOT], workers, progress)
        tmp = tok_dir.with_name(tok_dir.name + ".tmp")
        Tokenizer(vocab, merges, [EOT]).save_dir(str(tmp))  # a stale tmp is overwritten
        os.replace(tmp, tok_dir)
    tok = Tokenizer.from_dir(str(tok_dir))
    bins = []
    for split, path in (("train", train_text), ("val", val_text)):
        out = bin_dir / f"{split}.bin"
        try:
            load_tokens(out, tok)
        except FileNotFoundError:
            encode_file(tok, str(path), str(out), workers, progress)
        except ValueError as e:  # written by another version of the tokenizer: never reuse it
            print(f"{e}; re-encoding")
            encode_file(tok, str(path), str(out), workers, progress)
        bins.append(str(out))
    return bins[0], bins[1]


# Reading a run: `python train.py plot [out_dir]` --------------------------------------------------
def plot(out_dir: str | Path) -> Path:
    """Train and validation loss against tokens, the learning rate below: out_dir/loss.png."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} does not exist: plot reads the metrics of a training run")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install matplotlib") from None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6),
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], label="train")
    top.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    if evals:
        top.axhline(evals[-1]["unigram_entropy"], color="gray", linestyle=":",
                    label="unigram baseline")
    top.set(ylabel="loss (nats/token)", title=str(Path(out_dir)))
    top.legend()
    bottom.plot([r["tokens"] for r in steps], [r["lr"] for r in steps], color="tab:green")
    bottom.set(xlabel="tokens", ylabel="learning rate")
    out = Path(out_dir) / "loss.png"
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return out


# Command line: `python train.py [train|plot] [CONFIG_FILE ...] [--key=value]` ---------------------
def option_defaults(cfg: TrainConfig) -> dict:
    """Every --key and the value it is typed from; cfg's fields win (--vocab_size: tokenizer's)."""
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {**model, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}


def with_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Set each key on cfg, or in cfg.model when it is a ModelConfig field."""
    own = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key == "model":  # a saved config's dict of ModelConfig fields
            cfg.model.update(value)
        elif key in own:
            setattr(cfg, key, value)
        else:
            cfg.model[key] = value
    return cfg


def parse_config(argv: list[str], cfg: TrainConfig) -> TrainConfig:
    """Config files and --key=value flags, applied over cfg in the order given (later wins)."""
    return with_overrides(cfg, parse_args(argv, option_defaults(cfg), config_files=True)[1])


def resume_config(overrides: dict) -> TrainConfig:
    """`--resume`: the run's configuration from its checkpoint, then the flags (which train()
    refuses, naming them, where they would change the run)."""
    path = Path(overrides.get("out_dir", TrainConfig.out_dir)) / "ckpt.pt"
    if not path.exists():
        raise UsageError(f"--resume: {path} does not exist; pass the run's --out_dir")
    saved = read_checkpoint(path, mmap=True)["config"]
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = with_overrides(TrainConfig(), {k: v for k, v in saved.items() if k in own})
    return with_overrides(cfg, overrides)


def main(argv: list[str]) -> None:
    if argv[:1] == ["bench"]:
        raise UsageError("moved: python kernels.py bench")
    command = argv[0] if argv and argv[0] in ("train", "plot") else "train"
    argv = argv[1:] if argv and argv[0] == command else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("defaults:", json.dumps(dataclasses.asdict(TrainConfig()), indent=1))
    elif command == "plot":
        if len(argv) > 1 or any(a.startswith("--") for a in argv):
            raise UsageError("usage: python train.py plot [OUT_DIR]")
        plot(argv[0] if argv else TrainConfig.out_dir)
    else:
        _, overrides = parse_args(argv, option_defaults(TrainConfig()), config_files=True)
        cfg = resume_config(overrides) if overrides.get("resume") else TrainConfig()
        try:
            train(with_overrides(cfg, overrides))
        except TrainingInterrupted as e:
            print(e, file=sys.stderr)
            sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
