"""Stage 9: alignment, from a base model to a useful one: SFT, expert iteration, GRPO and DPO.

A pretrained model continues text; a useful one answers. In the order of CS336 lectures 15-17 and
assignment 5: data and masks; SFT on demonstrations; rewards a program checks and an evaluation
harness; expert iteration; GRPO (a group of samples per question as the baseline); preferences (a
reward model, DPO); then the offline demo, a verifiable task written by the code, taken through all.

The RLHF picture. InstructGPT (Ouyang et al. 2022): SFT on ~13k prompts; a 6B reward model on
rankings of 4-9 answers to ~33k prompts (-log sigmoid(r_w - r_l) over all pairs); PPO on ~31k
prompts against it, minus a KL penalty to the SFT model (beta 0.02). Labelers preferred the 1.3B
InstructGPT to the 175B GPT-3. DPO (Rafailov et al. 2023): the optimum of "reward - beta KL" is
pi ~ pi_ref exp(r / beta), so r = beta log pi/pi_ref + const, and the Bradley-Terry loss on that
implicit reward trains the policy with no reward model (TL;DR: 61% win rate, PPO's best 57%).
When a program can check the answer, no learned reward is needed: GRPO (DeepSeekMath, Shao et al.
2024; 64 samples a question, KL 0.04) took a 7B model from 82.9% to 88.2% on GSM8K, and
DeepSeek-R1-Zero (2025) went from 15.6% to 71.0% pass@1 on AIME 2024 with RL alone. Dr. GRPO (Liu
et al. 2025) drops the per-response 1/|o| (a long wrong answer gets a smaller penalty per token)
and the division by the group's std (which favours too easy and too hard questions).

Commands (settings are --key=value; --size picks a row of SIZES, flags override it)
    python align.py                     # CPU, a few minutes: task, base model, SFT, EI, GRPO, DPO
    python align.py --size=gpu          # one GPU, ~3 minutes: a harder task, a bigger model
    python align.py --loss_type=reinforce_with_baseline --normalize_by_std=False   # ablations
    python align.py eval --model=out/align/grpo.pt --data=gsm8k.jsonl   # or mmlu.csv, task.jsonl
    python align.py bench               # rollout tokens/s; a GRPO step's generating vs training
Reads   nothing for the demo (it writes its own task); eval: a checkpoint (ours or train.py's;
        its tokenizer found as infer.py finds it, or --tokenizer_dir), GSM8K JSONL
        ({"question", "answer": "... #### 72"}) or MMLU CSV (question, A, B, C, D, answer);
        get_packed_sft_dataset: Alpaca JSONL.
Writes  out/align/: {train,val}.{txt,bin}, tokenizer/, base/ (train.py's run), sft.pt, ei.pt,
        grpo.pt, dpo.pt, results.json (every number and logged step), rewards.png.

Papers, besides those above: Anthony et al. 2017, Zelikman et al. 2022 (expert iteration, STaR);
Schulman et al. 2017 (PPO); Cobbe et al. 2021 (GSM8K); Hendrycks et al. 2021 (MMLU); Taori et al.
2023 (Alpaca); Chen et al. 2021 (pass@k); Bradley & Terry 1952.
"""

import copy
import csv
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infer import (Completion, eos_of, generate_batch, load_checkpoint_model, model_device,
                   model_logits)
from model import Linear, ModelConfig, TransformerLM
from tokenizer import (Tokenizer, UsageError, atomic_output, encode_file, parse_command, run_cli,
                       train_bpe, write_atomic)
from train import (EOT, AdamW, TrainConfig, autocast_for, clip_grad_norm, resolve_device,
                   resolve_dtype, train)


# Config: the demo's every knob, the rows that --size picks, the prompt templates ------------------
@dataclass
class AlignConfig:
    size: str = "cpu"  # a row of SIZES, applied under the flags given
    out: str = "out/align"  # everything the demo writes
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA, then MPS, then CPU
    max_steps: int = 2  # the task: 1..max_steps gains and losses of 1..max_number items
    max_number: int = 10
    train_problems: int = 4000  # questions for SFT demonstrations and RL
    heldout_problems: int = 200  # questions no stage trains on
    pretrain_stories: int = 12000  # worked stories in the pretraining text (related, not the task)
    preset: str = "tiny"  # the base model, pretrained with train.py
    model: dict = field(default_factory=lambda: {"context_length": 256})  # over the preset
    vocab_size: int = 512
    pretrain_iters: int = 300
    pretrain_batch: int = 8
    pretrain_lr: float = 2e-3
    shots: int = 1  # worked examples in the base model's prompt
    prompt: str = "r1_zero"  # "r1_zero" (think, then answer) | "question_only" (an ablation)
    max_new_tokens: int = 48
    eval_samples: int = 4  # samples per held-out question at temperature 1 (accuracy, pass@k)
    eval_interval: int = 10  # RL steps between held-out evaluations
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # SFT: micro-batches per optimizer step
    sft_examples: int = 200  # demonstrations: few, so that RL has something left to do
    sft_steps: int = 60
    sft_lr: float = 5e-4
    ei_steps: int = 3  # expert iteration
    ei_questions: int = 128  # questions sampled per step, group_size answers each
    ei_epochs: int = 2  # passes of SFT over the kept answers
    ei_lr: float = 1e-4  # lower than SFT's: the model already fits its own right answers
    grpo_steps: int = 40  # GRPO
    group_size: int = 8
    rollout_batch_size: int = 128  # rollouts per step: rollout_batch_size / group_size questions
    train_batch_size: int = 64  # rollouts per optimizer step: 128 / 64 = 2 steps, 1 off-policy
    epochs_per_rollout_batch: int = 1
    grpo_lr: float = 1e-4
    loss_type: str = "grpo_clip"  # "no_baseline" | "reinforce_with_baseline" | "grpo_clip"
    cliprange: float = 0.2
    clip: bool = True  # False: the ratio unclipped (ablation)
    normalize_by_std: bool = True  # False: Dr. GRPO's advantage r - mean (ablation)
    length_normalization: str = "masked_mean"  # or "constant": Dr. GRPO's sum / max_new_tokens
    advantage_eps: float = 1e-6
    kl_coef: float = 0.0  # > 0: a KL penalty to the SFT model (k3 estimator)
    temperature: float = 1.0  # rollouts
    dpo_questions: int = 256  # preference pairs (a right, a wrong answer) from SFT's samples
    dpo_steps: int = 40
    dpo_beta: float = 0.1
    dpo_lr: float = 1e-5  # DPO drifts fast: 3e-5 already lowers accuracy here
    rm_steps: int = 60  # the reward model trains at sft_lr


