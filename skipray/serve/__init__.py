"""Online serving on Ray Serve: an OpenAI-compatible API over skipray's continuous-batching engine.

Contract: importing this package does no work and imports neither Ray nor torch. ``skipray.serve.app``
holds the Serve application (builder ``skipray.serve.app:build_app``), ``skipray.serve.protocol`` the
request/response models, ``skipray/serve/config.yaml`` the Serve config for ``serve run``/``serve deploy``.
"""

from pathlib import Path

CONFIG = Path(__file__).with_name("config.yaml")
