"""Stage 4: systems, part one: measure where a training step's time goes, then beat PyTorch.

CS336 lectures 5-6 and assignment 2, part 1, in teaching order:
  1. Measure first: a timer must wait for the GPU (it only queues work), skip the first steps
     (compiling, autotuning), time each step to show the spread, and run long enough: a GPU
     boosts its clock at first, then slows to what its power limit allows. `bench`: forward,
     forward + backward and train.py's step, eager or compiled, fp32 or bf16: ms, tokens/s,
     TFLOP/s, MFU.
     `profile`: the top kernels, NVTX ranges, a memory snapshot, checkpointing's peak memory.
  2. The GPU, in code (`lesson`): the roofline on this GPU's measured bandwidth and matmul peak;
     GeLU five ways (eager, fused, compiled, Triton, its PTX); a fused softmax; a tiled matmul
     with grouped tile order; floating-point formats and autocast.
  3. Kernels that move fewer bytes: fused RMSNorm (and add + RMSNorm), the SwiGLU gate, RoPE and
     the head split after one q | k | v matmul, linear + cross-entropy without the whole logits
     (`fused` times them), and FlashAttention-2, tiled in PyTorch to read, then in Triton
     (`attention` times it). model.py uses them when asked: `--kernels=triton` (norms with the
     residual adds, gate, RoPE, loss) and `--attn_impl=triton` (attention). And training
     matmuls in FP8 with per-tensor scales (`--fp8=True`: the FFN's and the head's).
  4. For infer.py: a batch-1 decode step as one persistent kernel over all the layers.
On a CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1): right, but slow.

Commands (CPU: add --device=cpu --preset=tiny to bench and profile, seconds; one GPU: as written)
    python kernels.py bench --preset=nanogpt          # GPT-2 small, 16 x 1,024 (the README's)
    python kernels.py bench --preset=nanogpt --kernels=triton --attn_impl=triton --mode=step
    python kernels.py bench --preset=course --context_length=128,256,512,1024 --mode=fwd,fwd_bwd
    python kernels.py bench --preset=small --compile=False,True --dtype=float32,bfloat16
    python kernels.py bench --preset=nanogpt --warmup_steps=0 --steps=5    # why we warm up
    python kernels.py bench --preset=nanogpt --mode=step --steps=300  # at the GPU's power limit
    python kernels.py bench --preset=nanogpt --mode=step --fp8=True  # FP8 matmuls (Ada, Hopper)
    nsys profile -o step python kernels.py profile    # nanogpt, NVTX ranges on a timeline
    python kernels.py lesson                          # the roofline, GeLU, softmax, matmul, floats
    python kernels.py fused                           # RMSNorm, add+norm, SwiGLU, RoPE, linear+CE
    python kernels.py attention                       # ours vs SDPA flash/cuDNN; --quick=False: all
bench and profile take any TrainConfig or ModelConfig field as --key=value (--optimizer=muon);
--preset, --mode, --context_length, --compile, --dtype take comma lists; --preset=course: the
course's small, medium, large, xl and 2.7B (vocab 10,000, batch 4; eager unless --compile=True).
Writes  profile: memory_snapshot.pickle (CUDA only; --out=FILE), for https://pytorch.org/memory_viz
Papers  Chowdhery et al. 2022 (MFU); Williams et al. 2009 (roofline); Micikevicius et al. 2018
        (mixed precision); Chen et al. 2016 (checkpointing); Tillet et al. 2019 (Triton); Dao et
        al. 2022, Dao 2023 (FlashAttention, -2); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020
        (SwiGLU); Wijmans et al. 2025 (cut cross-entropy); Micikevicius et al. 2022 (FP8 formats).
"""

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import statistics
import sys
import timeit
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.library import wrap_triton

if not torch.cuda.is_available():  # before the first @triton.jit: run the kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it at each @triton.jit
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from model import (PRESETS, Linear, ModelConfig, MultiHeadSelfAttention, RMSNorm,  # noqa: E402
                   RotaryEmbedding, SwiGLU, TransformerLM, apply_rotary, attention_mask,
                   autocast_dtype, count_params, gelu_tanh, mfu_flops_per_token,
                   scaled_dot_product_attention, silu, softmax, stacked_linear)
from tokenizer import UsageError, atomic_output, parse_command, run_cli  # noqa: E402
from train import (LossModel, TrainConfig, autocast_for, build_optimizer,  # noqa: E402
                   clip_and_step, loss_model, option_defaults, peak_flops, resolve_device,
                   resolve_dtype, train_step, with_overrides)

if __name__ == "__main__":  # model.py's `import kernels` then finds this module instead of running
    sys.modules["kernels"] = sys.modules[__name__]  # it again (its custom ops register only once)


# Measure first: time the forward, forward + backward and the whole training step ------------------
@dataclasses.dataclass
class BenchConfig(TrainConfig):
    preset: str = "nanogpt,tinystories"  # model.py presets, comma-separated; "course": five sizes
    batch_size: int = 0  # 0 = the preset's own: 16 nanogpt, 128 tinystories, 4 course, else 8
    vocab_size: int = 0  # 0 = the preset's own
    context_length: str = ""  # one or more, e.g. 128,256,512,1024; "" = the preset's own
    mode: str = "fwd,fwd_bwd,step"  # forward; forward + backward; the step with the optimizer
    compile: str = "auto"  # "auto": compiled on CUDA but the course sizes (eager, as its table);
    # False,True; "graphs": mode="reduce-overhead", CUDA graphs (are our custom ops host-bound?)
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, else float32; or float32,bfloat16
    steps: int = 20  # timed steps per row
    warmup_steps: int = 5  # untimed steps first: compilation, allocator and autotuning settle


COURSE = ("small", "medium", "large", "xl", "2.7B")  # CS336 assignment 2's model sizes
BENCH_BATCH = {"nanogpt": 16, "tinystories": 128, **{name: 4 for name in COURSE}}
TINYSTORIES_TOKENS = 327_680_000  # the course's TinyStories budget: 5000 steps x 256 x 256


def comma_list(key: str, value: object, allowed: Iterable[str] | None = None) -> list:
    """--key=a,b -> ["a", "b"], each one of allowed; allowed=None: positive integers, as ints."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items or any(v not in allowed if allowed else not (v.isdigit() and int(v) > 0)
                        for v in items):
        raise UsageError(f"--{key}={value}: expected " + (
            f"one or more of {', '.join(allowed)}" if allowed else "positive integers"))
    return items if allowed else [int(v) for v in items]


def bench_grid(cfg: BenchConfig, device: torch.device) -> tuple[list[tuple], list[str]]:
    """Each row's (preset, context_length, compiled, dtype), and the modes: all checked first."""
    if cfg.steps < 1 or cfg.warmup_steps < 0:
        raise UsageError(f"--steps={cfg.steps} must be >= 1 and --warmup_steps >= 0")
    presets = [p for name in comma_list("preset", cfg.preset, ["course", *PRESETS])
               for p in (COURSE if name == "course" else [name])]
    grid = itertools.product(
        presets, comma_list("context_length", cfg.context_length) if cfg.context_length else [0],
        comma_list("compile", cfg.compile, ("auto", "True", "False", "graphs")),
        [resolve_dtype(d, device) for d in comma_list("dtype", cfg.dtype,
                                                      ("auto", "float32", "bfloat16"))])
    return ([(p, T, c if c == "graphs" else c == "True" or c == "auto" and device.type == "cuda"
              and p not in COURSE, d) for p, T, c, d in grid],
            comma_list("mode", cfg.mode, ("fwd", "fwd_bwd", "step")))


def prepare(cfg: BenchConfig, name: str, context_length: int, compiled: bool | str,
            dtype: torch.dtype, device: torch.device) -> SimpleNamespace:
    """A row's model, batch, step_model, optimizer and loss(), made on the device (filling a 2.7B
    model on a CPU is slow), the batch too: we time the step, not the loader."""
    shape = {"vocab_size": cfg.vocab_size, "context_length": context_length}
    config = ModelConfig.preset(name, **{**cfg.model, **{k: v for k, v in shape.items() if v}})
    batch_size = cfg.batch_size or BENCH_BATCH.get(name, 8)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = TransformerLM(config)
        batch = tuple(torch.randint(config.vocab_size, (batch_size, config.context_length))
                      for _ in range(2))
    run = SimpleNamespace(model=model, batch_size=batch_size, batch=batch,
                          step_model=loss_model(model, compiled),
                          autocast=autocast_for(device, dtype),
                          optimizer=build_optimizer(model, dataclasses.replace(
                              cfg, compile=bool(compiled)), device))

    def loss(step_model: nn.Module = run.step_model) -> Tensor:
        with run.autocast:
            return sum(step_model(*batch))  # the loss and the MoE's auxiliary loss
    run.loss = loss
    return run


def time_each(fn: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Seconds of each of n calls of fn. The CPU only queues GPU work, so a host clock times the
    queueing: CUDA events queued around each call record when the GPU gets there."""
    if device.type != "cuda":
        return [timeit.timeit(fn, number=1) for _ in range(n)]
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def bench(cfg: BenchConfig) -> list[dict]:
    """Time each mode for each preset x context length x compile x dtype; print and return rows."""
    device = resolve_device(cfg.device)
    grid, modes = bench_grid(cfg, device)
    cuda, peak, n = device.type == "cuda", peak_flops(device), cfg.steps
    torch.set_float32_matmul_precision("high")
    rows, shown, short = [], None, False
    for name, T, compiled, dtype in grid:
        run = prepare(cfg, name, T, compiled, dtype, device)
        params, config = list(run.model.parameters()), run.model.config
        T, B = config.context_length, run.batch_size
        if (name, T) != shown:  # a new model: its header
            shown = (name, T)
            where = torch.cuda.get_device_name(device) if cuda else device
            print(f"{name}: {count_params(config)['total'] / 1e6:,.1f}M params, batch {B} x {T}, "
                  f"vocab {config.vocab_size:,}, {where} | {cfg.warmup_steps} warm-up + {n} "
                  f"timed steps per row\n  {'mode':8}{'compile':8}{'dtype':9}"
                  f"{'ms/step    std [min, max]':>33}{'tok/s':>12}{'TFLOP/s':>9}{'MFU':>7}"
                  f"{'peak GB':>8}  first steps (ms)")
        runs = {"fwd": run.loss,  # fwd_bwd keeps no .grad
                "fwd_bwd": lambda: torch.autograd.grad(run.loss(), params, allow_unused=True),
                "step": lambda: train_step(run.step_model, run.optimizer, params,
                                           lambda: run.batch, cfg.grad_accum_steps,
                                           cfg.grad_clip, run.autocast)}
        for mode in modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = [t * 1e3 for t in time_each(runs[mode], cfg.warmup_steps + n, device)]
            timed, ms = times[cfg.warmup_steps:], statistics.fmean(times[cfg.warmup_steps:])
            tokens = B * T * (cfg.grad_accum_steps if mode == "step" else 1)
            # Training is 3x the forward's FLOPs: backward does two matmuls per forward one.
            flops = mfu_flops_per_token(config, T) / (3 if mode == "fwd" else 1) * tokens / ms * 1e3
            row = dict(preset=name, params=count_params(config)["total"], mode=mode, batch_size=B,
                       context_length=T, compile=compiled, dtype=str(dtype)[6:],
                       optimizer=cfg.optimizer if mode == "step" else None, ms_per_step=ms,
                       std_ms=statistics.pstdev(timed), min_ms=min(timed), max_ms=max(timed),
                       first_ms=times[:3], tok_per_s=tokens / ms * 1e3, tflops=flops / 1e12,
                       mfu=flops / peak if peak else None,
                       peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None)
            spread = f"{ms:.2f} {row['std_ms']:6.2f} [{row['min_ms']:.2f}, {row['max_ms']:.2f}]"
            print(f"  {mode:8}{str(compiled):8}{row['dtype']:9}{spread:>33}"
                  f"{row['tok_per_s']:12,.0f}{row['tflops']:9.1f}"
                  f"{'n/a' if row['mfu'] is None else format(row['mfu'], '.1%'):>7}"
                  f"{'n/a' if row['peak_gb'] is None else format(row['peak_gb'], '.1f'):>8}  "
                  + ", ".join(f"{t:,.1f}" for t in times[:3]))
            if cfg.warmup_steps == 0 and n > 1:
                row["mean_without_first_ms"] = rest = (ms * n - times[0]) / (n - 1)
                print(f"    no warm-up: the first step ({times[0]:,.1f} ms) is "
                      f"{times[0] / ms / n:.0%} of the timed total; the others average "
                      f"{rest:,.2f} ms, not {ms:,.2f}")
            if mode == "step" and name == "tinystories":
                row["minutes_for_327M_tokens"] = TINYSTORIES_TOKENS / row["tok_per_s"] / 60
                print(f"    {TINYSTORIES_TOKENS:,} tokens (the course's TinyStories run) take "
                      f"{row['minutes_for_327M_tokens']:.1f} min at this speed")
            rows.append(row)
            short = short or cuda and sum(timed) < 5e3
    if short:  # measured in the ninth session: the loop ran at the sustained speed, not this one
        print("  note: timed over a few seconds, a GPU runs at its boost clock. At its power limit "
              "a longer run clocks down (an H200 at 700 W: 1,980 MHz to 1,620-1,770, a GPT-2-small "
              "step 4% slower); --steps=300 measures the speed training sees")
    return rows


# Measure first: where one step's time and memory go -----------------------------------------------
@dataclasses.dataclass
class ProfileConfig(BenchConfig):
    preset: str = ""  # one preset; "" = nanogpt on a GPU, tiny elsewhere
    compile: str = "False"  # eager: PyTorch's own kernels, seconds; True: the compiled step
    steps: int = 3  # profiled steps, after --warmup_steps
    out: str = "memory_snapshot.pickle"  # the memory snapshot of one step (CUDA only)


def checkpoint_blocks(model: TransformerLM) -> TransformerLM:
    """Activation checkpointing: a block keeps its input and reruns its forward in backward."""
    for block in model.layers:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                          use_reentrant=False)
    return model


# Kernel names as they reach the profiler: cuBLAS's nvjet/CUTLASS matmuls, cuDNN's and our
# attention; the rest (norms, activations, the loss, the optimizer, Inductor's fusions) wait on
# memory.
KERNEL_KINDS = (("attention", ("flash", "fmha", "sdpa", "cudnn", "dkdv", "_dq_", "bwd_preprocess")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk")))


def time_by_kind(kernels: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(kernel name, time) pairs -> total time by kind: the tensor cores' matmuls and attention,
    and the memory-bound rest."""
    total = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["memory-bound"], 0.0)
    for name, t in kernels:
        total[next((kind for kind, keys in KERNEL_KINDS if any(k in name.lower() for k in keys)),
                   "memory-bound")] += t
    return total