SIZES = {
    "cpu": {},  # the defaults: ~3 minutes on 2 CPU cores
    "gpu": dict(max_steps=5, max_number=60, train_problems=20000, heldout_problems=500,
                pretrain_stories=20000, vocab_size=1024, pretrain_iters=2000, pretrain_batch=32,
                pretrain_lr=1e-3, max_new_tokens=64, eval_samples=8, eval_interval=25,
                model=dict(context_length=256, d_model=256, num_layers=6, num_heads=8, d_ff=768),
                batch_size=64, sft_examples=500, sft_lr=3e-4, ei_steps=4,
                ei_questions=256, ei_lr=7e-5, grpo_steps=200, rollout_batch_size=256,
                train_batch_size=128, grpo_lr=7e-5, dpo_questions=1024, dpo_steps=100,
                dpo_lr=7e-6, rm_steps=100)}
STOP = ("</answer>",)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # special tokens of the demo's tokenizer
# R1-Zero's template, cut short for a small context; and the question alone
PROMPTS = {"r1_zero": "Q: {question}\nA: <think>", "question_only": "{question}"}
MMLU_PROMPT = ("Answer the multiple-choice question with one sentence of the form \"The correct "
               "answer is X\", X being A, B, C or D.\nQuestion: {question}\nA. {0}\nB. {1}\n"
               "C. {2}\nD. {3}\nAnswer:")
ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n"
                   "### Response:\n{response}")


# Data and masks: one sequence per prompt and response, a mask on the response ---------------------
def encode(tokenizer, text: str) -> list[int]:
    """Ids without a Hugging Face tokenizer's BOS/EOS: prompt and output are joined as they are."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # ours and other plain tokenizers take only the text
        return list(tokenizer.encode(text))


def eos_id(tokenizer) -> int:
    """The end-of-text id (padding and the separator of packed data): one the tokenizer has."""
    eos = eos_of(tokenizer)
    if eos is None:
        raise ValueError(f"the tokenizer has no end-of-text token: give it {EOT!r} as a special "
                         "token (or a Hugging Face eos_token)")
    return eos


def context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)  # ours, or a Hugging Face config
    return getattr(config, "context_length", getattr(config, "max_position_embeddings", None))


def pack_prompt_and_output(prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                           pad_id: int, max_len: int | None = None) -> dict[str, Tensor]:
    """Token lists -> input_ids, labels, response_mask (B, T - 1); right padding is never read."""
    if empty := [i for i, prompt in enumerate(prompt_ids) if not prompt]:
        raise ValueError(f"prompt {empty[0]} is empty: the first output token needs one before it")
    seqs = [[*prompt, *output] for prompt, output in zip(prompt_ids, output_ids, strict=True)]
    if cut := sum(max_len is not None and len(seq) > max_len + 1 for seq in seqs):
        warnings.warn(f"{cut} of {len(seqs)} prompt+output sequences are longer than the model's "
                      f"context ({max_len} tokens): their outputs were truncated", stacklevel=3)
        seqs = [seq[:max_len + 1] for seq in seqs]
    full = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), full.shape[1] - 1, dtype=torch.bool)
    for i, (seq, prompt) in enumerate(zip(seqs, prompt_ids)):
        full[i, :len(seq)] = torch.tensor(seq)
        mask[i, len(prompt) - 1:len(seq) - 1] = True  # label j is token j + 1
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask}


def tokenize_prompt_and_output(prompt_strs: list[str], output_strs: list[str], tokenizer,
                               max_len: int | None = None) -> dict[str, Tensor]:
    """The course's entry point: strings -> input_ids, labels, response_mask (B, T - 1)."""
    return pack_prompt_and_output([encode(tokenizer, p) for p in prompt_strs],
                                  [encode(tokenizer, o) for o in output_strs],
                                  eos_id(tokenizer), max_len)


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(z) over the last axis as logsumexp(z) - sum softmax(z) z: no log(0)."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def get_response_log_probs(model: nn.Module, input_ids: Tensor, labels: Tensor,
                           return_token_entropy: bool = False) -> dict[str, Tensor]:
    """log p(label | tokens before it) (B, T), and if asked each position's entropy (no grad)."""
    logits = model_logits(model, input_ids).float()  # (B, T, V)
    # z_label - logsumexp(z): one (B, T) result instead of a second (B, T, V) log_softmax
    log_probs = logits.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    entropy = {"token_entropy": compute_entropy(logits.detach())} if return_token_entropy else {}
    return {"log_probs": log_probs, **entropy}


def masked_normalize(tensor: Tensor, mask: Tensor, dim: int | None = None,
                     normalize_constant: float | Tensor = 1.0) -> Tensor:
    """Sum over the entries where mask is set, divided by a constant; a masked -inf does no harm."""
    return torch.where(mask.bool(), tensor, 0).sum(dim) / normalize_constant


