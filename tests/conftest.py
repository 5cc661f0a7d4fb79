"""Shared fixtures: tiny randomly initialised models (Llama with GQA, OPT) that run in milliseconds."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread per process: the Ray tests run several processes on a 2-core box, and oversubscribed
# OpenMP threads slow everything down many times over (measured: 6 s vs 115 s for tests/core/test_engine.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tiny_llama(num_layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(num_layers: int = 5, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=97,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_other(kind: str, num_layers: int = 5, seed: int = 0):
    """Tiny Qwen2 (attention biases) or Mistral, built from the same sizes as the tiny Llama."""
    import transformers

    torch.manual_seed(seed)
    name = {"qwen2": "Qwen2", "mistral": "Mistral"}[kind]
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


@contextmanager
def moto_s3(monkeypatch, buckets=(), **credentials: str):
    """A real S3 API on loopback (moto's server mode, never ``mock_aws``): sets the AWS environment
    (``credentials`` override the dummy key pair, e.g. ``AWS_SESSION_TOKEN=...``), creates ``buckets``
    and yields the endpoint URL; the server stops on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **credentials,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield endpoint
    finally:
        server.stop()


def decode_step(runner, tokens, positions, slot, active, adapter=False):
    """A static batch's decode step through ``runner`` (a ``skipray.core.runner.ModelRunner``):
    ``tokens`` ``(n, 1)`` at ``positions`` ``(n,)`` into the shared ``slot`` of cache rows ``0..n-1``,
    running only the ``active`` layers, the skip adapter on every row when ``adapter``;
    -> logits ``(n, vocab)``, float32."""
    from skipray.core.model import Segment, step_plan

    n = tokens.shape[0]
    ones = torch.ones_like(tokens, dtype=torch.bool)
    seg = Segment(
        tokens,
        positions[:, None],
        step_plan(active, runner.model.num_layers),
        ones,
        cache_rows=slice(0, n),
        start=slot,
        adapter=ones if adapter else None,
    )
    return runner.run([seg])[0][:, 0].float()


@pytest.fixture(params=["llama", "opt", "qwen2", "mistral"])
def hf_model(request):
    if request.param == "llama":
        return tiny_llama()
    return tiny_opt() if request.param == "opt" else tiny_other(request.param)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smol():
    """The real default model (SmolLM2-135M-Instruct, base weights, fp32 CPU), loaded once."""
    from skipray.loading import load

    return load("smollm2-base", device="cpu")


# The workers' own S3 credentials for moto (tests/batch/test_batch.py), as a cluster's nodes have theirs (instance
# profile, environment): the batch job's tasks find credentials through the standard AWS chain, never the driver's.
WORKER_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "worker-key",
    "AWS_SECRET_ACCESS_KEY": "worker-secret",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session: 2 CPUs, capped object store, loopback only.

    Tests that need a Ray of their own (``ray start --head``, ``ray.cluster_utils.Cluster``) run it in
    a subprocess, so they do not fight this one.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind every Ray process to 127.0.0.1
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster some other process left running
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **WORKER_AWS_ENV}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory, with the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from skipray.loading import convert_gguf, default_gguf

    src = convert_gguf(default_gguf())
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out
