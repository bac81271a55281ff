"""Stage 4: systems, part one: measure where the time of a training step goes, then beat it.

This first version holds the training-step benchmark that train.py's loop runs on: train.py's
`train_step` (compiled model and loss, fused AdamW, bf16 autocast) on random batches already on
the device, warmed up, timed with the GPU synchronised, reported as ms/step, tokens/s, TFLOP/s and
MFU. The profiler and our own Triton kernels (fused RMSNorm, FlashAttention-2, training fusions)
come next (issue 10).

Commands (meant for a GPU; on a CPU it says so and runs slowly)
    python kernels.py bench                          # nanogpt and tinystories presets
    python kernels.py bench --preset=nanogpt         # GPT-2 small, 16 x 1024, as nanoGPT times it
    python kernels.py bench --preset=tinystories --optimizer=muon --compile=False
Any TrainConfig or ModelConfig field is a --key=value option, as in train.py. Reads and writes no
files.

Papers  Chowdhery et al. 2022 (PaLM: model FLOPs utilisation); Micikevicius et al. 2018 (mixed
        precision).
"""

import time
from dataclasses import dataclass

import torch

from model import PRESETS, ModelConfig, TransformerLM, count_params, mfu_flops_per_token
from tokenizer import UsageError, run_cli
from train import (LossModel, TrainConfig, autocast_for, build_optimizer, parse_config,
                   peak_flops, resolve_device, resolve_dtype, train_step, use_compile)


# The training-step benchmark ----------------------------------------------------------------------
@dataclass
class BenchConfig(TrainConfig):
    preset: str = "nanogpt,tinystories"  # model.py presets to time, comma-separated
    batch_size: int = 0  # micro-batch; 0 = the preset's own (16 for nanogpt, 128 tinystories)
    vocab_size: int = 0  # the model's vocabulary; 0 = the preset's own
    steps: int = 20  # timed optimizer steps
    warmup_steps: int = 5  # untimed steps first: compilation, allocator and autotuning settle


BENCH_BATCH = {"nanogpt": 16, "tinystories": 128}
TINYSTORIES_TOKENS = 327_680_000  # the course's TinyStories budget: 5000 steps x 256 x 256


def bench(cfg: BenchConfig) -> list[dict]:
    """Tokens/s, ms/step and MFU of train_step for each preset in cfg.preset; returns the rows."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    compile_model = use_compile(cfg.compile, device)
    autocast = autocast_for(device, dtype)
    torch.set_float32_matmul_precision("high")
    presets = cfg.preset.split(",")
    if unknown := [p for p in presets if p not in PRESETS]:
        raise UsageError(f"--preset={','.join(unknown)}: expected one of {', '.join(PRESETS)}")
    if device.type != "cuda":
        print(f"bench times the training step and is meant for a GPU; on {device} each preset "
              f"takes {cfg.warmup_steps} + {cfg.steps} slow steps")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for name in presets:
        torch.manual_seed(cfg.seed)
        vocab = {"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}
        model_config = ModelConfig.preset(name, **{**cfg.model, **vocab})
        batch_size, T = cfg.batch_size or BENCH_BATCH.get(name, 8), model_config.context_length
        model = TransformerLM(model_config).to(device)
        optimizer = build_optimizer(model, cfg, device)
        step_model = torch.compile(LossModel(model)) if compile_model else LossModel(model)
        # A fixed set of random batches already on the device: measures the step, not the loader.
        batches = [tuple(torch.randint(model_config.vocab_size, (batch_size, T), device=device)
                         for _ in range(2)) for _ in range(4)]
        counter = iter(range(10**9))
        params = list(model.parameters())

        def run(steps: int) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                train_step(step_model, optimizer, params,
                           lambda: batches[next(counter) % len(batches)],
                           cfg.grad_accum_steps, cfg.grad_clip, autocast)
            sync()
            return time.perf_counter() - start

        print(f"{name}: {count_params(model_config)['total'] / 1e6:.1f}M params, batch "
              f"{batch_size}x{T}: {cfg.warmup_steps} warm-up steps, then {cfg.steps} timed")
        warmup_s, step_s = run(cfg.warmup_steps), run(cfg.steps) / cfg.steps
        tok_per_s = batch_size * T * cfg.grad_accum_steps / step_s
        flops = mfu_flops_per_token(model_config, T) * tok_per_s
        peak = peak_flops(device)
        row = {"preset": name, "params": count_params(model_config)["total"],
               "batch_size": batch_size, "context_length": T, "ms_per_step": step_s * 1e3,
               "tok_per_s": tok_per_s, "tflops": flops / 1e12,
               "mfu": flops / peak if peak else None,
               "warmup_s": warmup_s, "dtype": str(dtype).removeprefix("torch."),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "compile": compile_model, "optimizer": cfg.optimizer}
        mfu = f"{row['mfu']:.1%}" if peak else "n/a (unknown peak)"
        print(f"  {row['ms_per_step']:.1f} ms/step | {tok_per_s:,.0f} tok/s | "
              f"{row['tflops']:.1f} TFLOP/s | MFU {mfu} | {row['device']}, {row['dtype']}, "
              f"compile={compile_model}, {cfg.optimizer} (warm-up {warmup_s:.1f} s)")
        if name == "tinystories":
            row["minutes_for_327M_tokens"] = TINYSTORIES_TOKENS / tok_per_s / 60
            print(f"  {TINYSTORIES_TOKENS:,} tokens (the course's TinyStories run) take "
                  f"{row['minutes_for_327M_tokens']:.1f} min at this speed")
        if name == "nanogpt":
            print("  nanoGPT on one H200 at this shape: 482,000-484,000 tok/s")
        rows.append(row)
        del model, optimizer, step_model, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# Command line: `python kernels.py bench [CONFIG_FILE ...] [--key=value]` -------------------------
def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
    elif argv[0] != "bench":
        raise UsageError(f"unknown command {argv[0]!r}; the command is: bench")
    else:
        bench(parse_config(argv[1:], BenchConfig()))


if __name__ == "__main__":
    run_cli(main)