def masked_mean(tensor: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the entries where mask is set; 0 (not NaN) where none is."""
    return masked_normalize(tensor, mask, dim, mask.sum(dim).clamp(min=1))


# Instruction data: Alpaca-style pairs, packed into fixed-length sequences -------------------------
def get_packed_sft_dataset(tokenizer, dataset_path: str | Path, seq_length: int, shuffle: bool,
                           seed: int = 0) -> list[dict[str, Tensor]]:
    """Alpaca pairs joined by end-of-text, cut into seq_length {input_ids, labels}; all trained."""
    pairs = load_alpaca(dataset_path)
    if shuffle:
        random.Random(seed).shuffle(pairs)
    ids = [i for prompt, response in pairs for i in [*encode(tokenizer, ALPACA_TEMPLATE.format(
        prompt=prompt, response=response)), eos_id(tokenizer)]]
    if len(ids) < seq_length + 1:
        raise ValueError(f"{dataset_path}: {len(ids)} tokens, fewer than one sequence + a label")
    tokens = torch.tensor(ids)
    return [{"input_ids": tokens[i:i + seq_length], "labels": tokens[i + 1:i + seq_length + 1]}
            for i in range(0, len(ids) - seq_length, seq_length)]


def iterate_batches(dataset: Sequence[dict[str, Tensor]], batch_size: int, shuffle: bool,
                    seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """One pass over the dataset in batches of stacked items; the last may be smaller."""
    order = (torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
             if shuffle else torch.arange(len(dataset)))
    for start in range(0, len(order), batch_size):
        items = [dataset[int(i)] for i in order[start:start + batch_size]]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


# SFT: maximise the log-likelihood of the demonstrated responses -----------------------------------
def sft_microbatch_train_step(policy_log_probs: Tensor, response_mask: Tensor,
                              gradient_accumulation_steps: int,
                              normalize_constant: float = 1.0) -> tuple[Tensor, dict]:
    """Batch mean of response NLL / normalize_constant / accumulation steps; backward runs here."""
    nll = -masked_normalize(policy_log_probs, response_mask, -1, normalize_constant)  # (B,)
    loss = nll.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"nll": nll.detach()}


def autocast(model: nn.Module):
    return autocast_for(model_device(model), resolve_dtype("auto", model_device(model)))


def adamw(model: nn.Module, lr: float) -> AdamW:
    """The AdamW of SFT, GRPO and preference training: betas (0.9, 0.95), no weight decay."""
    return AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    grad_norm = clip_grad_norm(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def sft(policy: nn.Module, tokenizer, examples: Sequence[tuple[str, str]], steps: int,
        cfg: AlignConfig, evaluate_fn: Callable | None = None, lr: float = 0.0) -> list[dict]:
    """Fine-tune on (prompt, response) pairs; the loss is a mean over response tokens."""
    optimizer = adamw(policy, lr or cfg.sft_lr)
    rng, rows, device = random.Random(cfg.seed), [], model_device(policy)
    policy.train()
    for step in range(1, steps + 1):
        loss = entropy = 0.0
        for _ in range(cfg.grad_accum):
            batch = rng.sample(list(examples), min(cfg.batch_size, len(examples)))
            data = tokenize_prompt_and_output(*zip(*batch), tokenizer, context_length(policy))
            data = {k: v.to(device) for k, v in data.items()}
            with autocast(policy):
                out = get_response_log_probs(policy, data["input_ids"], data["labels"], True)
            mask = data["response_mask"]
            micro_loss, _ = sft_microbatch_train_step(
                out["log_probs"], mask, cfg.grad_accum, float(mask.sum().clamp(min=1)) / len(batch))
            loss += float(micro_loss)
            entropy += float(masked_mean(out["token_entropy"], mask)) / cfg.grad_accum
        rows.append({"step": step, "loss": loss, "grad_norm": optimizer_step(policy, optimizer),
                     "entropy": entropy})
        if evaluate_fn is not None and step % cfg.eval_interval == 0:
            rows[-1]["heldout"] = held = evaluate_fn(policy)
            print(f"  sft {step}: loss {loss:.3f}, entropy {entropy:.3f}, held-out {held:.3f}")
    return rows


# Rewards and parsers: answers a program can check -------------------------------------------------
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """One number, canonically ("$1,000", "1000.0" -> "1000"; "0.50" -> "0.5"), else None."""
    s = text.strip().removeprefix("$").rstrip(".").strip()
    if not s or _NUMBER.fullmatch(s) is None:
        return None
    return format(Decimal(s.replace(",", "")).normalize() + 0, "f")  # + 0 turns -0 into 0


def answers_match(given: str, truth: str) -> bool:
    """Numbers compare by value; other answers as case-insensitive stripped text."""
    a, b = normalize_number(given), normalize_number(truth)
    if a is not None or b is not None:
        return a == b
    return given.strip().lower() == truth.strip().lower()


def r1_zero_reward_fn(response: str, ground_truth: str) -> dict[str, float]:
    """R1-Zero's rewards: format 1 for "... </think> <answer> X </answer>", reward 1 if X right."""
    formatted = "</think> <answer>" in response and "</answer>" in response
    answer = response.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0]
    correct = formatted and answers_match(answer, ground_truth)
    return {"format_reward": float(formatted), "answer_reward": float(correct),
            "reward": float(correct)}


def question_only_reward_fn(response: str, ground_truth: str) -> dict[str, float]:
    """For question-only prompts, no format asked: the tagged answer, else the last number."""
    if "</answer>" in response:
        return r1_zero_reward_fn(response, ground_truth)
    correct = float(parse_gsm8k_response(response) == normalize_number(ground_truth))
    return {"format_reward": 0.0, "answer_reward": correct, "reward": correct}


def parse_gsm8k_response(output: str) -> str | None:
    """The last number in the output, normalised ("... so she pays $1,250." -> "1250")."""
    numbers = _NUMBER.findall(output)
    return normalize_number(numbers[-1]) if numbers else None


def parse_mmlu_response(example: dict, output: str) -> str | None:
    """The letter A-D chosen, or None: the last "answer is (B)" / "Answer: C", else a letter alone
    at the start ("D", "(B) ...", "C."), else the one option quoted; never "A" the article."""
    if stated := re.findall(r"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?([ABCD])\b(?![\w'])", output):
        return stated[-1]
    if first := re.match(r"\s*\(?([ABCD])(?:[).:]|\s*$)", output):
        return first.group(1)
    hits = [letter for letter, option in zip("ABCD", example.get("options", ()))
            if option.strip() and option.strip().lower() in output.lower()]
    return hits[0] if len(hits) == 1 else None


# Data files a user brings: one clear error, naming file and line ----------------------------------
def _read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines; a missing, non-UTF-8 or empty file fails."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not (numbered := [(n, line) for n, line in enumerate(lines, 1) if line.strip()]):
        raise ValueError(f"{path}: no examples")
    return numbered


def _read_jsonl(path: str | Path, keys: tuple[str, ...]) -> list[tuple[int, dict]]:
    """JSON objects, each with string fields of one of `keys` ("question+answer")."""
    rows = []
    for n, line in _read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not any(
                all(isinstance(row.get(k), str) for k in ks.split("+")) for ks in keys):
            raise ValueError(f"{path}:{n}: expected a JSON object with string fields "
                             f"{' or '.join(keys)}, got {line[:60]}")
        rows.append((n, row))
    return rows


def load_gsm8k(path: str | Path) -> list[dict]:
    """{"question", "answer"} lines; the answer's final "#### N" (or a bare number) is the truth."""
    examples = []
    for n, row in _read_jsonl(path, ("question+answer",)):
        answer = normalize_number(row["answer"].rsplit("####", 1)[-1])
        if answer is None:
            raise ValueError(f"{path}:{n}: the answer ends in no '#### <number>' line")
        examples.append({"question": row["question"], "answer": answer})
    return examples


def load_mmlu(path: str | Path) -> list[dict]:
    """MMLU's CSV rows: question, four options, the letter A-D (a header row is skipped)."""
    examples, lines = [], _read_lines(path)
    for n, line in lines:
        row = next(csv.reader([line]))
        if len(row) != 6:
            raise ValueError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), "
                             f"got {len(row)}")
        if n == lines[0][0] and row[5] == "answer":
            continue  # the header
        if row[5].strip() not in ("A", "B", "C", "D"):
            raise ValueError(f"{path}:{n}: the answer must be A, B, C or D, got {row[5]!r}")
        examples.append({"question": row[0], "options": row[1:5], "answer": row[5].strip()})
    return examples