def profile(cfg: ProfileConfig) -> dict:
    """The profiler's top kernels, NVTX ranges, where the GPU's time goes, a memory snapshot and
    checkpointing's peak."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    cfg.preset = cfg.preset or ("nanogpt" if cuda else "tiny")
    grid, _ = bench_grid(cfg, device)
    if len(grid) > 1:
        raise UsageError("profile takes one preset, context_length, compile and dtype")
    (name, T, compiled, dtype), = grid
    run = prepare(cfg, name, T, compiled, dtype, device)
    nvtx = torch.cuda.nvtx.range if cuda else lambda label: contextlib.nullcontext()

    def step(step_model: nn.Module = run.step_model) -> None:
        """train_step's work in three named ranges: in the profiler's table and in nsys (NVTX)."""
        with torch.profiler.record_function("forward"), nvtx("forward"):
            loss = run.loss(step_model)
        with torch.profiler.record_function("backward"), nvtx("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"), nvtx("optimizer"):
            clip_and_step(step_model, run.optimizer, list(run.model.parameters()), cfg.grad_clip)
            run.optimizer.zero_grad(set_to_none=True)
    print(f"profile {name}: batch {run.batch_size} x {run.model.config.context_length}, "
          f"{device}, {str(dtype)[6:]}, compile={compiled}, {cfg.optimizer}, {cfg.steps} steps")
    for _ in range(cfg.warmup_steps):
        step()
    with torch.profiler.profile() as prof:  # CPU, and CUDA where there is one
        for _ in range(cfg.steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=15)
    print(f"top operators and kernels of {cfg.steps} steps, by {sort_by}:\n{table}")
    result = {"table": table, "peak_gb": {}}
    if not cuda:
        print("GPU time by kind, memory snapshot and peak memory: need CUDA, skipped")
        return result
    # Where a step's time goes: the GPU's kernels by kind (not the ranges named above, which the
    # profiler shows on the GPU too), against unprofiled steps' time; the rest: the GPU idle.
    step_ms = result["step_ms"] = statistics.median(time_each(step, 5, device)) * 1e3
    kinds = result["ms_by_kind"] = time_by_kind(
        (e.name, e.time_range.elapsed_us() / 1e3 / cfg.steps) for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
    c = run.model.config
    flops = mfu_flops_per_token(c, c.context_length) * run.batch_size * c.context_length
    tflops = flops / max(kinds["matmul"] + kinds["attention"], 1e-6) / 1e9
    print(f"a step: {step_ms:.2f} ms (median of 5), of which GPU kernels "
          f"{sum(kinds.values()):.2f} ms:\n" + "".join(
              f"  {kind:>20} {ms:7.2f} ms {ms / step_ms:6.1%}\n" for kind, ms in kinds.items()) +
          f"  matmuls and attention run at {tflops:.0f} TFLOP/s of the step's "
          f"{flops / 1e12:.2f} TFLOP (the PaLM count, as in MFU)")
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    step()
    with atomic_output(cfg.out) as tmp:
        torch.cuda.memory._dump_snapshot(str(tmp))
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"wrote {cfg.out}: memory over one step, open it at https://pytorch.org/memory_viz")
    for kind in ("plain", "checkpointed"):  # eager: what the model itself keeps for backward
        torch.cuda.reset_peak_memory_stats(device)
        step(LossModel(checkpoint_blocks(run.model) if kind == "checkpointed" else run.model))
        result["peak_gb"][kind] = torch.cuda.max_memory_allocated(device) / 1e9
    print("peak memory of an eager step: " + ", ".join(
        f"{kind} {gb:.2f} GB" for kind, gb in result["peak_gb"].items()))
    return result


# The GPU, in code: timing a kernel, and checking what it is given ---------------------------------
def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """ms per call: do_bench on CUDA (it syncs and clears L2 between calls), else the best of 5."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn)
    return min(timeit.repeat(fn, number=1, repeat=5)) * 1e3


def check_input(name: str, *tensors: Tensor, contiguous: bool = False) -> None:
    """One clear error instead of a crash or a silently wrong result deep inside Triton."""
    for t in tensors:
        if not (t.is_cuda or INTERPRET):
            raise ValueError(f"{name}: Triton kernels need CUDA tensors (on a CPU: TRITON_"
                             f"INTERPRET=1 before triton is imported), got one on {t.device}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: dtype {t.dtype}; expected float32, float16 or bfloat16")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name}: the tensor must be contiguous (call .contiguous() first)")


def compare(title: str, ways: dict, x: torch.Tensor, ref: torch.Tensor, tol: float) -> dict:
    """Check every way gives ref, then print their GB/s, counting one read and one write of x."""
    for name, fn in ways.items():
        torch.testing.assert_close(fn(x).float(), ref, atol=tol, rtol=tol, msg=lambda m: name + m)
    gbps = {k: 2 * x.nbytes / time_ms(lambda: fn(x), x.device) / 1e6 for k, fn in ways.items()}
    print(title + "".join(f"\n  {name:15} {v:9,.2f} GB/s" for name, v in gbps.items()))
    return gbps


# The roofline: is an op waiting on memory or on arithmetic? ---------------------------------------
def classify(flops: float, bytes_moved: float, bandwidth: float, peak: float) -> dict:
    """Below the ridge point, peak / bandwidth FLOPs per byte, an op waits on memory."""
    intensity = flops / bytes_moved
    return {"intensity": intensity, "bound": "memory" if intensity < peak / bandwidth else
            "compute", "predicted_s": max(flops / peak, bytes_moved / bandwidth)}


def matmul_cost(m: int, k: int, n: int, e: int = 2) -> tuple[int, int]:
    """(FLOPs, bytes) of (m, k) @ (k, n): a multiply-add per term; read A and B, write C once."""
    return 2 * m * k * n, e * (m * k + k * n + m * n)


def model_ops(tokens: int = 8192, d: int = 4096, e: int = 2) -> list[tuple[str, int, int]]:
    """(name, FLOPs, bytes) of a model's ops on tokens x d activations of e-byte (bf16) numbers.
    Attention scores: one head's (T, 128) @ (128, T), the T x T scores written to memory."""
    n, mm = tokens * d, {"decode matvec 1x4096 @ 4096x4096": (1, d, d),
                         "decode batch 64x4096 @ 4096x4096": (64, d, d),
                         "square 4096x4096 @ 4096x4096": (d, d, d),
                         f"training FFN {tokens}x4096 @ 4096x16384": (tokens, d, 4 * d),
                         **{f"attention scores QK^T T={T}": (T, 128, T) for T in (1024, 4096)}}
    return [("add x + y", n, 3 * n * e), ("GeLU, ~8 FLOPs + a tanh per element", 8 * n, 2 * n * e),
            ("softmax over rows", 5 * n, 2 * n * e), ("RMSNorm", 4 * n, 2 * n * e),
            *[(name, *matmul_cost(*shape, e)) for name, shape in mm.items()]]


