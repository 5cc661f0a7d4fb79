"""`skipray eval`: ROUGE-L, teacher-forced agreement, speedups, and the report files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skipray.training.evaluate import evaluate, parse_schedule, rouge_l
from skipray.training.text_metrics import answer_position, by_position


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
    # LCS "the cat the mat": 4 of 6 candidate words, 4 of 4 reference words
    assert rouge_l("the cat sat on the mat", "The cat, the mat!") == pytest.approx(2 * (4 / 6) * 1 / (4 / 6 + 1))
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_answered_and_lcs():
    from skipray.training.evaluate import answered, lcs_f1

    assert answered("It is New Delhi.", ["new delhi", "delhi"]) and not answered("Mumbai", ["new delhi"])
    assert lcs_f1([1, 2, 3], [1, 2, 3]) == 1.0 and lcs_f1([1, 2], [3]) == 0.0


def test_parse_schedule_file(tmp_path):
    from skipray.core.schedule import SkipSchedule

    s = SkipSchedule(30, 20, 8, 40, drop_order=list(range(29, 0, -1)))
    f = tmp_path / "s.json"
    f.write_text(json.dumps(s.to_dict()))
    assert parse_schedule(str(f), 30) == s
    (tmp_path / "meta.json").write_text(json.dumps({"schedule": s.to_dict(), "trained_steps": 3}))
    assert parse_schedule(str(tmp_path / "meta.json"), 30) == s
    with pytest.raises(ValueError, match="layers"):
        parse_schedule(str(f), 12)


def test_parse_schedule():
    assert parse_schedule("full", 30).is_full
    s = parse_schedule("16,6,64,4", 30)
    assert (s.max_layers, s.min_layers, s.decay_tokens, s.warmup_layers) == (16, 6, 64, 4)
    with pytest.raises(ValueError):
        parse_schedule("16,6", 30)
    assert parse_schedule("trained", 30, s, "m") is s
    with pytest.raises(ValueError, match="m records no trained schedule"):
        parse_schedule("trained", 30, None, "m")


def test_eval_report(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {
                "prompt": ["Hello there", "What is a cat?", "Count to three"],
                "reference": ["hi", "an animal", "one two three"],
            }
        ),
        prompts,
    )
    questions = tmp_path / "q.parquet"
    pq.write_table(
        pa.table({"question": ["Name a thing.", "Name another thing."], "answers": [[""], ["zzqqxxyy-never"]]}),
        questions,
    )
    rep = evaluate(
        str(tiny_model_dir),
        str(prompts),
        ["full", "5,3,4,1", "ref:t0.3", "ref:bf16"],
        str(tmp_path / "out"),
        max_new=8,
        batch=2,
        base_spec=str(tiny_model_dir),
        questions_path=str(questions),
        question_tokens=4,
    )
    full, skip, sampled, bf16 = rep["results"]
    assert full["rouge_l_vs_full"] == pytest.approx(1.0) and full["top1_agreement"] == pytest.approx(1.0)
    assert full["rouge_l_ids_vs_full"] == pytest.approx(1.0) and full["on_policy_agreement"] == pytest.approx(1.0)
    assert full["facts_known_by_full"] == 1 and full["fact_retention"] == 1.0 and full["facts_asked"] == 2
    assert full["fact_retention_by_position"] == {"1-6": {"questions": 1, "retained": 1.0}}  # "" is in any text
    assert sampled["top1_agreement"] is None and 0.0 <= sampled["rouge_l_ids_vs_full"] <= 1.0
    assert sampled["on_policy_agreement"] < 1.0  # temperature 0.3 on a random model leaves the argmax
    assert bf16["description"].startswith("the base model in bfloat16")
    assert full["theoretical_speedup"] == pytest.approx(1.0) and full["avg_layers"] == pytest.approx(6.0)
    assert skip["avg_layers"] < 6 and skip["theoretical_speedup"] > 1.0
    assert 0.0 <= skip["rouge_l_vs_full"] <= 1.0 and "rouge_l_vs_reference" in skip
    assert skip["measured_speedup"] > 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.json", "report.md", "quality_vs_speedup.png"} <= files
    assert json.loads((tmp_path / "out" / "report.json").read_text())["n"] == 3
    # the long-answer figures: full depth is its own reference; its rep-3 is the same in every row
    assert full["rep_tokens"] == 128 and full["rouge_l_ids_vs_full_long"] == pytest.approx(1.0)
    assert full["rep3"] == pytest.approx(full["rep3_full"]) == pytest.approx(skip["rep3_full"])
    assert full["on_policy_agreement_long"] == pytest.approx(1.0) and 0.0 <= (skip["rep3"] or 0.0) <= 1.0
    assert set(skip["theoretical_speedup_by_length"]) == {"8", "16", "64", "128"}
    assert set(skip["measured_speedup_by_length"]) == {"8", "16", "64", "128"}
    assert all(v > 0 for v in skip["measured_speedup_by_length"].values())
    assert sampled["measured_speedup_by_length"] == dict.fromkeys(["8", "16", "64", "128"], 1.0)
    assert "rep-3" in (tmp_path / "out" / "report.md").read_text()
    assert "| schedule |" in (tmp_path / "out" / "report.md").read_text()
    assert "| 1-6 (1) |" in (tmp_path / "out" / "report.md").read_text()  # fact retention by answer position


def test_rep3_counts_repeated_trigrams_up_to_eos():
    from skipray.training.evaluate import rep_n

    assert rep_n([1, 2, 3, 4, 5]) == 0.0
    assert rep_n([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)  # positions 0..3; (1, 2, 3) again at 3
    assert rep_n([7, 7, 7, 7, 9, 9, 9], eos_token_ids=(9,)) == pytest.approx(1 / 2)  # up to EOS, excluded
    assert rep_n([1, 2]) is None


def test_eval_in_bf16_scores_the_bf16_model_against_the_fp32_base(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["Hello there", "What is a cat?"]}), prompts)
    rep = evaluate(
        str(tiny_model_dir),
        str(prompts),
        ["full"],
        str(tmp_path / "out"),
        max_new=8,
        batch=2,
        base_spec=str(tiny_model_dir),
        dtype="bfloat16",
    )
    (full,) = rep["results"]
    (full32,) = evaluate(
        str(tiny_model_dir),
        str(prompts),
        ["full"],
        str(tmp_path / "out32"),
        max_new=8,
        batch=2,
        base_spec=str(tiny_model_dir),
    )["results"]
    assert rep["dtype"] == "bfloat16" and full["avg_layers"] == pytest.approx(6.0)
    # the same weights in bf16 at full depth: close to the fp32 base, but not the base itself
    assert full["perplexity_of_full_output"] == pytest.approx(full32["perplexity_of_full_output"], rel=0.05)
    assert full["perplexity_of_full_output"] != full32["perplexity_of_full_output"]
    with pytest.raises(ValueError, match="dtype"):
        evaluate(str(tiny_model_dir), str(prompts), ["full"], str(tmp_path / "x"), dtype="float16")


def test_parse_schedule_specs_go_through_the_resolver():
    from skipray.core.schedule import SkipSchedule
    from skipray.training.evaluate import parse_schedule

    trained = SkipSchedule(6, 6, 3, 4, shape="power", power=2.0, drop_order=(5, 4, 3, 2, 1, 0))
    # the positional short form is a plain linear schedule with SkipDecode's order, as it always was
    assert parse_schedule("5,3,4,1", 6, trained) == SkipSchedule(6, 5, 3, 4, warmup_layers=1)
    assert parse_schedule("5,3,4", 6, None) == SkipSchedule(6, 5, 3, 4)
    # CLI flag names override the trained schedule and keep its drop order
    s = parse_schedule("min-layers=2,decay-tokens=6,shape=linear", 6, trained)
    assert (s.min_layers, s.decay_tokens, s.shape, s.drop_order) == (2, 6, "linear", trained.drop_order)
    assert parse_schedule("--power=1.5", 6, trained).power == 1.5
    assert parse_schedule("trained", 6, trained) is trained and parse_schedule("full", 6).is_full
    for bad in ("5,3", "a,b,c", "min-layers=x", "min-layer=2"):
        with pytest.raises(ValueError):
            parse_schedule(bad, 6, trained)


def test_answer_position_and_retention_by_position():
    words = ["The", " capital", " is", " Can", "berra", "."]
    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    assert answer_position([0, 1, 2, 3, 4, 5], ["Canberra"], decode) == 5  # complete with its 5th token
    assert answer_position([0, 1, 2, 3, 4, 5], ["canberra", "capital"], decode) == 2  # lower-cased, the first one
    assert answer_position([0, 1, 2], ["Canberra"], decode) is None
    split = by_position([5, 6, 7, 9, 13, 30], [True, False, True, True, False, True])
    assert split == {
        "1-6": {"questions": 2, "retained": 0.5},
        "7-8": {"questions": 1, "retained": 1.0},
        "9-12": {"questions": 1, "retained": 1.0},
        "13+": {"questions": 2, "retained": 0.5},
    }
    assert by_position([], []) == {}