def load_alpaca(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) from {"prompt", "response"} or {"instruction", "input", "output"}."""
    return [(row["prompt"], row["response"]) if "prompt" in row else (
        row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else ""), row["output"])
        for _, row in _read_jsonl(path, ("prompt+response", "instruction+output"))]


# The evaluation harness: prompt -> generate_batch -> parse -> accuracy, pass@k, throughput --------
def pass_at_k(n: int, c: int, k: int) -> float:
    """P(k of n samples, c right, hold a right one) = 1 - C(n-c, k) / C(n, k); unbiased (Chen)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model: nn.Module, tokenizer, prompts: Sequence[str], truths: Sequence,
             reward_fn: Callable[[str, object], dict], n: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, stop: Sequence[str] = STOP, seed: int = 0,
             batch_size: int = 256) -> dict:
    """n samples per prompt scored by reward_fn(text, truth): accuracy, pass@n, format, speed."""
    was_training, start, groups = model.training, time.perf_counter(), []
    chunk = max(1, batch_size // n)  # prompts per generate_batch call
    model.eval()
    for i in range(0, len(prompts), chunk):
        groups += generate_batch(model, tokenizer, list(prompts[i:i + chunk]), n=n,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 stop=tuple(stop), include_stop=True, seed=seed + i)
    seconds = time.perf_counter() - start
    model.train(was_training)
    scores = [[reward_fn(c.text, truth) for c in group] for group, truth in zip(groups, truths)]
    flat = [s for group in scores for s in group]
    tokens = sum(len(c.token_ids) for group in groups for c in group)
    return {"accuracy": sum(s["reward"] for s in flat) / len(flat),
            f"pass@{n}": sum(pass_at_k(n, sum(s["reward"] == 1 for s in group), n)
                             for group in scores) / len(scores),
            "format": sum(s.get("format_reward", math.nan) for s in flat) / len(flat),
            "length": tokens / len(flat), "examples_per_s": len(prompts) / seconds,
            "tokens_per_s": tokens / seconds, "seconds": seconds, "example": groups[0][0].text}


# Expert iteration: sample, keep what the reward accepts, imitate it, repeat -----------------------
def rollouts(policy: nn.Module, tokenizer, prompts: Sequence[str], cfg: AlignConfig, n: int,
             seed: int) -> list[list[Completion]]:
    """n samples per prompt, from the very ids that training packs the prompt into (`encode`: a
    Hugging Face tokenizer's BOS would otherwise be in the sampled context and not the trained)."""
    policy.eval()
    groups = generate_batch(policy, tokenizer, [encode(tokenizer, p) for p in prompts], n=n,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            stop=STOP, include_stop=True, seed=seed)
    policy.train()
    return groups


def expert_iteration(policy: nn.Module, tokenizer, prompts: Sequence[str], truths: Sequence[str],
                     reward_fn: Callable, cfg: AlignConfig,
                     evaluate_fn: Callable | None = None) -> list[dict]:
    """Sample group_size answers to ei_questions questions; SFT on the right ones (STaR's loop)."""
    rng, rows = random.Random(cfg.seed + 1), []
    for step in range(1, cfg.ei_steps + 1):
        picked = rng.sample(range(len(prompts)), min(cfg.ei_questions, len(prompts)))
        groups = rollouts(policy, tokenizer, [prompts[i] for i in picked], cfg, cfg.group_size,
                          cfg.seed + 1000 * step)
        scored = [(prompts[i], c.text, reward_fn(c.text, truths[i])["reward"])
                  for i, g in zip(picked, groups) for c in g]
        kept = sorted({(prompt, text) for prompt, text, reward in scored if reward == 1})
        sft_steps = cfg.ei_epochs * math.ceil(len(kept) / cfg.batch_size)
        sft_rows = sft(policy, tokenizer, kept, sft_steps, cfg, lr=cfg.ei_lr) if kept else []
        rows.append({"step": step, "reward": sum(r for *_, r in scored) / len(scored),
                     "kept": len(kept), "sft_steps": sft_steps,
                     "entropy": sft_rows[-1]["entropy"] if sft_rows else math.nan,
                     "heldout": evaluate_fn(policy) if evaluate_fn else math.nan})
        print(f"  ei {step}: reward {rows[-1]['reward']:.3f}, kept {len(kept)}, {sft_steps} SFT "
              f"steps, held-out {rows[-1]['heldout']:.3f}")
    return rows


# GRPO: the policy gradient with a group's mean reward as the baseline -----------------------------
def compute_group_normalized_rewards(reward_fn: Callable, rollout_responses: Sequence[str],
                                     repeated_ground_truths: Sequence[str], group_size: int,
                                     advantage_eps: float, normalize_by_std: bool
                                     ) -> tuple[Tensor, Tensor, dict]:
    """Advantage = reward - group mean (/ (std + eps) if normalize_by_std); equal rewards give 0."""
    if group_size < 1 or not rollout_responses or len(rollout_responses) % group_size:
        raise ValueError(f"need a whole number of non-empty groups: {len(rollout_responses)} "
                         f"responses in groups of {group_size}")
    scores = [reward_fn(r, t) for r, t in zip(rollout_responses, repeated_ground_truths,
                                              strict=True)]
    raw = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    grouped = raw.view(-1, group_size)  # (questions, G)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if normalize_by_std:
        std = grouped.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        advantages = advantages / (std + advantage_eps)
    return advantages.flatten(), raw, {
        "reward_mean": raw.mean().item(), "groups_all_equal": (grouped.std(-1, correction=0) == 0)
        .float().mean().item(), "format": sum(s.get("format_reward", 0) for s in scores) / len(raw)}


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: Tensor,
                                       policy_log_probs: Tensor) -> Tensor:
    """-A log pi(token), per token (B, T): its gradient is REINFORCE's."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(advantages: Tensor, policy_log_probs: Tensor, old_log_probs: Tensor,
                           cliprange: float) -> tuple[Tensor, dict]:
    """PPO's -min(ratio A, clip(ratio, 1 +- eps) A), ratio = pi / pi_old: no gain past 1 +- eps."""
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - cliprange, 1 + cliprange) * advantages
    return -torch.minimum(unclipped, clipped), {"clipped": (clipped < unclipped).detach()}


def compute_policy_gradient_loss(policy_log_probs: Tensor, loss_type: str,
                                 raw_rewards: Tensor | None = None,
                                 advantages: Tensor | None = None,
                                 old_log_probs: Tensor | None = None,
                                 cliprange: float | None = None) -> tuple[Tensor, dict]:
    """Per-token loss (B, T) weighted by the raw reward, the advantage, or clipped (grpo_clip)."""
    need = {"no_baseline": {"raw_rewards": raw_rewards},
            "reinforce_with_baseline": {"advantages": advantages},
            "grpo_clip": {"advantages": advantages, "old_log_probs": old_log_probs,
                          "cliprange": cliprange}}
    if loss_type not in need:
        raise ValueError(f"loss_type must be one of {list(need)}, got {loss_type!r}")
    if missing := [name for name, value in need[loss_type].items() if value is None]:
        raise ValueError(f"loss_type={loss_type!r} needs {', '.join(missing)}")
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    weights = raw_rewards if loss_type == "no_baseline" else advantages
    return compute_naive_policy_gradient_loss(weights, policy_log_probs), {}


