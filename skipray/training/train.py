"""`skipray train`: fine-tune a causal LM to generate well under a skip schedule.

Contract: the student's forward is ``skipray.core.model.forward`` with ``training_plan``: every position
runs exactly the layers the cached decoder runs for it (tests prove the two equal). Data is Parquet
with ``prompt_ids``/``response_ids`` (from ``skipray distill-data``), or ``prompt``+``response`` text,
or ``text``; the loss covers response tokens only (all tokens for ``text``). Loss: ``kl_weight`` x
KL(teacher || student), the teacher being the frozen full-depth original (LoRA disabled, or a frozen
copy for full fine-tuning) or, when the data carries them (``distill-data --topk``), the teacher's
top-k log-probs recorded when the data was made (``topk_kl``; no teacher pass per step), plus
``ce_weight`` x cross-entropy on the data. A LoRA adapter applies only to generated positions (the
response columns), exactly where the decoder applies it, so the prompt and full-depth requests keep
the base model's output; full fine-tuning changes the prompt's pass too. LoRA (peft) or full
fine-tuning; AdamW, linear warm-up + cosine decay, gradient clipping and accumulation, periodic
checkpoints with ``--resume``. The output directory holds safetensors weights (a LoRA adapter or a
full model) plus ``skipray.json`` recording the schedule, so ``skipray generate --model DIR`` uses it.
Reading and batching the data is ``skipray.training.data``; the ``skipray train`` command line is
``skipray.training.train_cli``.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from skipray.training.data import TrainBatch, batches, collate, load_examples

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "smollm2-base"
    schedule: dict = field(default_factory=dict)
    lora_r: int = 32
    lora_alpha: int = 64
    full_finetune: bool = False
    lr: float = 4e-4
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 30
    kl_weight: float = 1.0
    divergence: str = "forward"  # forward KL, reverse KL or JSD between teacher and student (see `divergence`)
    early_tokens: int = 0  # the first answer tokens whose loss is weighted by early_weight (0: none)
    early_weight: float = 1.0  # e.g. 4.0: facts, decided in the first tokens, weigh four times as much
    ce_weight: float = 0.0
    clip: float = 1.0
    max_len: int = 256
    save_every: int = 50
    seed: int = 0
    device: str | None = None
    init_adapter: str | None = None  # start from this LoRA adapter's weights (e.g. a gentler schedule's)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.early_tokens < 0 or self.early_weight <= 0:
            raise ValueError(
                f"early_tokens must be >= 0 and early_weight > 0, got {self.early_tokens}, {self.early_weight}"
            )


# -- loss -----------------------------------------------------------------------------------------
DIVERGENCES = ("forward", "reverse", "jsd")


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """Per-position divergence between teacher and student log-probs over the same outcomes ``(..., K)``
    -> ``(...)``: ``forward`` KL(teacher || student) (mode covering, the usual distillation loss),
    ``reverse`` KL(student || teacher) (mode seeking) or ``jsd``, the Jensen-Shannon divergence with
    beta 0.5 (bounded by log 2). DistillSpec (arXiv 2310.08461, section 4) compares the three for
    training a cheaper drafter to agree with its target. Raises ``ValueError`` for another ``kind``."""
    if kind == "forward":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "reverse":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        m_logp = torch.logaddexp(t_logp, s_logp) - math.log(2.0)
        return 0.5 * (t_logp.exp() * (t_logp - m_logp)).sum(-1) + 0.5 * (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def topk_kl(t_logp: torch.Tensor, t_ids: torch.Tensor, s_logp: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """Divergence (``kind`` as in ``divergence``; default KL(teacher || student)) per position from the
    teacher's top-k log-probs ``(..., k)`` at ids ``t_ids`` and the student's full log-probs ``(..., V)``.
    The teacher's mass outside its top k is one more outcome, matched against the student's mass outside
    the same k tokens: the divergence of the two coarsened (k+1)-outcome distributions, a lower bound of
    the full one (merging outcomes never raises an f-divergence) that is exact when k covers the vocabulary."""
    s_top = s_logp.gather(-1, t_ids)
    p_tail = (1 - t_logp.exp().sum(-1, keepdim=True)).clamp(min=1e-8)
    q_tail = (1 - s_top.exp().sum(-1, keepdim=True)).clamp(min=1e-8)
    return divergence(torch.cat([t_logp, p_tail.log()], -1), torch.cat([s_top, q_tail.log()], -1), kind)


def adapter_mask(schedule, batch: int, prompt_len: int, total_len: int, device=None) -> torch.Tensor:
    """Where the skip adapter applies in the training layout, ``(batch, total_len)`` bool: column
    ``prompt_len + i`` (the token consumed at generation step ``i``) when ``schedule.skips(i)``, as the
    engines decide it per step; never the prompt."""
    steps = range(max(total_len - prompt_len, 0))
    cols = [False] * min(prompt_len, total_len) + [schedule.skips(i) for i in steps]
    return torch.tensor(cols, device=device)[None].expand(batch, total_len)


def answer_logits(model, batch: TrainBatch, schedule) -> torch.Tensor:
    """Student logits (B, R, V) predicting response tokens ``0..R-1``, computed as decoding computes them:
    the prompt once at full depth without gradients (the skip adapter never touches it), then the
    response columns under ``schedule`` with the adapter, attending to the prompt's cached keys. Equal
    to the single parallel forward (tests), and about a third cheaper: no backward through the prompt."""
    from skipray.core.model import Segment, forward, full_plan, training_plan

    tokens, real, positions, P = batch.tokens, batch.real, batch.positions, batch.prompt_len
    B, T = tokens.shape
    cache = model.new_cache(B, P)
    with torch.no_grad():
        prompt = Segment(
            tokens[:, :P], positions[:, :P], full_plan(model.num_layers), real[:, :P], logits_at=slice(P - 1, P)
        )
        first = forward(model, prompt, cache=cache).float()
    if T - 1 == P:
        return first
    ans = slice(P, T - 1)  # response token i (i < R-1) is consumed at generation step i
    answer = Segment(
        tokens[:, ans],
        positions[:, ans],
        training_plan(schedule, 0, T - 1 - P),
        real[:, ans],
        adapter=adapter_mask(schedule, B, 0, T - 1 - P, tokens.device),
    )
    rest = forward(model, answer, prefix=cache).float()
    return torch.cat([first, rest], 1)


def skip_loss(
    model,
    teacher,
    batch: TrainBatch,
    schedule,
    kl_weight: float,
    ce_weight: float,
    cached_prompt: bool | None = None,
    divergence_kind: str = "forward",
    early: tuple[int, float] = (0, 1.0),
) -> tuple[torch.Tensor, dict]:
    """Distillation (+ optional CE) loss of the skip student against the full-depth teacher; the
    distillation term is ``divergence_kind`` (``divergence``), logged as ``kl`` whatever its kind.
    ``early = (n, w)``: the first ``n`` answer tokens weigh ``w`` times the others in the loss's token mean
    (the logged ``agree`` stays an unweighted share).
    ``cached_prompt`` (default: when the student is a LoRA skip adapter, which never touches the prompt)
    runs the prompt once without gradients (``answer_logits``); else one forward covers everything."""
    from skipray.core.model import Segment, forward, full_plan, training_plan

    tokens, real, positions, P = batch.tokens, batch.real, batch.positions, batch.prompt_len
    B, T = tokens.shape
    mask = batch.loss_mask[:, P - 1 :]
    cols = slice(P - 1, T - 1)
    if cached_prompt is None:
        cached_prompt = getattr(model, "peft", None) is not None
    if cached_prompt:
        student = answer_logits(model, batch, schedule)
    else:  # full fine-tuning changes the prompt's pass too: one forward over everything
        plan = training_plan(schedule, P, T)
        adapter = adapter_mask(schedule, B, P, T, tokens.device)
        student = forward(model, Segment(tokens, positions, plan, real, logits_at=cols, adapter=adapter)).float()
    logp = F.log_softmax(student, -1)
    count = mask.sum().clamp(min=1)
    weight = mask.float()
    if early[0] > 0 and early[1] != 1.0:
        weight[:, : early[0]] *= early[1]
    n = weight.sum().clamp(min=1e-6)
    stats = {}
    loss = torch.zeros((), device=student.device)
    if kl_weight > 0 and batch.teacher_ids is not None:
        kl = topk_kl(batch.teacher_logprobs, batch.teacher_ids, logp, divergence_kind)
        kl = (kl * weight).sum() / n
        agree = ((student.argmax(-1) == batch.teacher_ids[..., 0]) & mask).sum() / count
        loss = loss + kl_weight * kl
        stats.update(kl=float(kl.detach()), agree=float(agree))
    elif kl_weight > 0:
        with torch.no_grad(), teacher() as tmodel:  # full depth, base weights (no adapter anywhere)
            full = Segment(tokens, positions, full_plan(model.num_layers), real, logits_at=cols)
            t_logits = forward(tmodel, full).float()
        t_logp = F.log_softmax(t_logits, -1)
        kl = divergence(t_logp, logp, divergence_kind)
        kl = (kl * weight).sum() / n
        agree = ((student.argmax(-1) == t_logits.argmax(-1)) & mask).sum() / count
        loss = loss + kl_weight * kl
        stats.update(kl=float(kl.detach()), agree=float(agree))
    if ce_weight > 0:
        targets = tokens[:, P:]
        ce = F.cross_entropy(logp.transpose(1, 2), targets, reduction="none")
        ce = (ce * weight).sum() / n
        loss = loss + ce_weight * ce
        stats["ce"] = float(ce.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats


# -- model setup ----------------------------------------------------------------------------------
def prepare(cfg: TrainConfig):
    """-> (loaded, SkipModel to train, teacher context factory, trainable parameters)."""
    import contextlib
    import copy

    from skipray.core.model import SkipModel
    from skipray.loading import load

    loaded = load(cfg.model, device=cfg.device, dtype=torch.float32)
    model, hf = loaded.model, loaded.model.hf  # SkipModel reaches hf's submodules at call time
    if cfg.full_finetune:
        frozen = SkipModel(copy.deepcopy(hf).requires_grad_(False))
        teacher = lambda: contextlib.nullcontext(frozen)  # noqa: E731
        params = list(hf.parameters())
    else:
        from peft import LoraConfig, get_peft_model

        names = {n.split(".")[-1] for n, _ in hf.named_modules()}
        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=[t for t in LORA_TARGETS if t in names],
        )
        peft_model = get_peft_model(hf, lcfg)  # injects LoRA layers into hf in place

        @contextlib.contextmanager
        def teacher():
            with peft_model.disable_adapter():
                yield model

        model.peft = peft_model
        if cfg.init_adapter:  # warm start, e.g. the ~2x adapter from the ~1.5x one (same drop order)
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, grown_adapter(peft_model, Path(cfg.init_adapter), cfg))
        params = [p for p in peft_model.parameters() if p.requires_grad]
    model.train()
    return loaded, model, teacher, params


def grown_adapter(peft_model, path: Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA state dict at ``path`` (``adapter_model.safetensors``, ``adapter_config.json``) fitted to
    ``peft_model``'s rank: the same rank as is, a lower one grown without changing the function: ``A``'s
    first rows and ``B``'s first columns are the saved ones, ``B`` rescaled by the old over the new scaling
    (``lora_alpha / r``, Hu et al. 2021, eq. 3), the new columns of ``B`` zero (so the update is unchanged at
    the start) and the new rows of ``A`` at peft's random init (so they train). Capacity is then added to a
    trained adapter instead of starting over. Raises ``ValueError`` for a higher saved rank or other targets."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(path / "adapter_model.safetensors")
    old = json.loads((path / "adapter_config.json").read_text()) if (path / "adapter_config.json").exists() else {}
    r_old, alpha_old = old.get("r", cfg.lora_r), old.get("lora_alpha", cfg.lora_alpha)
    if r_old == cfg.lora_r and alpha_old == cfg.lora_alpha:
        return saved
    if r_old > cfg.lora_r:
        raise ValueError(f"{path}: rank {r_old} is above --lora-r {cfg.lora_r}; an adapter can only grow")
    current = get_peft_model_state_dict(peft_model)
    if set(current) != set(saved):
        raise ValueError(f"{path}: its LoRA layers differ from this model's ({len(saved)} vs {len(current)} tensors)")
    rescale = (alpha_old / r_old) / (cfg.lora_alpha / cfg.lora_r)
    out = {}
    for key, now in current.items():
        grown = now.detach().clone()
        if "lora_A" in key:
            grown[:r_old] = saved[key]
        else:
            grown.zero_()
            grown[:, :r_old] = saved[key] * rescale
        out[key] = grown
    return out


def save(model, loaded, cfg: TrainConfig, out: Path, schedule, step: int, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "schedule": schedule.to_dict(),
        "base_model": cfg.model,
        "trained_steps": step,
        "train_config": asdict(cfg),
        "command": shlex.join(["skipray", *sys.argv[1:]]),  # as typed, without this machine's install path
        **(extra or {}),
    }
    if hasattr(model, "peft"):
        model.peft.save_pretrained(out, safe_serialization=True)
        cfg_path = out / "adapter_config.json"
        ac = json.loads(cfg_path.read_text())
        ac["base_model_name_or_path"] = cfg.model
        cfg_path.write_text(json.dumps(ac, indent=2))
    else:
        model.hf.save_pretrained(out, safe_serialization=True)
        loaded.tokenizer.save_pretrained(out)
    (out / "skipray.json").write_text(json.dumps(meta, indent=2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train(
    cfg: TrainConfig, resume: bool = False, progress: bool = True, rank: int = 0, world: int = 1, wrap=None
) -> Path:
    """Run training; returns the output directory. ``wrap``: optional DDP wrapper hook (Ray Train)."""
    from tqdm import tqdm

    from skipray.core.schedule import resolve_schedule

    torch.manual_seed(cfg.seed)
    loaded, model, teacher, params = prepare(cfg)
    flags = {k: v for k, v in cfg.schedule.items() if k != "num_layers"}
    schedule = resolve_schedule(flags, model.num_layers).schedule  # the rule every entry point uses
    examples = load_examples(cfg.data, loaded.tokenizer, max_len=cfg.max_len)
    examples = examples[rank::world]
    pad = loaded.tokenizer.pad_token_id or 0
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sync = wrap(params) if wrap else (lambda: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    step = 0
    if resume and (ckpt / "trainer_state.pt").exists():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        from safetensors.torch import load_file

        weights = load_file(ckpt / "trainable.safetensors")
        named = dict(_trainable(model))
        for k, v in weights.items():
            named[k].data.copy_(v)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    data = batches(examples, cfg.batch_size, cfg.seed + step)
    log = (out / "log.jsonl").open("a") if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress or rank != 0)
    t0 = time.perf_counter()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        stats_acc: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = collate(next(data), pad).to(model.hf.device)
            loss, stats = skip_loss(
                model,
                teacher,
                batch,
                schedule,
                cfg.kl_weight,
                cfg.ce_weight,
                divergence_kind=cfg.divergence,
                early=(cfg.early_tokens, cfg.early_weight),
            )
            (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + v / cfg.grad_accum
        sync()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats_acc.items()})
        if log:
            log.write(
                json.dumps({"step": step, "lr": lr_at(step - 1, cfg), "time": time.perf_counter() - t0, **stats_acc})
                + "\n"
            )
            log.flush()
        if rank == 0 and (step % cfg.save_every == 0 or step == cfg.steps):
            _checkpoint(model, opt, ckpt, step)
            save(model, loaded, cfg, out, schedule, step)
    bar.close()
    return out


def _trainable(model):
    root = model.peft if hasattr(model, "peft") else model.hf
    return [(n, p) for n, p in root.named_parameters() if p.requires_grad]


def _checkpoint(model, opt, ckpt: Path, step: int) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in _trainable(model)}, ckpt / "trainable.safetensors")
    torch.save({"optimizer": opt.state_dict(), "step": step}, ckpt / "trainer_state.pt.tmp")
    (ckpt / "trainer_state.pt.tmp").replace(ckpt / "trainer_state.pt")
