"""Stage 5: parallel training by hand on torch.distributed (CS336 lectures 7-8, assignment 2).

Data parallelism runs the same model on every process, each on its slice of the batch; averaged
gradients make the step the one a single process takes on the whole batch. The four wrappers
(naive, flat, per parameter, bucketed: torch DDP's design) differ in *when* and *how* gradients
travel. ShardedOptimizer (ZeRO-1) shards the AdamW state, FSDP (ZeRO-3) the weights too; tensor
parallelism (Megatron) splits the layers, sequence parallelism the activations between them,
pipeline parallelism (GPipe) the stack of blocks. The accounting predicts the costs; bench measures.

Commands (CPU with gloo, or NCCL when CUDA is there; the demos spawn their own processes):
    python ddp.py collectives                  # what each collective does, 4 ranks (~10 s)
    python ddp.py bench_collectives --sizes_mb=1,16,64 --world_sizes=2,4   # all-reduce bandwidth
    python ddp.py accounting --preset=xl --num_gpus=8 --bandwidth_gbps=450
    python ddp.py accounting --example=course  # the course's 16,384-wide, 126-block model
    python ddp.py bench --trace=traces  # DDPBucketed vs torch's DDP; ZeRO-1, FSDP memory
The wrappers are used from code run under torchrun (or any initialised process group):
    model = DDPBucketed(model, bucket_size_mb=25); loss.backward()
    model.finish_gradient_synchronization(); optimizer.step()
    model = FSDP(model, compute_dtype=torch.bfloat16)  # the same; save model.gather_full_params()
    model = tensor_parallel(model, sequence_parallel=True)  # then sync_norm_grads(model)
    loss, idle = gpipe_step(PipelineStage(model), token_ids, targets, num_microbatches=8)
Each is tested against one process on the whole model (2 gloo processes); only bench --trace
writes files. `torchrun --nproc_per_node=N train.py --parallel=ddp|zero1|fsdp` trains with them.

Papers  Li et al. 2020 (PyTorch DDP); Rajbhandari et al. 2020 (ZeRO); Zhao et al. 2023 (FSDP);
        Shoeybi et al. 2019 (Megatron-LM); Korthikanti et al. 2022 (sequence parallelism); Huang
        et al. 2019 (GPipe); Patarasuk & Yuan 2009 (the ring all-reduce); Thakur et al. 2005.
"""

import contextlib
import gc
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from model import Embedding, Linear, ModelConfig, TransformerLM, count_params
from tokenizer import UsageError, parse_command, run_cli


# Processes: spawn a group from plain `python`, as torchrun would ----------------------------------
def _process(rank: int, world_size: int, port: int, backend: str, fn: Callable,
             args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes share the cores: more threads only spin
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # The timeout turns a dead rank's hang in a collective into an error (spawn() then ends all).
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=2))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves while others still work
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args, backend: str = "gloo") -> None:
    """Run fn(rank, world_size, *args) in world_size new processes joined in one process group;
    fn must be importable (a module-level function). An exception in any rank is raised here."""
    with socket.socket() as s:  # a port nobody uses now: the OS picks one for port 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_process, args=(world_size, port, backend, fn, args), nprocs=world_size, join=True)


# Collectives: what each does, shown on small tensors ----------------------------------------------
# A collective is one call that every rank of the group makes. With n ranks and S bytes, the ring
# algorithms move per rank: broadcast, all-gather and reduce-scatter (n-1)/n S, all-reduce
# 2(n-1)/n S (it *is* a reduce-scatter then an all-gather): the basis of the accounting below.
def show_collectives(rank: int, world_size: int, echo: bool = False) -> list[str]:
    """Each collective on rank r's tensor [10r, ..., 10r+n-1]: rank 0 returns (echo: prints) what
    every rank held after it; checks that all-reduce = reduce-scatter then all-gather."""
    n, lines = world_size, []

    def record(name: str, what: str, result: Tensor | None) -> None:
        results = [None] * n
        dist.all_gather_object(results, None if result is None else result.tolist())
        lines.append(f"{name:<15}{what}")
        for r, x in enumerate(results):
            shown = "-" if x is None else "[" + ", ".join(f"{v:g}" for v in x) + "]"
            lines.append(f"  rank {r}: {shown}")

    def data() -> Tensor:
        return torch.arange(n, dtype=torch.float32) + 10 * rank

    record("inputs", "rank r holds [10r, ..., 10r+n-1]", data())
    x = data()
    dist.broadcast(x, src=0)
    record("broadcast", "rank 0's tensor copied to every rank", x)
    piece = torch.empty(1)
    dist.scatter(piece, list(data().chunk(n)) if rank == 0 else None, src=0)
    record("scatter", "rank 0's tensor cut into n pieces, piece r to rank r", piece)
    pieces = [torch.empty(n) for _ in range(n)] if rank == 0 else None
    dist.gather(data(), pieces, dst=0)
    record("gather", "every rank's tensor collected on rank 0",
           torch.cat(pieces) if pieces else None)
    x = data()
    dist.reduce(x, dst=0)
    record("reduce", "the sum of all tensors on rank 0 (the others' are scratch)",
           x if rank == 0 else None)
    gathered = [torch.empty(n) for _ in range(n)]
    dist.all_gather(gathered, data())
    record("all-gather", "every rank's tensor on every rank", torch.cat(gathered))
    reduced_piece = torch.empty(1)
    dist.reduce_scatter(reduced_piece, list(data().chunk(n)))
    record("reduce-scatter", "piece r of the sum on rank r", reduced_piece)
    all_reduced = data()
    dist.all_reduce(all_reduced)
    record("all-reduce", "the sum on every rank", all_reduced)
    pieces = [torch.empty(1) for _ in range(n)]
    dist.all_gather(pieces, reduced_piece)
    same = torch.equal(torch.cat(pieces), all_reduced)
    lines.append(f"all-reduce == reduce-scatter + all-gather: {same}")
    if not same:
        raise RuntimeError("all-reduce differs from reduce-scatter followed by all-gather")
    if echo and rank == 0:
        print("\n".join(lines), flush=True)
    return lines if rank == 0 else []


