"""`skipray eval`: ROUGE-L, teacher-forced agreement, speedups, and the report files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skipray.evaluate import evaluate, parse_schedule, rouge_l


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
    # LCS "the cat the mat": 4 of 6 candidate words, 4 of 4 reference words
    assert rouge_l("the cat sat on the mat", "The cat, the mat!") == pytest.approx(2 * (4 / 6) * 1 / (4 / 6 + 1))
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


def test_parse_schedule():
    assert parse_schedule("full", 30).is_full
    s = parse_schedule("16,6,64,4", 30)
    assert (s.max_layers, s.min_layers, s.decay_tokens, s.warmup_layers) == (16, 6, 64, 4)
    with pytest.raises(ValueError):
        parse_schedule("16,6", 30)


def test_eval_report(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["Hello there", "What is a cat?", "Count to three"],
                             "reference": ["hi", "an animal", "one two three"]}), prompts)
    rep = evaluate(str(tiny_model_dir), str(prompts), ["full", "5,3,4,1"], str(tmp_path / "out"),
                   max_new=8, batch=2, base_spec=str(tiny_model_dir))
    full, skip = rep["results"]
    assert full["rouge_l_vs_full"] == pytest.approx(1.0) and full["top1_agreement"] == pytest.approx(1.0)
    assert full["theoretical_speedup"] == pytest.approx(1.0) and full["avg_layers"] == pytest.approx(6.0)
    assert skip["avg_layers"] < 6 and skip["theoretical_speedup"] > 1.0
    assert 0.0 <= skip["rouge_l_vs_full"] <= 1.0 and "rouge_l_vs_reference" in skip
    assert skip["measured_speedup"] > 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.json", "report.md", "quality_vs_speedup.png"} <= files
    assert json.loads((tmp_path / "out" / "report.json").read_text())["n"] == 3
    assert "| schedule |" in (tmp_path / "out" / "report.md").read_text()
