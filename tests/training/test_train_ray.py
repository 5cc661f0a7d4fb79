"""Data-parallel training on Ray Train: two CPU workers (gloo) on one machine."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_two_worker_ray_train_run(ray_local, tmp_path, tiny_model_dir):
    from skipray.training.train import TrainConfig
    from skipray.training.train_ray import train_distributed

    rng = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt_ids": torch.randint(3, 2000, (5,), generator=rng).tolist(),
            "response_ids": torch.randint(3, 2000, (8,), generator=rng).tolist(),
        }
        for _ in range(8)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = TrainConfig(
        data=str(tmp_path / "d.parquet"),
        out=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        schedule={"max_layers": 5, "min_layers": 3, "decay_tokens": 4, "warmup_layers": 1, "shape": "linear"},
        steps=4,
        batch_size=2,
        save_every=2,
        lr=1e-3,
    )
    train_distributed(cfg, workers=2, cpus_per_worker=0.5)
    out = tmp_path / "out"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # rank 0 alone logs
    meta = json.loads((out / "skipray.json").read_text())
    assert meta["trained_steps"] == 4 and (out / "adapter_model.safetensors").exists()
