"""Data-parallel skip-aware training on Ray Train (a thin shim over ``skipray.training.train.train``).

Contract: ``train_distributed(cfg, workers)`` runs ``train`` on ``workers`` Ray Train workers
(``TorchTrainer``; process group gloo on CPU, nccl with ``use_gpu``). Each worker reads every
``workers``-th example; after each backward pass the gradients of the trainable parameters are
all-reduced (averaged), which is what DDP does, done explicitly because skipray's forward calls the
model's submodules directly rather than through a DDP-wrapped ``forward``. Rank 0 logs, checkpoints
and saves to ``cfg.out`` (a path every worker can reach: local disk on one machine, shared storage on
a cluster), so ``--resume`` works as in single-process training.
"""

from __future__ import annotations

from dataclasses import asdict

from skipray.training.train import TrainConfig, train


def _loop(config: dict) -> None:
    import torch
    import torch.distributed as dist
    from ray import train as ray_train

    ctx = ray_train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, config.pop("threads")))
    resume = config.pop("resume")
    cfg = TrainConfig(**config)

    def wrap(params):
        def sync() -> None:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world

        return sync

    train(cfg, resume=resume, progress=False, rank=rank, world=world, wrap=wrap)
    ray_train.report({"done": 1})


def train_distributed(
    cfg: TrainConfig,
    workers: int,
    resume: bool = False,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
) -> None:
    import os

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from skipray.env import worker_env

    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": worker_env()})
    config = {**asdict(cfg), "resume": resume, "threads": int(max(1, cpus_per_worker))}
    trainer = TorchTrainer(
        _loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name="skipray-train", storage_path=storage_path or os.path.abspath(os.path.join(cfg.out, "ray"))
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