# Benchmark: all-reduce time, algorithm and bus bandwidth ------------------------------------------
# algbw = size / time. A ring all-reduce sends 2(n-1)/n of the tensor out of every rank, so busbw =
# algbw * 2(n-1)/n is what each link carried: comparable across n and with the hardware's figure.
def bench_all_reduce(rank: int, world_size: int, sizes_mb: list[float], repeats: int,
                     backend: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    for size_mb in sizes_mb:
        x = torch.zeros(max(1, int(size_mb * 1e6 / 4)), device=device)  # fp32; sums stay 0
        dist.all_reduce(x)  # warm-up: the first call sets up connections
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(x)
        sync()
        seconds = torch.tensor((time.perf_counter() - start) / repeats, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        algbw = x.numel() * 4 / seconds.item() / 1e9
        if rank == 0:
            print(f"{backend:<5} {world_size} ranks {x.numel() * 4 / 1e6:9.1f} MB "
                  f"{seconds.item() * 1e3:10.2f} ms  algbw {algbw:7.3f} GB/s  "
                  f"busbw {algbw * 2 * (world_size - 1) / world_size:7.3f} GB/s", flush=True)


# Data parallel: four wrappers with one interface --------------------------------------------------
class _DataParallel(nn.Module):
    """Rank 0's parameters and buffers broadcast at construction, .module, and the first forward's
    batch-size check. Gradients are averaged; frozen ones are left alone; tied ones reduced once."""
    shards: tuple[nn.Parameter, ...] = ()  # FSDP: this rank's pieces of the sharded weights

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{type(self).__name__} needs an initialised process group: run "
                               "under torchrun, or call torch.distributed.init_process_group()")
        self.module, self.world_size = module, dist.get_world_size()
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._batch_checked = False
        shapes, everyone = [t.shape for t in module.state_dict().values()], [None] * self.world_size
        dist.all_gather_object(everyone, shapes)  # every rank sees all: all raise, none hangs
        if any(other != shapes for other in everyone):
            raise ValueError("the parameter or buffer shapes differ across ranks: build the same "
                             "model on every rank (rank 0's values are then copied to all)")
        with torch.no_grad():  # random init differs per rank: everyone starts from rank 0's
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    def forward(self, *args, **kwargs):
        if not self._batch_checked:  # averaging needs equal batches: checked once, a tiny
            self._batch_checked = True  # blocking all-reduce; later batches are trusted
            batch = next((a for a in args if isinstance(a, Tensor)), None)
            size = batch.shape[0] if batch is not None and batch.dim() else 0
            sizes = torch.tensor([size, -size], device=batch.device if batch is not None else None)
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX)  # (largest, -smallest) on every rank
            if sizes[0] != -sizes[1]:
                raise ValueError(f"batch sizes differ across ranks (from {-sizes[1].item()} to "
                                 f"{sizes[0].item()}): give every rank the same batch size")
        return self.module(*args, **kwargs)

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> Tensor:
        """train.py's step, after backward: finish averaging the gradients, then scale them so
        their global L2 norm (FSDP: with every rank's shards) is at most max_norm; return it."""
        self.finish_gradient_synchronization()
        grads = [p.grad for p in params if p.grad is not None]  # the same on every rank
        shards = [p.grad for p in self.shards if p.grad is not None]
        if not grads + shards:
            return torch.zeros(())
        # As train.clip_grad_norm: the norm of the per-tensor norms, nothing concatenated.
        squares = torch.stack(torch._foreach_norm(grads + shards, dtype=torch.float32)).square()
        sharded = squares[len(grads):].sum()
        if self.shards:  # each rank's squares of its own pieces, summed over the ranks
            dist.all_reduce(sharded)
        total = (squares[:len(grads)].sum() + sharded).sqrt()
        torch._foreach_mul_(grads + shards, (max_norm / (total + 1e-6)).clamp(max=1.0))
        return total

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        """For train.py's checkpoints (every rank calls it): model and optimizer, or stand-ins
        whose state_dict() is the whole, unsharded one, as one process would save."""
        if isinstance(optimizer, ShardedOptimizer):
            state = optimizer.full_state_dict() or {}
            optimizer = SimpleNamespace(state_dict=lambda: state)
        return model, optimizer


class DDPNaive(_DataParallel):
    """After backward, one blocking all-reduce per gradient: no overlap, a full latency each."""
    def finish_gradient_synchronization(self) -> None:
        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size


def _flatten(tensors: list[Tensor]) -> Tensor:  # one message instead of one each
    return torch.cat([t.reshape(-1) for t in tensors])


def _copy_back(flat: Tensor, tensors: list[Tensor]) -> None:  # each takes back its piece of flat
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(part.view_as(tensor))


