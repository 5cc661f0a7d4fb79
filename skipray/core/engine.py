"""The skip-decoding engine: one loop for static batches, online serving and the offline batch job.

Contract: pure torch over token ids (no Ray, no HTTP; the tokenizer only through the optional
``detokenize`` hook that checks stop strings). ``Engine`` holds one ``SkipModel``, its limits
(``engine.config``, a ``skipray.core.config.EngineConfig``), a ``Scheduler`` (plain Python: queues,
admission, which rows run which layer, retirement), a ``ModelRunner`` (the forward passes over KV-cache
rows) and the batched sampler (``skipray.core.sampling.sample_rows``); both get the config whole.

* ``add_request`` / ``abort`` may be called from any thread; ``step`` is called by one loop thread and
  does one iteration in three parts: ``plan = scheduler.schedule()`` (apply aborts, admit waiting requests
  into free rows, list the decoding rows and the prompt work), ``out = runner.execute(plan)`` (newcomers'
  prompts at full depth, their first token coming from that pass; one decode step for every row that
  already has a token, each row running *its own* step's layers of *its own* schedule: rows at different
  steps and schedules share the batch, see ``skipray.core.scheduler`` for the row order that keeps each
  layer's rows one slice) and ``_postprocess(plan, out)`` (sample, retire finished rows: ``"stop"`` /
  ``"length"``, ``skipray.core.requests.finish_reason``). A freed row is refilled at the next iteration:
  a request never waits for another to finish.
* Prompt work: without a token budget, the newcomers' whole prompts (as many as fit ``max_prefill_tokens``
  padded) run in one right-padded pass before the decode pass. With chunked prefill
  (``max_num_batched_tokens``, vLLM's per-iteration token budget) the same plan holds prompt chunks that
  fill the rest of the budget (at most ``max_prefill_tokens`` of it), and the decode step and the chunks
  share one forward pass; a long prompt is prefilled over several iterations while the decoding rows
  keep producing a token at every iteration.
* ``generate`` / ``stream`` (a batch of prompts on an idle engine) are loops over ``step``: every prompt
  is queued as ``add_request`` queues it (without its size limits and queue bound: the cache grows first
  when the call needs more slots than it has), rows are refilled as they finish. They raise what a
  request failed with (``raise_errors=False``:
  the failed request ends with ``finish_reason="error"``, the others go on).
* Offline requests (``add_request(offline=True)``) are their own admission class (``Scheduler``).
* The cache: ``max_num_seqs`` rows; layer ``l`` holds ``min(max_model_len, prompt_limit + k_l)`` slots,
  ``k_l`` the steps of ``cache_schedule`` (default full depth) that run ``l`` within ``max_tokens``
  (default ``max_model_len``) new tokens (``skipray.core.memory.layer_slots``). ``add_request`` refuses
  a request longer than the context (``skipray.core.config.check_length``), a prompt longer than
  ``prompt_limit`` or a schedule that would run a layer past its slots (``ValueError``). A server
  accepting full-depth requests must keep the full-depth default.
* Weights: creating an engine builds the model's inference weights (``SkipModel.build_inference_weights``:
  fused, prepacked on a CPU, the skip adapter merged where ``merge_adapter`` allows); they are never checked
  again, so after training the model or changing its adapter call ``refresh_weights``.
* Faults stay with their request: anything raised for one row (sampling, non-finite logits, the stop
  check) ends that request alone with ``finish_reason="error"`` and ``Event.error``; a failing prompt
  pass ends the requests it was admitting; a failing decode pass ends every decoding request (the parts
  of a failing shared pass are rerun one by one, so a failing chunk ends only its request).
  ``step`` never raises for these and returns every event produced before the failure.

With greedy sampling, and with seeded sampling, each request produces the tokens it would produce
alone, whatever shares its batch (tested on the CPU; on a GPU the batch size changes the matmuls' kernels and so
the logits' last bits, which can flip near-ties).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from skipray.core.cache import KVCache
from skipray.core.config import EngineConfig, check_length
from skipray.core.memory import layer_slots
from skipray.core.model import SkipModel
from skipray.core.requests import Completion, Event, SamplingParams, finish_reason, validate_request
from skipray.core.runner import ModelRunner, StepOutput
from skipray.core.sampling import sample_rows
from skipray.core.schedule import SkipSchedule
from skipray.core.scheduler import Request, Scheduler, StepPlan

logger = logging.getLogger(__name__)


def check_schedule(schedule: SkipSchedule, num_layers: int) -> None:
    """Raise ``ValueError`` when ``schedule`` was made for a model of another depth."""
    if schedule.num_layers != num_layers:
        raise ValueError(f"schedule is for {schedule.num_layers} layers, model has {num_layers}")


class Engine:
    def __init__(
        self,
        model: SkipModel,
        schedule: SkipSchedule | None = None,
        config: EngineConfig | None = None,
        eos_token_ids: Sequence[int] = (),
        *,
        cache_schedule: SkipSchedule | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
        runner: ModelRunner | None = None,
        **changes: int | None,
    ) -> None:
        """An engine over ``model`` with ``config``'s limits (default ``EngineConfig()``); ``changes``: fields
        of ``EngineConfig`` (or ``max_batch`` / ``max_len``) set over it, as ``EngineConfig.replace`` takes
        them. ``schedule``: the default per request (full depth); ``cache_schedule`` sizes the cache
        (module docstring); ``detokenize``: ids -> text, for stop strings; ``runner``: the passes' runner
        (default: a ``ModelRunner`` over ``model`` and the config; a subclass can stand in for it). Raises
        ``ValueError`` for a schedule of another depth or a config ``EngineConfig`` refuses, ``TypeError`` for
        unknown ``changes``."""
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):  # e.g. an older positional Engine(model, schedule, max_batch)
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.model, self.config = model.eval(), config.replace(**changes) if changes else config
        device = next(model.parameters()).device
        model.build_inference_weights(merge=self.config.merge_adapter)  # once, here (refresh_weights rebuilds)
        self.schedule = schedule or SkipSchedule.full(model.num_layers)
        self.cache_schedule = cache_schedule or SkipSchedule.full(model.num_layers)
        check_schedule(self.schedule, model.num_layers)
        check_schedule(self.cache_schedule, model.num_layers)
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenize = detokenize
        if device.type == "cuda":  # gpu_memory_utilization: as many rows as the GPU holds, at most max_num_seqs
            from skipray.core.profile import fit_to_gpu

            self.config = fit_to_gpu(self.model, self.config, self.cache_schedule)
        self.scheduler = Scheduler(self.config)
        self.runner = runner if runner is not None else ModelRunner(self.model, self.config, self.cache_schedule)
        self._ids = itertools.count()
        self.steps = 0  # decode iterations run

    def refresh_weights(self) -> None:
        """Rebuild the model's inference weights from its modules as they are now (``skipray.core.weights``):
        after training the model or changing its adapter, decoding reads the weights built when the engine
        was created (or last refreshed) until this is called."""
        self.model.build_inference_weights(merge=self.config.merge_adapter)
        if self.runner.graphs is not None:
            self.runner.graphs.clear()  # they replay the old weights' addresses

    @property
    def cache(self) -> KVCache:
        """The KV cache (the runner's; ``generate`` may replace it with a larger one)."""
        return self.runner.cache

    @property
    def context(self) -> int:
        """The tokens a request's prompt and new tokens may take in ``add_request`` (``EngineConfig.context``)."""
        return self.config.context(self.model.max_positions)

    @property
    def num_running(self) -> int:
        """Requests holding a row (decoding or being prefilled)."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Online requests waiting."""
        return len(self.scheduler.waiting)

    def cache_usage(self) -> float:
        """The share of the cache's slots (rows x slots per row) that hold live requests' tokens, 0-1."""
        used = sum(r.slots for r in self.scheduler.running)
        c = self.runner.cache
        return min(used / max(c.max_batch * c.max_len, 1), 1.0)

    # -- requests (any thread) ---------------------------------------------------------------------
    def _check_fits(self, req: Request) -> None:
        """Raise ``ValueError`` for a request this engine, as it is sized, can never serve."""
        check_length(len(req.prompt), req.params.max_tokens, self.context)
        limit = self.config.prompt_limit
        if len(req.prompt) > limit:
            raise ValueError(f"prompt has {len(req.prompt)} tokens; this engine takes at most {limit}")
        need = layer_slots(req.schedule, len(req.prompt), req.params.max_tokens)
        for l, (n, have) in enumerate(zip(need, self.cache.layer_lens)):
            if n > have:
                raise ValueError(
                    f"this request's schedule needs {n} cache slots at layer {l}, which holds {have}: the cache is "
                    f"sized for {self.cache_schedule.describe()} and prompts of at most {limit} tokens"
                )

    def _request(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        schedule: SkipSchedule | None,
        request_id: str | None,
        offline: bool = False,
        priority: int = 0,
    ) -> Request:
        schedule = schedule or self.schedule
        check_schedule(schedule, self.model.num_layers)
        validate_request(prompt, params, self.model.vocab_size, self.model.max_positions)
        if any(s for s in params.stop) and self.detokenize is None:
            raise ValueError("stop strings need an engine built with a detokenizer (Engine(detokenize=...))")
        try:
            gen = torch.Generator(self.runner.device).manual_seed(params.seed) if params.seed is not None else None
        except (RuntimeError, OverflowError) as e:
            raise ValueError(f"invalid seed {params.seed}: {e}") from None
        constraint = params.structured() if params.structured is not None else None
        return Request(
            request_id or f"req-{next(self._ids)}",
            list(prompt),
            params,
            schedule,
            gen,
            offline,
            priority=priority,
            constraint=constraint,
        )

    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        schedule: SkipSchedule | None = None,
        request_id: str | None = None,
        offline: bool = False,
        priority: int = 0,
    ) -> str:
        """Queue a request; it joins the batch at the next iteration with a free row. -> request id.
        ``priority``: online requests are admitted lower value first (vLLM's; ``skipray.core.scheduler``).
        Raises ``ValueError`` for invalid input and ``QueueFull`` when ``max_waiting`` online requests wait."""
        req = self._request(prompt, params or SamplingParams(), schedule, request_id, offline, priority)
        self._check_fits(req)
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or live); its row is freed at the start of the next ``step``."""
        self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        """Whether ``step`` has anything to do (a request waits or runs, or an abort is pending)."""
        return self.scheduler.has_work()

    def reset(self) -> list[str]:
        """Forget every request (after a failure the caller could not contain); -> their ids."""
        return [r.request_id for r in self.scheduler.reset()]

    # -- batches of prompts --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        schedule: SkipSchedule | Sequence[SkipSchedule | None] | None = None,
        raise_errors: bool = True,
    ) -> list[Completion]:
        """Generate for a batch of token-id prompts; one ``Completion`` per prompt, in order (see ``stream``)."""
        out = [Completion(prompt_len=len(p)) for p in prompts]
        for ev in self.stream(prompts, params, schedule, raise_errors):
            c = out[ev.index]
            c.finish_reason, c.error = ev.finish_reason, ev.error
            if ev.token_id is not None:
                c.token_ids.append(ev.token_id)
                c.layers_per_token.append(ev.layers)
            if ev.logprobs is not None:
                c.logprobs.append(ev.logprobs)
        return out

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        schedule: SkipSchedule | Sequence[SkipSchedule | None] | None = None,
        raise_errors: bool = True,
    ) -> Iterator[Event]:
        """Yield one ``Event`` per generated token as soon as it is sampled, ``index`` its prompt's index.
        ``params`` and ``schedule``: one for every prompt, or one each. Prompts wait for free rows (at most
        ``max_num_seqs`` run at once, admitted in order) and take the row a finished one leaves.

        Raises ``ValueError`` for invalid input (``"prompt i: ..."``) and ``RuntimeError`` when the engine
        has requests of its own. A request that fails (a fault of its own, or of a pass it shared): with
        ``raise_errors`` its exception is raised and the call's other requests are dropped; without, its
        last event has ``finish_reason="error"`` and the ``error``, and the others go on."""
        params = SamplingParams() if params is None else params
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        slist = list(schedule) if isinstance(schedule, Sequence) else [schedule] * len(prompts)
        if not len(plist) == len(slist) == len(prompts):
            raise ValueError(f"{len(plist)} sampling params and {len(slist)} schedules for {len(prompts)} prompts")
        if self.has_work():
            raise RuntimeError("generate/stream need an idle engine; this one has requests of its own")
        reqs = []
        for i, (p, sp, s) in enumerate(zip(prompts, plist, slist)):
            try:
                reqs.append(self._request(p, sp, s, None))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        index = {r.request_id: i for i, r in enumerate(reqs)}
        if not reqs:
            return
        need = [max(x) for x in zip(*(layer_slots(r.schedule, len(r.prompt), r.params.max_tokens) for r in reqs))]
        self.runner.ensure_cache(min(len(reqs), self.config.max_num_seqs), need)
        for r in reqs:
            self.scheduler.add(r, bounded=False)
        try:
            while self.has_work():
                for ev in self.step():
                    if raise_errors and ev.finish_reason in ("error", "abort"):
                        raise ev.error or RuntimeError(f"request {ev.request_id} was aborted")
                    ev.index = index[ev.request_id]
                    yield ev
        finally:
            self.scheduler.reset()  # a consumer that stops early, or a failure, leaves no request behind

    # -- the loop body -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One iteration: ``plan = scheduler.schedule()`` (aborts, admissions, decode rows and prompt chunks),
        ``out = runner.execute(plan)`` (the passes), ``events = self._postprocess(plan, out)`` (sample, emit,
        retire). A failure outside one request's part (a row move, the sampler's batch) ends every running
        request; the events made before it are kept."""
        events: list[Event] = []
        try:
            plan = self.scheduler.schedule()
            events += [Event(r.request_id, None, 0, "abort") for r in plan.aborted]
            out = self.runner.execute(plan)
            self._postprocess(plan, out, events)
        except Exception as e:  # beyond one request: it ends every request holding a row
            logger.exception("engine step failed; ending %d running requests", len(self.scheduler.running))
            ended = {ev.request_id for ev in events if ev.finish_reason is not None}
            failed = [r for r in self.scheduler.fail_running() if r.request_id not in ended]
            events += [Event(r.request_id, None, 0, "error", error=e) for r in failed]
        return events

    def _postprocess(self, plan: StepPlan, out: StepOutput, events: list[Event]) -> None:
        """Sample the decode rows' tokens and the first tokens of prompts this step completed; end the
        requests whose part failed; let the scheduler promote and retire rows (``settle``)."""
        gone: list[Request] = []
        if plan.decode:
            if isinstance(out.decode, BaseException):
                logger.error("decode step failed; ending %d requests", len(plan.decode), exc_info=out.decode)
                events += [Event(r.request_id, None, 0, "error", error=out.decode) for r in plan.decode]
                gone += plan.decode
            else:
                gone += self._emit(plan.decode, out.decode, plan.layers, events)
                self.steps += 1
        ready, logits = [], []
        for chunk, o in zip(plan.chunks, out.chunks):
            req = chunk.request
            if isinstance(o, BaseException):
                logger.error("prompt pass of request %s failed", req.request_id, exc_info=o)
                events.append(Event(req.request_id, None, 0, "error", error=o))
                gone.append(req)
                continue
            req.prefilled = chunk.start + chunk.tokens
            if req.prefilled == len(req.prompt):
                ready.append(req)
                logits.append(o)
        if ready:
            gone += self._emit(ready, torch.cat(logits), [self.model.num_layers] * len(ready), events)
        self.runner.move_rows(self.scheduler.settle(ready, gone))

    def _emit(self, reqs: list[Request], logits: torch.Tensor, layers: list[int], events: list[Event]) -> list[Request]:
        """Sample one token per request (row ``i`` of ``logits``); -> the requests that finished."""
        picked, lps = sample_rows(
            logits,
            [r.params for r in reqs],
            [r.generator for r in reqs],
            [r.prompt for r in reqs],
            [r.generated for r in reqs],
            self.eos_token_ids,
            [r.constraint for r in reqs],
            self.runner.to_device,
        )
        done = []
        for i, req in enumerate(reqs):
            tok, reason, err = picked[i], None, None
            if isinstance(tok, int):
                req.generated.append(tok)
                req.layers.append(layers[i])
                try:
                    if req.constraint is not None and not req.constraint.accept(tok):
                        raise ValueError(f"token {tok} breaks this request's structured output")
                    reason = finish_reason(req.generated, req.params, self.eos_token_ids, self.detokenize)
                    if reason is None and req.constraint is not None and req.constraint.finished():
                        reason = "stop"  # the grammar is complete
                except Exception as e:  # e.g. the stop-string check's tokenizer
                    reason, err = "error", e
            else:
                tok, reason, err = None, "error", tok
            if err is not None:
                logger.warning("request %s failed: %r", req.request_id, err)
            ev = Event(req.request_id, tok, layers[i] if tok is not None else 0, reason, lps[i], err)
            if req.params.prompt_logprobs is not None and tok is not None and len(req.generated) == 1:  # first
                try:
                    ev.prompt_logprobs = self.runner.prompt_logprobs(req.prompt, req.params.prompt_logprobs)
                except Exception as e:  # noqa: BLE001 - this request's failure, not its batch-mates'
                    ev.token_id, ev.finish_reason, ev.error = None, "error", e
                    if reason is None:
                        done.append(req)
            events.append(ev)
            if reason is not None:
                done.append(req)
        return done
