"""Online serving on Ray Serve: an OpenAI-compatible API over skipray's continuous-batching engine.

Contract: importing this package does no work and imports neither Ray nor torch. ``skipray.serve.app``
holds the Serve deployment (builder ``skipray.serve.app:build_app``; the only module that imports Ray),
``routes`` the FastAPI app, ``server`` the request handling, ``engine_loop`` the engine thread,
``protocol`` the request models, ``responses`` the response shapes, ``skipray/serve/config.yaml`` the
Serve config for ``serve run``/``serve deploy``.
"""

from pathlib import Path

CONFIG = Path(__file__).with_name("config.yaml")
CONFIG_GPU = Path(__file__).with_name("config.gpu.yaml")  # the same for GPU nodes (device cuda, num_gpus 1)
