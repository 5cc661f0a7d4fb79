"""Offline batch generation on Ray Data: the skip-decoding processor and the file job built on it.

Contract: importing this package imports neither Ray nor torch (Ray is imported inside the functions and
actors that need it). Modules, in the order a row meets them:

* ``config``: ``SkipDecodeProcessorConfig``, every field of Ray Data LLM's ``vLLMEngineProcessorConfig``
  (implemented, mapped, or named in one ``SkipDecodeConfigWarning``) plus skipray's own;
* ``rows``: a row (``prompt`` or ``messages``, optional ``sampling_params`` / ``skip``) becomes token ids
  and its request, or a typed error row;
* ``processor``: ``build_processor(config, preprocess=, postprocess=, builder_kwargs=)`` -> a
  ``Dataset -> Dataset`` callable (tokenize tasks, then the ``SkipDecodeEngineStage`` actor pool);
* ``actor``: the ``SkipDecodeEngineStage`` actor: one engine and KV cache per actor, fed a window at a
  time with continuous batching (a finished row's cache row takes the window's next prompt);
* ``files`` (input checks, filesystems, the summary), ``paths`` (globs, overlap), ``output`` (what the job
  owns in its output: manifest, recovery without deletion), ``lock`` (one job per output) and ``resume``
  (skip work a re-run already did);
* ``openai_batch`` (OpenAI batch files in: JSON lines of requests as rows) and ``openai_output`` (OpenAI
  batch output lines out, their writes and their resume by ``custom_id``);
* ``job``: the file job (``plan``, ``execute``, ``run``); ``cli``: its command line
  (``python -m skipray.batch``, ``jobs/generate.py``).

The names below are the public API, re-exported here.
"""

from skipray.batch.actor import SkipDecodeEngineStage, admission_order
from skipray.batch.config import SkipDecodeConfigWarning
from skipray.batch.files import InputCheck, InputError, Summary, check_input, filesystem_for, summarize
from skipray.batch.job import (
    JobConfig,
    Plan,
    build_pipeline,
    execute,
    gpu_job_limits,
    job_columns,
    model_facts,
    plan,
    run,
)
from skipray.batch.output import OutputError
from skipray.batch.processor import SkipDecodeProcessor, build_processor
from skipray.batch.resume import OUTPUT_COLUMNS, SOURCE_COLUMNS
from skipray.batch.rows import TOKENS, SkipDecodeProcessorConfig, prepare_rows

__all__ = [
    "SkipDecodeEngineStage",
    "admission_order",
    "SkipDecodeConfigWarning",
    "InputCheck",
    "InputError",
    "Summary",
    "check_input",
    "filesystem_for",
    "summarize",
    "JobConfig",
    "Plan",
    "build_pipeline",
    "execute",
    "gpu_job_limits",
    "job_columns",
    "model_facts",
    "plan",
    "run",
    "OutputError",
    "SkipDecodeProcessor",
    "build_processor",
    "OUTPUT_COLUMNS",
    "SOURCE_COLUMNS",
    "TOKENS",
    "SkipDecodeProcessorConfig",
    "prepare_rows",
]