def grpo_microbatch_train_step(policy_log_probs: Tensor, response_mask: Tensor,
                               gradient_accumulation_steps: int, loss_type: str,
                               raw_rewards: Tensor | None = None, advantages: Tensor | None = None,
                               old_log_probs: Tensor | None = None, cliprange: float | None = None,
                               normalize_constant: float | None = None,
                               ref_log_probs: Tensor | None = None, kl_coef: float = 0.0
                               ) -> tuple[Tensor, dict]:
    """Per-token loss (+ kl_coef KL), masked mean (or sum / constant) per response; backward."""
    per_token, meta = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards,
                                                   advantages, old_log_probs, cliprange)
    if ref_log_probs is not None and kl_coef:
        # k3 = e^x - x - 1 with x = log pi_ref - log pi: unbiased for KL(pi || pi_ref), >= 0
        kl = torch.exp(ref_log_probs - policy_log_probs) - (ref_log_probs - policy_log_probs) - 1
        per_token = per_token + kl_coef * kl
        meta["kl"] = masked_mean(kl.detach(), response_mask)
    per_response = (masked_mean(per_token, response_mask, -1) if normalize_constant is None else
                    masked_normalize(per_token, response_mask, -1, normalize_constant))
    loss = per_response.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), meta


@torch.no_grad()
def batched_log_probs(model: nn.Module, data: dict[str, Tensor], batch_size: int) -> Tensor:
    """Response log-probs of a whole rollout batch without gradients, micro-batch by micro-batch."""
    with autocast(model):
        return torch.cat([get_response_log_probs(model, data["input_ids"][i:i + batch_size],
                                                 data["labels"][i:i + batch_size])["log_probs"]
                          for i in range(0, len(data["input_ids"]), batch_size)])


def check_reference(policy: nn.Module, ref: nn.Module | None) -> None:
    """KL and DPO compare token distributions: both models must share one vocabulary."""
    sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (policy, ref)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(f"the reference model's vocabulary has {sizes[1]} tokens, the policy's "
                         f"{sizes[0]}: use a reference with the policy's tokenizer")


def grpo_train(policy: nn.Module, tokenizer, prompts: Sequence[str], truths: Sequence[str],
               reward_fn: Callable, cfg: AlignConfig, ref_model: nn.Module | None = None,
               evaluate_fn: Callable | None = None) -> list[dict]:
    """Rollouts, advantages, pi_old once, then updates: off-policy (clipped) after the first."""
    G, micro = cfg.group_size, min(cfg.batch_size, cfg.train_batch_size)
    if cfg.rollout_batch_size % G or cfg.rollout_batch_size % cfg.train_batch_size or \
            cfg.train_batch_size % micro or len(prompts) < cfg.rollout_batch_size // G:
        raise UsageError("need group_size | rollout_batch_size, train_batch_size | "
                         "rollout_batch_size, batch_size | train_batch_size, and at least "
                         f"rollout_batch_size / group_size questions (got {len(prompts)})")
    check_reference(policy, ref_model if cfg.kl_coef else None)  # before the first rollout
    optimizer = adamw(policy, cfg.grpo_lr)
    rng, rows, pad = random.Random(cfg.seed + 2), [], eos_id(tokenizer)
    device = model_device(policy)
    constant = None if cfg.length_normalization == "masked_mean" else float(cfg.max_new_tokens)
    for step in range(1, cfg.grpo_steps + 1):
        start = time.perf_counter()
        picked = rng.sample(range(len(prompts)), cfg.rollout_batch_size // G)
        groups = rollouts(policy, tokenizer, [prompts[i] for i in picked], cfg, G, cfg.seed + step)
        generated = time.perf_counter()
        responses = [c for group in groups for c in group]
        advantages, raw, rmeta = compute_group_normalized_rewards(
            reward_fn, [c.text for c in responses], [truths[i] for i in picked for _ in range(G)],
            G, cfg.advantage_eps, cfg.normalize_by_std)
        data = pack_prompt_and_output([encode(tokenizer, prompts[i]) for i in picked
                                       for _ in range(G)], [c.token_ids for c in responses],
                                      pad, context_length(policy))
        data = {**{k: v.to(device) for k, v in data.items()},
                "advantages": advantages[:, None].to(device), "raw": raw[:, None].to(device)}
        data["old"] = batched_log_probs(policy, data, micro)  # once: every epoch's pi_old
        if cfg.kl_coef and ref_model is not None:
            data["ref"] = batched_log_probs(ref_model, data, micro)
        logs = []  # (entropy, clip fraction, KL) per micro-batch
        for _ in range(cfg.epochs_per_rollout_batch):
            order = torch.randperm(cfg.rollout_batch_size, device=device)
            for first in range(0, cfg.rollout_batch_size, cfg.train_batch_size):
                for idx in order[first:first + cfg.train_batch_size].split(micro):
                    mask = data["response_mask"][idx]
                    with autocast(policy):
                        out = get_response_log_probs(policy, data["input_ids"][idx],
                                                     data["labels"][idx], True)
                    _, meta = grpo_microbatch_train_step(
                        out["log_probs"], mask, cfg.train_batch_size // micro, cfg.loss_type,
                        data["raw"][idx], data["advantages"][idx], data["old"][idx],
                        cfg.cliprange if cfg.clip else math.inf, constant,
                        data["ref"][idx] if "ref" in data else None, cfg.kl_coef)
                    clipped = meta.get("clipped", torch.zeros_like(mask)).float()
                    logs.append([float(masked_mean(out["token_entropy"], mask)),
                                 float(masked_mean(clipped, mask)), float(meta.get("kl", 0.0))])
                optimizer_step(policy, optimizer)
        entropy, clip_fraction, kl = torch.tensor(logs).mean(0).tolist()
        rows.append({"step": step, "reward": raw.mean().item(), "format": rmeta["format"],
                     "groups_all_equal": rmeta["groups_all_equal"], "entropy": entropy,
                     "clip_fraction": clip_fraction, "kl": kl,
                     "length": sum(len(c.token_ids) for c in responses) / len(responses),
                     "rollout_tokens": sum(len(c.token_ids) for c in responses),
                     "generate_s": generated - start, "train_s": time.perf_counter() - generated,
                     "heldout": evaluate_fn(policy) if evaluate_fn and (
                         step % cfg.eval_interval == 0 or step == cfg.grpo_steps) else math.nan})
        if step % max(1, cfg.eval_interval // 2) == 0:
            print("  grpo " + ", ".join(f"{k} {v:.3g}" for k, v in rows[-1].items()
                                        if k in ("step", "reward", "format", "entropy", "length",
                                                 "clip_fraction", "heldout") and v == v))
    return rows


# Preferences: a reward model, and DPO, both Bradley-Terry on pairs of answers ---------------------
def sequence_log_probs(model: nn.Module, data: dict[str, Tensor]) -> Tensor:
    """log pi(response | prompt): the sum of the response tokens' log-probs (B,)."""
    out = get_response_log_probs(model, data["input_ids"], data["labels"])["log_probs"]
    return masked_normalize(out, data["response_mask"], -1)


def make_reward_model(lm: nn.Module) -> nn.Module:
    """InstructGPT's reward model: the (SFT) LM with one scalar per position as unembedding."""
    rm = copy.deepcopy(lm)
    d_model = rm.lm_head.weight.shape[1]
    rm.lm_head = (Linear(d_model, 1) if isinstance(lm, TransformerLM)
                  else nn.Linear(d_model, 1, bias=False)).to(model_device(lm))
    return rm


def reward_scores(rm: nn.Module, data: dict[str, Tensor]) -> Tensor:
    """Each prompt+response's score (B,): the output where the last response token is read."""
    full = torch.cat([data["input_ids"], data["labels"][:, -1:]], 1)  # the whole sequences
    scores = model_logits(rm, full)[..., 0].float()  # (B, T)
    positions = torch.arange(data["response_mask"].shape[1], device=scores.device)
    last = torch.where(data["response_mask"], positions, -1).max(-1).values + 1
    return scores.gather(-1, last[:, None]).squeeze(-1)


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """-log sigmoid(r_w - r_l): minus the log-likelihood that the chosen answer wins."""
    return -F.logsigmoid(reward_chosen - reward_rejected).mean()


def preference_rewards(model: nn.Module, ref: nn.Module | None, tokenizer,
                       pairs: Sequence[tuple[str, str, str]], beta: float) -> Tensor:
    """Rewards (2, n) of chosen, rejected: the RM's scores, or DPO's beta log pi / pi_ref."""
    max_len = context_length(model)
    max_len = max_len - 1 if max_len and ref is None else max_len  # reward_scores reads 1 more
    data = tokenize_prompt_and_output([p for p, _, _ in pairs] * 2, [c for _, c, _ in pairs]
                                      + [r for _, _, r in pairs], tokenizer, max_len)
    on_model = {k: v.to(model_device(model)) for k, v in data.items()}
    with autocast(model):
        if ref is None:
            return reward_scores(model, on_model).view(2, -1)
        policy = sequence_log_probs(model, on_model)
    with torch.no_grad(), autocast(ref):  # the reference may live on another device
        ref_lp = sequence_log_probs(ref, {k: v.to(model_device(ref)) for k, v in data.items()})
    return beta * (policy - ref_lp.to(policy.device)).view(2, -1)


def compute_per_instance_dpo_loss(lm: nn.Module, lm_ref: nn.Module, tokenizer, beta: float,
                                  prompt: str, response_chosen: str,
                                  response_rejected: str) -> Tensor:
    """DPO's loss on one pair, lm_ref frozen; format the strings first (e.g. Alpaca's template)."""
    check_reference(lm, lm_ref)
    pair = (prompt, response_chosen, response_rejected)
    return bradley_terry_loss(*preference_rewards(lm, lm_ref, tokenizer, [pair], beta))


def preference_pairs(model: nn.Module, tokenizer, prompts: Sequence[str], truths: Sequence[str],
                     references: Sequence[str], reward_fn: Callable,
                     cfg: AlignConfig) -> list[tuple[str, str, str]]:
    """(prompt, right answer (sampled, else the reference), wrong answer); no wrong, no pair."""
    groups = rollouts(model, tokenizer, prompts, cfg, cfg.group_size, cfg.seed + 7)
    pairs = []
    for prompt, truth, ref, group in zip(prompts, truths, references, groups):
        ok = [reward_fn(c.text, truth)["reward"] == 1 for c in group]  # each scored once
        right = [c.text for c, good in zip(group, ok) if good]
        wrong = [c.text for c, good in zip(group, ok) if not good]
        if wrong:
            pairs.append((prompt, (right or [ref])[0], wrong[0]))
    return pairs


def train_preferences(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str, str]],
                      heldout_pairs: Sequence[tuple[str, str, str]], cfg: AlignConfig,
                      ref: nn.Module | None = None) -> dict:
    """Bradley-Terry on the RM's scores or, given ref, DPO's implicit reward; pair accuracies."""
    lr, steps = (cfg.dpo_lr, cfg.dpo_steps) if ref is not None else (cfg.sft_lr, cfg.rm_steps)
    check_reference(model, ref)  # a no-op for the reward model (no ref)
    optimizer = adamw(model, lr)
    rng, rows, half = random.Random(cfg.seed + 3), [], max(1, cfg.batch_size // 2)
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(list(pairs), min(half, len(pairs)))
        chosen, rejected = preference_rewards(model, ref, tokenizer, batch, cfg.dpo_beta)
        loss = bradley_terry_loss(chosen, rejected)
        loss.backward()
        optimizer_step(model, optimizer)
        rows.append({"step": step, "loss": loss.item(),
                     "accuracy": (chosen > rejected).float().mean().item()})
    right = []
    with torch.no_grad():
        for i in range(0, len(heldout_pairs), half):
            batch = heldout_pairs[i:i + half]
            chosen, rejected = preference_rewards(model, ref, tokenizer, batch, cfg.dpo_beta)
            right += (chosen > rejected).tolist()
    return {"curve": rows, "heldout_pair_accuracy": sum(right) / max(1, len(right))}


# The offline task: arithmetic word problems with exact answers, written by the code ---------------
PEOPLE = (("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"),
          ("Zoe", "she"), ("Max", "he"), ("Eva", "she"))
ITEMS = ("apples", "pens", "coins", "books", "eggs", "cards", "shells", "stamps")
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}", "drops {n}")