class DDPFlat(_DataParallel):
    """After backward, all gradients flattened into one buffer, one all-reduce: one latency."""
    def finish_gradient_synchronization(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            flat = _flatten(grads) / self.world_size
            dist.all_reduce(flat)
            _copy_back(flat, grads)


class DDPIndividualParameters(_DataParallel):
    """Each gradient's asynchronous all-reduce starts once backward has accumulated it (a hook),
    overlapping backward through earlier layers; finish_gradient_synchronization() only waits."""
    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._pending: list[dist.Work] = []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._launch)

    def _launch(self, p: Tensor) -> None:
        p.grad /= self.world_size  # averaged in place: the all-reduce then sums the averages
        self._pending.append(dist.all_reduce(p.grad, async_op=True))

    def finish_gradient_synchronization(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending.clear()


class DDPBucketed(_DataParallel):
    """Overlap and few messages: parameters in reverse order (about backward's) in buckets of at
    most bucket_size_mb (a larger one alone); a bucket's flat all-reduce starts once its gradients
    are in, in bucket order, so every rank issues the same collectives in the same order."""
    def __init__(self, module: nn.Module, bucket_size_mb: float) -> None:
        super().__init__(module)
        if not bucket_size_mb > 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb}")
        limit, self.buckets = bucket_size_mb * 2**20, [[]]
        for p in reversed(self.params):
            size = sum(q.numel() * q.element_size() for q in self.buckets[-1])
            if self.buckets[-1] and size + p.numel() * p.element_size() > limit:
                self.buckets.append([])
            self.buckets[-1].append(p)
        self.buckets = [b for b in self.buckets if b]
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._mark_ready)
        self._reset()
        self._sync = True

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: backwards inside only add to .grad; the next sends the sums."""
        self._sync = False
        try:
            yield
        finally:  # an exception inside must not leave every later backward unsynchronised
            self._sync = True

    def _reset(self) -> None:
        self._waiting = [len(bucket) for bucket in self.buckets]  # gradients still to arrive
        self._next = 0  # the first bucket not yet launched
        self._pending: list[tuple[dist.Work, Tensor, list[Tensor]]] = []

    def _mark_ready(self, p: Tensor) -> None:
        if self._sync:  # inside no_sync() gradients only accumulate
            self._waiting[self._bucket_of[id(p)]] -= 1
            while self._next < len(self.buckets) and self._waiting[self._next] == 0:
                self._launch(self._next)

    def _launch(self, index: int) -> None:
        for p in self.buckets[index]:  # one backward did not reach (unused) contributes zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.buckets[index]]
        flat = _flatten(grads) / self.world_size  # as DDPFlat's
        self._pending.append((dist.all_reduce(flat, async_op=True), flat, grads))
        self._next += 1

    def finish_gradient_synchronization(self) -> None:
        while self._next < len(self.buckets):  # buckets with a gradient backward never made
            self._launch(self._next)
        for work, flat, grads in self._pending:
            work.wait()
            _copy_back(flat, grads)
        self._reset()


# Optimizer-state sharding -------------------------------------------------------------------------
class ShardedOptimizer(torch.optim.Optimizer):
    """Any optimizer, its state split across ranks: each parameter has one owner (largest first,
    to the least loaded rank), whose optimizer_cls(**kwargs) keeps its state and steps it; owners
    then broadcast their parameters. Use it after a data-parallel wrapper averaged the gradients.
    ZeRO (Rajbhandari et al. 2020): stage 1 shards the optimizer state (this class: AdamW's 8 of
    16 bytes a parameter); stage 2 also the gradients (a reduce-scatter replaces the all-reduce);
    stage 3 (FSDP) also the parameters. Stages 1 and 2 move DDP's bytes (all-reduce = reduce-scatter
    + all-gather, here a broadcast); stage 3 gathers the parameters twice (forward, backward)."""
    def __init__(self, params: Iterable, optimizer_cls: type[torch.optim.Optimizer],
                 **kwargs) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedOptimizer needs an initialised process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.optimizer_cls, self.kwargs = optimizer_cls, kwargs
        self.owned = [[] for _ in range(self.world_size)]  # per rank, the parameters it owns
        self._load = [0] * self.world_size
        self.local: torch.optim.Optimizer | None = None
        super().__init__(params, kwargs)  # calls add_param_group for each group

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults, checks for duplicates
        group, before = self.param_groups[-1], len(self.owned[self.rank])
        for p in sorted(group["params"], key=lambda p: -p.numel()):  # stable: same on all ranks
            owner = min(range(self.world_size), key=self._load.__getitem__)
            self._load[owner] += p.numel()
            self.owned[owner].append(p)
        local_group = {**group, "params": self.owned[self.rank][before:]}  # maybe none: aligned
        if self.local is None:
            self.local = self.optimizer_cls([local_group], **self.kwargs)
        else:
            self.local.add_param_group(local_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        for group, local in zip(self.param_groups, self.local.param_groups):
            local.update({k: v for k, v in group.items() if k != "params"})  # an lr schedule
        loss = self.local.step(closure)
        for owner, params in enumerate(self.owned):  # one broadcast per owner, flattened
            if params:
                flat = _flatten(params)
                dist.broadcast(flat, src=owner)
                _copy_back(flat, params)
        return loss

    def state_dict(self) -> dict:  # this rank's shard
        return self.local.state_dict()

    def full_state_dict(self) -> dict | None:
        """One unsharded optimizer's state_dict, gathered on rank 0 (None elsewhere): resumable."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        mine = {index[id(p)]: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
                for p, s in self.local.state.items()}
        parts = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank == 0:  # the groups, numbered as state_dict() numbers them, and all states
            return torch.optim.Optimizer.state_dict(self) | {
                "state": {i: state for part in parts for i, state in part.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.local.load_state_dict(state_dict)


# FSDP: every rank keeps a shard of each weight, gathered just in time -----------------------------
def _my_shard(full: Tensor) -> Tensor:
    """This rank's piece of full, flattened; the last piece is padded with zeros."""
    n = dist.get_world_size()
    flat = nn.functional.pad(full.detach().reshape(-1), (0, -full.numel() % n))
    return flat.view(n, -1)[dist.get_rank()].clone()


class _Unit:
    """One sharded weight: this rank's fp32 shard (a Parameter), and the full one while in use."""
    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        self.shape, self.numel, self.dtype = weight.shape, weight.numel(), dtype
        self.shard = nn.Parameter(_my_shard(weight))
        self.full = self._pending = None  # the gathered weight; (work, flat) of one in flight

    def start_gather(self) -> None:  # asynchronous: it runs while the current layer computes
        if self.full is None and self._pending is None:
            shard = self.shard.detach().to(self.dtype)
            flat = shard.new_empty(shard.numel() * dist.get_world_size())
            self._pending = (dist.all_gather_into_tensor(flat, shard, async_op=True), flat)

    def gather(self) -> Tensor:
        """The full weight, (shape) in the compute dtype: prefetched, or gathered now."""
        self.start_gather()
        if self._pending is not None:
            self._pending[0].wait()
            self.full, self._pending = self._pending[1][:self.numel].view(self.shape), None
        return self.full

    def free(self) -> None:
        """Drop the full weight, and any prefetch no layer used (it would be stale next step)."""
        if self._pending is not None:
            self._pending[0].wait()
        self.full = self._pending = None

    def whole(self, piece: Tensor) -> Tensor:
        """A tensor cut like the shard (the weight, or its optimizer state), whole again."""
        flat = piece.new_empty(piece.numel() * dist.get_world_size())
        dist.all_gather_into_tensor(flat, piece.detach().contiguous())
        return flat[:self.numel].view(self.shape)


class _GatheredWeight(torch.autograd.Function):
    """Forward: the unit's full weight; backward: its gradient reduce-scattered (fp32), averaged."""
    @staticmethod
    def forward(ctx, shard: Tensor, unit: _Unit) -> Tensor:
        ctx.unit = unit
        return unit.gather()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        shard, n = ctx.unit.shard, dist.get_world_size()
        flat = nn.functional.pad(grad.reshape(-1).float(), (0, shard.numel() * n - grad.numel()))
        shard_grad = torch.empty_like(shard)
        dist.reduce_scatter(shard_grad, list(flat.chunk(n)))
        return shard_grad / n, None


class FSDP(DDPFlat):
    """Fully sharded data parallel (ZeRO-3) for model.py's models: every Linear and Embedding
    weight is flattened, padded and cut into one fp32 shard per rank; the optimizer steps the
    shards (.shards) and the replicated rest (norm gains). A layer's pre-hook all-gathers its
    weight (in compute_dtype) and prefetches the next layer's; its post-hook frees it, and a
    saved-tensor hook keeps only the unit for backward, which gathers it again. Gradients are
    reduce-scattered into the shards; DDPFlat's finish_gradient_synchronization() does the rest."""
    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(module)  # every rank starts from rank 0's weights, then shards them
        dtype = self.compute_dtype = compute_dtype or torch.float32
        self._units: dict[int, _Unit] = {}  # a tied weight is one unit used by two layers
        self._layers, self._hooks = [], []  # (layer, unit) in the order they were registered
        for layer in module.modules():
            if isinstance(layer, (Linear, Embedding)) and layer.weight.requires_grad:
                unit = self._units.setdefault(id(layer.weight), _Unit(layer.weight, dtype))
                self._layers.append((layer, unit))
        for index, (layer, unit) in enumerate(self._layers):
            del layer.weight  # no longer a Parameter: a plain attribute set by the pre-hook
            layer.weight = None
            self._hooks += [layer.register_forward_pre_hook(partial(self._gather_hook, index)),
                            layer.register_forward_hook(partial(self._free_hook, unit))]
        # Registered for .parameters() and .to(); .shards, a tuple, is what _DataParallel reads.
        self.shard_list = nn.ParameterList(unit.shard for unit in self._units.values())
        self.shards = tuple(self.shard_list)
        self.params = [p for p in module.parameters() if p.requires_grad]  # replicated ones
        self._live: dict[int, _Unit] = {}  # storage address of a gathered weight -> its unit
        self._next, self._previous = {}, None  # layer index -> the one that ran after it; the last

    def _gather_hook(self, index: int, layer: nn.Module, args: tuple) -> None:
        unit = self._layers[index][1]
        layer.weight = _GatheredWeight.apply(unit.shard, unit)
        self._live[layer.weight.untyped_storage().data_ptr()] = unit
        # Layers run in their own order (SwiGLU: w1, w3, w2): the last forward taught us the next.
        if self._previous is not None:
            self._next[self._previous] = index
        self._previous = index
        if index in self._next:
            self._layers[self._next[index]][1].start_gather()

    def _free_hook(self, unit: _Unit, layer: nn.Module, args: tuple, output: Tensor) -> None:
        self._live.pop(layer.weight.untyped_storage().data_ptr())  # reusable at once: forget it
        layer.weight = None
        unit.free()  # the saved-tensor hook kept only a reference

    def _pack(self, tensor: Tensor) -> Tensor | tuple:
        if (unit := self._live.get(tensor.untyped_storage().data_ptr())) is None:
            return tensor
        return unit, tensor.size(), tensor.stride(), tensor.storage_offset()

    @staticmethod
    def _unpack(packed: Tensor | tuple) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        unit, size, stride, offset = packed
        full = unit.gather()  # gathered again for backward, and dropped right after
        unit.free()
        return full.as_strided(size, stride, offset)

    def forward(self, *args, **kwargs):
        self._previous = None
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = super().forward(*args, **kwargs)
        for _, unit in self._layers:  # a prefetch the forward did not use (the order changed)
            unit.free()
        return out

    def gather_full_params(self, root: nn.Module | None = None) -> dict[str, Tensor]:
        """The unsharded fp32 state_dict of the module, or of root inside it, on every rank."""
        root = root or self.module
        state, unit_of = root.state_dict(), {id(m): u for m, u in self._layers}
        for name, layer in root.named_modules():  # a tied weight: gathered under each name
            if (unit := unit_of.get(id(layer))) is not None:
                state[f"{name}.weight" if name else "weight"] = unit.whole(unit.shard)
        return state

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """An optimizer of the unwrapped module made, in place, to step the shards instead (its
        state cut alike). Element-wise optimizers only (AdamW, SGD): not Muon or SOAP."""
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if (unit := self._units.get(id(p))) is not None:
                    optimizer.state[unit.shard] = {
                        k: _my_shard(v) if isinstance(v, Tensor) and v.shape == p.shape else v
                        for k, v in optimizer.state.pop(p, {}).items()}
                    group["params"][i] = unit.shard
        return optimizer

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        state, unit_of = optimizer.state_dict(), {id(u.shard): u for u in self._units.values()}
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):  # numbered
            if id(p) in unit_of and i in state["state"]:
                state["state"][i] = {k: unit_of[id(p)].whole(v) if isinstance(v, Tensor) and v.shape
                                     == p.shape else v for k, v in state["state"][i].items()}
        full = self.gather_full_params(model)
        return SimpleNamespace(state_dict=lambda: full), SimpleNamespace(state_dict=lambda: state)

    def unshard(self) -> None:
        """Whole Parameters back in the module, hooks removed: one rank may then run it alone."""
        full = {id(u): nn.Parameter(u.whole(u.shard)) for u in self._units.values()}
        for handle in self._hooks:
            handle.remove()
        for layer, unit in self._layers:  # a tied weight is one Parameter again
            layer.weight = full[id(unit)]


# train.py's --parallel: these wrappers in its loop ------------------------------------------------
def parallelize(name: str, step_model: nn.Module, optimizer: torch.optim.Optimizer,
                bucket_size_mb: float = 25.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`train.py --parallel=ddp|zero1|fsdp`: its LossModel wrapped (ddp: DDPBucketed; zero1: that
    and a ShardedOptimizer; fsdp: FSDP), its optimizer (maybe restored) made to fit. The loop calls
    the wrapper's no_sync, clip_grad_norm (finishing the averaging) and full_state (checkpoints)."""
    if name == "fsdp":
        if type(optimizer).__name__ != "AdamW":
            raise ValueError("--parallel=fsdp steps flat shards of each matrix: use --optimizer="
                             "adamw (Muon and SOAP need whole matrices, which zero1 keeps)")
        config = getattr(step_model, "_orig_mod", step_model).model.config
        if config.positions == "learned" or config.kernels == "triton":  # they read a weight
            raise ValueError("--parallel=fsdp gathers a weight only when its layer runs: learned "
                             "positions and kernels='triton' read one directly; use zero1")
        model = FSDP(getattr(step_model, "_orig_mod", step_model))  # dynamo cannot trace the
        return model, model.shard_optimizer(optimizer)  # gathering hooks: compile is skipped
    if name not in ("ddp", "zero1"):
        raise ValueError(f"parallel={name!r}: expected 'ddp', 'zero1' or 'fsdp'")
    model = DDPBucketed(step_model, bucket_size_mb)
    if name == "zero1":
        sharded = ShardedOptimizer([{**g} for g in optimizer.param_groups], type(optimizer),
                                   **optimizer.defaults)
        sharded.local.state.update({p: optimizer.state[p] for p in sharded.owned[sharded.rank]
                                    if p in optimizer.state})  # restored state: this rank's share
        optimizer = sharded
    return model, optimizer


# Tensor parallelism (Megatron): each rank holds a slice of every block ----------------------------
# A column-parallel linear keeps rows r of W: from the full input it makes its slice of the output.
# A row-parallel linear keeps columns r: from that slice it makes a partial sum of the output, and
# one all-reduce adds the partials. Heads and hidden units are independent, so column then row
# needs nothing in between: one all-reduce per sub-block forward, one (the conjugate) backward.
class _Conjugate(torch.autograd.Function):
    """Forward runs one op, backward its conjugate (None: identity). TP's entry: identity <->
    all-reduce, exit: all-reduce <-> identity; SP's: all-gather <-> reduce-scatter along T."""
    @staticmethod
    def forward(ctx, x: Tensor, op: Callable | None, conjugate: Callable | None) -> Tensor:
        ctx.conjugate = conjugate
        return x if op is None else op(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad if ctx.conjugate is None else ctx.conjugate(grad), None, None


def _all_reduce(x: Tensor) -> Tensor:  # (..., D) partial sums -> their sum, on every rank
    x = x.contiguous()
    dist.all_reduce(x)
    return x


def _all_gather_seq(x: Tensor) -> Tensor:  # (B, T/n, D) on each rank -> (B, T, D)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: Tensor) -> Tensor:  # (B, T, D) partial sums -> (B, T/n, D) of the sum
    out = torch.empty_like(x.chunk(dist.get_world_size(), dim=1)[0])
    dist.reduce_scatter(out, [c.contiguous() for c in x.chunk(dist.get_world_size(), dim=1)])
    return out


def _split_seq(x: Tensor) -> Tensor:  # (B, T, D), the same on every rank -> this rank's T/n
    return x.chunk(dist.get_world_size(), dim=1)[dist.get_rank()].contiguous()


class ColumnParallelLinear(nn.Module):
    """Rows r of a Linear's W: x (..., d_in), the same on every rank -> (..., d_out / n). The
    input enters the sub-block (TensorParallelBlock._enter) once, since q, k and v share it."""
    dim, features = 0, "output features"  # the dimension of W cut (RowParallelLinear: 1)

    def __init__(self, full: nn.Module, sequence_parallel: bool = False) -> None:
        super().__init__()
        n, size = dist.get_world_size(), full.weight.shape[self.dim]
        if size % n:
            raise ValueError(f"{self.features}: {size} does not divide into {n} ranks")
        self.weight = nn.Parameter(full.weight.detach().chunk(n, self.dim)[dist.get_rank()].clone())
        self.sequence_parallel = sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


class RowParallelLinear(ColumnParallelLinear):
    """Columns r of W: x (..., d_in / n) -> (..., d_out), summed over ranks by one all-reduce
    (TP), or by a reduce-scatter that leaves each rank its part of the sequence (SP)."""
    dim, features = 1, "input features"

    def forward(self, x: Tensor) -> Tensor:
        partial = x @ self.weight.T
        if self.sequence_parallel:
            return _Conjugate.apply(partial, _reduce_scatter_seq, _all_gather_seq)
        return _Conjugate.apply(partial, _all_reduce, None)


class TensorParallelBlock(nn.Module):
    """A pre-norm TransformerBlock, its heads and hidden units split across ranks. With
    sequence_parallel the residual stream is cut along the sequence: norms see T/n tokens, no rank
    stores the whole (B, T, D); the entry all-gathers, the exit reduce-scatters (the all-reduce's
    halves: same traffic). The first block splits the sequence, the last gathers it back."""
    def __init__(self, block: nn.Module, sequence_parallel: bool, first: bool, last: bool) -> None:
        super().__init__()
        attn, ffn, n = block.attn, block.ffn, dist.get_world_size()
        if not block.pre_norm or not hasattr(attn, "q_proj") or not hasattr(ffn, "w1"):
            raise ValueError("tensor parallelism needs pre-norm blocks of softmax attention "
                             "and a dense FFN")
        if attn.num_kv_heads % n:
            raise ValueError(f"{attn.num_kv_heads} key-value heads do not divide into {n} ranks")
        attn.num_heads, attn.num_kv_heads = attn.num_heads // n, attn.num_kv_heads // n
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name)))
        attn.output_proj = RowParallelLinear(attn.output_proj, sequence_parallel)
        for name in ("w1", "w3") if hasattr(ffn, "w3") else ("w1",):
            setattr(ffn, name, ColumnParallelLinear(getattr(ffn, name)))
        ffn.w2 = RowParallelLinear(ffn.w2, sequence_parallel)
        self.block, self.sequence_parallel = block, sequence_parallel
        self.first, self.last = first, last

    def _enter(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:
            return _Conjugate.apply(x, _all_gather_seq, _reduce_scatter_seq)
        return _Conjugate.apply(x, None, _all_reduce)

    def forward(self, x: Tensor, rope: tuple | None = None, cache: dict | None = None,
                start: int = 0, defer: bool = False) -> Tensor:  # returns x summed: no defer
        if cache is not None:
            raise ValueError("TensorParallelBlock is for training: no KV cache")
        block = self.block
        if self.sequence_parallel and self.first:
            x = _Conjugate.apply(x, _split_seq, _all_gather_seq)
        x = x + block.attn(self._enter(block.ln1(x)), rope)
        x = x + block.ffn(self._enter(block.ln2(x)))
        if self.sequence_parallel and self.last:
            x = _Conjugate.apply(x, _all_gather_seq, _split_seq)
        return x


def tensor_parallel(model: nn.Module, sequence_parallel: bool = False) -> nn.Module:
    """A TransformerLM, the same on every rank, made tensor-parallel in place (embeddings, final
    norm and head replicated). With sequence_parallel call sync_norm_grads(model) after backward."""
    layers = model.layers
    for i, block in enumerate(layers):
        layers[i] = TensorParallelBlock(block, sequence_parallel, i == 0, i == len(layers) - 1)
    return model


def sync_norm_grads(model: nn.Module) -> None:
    """Sum the blocks' norm gains' gradients: with sequence parallelism each saw T/n tokens."""
    for block in model.layers:
        for p in [*block.block.ln1.parameters(), *block.block.ln2.parameters()]:
            if p.grad is not None:
                dist.all_reduce(p.grad)


# Pipeline parallelism: each rank holds a run of consecutive blocks --------------------------------
# GPipe: the batch is cut into m micro-batches; stage s runs each forward once stage s-1 sends its
# activations, then the backwards in reverse, sending its input's gradient back. Stages idle at the
# start of the forwards and the end of the backwards: with p stages the bubble is (p-1)/(m+p-1).
def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


class PipelineStage(nn.Module):
    """This rank's part of a TransformerLM (untied, RoPE, the same on every rank): the embedding
    on the first stage, an equal run of blocks, the final norm and head on the last."""
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.rank, self.num_stages = dist.get_rank(), dist.get_world_size()
        config, n = model.config, len(model.layers)
        if config.tie_weights or model.rope is None or config.num_experts:
            raise ValueError("PipelineStage needs untied weights, RoPE and no MoE")
        if n % self.num_stages:
            raise ValueError(f"{n} blocks do not divide into {self.num_stages} stages")
        per_stage = n // self.num_stages
        self.first, self.last = self.rank == 0, self.rank == self.num_stages - 1
        self.layers = model.layers[self.rank * per_stage:(self.rank + 1) * per_stage]
        self.rope, self.d_model = model.rope, config.d_model
        self.token_embeddings = model.token_embeddings if self.first else None
        self.ln_final, self.lm_head = (model.ln_final, model.lm_head) if self.last else (None, None)

    def forward(self, x: Tensor, seq_len: int) -> Tensor:
        """Ids (B, T) on the first stage, else activations (B, T, D) -> activations or logits."""
        if self.first:
            x = self.token_embeddings(x)
        rope = self.rope.cos_sin(None, seq_len)
        for layer in self.layers:
            x = layer(x, rope)
        return self.lm_head(self.ln_final(x)) if self.last else x


def gpipe_step(stage: PipelineStage, token_ids: Tensor, targets: Tensor,
               num_microbatches: int) -> tuple[float | None, float]:
    """Forward and backward of one batch (the same on every rank), accumulating the gradients one
    process would; returns (the mean loss on the last stage, else None; the share spent waiting)."""
    start, waited, seq_len = time.perf_counter(), 0.0, token_ids.shape[-1]
    saved, loss_sum = [], 0.0  # each micro-batch's (input, output), for its backward
    micro_ids, micro_targets = token_ids.chunk(num_microbatches), targets.chunk(num_microbatches)

    def receive(shape: tuple, src: int) -> Tensor:
        nonlocal waited
        tensor, begin = torch.empty(shape), time.perf_counter()
        dist.recv(tensor, src=src)
        waited += time.perf_counter() - begin
        return tensor

    for ids, tgt in zip(micro_ids, micro_targets):  # all forwards
        x = ids if stage.first else receive((*ids.shape, stage.d_model), stage.rank - 1)
        x.requires_grad_(not stage.first)
        out = stage(x, seq_len)
        if stage.last:
            loss = nn.functional.cross_entropy(out.flatten(0, 1), tgt.flatten())
            loss_sum += loss.item()
            out = loss / num_microbatches  # the mean over micro-batches is the batch mean
        else:
            dist.send(out.detach(), dst=stage.rank + 1)
        saved.append((x, out))
    for x, out in reversed(saved):  # then all backwards
        out.backward(None if stage.last else receive(out.shape, stage.rank + 1))
        if not stage.first:
            dist.send(x.grad, dst=stage.rank - 1)
    idle = waited / (time.perf_counter() - start)
    return (loss_sum / num_microbatches if stage.last else None), idle


# Accounting: memory per GPU and bytes moved per step ----------------------------------------------
# fp32 AdamW: 4 bytes of weights, 4 of gradient, 8 of moments a parameter (activations left out:
# they depend on batch and recomputation). Per scheme, bytes each GPU keeps whole, and cut n ways:
MEMORY = {"DDP": (16, 0), "ZeRO-1": (4 + 4, 8), "ZeRO-2": (4, 4 + 8), "ZeRO-3/FSDP": (0, 16),
          "TP": (0, 16)}
# Traffic per GPU per step, ring collectives, P parameters of 4 bytes: DDP, ZeRO-1 and ZeRO-2
# all-reduce the gradients, 2 (n-1)/n 4P; ZeRO-3/FSDP all-gathers the weights in forward and in
# backward and reduce-scatters the gradients, 3 (n-1)/n 4P; TP all-reduces the (B, T, D)
# activations twice a block in forward and twice in backward, 4 * 2 (n-1)/n * 4BTD.
EXAMPLES = {
    # CS336 assignment 2's exercise, FFNs only: 126 x 2 x 16,384 x 53,248 = 219,848,638,464
    # parameters, 3,517.6 GB at 16 bytes: DDP, ZeRO-1 (8P = 1,759 GB replicated) and ZeRO-2 (879 GB)
    # never fit 80 GB GPUs; FSDP shards all 16 bytes and needs n >= 44 GPUs just for the states.
    "course": dict(d_model=16384, d_ff=53248, num_layers=126, num_heads=128, ffn="gelu",
                   vocab_size=10000, context_length=512),
}


def accounting(params: int, num_gpus: int, tokens: int = 0, d_model: int = 0,
               num_layers: int = 0) -> dict[str, dict[str, float]]:
    """{scheme: {"memory": bytes per GPU, "traffic": bytes each sends a step}} (TP: needs tokens)"""
    n, ring = num_gpus, (num_gpus - 1) / num_gpus
    traffic = {"DDP": 2 * ring * params * 4, "ZeRO-3/FSDP": 3 * ring * params * 4,
               "TP": num_layers * 4 * 2 * ring * tokens * d_model * 4}
    traffic["ZeRO-1"] = traffic["ZeRO-2"] = traffic["DDP"]
    return {scheme: {"memory": params * (whole + cut / n), "traffic": traffic[scheme]}
            for scheme, (whole, cut) in MEMORY.items()}


def best_buckets(grad_bytes: float, bandwidth: float, call_overhead: float) -> tuple[int, float]:
    """Bucketed DDP's overhead model -> (best number of buckets, the time left after backward): the
    last bucket's transfer s / (n_b w) (s gradient bytes, w algbw) plus every call's fixed cost o,
    n_b o + s / (n_b w), is least at n_b = sqrt(s / (w o)), buckets of sqrt(s w o) bytes."""
    n_b = max(1, round(math.sqrt(grad_bytes / (bandwidth * call_overhead))))
    return n_b, n_b * call_overhead + grad_bytes / (n_b * bandwidth)


def gpus_needed(params: int, scheme: str, gpu_bytes: float) -> int | None:
    """The fewest GPUs whose memory holds the weights and AdamW states; None: no number does."""
    replicated, sharded = MEMORY[scheme]
    room = gpu_bytes - params * replicated
    if room < 0 or (sharded and room <= 0):
        return None
    return max(1, math.ceil(params * sharded / room)) if sharded else 1


# Benchmark: our bucketed DDP against torch's; ZeRO-1 and FSDP memory against the accounting -------
# Each rank also times the bare model alone on its batch. What a wrapper adds to that is the
# communication its overlap did not hide (and its copies): the share is 1 - alone / step.
BENCH_ROWS = {"alone": ("alone (no communication)", "DDP"), "ours": ("DDPBucketed", "DDP"),
              "torch": ("torch DistributedDataParallel", "DDP"), "fsdp": ("FSDP", "ZeRO-3/FSDP"),
              "zero1": ("ZeRO-1 (+ ShardedOptimizer)", "ZeRO-1")}  # (label, accounting's row)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
        logits = model(x)  # (B, T, V)
    nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
    getattr(model, "finish_gradient_synchronization", lambda: None)()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)  # the step ends when the GPU is done


