"""Stage 7: scaling laws, predicting from small runs the best model and its loss at a big budget.

CS336 lectures 9 and 11 and assignment 3, in teaching order: the napkin math of training (FLOPs,
parameters, days on a cluster, tokens per parameter); the model shapes that spend a budget; then
Hoffmann et al.'s three ways to the compute-optimal size N_opt and token count D_opt: approach 2
(IsoFLOPs: a parabola per budget, power laws through the minima), approach 3 (L(N, D) = E + A/N^a
+ B/D^b, fitted with a Huber loss and L-BFGS) and approach 1 (the envelope of training curves);
Kaplan et al.'s forms on the same runs, and why their allocation differs; last, a sweep of our own
model within a hard FLOPs budget, as assignment 3 frames it: runs chosen and priced before any
runs, resumable, fitted, predicting the best shape, N, D and loss at --target, and checked there.

Learning rate and batch size decide whether a sweep means anything: a size trained at a rate that
suits another size loses for the wrong reason and bends the parabola. Under the standard
parametrisation the best AdamW rate falls as models widen (roughly as 1 / d_model for hidden
matrices), so it is swept per scale (--lrs), and the best batch grows as the loss falls (the
critical batch size). muP (Yang et al. 2022) scales each layer's initialisation and rate with
width so that one rate, tuned on the smallest model, is best at every width: one --lr suffices.

Commands (CPU, seconds; a runs file is a JSON list of {parameters, compute_budget, final_loss} or a
CSV with those columns; settings as --key=value; --plot=DIR writes PNGs if matplotlib is there):
    python scaling.py                          # the tour on the course's 72 runs
    python scaling.py fit RUNS --budgets=1e23,1e24 --plot=plots
    python scaling.py demo --noise=0.002       # runs from a known law: every method recovers it
    python scaling.py napkin --params=70e9 --tokens=15e12 --gpus=1024 --mfu=0.5
    python scaling.py shapes --budget=1e19 --min_params=2e7 --max_params=5e8
    python scaling.py envelope out/a out/b out/c:1.2e7  # approach 1 from train.py's run folders
    python scaling.py sweep --target=1e17 --budget=2e16 --runs=sweep/runs.json --lrs=1e-3,3e-3 \
        --batch_sizes=16,32 --dataset=pycode --jobs=2 --check=True  # any train.py setting too
Reads   a runs file (default ../shared/data/isoflops_curves.json), run folders (metrics.jsonl;
        ckpt.pt for the shape, or DIR:N with N parameters); sweep: train.py's data settings.
Writes  --plot: DIR/isoflops.png, power_laws.png, loss_surface.png, envelope.png; sweep: the runs
        file, a row per finished run, a train.py out_dir per run beside it; RUNS-check.json.
Papers  Kaplan et al. 2020 (Scaling Laws for Neural Language Models); Hoffmann et al. 2022
        (Chinchilla); Besiroglu et al. 2024 (Chinchilla Scaling: A replication attempt); Pearce
        & Song 2024, Porian et al. 2024 (reconciling Kaplan and Chinchilla); Sardana et al. 2024.
"""

import csv
import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import ModelConfig, count_params, flops_per_token
import train  # the sweep calls train.train (a test replaces it)
from tokenizer import DATA_DIR, Tokenizer, UsageError, parse_command, run_cli, write_atomic
from train import (PEAK_BF16_FLOPS, TrainConfig, build_model_config, check_config, option_defaults,
                   prepare_data, read_checkpoint, with_overrides)

COURSE_RUNS = DATA_DIR / "isoflops_curves.json"  # CS336 assignment 3's 72 runs, 9 budgets
TOKENS_PER_PARAM = 20  # Hoffmann et al.'s rule of thumb for the compute-optimal D / N
SECONDS_PER_DAY = 86_400


# Napkin math: FLOPs, parameters and days, before any fitting --------------------------------------
def training_flops(params: float, tokens: float) -> float:
    """6 N D: 2 FLOPs per multiply-add, forward once and backward twice, per parameter per token."""
    return 6.0 * params * tokens


def training_flops_exact(config: ModelConfig, tokens: float) -> float:
    """model.py's count, attention's T x T and the output head included, over all tokens."""
    return flops_per_token(config, config.context_length)["train"] * tokens


def non_embedding_params_approx(num_layers: int, d_model: int) -> float:
    """12 L d^2: attention's four d x d matrices and an FFN of 8 d^2 (4d GELU or 8/3 d SwiGLU)."""
    return 12.0 * num_layers * d_model**2


def non_embedding_params(config: ModelConfig) -> int:
    """The exact count without the lookup tables and output head (Kaplan et al.'s N)."""
    counts = count_params(config)
    return counts["total"] - counts["token_embeddings"] - counts["position_embeddings"] \
        - counts["lm_head"]


def training_days(params: float, tokens: float, gpus: int, mfu: float,
                  peak_flops: float = PEAK_BF16_FLOPS["H100"]) -> float:
    """Wall-clock days: 6 N D over the FLOP/s the cluster really delivers (MFU x peak x GPUs)."""
    return training_flops(params, tokens) / (gpus * mfu * peak_flops) / SECONDS_PER_DAY


def lifetime_flops(params: float, train_tokens: float, inference_tokens: float) -> float:
    """Training plus serving (2 N per generated token): what "20 tokens per parameter" ignores.
    A model served on many tokens is cheaper overall when smaller and trained longer."""
    return training_flops(params, train_tokens) + 2.0 * params * inference_tokens


# The issue's example, as a fact: Llama-3-70B-sized training on 1,024 H100s takes about 144 days.
assert round(training_days(70e9, 15e12, 1024, 0.5)) == 144


# Shapes for a budget: which models spend C FLOPs, and on how many tokens --------------------------
@dataclass
class ShapeFamily:
    aspect_ratio: int = 64  # d_model / num_layers; Kaplan et al.: loss is flat over ~20-200
    head_dim: int = 64  # num_heads = d_model / head_dim
    vocab_size: int = 32000  # embeddings count in N, as in the course's runs and Chinchilla
    context_length: int = 512