@dataclass
class Problem:
    question: str  # "Tom has 7 apples. He loses 3. How many apples does Tom have now?"
    reasoning: str  # " 7 - 3 = 4."
    answer: str  # "4"
    story: str  # the same events told as a story, or solved in prose: the pretraining text


def make_problem(rng: random.Random, max_steps: int, max_number: int) -> Problem:
    """A start and 1..max_steps gains or losses of 1..max_number items (never below zero)."""
    (name, he), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    value, reasoning = rng.randint(1, max_number), ""
    question = story = f"{name} has {value} {item}."
    for _ in range(rng.randint(1, max_steps)):
        if value > 1 and rng.random() < 0.5:
            n, op, verb = rng.randint(1, min(value, max_number)), "-", rng.choice(LOSSES)
        else:
            n, op, verb = rng.randint(1, max_number), "+", rng.choice(GAINS)
        new = value + n if op == "+" else value - n
        event = f" {he.capitalize()} {verb.format(n=n)}"
        question += f"{event}."
        story += f"{event}, so {he} has {value} {op} {n} = {new} {item}."
        reasoning += f" {value} {op} {n} = {new}."
        value = new
    question += f" How many {item} does {name} have now?"
    # half the pretraining text tells the events, half solves the question in plain prose
    text = story if rng.random() < 0.5 else f"{question}{reasoning} So {name} has {value} {item}."
    return Problem(question, reasoning, str(value), text)