def bench_data_parallel(rank: int, world_size: int, config: ModelConfig, cfg: dict,
                        results: mp.SimpleQueue) -> None:
    """For each of BENCH_ROWS, AdamW steps of TransformerLM(config) as `bench`'s cfg says, on
    random tokens; rank 0 puts {name: (seconds a step, peak bytes a rank; 0 on CPU)} in results."""
    cuda, warmup, steps = torch.cuda.is_available(), cfg["warmup"], cfg["steps"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    x, y = torch.randint(config.vocab_size, (2, cfg["batch_size"], cfg["seq_len"]), device=device)
    adamw, rows = partial(torch.optim.AdamW, lr=1e-5, fused=cuda), {}  # fused: no temporaries
    for name in BENCH_ROWS:
        torch.manual_seed(0)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with device:  # built where it runs: 2B parameters on one CPU thread take minutes
            model = TransformerLM(config)
        if name == "torch":
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[rank] if cuda else None, bucket_cap_mb=cfg["bucket_size_mb"])
        elif name != "alone":  # FSDP gathers bf16 weights on GPUs, as it would train there
            model = FSDP(model, torch.bfloat16 if cuda else None) if name == "fsdp" else \
                DDPBucketed(model, cfg["bucket_size_mb"])
        optimizer = ShardedOptimizer(model.parameters(), adamw) if name == "zero1" else \
            adamw(model.parameters())
        times = []
        for _ in range(warmup + steps):
            begin = time.perf_counter()
            _train_step(model, optimizer, x, y)
            times.append(time.perf_counter() - begin)
        if cfg["trace"]:  # one more step, traced: the all-reduces overlapping backward show
            with torch.profiler.profile() as profiler:
                _train_step(model, optimizer, x, y)
            profiler.export_chrome_trace(os.path.join(cfg["trace"], f"{name}_rank{rank}.json"))
        measured = torch.tensor([sum(times[warmup:]) / steps, torch.cuda.max_memory_allocated(
            device) if cuda else 0], dtype=torch.float64, device=device)
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        rows[name] = tuple(measured.tolist())
        del model, optimizer
        gc.collect()  # now, not later: the wrappers' hooks make cycles that hold the model
    if rank == 0:
        results.put(rows)


