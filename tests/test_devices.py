"""Devices right or refused: a CUDA config requests its GPUs, a CUDA request where no GPU is visible is
refused with one clear line before any actor starts, and the dtype on a GPU follows its capability."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from skipray import batch
from skipray.loading import NoGPU, cuda_dtype, pick_device

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}


def test_dtype_follows_the_gpus_capability():
    assert cuda_dtype((8, 0)) == cuda_dtype((9, 0)) == torch.bfloat16  # A100, A10G, L4, H100
    assert cuda_dtype((7, 5)) == cuda_dtype((7, 0)) == torch.float16  # T4, V100: no fast bf16
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a process that sees no GPU")
def test_cuda_where_no_gpu_is_visible_is_a_clear_error():
    with pytest.raises(NoGPU, match="sees no GPU.*request GPUs"):
        pick_device("cuda")


def test_cuda_configs_request_their_gpus():
    assert batch.SkipDecodeProcessorConfig(device="cuda").num_gpus_per_actor == 1
    assert batch.SkipDecodeProcessorConfig(accelerator_type="L4").num_gpus_per_actor == 1
    assert batch.SkipDecodeProcessorConfig(device="cuda", num_gpus_per_actor=0.5).num_gpus_per_actor == 0.5
    assert batch.SkipDecodeProcessorConfig().num_gpus_per_actor == 0
    with pytest.raises(ValueError, match="device must be"):
        batch.SkipDecodeProcessorConfig(device="tpu")
    assert batch.JobConfig(device="cuda").gpus_per_actor == 1
    assert batch.JobConfig(device="cuda").processor_config().num_gpus_per_actor == 1


def test_a_cuda_serve_app_requests_a_gpu_per_replica():
    from skipray.serve.app import build_app

    def actor_options(app):
        return app._bound_deployment.ray_actor_options

    assert actor_options(build_app({"device": "cuda"}))["num_gpus"] == 1
    assert actor_options(build_app({"device": "cuda"}, {"ray_actor_options": {"num_cpus": 2}})) == {
        "num_cpus": 2,
        "num_gpus": 1,
    }
    assert not actor_options(build_app({"device": "cpu"})).get("num_gpus")


def test_the_gpu_serve_config_is_valid_and_asks_for_gpus():
    from ray.serve.schema import ServeDeploySchema

    from skipray.serve import CONFIG_GPU

    cfg = yaml.safe_load(CONFIG_GPU.read_text())
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["args"]["device"] == "cuda"
    assert all(d["ray_actor_options"]["num_gpus"] == 1 for d in app["deployments"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_is_refused_at_start_where_there_is_no_gpu(tmp_path, tiny_dir):
    from test_batch import prompts, write
    from test_batch_output import cli

    write(tmp_path / "in.parquet", prompts(2))
    t0 = time.time()
    r = cli(
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_dir),
        "--device",
        "cuda",
        timeout=180,
    )
    assert r.returncode == 2 and "GPU" in r.stderr.splitlines()[-1], r.stderr[-2000:]
    assert "MapWorker" not in r.stderr and not list((tmp_path / "out").glob("skipray-*"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "skipray.cli",
            "serve",
            "--device",
            "cuda",
            "--num-cpus",
            "1",
            "--model",
            str(tiny_dir),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "no GPU" in r.stderr, r.stderr[-2000:]
    assert time.time() - t0 < 170


from test_batch import tiny_dir  # noqa: E402,F401  (fixture)


def test_host_syncs_are_counted_on_the_cpu_too():
    from skipray.diagnostics import HostSyncs

    t = torch.arange(6.0)
    with HostSyncs() as h:
        t.sum().item()
        t.tolist()
        bool(t[1] > 0)
        torch.nonzero(t)
        t * 2
        torch.tensor([1, 2], device="meta")  # Python data onto a device: a copy from pageable memory
        torch.as_tensor(t, device="cpu")
    assert h.counts["scalar"] == 3 and h.counts["data_dependent"] == 1 and h.counts["ops"] >= 5
    assert h.counts["host_to_device_unpinned"] == 1 and h.syncs == 5


class _EvenTokens:
    """A grammar that allows the even token ids only (the sampler's bitmask protocol, no tokenizer)."""

    def fill_bitmask(self, bitmask, index):
        bitmask[index] = 0x55555555  # bits 0, 2, 4, ...: the even ids of each word

    def accept(self, token_id):
        return token_id % 2 == 0

    def finished(self):
        return False


ROWS = {
    "greedy": dict(),
    "seeded": dict(temperature=0.8, seed=3),
    "filtered": dict(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05, seed=4),
    "unseeded": dict(temperature=0.7),
    "penalties": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, logit_bias={3: 2.0}),
    "grammar": dict(structured=_EvenTokens),
}


@pytest.mark.parametrize(
    "skip,logprobs,rows",
    [
        (False, 0, ["greedy"]),
        (True, 0, ["greedy"]),
        (True, 3, ["greedy"]),
        (True, 0, ["seeded", "filtered", "unseeded"]),
        (True, 2, ["greedy", "seeded", "penalties", "grammar"]),
    ],
    ids=["full-depth", "skip", "skip-logprobs", "sampled", "mixed-controls-logprobs"],
)
def test_a_decode_step_reads_the_device_once(skip, logprobs, rows):
    """What the host already knows (adapter rows, cache ends, row indices, sampling parameters) is passed as plain
    values, and the sampler runs batched on the device (argmax, the exponential race with each request's generator,
    top-k/top-p/min-p, penalties, grammar bitmasks) and reads the tokens, the checks and the log-probs in one go: a
    decode-only step syncs once, also with rows at different steps and depths in one batch. Counted on CPU the way
    a GPU would sync."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from skipray.core.engine import Engine
    from skipray.core.model import SkipModel
    from skipray.core.requests import SamplingParams
    from skipray.core.schedule import SkipSchedule
    from skipray.diagnostics import HostSyncs

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = SkipModel(LlamaForCausalLM(cfg))
    eng = Engine(model, SkipSchedule(6, 6, 2, 3) if skip else None, max_batch=8, max_len=64)
    params = [SamplingParams(max_tokens=30, logprobs=logprobs, ignore_eos=True, **ROWS[r]) for r in rows]
    ids = [eng.add_request([1, 2, 3], p) for p in params]
    eng.step()
    eng.step()
    ids += [eng.add_request([4, 5, 6, 7, 8], p) for p in params]  # rows two steps behind, at another depth
    constrained = {i for i, r in zip(ids, rows * 2) if r == "grammar"}
    eng.step()
    for _ in range(3):
        with HostSyncs() as h:
            events = eng.step()
        assert h.syncs <= 1, dict(h.counts)
        assert len(events) == 2 * len(rows) and not [e for e in events if e.error is not None]
        assert all(e.token_id % 2 == 0 for e in events if e.request_id in constrained)


def test_expanded_kv_attention_equals_grouped_query_attention():
    """The GPU's attention form (K/V expanded to the query heads, so a fused kernel takes the mask) gives the
    same numbers as the CPU's ``enable_gqa`` form."""
    import torch.nn.functional as F

    from skipray.core.attention import expand_kv

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 5, 16, generator=g)
    k, v = torch.randn(3, 2, 11, 16, generator=g), torch.randn(3, 2, 11, 16, generator=g)
    mask = torch.rand(3, 1, 5, 11, generator=g) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ke, ve = expand_kv(k, v, 8)
    assert ke.shape == (3, 8, 11, 16)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask), want)