def roofline(device: torch.device | str | None = None) -> dict:
    device = resolve_device(device or "auto")
    cuda = device.type == "cuda"
    src = torch.randn(2**28 if cuda else 2**22, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / time_ms(lambda: dst.copy_(src), device) * 1e3  # read + write
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    peak = 2 * n**3 / time_ms(lambda: a @ b, device) * 1e3
    rows = [{"op": name, "flops": f, "bytes": b, **classify(f, b, bandwidth, peak)}
            for name, f, b in model_ops()]
    print(f"roofline of {torch.cuda.get_device_name(device) if cuda else 'this CPU (fp32)'}: "
          f"copy {bandwidth / 1e9:,.0f} GB/s, matmul {peak / 1e12:,.2f} TFLOP/s; ridge point "
          f"{peak / bandwidth:,.0f} FLOPs/byte\n  {'op (bf16)':40} {'GFLOP':>9} {'MB':>9} "
          f"{'FLOP/B':>7} {'bound':>8} {'predicted':>11}" + "".join(
              f"\n  {r['op']:40} {r['flops'] / 1e9:9.2f} {r['bytes'] / 1e6:9.1f} "
              f"{r['intensity']:7.1f} {r['bound']:>8} {r['predicted_s'] * 1e6:9,.1f} us"
              for r in rows))
    # Below the ridge: every elementwise op and norm; decoding (each weight read for 2 FLOPs per
    # token in the batch); and attention scores, which is why FlashAttention keeps them on chip.
    return {"bandwidth": bandwidth, "peak": peak, "ridge": peak / bandwidth, "ops": rows}


# One elementwise function five ways: GeLU, tanh approximation -------------------------------------
@triton.jit
def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n  # the last block runs past the end
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
    # 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + e^(-2u)), and e^z = 2^(z log2 e): exp2 is one
    # instruction. Very negative x gives x / inf = -0, not NaN.
    y = x / (1.0 + tl.exp2(-2.0 * 1.4426950408889634 * u))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def gelu_triton(x: torch.Tensor) -> torch.Tensor:
    check_input("gelu_triton", x, contiguous=True)
    y = torch.empty_like(x)
    gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def gelu_five_ways(n: int = 2**26, device: torch.device | str | None = None) -> dict:
    device = resolve_device(device or "auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(n, device=device, dtype=dtype)
    # model.py's gelu_tanh (GPT-2's) written out: each operation a kernel that reads and writes
    # the whole tensor; F.gelu is one kernel, torch.compile fuses the formula into one, ours too.
    ways = {"eager formula": gelu_tanh, "F.gelu(tanh)": lambda x: F.gelu(x, approximate="tanh"),
            "torch.compile": torch.compile(gelu_tanh), "Triton": gelu_triton}
    gbps = compare(f"GeLU of {n:,} {str(dtype)[6:]} numbers on {device.type}:", ways, x,
                   F.gelu(x.float(), approximate="tanh"), 1e-5 if dtype == torch.float32 else 2e-2)
    # The fifth way: the PTX (NVIDIA's virtual assembly) Triton compiled gelu_kernel to (the same
    # dtype and alignment fetch the cached compile), the first instruction of each kind in order.
    head = x[:1024]
    kernel = gelu_kernel[(1,)](head, torch.empty_like(head), head.numel(), BLOCK=1024)
    ptx = kernel.asm["ptx"] if kernel is not None else ""  # None: interpreted, never compiled
    first = {}
    for line in ptx.splitlines():  # instructions, not directives
        if line[:1].isspace() and line.strip()[:1] not in "/.${}":
            first.setdefault(line.split()[line.strip().startswith("@")], " ".join(line.split()))
    print("  PTX of gelu_kernel, the first instruction of each kind:"
          + "".join("\n    " + line for line in list(first.values())[:30]) if ptx else
          "  no PTX of gelu_kernel: Triton interprets it on a CPU")
    return {"gbps": gbps, "ptx": ptx}


# Fused softmax: one program per row, the row held in registers ------------------------------------
@triton.jit
def softmax_kernel(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row_start + cols, mask=mask, other=-float("inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))  # the max first, so exp cannot overflow; padding gives 0
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row_start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def softmax_triton(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension: reads x once and writes once, where eager reads it 4x."""
    check_input("softmax_triton", x, contiguous=True)
    if x.shape[-1] > 2**15:
        raise ValueError(f"softmax_triton holds a row in registers: {x.shape[-1]} > 32768 columns")
    y, block = torch.empty_like(x), triton.next_power_of_2(x.shape[-1])
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16  # more threads share a long row
    softmax_kernel[(x.numel() // x.shape[-1],)](x, y, x.shape[-1], BLOCK=block, num_warps=warps)
    return y


def softmax_bench(device: torch.device, rows: int = 16384, cols: int = 4096) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(rows, cols, device=device, dtype=dtype) * 10
    ways = {"eager formula": lambda x: softmax(x, -1),  # model.py's, max-subtracted
            "torch.softmax": lambda x: torch.softmax(x, -1), "Triton": softmax_triton}
    return compare(f"softmax over the rows of a {rows} x {cols} {str(dtype)[6:]} tensor:", ways,
                   x, torch.softmax(x.float(), -1), 2e-2)


# Tiled matmul: each program computes one BLOCK_M x BLOCK_N tile of C ------------------------------
MATMUL_CONFIGS = (  # one small tile under the interpreter; one config also skips the timing runs
    [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})] if INTERPRET else
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=s,
                   num_warps=w) for m, n, s, w in ((128, 256, 3, 8), (128, 128, 4, 4))])


def fit_shared_memory(configs: list, named_args: dict, **_) -> list:
    """A float32 tile takes twice a 16-bit one's shared memory: halve BLOCK_K, so that the
    stages in flight still fit in an SM's 227 KiB (128 x 256 x 64 in 3 stages would need 288)."""
    scale = max(1, named_args["a_ptr"].element_size() // 2)
    return [triton.Config({**c.kwargs, "BLOCK_K": c.kwargs["BLOCK_K"] // scale},
                          num_stages=c.num_stages, num_warps=c.num_warps) for c in configs]


@triton.autotune(configs=MATMUL_CONFIGS, key=["M", "N", "K"],
                 prune_configs_by={"early_config_prune": fit_shared_memory})
@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Which tile? Programs run roughly in id order, a wave of about one per SM. Row by row, a wave
    # needs one row-block of A but nearly every column-block of B: all of B streams through L2
    # again for each row of tiles. Grouped, ids walk down GROUP_M rows of tiles before moving right,
    # so a wave covers a near-square patch of C and reuses its few blocks of A and B from L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group, in_group = pid // (GROUP_M * tiles_n), pid % (GROUP_M * tiles_n)
    rows_in_group = tl.minimum(tiles_m - group * GROUP_M, GROUP_M)  # the last group may be short
    pid_m, pid_n = group * GROUP_M + in_group % rows_in_group, in_group // rows_in_group
    rm, rk = pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # 16-bit inputs, fp32 sums
    for k in range(0, K, BLOCK_K):  # masked loads pad the ragged edges with zeros
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)  # on the tensor cores
        a_ptrs, b_ptrs = a_ptrs + BLOCK_K * stride_ak, b_ptrs + BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D (M, K) @ (K, N) of one float dtype, any strides (they are kernel arguments)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"matmul_triton: expected (M, K) @ (K, N) of one dtype, got "
                         f"{tuple(a.shape)} {a.dtype} @ {tuple(b.shape)} {b.dtype}")
    check_input("matmul_triton", a)
    if INTERPRET and a.dtype == torch.bfloat16:  # numpy has no bf16: tl.dot multiplies raw bits
        raise ValueError("matmul_triton: Triton's interpreter gets bf16 tl.dot wrong; use fp16")
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    matmul_kernel[lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](
        a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride())
    return c


def matmul_bench(device: torch.device, sizes: tuple[int, ...] = (2048, 4096, 8192)) -> dict:
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    print(f"square matmuls on {device.type}, TFLOP/s (Triton autotunes on its first call):")
    tflops = {}
    for dtype, n in itertools.product(dtypes, sizes):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        torch.testing.assert_close(matmul_triton(a, b).float(), a.float() @ b.float(),
                                   atol=0.05 * n**0.5, rtol=2e-2)
        tflops[str(dtype)[6:], n] = row = {
            name: 2 * n**3 / time_ms(lambda: fn(a, b), device) / 1e9
            for name, fn in [("torch.matmul", torch.matmul), ("Triton", matmul_triton)]}
        print(f"  {str(dtype)[6:]:8} {n:5}: " + "  ".join(f"{k} {v:7.2f}" for k, v in row.items()))
    return tflops


# Floating point: the formats, what fp16 sums lose, which dtype autocast runs each op in -----------
def floating_point(device: torch.device | str | None = None) -> dict:
    device = resolve_device(device or "auto")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "fp8 e4m3": torch.float8_e4m3fn, "fp8 e5m2": torch.float8_e5m2}
    formats = {}
    for name, info in ((name, torch.finfo(dtype)) for name, dtype in dtypes.items()):
        mant = round(-math.log2(info.eps))  # eps = 2^-mantissa bits, the gap above 1.0
        formats[name] = {"bits": info.bits, "exponent": info.bits - 1 - mant, "mantissa": mant,
                         "max": info.max, "min_normal": info.tiny, "eps": info.eps}
    print(f"number formats (torch.finfo)\n  {'':9}" + "".join(f"{k:>11}" for k in formats["fp32"])
          + "".join(f"\n  {k:9}" + "".join(f"{v:11.3g}" for v in f.values())
                    for k, f in formats.items()))
    # fp16's and bf16's next numbers above 1.0 are 2^-10 and 2^-7 away: each 1e-4 rounds off and
    # the sum stays 1.0. So accumulate in fp32, as torch.sum of fp16 does inside, and tensor cores.
    accumulate = {}
    for name in ("fp32", "fp16", "bf16"):
        total, step = torch.ones((), dtype=dtypes[name]), torch.tensor(1e-4, dtype=dtypes[name])
        for _ in range(10_000):
            total = total + step
        accumulate[name] = total.item()
    accumulate["torch.sum(fp16)"] = 1 + torch.full((10_000,), 1e-4).half().sum().item()
    print("1.0 + 1e-4 added 10,000 times (exactly 2.0): "
          + ", ".join(f"{k} {v:.4f}" for k, v in accumulate.items()))
    # FP8 needs a scale per tensor: values of ~1e-4 lie below e4m3's smallest number (2^-9)
    small = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-4
    scale = torch.finfo(torch.float8_e4m3fn).max / small.abs().max()  # amax onto 448
    fp8 = {name: ((v.to(torch.float8_e4m3fn).float() / s - small).norm() / small.norm()).item()
           for name, v, s in (("as is", small, 1.0), ("scaled", small * scale, scale))}
    print("N(0, 1e-4) values in e4m3, relative error: "
          + ", ".join(f"{k} {v:.1%}" for k, v in fp8.items()) + " (kernels.fp8_linear scales)")
    x, w = torch.randn(8, 16, device=device), torch.randn(16, 16, device=device)
    target = torch.randint(16, (8,), device=device)
    ops = {"matmul": lambda a: a @ w, "linear": lambda a: F.linear(a, w),
           "softmax": lambda a: a.softmax(-1), "log_softmax": lambda a: F.log_softmax(a, -1),
           "layer_norm": lambda a: F.layer_norm(a, (16,)), "sum": lambda a: a.sum(),
           "exp": lambda a: a.exp(), "cross_entropy": lambda a: F.cross_entropy(a, target),
           "add": lambda a: a + a}
    # Autocast picks per op: matmuls in bf16, ops on its fp32 list upcast, the rest in their
    # inputs' dtype. So inputs matter: fp32 as given, or bf16 as a matmul leaves them.
    with torch.autocast(device.type, dtype=torch.bfloat16):
        autocast = {name: tuple(str(op(a).dtype)[6:] for a in (x, x.bfloat16()))
                    for name, op in ops.items()}
    print(f"torch.autocast({device.type!r}, bfloat16): output dtype for an fp32 / a bf16 input"
          + "".join(f"\n  {name:14} {a:9} / {b}" for name, (a, b) in autocast.items()))
    return {"formats": formats, "accumulate": accumulate, "fp8": fp8, "autocast": autocast}


# The lesson, in order: `python kernels.py lesson` -------------------------------------------------
def lesson(device: torch.device | str | None = None) -> dict:
    device = resolve_device(device or "auto")
    cuda = device.type == "cuda"
    return {"roofline": roofline(device),
            "gelu": gelu_five_ways(2**28 if cuda else 2**14, device),
            "softmax": softmax_bench(device, *((16384, 4096) if cuda else (64, 1000))),
            "matmul": matmul_bench(device, (2048, 4096, 8192) if cuda else (96,)),
            "floating_point": floating_point(device)}


# Fused RMSNorm: forward and backward --------------------------------------------------------------
# Eager RMSNorm is ~6 kernels (cast, square, mean, rsqrt, two multiplies), each a trip through
# memory. Here a program normalises a block of rows in registers: x read once, y written once. With
# a residual it first adds the branch output and writes that sum too: "x + attn(ln1(x))", ln2 fused.
@triton.jit
def _rmsnorm_fwd_kernel(X, R, W, Y, S, RSTD, n_rows, D, eps, HAS_RESIDUAL: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    offsets = rows[:, None].to(tl.int64) * D + cols[None, :]  # (R, BLOCK_D); int64: > 2^31 ok
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        summed = x + tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
        summed = summed.to(S.dtype.element_ty)
        tl.store(S + offsets, summed, mask=mask)
        x = summed.to(tl.float32)  # normalise the rounded sum, as the unfused block does
    # float32: torch.compile passes a Python float (eps, a softmax scale) to a kernel as fp64
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + tl.cast(eps, tl.float32))  # (R,)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(Y + offsets, (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)  # 4 bytes a row: backward skips the reduction


# y = x_hat * w, x_hat = x * rstd: dx = rstd * (g - x_hat * mean(g * x_hat)), g = dy * w, per row;
# dw = sum over rows of dy * x_hat crosses rows, so each program keeps its share for its own blocks
# of rows in registers and writes it once into a (programs, D) float32 buffer; a second pass sums.
@triton.jit
def _rmsnorm_bwd_kernel(X, W, RSTD, DY, DS, DX, DW_PARTIAL, n_rows, D, blocks_per_program,
                        HAS_DS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for block in range(pid * blocks_per_program, (pid + 1) * blocks_per_program):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
        offsets = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / D)[:, None])
        if HAS_DS:  # the gradient reaching the sum directly, through the residual stream
            dx += tl.load(DS + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * D + cols, tl.sum(dw, axis=0), mask=cols < D)


@functools.cache
def _rmsnorm_launch(D: int, device: torch.device) -> tuple[dict, int]:
    """Rows per program (narrow rows batched to >= 2K elements), warps (16 elements a thread), the
    best of a sweep on an H200 (16384 x 4096 bf16: forward 92%, backward 81% of a copy); and the
    backward's programs: a few per SM (more for narrow rows), each walking many rows."""
    if D > 65536:
        raise ValueError(f"the fused RMSNorm keeps a row in registers: D must be <= 65536, got {D}")
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(16, 2048 // block_d))
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 4
    warps = max(1, min(16, rows * block_d // 512))
    return (dict(BLOCK_ROWS=rows, BLOCK_D=block_d, num_warps=warps),
            sms * min(16, max(2, 8192 // block_d)))


# Our kernels as torch custom operators. An autograd.Function launching Triton kernels breaks the
# torch.compile graph at every call (GPT-2 small's compiled step: 235K tokens/s, plain torch 500K).
# A custom op is one node of one graph; its fake gives compile the output shapes without a kernel
# (allocating as the op does); its backward is another op. Ops return new tensors, never views.
# On a GPU each is a triton_op: compile traces into it, sees the kernels (through wrap_triton) and
# launches them from its own generated code. A plain custom op is called through torch's
# dispatcher and our Python at every step, ~200 us of host time a call: GPT-2 small's step makes
# ~100 calls and its compiled loop fell to 270K tokens/s. The interpreter cannot be traced into.
def _op(name: str) -> Callable:
    make = torch.library.custom_op if INTERPRET else torch.library.triton_op
    return lambda fn: make(name, fn, mutates_args=())


def _rmsnorm_outputs(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float,
                     out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """Unfilled y (..., D) in out_dtype (None: the promoted input dtype), x + residual (empty
    without a residual) and rstd (...,) float32."""
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=out_dtype or dtype, device=x.device)
    summed = y.new_empty(0) if residual is None else torch.empty_like(y, dtype=dtype)
    return y, summed, x.new_empty(x.shape[:-1], dtype=torch.float32)


@_op("cs336::rmsnorm_fwd")
def _rmsnorm_fwd(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float,
                 out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    y, summed, rstd = _rmsnorm_outputs(x, weight, residual, eps, out_dtype)
    D, (launch, _) = x.shape[-1], _rmsnorm_launch(int(x.shape[-1]), x.device)
    x2 = x.reshape(-1, D).contiguous()  # (M, D)
    r2 = x2 if residual is None else residual.reshape(-1, D).contiguous()
    M = x2.shape[0]
    wrap_triton(_rmsnorm_fwd_kernel)[(triton.cdiv(M, launch["BLOCK_ROWS"]),)](
        x2, r2, weight, y, y if residual is None else summed, rstd, M, D, eps,
        HAS_RESIDUAL=residual is not None, **launch)
    return y, summed, rstd


@_op("cs336::rmsnorm_bwd")
def _rmsnorm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor,
                 dsummed: Tensor | None) -> tuple[Tensor, Tensor]:
    """(dx, dweight); x is what was normalised, dsummed the gradient of x + residual."""
    (M, D), (launch, max_programs) = x.reshape(-1, x.shape[-1]).shape, _rmsnorm_launch(
        int(x.shape[-1]), x.device)
    num_blocks = triton.cdiv(M, launch["BLOCK_ROWS"])
    per_program = triton.cdiv(num_blocks, min(num_blocks, max_programs))
    programs = triton.cdiv(num_blocks, per_program)
    dx, dw_partial = torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty((programs, D), dtype=torch.float32)
    flat = [t.reshape(-1, D).contiguous() for t in (x, dy, dx if dsummed is None else dsummed)]
    wrap_triton(_rmsnorm_bwd_kernel)[(programs,)](flat[0], weight, rstd, flat[1], flat[2], dx,
                                                  dw_partial, M, D, per_program,
                                                  HAS_DS=dsummed is not None, **launch)
    # The second pass is torch's column sum: a small buffer (H200, D=4096: 264 rows, 4 MB).
    return dx, dw_partial.sum(0).to(weight.dtype)


def _rmsnorm_setup(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, residual, _, _ = inputs
    _, summed, rstd = output
    ctx.save_for_backward(x if residual is None else summed, weight, rstd)
    ctx.dtypes = x.dtype, None if residual is None else residual.dtype
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no gradient for the sum: None, not a tensor of zeros


def _rmsnorm_backward(ctx, dy: Tensor, dsummed: Tensor | None, _) -> tuple:
    x_dtype, residual_dtype = ctx.dtypes  # the add passes dx on to the residual too
    dx, dw = _rmsnorm_bwd(dy, *ctx.saved_tensors, None if residual_dtype is None else dsummed)
    return dx.to(x_dtype), dw, None if residual_dtype is None else dx.to(residual_dtype), None, None


_rmsnorm_fwd.register_fake(_rmsnorm_outputs)
_rmsnorm_bwd.register_fake(lambda dy, x, weight, rstd, dsummed: (
    torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)))
_rmsnorm_fwd.register_autograd(_rmsnorm_backward, setup_context=_rmsnorm_setup)


def rmsnorm_triton(x: Tensor, weight: Tensor, eps: float = 1e-5, residual: Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """rmsnorm(x) * weight for x (..., D); with a residual, (rmsnorm(x + residual) * weight,
    x + residual). Statistics in float32, outputs in the (promoted) input dtype like model.py;
    out_dtype sets the normed output's (the cast a matmul after it would make, for free)."""
    check_input("RMSNorm", x, weight, *([] if residual is None else [residual]))
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"RMSNorm weight must have shape ({x.shape[-1]},), got "
                         f"{tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    y, summed, _ = _rmsnorm_fwd(x, weight, residual, eps, out_dtype)
    return y if residual is None else (y, summed)


def fused_add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-5,
                      out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual) in one pass over memory, both directions."""
    return rmsnorm_triton(x, weight, eps, residual, out_dtype)


class TritonRMSNorm(RMSNorm):
    """model.py's RMSNorm on the fused kernel: the same `weight`, so checkpoints load either way.
    feeds_matmul=True (model.py's pre-norm blocks, where the output goes only into matmuls): under
    autocast the output is written in the autocast dtype, the matmul's own cast, which would
    otherwise cost a pass over memory (and its backward another)."""
    def __init__(self, d_model: int, eps: float = 1e-5, feeds_matmul: bool = False) -> None:
        super().__init__(d_model, eps)
        self.feeds_matmul = feeds_matmul

    def out_dtype(self, x: Tensor) -> torch.dtype | None:
        return autocast_dtype(x.device.type) if self.feeds_matmul else None

    def forward(self, x: Tensor) -> Tensor:
        return rmsnorm_triton(x, self.weight, self.eps, out_dtype=self.out_dtype(x))

    def add_and_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(self(x + residual), x + residual): what a pre-norm block needs before its FFN."""
        return fused_add_rmsnorm(x, residual, self.weight, self.eps, self.out_dtype(x))


# Training fusions: the SwiGLU gate ----------------------------------------------------------------
# silu(a) * b is three eager kernels (sigmoid, multiply, multiply) whose intermediates autograd
# keeps. Fused: forward reads a, b and writes h; backward recomputes the sigmoid from a, b. a and b
# arrive side by side, as the one matmul of model.stacked_linear makes them, and their gradients
# leave that way: the backward's input gradient is then one matmul too, with no copies between.
@triton.jit
def _swiglu_fwd_kernel(AB, H, F, BLOCK: tl.constexpr):  # a program: BLOCK columns of a row
    row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask, a_at = cols < F, AB + row * 2 * F + cols  # b sits F further on
    a = tl.load(a_at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_at + F, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + row * F + cols, (a * tl.sigmoid(a) * b).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(AB, DH, DAB, F, BLOCK: tl.constexpr):
    row, cols = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask, at = cols < F, row * 2 * F + cols
    a = tl.load(AB + at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(AB + at + F, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(DH + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)  # d silu(a) / da = sig * (1 + a * (1 - sig))
    tl.store(DAB + at, (dh * b * sig * (1 + a * (1 - sig))).to(DAB.dtype.element_ty), mask=mask)
    tl.store(DAB + at + F, (dh * a * sig).to(DAB.dtype.element_ty), mask=mask)


def _swiglu_outputs(ab: Tensor) -> Tensor:
    return ab.new_empty(*ab.shape[:-1], ab.shape[-1] // 2)


def _swiglu_grid(ab: Tensor) -> tuple[int, int]:
    return ab.numel() // max(ab.shape[-1], 1), triton.cdiv(ab.shape[-1] // 2, 1024)


@_op("cs336::swiglu_fwd")
def _swiglu_fwd(ab: Tensor) -> Tensor:
    h = _swiglu_outputs(ab)
    wrap_triton(_swiglu_fwd_kernel)[_swiglu_grid(ab)](ab.contiguous(), h, h.shape[-1], BLOCK=1024)
    return h


@_op("cs336::swiglu_bwd")
def _swiglu_bwd(dh: Tensor, ab: Tensor) -> Tensor:
    dab = ab.new_empty(ab.shape)
    wrap_triton(_swiglu_bwd_kernel)[_swiglu_grid(ab)](
        ab.contiguous(), dh.contiguous(), dab, dh.shape[-1], BLOCK=1024)
    return dab


_swiglu_fwd.register_fake(_swiglu_outputs)
_swiglu_bwd.register_fake(lambda dh, ab: ab.new_empty(ab.shape))
_swiglu_fwd.register_autograd(  # saves a | b: backward recomputes the sigmoid from them
    lambda ctx, dh: _swiglu_bwd(dh, *ctx.saved_tensors),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def swiglu_gate(ab: Tensor) -> Tensor:
    """silu(a) * b for ab = a | b, side by side in its last dim (..., 2F) -> (..., F); computed
    in float32 and returned in ab's dtype."""
    check_input("swiglu", ab)
    if ab.dim() == 0 or ab.shape[-1] % 2:
        raise ValueError(f"swiglu needs a | b side by side, a last dim of even size: got "
                         f"{tuple(ab.shape)}")
    return _swiglu_fwd(ab)


class TritonSwiGLU(SwiGLU):
    """model.py's SwiGLU (the same w1, w2, w3) with the fused gate between its matmuls."""
    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu_gate(stacked_linear(x, self.w1, self.w3)))


# Training fusions: q | k | v as one matmul, then RoPE and the head split in one kernel -----------
# model.py projects q, k and v with three matmuls and rotates q and k (two fused kernels forward,
# two backward, and an add of the three input gradients). Here the projection is one matmul
# (model.stacked_linear) and one kernel rotates q and k, copies v and splits the heads; backward
# rotates the gradients back straight into d(q | k | v), so the input gradient is one matmul too.
# The kernel writes whole tensors, never views: a compiled graph may clone a view that a kernel
# writes without the strides the kernel was given (on the H200, an illegal address).
@triton.jit
def _rope_qkv_kernel(QKV, Q, K, V, COS, SIN, T, H, HKV, cos_stride, HD: tl.constexpr,
                     HD_PAD: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr):
    """A program: BLOCK_T tokens of head j of the H + 2 HKV side by side in q | k | v. Forward:
    q, k or v = R(t) (q | k | v)[j] (v: R = 1); backward: d(q | k | v)[j] = R(t)^T dq, dk or dv."""
    pid, j, n_blocks = tl.program_id(0), tl.program_id(1), tl.cdiv(T, BLOCK_T)
    t = (pid % n_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = ((pid // n_blocks).to(tl.int64) * T + t)[:, None]  # b T + t
    cols = tl.arange(0, HD_PAD)[None, :]
    ok = (t < T)[:, None] & (cols < HD)
    packed = QKV + row * ((H + 2 * HKV) * HD) + j * HD
    if j < H:
        one = Q + row * (H * HD) + j * HD
    elif j < H + HKV:
        one = K + row * (HKV * HD) + (j - H) * HD
    else:
        one = V + row * (HKV * HD) + (j - H - HKV) * HD
    src, dst = (one, packed) if BACKWARD else (packed, one)
    x = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)
    if j < H + HKV:  # q, k: rotate each pair (x_2i, x_2i+1) by t theta_i, as model.apply_rotary
        half = tl.arange(0, HD_PAD // 2)[None, :]
        at, ok_half = t[:, None] * cos_stride + half, (t < T)[:, None] & (half < HD // 2)
        cos = tl.load(COS + at, mask=ok_half, other=0.0).to(tl.float32)
        sin = tl.load(SIN + at, mask=ok_half, other=0.0).to(tl.float32)
        if BACKWARD:
            sin = -sin  # R^T is the rotation by minus the angle
        even, odd = tl.split(tl.reshape(x, (BLOCK_T, HD_PAD // 2, 2)))
        x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_T, HD_PAD))
    tl.store(dst + cols, x.to(dst.dtype.element_ty), mask=ok)


def _rope_qkv_launch(qkv: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                     backward: bool) -> None:
    (B, T, H, d), H_kv = q.shape, k.shape[2]
    wrap_triton(_rope_qkv_kernel)[(B * triton.cdiv(T, 32), H + 2 * H_kv)](
        qkv, q, k, v, cos, sin, T, H, H_kv, cos.stride(0), HD=int(d),
        HD_PAD=triton.next_power_of_2(int(d)), BACKWARD=backward, BLOCK_T=32)


def _rope_qkv_outputs(qkv: Tensor, H: int, H_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    (B, T, width), heads = qkv.shape, H + 2 * H_kv
    return tuple(qkv.new_empty(B, T, n, width // heads) for n in (H, H_kv, H_kv))


def _rope_qkv_input_grad(dq: Tensor, dk: Tensor) -> Tensor:  # d(q | k | v), unfilled
    return dq.new_empty(*dq.shape[:2], (dq.shape[2] + 2 * dk.shape[2]) * dq.shape[3])


@_op("cs336::rope_qkv_fwd")
def _rope_qkv_fwd(qkv: Tensor, cos: Tensor, sin: Tensor, H: int,
                  H_kv: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated) and v, each (B, T, heads, d)."""
    q, k, v = _rope_qkv_outputs(qkv, H, H_kv)
    _rope_qkv_launch(qkv.contiguous(), q, k, v, cos, sin, backward=False)
    return q, k, v


@_op("cs336::rope_qkv_bwd")
def _rope_qkv_bwd(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    dqkv = _rope_qkv_input_grad(dq, dk)
    _rope_qkv_launch(dqkv, dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin, True)
    return dqkv


_rope_qkv_fwd.register_fake(lambda qkv, cos, sin, H, H_kv: _rope_qkv_outputs(qkv, H, H_kv))
_rope_qkv_bwd.register_fake(lambda dq, dk, dv, cos, sin: _rope_qkv_input_grad(dq, dk))
_rope_qkv_fwd.register_autograd(  # saves only the tables: the rotation is linear
    lambda ctx, dq, dk, dv: (_rope_qkv_bwd(dq, dk, dv, *ctx.saved_tensors), None, None, None, None),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[1:3]))


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
             num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q | k | v side by side (B, T, (H + 2 H_kv) d) -> q, k rotated by RoPE's tables cos, sin
    (T, d/2) and v, each (B, heads, T, d) as attention takes them (views of (B, T, heads, d))."""
    check_input("rope_qkv", qkv, cos, sin)
    heads = num_heads + 2 * num_kv_heads
    if qkv.dim() != 3 or num_heads < 1 or num_kv_heads < 1 or qkv.shape[-1] % (2 * heads):
        raise ValueError(f"rope_qkv: q | k | v must be (B, T, (num_heads + 2 num_kv_heads) d) "
                         f"with d even: got {tuple(qkv.shape)} for {num_heads} + 2 x "
                         f"{num_kv_heads} heads")
    table = (qkv.shape[1], qkv.shape[-1] // heads // 2)
    if cos.shape != table or sin.shape != table:
        raise ValueError(f"rope_qkv: the tables must be (T, d/2) = {table}: got cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    q, k, v = _rope_qkv_fwd(qkv, cos.contiguous(), sin.contiguous(), num_heads, num_kv_heads)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class TritonSelfAttention(MultiHeadSelfAttention):
    """model.py's attention (the same q_proj, k_proj, v_proj) whose projection is one matmul and
    rope_qkv while training with positions shared by the batch; else model.py's own steps."""
    def project(self, x: Tensor, rope: tuple | None) -> tuple[Tensor, ...]:
        if not (torch.is_grad_enabled() and self.use_rope and rope is not None
                and rope[0].dim() == 2 and x.dim() == 3):
            return super().project(x, rope)
        qkv = stacked_linear(x, self.q_proj, self.k_proj, self.v_proj)
        return rope_qkv(qkv, *rope, self.num_heads, self.num_kv_heads)


# Training fusions: linear + cross-entropy without the logits --------------------------------------
# The LM head's logits are a small model's largest activation (GPT-2 small, 16 x 1024 tokens: 16K x
# 50304, 1.6 GB in bf16, plus float32 copies for the loss). Here tokens go through in chunks: one
# kernel turns a chunk's logits in place into the loss and d loss / d logits = (softmax - one_hot)
# / count, which is multiplied at once into the gradients of the hidden rows and the weight, then
# dropped; backward only scales them. The kernel passes over the logits 3 times, eager PyTorch ~6.
@triton.jit
def _cross_entropy_kernel(LOGITS, TARGETS, LOSS, INV_COUNT, V, row_stride, ignore_index,
                          BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    ptr = LOGITS + row.to(tl.int64) * row_stride
    target = tl.load(TARGETS + row)
    # log-sum-exp in one streaming pass (the online softmax), each lane with its own running max
    # m and sum s: the row is reduced once at the end, not once per block (that reduction spans
    # warps, and made the kernel wait). When x passes m, s is rescaled by e^(m - x) and gains
    # e^0 = 1; otherwise it gains e^(x - m): one exp, of -|x - m|, either way.
    m = tl.full((BLOCK_V,), -1e30, tl.float32)  # finite: no inf - inf (masked lanes are -inf)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        e = tl.exp(-tl.abs(x - m))
        s = tl.where(x > m, s * e + 1.0, s + e)
        m = tl.maximum(m, x)
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
    keep = (target != ignore_index) & (target >= 0) & (target < V)
    target_logit = tl.load(ptr + target, mask=keep, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(keep, lse - target_logit, 0.0))
    scale = tl.where(keep, tl.load(INV_COUNT), 0.0)  # ignored rows: zero loss, zero gradient
    for start in range(0, V, BLOCK_V):  # overwrite the logits with their gradient
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=cols < V)


# A plain custom op, not a triton_op: called once a step, its host cost is small (and its kernel,
# writing into slices of buffers, was not tried under compile's tracing of Triton calls).
@torch.library.custom_op("cs336::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                          chunk_size: int, dtype: torch.dtype,
                          grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, its gradient for hidden, for weight in float32); the matmuls run in dtype.
    grads=False (validation, no_grad): the loss alone, two empty tensors, a third of the FLOPs."""
    kept = targets[targets != ignore_index] if not targets.is_cuda else None  # a GPU would sync
    if kept is not None and kept.numel() and (kept.min() < 0 or kept.max() >= len(weight)):
        raise ValueError(f"targets must lie in [0, {len(weight)}) or be {ignore_index}")
    # One cast, not one per chunk, into rows padded with zeros to a multiple of 64 (GPT-2's 50,257
    # is slow on tensor cores): the padded logits are then exactly 0, and so are their gradients.
    V = len(weight)
    h_all, w = hidden.to(dtype), nn.functional.pad(weight.to(dtype), (0, 0, 0, -V % 64))
    inv_count = 1.0 / (targets != ignore_index).sum().clamp(min=1).float()  # no host sync
    losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
    grad_hidden, grad_weight = hidden.new_empty(0), hidden.new_empty(0)
    if grads:  # the weight's gradient keeps w's padded rows: a slice of 50,257 ran slowly
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, len(hidden), chunk_size):
        h = h_all[start:start + chunk_size]  # (C, D)
        logits = h @ w.T  # (C, V + pad): its first V columns become d loss / d logits in place
        _cross_entropy_kernel[(len(h),)](logits, targets[start:], losses[start:], inv_count, V,
                                         logits.stride(0), ignore_index, num_warps=16,
                                         BLOCK_V=min(2048, triton.next_power_of_2(V)))
        if grads:
            grad_hidden[start:start + chunk_size] = logits @ w  # (C, D)
            grad_weight += logits.T @ h  # (V + pad, D), accumulated in float32 across chunks
    return losses.sum() * inv_count, grad_hidden, grad_weight[:V]


def _linear_cross_entropy_setup(ctx, inputs: tuple, output: tuple) -> None:
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.weight_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for them either


def _linear_cross_entropy_backward(ctx, grad_loss: Tensor, *_) -> tuple:
    """The gradients were made in the forward: scale them by the loss's gradient."""
    grad_hidden, grad_weight = ctx.saved_tensors
    return (grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype),
            None, None, None, None, None)


_linear_cross_entropy.register_fake(lambda hidden, weight, targets, ignore_index, chunk_size,
                                    dtype, grads: (
    hidden.new_empty((), dtype=torch.float32),
    torch.empty_like(hidden) if grads else hidden.new_empty(0),
    weight.new_empty(weight.shape, dtype=torch.float32) if grads else hidden.new_empty(0)))
_linear_cross_entropy.register_autograd(_linear_cross_entropy_backward,
                                        setup_context=_linear_cross_entropy_setup)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                               ignore_index: int = -100, chunk_size: int = 8192) -> Tensor:
    """Mean cross-entropy of hidden (N, D) @ weight (V, D).T against targets (N,) over the
    targets that are not ignore_index (all ignored: 0, with zero gradients). GPT-2 small's head,
    16K tokens, bf16 on an H200 (`python kernels.py fused`, before the fourteenth session's
    faster loss kernel): 7.16 ms forward + backward and 1.70 GiB, where the logits and
    F.cross_entropy take 15.37 ms and 9.21 GiB."""
    check_input("fused_linear_cross_entropy", hidden, weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be integer ids of shape ({len(hidden)},), got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = autocast_dtype(hidden.device.type, hidden.dtype)  # the matmuls' dtype, as unfused
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _linear_cross_entropy(hidden, weight, targets.contiguous(), ignore_index, chunk_size,
                                 dtype, grads)[0]


# Training in FP8: the largest matmuls on Hopper's FP8 tensor cores (model.py's fp8=True) ----------
# FP8 tensor cores do twice bf16's flops. e4m3 (3 mantissa bits, max 448) carries activations and
# weights; gradients span more octaves, so e5m2 (2 bits, max 57,344). Each tensor is scaled so its
# largest |value| lands on the format's max (one scale per tensor, recomputed every call), and
# torch._scaled_mm multiplies in FP8, accumulates in fp32 and divides the scales back out. Backward
# needs transposed layouts and the amax and casts cost passes over each tensor, so on GPT-2 small
# (H200, 16 x 1,024 tokens) the gain is within the noise: 32.12 ms against 33.88 in one scratch
# run, 35.30 against 34.25 (std 2.86) in `bench --fp8=True`; 44.04 with attention's four 768-wide
# matmuls in FP8 too (not looked into), so fp8=True leaves attention in bf16. A lesson, an option.
def to_fp8(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(t scaled and cast to an FP8 dtype, the float32 scale that undoes the scaling)."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.detach().abs().amax().float().clamp(min=1e-12)
    # clamp, defensive: amax * scale may land an ulp past fmax (e5m2 casts overflow to inf)
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def fp8_mm(a8: Tensor, b8: Tensor, scale_a: Tensor, scale_b: Tensor,
           out_dtype: torch.dtype) -> Tensor:
    """a8 @ b8 * scale_a * scale_b, with fp32 sums: FP8 tensor cores on a GPU. A CPU has none
    (torch's CPU _scaled_mm, a slow reference, took 83 s where a float32 matmul took 0.03): the
    same exact products and fp32 sums there, as a float32 matmul of the FP8 values, under the
    GPU's rules, so that tests on a CPU catch what a GPU would reject."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a, scale_b, out_dtype=out_dtype)
    if a8.stride(1) != 1 or b8.stride(0) != 1 or a8.shape[1] % 16 or b8.shape[1] % 16:
        raise RuntimeError(f"_scaled_mm needs a row-major (M, K) and a column-major (K, N), K and "
                           f"N multiples of 16: got {tuple(a8.shape)} {a8.stride()} and "
                           f"{tuple(b8.shape)} {b8.stride()}")
    with torch.autocast(a8.device.type, enabled=False):  # not a second rounding, nor fp16's range
        return ((a8.float() @ b8.float()) * (scale_a * scale_b)).to(out_dtype)


class FP8Linear(torch.autograd.Function):
    """x (M, K) @ w (N, K).T in FP8 -> (M, N) in out_dtype. _scaled_mm wants its first operand
    row-major and its second column-major: w8.t() is w8 read as (K, N) column-major, free."""
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, out_dtype: torch.dtype) -> Tensor:
        x8, sx = to_fp8(x, torch.float8_e4m3fn)
        w8, sw = to_fp8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(x8, sx, w8, sw)  # kept in FP8: half the bytes of bf16
        ctx.dtypes = x.dtype, w.dtype
        return fp8_mm(x8, w8.t(), sx, sw, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x8, sx, w8, sw = ctx.saved_tensors
        g8, sg = to_fp8(grad.contiguous(), torch.float8_e5m2)
        column_major = lambda t: t.t().contiguous().t()  # noqa: E731 (same shape, other layout)
        dx = (fp8_mm(g8, column_major(w8), sg, sw, ctx.dtypes[0])  # g w
              if ctx.needs_input_grad[0] else None)
        dw = (fp8_mm(g8.t().contiguous(), column_major(x8), sg, sx, ctx.dtypes[1])  # g^T x
              if ctx.needs_input_grad[1] else None)
        return dx, dw, None


def fp8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., K) @ weight (N, K).T with FP8 operands; the output in autocast's dtype (else x's)."""
    if x.shape[-1] % 16 or weight.shape[0] % 16 or weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"FP8 matmuls need matching inner sizes, both sizes multiples of 16: "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        raise ValueError(f"fp8=True needs FP8 tensor cores (compute capability 8.9+: Ada, "
                         f"Hopper), not {torch.cuda.get_device_name(x.device)}")
    rows = x.reshape(-1, x.shape[-1])
    if not len(rows):  # no rows: no amax to scale by
        return x @ weight.T
    pad = -len(rows) % 16  # the rows are the weight gradient's inner size: a multiple of 16 too
    rows = F.pad(rows, (0, 0, 0, pad)) if pad else rows.contiguous()  # zero rows add nothing
    y = FP8Linear.apply(rows, weight.contiguous(), autocast_dtype(x.device.type, x.dtype))
    return y[:len(y) - pad].view(*x.shape[:-1], len(weight))


# Measured: our kernels next to eager and compiled PyTorch, and the copy they should match ---------
def kernel_ms(fn: Callable[[], object], n: int = 10) -> float:
    """GPU ms of one call: its kernels' time in the profiler, without the host's launch gaps (a
    small op's Python and dispatch can take longer than its kernels)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / n / 1e3


def bench_fused(device: torch.device | str | None = None, rows: int = 16384) -> dict:
    """`python kernels.py fused`: each fused kernel, forward and forward + backward, against
    eager and compiled PyTorch in bf16, as GB/s and a share of the copy bandwidth measured in the
    same run; linear + cross-entropy as time and peak memory against logits + F.cross_entropy."""
    device = resolve_device(device or "auto")
    if device.type != "cuda":
        print("fused: timing our kernels needs a CUDA GPU (on a CPU they run in an interpreter)")
        return {}
    x, dy = (torch.randn(rows, 4096, device=device, dtype=torch.bfloat16) for _ in range(2))
    weight, out = torch.ones(4096, device=device), torch.empty_like(x)
    copy = 2 * x.numel() * 2 / triton.testing.do_bench(lambda: out.copy_(x)) / 1e6  # GB/s
    print(f"copy of a {rows}x4096 bf16 tensor: {copy:,.0f} GB/s")

    def norm(x: Tensor, w: Tensor) -> Tensor:  # model.py's RMSNorm, the weight an argument
        return RMSNorm.forward(SimpleNamespace(weight=w, eps=1e-5), x)
    cases = [("rmsnorm", rmsnorm_triton, norm, (x, weight), 2, 5),
             ("add+rmsnorm", fused_add_rmsnorm, lambda x, r, w: (norm(x + r, w), x + r),
              (x, dy, weight), 4, 8),
             ("swiglu gate", swiglu_gate, lambda ab: silu(ab[:, :4096]) * ab[:, 4096:],
              (torch.cat([x, dy], dim=1),), 3, 8)]
    cos, sin = RotaryEmbedding(10000.0, 128, 1024).to(device).cos_sin(None, 1024)

    def rope(qkv: Tensor) -> tuple[Tensor, ...]:  # model.py's steps, 16 + 2 x 8 heads of 128
        q, k, v = qkv.split([2048, 1024, 1024], -1)
        q, k, v = (t.unflatten(-1, (-1, 128)).transpose(1, 2) for t in (q, k, v))  # split heads
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
    cases.append(("rope q|k|v", lambda qkv: rope_qkv(qkv, cos, sin, 16, 8), rope,
                  (x.view(-1, 1024, 4096),), 2, 4))
    result = {"copy_gb_s": copy}
    print("  GPU time: the profiler's sum of the kernels; with host: do_bench's, Python and "
          "launches included")
    for name, ours, eager, inputs, fwd_bytes, step_bytes in cases:  # bytes in units of x
        for impl, fn in (("ours", ours), ("eager", eager), ("compiled", torch.compile(eager))):
            leaves = [t.detach().requires_grad_() for t in inputs]
            outs = fn(*leaves)
            grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
            for mode, run, units in (("fwd", lambda: fn(*inputs), fwd_bytes), ("fwd+bwd", lambda:
                                      torch.autograd.grad(fn(*leaves), leaves, grads), step_bytes)):
                ms, host_ms = kernel_ms(run), triton.testing.do_bench(run)
                rate = units * x.numel() * 2 / ms / 1e6
                result[f"{name} {mode} {impl}"] = ms
                print(f"  {name:12} {mode:8} {impl:9} {ms * 1e3:8.1f} us {rate:8,.0f} GB/s "
                      f"= {rate / copy:4.0%} of copy; with host {host_ms * 1e3:8.1f} us")
    N, D, V = 16 * 1024, 768, 50304  # GPT-2 small's head over a 16 x 1,024 batch
    h = torch.randn(N, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (0.05 * torch.randn(V, D, device=device, dtype=torch.bfloat16)).requires_grad_()
    t = torch.randint(V, (N,), device=device)
    for impl, loss in (("ours", lambda: fused_linear_cross_entropy(h, w, t)),
                       ("logits + F.cross_entropy", lambda: F.cross_entropy((h @ w.T).float(), t))):
        ms = triton.testing.do_bench(lambda: loss().backward(), grad_to_none=[h, w])
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss().backward()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        result[f"linear+CE {impl}"] = (ms, peak)
        print(f"  linear + cross-entropy {N}x{D}x{V}, fwd+bwd, {impl}: {ms:.2f} ms, "
              f"{6 * N * D * V / ms / 1e9:.0f} TFLOP/s, peak {peak:.2f} GiB over the inputs")
    return result


# FlashAttention-2: a tiled PyTorch version, then the Triton kernels -------------------------------
# Attention without the (T, S) score matrix (Dao 2023): query tiles stay put while key tiles stream
# past, an online softmax (running max m, running sum l) rescales the partial output, and only O
# and one log-sum-exp L per query are kept; the backward recomputes P tile by tile from L.
def _causal_fill(s: torch.Tensor, i: int, j: int, offset: int) -> torch.Tensor:
    """Scores s of the tile at query i, key j with -inf where a key comes after the query
    (query i + a sits at key position offset + i + a)."""
    q_pos = torch.arange(i, i + s.shape[-2], device=s.device)[:, None] + offset
    return s.masked_fill(torch.arange(j, j + s.shape[-1], device=s.device) > q_pos, -math.inf)


class FlashAttentionPytorch(torch.autograd.Function):
    """FlashAttention-2 in PyTorch, the algorithm to read: q (..., T, d), k, v (..., S, d); causal
    queries are the last T of the S positions, and key tiles past the diagonal are skipped.
    Saves q, k, v, O and L (..., T), float32 (float64 inputs keep float64, for gradcheck)."""
    TILES = (16, 16)  # B_q, B_k: tiny, so that the tests cross many tile edges

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
        (T, d), S, Bq, Bk = q.shape[-2:], k.shape[-2], *FlashAttentionPytorch.TILES
        if is_causal and T > S:
            raise ValueError(f"causal attention needs n_queries <= n_keys, got {T} > {S}")
        acc = torch.promote_types(q.dtype, torch.float32)
        O, L = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=acc)  # L: (..., T)
        for i in range(0, T, Bq):
            q_i = q[..., i:i + Bq, :].to(acc) / math.sqrt(d)  # (..., Bq, d)
            m = torch.full(q_i.shape[:-1], -math.inf, device=q.device, dtype=acc)  # row max
            l = torch.zeros_like(m)  # running sum of exp(s - m)
            o = torch.zeros_like(q_i)  # running unnormalised output
            for j in range(0, min(S, S - T + i + Bq) if is_causal else S, Bk):
                s = q_i @ k[..., j:j + Bk, :].to(acc).transpose(-2, -1)  # (..., Bq, Bk)
                s = _causal_fill(s, i, j, S - T) if is_causal else s
                m_new = torch.maximum(m, s.amax(-1))
                p, rescale = torch.exp(s - m_new[..., None]), torch.exp(m - m_new)
                l = rescale * l + p.sum(-1)  # earlier tiles were summed relative to the old m
                o = rescale[..., None] * o + p @ v[..., j:j + Bk, :].to(acc)
                m = m_new
            O[..., i:i + Bq, :], L[..., i:i + Bq] = o / l[..., None], m + torch.log(l)
        ctx.save_for_backward(q, k, v, O, L)
        ctx.is_causal = is_causal
        return O

    @staticmethod
    def backward(ctx, dO: torch.Tensor) -> tuple:
        q, k, v, O, L = ctx.saved_tensors
        (T, d), S, Bq, Bk = q.shape[-2:], k.shape[-2], *FlashAttentionPytorch.TILES
        acc, scale = L.dtype, 1 / math.sqrt(d)
        D = (dO.to(acc) * O.to(acc)).sum(-1)  # (..., T): rowsum(dO * O) = rowsum(P * dP)
        dq, dk, dv = (torch.zeros_like(x, dtype=acc) for x in (q, k, v))
        for j in range(0, S, Bk):  # key tiles outside, as in the Triton dK/dV kernel
            k_j, v_j = k[..., j:j + Bk, :].to(acc), v[..., j:j + Bk, :].to(acc)
            for i in range(max(0, j - (S - T)) // Bq * Bq if ctx.is_causal else 0, T, Bq):
                q_i, dO_i = q[..., i:i + Bq, :].to(acc), dO[..., i:i + Bq, :].to(acc)
                s = q_i @ k_j.transpose(-2, -1) * scale  # (..., Bq, Bk)
                s = _causal_fill(s, i, j, S - T) if ctx.is_causal else s
                P = torch.exp(s - L[..., i:i + Bq, None])  # the forward's probabilities
                dv[..., j:j + Bk, :] += P.transpose(-2, -1) @ dO_i
                dS = P * (dO_i @ v_j.transpose(-2, -1) - D[..., i:i + Bq, None])
                dq[..., i:i + Bq, :] += dS @ k_j * scale
                dk[..., j:j + Bk, :] += dS.transpose(-2, -1) @ q_i * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# The Triton kernels. Tiles (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages) are
# autotuned per padded head dim: at d = 128 the fp32 accumulators need 8 warps' registers.
FWD_TILES = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
             128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
             "ieee": [(32, 32, 8, 2)]}
DKDV_TILES = {64: [(32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3)],
              128: [(32, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 2)],
              "ieee": [(32, 32, 8, 2)]}
DQ_TILES = {64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2)],
            "ieee": [(32, 32, 8, 2)]}  # exact fp32 dots run on FMA units: small tiles
LOG2E = 1.4426950408889634


def _autotune(tiles: dict[int, list[tuple[int, int, int, int]]], interpreted: tuple[int, int]):
    """triton.autotune over the tiles of the padded head dim, keyed on head dim, causal and the
    length bucket (the autotuner adds dtypes). The interpreter gets one small, unequal tile."""
    key = ["SEQ_BUCKET", "HEAD_DIM", "IS_CAUSAL"]
    if INTERPRET:
        return triton.autotune([triton.Config(dict(BLOCK_M=interpreted[0],
                                                   BLOCK_N=interpreted[1]))], key=key)
    by_dim = {d: [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
                  for m, n, w, s in dim_tiles] for d, dim_tiles in tiles.items()}

    def for_head_dim(configs: list, named_args: dict, **kwargs) -> list:
        if kwargs["PRECISION"] == "ieee":
            return by_dim["ieee"]
        return by_dim[min(d for d in by_dim if d != "ieee" and d >= kwargs["D_PAD"])]
    return triton.autotune(sum(by_dim.values(), []), key=key,
                           prune_configs_by={"early_config_prune": for_head_dim})


@triton.jit
def _key_range(start_m, T, S, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """For a query tile: keys [0, full) are seen whole by every query (no mask), keys [full, end)
    need the causal or ragged-edge mask, keys from `end` on are skipped."""
    if IS_CAUSAL:  # the queries are the last T of the S positions
        return (start_m + S - T + 1) // BLOCK_N * BLOCK_N, tl.minimum(start_m + BLOCK_M + S - T, S)
    else:
        return S // BLOCK_N * BLOCK_N, S


@triton.jit
def _fwd_tiles(o, m, l, q, K, V, skt, svt, q_pos, offs_n, offs_d, d_ok, lo, hi, S, qk_scale,
               IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Online softmax of a query tile over key tiles lo..hi in log2 units (exp2 is the fast
    instruction: log2(e)/sqrt(d) is folded into qk_scale). Only MASKED tiles mask scores."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        kT = tl.load(K + offs_d[:, None] + cols[None, :] * skt,
                     mask=d_ok[:, None] & (cols[None, :] < S), other=0.0)  # (D, BLOCK_N)
        s = tl.dot(q, kT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            keep = (cols[None, :] <= q_pos[:, None]) | (not IS_CAUSAL)
            s = tl.where(keep & (cols[None, :] < S), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m - m_new)  # rescales what the earlier tiles accumulated
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one fused multiply-add per score
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * svt + offs_d[None, :],
                    mask=(cols[:, None] < S) & d_ok[None, :], other=0.0)
        o = tl.dot(p.to(v.dtype), v, o * alpha[:, None], input_precision=PRECISION)  # o += P V
        m = m_new
    return o, m, l


@_autotune(FWD_TILES, (32, 16))
@triton.jit(do_not_specialize=["T", "S"])
def _flash_fwd_kernel(Q, K, V, O, L, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                      H, GROUP, T, S, qk_scale, SEQ_BUCKET, HEAD_DIM: tl.constexpr,
                      D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch x head, query tile), the longest causal tiles launched first.
    Each of q, k, v, O has its own strides (batch, head, row); the last dim is contiguous."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # a Python float, fp64 when compile launches it
    bh, start_m = tl.program_id(0), (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    kv_h = h // GROUP  # GQA: query head h reads key-value head h // GROUP
    K, V = K + b * skb + kv_h * skh, V + b * svb + kv_h * svh
    offs_m, offs_n, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), \
        tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM  # head dims such as 96 are padded to a power of two
    q_ok = (offs_m[:, None] < T) & d_ok[None, :]
    q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=q_ok, other=0.0)  # (BLOCK_M, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l, o = tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, D_PAD], tl.float32)
    full, end = _key_range(start_m, T, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    o, m, l = _fwd_tiles(o, m, l, q, K, V, skt, svt, offs_m + S - T, offs_n, offs_d, d_ok, 0,
                         full, S, qk_scale, IS_CAUSAL, False, PRECISION, BLOCK_N)
    o, m, l = _fwd_tiles(o, m, l, q, K, V, skt, svt, offs_m + S - T, offs_n, offs_d, d_ok, full,
                         end, S, qk_scale, IS_CAUSAL, True, PRECISION, BLOCK_N)
    o_ptrs = b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    tl.store(O + o_ptrs, (o / l[:, None]).to(O.dtype.element_ty), mask=q_ok)
    # L in natural-log units, as in the PyTorch version: ln(sum exp) = (m + log2 l) * ln 2
    tl.store(L + bh.to(tl.int64) * T + offs_m, (m + tl.log2(l)) * 0.6931471805599453,
             mask=offs_m < T)


@triton.jit
def _bwd_preprocess_kernel(O, dO, Delta, sob, soh, sot, H, T, HEAD_DIM: tl.constexpr,
                           D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(dO * O), the backward's D, one float32 per query (O, dO: strides so*)."""
    bh, rows = tl.program_id(0), tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ptrs = (bh // H).to(tl.int64) * sob + (bh % H).to(tl.int64) * soh + rows[:, None] * sot
    ok = (rows[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + ptrs + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dO + ptrs + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, dO, L, Delta, sqt, sot, k_pos, offs_m, offs_d, d_ok, lo, hi, T, S,
                qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """A key tile's dK, dV over query tiles lo..hi, computed transposed (keys as rows) so that
    P^T, dP^T and dS^T come out as the products need them. Query rows past T load zeros for
    q, dO, L and Delta and so add exactly zero; MASKED tiles apply the causal mask."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m  # (BLOCK_M,) query indices
        qT = tl.load(Q + offs_d[:, None] + rows[None, :] * sqt,
                     mask=d_ok[:, None] & (rows[None, :] < T), other=0.0)  # (D, BLOCK_M)
        do = tl.load(dO + rows[:, None] * sot + offs_d[None, :],
                     mask=(rows[:, None] < T) & d_ok[None, :], other=0.0)  # (BLOCK_M, D)
        lse = tl.load(L + rows, mask=rows < T, other=0.0) * 1.4426950408889634  # log2 units
        delta = tl.load(Delta + rows, mask=rows < T, other=0.0)
        pT = tl.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(k_pos[:, None] <= (rows + S - T)[None, :], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)  # dv += P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)  # += dS^T Q
    return dk, dv


@_autotune(DKDV_TILES, (16, 32))
@triton.jit(do_not_specialize=["T", "S"])
def _flash_bwd_dkdv_kernel(Q, K, V, dO, L, Delta, dK, dV, sqb, sqh, sqt, skb, skh, skt, svb, svh,
                           svt, sob, soh, sot, H, GROUP, T, S, qk_scale, sm_scale, SEQ_BUCKET,
                           HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """One program per (batch x key-value head, key tile), over the query heads of its GQA group
    and their query tiles from the diagonal on: dK, dV summed in registers, no atomics. dK is
    laid out as k, dV as v."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    bh_kv, start_n = tl.program_id(0), tl.program_id(1) * BLOCK_N
    b, kv_h = (bh_kv // (H // GROUP)).to(tl.int64), (bh_kv % (H // GROUP)).to(tl.int64)
    k_pos, offs_m, offs_d = start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M), \
        tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    k_ok = (k_pos[:, None] < S) & d_ok[None, :]
    k_ptrs = b * skb + kv_h * skh + k_pos[:, None] * skt + offs_d[None, :]
    v_ptrs = b * svb + kv_h * svh + k_pos[:, None] * svt + offs_d[None, :]
    k = tl.load(K + k_ptrs, mask=k_ok, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + v_ptrs, mask=k_ok, other=0.0)
    dk, dv = tl.zeros([BLOCK_N, D_PAD], tl.float32), tl.zeros([BLOCK_N, D_PAD], tl.float32)
    lo, full = T * 0, T * 0  # not causal: every query sees every key
    if IS_CAUSAL:  # queries before lo see none of these keys; from `full` on, all of them
        lo = tl.maximum(start_n - (S - T), 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (S - T), 0), BLOCK_M)
                          * BLOCK_M, T)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        Qh, dOh, lse_off = Q + b * sqb + h * sqh, dO + b * sob + h * soh, (b * H + h) * T
        if IS_CAUSAL:
            dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, dOh, L + lse_off, Delta + lse_off, sqt, sot,
                                 k_pos, offs_m, offs_d, d_ok, lo, full, T, S, qk_scale, True,
                                 PRECISION, BLOCK_M)  # the diagonal
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, dOh, L + lse_off, Delta + lse_off, sqt, sot, k_pos,
                             offs_m, offs_d, d_ok, full, T, T, S, qk_scale, False, PRECISION,
                             BLOCK_M)  # below it: no mask
    tl.store(dK + k_ptrs, (dk * sm_scale).to(dK.dtype.element_ty), mask=k_ok)
    tl.store(dV + v_ptrs, dv.to(dV.dtype.element_ty), mask=k_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, skt, svt, q_pos, offs_n, offs_d, d_ok, lo, hi, S,
              qk_scale, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """A query tile's dQ over key tiles lo..hi: dS = P * (dO V^T - Delta), dQ += dS K."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        ok = d_ok[:, None] & (cols[None, :] < S)  # (D, BLOCK_N)
        kT = tl.load(K + offs_d[:, None] + cols[None, :] * skt, mask=ok, other=0.0)
        vT = tl.load(V + offs_d[:, None] + cols[None, :] * svt, mask=ok, other=0.0)
        p = tl.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            keep = (cols[None, :] <= q_pos[:, None]) | (not IS_CAUSAL)
            p = tl.where(keep & (cols[None, :] < S), p, 0.0)
        ds = p * (tl.dot(do, vT, input_precision=PRECISION) - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)  # dq += dS K
    return dq


@_autotune(DQ_TILES, (32, 16))
@triton.jit(do_not_specialize=["T", "S"])
def _flash_bwd_dq_kernel(Q, K, V, dO, L, Delta, dQ, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                         sob, soh, sot, H, GROUP, T, S, qk_scale, sm_scale, SEQ_BUCKET,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch x head, query tile), over the key ranges of the forward."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    bh, start_m = tl.program_id(0), (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    K, V = K + b * skb + (h // GROUP) * skh, V + b * svb + (h // GROUP) * svh
    offs_m, offs_n, offs_d = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), \
        tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_ok = (offs_m[:, None] < T) & d_ok[None, :]
    q_ptrs = b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=q_ok, other=0.0)
    do = tl.load(dO + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=q_ok,
                 other=0.0)
    lse = tl.load(L + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    lse = lse * 1.4426950408889634  # log2 units
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    full, end = _key_range(start_m, T, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, svt, offs_m + S - T, offs_n, offs_d, d_ok,
                   0, full, S, qk_scale, IS_CAUSAL, False, PRECISION, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, svt, offs_m + S - T, offs_n, offs_d, d_ok,
                   full, end, S, qk_scale, IS_CAUSAL, True, PRECISION, BLOCK_N)
    tl.store(dQ + q_ptrs, (dq * sm_scale).to(dQ.dtype.element_ty), mask=q_ok)


def _layout(x: Tensor) -> tuple[int, ...]:
    """The strides the kernels read x with: those torch.empty_like gives it (a transposed view
    keeps its own, and the gradients, made by empty_like, share them), unless its last dim would
    not be contiguous (x.mT): then x's contiguous strides."""
    strides = torch.empty_like(x, device="meta").stride()
    return strides if strides[-1] == 1 else torch.empty(x.shape, device="meta").stride()


def _readable(x: Tensor, strides: tuple[int, ...]) -> Tensor:
    """x itself if it has these strides (size-1 dims do not count), else a copy that has them."""
    same = all(a == b for a, b, n in zip(x.stride(), strides, x.shape) if n > 1)
    return x if same else x.new_empty_strided(x.shape, strides).copy_(x)


def _attention_output(q: Tensor) -> Tensor:
    """O (B, H, T, d) laid out as (B, T, H, d): merging the heads after attention is then a view,
    not a copy, and O's gradient arrives in the same layout."""
    B, H, T, d = q.shape
    return q.new_empty(B, T, H, d).transpose(1, 2)


def _kernel_args(q: Tensor, k: Tensor, v: Tensor, O: Tensor,
                 is_causal: bool) -> tuple[tuple, dict]:
    """Strides, sizes and scale every kernel takes, and its constants: head dim padded to a power
    of two; fp32 dots in true fp32 unless torch allows TF32 (set_float32_matmul_precision)."""
    (H, T, d), (H_kv, S) = q.shape[1:], k.shape[1:3]
    d = int(d)  # the kernels' constants: traced with symbolic sizes (compile), specialised here
    exact = q.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    args = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *O.stride()[:3], H, H // H_kv,
            T, S, LOG2E / math.sqrt(d))
    return args, dict(SEQ_BUCKET=min(triton.next_power_of_2(int(max(T, S))), 4096), HEAD_DIM=d,
                      D_PAD=max(16, triton.next_power_of_2(d)), IS_CAUSAL=bool(is_causal),
                      PRECISION="ieee" if exact else "tf32")


# The custom operators (why: above the fused RMSNorm). The kernels take strides for each of q, k,
# v and O (dQ, dK, dV and dO share them), so model.py's head-split views pass without a copy;
# the fakes allocate the outputs as the ops do.
@_op("cs336::flash_attention_fwd")
def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    """(O, L (B, H, T) float32: the log-sum-exp of each query's scores)."""
    q, k, v = (_readable(x, _layout(x)) for x in (q, k, v))
    (B, H, T), O = q.shape[:3], _attention_output(q)
    args, meta = _kernel_args(q, k, v, O, is_causal)
    L = q.new_empty((B, H, T), dtype=torch.float32)
    wrap_triton(_flash_fwd_kernel)[lambda c: (B * H, triton.cdiv(T, c["BLOCK_M"]))](
        q, k, v, O, L, *args, **meta)
    return O, L


@_op("cs336::flash_attention_bwd")
def _flash_bwd(dO: Tensor, q: Tensor, k: Tensor, v: Tensor, O: Tensor, L: Tensor,
               is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = (_readable(x, _layout(x)) for x in (q, k, v))
    dO = _readable(dO, O.stride())  # O is the forward's: its layout is the kernels' own
    (B, H, T, d), (H_kv, S) = q.shape, k.shape[1:3]
    args, meta = _kernel_args(q, k, v, O, is_causal)
    Delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    wrap_triton(_bwd_preprocess_kernel)[(B * H, triton.cdiv(T, 64))](
        O, dO, Delta, *O.stride()[:3], H, T, HEAD_DIM=d, D_PAD=meta["D_PAD"], BLOCK_M=64)
    wrap_triton(_flash_bwd_dkdv_kernel)[lambda c: (B * H_kv, triton.cdiv(S, c["BLOCK_N"]))](
        q, k, v, dO, L, Delta, dk, dv, *args, 1 / math.sqrt(d), **meta)
    wrap_triton(_flash_bwd_dq_kernel)[lambda c: (B * H, triton.cdiv(T, c["BLOCK_M"]))](
        q, k, v, dO, L, Delta, dq, *args, 1 / math.sqrt(d), **meta)
    return dq, dk, dv


def _flash_setup(ctx, inputs: tuple, output: tuple) -> None:
    *qkv, ctx.is_causal = inputs
    ctx.save_for_backward(*qkv, *output)  # q, k, v, O, L
    ctx.mark_non_differentiable(output[1])


def _flash_backward(ctx, dO: Tensor, _) -> tuple:
    return *_flash_bwd(dO, *ctx.saved_tensors, ctx.is_causal), None


_flash_fwd.register_fake(lambda q, k, v, is_causal: (
    _attention_output(q), q.new_empty(q.shape[:3], dtype=torch.float32)))
_flash_bwd.register_fake(lambda dO, q, k, v, O, L, is_causal: tuple(
    x.new_empty_strided(x.shape, _layout(x)) for x in (q, k, v)))
_flash_fwd.register_autograd(_flash_backward, setup_context=_flash_setup)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = True) -> Tensor:
    """softmax(q k^T / sqrt(d)) v by our Triton FlashAttention-2; q (..., H, T, d), k and v
    (..., H_kv, S, d), H % H_kv == 0 (GQA without copies); any T, S; d 16..128; float32, bfloat16
    or float16. Causal queries are the last T of the S positions. Bad input: ValueError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() < 3:
            raise ValueError(f"{name} must be a tensor (..., heads, seq, d), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    if not q.device == k.device == v.device:  # first: it says more than "need CUDA tensors"
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    check_input("flash_attention", q, k, v)
    (H, T, d), (H_kv, S) = q.shape[-3:], k.shape[-3:-1]
    for problem, message in [
        (not q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                                            f"{v.dtype}"),
        (k.shape != v.shape or q.shape[:-3] != k.shape[:-3] or d != k.shape[-1],
         f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
         f"q (..., H, T, d) with k, v (..., H_kv, S, d)"),
        (H_kv == 0 or H % H_kv, f"{H} query heads is not a multiple of {H_kv} key-value heads"),
        (not 16 <= d <= 128, f"head dim {d} is not supported: flash_attention needs 16..128"),
        (T == 0 or S == 0, f"empty sequence: {T} queries, {S} keys"),
        (is_causal and T > S, f"causal attention needs n_queries <= n_keys (the queries are the "
                              f"last of the key positions), got {T} > {S}")]:
        if problem:
            raise ValueError(message)
    O, _ = _flash_fwd(*(x.reshape(-1, *x.shape[-3:]) for x in (q, k, v)), is_causal)
    return O if q.dim() == 4 else O.reshape(q.shape)


# The attention benchmark: ours against the hand-written, compiled and torch's fused kernels -------
ATTENTION_IMPLS = ("manual", "compiled", "triton", "sdpa-flash", "sdpa-cudnn")
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # the backward: 2.5x the forward matmuls


@dataclasses.dataclass
class AttentionConfig:
    quick: bool = True  # the README's cases (~1.5 minutes on an H200); False: the grid below
    impls: str = ",".join(ATTENTION_IMPLS)
    head_dims: str = "16,32,64,128"
    seq_lens: str = "128,1024,4096,16384,65536"
    dtypes: str = "bfloat16,float32"  # or float16
    modes: str = ",".join(MODE_FLOPS)
    batch: int = 1
    heads: int = 16
    causal: bool = True


def _attention_impl(name: str, causal: bool, T: int, device: torch.device) -> Callable:
    """fn(q, k, v) -> output for one implementation of the benchmark."""
    if name == "triton":
        return lambda q, k, v: flash_attention(q, k, v, causal)
    if name.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
                   "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]

        def fused(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fused
    mask, attend = attention_mask(T, T, 0, None, device) if causal else None, \
        scaled_dot_product_attention
    if name == "compiled":
        torch._dynamo.reset()  # a fresh graph per case: no recompile limit, no stale shapes
        attend = torch.compile(attend, dynamic=False)
    return lambda q, k, v: attend(q, k, v, mask)


def _measure(fn: Callable, mode: str, shape: tuple, dtype: torch.dtype,
             device: torch.device) -> tuple[float, float | None, float | None]:
    """(ms, peak GB, GPU ms) of one mode; "bwd" replays the backward of one kept graph. ms is a
    call's time as the caller sees it (do_bench), GPU ms its kernels' time alone (kernel_ms): at
    short lengths the first is mostly the host's Python and launches."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout, out = torch.randn_like(q), fn(q, k, v) if mode == "bwd" else None
    step = {"fwd": lambda: fn(q, k, v), "bwd": lambda: out.backward(dout, retain_graph=True),
            "fwd+bwd": lambda: fn(q, k, v).backward(dout)}[mode]
    step()  # compile and autotune first (the autotuner's buffers would spoil the peak)
    if device.type != "cuda":
        return timeit.timeit(step, number=1) * 1e3, None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() / 1e9

    def fresh() -> None:  # gradients written, not added to: as do_bench's grad_to_none
        step()
        q.grad = k.grad = v.grad = None
    return triton.testing.do_bench(step, grad_to_none=[q, k, v]), peak, kernel_ms(fresh, 5)


def bench_attention(cfg: AttentionConfig) -> list[dict]:
    """Rows of ms, TFLOP/s (causal: half the matrix), peak GB and GPU ms of attention on (batch,
    heads, T, d) per implementation, head dim, length, dtype and mode; "OOM": out of memory, "n/a":
    no kernel; vs flash / vs cudnn = their time / ours. quick: ours vs SDPA at head dims 64 and
    128, 4K-16K tokens (16 heads x 16384 x 64: the course's leaderboard shape), and where the naive
    one OOMs."""
    impls, dtypes, modes, head_dims, seq_lens = (  # allowed None: positive integers
        comma_list(key, getattr(cfg, key), allowed) for key, allowed in (
            ("impls", ATTENTION_IMPLS), ("dtypes", ("bfloat16", "float16", "float32")),
            ("modes", MODE_FLOPS), ("head_dims", None), ("seq_lens", None)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, heads = cfg.batch, cfg.heads
    cases = [(*case, impls) for case in itertools.product(dtypes, head_dims, seq_lens, modes)]
    if device.type == "cpu":
        print("no CUDA GPU: Triton's interpreter runs tiny cases only; the times mean nothing")
        batch, heads = 1, min(heads, 2)
        cases = [("float32", min(*head_dims, 32), 64, mode,
                  [i for i in impls if i in ("manual", "triton")]) for mode in modes]
    elif cfg.quick:
        cases = [("bfloat16", d, T, mode, ("triton", "sdpa-flash", "sdpa-cudnn"))
                 for d in (64, 128) for T in (4096, 8192, 16384) for mode in MODE_FLOPS]
        cases += [("bfloat16", 64, T, "fwd+bwd", ("manual", "triton") if T > 16384 else
                   ("manual",)) for T in (16384, 32768, 65536)]
        cases += [("bfloat16", 64, 4096, "fwd+bwd", ("manual", "compiled"))]  # slow to start
    print(f"attention, batch {batch} x {heads} heads, {'causal' if cfg.causal else 'not causal'}"
          f"\n{'impl':>11} {'dtype':>8} {'hd':>4} {'seq':>6} {'mode':>8} {'ms':>9} "
          f"{'TFLOP/s':>8} {'peak GB':>8} {'vs flash':>8} {'vs cudnn':>8} {'GPU ms':>8}")
    rows = []
    for dtype, d, T, mode, case_impls in cases:
        flops = 4 * batch * heads * T * T * d * (0.5 if cfg.causal else 1) * MODE_FLOPS[mode]
        case = [dict(impl=impl, dtype=dtype, head_dim=d, seq_len=T, mode=mode, status="ok",
                     ms=None, tflops=None, peak_gb=None, gpu_ms=None) for impl in case_impls]
        for row in case:
            if row["impl"].startswith("sdpa") and dtype == "float32":
                row["status"] = "n/a"  # FlashAttention and cuDNN kernels exist for half types
                continue
            try:
                fn = _attention_impl(row["impl"], cfg.causal, T, device)
                row["ms"], row["peak_gb"], row["gpu_ms"] = _measure(
                    fn, mode, (batch, heads, T, d), getattr(torch, dtype), device)
                row["tflops"] = flops / row["ms"] / 1e9
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except RuntimeError as error:  # e.g. a backend without a kernel for this shape
                row["status"] = "n/a"
                print(f"{row['impl']}: {str(error).splitlines()[0][:150]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        theirs = {r["impl"]: r["ms"] for r in case if r["ms"]}
        for row in case:
            for name, key in (("sdpa-flash", "vs_flash"), ("sdpa-cudnn", "vs_cudnn")):
                if row["impl"] == "triton" and row["ms"] and name in theirs:
                    row[key] = theirs[name] / row["ms"]
            ms = f"{row['ms']:9.3f}" if row["ms"] else f"{row['status']:>9}"
            rest = " ".join(f"{row[key]:8.{digits}f}" if row.get(key) is not None else " " * 8
                            for key, digits in (("tflops", 1), ("peak_gb", 2), ("vs_flash", 2),
                                                ("vs_cudnn", 2), ("gpu_ms", 3)))
            print(f"{row['impl']:>11} {dtype:>8} {d:>4} {T:>6} {mode:>8} {ms} {rest}".rstrip())
        rows += case
    return rows


# Decoding at batch 1 as one persistent kernel (infer.py's fused step) -----------------------------
# A batch-1 decode step reads every weight once for 2 FLOPs each: it is pure bandwidth, and its
# enemy is latency. Compiled, it is ~400 kernels, each ramping up, draining and waiting for its
# inputs (infer.py bench --profile). Here one program per SM walks all the layers, streaming its
# share of the weights as a sequence of equal (R, d_model) tiles. The tiles come through a tensor
# descriptor: on a Hopper GPU its tensor memory accelerator (TMA) copies them into a ring of
# shared-memory buffers that Triton's software pipeliner keeps STAGES - 1 tiles ahead. Those copies
# are asynchronous: they go on while the program waits at a barrier, and the loads it issues
# itself (the residual after a barrier, the KV cache) do not queue behind them. Three grid
# barriers a layer (a counter each program increments, then polls) order the phases that need
# each other's outputs: q|k|v; attention and its output projection; the FFN. The projection after
# attention and the FFN's second matrix are split over their *inputs*: a program multiplies the
# attention output of its own rows (computing that head's attention itself) or the hidden units
# it has just computed, and adds its partial residual atomically. The residual x has a buffer per
# phase, zeroed before the step. The interpreter runs programs one after another, where a barrier
# would wait forever: there (SYNC=False) the host launches the kernel once per phase.
@triton.jit
def _grid_barrier(BAR, target):
    """Add this program's arrival to the counter at BAR and wait until it reaches target. As
    CUDA's grid sync does it: the program's threads meet (their stores issued), thread 0 adds with
    release semantics (which carry the stores of the threads it met) and polls with acquire, then
    the threads meet again, so that all of them load after what the others stored. Inline PTX:
    Triton's own barrier (tl.debug_barrier) inside the loop would turn its pipeliner off."""
    tl.inline_asm_elementwise(
        """{ .reg .pred p; .reg .u32 tid, seen;
        bar.sync 0;
        mov.u32 tid, %tid.x;
        setp.ne.u32 p, tid, 0;
        @p bra DONE;
        red.release.gpu.global.add.u32 [$1], 1;
        POLL: ld.acquire.gpu.global.u32 seen, [$1];
        setp.lt.u32 p, seen, $2;
        @p bra POLL;
        DONE: bar.sync 0;
        mov.u32 $0, 0; }""", "=r,l,r", [BAR, target], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _total(v):
    return tl.sum(tl.sum(v, 1), 0)


@triton.jit
def _vec(VEC, layer, which, L, D, cols):
    """Vector `which` of a layer's six: ln1 weight, bias; ln2 weight, bias; the two output biases
    (zeros past the last layer)."""
    return tl.load(VEC + (layer * 6 + which) * D + cols, mask=cols < D * (layer < L), other=0.0)


@triton.jit
def _norm(x, w, b, D, eps, cols, NORM: tl.constexpr):
    """x through a norm with weight w and bias b: 1 LayerNorm, 2 RMSNorm, 0 none."""
    if NORM == 1:
        xc = tl.where(cols < D, x - _total(x) / D, 0.0)
        y = xc * tl.rsqrt(_total(xc * xc) / D + eps) * w + b
    elif NORM == 2:
        y = x * tl.rsqrt(_total(x * x) / D + eps) * w
    else:
        y = x
    return y


@triton.jit
def _rotated(S, at, pos, COS, SIN, HD: tl.constexpr, ROPE: tl.constexpr):
    """A head's vector in S at `at`, RoPE-rotated at pos as model.py does (adjacent pairs)."""
    d = tl.arange(0, HD)
    x = tl.load(S + at + d, cache_modifier=".cg")  # .cg: from L2, never a stale L1 line
    if ROPE:
        cos = tl.load(COS + pos * (HD // 2) + d // 2)
        sin = tl.load(SIN + pos * (HD // 2) + d // 2) * tl.where(d % 2 == 0, -1.0, 1.0)
        x = x * cos + tl.load(S + at + (d ^ 1), cache_modifier=".cg") * sin
    return x


@triton.jit
def _attention(S, KC, VC, COS, SIN, layer, h, pos, D, HKV, GROUP, SLOTS, scale,
               HD: tl.constexpr, BS: tl.constexpr, ROPE: tl.constexpr):
    """Head h's query over its key-value head's cache slots before pos and the new token's key
    and value (in S): an online softmax, rounded as the unfused step does (the cache's dtype)."""
    d, kvh = tl.arange(0, HD), h // GROUP
    dtype = KC.dtype.element_ty
    q = _rotated(S, h * HD, pos, COS, SIN, HD, ROPE).to(dtype).to(tl.float32)
    k = _rotated(S, D + kvh * HD, pos, COS, SIN, HD, ROPE).to(dtype).to(tl.float32)
    v = tl.load(S + D + (HKV + kvh) * HD + d, cache_modifier=".cg").to(dtype).to(tl.float32)
    m = tl.sum(q * k, 0) * scale  # start from the new token: no empty-softmax case
    total, acc = tl.zeros_like(m) + 1.0, v
    for start in range(0, pos, BS):
        slots = start + tl.arange(0, BS)
        at = (layer.to(tl.int64) * SLOTS + slots[:, None]) * HKV * HD + kvh * HD + d[None, :]
        ok = slots < pos
        keys = tl.load(KC + at, mask=ok[:, None], other=0.0).to(tl.float32)
        values = tl.load(VC + at, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(keys * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        p, alpha = tl.exp(s - m_new), tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * values, 0)
        m = m_new
    return acc / total


@triton.jit
def _activate(a, ACT: tl.constexpr):
    if ACT == 1:  # GPT-2's tanh GELU: 0.5 (1 + tanh z) = sigmoid(2z)
        return a * tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a))
    elif ACT == 2:
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACT == 3:
        return tl.maximum(a, 0.0)
    else:  # SwiGLU's silu
        return a * tl.sigmoid(a)


@triton.jit
def _rowdot(w, v):
    """Tile (R, NCP, C) @ v (NCP, C): one output per row."""
    return tl.sum(tl.sum(w * v[None, :, :], 2), 1)


@triton.jit
def _coldot(w, a, part):
    """part + a * tile: the partial output of the tile's rows (inputs a), still (R, NCP, C). It is
    summed over its rows once, at the phase's end: the sum spans warps, which meet to make it."""
    return part + w * a[:, None, None]


@triton.jit
def _pick(rows, i):
    """Row i of a small (N, R) tensor in registers."""
    return tl.sum(tl.where(tl.arange(0, rows.shape[0])[:, None] == i, rows, 0.0), 0)


@triton.jit
def _decode_layers_kernel(TOKEN, POS, S, X, BAR, W, B, VEC, WTE, WPE, COS, SIN, KC, VC, L, D,
                          QKV_N, F, H, HKV, SLOTS, eps, scale, PHASE, NPROG, NQ: tl.constexpr,
                          NO: tl.constexpr, NF: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
                          NCP: tl.constexpr, C: tl.constexpr, HD: tl.constexpr,
                          BS: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr,
                          LEARNED_POS: tl.constexpr, ROPE: tl.constexpr, SYNC: tl.constexpr,
                          STAGES: tl.constexpr):
    """All layers: this program's stream of L * T tiles, tile t's weights from descriptor W at
    row (t * NPROG + pid) * R. A layer is NQ tiles of q|k|v rows, NO of the output projection's
    input rows, NF groups of the FFN's (W_1 rows, [W_3 rows,] W_2 columns). B holds, a layer and
    a program, the biases of its q|k|v tiles' rows, then of its W_1 tiles' (NB x R, padded).
    A d_model vector is held as (NCP, C), the shape of a tile's row. A phase's stores are masked
    by whether it is this launch's (interpreter: a launch a phase)."""
    pid = tl.program_id(0)
    G: tl.constexpr = 3 if ACT == 4 else 2
    T: tl.constexpr = NQ + NO + NF * G
    r, hd = tl.arange(0, R), tl.arange(0, HD)
    cols = tl.arange(0, NCP)[:, None] * C + tl.arange(0, C)[None, :]
    pos = tl.minimum(tl.load(POS), SLOTS - 1)  # past the cache: wrong, but never outside it
    x = tl.load(WTE + tl.load(TOKEN) * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    if LEARNED_POS:  # every program embeds the token itself: no phase for it
        x += tl.load(WPE + pos * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    v, part = tl.zeros_like(x), tl.zeros([R, NCP, C], tl.float32)  # normed input; output
    hid, gate = tl.zeros([R], tl.float32), tl.zeros([R], tl.float32)
    tile_biases = tl.arange(0, NB)[:, None] * R + r[None, :]
    biases = tl.zeros([NB, R], tl.float32)
    start, end = 0, L * T
    if not SYNC:  # the interpreter's launch for one phase: from its layer's start (where the
        start = PHASE // 3 * T  # layer's vectors are loaded) to the phase's last tile
        end = start + NQ
        if PHASE % 3 == 1:
            end = start + NQ + NO
        elif PHASE % 3 == 2:
            end = start + T
    g1w, g1b = _vec(VEC, start // T, 0, L, D, cols), _vec(VEC, start // T, 1, L, D, cols)
    g2w, g2b, bo, b2 = v, v, v, v  # set at each layer's start
    for t in tl.range(start, end, num_stages=STAGES):
        w = W.load([(t * NPROG + pid) * R, 0, 0]).to(tl.float32)
        layer = t // T
        j, s = t - layer * T, 3 * layer
        if j == 0:  # phase 1: q|k|v = ln1(x) @ W_qkv^T, this program's rows
            if layer > 0:
                x = tl.load(X + 2 * layer * D + cols, mask=cols < D, other=0.0,
                            cache_modifier=".cg")
            v = _norm(x, g1w, g1b, D, eps, cols, NORM)
            biases = tl.load(B + (layer * NPROG + pid) * NB * R + tile_biases)
            if NORM != 0:  # loaded now, used later: this layer's ln2, the next layer's ln1
                g2w, g2b = _vec(VEC, layer, 2, L, D, cols), _vec(VEC, layer, 3, L, D, cols)
                g1w = _vec(VEC, layer + 1, 0, L, D, cols)
                g1b = _vec(VEC, layer + 1, 1, L, D, cols)
            bo, b2 = _vec(VEC, layer, 4, L, D, cols), _vec(VEC, layer, 5, L, D, cols)
        if j < NQ:
            rows = (pid * NQ + j) * R + r
            live = (PHASE < 0) | (PHASE == s)
            tl.store(S + rows, _rowdot(w, v) + _pick(biases, j), mask=rows < QKV_N * live)
            if SYNC:
                if j == NQ - 1:
                    _grid_barrier(BAR, (s + 1) * NPROG)
        elif j < NQ + NO:  # phase 2: attention, then x' = x + attention @ W_o^T by its inputs
            i = j - NQ
            live = (PHASE < 0) | (PHASE == s + 1)
            if i == 0:
                if pid < HKV:  # the new token's key and value into the cache, once a kv head
                    at = (layer.to(tl.int64) * SLOTS + pos) * HKV * HD + pid * HD + hd
                    key = _rotated(S, D + pid * HD, pos, COS, SIN, HD, ROPE)
                    kv_v = tl.load(S + D + (HKV + pid) * HD + hd, cache_modifier=".cg")
                    tl.store(KC + at, key.to(KC.dtype.element_ty), mask=hd < HD * live)
                    tl.store(VC + at, kv_v.to(VC.dtype.element_ty), mask=hd < HD * live)
                part = tl.zeros([R, NCP, C], tl.float32)
            row0 = (pid * NO + i) * R  # R | HD: the tile's rows lie in one head
            head = tl.minimum(row0 // HD, H - 1)
            att = _attention(S, KC, VC, COS, SIN, layer, head, pos, D, HKV, H // HKV, SLOTS,
                             scale, HD, BS, ROPE)
            mine = tl.sum(tl.where(row0 + r[:, None] - head * HD == hd[None, :], att[None, :],
                                   0.0), 1)
            part = _coldot(w, tl.where(row0 + r < D, mine, 0.0), part)
            if i == NO - 1:
                out = tl.sum(part, 0)
                if pid == 0:  # the residual and the bias, added once
                    out += x + bo
                tl.atomic_add(X + (2 * layer + 1) * D + cols, out, mask=cols < D * live,
                              sem="relaxed")
                if SYNC:
                    _grid_barrier(BAR, (s + 2) * NPROG)
        else:  # phase 3: hidden = act(ln2(x') @ W_1^T) (* gate); x'' = x' + hidden @ W_2^T
            k = j - NQ - NO
            c, i = k % G, k // G
            live = (PHASE < 0) | (PHASE == s + 2)
            if k == 0:
                x = tl.load(X + (2 * layer + 1) * D + cols, mask=cols < D, other=0.0,
                            cache_modifier=".cg")
                v = _norm(x, g2w, g2b, D, eps, cols, NORM)
                part = tl.zeros([R, NCP, C], tl.float32)
            if c == 0:
                hid = _rowdot(w, v) + _pick(biases, NQ + i)
            elif c == G - 1:
                act = _activate(hid, ACT)
                if G == 3:
                    act = act * gate
                part = _coldot(w, tl.where((pid * NF + i) * R + r < F, act, 0.0), part)
                if i == NF - 1:
                    out = tl.sum(part, 0)
                    if pid == 0:
                        out += x + b2
                    tl.atomic_add(X + (2 * layer + 2) * D + cols, out, mask=cols < D * live,
                                  sem="relaxed")
                    if SYNC:
                        if layer < L - 1:  # after the last, the head's launch waits for this
                            _grid_barrier(BAR, (s + 3) * NPROG)
            else:
                gate = _rowdot(w, v)


@triton.jit
def _decode_head_kernel(X, NW, NB, W, LOGITS, V, D, eps, ROWS: tl.constexpr, NCP: tl.constexpr,
                        C: tl.constexpr, NORM: tl.constexpr):
    """logits = final_norm(x) @ W^T: a plain wide matrix-vector product, many programs."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NCP)[:, None] * C + tl.arange(0, C)[None, :]
    w = tl.load(W + rows[:, None, None] * D + cols[None, :, :],
                mask=(rows[:, None, None] < V) & (cols < D)[None, :, :], other=0.0)
    x = tl.load(X + cols, mask=cols < D, other=0.0)
    v = _norm(x, tl.load(NW + cols, mask=cols < D, other=0.0).to(tl.float32),
              tl.load(NB + cols, mask=cols < D, other=0.0).to(tl.float32), D, eps, cols, NORM)
    tl.store(LOGITS + rows, _rowdot(w.to(tl.float32), v), mask=rows < V)


MAX_TILE_BYTES = 16384  # of one weight tile; 7 in flight (112 KB of shared memory) keep HBM busy


def decode_programs(device: torch.device) -> int:
    """One program an SM: all must run at once, or a barrier would wait for one never started."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == \
        "cuda" else 4


def decode_tile_rows(model: TransformerLM) -> int:
    """Rows R of a stream tile: (R, d_model) weights in MAX_TILE_BYTES (d_model padded to a power
    of 2, as in shared memory), a power of 2 from 1 to 8 (so that R divides the head dim)."""
    width = triton.next_power_of_2(model.config.d_model)
    rows = MAX_TILE_BYTES // (width * model.token_embeddings.weight.element_size())
    return max(1, min(8, triton.next_power_of_2(rows + 1) // 2))


def decode_row_shape(d_model: int) -> tuple[int, int]:
    """A d_model row as (NC, C) chunks of C <= 256 (a TMA box's limit), C the largest power of 2
    dividing d_model; the tile's box pads NC to a power of 2, and the copy fills the rest with
    zeros without reading memory (d_model 768: 3 chunks of 256 in a box of 4)."""
    C = min(256, d_model & -d_model)
    return d_model // C, C


def fused_decode_unsupported(model: TransformerLM, num_programs: int) -> str:
    """Why FusedDecode cannot run this model ("" if it can)."""
    c = model.config
    D, H, kv, weight = c.d_model, c.num_heads, c.num_kv_heads or c.num_heads, \
        model.token_embeddings.weight
    if c.mixer != "attention" or c.kv_latent_dim or c.num_experts:
        return ("the fused decode step does not support linear attention, Hyena, MLA or MoE: "
                "plain softmax attention and a dense FFN only")
    for problem, why in [
        (any(type(m) is not Linear for b in model.layers for m in (
            b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.output_proj, *(
                getattr(b.ffn, name) for name in ("w1", "w2", "w3") if hasattr(b.ffn, name)))),
         "quantized weights"),
        (c.sliding_window, "a sliding window"), (c.norm_position != "pre", "post-norm blocks"),
        (c.positions == "sinusoidal", "sinusoidal positions"),
        (c.ffn not in ("gelu_tanh", "gelu", "relu", "swiglu"), f"the {c.ffn} FFN"),
        (D // H not in (16, 32, 64, 128, 256) or D % H, f"head dim {D / H:g} (a power of 2 "
         "from 16 to 256)"),
        (weight.dtype not in (torch.float32, torch.bfloat16, torch.float16),
         f"{weight.dtype} weights (float32, bfloat16 or float16)"),
        (kv > num_programs, f"{kv} key-value heads on {num_programs} programs (a program "
         "writes each one's cache)"),
        (D > 2048, f"d_model {D}: a program's tiles and vectors would not fit in registers"),
        (weight.is_cuda and torch.cuda.get_device_capability(weight.device) < (9, 0),
         "GPUs before Hopper (the weights stream through its TMA)")]:
        if problem:
            return f"the fused decode step does not support {why}"
    return ""


class FusedDecode:
    """A batch-1 decode step in two launches: the persistent kernel over all layers, then the
    head. Holds the weights as the programs' tile streams (a copy) and re-homes the cache's keys
    and values into (L, slots, H_kv, d) stacks, which the cache keeps using; slots before a
    step's position must hold this sequence's tokens (prefill's)."""
    def __init__(self, model: TransformerLM, cache_layers: list[dict],
                 num_programs: int | None = None, num_warps: int = 8) -> None:
        c, device = model.config, model.token_embeddings.weight.device
        P = self.num_programs = num_programs or decode_programs(device)
        if why := fused_decode_unsupported(model, P):
            raise ValueError(why)
        L, D, F, H, self.c = c.num_layers, c.d_model, c.d_ff, c.num_heads, c
        HKV, R = c.num_kv_heads or H, decode_tile_rows(model)
        dtype, layers = model.token_embeddings.weight.dtype, model.layers

        def tiles(get, biases: bool = False) -> Tensor:
            """A matrix a layer (N, D), or N biases -> (L, tiles, P, R[, D]): program p owns
            rows p * per * R .. (p + 1) * per * R - 1, zeros past N."""
            m = torch.stack([get(b).detach() for b in layers])
            m = m.float()[..., None] if biases else m.to(dtype)
            N, per = m.shape[1], -(-m.shape[1] // (P * R))
            padded = m.new_zeros(L, P * per * R, m.shape[2])
            padded[:, :N] = m
            out = padded.view(L, P, per, R, -1).transpose(1, 2)
            return out[..., 0] if biases else out

        gated = c.ffn == "swiglu"
        stream = [tiles(lambda b: torch.cat([b.attn.q_proj.weight, b.attn.k_proj.weight,
                                            b.attn.v_proj.weight])),
                  tiles(lambda b: b.attn.output_proj.weight.T),
                  torch.stack([tiles(lambda b: b.ffn.w1.weight)] + (
                      [tiles(lambda b: b.ffn.w3.weight)] if gated else []) + [
                      tiles(lambda b: b.ffn.w2.weight.T)], 2).flatten(1, 2)]
        self.tiles = torch.cat(stream, 1).contiguous()  # (L, T, P, R, D)
        (NC, C), width = decode_row_shape(D), triton.next_power_of_2(D)
        self.weights = TensorDescriptor.from_tensor(self.tiles.view(-1, NC, C), [R, width // C, C])
        qkv_n = D + 2 * HKV * (D // H)

        def bias(m: Linear) -> Tensor:
            return torch.zeros(m.weight.shape[0], device=device) if m.bias is None else m.bias
        b_qkv = tiles(lambda b: torch.cat([bias(b.attn.q_proj), bias(b.attn.k_proj),
                                           bias(b.attn.v_proj)]), biases=True)
        b_1 = tiles(lambda b: bias(b.ffn.w1), biases=True)
        NQ, NF = b_qkv.shape[1], b_1.shape[1]  # (the others' biases go into the residual)
        self.biases = torch.zeros(L, P, triton.next_power_of_2(NQ + NF), R, device=device)
        self.biases[:, :, :NQ + NF] = torch.cat([b_qkv, b_1], 1).transpose(1, 2)

        def vector(get, default: float) -> Tensor:
            return torch.stack([torch.full((D,), default, device=device) if get(b) is None
                                else get(b).detach().float() for b in layers])
        self.vectors = torch.stack([
            vector(lambda b: getattr(b.ln1, "weight", None), 1.0),
            vector(lambda b: getattr(b.ln1, "bias", None), 0.0),
            vector(lambda b: getattr(b.ln2, "weight", None), 1.0),
            vector(lambda b: getattr(b.ln2, "bias", None), 0.0),
            vector(lambda b: b.attn.output_proj.bias, 0.0),
            vector(lambda b: b.ffn.w2.bias, 0.0)], 1).contiguous()  # (L, 6, D)
        self.kv = [torch.stack([layer[name][0] for layer in cache_layers]) for name in "kv"]
        for i, layer in enumerate(cache_layers):  # the cache now writes into the stacks
            layer["k"], layer["v"] = self.kv[0][i][None], self.kv[1][i][None]
        self.scratch = torch.zeros(qkv_n, device=device)  # this layer's q|k|v
        self.state = torch.zeros(4 + (2 * L + 1) * D, dtype=torch.int32, device=device)
        self.residual = self.state[4:].view(torch.float32).view(2 * L + 1, D)  # x by phase
        self.logits = torch.empty(1, c.vocab_size, device=device)
        empty = torch.zeros(1, device=device, dtype=dtype)
        rope = model.rope if c.positions == "rope" else None
        self.args = (model.token_embeddings.weight, getattr(
            model, "position_embeddings", SimpleNamespace(weight=empty)).weight,
            empty if rope is None else rope.cos, empty if rope is None else rope.sin, *self.kv)
        self.sizes = (L, D, qkv_n, F, H, HKV, self.kv[0].shape[1], c.norm_eps,
                      1 / math.sqrt(D // H))
        self.meta = dict(
            NQ=stream[0].shape[1], NO=stream[1].shape[1], NF=stream[2].shape[1] // (
                3 if gated else 2), R=R, NB=self.biases.shape[2], NCP=width // C, C=C, HD=D // H,
            BS=4 if INTERPRET else 128, NORM={"layernorm": 1, "rmsnorm": 2}.get(c.norm, 0),
            ACT={"gelu_tanh": 1, "gelu": 2, "relu": 3, "swiglu": 4}[c.ffn],
            LEARNED_POS=c.positions == "learned", ROPE=rope is not None,
            STAGES=8,  # 7 tiles in flight (MAX_TILE_BYTES each)
            num_warps=num_warps)
        self.head = (model.ln_final, model.lm_head.weight)
        self.sync = not INTERPRET  # the interpreter: a launch per phase, no barrier

    def __call__(self, token: Tensor, position: Tensor) -> Tensor:
        """Logits (1, V) in float32 after token (1,) at position (1,): no host sync."""
        norm, weight = self.head
        self.state.zero_()  # the barrier's counter and the residual's buffers
        for phase in ([-1] if self.sync else range(3 * self.c.num_layers)):
            _decode_layers_kernel[(self.num_programs,)](
                token, position, self.scratch, self.residual, self.state, self.weights,
                self.biases, self.vectors, *self.args, *self.sizes, phase, self.num_programs,
                SYNC=self.sync, **self.meta)
        rows = 32
        _decode_head_kernel[(triton.cdiv(self.c.vocab_size, rows),)](
            self.residual[-1], getattr(norm, "weight", weight), getattr(norm, "bias", weight),
            weight, self.logits, self.c.vocab_size, self.c.d_model, self.c.norm_eps, ROWS=rows,
            NCP=self.meta["NCP"], C=self.meta["C"], NORM=self.meta["NORM"], num_warps=8)
        return self.logits


# Command line: `python kernels.py [bench|profile|lesson|fused|attention] [--key=value ...]` -------
@dataclasses.dataclass
class DeviceConfig:
    device: str = "auto"


COMMANDS = {"bench": (BenchConfig, bench), "profile": (ProfileConfig, profile),  # settings, run
            "lesson": (DeviceConfig, lambda cfg: lesson(cfg.device)),
            "fused": (DeviceConfig, lambda cfg: bench_fused(cfg.device)),
            "attention": (AttentionConfig, bench_attention)}


def main(argv: list[str]) -> None:
    if not argv or "-h" in argv or "--help" in argv:
        return print(__doc__)
    defaults = {name: option_defaults(config()) if issubclass(config, TrainConfig)
                else dataclasses.asdict(config()) for name, (config, _) in COMMANDS.items()}
    command, settings, overrides, _ = parse_command(argv, defaults, "bench")
    config, run = COMMANDS[command]
    run(with_overrides(config(), overrides) if issubclass(config, TrainConfig)
        else config(**settings))


if __name__ == "__main__":
    run_cli(main)