def run_bench(cfg: dict, overrides: dict) -> dict[str, tuple[float, float]]:
    """`python ddp.py bench`: spawn the ranks, print the table, return BENCH_ROWS' numbers."""
    gpus = torch.cuda.device_count()
    world_size, most = cfg["world_size"] or gpus or 2, gpus or 16
    if not 1 <= world_size <= most:
        raise UsageError(f"--world_size must be between 1 and {most} "
                         f"({'GPUs here' if gpus else 'CPU processes'}), got {world_size}")
    preset = cfg["preset"] or ("xl" if gpus else "tiny")
    config = _model_config(preset, overrides)
    cfg = {**cfg, "seq_len": cfg["seq_len"] or config.context_length}
    if min(cfg["batch_size"], cfg["seq_len"], cfg["steps"], cfg["bucket_size_mb"]) <= 0 or \
            cfg["warmup"] < 0 or cfg["seq_len"] > config.context_length:
        raise UsageError("need --batch_size, --steps, --bucket_size_mb > 0, --warmup >= 0 and "
                         f"--seq_len <= context_length ({config.context_length})")
    if cfg["trace"]:
        os.makedirs(cfg["trace"], exist_ok=True)
    results = mp.get_context("spawn").SimpleQueue()
    spawn(bench_data_parallel, world_size, config, cfg, results, backend="nccl" if gpus else "gloo")
    rows, params = results.get(), count_params(config)["total"]
    predicted = accounting(params, world_size)
    print(f"{preset}: {params:,} parameters, {world_size} {'GPU' if gpus else 'CPU rank'}(s), "
          f"{cfg['batch_size']} x {cfg['seq_len']} tokens a rank, mean of {cfg['steps']} AdamW "
          f"steps after {cfg['warmup']}; comm = 1 - alone / step\n  {'':<30}{'ms/step':>9}"
          f"{'comm':>6}{'peak GB/rank':>14}{'accounting':>12}")
    for name, (seconds, peak) in rows.items():
        comm = f"{1 - rows['alone'][0] / seconds:.0%}" if name != "alone" else "-"
        print(f"  {BENCH_ROWS[name][0]:<30}{seconds * 1e3:>9.1f}{comm:>6}"
              f"{f'{peak / 1e9:.4g}' if gpus else 'not measured':>14}"
              f"{predicted[BENCH_ROWS[name][1]]['memory'] / 1e9:>12.4g}")
    print("accounting: GB of weights, gradients and AdamW moments; the peak adds activations and "
          "buffers")
    return rows