def shape(num_layers: int, family: ShapeFamily) -> ModelConfig:
    """A model of the family: d_model from the aspect ratio (a whole number of heads) and the
    SwiGLU width d_ff = 8/3 d_model rounded to a multiple of 64 (for matmul-friendly tiles)."""
    d_model = max(1, round(family.aspect_ratio * num_layers / family.head_dim)) * family.head_dim
    d_ff = max(64, round(8 * d_model / 3 / 64) * 64)
    return ModelConfig(vocab_size=family.vocab_size, context_length=family.context_length,
                       d_model=d_model, num_layers=num_layers,
                       num_heads=d_model // family.head_dim, d_ff=d_ff)


def shapes_for_budget(budget: float, min_params: float, max_params: float,
                      family: ShapeFamily = ShapeFamily()) -> list[tuple[ModelConfig, int, float]]:
    """(config, N, tokens D = C / 6N) for every depth whose model has min <= N <= max."""
    if not 0 < min_params <= max_params or budget <= 0:
        raise UsageError(f"need budget > 0 and 0 < min_params <= max_params, got {budget:g}, "
                         f"{min_params:g}, {max_params:g}")
    found = []
    for num_layers in range(1, 257):
        config = shape(num_layers, family)
        params = count_params(config)["total"]
        if params > max_params:
            break
        if params >= min_params:
            found.append((config, params, budget / (6.0 * params)))
    return found


# Runs: the file the fits read, checked row by row -------------------------------------------------
@dataclass
class Runs:
    """One row per training run: parameters N, compute budget C and final loss L."""
    N: np.ndarray
    C: np.ndarray
    L: np.ndarray
    source: str = "runs"

    @property
    def D(self) -> np.ndarray:  # tokens seen, from C = 6 N D
        return self.C / (6.0 * self.N)


COLUMNS = ("parameters", "compute_budget", "final_loss")


def load_runs(path: str | Path) -> Runs:
    """A JSON list of {parameters, compute_budget, final_loss}, or a CSV with those columns."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"runs file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e}); expected a list of runs") from None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"{path}: expected a non-empty list of runs with {', '.join(COLUMNS)}")
    values = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or any(key not in row for key in COLUMNS):
            raise UsageError(f"{path}: run {i} needs {', '.join(COLUMNS)}, got {row!r}")
        try:
            numbers = [float(row[key]) for key in COLUMNS]
        except (TypeError, ValueError):
            raise UsageError(f"{path}: run {i} has a value that is not a number: {row!r}") from None
        if not all(math.isfinite(v) and v > 0 for v in numbers):
            raise UsageError(f"{path}: run {i} needs positive finite values, got {row!r}")
        values.append(numbers)
    N, C, L = np.array(values).T
    return Runs(N, C, L, str(path))


# IsoFLOPs: Chinchilla's approach 2 ----------------------------------------------------------------
# At each budget, sweep N (so D = C / 6N); the loss is a valley in log N. Its minimum is the best
# size for that budget. A power law through the minima then extrapolates to budgets never run.
@dataclass
class IsoFlopsPoint:
    budget: float
    runs: int
    best_run_N: float  # the lowest-loss run: robust, but only as fine as the sizes tried
    N_opt: float  # the minimum of a parabola in log N: between the sizes tried
    loss_opt: float
    parabola: np.ndarray  # loss = p[0] x^2 + p[1] x + p[2], x = ln N
    warning: str = ""


def fit_parabola(log_N: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Least-squares parabola in x = ln N, and its vertex (ln N_opt, the loss there); NaNs when it
    has no minimum (it opens downward: the loss does not turn up on both sides)."""
    p = np.polyfit(log_N, loss, 2)
    if p[0] <= 0:
        return p, math.nan, math.nan
    x = -p[1] / (2 * p[0])
    return p, x, float(np.polyval(p, x))


def isoflops_points(runs: Runs) -> list[IsoFlopsPoint]:
    """The optimum per budget, as the lowest-loss run and as the parabola's vertex; a warning when
    the optimum sits at the edge of the sizes tried (the vertex is then an extrapolation)."""
    points = []
    for budget in np.unique(runs.C):
        at = runs.C == budget
        N, L = runs.N[at], runs.L[at]
        if len(np.unique(N)) < 3:
            raise UsageError(f"{runs.source}: budget {budget:.3g} has {len(np.unique(N))} "
                             f"distinct model sizes; a parabola needs at least 3")
        p, x, loss = fit_parabola(np.log(N), L)
        if math.isnan(x):
            raise UsageError(f"{runs.source}: budget {budget:.3g}: the loss has no minimum over "
                             f"the sizes tried (the parabola opens downward)")
        best = N[np.argmin(L)]
        warning = ""
        if best in (N.min(), N.max()) or not N.min() <= math.exp(x) <= N.max():
            warning = (f"budget {budget:.3g}: the optimum is at the edge of the sizes tried "
                       f"({N.min():.3g} to {N.max():.3g}); N_opt there is an extrapolation")
        points.append(IsoFlopsPoint(float(budget), int(at.sum()), float(best), math.exp(x), loss,
                                    p, warning))
    return points


def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = k x^a by least squares on ln y = ln k + a ln x; returns (k, a)."""
    a, ln_k = np.polyfit(np.log(x), np.log(y), 1)
    return math.exp(ln_k), float(a)


@dataclass
class PowerLaws:
    """N_opt = k_N C^a, D_opt = C / (6 N_opt) = k_D C^(1-a), loss_opt = k_L C^c."""
    k_N: float
    a: float
    k_L: float
    c: float

    def predict(self, budget: float) -> dict[str, float]:
        N = self.k_N * budget**self.a
        return {"N": N, "D": budget / (6 * N), "loss": self.k_L * budget**self.c}


def fit_approach2(points: list[IsoFlopsPoint]) -> PowerLaws:
    C = np.array([p.budget for p in points])
    k_N, a = fit_power_law(C, np.array([p.N_opt for p in points]))
    k_L, c = fit_power_law(C, np.array([p.loss_opt for p in points]))
    return PowerLaws(k_N, a, k_L, c)


def bootstrap_approach2(runs: Runs, budgets: list[float], samples: int = 200, seed: int = 0,
                        level: float = 0.95) -> dict[float, dict[str, tuple[float, float]]]:
    """A (low, high) interval per prediction: refit on runs resampled with replacement within
    each budget. Resamples with no valley (fewer than 3 sizes, a downward parabola) are skipped."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(runs.C == b) for b in np.unique(runs.C)]
    predictions = {b: {"N": [], "D": [], "loss": []} for b in budgets}
    for _ in range(samples):
        index = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
        try:
            laws = fit_approach2(isoflops_points(Runs(runs.N[index], runs.C[index],
                                                      runs.L[index])))
        except UsageError:
            continue
        for b in budgets:
            for key, value in laws.predict(b).items():
                predictions[b][key].append(value)
    tail = 100 * (1 - level) / 2
    return {b: {key: tuple(np.percentile(v, [tail, 100 - tail])) if v else (math.nan, math.nan)
                for key, v in by_key.items()} for b, by_key in predictions.items()}


# Approach 3: one loss surface L(N, D) = E + A / N^alpha + B / D^beta ------------------------------
# Fitted as Hoffmann et al. do: log loss, so every run weighs the same; a Huber loss (delta 1e-3),
# so a few bad runs do not drag the fit; L-BFGS from a grid of starts, as the surface is not convex.
# To keep it fast the whole grid is scored at once and L-BFGS starts from its best few points.
@dataclass
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        return self.E + self.A / np.asarray(N, float)**self.alpha \
            + self.B / np.asarray(D, float)**self.beta

    def frontier(self, budget: float) -> dict[str, float]:
        """The compute-optimal (N, D) under C = 6 N D in closed form: setting the derivative of
        A N^-alpha + B (C/6N)^-beta to zero gives N_opt = G (C/6)^(beta/(alpha+beta)), D_opt =
        (C/6) / N_opt, G = (alpha A / (beta B))^(1/(alpha+beta))."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        N = G * (budget / 6) ** (self.beta / (self.alpha + self.beta))
        D = budget / (6 * N)
        return {"N": N, "D": D, "loss": float(self.loss(N, D))}

    @property
    def a(self) -> float:  # N_opt ~ C^a
        return self.beta / (self.alpha + self.beta)


def _chinchilla_log_loss(theta: torch.Tensor, log_N: torch.Tensor, log_D: torch.Tensor
                         ) -> torch.Tensor:
    """ln L for parameters theta (..., 5) = (ln E, ln A, ln B, alpha, beta), as a log-sum-exp."""
    e, a, b, alpha, beta = theta.unbind(-1)
    terms = [a[..., None] - alpha[..., None] * log_N, b[..., None] - beta[..., None] * log_D,
             e[..., None].expand(*e.shape, log_N.shape[-1])]
    return torch.logsumexp(torch.stack(terms), dim=0)


def _huber(residual: torch.Tensor, delta: float) -> torch.Tensor:
    small = residual.abs() <= delta
    return torch.where(small, 0.5 * residual**2, delta * (residual.abs() - 0.5 * delta)).sum(-1)


def fit_with_lbfgs(model_log_loss: Callable[[torch.Tensor], torch.Tensor], grid: torch.Tensor,
                   log_loss: torch.Tensor, delta: float = 1e-3, starts: int = 4) -> torch.Tensor:
    """The Huber fit of ln L: score every grid row, run L-BFGS from the best `starts` of them,
    return the parameters with the lowest objective. Deterministic: no randomness anywhere."""
    scores = _huber(model_log_loss(grid) - log_loss, delta)
    best, best_value = None, math.inf
    for i in torch.argsort(scores)[:starts].tolist():
        theta = grid[i].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = _huber(model_log_loss(theta) - log_loss, delta)
            value.backward()
            return value
        opt.step(closure)
        with torch.no_grad():
            value = _huber(model_log_loss(theta) - log_loss, delta).item()
        if math.isfinite(value) and value < best_value:
            best, best_value = theta.detach(), value
    return best


def fit_approach3(runs: Runs, delta: float = 1e-3) -> LossLaw:
    """Hoffmann et al.'s grid: alpha, beta in 0..2, ln E in -1..1.5, ln A, ln B in 0..25."""
    log_N, log_D, log_L = (torch.tensor(np.log(x), dtype=torch.float64)
                           for x in (runs.N, runs.D, runs.L))
    axes = [torch.arange(-1.0, 1.51, 0.5), torch.arange(0.0, 25.1, 5.0),
            torch.arange(0.0, 25.1, 5.0), *[torch.arange(0.0, 2.01, 0.5)] * 2]
    grid = torch.cartesian_prod(*axes).to(torch.float64)
    theta = fit_with_lbfgs(lambda t: _chinchilla_log_loss(t, log_N, log_D), grid, log_L, delta)
    e, a, b, alpha, beta = theta.tolist()
    return LossLaw(math.exp(e), math.exp(a), math.exp(b), alpha, beta)


# Approach 1: the envelope of training curves ------------------------------------------------------
# Every run's curve of loss against FLOPs spent so far; at each FLOPs value the lowest loss over all
# runs, and which N reached it. Fit N_opt = k C^a through those. (Hoffmann et al. trained each size
# with several cosine lengths; one run per size puts a mid-run point off its schedule's optimum.)
def load_curve(run_dir: str | Path, params: float = 0.0) -> tuple[float, np.ndarray, np.ndarray]:
    """(N, FLOPs, loss) of a train.py run folder: metrics.jsonl rows with tokens and loss; FLOPs
    exact from ckpt.pt's model config, or 6 N tokens when params (N) is given."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{run_dir}: no metrics.jsonl (a train.py out_dir has one)")
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UsageError(f"{metrics}: a line is not JSON ({e})") from None
    rows = [r for r in rows if "loss" in r and r.get("tokens", 0) > 0]
    if not rows:
        raise UsageError(f"{metrics}: no rows with tokens > 0 and a training loss")
    tokens, loss = np.array([[r["tokens"], r["loss"]] for r in rows], dtype=float).T
    if params > 0:
        return params, training_flops(params, tokens), loss
    config = ModelConfig(**read_checkpoint(run_dir / "ckpt.pt")["model_config"])
    return float(count_params(config)["total"]), training_flops_exact(config, tokens), loss


def envelope(curves: list[tuple[float, np.ndarray, np.ndarray]], points: int = 40
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, N at the minimum, minimum loss) on a log-spaced FLOPs grid; each curve is interpolated
    in log FLOPs between its logged points. A point is kept only where the winner is neither the
    smallest nor the largest size whose curve reaches it: otherwise the best size may lie beyond
    the sizes run, and the point would pull the fitted exponent toward the edge."""
    if len({N for N, _, _ in curves}) < 3:
        raise UsageError("the envelope needs runs of at least three model sizes")
    low = np.log(min(f.min() for _, f, _ in curves))
    high = np.log(max(f.max() for _, f, _ in curves))
    grid = np.linspace(low, high, points)
    losses = np.full((len(curves), points), np.inf)
    for i, (_, flops, loss) in enumerate(curves):
        order = np.argsort(flops)
        inside = (grid >= np.log(flops.min())) & (grid <= np.log(flops.max()))
        losses[i, inside] = np.interp(grid[inside], np.log(flops[order]), loss[order])
    sizes = np.array([N for N, _, _ in curves], dtype=float)
    reached = np.isfinite(losses)  # (runs, points)
    winner = sizes[np.argmin(losses, axis=0)]
    keep = (winner > np.where(reached, sizes[:, None], np.inf).min(0)) & \
        (winner < np.where(reached, sizes[:, None], -np.inf).max(0))
    return np.exp(grid[keep]), winner[keep], losses.min(0)[keep]


def fit_approach1(curves: list[tuple[float, np.ndarray, np.ndarray]]) -> tuple[float, float]:
    C, N, _ = envelope(curves)
    if len(np.unique(N)) < 2:
        raise UsageError("fewer than two inner model sizes win on the envelope: add runs of "
                         "more sizes, or longer ones")
    return fit_power_law(C, N)


# Kaplan et al. 2020: the laws before Chinchilla ---------------------------------------------------
# L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D; as D -> inf it is L(N) =
# (N_c / N)^alpha_N, as N -> inf L(D) = (D_c / D)^alpha_D. No irreducible term E: every gain is a
# power law all the way down. Fitted here like approach 3, on ln L with a Huber loss.
@dataclass
class KaplanLaw:
    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float

    def loss(self, N, D):
        return ((self.N_c / np.asarray(N, float)) ** (self.alpha_N / self.alpha_D)
                + self.D_c / np.asarray(D, float)) ** self.alpha_D

    @property
    def a(self) -> float:
        """N_opt ~ C^a under C = 6 N D: minimising (N_c/N)^p + 6 D_c N / C (p = alpha_N/alpha_D)
        gives N^(p+1) ~ C, so a = 1/(p+1) = alpha_D / (alpha_N + alpha_D)."""
        return self.alpha_D / (self.alpha_N + self.alpha_D)


def fit_kaplan(runs: Runs, delta: float = 1e-3) -> KaplanLaw:
    log_N, log_D, log_L = (torch.tensor(np.log(x), dtype=torch.float64)
                           for x in (runs.N, runs.D, runs.L))

    def log_loss(theta: torch.Tensor) -> torch.Tensor:  # theta = (ln N_c, ln D_c, a_N, a_D)
        n_c, d_c, a_n, a_d = (t[..., None] for t in theta.unbind(-1))
        inner = torch.logaddexp(a_n / a_d * (n_c - log_N), d_c - log_D)
        return a_d * inner
    # Kaplan et al. found N_c ~ 9e13, D_c ~ 5e13 and exponents near 0.08: the grid spans that
    axes = [torch.arange(10.0, 40.1, 5.0), torch.arange(10.0, 40.1, 5.0),
            *[torch.tensor([0.03, 0.1, 0.3, 0.6])] * 2]
    grid = torch.cartesian_prod(*axes).to(torch.float64)
    theta = fit_with_lbfgs(log_loss, grid, log_L, delta)
    n_c, d_c, a_n, a_d = theta.tolist()
    return KaplanLaw(math.exp(n_c), math.exp(d_c), a_n, a_d)


KAPLAN_PAPER_A = 0.73  # Kaplan et al.'s N_opt ~ C^0.73; Hoffmann et al. found ~0.50


def why_kaplan_differs(laws: PowerLaws, kaplan_fit: KaplanLaw, budget: float) -> str:
    """The two allocations, with numbers, and the reasons the literature gives for the gap."""
    ours, chinchilla_a = laws.predict(budget), laws.a
    ratio = 1e3 ** (KAPLAN_PAPER_A - chinchilla_a)
    return "\n".join([
        f"Why Kaplan and Chinchilla allocate differently: Kaplan et al. put N_opt ~ C^"
        f"{KAPLAN_PAPER_A}, D_opt ~ C^{1 - KAPLAN_PAPER_A:.2f};",
        f"  these runs say N_opt ~ C^{chinchilla_a:.2f} (Chinchilla: 0.50). Over 1,000x more "
        f"compute, Kaplan's rule grows",
        f"  the model {ratio:.1f}x more than ours; at {budget:.0e} FLOPs ours trains "
        f"{ours['N']:.3g} parameters on {ours['D'] / ours['N']:.1f} tokens each.",
        f"  Kaplan's own L(N, D) form fitted to these runs gives a = alpha_D / (alpha_N + alpha_D) "
        f"= {kaplan_fit.a:.2f},",
        "  nearer ours than 0.73: the form is not the main cause. The causes (Hoffmann et al.;",
        "  Pearce & Song 2024; Porian et al. 2024): one learning-rate schedule length for every",
        "  token count (a run stopped mid-schedule makes more data look less useful);",
        "  non-embedding parameters and the head's FLOPs left out (which bends the law at the",
        "  small sizes fitted); and mostly models below 100M parameters."])


# Showing the fits: tables, and plots when matplotlib is there -------------------------------------
def print_isoflops(points: list[IsoFlopsPoint]) -> None:
    print(f"{'budget C':>10} {'runs':>5} {'best run N':>12} {'parabola N':>12} {'D = C/6N':>12} "
          f"{'D/N':>6} {'loss':>7}")
    for p in points:
        D = p.budget / (6 * p.N_opt)
        print(f"{p.budget:10.2e} {p.runs:5d} {p.best_run_N:12.4g} {p.N_opt:12.4g} {D:12.4g} "
              f"{D / p.N_opt:6.1f} {p.loss_opt:7.4f}")
    for p in points:
        if p.warning:
            print(f"warning: {p.warning}", file=sys.stderr)


def fit_report(runs: Runs, budgets: list[float], samples: int = 200, seed: int = 0,
               plot_dir: str = "") -> dict:
    """Every fit on one runs file, printed; returns the numbers (the tests pin them)."""
    points = isoflops_points(runs)
    print(f"\nIsoFLOPs (approach 2) on {runs.source}: {len(runs.N)} runs, {len(points)} budgets")
    print_isoflops(points)
    laws = fit_approach2(points)
    best_run_a = fit_power_law(np.array([p.budget for p in points]),
                               np.array([p.best_run_N for p in points]))[1]
    print(f"\nN_opt = {laws.k_N:.4g} C^{laws.a:.4f}   D_opt = C / 6 N_opt = "
          f"{1 / (6 * laws.k_N):.4g} C^{1 - laws.a:.4f}   loss_opt = {laws.k_L:.4g} C^{laws.c:.4f}"
          f"\n(through the lowest-loss runs instead of the parabolas: a = {best_run_a:.4f})")
    law3 = fit_approach3(runs)
    print(f"\napproach 3: L(N, D) = {law3.E:.4g} + {law3.A:.4g} / N^{law3.alpha:.4f} + "
          f"{law3.B:.4g} / D^{law3.beta:.4f}   ->   N_opt ~ C^{law3.a:.4f}")
    intervals = bootstrap_approach2(runs, budgets, samples, seed)
    print(f"\npredictions: approach 2 with a 95% interval from {samples} bootstrap resamples "
          f"of the runs;\n{'':13}approach 3's frontier")
    result = {"approach2": laws, "approach3": law3, "points": points, "predictions": {}}
    for b in budgets:
        two, three, ci = laws.predict(b), law3.frontier(b), intervals[b]
        result["predictions"][b] = {"approach2": two, "approach3": three, "interval": ci}
        print(f"  C = {b:.0e}: N_opt {two['N']:.3g} [{ci['N'][0]:.3g}, {ci['N'][1]:.3g}]  "
              f"D_opt {two['D']:.3g} [{ci['D'][0]:.3g}, {ci['D'][1]:.3g}]\n{'':13}loss "
              f"{two['loss']:.3f} [{ci['loss'][0]:.3f}, {ci['loss'][1]:.3f}]\n{'':11}approach 3:"
              f" N_opt {three['N']:.3g}  D_opt {three['D']:.3g}  loss {three['loss']:.3f}")
    print("  (approach 2's loss is a pure power law through the minima, with no floor E: it falls "
          "faster\n  than approach 3's, which levels off at E)")
    kaplan = fit_kaplan(runs)
    result["kaplan"] = kaplan
    print(f"\nKaplan et al. 2020 on the same runs: L(N, D) = [({kaplan.N_c:.3g}/N)^"
          f"{kaplan.alpha_N / kaplan.alpha_D:.3f} + {kaplan.D_c:.3g}/D]^{kaplan.alpha_D:.4f},\n"
          f"  so L(N) = ({kaplan.N_c:.3g}/N)^{kaplan.alpha_N:.4f} and L(D) = ({kaplan.D_c:.3g}/D)^"
          f"{kaplan.alpha_D:.4f}")
    print(why_kaplan_differs(laws, kaplan, max(budgets)))
    if plot_dir:
        plot_fits(runs, points, laws, plot_dir, max(budgets))
        plot_surface(runs, law3, plot_dir)
    return result


def _pyplot(out_dir: str | Path):
    """matplotlib's pyplot, drawing to files only, and the folder made for them."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib); "
                         "the tables above have the same numbers") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return plt, Path(out_dir)


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {path}")
    return path


def plot_fits(runs: Runs, points: list[IsoFlopsPoint], laws: PowerLaws, out_dir: str | Path,
              up_to: float = 1e24) -> list[Path]:
    """isoflops.png: loss against N per budget with its parabola; power_laws.png: N_opt and D_opt
    against C, the fitted laws extrapolated to `up_to`."""
    plt, out = _pyplot(out_dir)
    fig, ax = plt.subplots(figsize=(7, 5))
    for p, color in zip(points, plt.cm.viridis(np.linspace(0, 1, len(points)))):
        at = runs.C == p.budget
        ax.scatter(runs.N[at], runs.L[at], color=color, s=12, label=f"{p.budget:.0e}")
        x = np.linspace(np.log(runs.N[at].min()), np.log(runs.N[at].max()), 100)
        ax.plot(np.exp(x), np.polyval(p.parabola, x), color=color, lw=1)
        ax.scatter([p.N_opt], [p.loss_opt], color=color, marker="x", s=40)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOPs profiles")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels at powers of ten only
    ax.legend(title="FLOPs", fontsize=7)
    paths = [_save(plt, fig, out / "isoflops.png")]
    fig2, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    C = np.array([p.budget for p in points])
    N = np.array([p.N_opt for p in points])
    grid = np.logspace(np.log10(C.min()), np.log10(up_to), 50)
    for ax, name, data, fitted in ((axes[0], "N_opt", N, laws.k_N * grid**laws.a),
                                   (axes[1], "D_opt", C / (6 * N), grid / (6 * laws.k_N
                                                                          * grid**laws.a))):
        ax.scatter(C, data, color="C0", label="parabola minima")
        ax.plot(grid, fitted, color="C1", label="power law")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name)
        ax.legend()
    return paths + [_save(plt, fig2, out / "power_laws.png")]


def plot_surface(runs: Runs, law: LossLaw, out_dir: str | Path) -> Path:
    """loss_surface.png: approach 3's L(N, D) as contours over the runs, the IsoFLOP lines
    through them and the compute-optimal frontier the law puts across the lines."""
    plt, out = _pyplot(out_dir)
    log_N = np.linspace(np.log10(runs.N.min()) - 1, np.log10(runs.N.max()) + 1, 120)
    log_D = np.linspace(np.log10(runs.D.min()) - 1, np.log10(runs.D.max()) + 1, 120)
    grid_N, grid_D = np.meshgrid(10**log_N, 10**log_D)
    fig, ax = plt.subplots(figsize=(7, 5))
    levels = ax.contourf(grid_N, grid_D, law.loss(grid_N, grid_D), levels=30, cmap="viridis")
    fig.colorbar(levels, label="L(N, D)")
    for budget in np.unique(runs.C):
        ax.plot(10**log_N, budget / (6 * 10**log_N), color="white", lw=0.5)
    frontier = [law.frontier(c) for c in np.logspace(np.log10(runs.C.min()) - 1,
                                                     np.log10(runs.C.max()) + 1, 30)]
    ax.plot([f["N"] for f in frontier], [f["D"] for f in frontier], color="red",
            label="compute-optimal (N, D)")
    ax.scatter(runs.N, runs.D, c="black", s=10, label="runs")
    ax.set(xscale="log", yscale="log", xlim=(10**log_N[0], 10**log_N[-1]),
           ylim=(10**log_D[0], 10**log_D[-1]), xlabel="parameters N", ylabel="tokens D",
           title="approach 3: the fitted loss surface")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "loss_surface.png")


def plot_envelope(curves: list[tuple[float, np.ndarray, np.ndarray]], out_dir: str | Path
                  ) -> Path:
    """envelope.png: every run's loss against FLOPs spent, and the envelope approach 1 fits."""
    plt, out = _pyplot(out_dir)
    fig, ax = plt.subplots(figsize=(7, 5))
    sizes = sorted({N for N, _, _ in curves})
    colors = dict(zip(sizes, plt.cm.viridis(np.linspace(0, 1, len(sizes)))))
    for N, flops, loss in curves:
        ax.plot(flops, loss, color=colors[N], lw=1, label=f"N {N:.3g}")
    C, _, loss = envelope(curves)
    ax.scatter(C, loss, color="red", s=12, zorder=3, label="envelope (inner sizes)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="training loss",
           title="approach 1: the envelope of training curves")
    return _save(plt, fig, out / "envelope.png")


# Synthetic runs from a known law: the check that every method recovers what it should -------------
CHINCHILLA = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fit


def synthetic_runs(law: LossLaw = CHINCHILLA, budgets: tuple = (1e18, 3e18, 1e19, 3e19, 1e20,
                   3e20, 1e21), sizes: int = 9, noise: float = 0.0, seed: int = 0) -> Runs:
    """IsoFLOPs runs: per budget, `sizes` models evenly in log N over a factor of 100 around the
    law's optimum, loss times exp(noise x normal). The parabola's vertex is biased (the valley is
    not symmetric in ln N), but by the same factor at every budget, so the exponent is not; sizes
    centred on a guess that drifts from the optimum (say 0.1 C^0.5) would bias the exponent too."""
    rng = np.random.default_rng(seed)
    N = np.concatenate([law.frontier(b)["N"] * np.logspace(-1, 1, sizes) for b in budgets])
    C = np.repeat(np.array(budgets, float), sizes)
    L = law.loss(N, C / (6 * N)) * np.exp(noise * rng.standard_normal(len(N)))
    return Runs(N, C, L, "synthetic runs")


def synthetic_curves(law: LossLaw = CHINCHILLA, sizes: tuple = tuple(np.logspace(7, 10, 25)),
                     max_tokens: float = 1e12) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Training curves read off the law: the loss after D tokens of a schedule as long as D
    (what one run per length would log; a single long run is above it mid-schedule)."""
    tokens = np.logspace(7, np.log10(max_tokens), 60)
    return [(N, training_flops(N, tokens), law.loss(N, tokens)) for N in sizes]


def demo(noise: float = 0.002, seed: int = 0) -> dict:
    law = CHINCHILLA
    print(f"known law: L(N, D) = {law.E} + {law.A} / N^{law.alpha} + {law.B} / D^{law.beta}; its "
          f"optimum N_opt ~ C^{law.a:.4f}\nruns: 7 budgets x 9 sizes, loss noise {noise:.1%}\n")
    runs = synthetic_runs(law, noise=noise, seed=seed)
    laws = fit_approach2(isoflops_points(runs))
    law3 = fit_approach3(runs)
    a1 = fit_approach1(synthetic_curves(law))[1]
    print(f"{'':12}{'E':>8}{'A':>9}{'B':>9}{'alpha':>8}{'beta':>8}{'a':>8}")
    for name, fit in (("true", law), ("approach 3", law3)):
        print(f"{name:12}{fit.E:8.3f}{fit.A:9.1f}{fit.B:9.1f}{fit.alpha:8.4f}{fit.beta:8.4f}"
              f"{fit.a:8.4f}")
    print(f"{'approach 2':12}{'':42}{laws.a:8.4f}\n{'approach 1':12}{'':42}{a1:8.4f}  "
          f"(25 noise-free curves: the envelope steps between sizes)")
    return {"approach1_a": a1, "approach2": laws, "approach3": law3}


# Sweeps with a hard budget: our own model's runs, chosen, trained, recorded and fitted ------------
# Per budget C, `sizes` shapes of the family over [min_params, max_params], each trained by
# train.py on D = C / 6N tokens with one cosine schedule as long as the run, at every rate in
# --lrs. The plan is priced before any run; each result lands in the runs file at once, so a
# killed sweep resumes where it stopped and a repeated configuration costs nothing.
SWEEP = {"target": 1e17, "budget": 2e16, "runs": "sweep/runs.json",
         "budgets": "",  # FLOPs per IsoFLOP profile; "" = 4 budgets a factor 2 apart that fit
         "sizes": 5, "min_params": 5e5, "max_params": 2e7,  # shapes per budget, and their range
         "lrs": "",  # learning rates to try at every shape ("" = --lr); min_lr is a tenth of each
         "batch_sizes": "",  # and batch sizes, in sequences ("" = --batch_size)
         "warmup_frac": 0.1,  # warm-up as a share of each run (runs differ tenfold in length)
         "exact": False,  # price tokens with model.py's FLOPs count, not 6N
         "aspect_ratio": 32, "head_dim": 32,  # the family: d_model 32 x layers, 32-wide heads
         "samples": 200, "plot": "",  # bootstrap resamples; a folder for the PNGs
         "jobs": 1,  # train.py processes at once (small models leave a GPU idle: try 8)
         "check": False}  # then train the predicted best shape at --target: how close was it?
SWEEP_TRAIN = {"eval_interval": 10**9, "checkpoint_interval": 0, "num_samples": 0,
               "overwrite": True}  # validate once, at the end; a run not recorded starts over
RUN_KEY = ("compute_budget", "d_model", "num_layers", "num_heads", "d_ff", "context_length",
           "lr", "batch_size", "iterations")


def _numbers(text: str, name: str, kind: type = float) -> list:
    try:  # kind=int: "2.5" is refused, not rounded
        values = [kind(v) for v in text.split(",")] if text else []
    except ValueError:
        values = [0.0]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"--{name} must be positive {kind.__name__}s, comma-separated: {text!r}")
    return values


def planned_run(budget: float, config: ModelConfig, lr: float, cfg: dict,
                train_settings: dict) -> tuple[dict, TrainConfig]:
    """One run: its runs-file row (without the results) and its TrainConfig, training `config`
    at rate `lr` for as many whole steps as `budget` FLOPs buy, with one cosine schedule."""
    fields = {k: getattr(config, k) for k in ("d_model", "num_layers", "num_heads", "d_ff",
                                              "context_length")}
    train_cfg = with_overrides(TrainConfig(), {**SWEEP_TRAIN, **train_settings, "lr": lr,
                                               "min_lr": lr / 10})
    train_cfg.model.update(fields)
    model_config = check_config(train_cfg)  # with --vocab_size, as the plan is
    per_token = (flops_per_token(model_config, config.context_length)["train"] if cfg["exact"]
                 else 6.0 * count_params(model_config)["total"])
    step = train_cfg.batch_size * config.context_length * train_cfg.grad_accum_steps
    iterations = max(1, int(budget / per_token / step))
    train_cfg.max_iters, train_cfg.warmup_iters = iterations, round(cfg["warmup_frac"] * iterations)
    name = f"C{budget:.3g}-L{config.num_layers}-d{config.d_model}-lr{lr:g}-b{train_cfg.batch_size}"
    train_cfg.out_dir = str(Path(cfg["runs"]).with_suffix("") / name)
    return ({"compute_budget": budget, **fields, "lr": lr, "batch_size": train_cfg.batch_size,
             "iterations": iterations, "tokens": iterations * step,
             "flops": iterations * step * per_token}, train_cfg)


def plan_sweep(cfg: dict, train_settings: dict) -> list[tuple[dict, TrainConfig]]:
    """Every run of the sweep: its runs-file row (without the results) and its TrainConfig. Raises,
    before any work, when a budget has too few shapes or the plan costs more than --budget."""
    family = ShapeFamily(**{k: cfg[k] for k in vars(ShapeFamily())})
    lrs = _numbers(cfg["lrs"], "lrs") or [cfg["lr"]]
    batches = _numbers(cfg["batch_sizes"], "batch_sizes", int) or [cfg["batch_size"]]
    if cfg["jobs"] < 1:
        raise UsageError(f"--jobs must be at least 1, got {cfg['jobs']}")
    per_budget = cfg["sizes"] * len(lrs) * len(batches)
    budgets = _numbers(cfg["budgets"], "budgets") or [cfg["budget"] / (15 * per_budget) * 2**i
                                                      for i in range(4)]
    plan = []
    for budget in budgets:
        found = shapes_for_budget(budget, cfg["min_params"], cfg["max_params"], family)
        if len(found) < max(3, cfg["sizes"]):
            raise UsageError(f"budget {budget:.3g}: {len(found)} shapes of the family have "
                             f"{cfg['min_params']:g} <= N <= {cfg['max_params']:g}, the sweep "
                             f"needs --sizes={cfg['sizes']} (at least 3): widen the range")
        picks = np.unique(np.round(np.linspace(0, len(found) - 1, cfg["sizes"]))).astype(int)
        for config, _, _ in (found[i] for i in picks):
            plan += [planned_run(budget, config, lr, cfg, {**train_settings, "batch_size": b})
                     for lr in lrs for b in batches]
    total = sum(row["flops"] for row, _ in plan)
    if total > cfg["budget"]:
        raise UsageError(f"the sweep's {len(plan)} runs need {total:.3g} FLOPs, over --budget="
                         f"{cfg['budget']:.3g}: use fewer or smaller --budgets, fewer --sizes, "
                         f"--lrs or --batch_sizes, or raise --budget")
    return plan


def read_sweep_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        raise UsageError(f"--runs={path}: the sweep writes its runs as JSON; name a .json file")
    if not path.exists():
        return []
    load_runs(path)  # the same checks as any runs file: a broken one is named, not overwritten
    return json.loads(path.read_text(encoding="utf-8"))


def train_in_subprocess(train_cfg: TrainConfig) -> float:
    """`python train.py CONFIG` (output in out_dir/train.log); the final validation loss. Small
    models leave a GPU idle while Python launches kernels: several processes use it better."""
    out = Path(train_cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(dataclasses.asdict(train_cfg)))
    with open(out / "train.log", "w") as log:
        code = subprocess.run([sys.executable, train.__file__, str(out / "config.json")],
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        last = (out / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"exit status {code}: {' '.join(last)} (see {out / 'train.log'})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def run_sweep(plan: list[tuple[dict, TrainConfig]], runs_path: Path, jobs: int = 1) -> list[dict]:
    """Train each planned run not in the runs file yet (on data prepared once), appending its row
    atomically as it lands; jobs > 1: that many train.py processes at a time, longest first."""
    rows = read_sweep_rows(runs_path)
    done = [p for p in plan if any(all(r.get(k) == p[0][k] for k in RUN_KEY) for r in rows)]
    todo = sorted((p for p in plan if p not in done), key=lambda p: -p[0]["tokens"])
    print(f"sweep: {len(plan)} runs, {sum(r['flops'] for r, _ in plan):.3g} FLOPs; "
          f"{len(done)} in {runs_path} already, {len(todo)} to train"
          + (f", {jobs} at a time" if jobs > 1 and todo else ""))
    if not todo:
        return rows
    data = dict(zip(("tokenizer_dir", "train_bin", "val_bin"), prepare_data(todo[0][1])))
    vocab_size, failed = Tokenizer.from_dir(data["tokenizer_dir"]).vocab_size, []
    if jobs == 1:  # here, where Ctrl-C reaches train.py: it saves the run, the sweep stops
        finished = ((r, c, train.train(with_overrides(c, data))["val_loss"]) for r, c in todo)
    else:  # a failed run does not stop the others; Ctrl-C starts no more (running ones get it)
        pool = ThreadPoolExecutor(jobs)
        futures = {pool.submit(train_in_subprocess, with_overrides(c, data)): (r, c)
                   for r, c in todo}
        finished = ((*futures[f], f.exception() or f.result()) for f in as_completed(futures))
    try:
        for i, (row, train_cfg, loss) in enumerate(finished, 1):
            print(f"[{i}/{len(todo)}] C {row['compute_budget']:.3g}: d_model {row['d_model']}, "
                  f"{row['num_layers']} layers, lr {row['lr']:g}, {row['iterations']} steps: "
                  + (f"failed: {loss}" if isinstance(loss, Exception) else f"loss {loss:.4f}"),
                  flush=True)
            if isinstance(loss, Exception):
                failed.append(f"{train_cfg.out_dir}: {loss}")
                continue
            model_config = build_model_config(train_cfg, vocab_size)
            rows.append({"parameters": count_params(model_config)["total"], **row,
                         "final_loss": loss, "out_dir": train_cfg.out_dir})
            runs_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(runs_path, json.dumps(rows, indent=1))
    finally:
        if jobs > 1:
            pool.shutdown(cancel_futures=True)
    if failed:
        raise RuntimeError(f"{len(failed)} of the sweep's runs failed (the others are in "
                           f"{runs_path}; run the sweep again to retry): " + "; ".join(failed))
    return rows


def best_settings(rows: list[dict], source: str) -> tuple[Runs, dict]:
    """One point per (C, N) for the fits, the loss of its best rate and batch; and that run."""
    best = {}
    for r in rows:
        key = (r["compute_budget"], r["parameters"])
        if key not in best or r["final_loss"] < best[key]["final_loss"]:
            best[key] = r
    N, C, L = np.array([[n, c, r["final_loss"]] for (c, n), r in best.items()], float).T
    return Runs(N, C, L, source), best


def sweep_report(rows: list[dict], cfg: dict, source: str) -> dict:
    """The fits on the sweep's runs, and the shape, learning rate and loss they predict."""
    runs, best = best_settings(rows, source)
    result = fit_report(runs, [cfg["target"]], cfg["samples"], cfg["seed"], cfg["plot"])
    family = ShapeFamily(**{k: cfg[k] for k in vars(ShapeFamily())})
    three = result["predictions"][cfg["target"]]["approach3"]  # from all runs, not the minima
    N_opt, top = three["N"], max(runs.C)
    config = min((shape(n, family) for n in range(1, 257)),
                 key=lambda c: abs(math.log(count_params(c)["total"] / N_opt)))
    _, lr, batch = min((r["final_loss"], r["lr"], r["batch_size"])
                       for (c, _), r in best.items() if c == top)
    N = count_params(config)["total"]
    if edges := [p for p in result["points"] if p.warning]:
        low = [p.best_run_N == runs.N[runs.C == p.budget].min() for p in edges]
        side = "smaller" if all(low) else "larger" if not any(low) else "more"
        print(f"\nwarning: at {len(edges)} of {len(result['points'])} budgets the optimum is at "
              f"the edge of the sizes tried, so the prediction is an extrapolation: sweep {side} "
              "sizes (--min_params, --max_params)", file=sys.stderr)
    print(f"\nbest shape at {cfg['target']:.3g} FLOPs (approach 3's N_opt {N_opt:.3g}): d_model "
          f"{config.d_model}, {config.num_layers} layers, {config.num_heads} heads, d_ff "
          f"{config.d_ff} (N {N:,}),\non {cfg['target'] / (6 * N):.3g} tokens, predicted loss "
          f"{three['loss']:.3f};\nlearning rate {lr:g} and batch size {batch} sequences of "
          f"{cfg['context_length']} tokens (the best run's at {top:.3g} FLOPs)")
    if cfg["plot"]:
        curves = [load_curve(r["out_dir"], r["parameters"]) for r in best.values()
                  if Path(r.get("out_dir", ""), "metrics.jsonl").is_file()]
        plot_envelope(curves, cfg["plot"])
    return {**result, "shape": config, "lr": lr, "batch_size": batch}


def check_prediction(report: dict, cfg: dict, train_settings: dict) -> dict:
    """The test of the whole method: train the predicted best shape at --target (compile="auto":
    one long run pays back compiling) and compare its loss with approach 3's L(N, D) for that N
    and D, and approach 2's. Kept in RUNS-check.json: trained once, and out of the fits."""
    planned = planned_run(cfg["target"], report["shape"], report["lr"], cfg,
                          {**train_settings, "compile": "auto", "batch_size": report["batch_size"]})
    path = Path(cfg["runs"]).with_name(Path(cfg["runs"]).stem + "-check.json")
    run = next(r for r in run_sweep([planned], path) if all(r[k] == planned[0][k] for k in RUN_KEY))
    predicted = float(report["approach3"].loss(run["parameters"], run["tokens"]))
    two = report["predictions"][cfg["target"]]["approach2"]["loss"]
    loss, top = run["final_loss"], max(p.budget for p in report["points"])
    print(f"\ncheck at {cfg['target']:.3g} FLOPs ({cfg['target'] / top:.3g}x the largest sweep "
          f"budget): N {run['parameters']:,} on {run['tokens']:,} tokens reached validation "
          f"loss {loss:.4f};\napproach 3 predicted {predicted:.4f} ({loss / predicted - 1:+.1%}), "
          f"approach 2 {two:.4f} ({loss / two - 1:+.1%})")
    return {**run, "predicted_loss": predicted, "approach2_loss": two}


def sweep(cfg: dict, train_settings: dict) -> dict:
    rows = run_sweep(plan_sweep(cfg, train_settings), Path(cfg["runs"]), cfg["jobs"])
    report = sweep_report(rows, cfg, cfg["runs"])
    if cfg["check"]:
        report["check"] = check_prediction(report, cfg, train_settings)
    return report


# Commands: the tour, fit, demo, napkin, shapes, envelope ------------------------------------------
def napkin(params: float, tokens: float, gpus: int, mfu: float, peak_flops: float) -> None:
    if min(params, tokens, gpus, mfu, peak_flops) <= 0 or mfu > 1:
        raise UsageError(f"napkin needs positive --params, --tokens, --gpus, --peak_flops and 0 < "
                         f"--mfu <= 1, got {params:g}, {tokens:g}, {gpus}, {peak_flops:g}, {mfu:g}")
    flops = training_flops(params, tokens)
    days = training_days(params, tokens, gpus, mfu, peak_flops)
    print(f"{params:.3g} parameters on {tokens:.3g} tokens: 6 N D = {flops:.3g} FLOPs;\n"
          f"on {gpus:,} GPUs of {peak_flops / 1e12:.0f} TFLOP/s at MFU {mfu:.0%}: {days:.1f} days")
    optimal = TOKENS_PER_PARAM * params
    print(f"Chinchilla's ~{TOKENS_PER_PARAM} tokens per parameter: {optimal:.3g} tokens "
          f"({training_days(params, optimal, gpus, mfu, peak_flops):.1f} days); this run has "
          f"{tokens / params:.0f} per parameter.\nThe rule minimises training FLOPs for a loss and "
          f"ignores serving (2 N FLOPs per token):\nserving 10x the training tokens makes "
          f"{lifetime_flops(params, tokens, 10 * tokens):.3g} FLOPs in all, so smaller models\n"
          f"trained longer pay off (Llama 3 8B: ~1,900 tokens per parameter).")


def napkin_tour() -> None:
    print("Napkin math")
    napkin(70e9, 15e12, 1024, 0.5, PEAK_BF16_FLOPS["H100"])
    config = ModelConfig.preset("nanogpt")  # GPT-2 small's shape, SwiGLU with d_ff = 8/3 d
    exact, approx = training_flops_exact(config, 1e9), training_flops(
        count_params(config)["total"], 1e9)
    print(f"nanogpt preset on 1e9 tokens: 6 N D = {approx:.4g} FLOPs; model.py's count = "
          f"{exact:.4g}\n(attention's T x T in, the input embedding's lookup out); non-embedding "
          f"N = 12 L d^2 = {non_embedding_params_approx(config.num_layers, config.d_model):,.0f},"
          f"\nexactly {non_embedding_params(config):,} (the norms' gains)\n")
    print_shapes(1e19, 2e7, 5e8, ShapeFamily())


def print_shapes(budget: float, min_params: float, max_params: float, family: ShapeFamily) -> None:
    found = shapes_for_budget(budget, min_params, max_params, family)
    print(f"shapes for C = {budget:.3g} FLOPs (aspect ratio {family.aspect_ratio}, head dim "
          f"{family.head_dim}, vocab {family.vocab_size}):")
    print(f"{'d_model':>8}{'layers':>7}{'heads':>6}{'d_ff':>6}{'N':>14}{'non-emb N':>14}"
          f"{'tokens D':>12}{'D/N':>10}")
    for config, N, D in found:
        print(f"{config.d_model:8d}{config.num_layers:7d}{config.num_heads:6d}{config.d_ff:6d}"
              f"{N:14,d}{non_embedding_params(config):14,d}{D:12.3g}{D / N:10.1f}")
    if not found:
        print(f"  none: no depth gives {min_params:g} <= N <= {max_params:g}")


COMMANDS = {
    "tour": {"runs": str(COURSE_RUNS), "budgets": "1e23,1e24", "samples": 200, "seed": 0,
             "plot": ""},  # budgets: FLOPs to predict at; plot: a folder for the PNGs ("" none)
    "fit": {"runs": "", "budgets": "1e23,1e24", "samples": 200, "seed": 0, "plot": ""},
    "demo": {"noise": 0.002, "seed": 0},  # noise: the standard deviation of ln loss
    "napkin": {"params": 70e9, "tokens": 15e12, "gpus": 1024, "mfu": 0.5,
               "peak_flops": PEAK_BF16_FLOPS["H100"]},
    "shapes": {"budget": 1e19, "min_params": 2e7, "max_params": 5e8, **vars(ShapeFamily())},
    "envelope": {"plot": ""},  # run folders as DIR (N, FLOPs from its ckpt.pt) or DIR:N (6 N)
    "sweep": {**option_defaults(TrainConfig()), "context_length": 64, **SWEEP},  # and train.py's
}


def _folder_and_params(arg: str) -> tuple[str, float]:
    path, sep, params = arg.rpartition(":")
    try:
        return (path, float(params)) if sep else (arg, 0.0)
    except ValueError:
        raise UsageError(f"{arg!r}: write a run folder as DIR or DIR:N, N its parameters") from None


def main(argv: list[str]) -> None:
    """`python scaling.py [COMMAND] [ARGS] [--key=value ...]`; no command runs the tour."""
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, cfg, overrides, positional = parse_command(argv, COMMANDS, "tour",
                                                        positional=["fit", "envelope"])
    if command == "fit" and positional:
        cfg["runs"] = positional.pop(0)
    if positional and command != "envelope":
        raise UsageError(f"unexpected argument {positional[0]!r}; settings are --key=value")
    if cfg.get("runs", None) == "":
        raise UsageError("fit needs a runs file: python scaling.py fit RUNS")
    if "budgets" in cfg and command != "sweep":
        cfg["budgets"] = _numbers(cfg["budgets"] or "none", "budgets")  # FLOPs to predict at
    if command in ("tour", "fit"):
        if command == "tour":
            napkin_tour()
        fit_report(load_runs(cfg["runs"]), cfg["budgets"], cfg["samples"], cfg["seed"],
                   cfg["plot"])
    elif command == "demo":
        demo(cfg["noise"], cfg["seed"])
    elif command == "napkin":
        napkin(**cfg)
    elif command == "sweep":
        if chosen := set(overrides) & {"d_model", "num_layers", "num_heads", "d_ff", "preset",
                                       "max_iters", "warmup_iters", "min_lr", "out_dir", "resume"}:
            raise UsageError(f"the sweep sets --{', --'.join(sorted(chosen))} per run: choose "
                             "shapes with --aspect_ratio, --head_dim, --context_length, "
                             "--min_params, --max_params; lengths with --budgets; --warmup_frac")
        sweep(cfg, {k: v for k, v in overrides.items() if k not in SWEEP})
    elif command == "shapes":
        family = ShapeFamily(**{k: cfg[k] for k in vars(ShapeFamily())})
        print_shapes(cfg["budget"], cfg["min_params"], cfg["max_params"], family)
    else:
        if not positional:
            raise UsageError("envelope needs run folders: python scaling.py envelope DIR DIR ...")
        curves = [load_curve(*_folder_and_params(arg)) for arg in positional]
        (C, N, loss), (k, a) = envelope(curves), fit_approach1(curves)
        for c, n, value in zip(C, N, loss):
            print(f"  C {c:10.3e}  best N {n:12.4g}  loss {value:.4f}")
        print(f"approach 1: N_opt = {k:.4g} C^{a:.4f}")
        if cfg["plot"]:
            plot_envelope(curves, cfg["plot"])


if __name__ == "__main__":
    run_cli(main)