def make_task(cfg: AlignConfig) -> tuple[list[Problem], list[Problem], list[str]]:
    """Disjoint train and held-out problems; pretraining stories never tell a held-out one."""
    rng, unique, wanted = random.Random(cfg.seed), {}, cfg.heldout_problems + cfg.train_problems
    for _ in range(100 * wanted):
        p = make_problem(rng, cfg.max_steps, cfg.max_number)
        unique.setdefault(p.question, p)
        if len(unique) == wanted:
            break
    else:
        raise UsageError(f"--max_steps={cfg.max_steps} and --max_number={cfg.max_number} allow "
                         f"too few distinct questions for {wanted}")
    problems, test = list(unique.values()), set(list(unique)[:cfg.heldout_problems])
    stories = [p.story for p in (make_problem(rng, cfg.max_steps, cfg.max_number)
                                 for _ in range(cfg.pretrain_stories)) if p.question not in test]
    return problems[cfg.heldout_problems:], problems[:cfg.heldout_problems], stories


def response(p: Problem) -> str:
    """The demonstration: the worked steps, then the tagged answer (the prompt ends in <think>)."""
    return f"{p.reasoning} </think> <answer> {p.answer} </answer>"


# The demo: base -> SFT -> expert iteration, GRPO, DPO (each from SFT), with held-out accuracy -----
def pretrain(cfg: AlignConfig, stories: list[str], out: Path) -> tuple[TransformerLM, Tokenizer]:
    """BPE with the tags as special tokens (as chat models: SFT teaches them), then train.py."""
    specials, cut = [EOT, *TAGS], max(1, len(stories) // 20)
    for split, docs in (("train", stories[cut:]), ("val", stories[:cut])):
        write_atomic(out / f"{split}.txt", f"\n{EOT}\n".join(docs) + "\n")
    tok = Tokenizer(*train_bpe(str(out / "train.txt"), cfg.vocab_size, specials), specials)
    tok.save_dir(out / "tokenizer")
    for split in ("train", "val"):
        encode_file(tok, str(out / f"{split}.txt"), str(out / f"{split}.bin"))
    base = train(TrainConfig(
        train_bin=str(out / "train.bin"), val_bin=str(out / "val.bin"), preset=cfg.preset,
        tokenizer_dir=str(out / "tokenizer"), model=dict(cfg.model), lr=cfg.pretrain_lr,
        max_iters=cfg.pretrain_iters, batch_size=cfg.pretrain_batch, min_lr=cfg.pretrain_lr / 10,
        warmup_iters=max(1, cfg.pretrain_iters // 20), eval_interval=cfg.pretrain_iters,
        eval_iters=5, out_dir=str(out / "base"), overwrite=True, num_samples=0, device=cfg.device,
        compile=False, seed=cfg.seed))
    return base["model"], tok


def demo(cfg: AlignConfig) -> dict:
    """The task, a base model pretrained on related text, then every stage, evaluated held-out."""
    out, t0 = Path(cfg.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    problems, heldout, stories = make_task(cfg)
    print(f"task: {len(problems)} train and {len(heldout)} held-out problems of 1-{cfg.max_steps} "
          f"steps, numbers 1-{cfg.max_number}; e.g. {heldout[0].question!r} -> "
          f"{heldout[0].answer}\npretraining on {len(stories)} stories and worked solutions")
    base, tok = pretrain(cfg, stories, out)
    times = {"base": time.perf_counter() - t0}  # the task, the tokenizer and pretraining
    template = PROMPTS[cfg.prompt]
    reward_fn = r1_zero_reward_fn if cfg.prompt == "r1_zero" else question_only_reward_fn
    prompts = [template.format(question=p.question) for p in problems]
    truths, references = [p.answer for p in problems], [response(p) for p in problems]
    held = [template.format(question=p.question) for p in heldout]
    held_truths = [p.answer for p in heldout]

    def measure(model: nn.Module, prompts_: Sequence[str] = held, score=reward_fn) -> dict:
        kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=8 * cfg.batch_size, seed=cfg.seed)
        greedy = evaluate(model, tok, prompts_, held_truths, score, temperature=0.0, **kw)
        return {**evaluate(model, tok, prompts_, held_truths, score, n=cfg.eval_samples, **kw),
                "greedy": greedy["accuracy"]}

    def quick(model: nn.Module) -> float:
        return evaluate(model, tok, held, held_truths, reward_fn, seed=cfg.seed + 9,
                        max_new_tokens=cfg.max_new_tokens)["accuracy"]

    shots = "".join(prompt + ref + "\n" for prompt, ref in zip(prompts, references[:cfg.shots]))
    results = {"base": measure(base, [shots + prompt for prompt in held]),
               # the same model asked as its pretraining text asks, graded on its last number
               "base_q": measure(base, [p.question for p in heldout], question_only_reward_fn)}
    print(f"base model: held-out accuracy {results['base']['accuracy']:.3f} with a "
          f"{cfg.shots}-shot prompt in the format, {results['base_q']['accuracy']:.3f} asked "
          "with the question alone (its last number graded)")
    sft_model, curves = copy.deepcopy(base), {}
    demos = list(zip(prompts, references))[:cfg.sft_examples]
    for name, run in (
            ("sft", lambda m: sft(m, tok, demos, cfg.sft_steps, cfg, quick)),
            ("ei", lambda m: expert_iteration(m, tok, prompts, truths, reward_fn, cfg, quick)),
            ("grpo", lambda m: grpo_train(m, tok, prompts, truths, reward_fn, cfg, sft_model,
                                          quick)),
            ("dpo", lambda m: train_preferences(m, tok, pairs, held_pairs, cfg, sft_model))):
        start = time.perf_counter()
        policy = sft_model if name == "sft" else copy.deepcopy(sft_model)  # all start from SFT
        if name == "dpo":  # pairs of a right and a wrong answer of the SFT model
            pairs = preference_pairs(sft_model, tok, prompts[:cfg.dpo_questions], truths,
                                     references, reward_fn, cfg)
            held_pairs = preference_pairs(sft_model, tok, held, held_truths,
                                          [response(p) for p in heldout], reward_fn, cfg)
            print(f"{len(pairs)} train and {len(held_pairs)} held-out preference pairs")
        print(f"{name}:" if name == "sft" else f"{name}, from the SFT model:")
        curves[name] = run(policy)
        times[name] = time.perf_counter() - start
        results[name] = measure(policy)
        with atomic_output(out / f"{name}.pt") as tmp:  # infer.load_checkpoint_model reads it
            torch.save({"model": policy.state_dict(), "model_config": asdict(policy.config),
                        "tokenizer": tok.fingerprint(),  # the fields infer.find_tokenizer reads
                        "config": {"tokenizer_dir": str(out / "tokenizer")}}, tmp)
        print(f"{name}: held-out accuracy {results[name]['accuracy']:.3f}")
    rm = train_preferences(make_reward_model(sft_model), tok, pairs, held_pairs, cfg)
    k = f"pass@{cfg.eval_samples}"
    print(f"\nheld-out accuracy ({cfg.heldout_problems} questions; sampled at T=1, "
          f"{cfg.eval_samples} samples each; greedy)\n{'stage':<7}{'acc T=1':>8}{k:>8}"
          f"{'greedy':>8}{'format':>8}{'length':>8}{'seconds':>9}")
    for name, r in results.items():
        print(f"{name:<7}{r['accuracy']:>8.3f}{r[k]:>8.3f}{r['greedy']:>8.3f}{r['format']:>8.2f}"
              f"{r['length']:>8.1f}{times.get(name, math.nan):>9.1f}")
    dpo, rm_acc = curves["dpo"]["heldout_pair_accuracy"], rm["heldout_pair_accuracy"]
    print(f"held-out pairs ranked right: DPO's implicit reward {dpo:.3f}, the reward model "
          f"{rm_acc:.3f}\ntotal {time.perf_counter() - t0:.0f} s; results in {cfg.out}")
    write_atomic(out / "results.json", json.dumps(
        {"config": asdict(cfg), "results": results, "reward_model": rm, "curves": curves,
         "seconds": times}, indent=1, default=str))
    plot_rewards(curves, results, out / "rewards.png")
    return {s: r["accuracy"] for s, r in results.items()} | {"dpo_pairs": dpo, "rm_pairs": rm_acc}


def plot_rewards(curves: dict, results: dict, path: Path) -> None:
    """GRPO's training reward and held-out accuracy by step, SFT's accuracy as the line to beat."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no rewards.png (pip install matplotlib)")
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = curves["grpo"]
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="GRPO rollout reward")
    held = [(r["step"], r["heldout"]) for r in rows if r["heldout"] == r["heldout"]]  # not NaN
    ax.plot(*zip(*held), "o-", label="GRPO held-out accuracy")
    ax.axhline(results["sft"]["accuracy"], linestyle=":", color="gray", label="SFT held-out")
    ax.set(xlabel="GRPO step", ylabel="reward / accuracy (T=1)", ylim=(0, 1))
    ax.legend()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# Speed: rollouts dominate a GRPO step -------------------------------------------------------------
def bench(cfg: AlignConfig) -> dict:
    """GRPO steps of an untrained demo-shaped model (bytes, random reward): rollout tokens/s."""
    device, tok = resolve_device(cfg.device), Tokenizer({i: bytes([i]) for i in range(256)}, [],
                                                        [EOT])
    torch.manual_seed(cfg.seed)
    model = TransformerLM(ModelConfig.preset(cfg.preset, **cfg.model | {"vocab_size": 257}))
    model.to(device)
    problems, rng = make_task(replace(cfg, pretrain_stories=0))[0], random.Random(cfg.seed)
    prompts = [PROMPTS["r1_zero"].format(question=p.question) for p in problems]
    run = replace(cfg, grpo_steps=3, eval_interval=10**9)  # the first step warms up: not counted
    rows = grpo_train(model, tok, prompts, [p.answer for p in problems],
                      lambda text, truth: {"reward": float(rng.random() < 0.5)}, run)[1:]
    gen, trn = sum(r["generate_s"] for r in rows), sum(r["train_s"] for r in rows)
    tokens = sum(r["rollout_tokens"] for r in rows)
    print(f"bench on {device}: {run.rollout_batch_size} rollouts a step ({run.group_size} per "
          f"question), up to {run.max_new_tokens} new tokens, model {cfg.preset} {cfg.model}\n"
          f"rollouts: {tokens / gen:,.0f} generated tokens/s through infer.generate_batch\n"
          f"a GRPO step: {(gen + trn) / len(rows):.2f} s, {gen / (gen + trn):.0%} generating, "
          f"{trn / (gen + trn):.0%} training (old log-probs, forward, backward, AdamW)")
    return {"rollout_tokens_per_s": tokens / gen, "generate_share": gen / (gen + trn)}


# Command line: `python align.py [demo|eval|bench] [--key=value ...]` ------------------------------
EVAL_DEFAULTS = dict(model="", tokenizer_dir="", data="", prompt="r1_zero", n=1, max_new_tokens=256,
                     temperature=0.0, limit=0, batch_size=64, device="auto", seed=0)
COMMANDS = {"demo": asdict(AlignConfig()), "bench": asdict(AlignConfig()), "eval": EVAL_DEFAULTS}


def make_config(settings: dict, given: dict) -> AlignConfig:
    """The --size row over the defaults, then the flags given over the row."""
    cfg = {**asdict(AlignConfig()), **SIZES.get(settings["size"], {}), **given}
    for key, allowed in (("size", SIZES), ("prompt", PROMPTS),
                         ("length_normalization", ("masked_mean", "constant")),
                         ("loss_type", ("no_baseline", "reinforce_with_baseline", "grpo_clip"))):
        if cfg[key] not in allowed:
            raise UsageError(f"--{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    return AlignConfig(**cfg)


def eval_command(cfg: dict) -> dict:
    """Zero-shot evaluation of a checkpoint on a GSM8K JSONL or MMLU CSV file."""
    if not cfg["model"] or not cfg["data"]:
        raise UsageError("eval needs --model=CHECKPOINT and --data=FILE (.jsonl GSM8K, .csv MMLU)")
    task = "mmlu" if cfg["data"].endswith(".csv") else "gsm8k"
    if cfg["prompt"] not in PROMPTS:
        raise UsageError(f"--prompt must be one of {', '.join(PROMPTS)}, got {cfg['prompt']!r}")
    examples = (load_mmlu if task == "mmlu" else load_gsm8k)(cfg["data"])
    examples = examples[:cfg["limit"]] if cfg["limit"] > 0 else examples
    model, tok = load_checkpoint_model(cfg["model"], cfg["tokenizer_dir"])
    model.to(resolve_device(cfg["device"]))
    if task == "mmlu":
        prompts = [MMLU_PROMPT.format(*e["options"], question=e["question"]) for e in examples]
        truths, score = examples, lambda text, e: {
            "reward": float(parse_mmlu_response(e, text) == e["answer"])}
    else:  # the tagged answer if there is one, else the last number
        prompts = [PROMPTS[cfg["prompt"]].format(question=e["question"]) for e in examples]
        truths, score = [e["answer"] for e in examples], question_only_reward_fn
    result = evaluate(model, tok, prompts, truths, score, stop=STOP if task == "gsm8k" else (),
                      **{k: cfg[k] for k in ("n", "max_new_tokens", "temperature", "batch_size",
                                             "seed")})
    k = f"pass@{cfg['n']}"
    print(f"{task}: {len(examples)} examples from {cfg['data']}: accuracy {result['accuracy']:.3f}"
          f", {k} {result[k]:.3f}, {result['examples_per_s']:.1f} examples/s, "
          f"{result['tokens_per_s']:,.0f} tokens/s\nfirst output: {result['example'][:200]!r}")
    return result


def main(argv: list[str]) -> None:
    """`python align.py [demo|eval|bench] [--key=value ...]`; no command runs the demo."""
    if "-h" in argv or "--help" in argv:
        return print(__doc__)
    command, settings, given, _ = parse_command(argv, COMMANDS, "demo")
    if command == "eval":
        return eval_command(settings)
    (demo if command == "demo" else bench)(make_config(settings, given))


if __name__ == "__main__":
    run_cli(main)