# Command line: `python ddp.py COMMAND [--key=value ...]` ------------------------------------------
COMMANDS = {
    "collectives": {"world_size": 4},
    "bench_collectives": {"sizes_mb": "1,4,16,64", "world_sizes": "2,4", "repeats": 3},
    "accounting": {"example": "",  # a name from EXAMPLES; else --preset and model fields
                   "preset": "", "num_gpus": 8, "gpu_memory_gb": 80.0,
                   "bandwidth_gbps": 450.0,  # GB/s each GPU sends (H100 NVLink: 450)
                   "call_overhead_us": 50.0,  # fixed cost of one all-reduce call (bucket model)
                   "batch_size": 8, "seq_len": 0,  # tokens for TP's traffic; 0: context length
                   **asdict(ModelConfig())},
    "bench": {"world_size": 0,  # 0: one process per GPU, or 2 on CPU
              "preset": "",  # "": xl on GPUs, tiny on CPU; ModelConfig fields override it
              "batch_size": 4, "seq_len": 0,  # sequences a rank, of seq_len tokens (0: context)
              "bucket_size_mb": 25.0, "warmup": 2, "steps": 5,
              "trace": "",  # a folder: a profiler trace (chrome://tracing) per row and rank
              **asdict(ModelConfig())},
}


def _numbers(key: str, text: str, kind: type) -> list:
    with contextlib.suppress(ValueError):
        if (values := [kind(v) for v in text.split(",") if v.strip()]) and min(values) > 0:
            return values
    raise UsageError(f"--{key} expects positive numbers separated by commas, got {text!r}")


