"""Quality of a pruned small Llama: held-out perplexity after fxprune (l2, Taylor, activation) and Torch-Pruning.

Offline and on CPU. A byte-level Llama (``transformers.LlamaConfig``, random init, fixed seed) is trained on the
Python standard library's own sources (every ``--holdout-every``-th file, sorted by path, is held out), pruned at
each ratio by every criterion and head policy, and measured on the same held-out windows. At ``--ft-ratio``, l2
and the best criterion per tool and policy (``--ft-all``: every row), and the unpruned model as a control, get
the same short distillation fine-tune from the unpruned model (``fxprune.finetune``). Torch-Pruning (magnitude
importance, set up as its ``examples/LLMs/prune_llm.py``) prunes the same trained model side by side.
Ends with the LLM workflow check: prune -> oracle -> save_pretrained -> from_pretrained -> generate.

    .venv/bin/python benchmarks/llm_quality.py [--steps 800] [--ratios 0.3,0.5] [--ft-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxprune

VOCAB = 256  # byte-level tokens, no specials
Batch = tuple[torch.Tensor, torch.Tensor]
POLICY_NAMES = {False: "default", True: "whole heads", "query": "q heads in groups"}


def load_corpus(every: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stdlib's ``*.py`` files as bytes, sorted by path; every ``every``-th file is held out.

    Returns:
        Training bytes, held-out bytes (uint8 tensors) and the number of files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    train: list[bytes] = []
    held: list[bytes] = []
    for i, f in enumerate(files):
        (held if i % every == every - 1 else train).append(f.read_bytes() + b"\n")

    def as_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)

    return as_tensor(train), as_tensor(held), len(files)


def random_batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[Batch]:
    """``n`` batches of ``(input_ids, next_ids)`` from random windows of ``data`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        w = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


def logits_of(out: Any) -> torch.Tensor:
    """The logits of an HF output, a GraphModule's dict or tuple, or a plain tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"no logits in a {type(out).__name__}")


def lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy: ``target`` already holds the next token of every position."""
    return F.cross_entropy(logits_of(out).reshape(-1, VOCAB), target.reshape(-1))


class FlatLogits(nn.Module):
    """``(batch * seq, vocab)`` logits of a causal LM, the shape ``fxprune.finetune`` trains on."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.lm(input_ids)).reshape(-1, VOCAB)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-byte cross-entropy) over the fixed held-out ``windows`` (n, seq + 1)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].long()
        total += float(F.cross_entropy(logits_of(model(w[:, :-1])).reshape(-1, VOCAB), w[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was)
    return math.exp(total / count)


def unigram_perplexity(train: torch.Tensor, windows: torch.Tensor) -> float:
    """Perplexity of the training bytes' unigram distribution (add-one) on the held-out targets."""
    logp = (torch.bincount(train.long(), minlength=VOCAB).double() + 1).log()
    logp -= logp.exp().sum().log()
    return math.exp(-float(logp[windows[:, 1:].long().reshape(-1)].mean()))


def build_model(args: argparse.Namespace) -> nn.Module:
    """A random-init Llama (seeded); its KV cache is off so fxprune traces the root whole."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
        tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def train(model: nn.Module, data: torch.Tensor, windows: torch.Tensor, args: argparse.Namespace) -> float:
    """AdamW with warmup and cosine decay on random windows; prints the loss curve. Returns seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    batches = random_batches(data, args.steps, args.batch, args.seq, args.seed + 1)
    model.train()
    t0, losses = time.perf_counter(), []
    for step, (x, y) in enumerate(batches, 1):
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            mean = sum(losses[-10:]) / len(losses[-10:])
            print(f"  step {step:4d}  train loss {mean:.3f} (ppl {math.exp(mean):.2f})  {time.perf_counter() - t0:.0f}s",
                  flush=True)
    seconds = (time.perf_counter() - t0) / args.steps
    model.eval()
    print(f"  held-out ppl after training: {perplexity(model, windows):.3f}")
    return seconds


def dims(model: nn.Module) -> str:
    """Residual width, q/kv heads and MLP width of the first decoder layer."""
    layer = model.model.layers[0]
    att, hd = layer.self_attn, layer.self_attn.head_dim
    return (f"d {layer.self_attn.q_proj.in_features}, heads {att.q_proj.out_features // hd}/"
            f"{att.k_proj.out_features // hd}x{hd}, ff {layer.mlp.gate_proj.out_features}")


def n_params(model: nn.Module) -> int:
    """All parameters, embeddings and lm_head included."""
    return sum(p.numel() for p in model.parameters())


def prune_fxprune(model: nn.Module, ratio: float, criterion: str, heads: bool | str, calib: list[Batch],
                  args: argparse.Namespace) -> tuple[nn.Module, str]:
    """fxprune at ``ratio``; returns the pruned LlamaForCausalLM and the oracle's verdict. A criterion ending in
    ``+rc`` also refits the kept weights on the calibration batches (``reconstruct=True``); ``+rcb`` also adds
    the biases the config can describe, for the refit to compensate into (``reconstruct="bias"``)."""
    refit: bool | str = "bias" if criterion.endswith("+rcb") else criterion.endswith("+rc")
    criterion = criterion.removesuffix("+rcb").removesuffix("+rc")
    kwargs: dict[str, Any] = {"importance": criterion}
    if criterion == "taylor":
        kwargs["importance"] = fxprune.Taylor(calib, lm_loss)
    if criterion == "activation" or refit:
        kwargs["calibration"] = [x for x, _ in calib]
    if refit:
        kwargs["reconstruct"] = refit
    if args.stream:  # saved, streamed one decoder layer at a time (fxprune.prune_pretrained), reloaded
        return _streamed(model, ratio, heads, kwargs), "per layer"
    r = fxprune.prune(model, ratio, example_inputs=(calib[0][0][:2],), output="module", verify=args.verify,
                      prune_heads=heads, round_to=args.round_to, **kwargs)
    if r.oracle is not None:
        oracle = f"passed ({r.oracle.max_abs_diff:.0e})" if r.oracle.passed else f"not applicable: {r.oracle.reason}"
    elif r.parts:
        oracle = ", ".join(f"{p.name}: {p.oracle or p.skipped}" for p in r.parts)
    else:
        oracle = "-"
    return r.model, oracle


def _streamed(model: nn.Module, ratio: float, heads: bool | str, kwargs: dict[str, Any]) -> nn.Module:
    """``model`` saved to a folder, pruned by ``fxprune.prune_pretrained`` (each layer proven by its oracle) and
    loaded back."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(f"{d}/in")
        r = fxprune.prune_pretrained(f"{d}/in", f"{d}/out", ratio, prune_heads=heads, **kwargs)
        bad = [p for p in r.parts if p.params_after < p.params_before and p.oracle != "passed"]
        assert not bad, bad
        return transformers.AutoModelForCausalLM.from_pretrained(f"{d}/out").eval()


def prune_torch_pruning(model: nn.Module, ratio: float, pin_hidden: bool, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning as its LLM example: magnitude importance, whole query heads (not head dims), lm_head ignored.

    With ``pin_hidden`` the token embedding is ignored too, so the residual stream stays (like fxprune's).
    """
    import torch_pruning as tp

    model = copy.deepcopy(model)
    cfg = model.config
    num_heads: dict[nn.Module, int] = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads.update({m.q_proj: cfg.num_attention_heads, m.k_proj: cfg.num_key_value_heads,
                              m.v_proj: cfg.num_key_value_heads})
    ignored = [model.lm_head] + ([model.model.embed_tokens] if pin_hidden else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=ratio, global_pruning=False)
        pruner.step()
    # the attributes its example updates after pruning
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            cfg.num_attention_heads = m.q_proj.out_features // m.head_dim
            cfg.num_key_value_heads = m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    return model


def distill(student: nn.Module, teacher: nn.Module, batches: list[Batch], args: argparse.Namespace) -> float:
    """Short KD fine-tune of ``student`` in place (AdamW, cosine); returns seconds per step."""
    flat = [(x, y.reshape(-1)) for x, y in batches]
    wrapped = FlatLogits(student)
    t0 = time.perf_counter()
    fxprune.finetune(wrapped, flat, teacher=FlatLogits(teacher), epochs=1, lr=args.ft_lr, alpha=args.kd_alpha,
                     temperature=args.kd_temperature, progress=False,
                     optimizer=torch.optim.AdamW(student.parameters(), lr=args.ft_lr, weight_decay=0.0))
    student.eval()
    return (time.perf_counter() - t0) / len(batches)


def workflow_check(model: nn.Module, calib: list[Batch], windows: torch.Tensor) -> None:
    """prune -> oracle -> save_pretrained -> from_pretrained -> generate, each step checked."""
    import transformers

    r = fxprune.prune(model, 0.5, example_inputs=(calib[0][0][:2],), output="module", verify=True, prune_heads=True)
    print(f"  pruned {r.params_before} -> {r.params_after} params, oracle: {r.oracle}, "
          f"parts: {[(p.name, p.oracle) for p in r.parts]}")
    with tempfile.TemporaryDirectory() as tmp:
        r.model.save_pretrained(tmp)
        back = transformers.LlamaForCausalLM.from_pretrained(tmp).eval()
    x = windows[:4, :-1].long()
    with torch.no_grad():
        diff = float((logits_of(back(x)) - logits_of(r.model(x))).abs().max())
    cfg = back.config
    print(f"  from_pretrained: intermediate_size {cfg.intermediate_size}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, max |logits difference| vs the pruned model {diff:.1e}")
    prompt = torch.tensor([list(b"import os\n\ndef ")])
    outs = [back.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=c, pad_token_id=0) for c in (True, False)]
    same = torch.equal(outs[0], outs[1])
    text = bytes(outs[0][0].tolist()).decode("utf-8", "replace")
    print(f"  generate (greedy, 40 bytes; KV cache on == off: {same}): {text!r}")


def block_influence(model: nn.Module, calib: list[Batch]) -> list[float]:
    """ShortGPT's block influence per decoder layer: 1 - mean cosine(input, output) over the calibration tokens."""
    scores: dict[int, list[float]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            scores.setdefault(i, []).append(float(1 - F.cosine_similarity(x, y, dim=-1).mean()))
        hooks.append(layer.register_forward_hook(record, with_kwargs=True))
    with torch.no_grad():
        for x, _ in calib:
            model(x)
    for h in hooks:
        h.remove()
    return [sum(v) / len(v) for _, v in sorted(scores.items())]


def depth_rows(model: nn.Module, calib: list[Batch], windows: torch.Tensor) -> list[str]:
    """One block removed: held-out perplexity of every choice, and which one each method picks."""
    ppl = []
    for i in range(len(model.model.layers)):
        other = copy.deepcopy(model)
        other.model.layers = nn.ModuleList(layer for j, layer in enumerate(other.model.layers) if j != i)
        ppl.append(perplexity(other, windows))
    bi = block_influence(model, calib)
    t0 = time.perf_counter()
    r = fxprune.prune_depth(model, 1, calibration=[x for x, _ in calib])
    secs = time.perf_counter() - t0
    base = perplexity(model, windows)
    lines = ["| block removed | held-out ppl | change | block influence (ShortGPT) | calibration loss (fxprune) |",
             "|---|---|---|---|---|"]
    losses = dict(r.steps[0])
    for i, p in enumerate(ppl):
        lines.append(f"| {i} | {p:.3f} | {100 * (p / base - 1):+.0f}% | {bi[i]:.4f} | {losses[i]:.4f} |")
    lines.append(f"\nblock influence removes block {min(range(len(bi)), key=bi.__getitem__)}, fxprune.prune_depth "
                 f"removes block {r.removed[0]} ({secs:.1f}s), the best is block {min(range(len(ppl)), key=ppl.__getitem__)}")
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--holdout-every", type=int, default=10, help="every N-th file is held out")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seq + 1 bytes")
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--criteria", default="l2,taylor,activation,l2+rc,activation+rc",
                   help="comma-separated; +rc: reconstruct=True on the calibration batches")
    p.add_argument("--head-policies", default="0,1,query",
                   help="prune_heads values to run: 0 (MLP only), 1 (whole KV groups), query (query heads in groups)")
    p.add_argument("--round-to", type=int, default=None, help="fxprune's round_to (kernel-friendly widths)")
    p.add_argument("--calib-batches", type=int, default=4, help="Taylor / activation batches of 8 windows")
    p.add_argument("--ft-steps", type=int, default=100, help="KD fine-tune steps per row (0: none)")
    p.add_argument("--ft-ratio", type=float, default=0.5, help="fine-tune only the rows at this ratio")
    p.add_argument("--ft-all", action="store_true", help="fine-tune every row at --ft-ratio, not l2 and the best")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip fxprune's oracle")
    p.add_argument("--stream", action="store_true",
                   help="fxprune rows through fxprune.prune_pretrained (saved, streamed layer by layer, reloaded)")
    p.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false")
    p.add_argument("--no-workflow", dest="workflow", action="store_false", help="skip the save/load/generate check")
    p.add_argument("--no-depth", dest="depth", action="store_false", help="skip the one-block depth table")
    p.add_argument("--checkpoint", help="load the trained model's state_dict from here if present, else save it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")
    start = time.perf_counter()

    train_bytes, held_bytes, n_files = load_corpus(args.holdout_every)
    starts = torch.linspace(0, len(held_bytes) - args.seq - 2, args.eval_windows).long().tolist()
    windows = torch.stack([held_bytes[s:s + args.seq + 1] for s in starts])
    print(f"corpus: {n_files} stdlib files, {len(train_bytes) / 1e6:.1f} MB train, {len(held_bytes) / 1e6:.1f} MB "
          f"held out; eval {args.eval_windows} x {args.seq} held-out bytes; "
          f"unigram ppl {unigram_perplexity(train_bytes, windows):.2f}")

    model = build_model(args)
    total = n_params(model)
    print(f"model: Llama {dims(model)}, {args.layers} layers, {total} params")
    step_s = float("nan")
    if args.checkpoint and Path(args.checkpoint).exists():
        model.load_state_dict(torch.load(args.checkpoint))
        print(f"  loaded the trained weights from {args.checkpoint}")
    else:
        step_s = train(model, train_bytes, windows, args)
        if args.checkpoint:
            torch.save(model.state_dict(), args.checkpoint)
    model.eval()
    base = perplexity(model, windows)
    train_done = time.perf_counter() - start

    calib = random_batches(train_bytes, args.calib_batches, 8, args.seq, args.seed + 2)
    ft_batches = random_batches(train_bytes, args.ft_steps, args.batch, args.seq, args.seed + 3)
    rows: list[list[str]] = [["unpruned", "-", "-", "0", "1.000", dims(model), f"{base:.3f}", "-", "-", "-"]]
    jobs: list[tuple[str, str, str, float, Callable[[], tuple[nn.Module, str]]]] = []
    for ratio in (float(r) for r in args.ratios.split(",") if r):
        for heads in (h if h == "query" else bool(int(h)) for h in args.head_policies.split(",")):
            for crit in args.criteria.split(","):
                jobs.append(("fxprune", crit, POLICY_NAMES[heads], ratio,
                             lambda r=ratio, c=crit, h=heads: prune_fxprune(model, r, c, h, calib, args)))
        for pin in (True, False) if args.torch_pruning else ():
            jobs.append(("Torch-Pruning", "magnitude (L2)", f"q heads, d {'kept' if pin else 'pruned'}", ratio,
                         lambda r=ratio, pin=pin: (prune_torch_pruning(model, r, pin, calib[0][0][:1, :16]), "-")))
    kept: dict[int, nn.Module] = {}  # row index -> pruned model, for the rows at --ft-ratio
    for tool, crit, policy, ratio, job in jobs:
        t0 = time.perf_counter()
        try:
            pruned, oracle = job()
        except Exception as e:  # a failure is a result: recorded, the run goes on
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
            print(f"{tool} {crit} {policy} {ratio}: FAILED {msg}", flush=True)
            rows.append([tool, crit, policy, f"{ratio}", "-", "-", "failed", "-", "-", msg])
            continue
        secs = time.perf_counter() - t0
        rows.append([tool, crit, policy, f"{ratio}", f"{n_params(pruned) / total:.3f}", dims(pruned),
                     f"{perplexity(pruned, windows):.3f}", "-", f"{secs:.0f}", oracle])
        print(" | ".join(rows[-1]), flush=True)
        if math.isclose(ratio, args.ft_ratio):
            kept[len(rows) - 1] = pruned

    # KD: the unpruned model (the same steps: what they alone are worth), then at --ft-ratio per tool and
    # policy l2 / magnitude and the criterion with the best perplexity before fine-tuning (or every row)
    ft_step_s: list[float] = []
    chosen: list[int] = [0] if args.ft_steps else []
    for key in sorted({(rows[i][0], rows[i][2]) for i in kept}) if args.ft_steps else ():
        mine = [i for i in kept if (rows[i][0], rows[i][2]) == key]
        best = min(mine, key=lambda i: float(rows[i][6]))
        chosen += mine if args.ft_all else sorted({best, *(i for i in mine if rows[i][1] == "l2")})
    for i in chosen:
        student = copy.deepcopy(model) if i == 0 else kept[i]
        ft_step_s.append(distill(student, model, ft_batches, args))
        rows[i][7] = f"{perplexity(student, windows):.3f}"
        print(f"KD {' | '.join(rows[i][:4])}: ppl {rows[i][6]} -> {rows[i][7]}", flush=True)

    if args.depth:
        print("\n### Depth: one of the decoder layers removed\n")
        print("\n".join(depth_rows(model, calib, windows)), flush=True)

    if args.workflow:
        print("\nworkflow check (fxprune l2, whole heads, 0.5):")
        try:
            workflow_check(model, calib, windows)
        except Exception as e:
            print(f"  FAILED {type(e).__name__}: {e}")

    print(f"\n## Held-out perplexity of a pruned byte-level Llama ({datetime.date.today()})\n")
    print(f"- command: `{' '.join(['.venv/bin/python', *sys.argv])}`")
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"({args.threads} torch threads), torch {torch.__version__}, commit {git_commit()}")
    print(f"- model: {total} params ({dims(model)}, {args.layers} layers), {args.steps} AdamW steps of "
          f"{args.batch} x {args.seq} bytes, {step_s:.2f} s/step; unpruned held-out ppl {base:.3f}")
    if ft_step_s:
        print(f"- KD fine-tune: {args.ft_steps} steps of {args.batch} x {args.seq} (alpha {args.kd_alpha}, "
              f"T {args.kd_temperature}, AdamW lr {args.ft_lr}), {sum(ft_step_s) / len(ft_step_s):.2f} s/step")
    print(f"- wall time: training {train_done:.0f}s, total {time.perf_counter() - start:.0f}s\n")
    print("| tool | criterion | heads | ratio | params kept | dims (layer 0) | ppl | ppl after KD | prune s | oracle |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
