"""Skip-aware training on a tiny model: loss falls, save/load round trip, resume, data formats."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from skipray.training.data import Example, collate, load_examples
from skipray.training.train import TrainConfig, train

SCHED = {"max_layers": 5, "min_layers": 3, "decay_tokens": 8, "warmup_layers": 1, "shape": "linear"}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rng = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        p = torch.randint(3, 2000, (int(torch.randint(3, 9, (1,), generator=rng)),), generator=rng).tolist()
        r = torch.randint(3, 2000, (int(torch.randint(4, 14, (1,), generator=rng)),), generator=rng).tolist()
        rows.append({"prompt_ids": p, "response_ids": r})
    path = tmp_path_factory.mktemp("data") / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def strong_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Llama with large random weights, so that skipping layers changes its output a lot."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    c = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.25,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    out = tmp_path_factory.mktemp("strong")
    LlamaForCausalLM(c).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cfg(tmp_path, data_path, model_dir, **kw):
    base = dict(
        data=data_path,
        out=str(tmp_path / "out"),
        model=str(model_dir),
        schedule=SCHED,
        steps=12,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        save_every=4,
        kl_weight=1.0,
        ce_weight=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_collate_layout():
    b = collate([Example([5, 6, 7], [8, 9]), Example([1], [2, 3, 4])], pad_id=0)
    assert b.prompt_len == 3
    assert b.tokens.tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 1, 2, 3, 4]]
    assert b.loss_mask.tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    assert b.positions[1].tolist()[2:] == [0, 1, 2, 3]
    assert b.teacher_ids is None and b.teacher_logprobs is None
    top = collate(
        [
            Example([5], [8, 9], [[8, 1], [9, 2]], [[-0.5, -3.0], [-0.25, -2.0]]),
            Example([1], [2], [[2, 7]], [[-0.5, -1.0]]),
        ],
        pad_id=0,
    )
    assert top.teacher_ids.tolist() == [[[8, 1], [9, 2]], [[2, 7], [0, 0]]]  # (B, R, k); padding: no mass
    assert top.teacher_logprobs[0, 1].tolist() == [-0.25, -2.0] and top.teacher_logprobs[1, 1, 0] == -1e4


def test_lora_distillation_lowers_loss_and_roundtrips(
    tmp_path, data_path, strong_model_dir, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("SKIPRAY_CACHE", str(tmp_path / "cache"))
    sched = {"max_layers": 4, "min_layers": 2, "decay_tokens": 6, "warmup_layers": 1, "shape": "linear"}
    out = train(cfg(tmp_path, data_path, strong_model_dir, schedule=sched, steps=15, lr=1e-2), progress=False)
    log = losses(out)
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first * 0.8, (first, last)
    meta = json.loads((out / "skipray.json").read_text())
    assert meta["schedule"]["max_layers"] == 4 and meta["trained_steps"] == 15
    assert (out / "adapter_model.safetensors").exists()

    from skipray.loading import load

    loaded = load(str(out), device="cpu")
    assert loaded.schedule.max_layers == 4 and loaded.schedule.num_layers == 6  # trained schedule is the default
    base = load(str(strong_model_dir), device="cpu")
    assert base.schedule is None
    # the adapter is attached unmerged: the base weights stay, full depth is the base model exactly,
    # and the trained schedule (with the adapter on its generated tokens) differs from the base
    assert torch.equal(
        loaded.model.layers[5].self_attn.q_proj.base_layer.weight, base.model.layers[5].self_attn.q_proj.weight
    )
    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.schedule import SkipSchedule

    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    p = SamplingParams(max_tokens=10)
    full = SkipSchedule.full(6)
    want = [c.token_ids for c in Engine(base.model, full).generate(prompts, p)]
    assert [c.token_ids for c in Engine(loaded.model, full).generate(prompts, p)] == want
    skip_trained = [c.token_ids for c in Engine(loaded.model, loaded.schedule).generate(prompts, p)]
    skip_base = [c.token_ids for c in Engine(base.model, loaded.schedule).generate(prompts, p)]
    assert skip_trained != skip_base


def test_resume_continues_from_checkpoint(tmp_path, data_path, tiny_model_dir):
    c = cfg(tmp_path, data_path, tiny_model_dir, steps=8)
    train(c, progress=False)
    c2 = cfg(tmp_path, data_path, tiny_model_dir, steps=12)
    train(c2, resume=True, progress=False)
    steps = [r["step"] for r in losses(tmp_path / "out")]
    assert steps == list(range(1, 9)) + list(range(9, 13))  # picked up at step 9, not from scratch


def test_full_finetune_with_ce(tmp_path, data_path, tiny_model_dir):
    out = train(
        cfg(tmp_path, data_path, tiny_model_dir, full_finetune=True, ce_weight=0.5, lr=1e-3, steps=6), progress=False
    )
    assert (out / "model.safetensors").exists() and (out / "skipray.json").exists()
    assert "ce" in losses(out)[0]


def test_text_and_prompt_response_formats(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p1 = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["Hi there", "What is 2+2?"], "response": ["Hello!", "4"]}), p1)
    ex = load_examples(str(p1), tok)
    assert len(ex) == 2 and ex[1].response_ids == tok("4", add_special_tokens=False)["input_ids"]
    p2 = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["one two three four"]}), p2)
    assert len(load_examples(str(p2), tok)[0].response_ids) >= 3
    p3 = tmp_path / "c.parquet"
    pq.write_table(pa.table({"foo": [1]}), p3)
    with pytest.raises(ValueError, match="columns"):
        load_examples(str(p3), tok)


def test_init_adapter_warm_starts_from_saved_weights(tmp_path, data_path, tiny_model_dir):
    from safetensors.torch import load_file

    from skipray.training.train import prepare

    out = train(cfg(tmp_path, data_path, tiny_model_dir, steps=4, lr=1e-2), progress=False)
    saved = load_file(out / "adapter_model.safetensors")
    _, model, _, _ = prepare(cfg(tmp_path, data_path, tiny_model_dir, init_adapter=str(out)))
    named = {n.replace(".default", ""): p for n, p in model.peft.named_parameters() if "lora_" in n}
    assert saved and all(torch.equal(named[k], v) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # not the zero init


def test_init_adapter_grows_to_a_higher_rank_without_changing_the_model(tmp_path, data_path, tiny_model_dir):
    """A rank-4 adapter warm-starts a rank-8 one: the same logits at the start, then it trains."""
    from skipray.training.train import prepare

    small = train(cfg(tmp_path, data_path, tiny_model_dir, steps=4, lr=1e-2, lora_r=4, lora_alpha=8), progress=False)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    logits = []
    for r, alpha in ((4, 8), (8, 32)):
        kw = dict(init_adapter=str(small), lora_r=r, lora_alpha=alpha, out=str(tmp_path / f"r{r}"))
        _, model, _, _ = prepare(cfg(tmp_path, data_path, tiny_model_dir, **kw))
        with torch.no_grad():
            logits.append(model.peft(input_ids=ids).logits)
            with model.peft.disable_adapter():
                base = model.peft(input_ids=ids).logits
    assert not torch.allclose(logits[0], base, atol=1e-3)  # the adapter matters, so equality below says something
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    grown = train(
        cfg(
            tmp_path,
            data_path,
            tiny_model_dir,
            steps=4,
            lr=1e-2,
            lora_r=8,
            lora_alpha=32,
            init_adapter=str(small),
            out=str(tmp_path / "grown"),
        ),
        progress=False,
    )
    assert json.loads((grown / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(ValueError, match="only grow"):
        prepare(cfg(tmp_path, data_path, tiny_model_dir, init_adapter=str(grown), lora_r=4, lora_alpha=8))


def test_train_command_line_builds_the_config():
    """`skipray train` is ``skipray.training.train_cli``: flags -> ``TrainConfig``, schedule flags required."""
    from skipray.cli import build_parser
    from skipray.training.train_cli import cmd_train, config_from_args

    args = build_parser().parse_args(
        ["train", "--data", "d.parquet", "--out", "o", "--max-layers", "20", "--min-layers", "8", "--steps", "3"]
    )
    assert args.func is cmd_train
    cfg = config_from_args(args)
    assert cfg.steps == 3 and cfg.schedule == {"max_layers": 20, "min_layers": 8, "decay_tokens": 64}
    with pytest.raises(ValueError, match="--max-layers"):
        config_from_args(build_parser().parse_args(["train", "--data", "d", "--out", "o"]))


def test_early_tokens_weigh_more_in_the_loss():
    """``early=(n, w)``: a weighted token mean; weighting every token alike changes nothing, and a huge weight on
    the first two answer tokens gives the loss of the answers cut to those two tokens (causal: the same logits)."""
    from conftest import tiny_llama

    from skipray.core.model import SkipModel
    from skipray.core.schedule import SkipSchedule
    from skipray.training.train import skip_loss

    model = SkipModel(tiny_llama())
    g = torch.Generator().manual_seed(0)

    def example(r: int) -> Example:
        ids = torch.randint(3, 90, (r, 3), generator=g).tolist()
        lps = torch.log_softmax(torch.randn(r, 3, generator=g), -1).tolist()
        return Example([5, 6, 7], list(range(10, 10 + r)), ids, lps)

    exs = [example(6), example(6)]
    cut = [Example(e.prompt_ids, e.response_ids[:2], e.teacher_ids[:2], e.teacher_logprobs[:2]) for e in exs]
    sched = SkipSchedule(6, 6, 2, decay_tokens=4)

    def loss(examples, early):
        with torch.no_grad():
            out, _ = skip_loss(model, None, collate(examples, 0), sched, 1.0, 0.0, cached_prompt=False, early=early)
        return float(out)

    plain = loss(exs, (0, 1.0))
    assert loss(exs, (6, 5.0)) == pytest.approx(plain, rel=1e-5)
    assert loss(exs, (2, 1e6)) == pytest.approx(loss(cut, (0, 1.0)), rel=1e-4)
    assert loss(exs, (2, 1e6)) != pytest.approx(plain, rel=1e-3)


def test_training_under_a_sublayer_schedule_lowers_the_loss_and_loads_back(
    tmp_path, data_path, strong_model_dir, monkeypatch
):
    """Attention and MLP blocks dropping separately: the skip adapter learns it (the loss falls) and the saved
    model decodes with the same sublayer schedule."""
    monkeypatch.setenv("SKIPRAY_CACHE", str(tmp_path / "cache"))
    sched = {"max_layers": 4, "min_layers": 2, "decay_tokens": 6, "shape": "linear", "sublayers": True}
    out = train(cfg(tmp_path, data_path, strong_model_dir, schedule=sched, steps=15, lr=1e-2), progress=False)
    log = losses(out)
    assert sum(r["loss"] for r in log[-3:]) < 0.8 * sum(r["loss"] for r in log[:3])
    from skipray.loading import load

    loaded = load(str(out), device="cpu")
    assert loaded.schedule.sublayers and isinstance(loaded.schedule.num_active(10), float)