def _model_config(preset: str, overrides: dict) -> ModelConfig:
    """The preset ("": ModelConfig's defaults) with the ModelConfig fields among overrides."""
    fields = {k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__}
    try:
        return ModelConfig.preset(preset, **fields) if preset else ModelConfig(**fields)
    except ValueError as error:
        raise UsageError(str(error)) from None


def print_accounting(cfg: dict, overrides: dict) -> None:
    """`python ddp.py accounting`: the table for --example, or --preset and ModelConfig fields."""
    if cfg["example"] and cfg["example"] not in EXAMPLES:
        raise UsageError(f"unknown --example {cfg['example']!r}; choose from {list(EXAMPLES)}")
    n, gpu_gb, bandwidth_gbps = cfg["num_gpus"], cfg["gpu_memory_gb"], cfg["bandwidth_gbps"]
    if n < 1 or min(gpu_gb, bandwidth_gbps, cfg["call_overhead_us"]) <= 0:
        raise UsageError("need --num_gpus >= 1, and --gpu_memory_gb, --bandwidth_gbps and "
                         "--call_overhead_us > 0")
    config = _model_config("" if cfg["example"] else cfg["preset"],
                           {**EXAMPLES.get(cfg["example"], {}), **overrides})
    counts = count_params(config)
    params, what = counts["total"], cfg["preset"] or "ModelConfig"
    if cfg["example"] == "course":
        params, what = counts["ffn"], "the course's exercise (FFNs only, 126 x 2 x d_model x d_ff)"
    tokens = cfg["batch_size"] * (cfg["seq_len"] or config.context_length)
    print(f"{what}: {params:,} parameters\n{params * 16 / 1e9:,.1f} GB of fp32 weights, "
          f"gradients and AdamW moments (16 bytes a parameter; no activations)\n{n} GPUs of "
          f"{gpu_gb:g} GB, each sending {bandwidth_gbps:g} GB/s; TP's traffic is the activations "
          f"of {tokens:,} tokens\n  {'scheme':<12}{'GB per GPU':>12}{'fits':>6}"
          f"{'GB sent/step':>14}{'comm s/step':>13}{'GPUs to hold':>14}")
    needed = {scheme: gpus_needed(params, scheme, gpu_gb * 1e9) for scheme in MEMORY}
    rows = accounting(params, n, tokens, config.d_model, config.num_layers)
    for scheme, row in rows.items():
        print(f"  {scheme:<12}{row['memory'] / 1e9:>12,.1f}"
              f"{'yes' if row['memory'] <= gpu_gb * 1e9 else 'no':>6}"
              f"{row['traffic'] / 1e9:>14,.2f}{row['traffic'] / (bandwidth_gbps * 1e9):>13.3f}"
              f"{needed[scheme] or 'never':>14}")
    fsdp = needed["ZeRO-3/FSDP"]
    print(f"FSDP: {fsdp} GPU{'s' if fsdp > 1 else ''} of {gpu_gb:g} GB hold{'s' * (fsdp == 1)} "
          f"the states (fewer cannot), {params * 16 / fsdp / 1e9:,.1f} GB each")
    if None in needed.values():
        print("never: what that scheme keeps whole on every GPU is already too big for one")
    if n > 1:  # busbw = algbw x 2(n-1)/n: what a ring's all-reduce reaches
        algbw, call = bandwidth_gbps * 1e9 * n / (2 * (n - 1)), cfg["call_overhead_us"] * 1e-6
        n_b, overhead = best_buckets(4 * params, algbw, call)
        print(f"bucketed DDP: overhead = n_b o + s / (n_b w), o = {cfg['call_overhead_us']:g} us a "
              f"call\n  {n_b} buckets of {4 * params / n_b / 2**20:,.0f} MB leave "
              f"{overhead * 1e3:,.2f} ms after backward; one bucket would leave "
              f"{(call + 4 * params / algbw) * 1e3:,.2f} ms")


