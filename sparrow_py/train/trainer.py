"""The training loop: MTP loss, AdamW with warmup + cosine, clipping, accumulation, checkpoints.

Determinism: everything random is a function of (seed, position in the run), never of how the
run got there: the sample order of epoch e is a permutation seeded by (seed, e), and the
position jitter and the trained entries (loss_fraction) of micro-step i come from a generator
seeded by (seed, i). A checkpoint holds the draft's parameters, the optimizer, the step counter and
the losses so far, so a resumed run computes the same losses as an uninterrupted one
(tests/test_train_pipeline.py checks it).

DDP: under torchrun (WORLD_SIZE > 1) each rank takes every world_size-th micro-batch of the same
global order and gradients are averaged; rank 0 writes checkpoints and prints.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .data import collate, load_sample, sample_to_rows
from .evaluate import evaluate
from .export import save_draft
from .model import DraftConfigError, SparrowDraft


@dataclass
class TrainOptions:
    steps: int = 0                  # optimizer steps; 0: from epochs
    epochs: float = 1.0
    batch_size: int = 1             # samples per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1       # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0               # max gradient norm (0: off)
    mtp_steps: int = 3              # k: steps unrolled after the first (loss has k + 1 terms)
    step_weight: float = 0.8        # loss = sum_s step_weight**s * CE_s
    target_temperature: float = 1.0  # the target distribution distilled: softmax(logits / T); 0 = its argmax
    position_jitter: int = 0        # max random offset added to text RoPE positions per sample
    loss_fraction: float = 1.0      # share of a sample's entries whose chains are trained (the rest are keys only)
    seed: int = 0
    save_every: int = 0             # checkpoint every n optimizer steps (0: only at the end)
    eval_every: int = 0             # held-out acceptance every n steps (0: only at the end)
    eval_depth: int = 4             # chain length simulated in held-out evaluation
    eval_samples: int = 16          # held-out samples used for the progress-bar acceptance
    sample_cache_mb: int = 1024     # training samples kept in memory between uses (the rest stream from disk)
    device: str = "cpu"
    bf16: bool | None = None        # autocast to bf16; None: where the hardware computes bf16 (CUDA, cpu_has_bf16)
    progress: bool = True


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)   # per optimizer step
    step_losses: list[list[float]] = field(default_factory=list)  # per optimizer step, CE of each MTP step
    eval: dict | None = None
    seconds_per_step: float = 0.0


def target_distribution(batch: dict[str, torch.Tensor], model: SparrowDraft, target_temperature: float,
                        bf16: bool = False) -> dict[str, torch.Tensor]:
    """The target's distribution at the stored rows of a batch that some loss term reads, computed
    once for all MTP steps (step s of entry j reads the row of entry j + s, so each row serves up to
    k + 1 terms).

    Returns "row" [R] (a stored row's index in what follows, -1 where no term reads it), "keep" [n]
    (rows with at least one id the draft can propose), "idx" [n, m] (draft ids of the row's values;
    absent when the values cover the draft vocabulary in order), and either "argmax" [n, 1]
    (temperature 0) or "p" and "logp" [n, m] of softmax(values / T) and "neg_entropy" [n], -H(p).
    bf16: the head's product in bf16 where the target is sharpened (T > 0), as a bf16 step runs
    the draft: on the real pair's data (7,747 rows) softmax(logits / 0.5) moves by a KL of 7e-4
    nats on average (the draft's own is ~1.8) and the product takes 9.5 ms instead of 39; the
    argmax, which T = 0 trains on alone, flips at 1.1% of the rows, so that stays float32."""
    n_rows = len(batch["final"] if "final" in batch else batch["topk_val"])
    read = torch.zeros(n_rows, dtype=torch.bool, device=batch["target_row"].device)
    read[batch["target_row"][batch["target_row"] >= 0]] = True
    row = torch.full((n_rows,), -1, dtype=torch.long, device=read.device)
    row[read] = torch.arange(int(read.sum()), device=read.device)
    if "final" in batch:  # the target's logits again, through its frozen head: every id kept
        if bf16 and target_temperature > 0:
            vals = (batch["final"][read].bfloat16() @ model.target_head_rows(torch.bfloat16).t()).float()
        else:
            vals = batch["final"][read] @ model.target_head_rows().t()
        out = {"keep": torch.ones(len(vals), dtype=torch.bool, device=vals.device)}
    else:
        vals, idx = batch["topk_val"][read], batch["topk_idx"][read]
        if model.d2t is not None:
            # target ids outside the draft vocabulary are dropped and the rest renormalised
            t2d = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=model.d2t.device)
            t2d[model.d2t] = torch.arange(len(model.d2t), device=model.d2t.device)
            idx = t2d[idx]
            vals = vals.masked_fill(idx < 0, float("-inf"))
            idx = idx.clamp(min=0)
        out = {"keep": torch.isfinite(vals).any(-1), "idx": idx}
    out["row"] = row
    if target_temperature == 0:
        out["argmax"] = vals.argmax(-1, keepdim=True)
    else:
        vals = vals / target_temperature
        out["p"] = torch.softmax(vals, dim=-1)
        out["logp"] = torch.log_softmax(vals, dim=-1).clamp(min=-1e4)
        out["neg_entropy"] = (out["p"] * out["logp"]).sum(-1)
    return out


def mtp_loss(logits: list[torch.Tensor], batch: dict[str, torch.Tensor], model: SparrowDraft,
             step_weight: float, target_temperature: float = 1.0, bf16: bool = False
             ) -> tuple[torch.Tensor, list[float]]:
    """sum_s step_weight^s * mean over valid (entry, step) of KL(target distribution || draft).

    logits[s]: [B, M, N], or only the valid rows of step s ([n_s, N], forward_mtp's logit_rows).

    The target distribution is softmax over its logits divided by target_temperature: the frozen
    head applied to the stored final hidden state, or the stored (top-k) logits renormalised over
    the kept ids; with a reduced draft vocabulary, target ids outside it are dropped and the rest
    renormalised (the draft cannot propose them anyway). A temperature below 1 sharpens it toward
    its argmax, which is all that greedy verification accepts; 0 is the argmax itself (the
    cross-entropy of the target's greedy token)."""
    total = logits[0].new_zeros(())
    per_step = []
    with torch.no_grad():
        target = target_distribution(batch, model, target_temperature, bf16)
    for s, lg in enumerate(logits):
        rows = batch["target_row"][:, :, s]
        valid = rows >= 0
        if not valid.any():
            per_step.append(float("nan"))
            continue
        lg = (lg if lg.dim() == 2 else lg[valid]).float()
        r = target["row"][rows[valid]]
        keep = target["keep"][r]
        if not bool(keep.all()):
            lg, r = lg[keep], r[keep]
        if target_temperature == 0:
            # the limit of softmax(vals / T) as T -> 0: all mass on the argmax (H(p) = 0)
            logq = F.log_softmax(lg, dim=-1)
            if "idx" in target:
                logq = logq.gather(-1, target["idx"][r])
            kl = -logq.gather(-1, target["argmax"][r]).mean()
        elif "idx" in target:
            # KL(p || q) = CE(p, q) - H(p): the same gradient as the CE of the spec, but 0 at a
            # perfect draft, so the logged loss shows how far the draft is from the target however
            # flat p is
            logq = F.log_softmax(lg, dim=-1).gather(-1, target["idx"][r])
            kl = (target["p"][r] * (target["logp"][r] - logq)).sum(-1).mean()
        else:
            # the same KL with p over the whole draft vocabulary: torch's cross-entropy with
            # probabilities fuses the log-softmax, product and sum (half the time of the three
            # written out, forward and backward, at 800 x 8,192)
            kl = F.cross_entropy(lg, target["p"][r]) + target["neg_entropy"][r].mean()
        per_step.append(float(kl.detach()))
        total = total + (step_weight ** s) * kl
    return total, per_step


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX, as oneDNN sees it).
    Without, torch emulates bf16 matmuls: on an AVX2 AMD EPYC a draft's step took 56-61 s in bf16
    against 2.3 s in float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: assume emulation
        return False


def retain_freed_memory() -> bool:
    """Keep the memory torch frees in this process for its next tensors, instead of handing it
    back to the kernel (glibc only; returns whether it applied).

    A training step allocates and frees a dozen float tensors of rows x draft vocabulary (30-55
    MB each on the real pair). glibc serves every block above 32 MB, and any above its adaptive
    threshold, with a fresh mmap, and returns freed heap tops past 128 KiB: each of those tensors
    then costs one page fault per 4 KiB touched, which made the loss's softmax, division and
    products several times slower than on reused memory (the target's distribution took 118-148
    ms a step instead of 65-88). With mmap and trimming off, freed blocks stay in the heap and
    are reused: the real pair's step took 0.80-0.83 s instead of 0.94-1.06 (2 threads, AMD EPYC
    Zen 4, alternating runs of 25 steps), 0.89 s over a 5,000-step run against 1.10 s over the
    3,000 before it. The cost is memory held: 6.6 GB of anonymous memory after 200 steps against
    5.9, and the 5,000-step run's trainer stayed at 8.5 GB from step ~1,700 to the end.
    Process-wide, so the training CLI calls it, not train()."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def lr_at(step: int, total: int, opt: TrainOptions) -> float:
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    span = max(total - opt.warmup_steps, 1)
    t = min(max(step - opt.warmup_steps, 0) / span, 1.0)
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def init_from_target(model: SparrowDraft, target) -> None:
    """A sensible start: fc averages the taps; norms, o_proj and the MLP come from the target's last
    layer (into a draft FFN of another width as place_mlp puts them); q/k/v read the hidden half
    with the target's last-layer weights (the embedding half stays small and random); the final
    norm is the target's; a reduced head starts as the target's rows for the draft vocabulary."""
    c = model.config
    H, nT = c.hidden_size, len(c.taps)
    sd = target.last_layer().state_dict()
    with torch.no_grad():
        model.fc.weight.copy_(torch.cat([torch.eye(H)] * nT, dim=1) / nT)
        for name, dst in (("q_proj", model.q_proj), ("k_proj", model.k_proj), ("v_proj", model.v_proj)):
            w = sd.get(f"self_attn.{name}.weight")
            if w is not None and w.shape == dst.weight[:, H:].shape:
                dst.weight[:, H:].copy_(w.float())
        mlp = [sd.get(f"mlp.{name}_proj.weight") for name in ("gate", "up", "down")]
        if all(w is not None for w in mlp):
            place_mlp(model, *(w.float() for w in mlp))
        for src, dst in (("self_attn.o_proj.weight", model.o_proj.weight),
                         ("input_layernorm.weight", model.embed_norm.weight),
                         ("input_layernorm.weight", model.hidden_norm.weight),
                         ("post_attention_layernorm.weight", model.ffn_norm.weight)):
            if src in sd and sd[src].shape == dst.shape:
                dst.copy_(sd[src].float())
        model.output_norm.weight.copy_(target.lm.norm.weight.float())
        if model.lm_head is not None:
            model.lm_head.weight.copy_(model.target_head[model.d2t])


def place_mlp(layer: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """Put an MLP of width n (gate, up [n, H]; down [H, n]) into `layer` (one of a draft's
    decoder_layers()), of width m. Its first min(n, m) units get those weights; units past n keep
    their random gate and up rows but get zero down_proj columns, so a wider draft computes exactly
    what the narrower MLP computed and still learns (down's gradient there is nonzero, and through
    it gate's and up's)."""
    n, m = gate.shape[0], layer.gate_proj.weight.shape[0]
    k = min(n, m)
    with torch.no_grad():
        layer.gate_proj.weight[:k].copy_(gate[:k])
        layer.up_proj.weight[:k].copy_(up[:k])
        layer.down_proj.weight[:, :k].copy_(down[:, :k])
        layer.down_proj.weight[:, k:].zero_()


_MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _reshaped(model: SparrowDraft, config, keep) -> SparrowDraft:
    """A draft of `config` holding model's weights for every state-dict key keep(key) accepts (the
    others stay as SparrowDraft initialises them), and the target's weights when attached."""
    new = SparrowDraft(config)
    kept = {k: v for k, v in model.state_dict().items() if keep(k)}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and not kept.keys() & set(missing), (missing, unexpected)
    if model.target_head.numel():
        new.set_target_weights(model.target_embed, model.target_head)
    return new


def widen_ffn(model: SparrowDraft, intermediate_size: int) -> SparrowDraft:
    """The same draft with an FFN of intermediate_size >= its own: every other weight (and the
    target's, when attached) carried over, the MLP placed by place_mlp, so its outputs are unchanged."""
    c = model.config
    if intermediate_size < c.intermediate_size:
        raise DraftConfigError(f"FFN width {intermediate_size} is below the draft's {c.intermediate_size}: a draft "
                               "can be widened, not narrowed")
    wide = _reshaped(model, replace(c, intermediate_size=intermediate_size), lambda k: not k.endswith(_MLP))
    for old, new in zip(model.decoder_layers(), wide.decoder_layers()):
        place_mlp(new, old.gate_proj.weight, old.up_proj.weight, old.down_proj.weight)
    return wide


def deepen(model: SparrowDraft, num_layers: int) -> SparrowDraft:
    """The same draft with num_layers >= its own decoder layers: the new ones go on top as the
    identity (SparrowDraft starts them with zero o_proj and down_proj), so it computes exactly what
    it did, and they learn (o_proj's and down_proj's gradients are nonzero, through them the rest)."""
    c = model.config
    if num_layers < c.num_layers:
        raise DraftConfigError(f"{num_layers} layers is below the draft's {c.num_layers}: a draft can be deepened, "
                               "not cut")
    return _reshaped(model, replace(c, num_layers=num_layers), lambda k: True)


def choose_draft_vocab(files: list[Path], vocab_size: int, n: int) -> torch.Tensor:
    """The n most frequent target tokens in the training samples (ties: lower id), sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for f in files:
        ids = load_sample(f)["ids"].long()
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))[:n]
    return torch.tensor(sorted(order), dtype=torch.long)


def _ddp() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def micro_batches(n_files: int, opt: TrainOptions, total_steps: int):
    """The global order of micro-batches: list over optimizer steps of lists of file-index lists."""
    order: list[int] = []
    epoch = 0
    need = total_steps * opt.grad_accum * opt.batch_size
    while len(order) < need:
        g = torch.Generator().manual_seed(opt.seed * 1000 + epoch)
        order += torch.randperm(n_files, generator=g).tolist()
        epoch += 1
    per_micro = [order[i:i + opt.batch_size] for i in range(0, need, opt.batch_size)]
    return [per_micro[s * opt.grad_accum:(s + 1) * opt.grad_accum] for s in range(total_steps)]


def train(model: SparrowDraft, train_files: list[Path], eval_samples: list[dict], opt: TrainOptions,
          out_dir: str | Path, resume: bool = True, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train `model` (already attached to its target's weights) on cached sample files.

    Writes out_dir/checkpoint.pt (every save_every steps and at the end) and the exported draft
    (model.safetensors + config.json) at the end. stop_after: stop after that many optimizer
    steps of this run (to test resuming)."""
    import time

    rank, world = _ddp()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(opt.device)
    model.to(dev)
    torch.manual_seed(opt.seed)
    n_files = len(train_files)
    if n_files == 0:
        raise ValueError("no usable training samples")
    per_step = opt.batch_size * opt.grad_accum * world
    total = opt.steps or max(1, int(math.ceil(opt.epochs * n_files / per_step)))
    plan = micro_batches(n_files, TrainOptions(**{**asdict(opt), "batch_size": opt.batch_size * world}), total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=(0.9, 0.95), weight_decay=opt.weight_decay)
    ddp_model = model
    if world > 1:
        # glimpse_proj gets no gradient from a batch without video (or a draft without glimpses)
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    result = TrainResult()
    start = 0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck["config"] != model.config.to_dict():
            raise ValueError(f"{ckpt_path}: checkpoint is for another draft config; use another --out")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start = ck["step"]
        result.losses, result.step_losses = ck["losses"], ck["step_losses"]
        log(f"resumed from {ckpt_path} at step {start}/{total}")
    # bf16 by default wherever it runs in hardware: on an AMD EPYC with AVX-512 BF16 (Zen 5) a step of the
    # real pair's draft took 0.47 s against 0.91 s in float32; emulated, it is 25x slower than float32
    hardware_bf16 = dev.type == "cuda" or (dev.type == "cpu" and cpu_has_bf16())
    use_bf16 = opt.bf16 if opt.bf16 is not None else hardware_bf16
    if use_bf16 and not hardware_bf16 and dev.type == "cpu" and rank == 0:
        log("warning: bf16 autocast on a CPU without bf16 instructions is emulated, and usually much slower "
            "than float32 (measured 25x on an AVX2 AMD EPYC): train with --bf16 off (the default on such a CPU)")
    # samples stream from disk; the most recent stay in memory up to opt.sample_cache_mb, so that
    # the trainer's memory does not grow with the data set
    cache: OrderedDict[int, dict] = OrderedDict()
    cache_bytes = 0

    def sample(i: int) -> dict:
        nonlocal cache_bytes
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        s = load_sample(train_files[i])
        size = sum(v.nbytes for v in s.values() if isinstance(v, torch.Tensor))
        cache[i] = s
        cache_bytes += size
        while cache_bytes > opt.sample_cache_mb * 2**20 and len(cache) > 1:
            _, old = cache.popitem(last=False)
            cache_bytes -= sum(v.nbytes for v in old.values() if isinstance(v, torch.Tensor))
        return s

    def save(step: int):
        if rank != 0:
            return
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "losses": result.losses, "step_losses": result.step_losses,
                    "config": model.config.to_dict(), "options": asdict(opt)}, tmp)
        os.replace(tmp, ckpt_path)

    bar = None
    if opt.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    acc_text = ""
    t0 = time.perf_counter()
    n_done = 0
    model.train()
    for step in range(start, total):
        if stop_after is not None and n_done >= stop_after:
            break
        lr = lr_at(step, total, opt)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum, parts_sum = 0.0, None
        for micro, file_idx in enumerate(plan[step]):
            mine = file_idx[rank::world]
            rows = []
            for k, fi in enumerate(mine):
                g = torch.Generator().manual_seed(opt.seed * 1_000_003 + (step * opt.grad_accum + micro) * 1009 + k)
                jitter = int(torch.randint(0, opt.position_jitter + 1, (1,), generator=g)) if opt.position_jitter else 0
                rows.append(sample_to_rows(sample(fi), opt.mtp_steps, jitter, opt.loss_fraction, g))
            batch = {k: v.to(dev) for k, v in collate(rows).items()}
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits, _ = ddp_model(batch["taps"], batch["tokens"], batch["positions"], batch["n_entries"],
                                      batch["anchor_start"], opt.mtp_steps, batch["glimpses"],
                                      batch["glimpse_pos"], batch["glimpse_valid"], batch["target_row"] >= 0)
            loss, parts = mtp_loss(logits, batch, model, opt.step_weight, opt.target_temperature, use_bf16)
            (loss / opt.grad_accum).backward()
            loss_sum += float(loss.detach()) / opt.grad_accum
            parts_sum = [p / opt.grad_accum for p in parts] if parts_sum is None else \
                [a + p / opt.grad_accum for a, p in zip(parts_sum, parts)]
        if opt.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, opt.clip)
        optimizer.step()
        if world > 1:
            t = torch.tensor([loss_sum], device=dev)
            torch.distributed.all_reduce(t)
            loss_sum = float(t) / world
        result.losses.append(loss_sum)
        result.step_losses.append(parts_sum)
        n_done += 1
        done = step + 1
        if opt.save_every and done % opt.save_every == 0 and done < total:
            save(done)
        if rank == 0 and eval_samples and opt.eval_every and done % opt.eval_every == 0:
            st = evaluate(model, eval_samples[:opt.eval_samples], opt.eval_depth)
            acc_text = f"{st.mean_accepted_length:.2f}"
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", **({"acc_len": acc_text} if acc_text else {}))
            bar.update(1)
    if bar is not None:
        bar.close()
    result.seconds_per_step = (time.perf_counter() - t0) / max(n_done, 1)
    finished = len(result.losses) >= total
    save(len(result.losses))
    if finished and rank == 0:
        save_draft(model, out_dir)
        if eval_samples:
            st = evaluate(model, eval_samples, opt.eval_depth)
            result.eval = {"mean_accepted_length": st.mean_accepted_length,
                           "acceptance_by_depth": st.acceptance_by_depth(), "tokens": st.tokens,
                           "forwards": st.forwards}
            for line in st.lines():
                log("held-out: " + line)
    return result