def main(argv: list[str]) -> dict | None:
    """`python ddp.py [COMMAND] [--key=value ...]`; no command shows the collectives."""
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, cfg, overrides, _ = parse_command(argv, COMMANDS, "collectives")
    if command == "collectives":
        if not 1 <= cfg["world_size"] <= 16:
            raise UsageError(f"--world_size must be between 1 and 16, got {cfg['world_size']}")
        spawn(show_collectives, cfg["world_size"], True)
    elif command == "bench_collectives":
        sizes = _numbers("sizes_mb", cfg["sizes_mb"], float)
        world_sizes = _numbers("world_sizes", cfg["world_sizes"], int)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and max(world_sizes) > torch.cuda.device_count():
            raise UsageError(f"--world_sizes: only {torch.cuda.device_count()} GPUs here")
        if cfg["repeats"] < 1:
            raise UsageError(f"--repeats must be >= 1, got {cfg['repeats']}")
        print(f"all-reduce of fp32 tensors, mean of {cfg['repeats']} calls; algbw = size / time, "
              "busbw = algbw x 2(n-1)/n (what each link of a ring carries)")
        for world_size in world_sizes:
            spawn(bench_all_reduce, world_size, sizes, cfg["repeats"], backend, backend=backend)
    elif command == "bench":
        return run_bench(cfg, overrides)
    else:
        print_accounting(cfg, overrides)


if __name__ == "__main__":
    run_cli(main)
