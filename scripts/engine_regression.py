"""Engine throughput probe for comparing two checkouts side by side (old flat layout or new core/ layout).

Usage, alternating runs on one quiet machine (the median of 3 per checkout is what issue 11 compared):
    PYTHONPATH=/path/to/checkout OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/engine_regression.py
Static generate, 64 new tokens (EOS ignored), fp32, batch 1/8/32, full depth and a ~2x schedule, best of 3;
prints one JSON line of tokens/s.
"""

import json
import time

try:
    from skipray.core.engine import Engine
    from skipray.core.requests import SamplingParams
    from skipray.core.schedule import SkipSchedule

    def P(n):
        return SamplingParams(max_tokens=n)
except ImportError:
    from skipray.engine import Engine, SamplingParams
    from skipray.schedule import SkipSchedule

    def P(n):
        return SamplingParams(max_new_tokens=n)


from skipray.loading import load

m = load("smollm2-base", device="cpu")
tok = m.tokenizer
base = [
    "Tell me about owls.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain photosynthesis briefly.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Describe a good breakfast.",
    "How do bees make honey?",
]
out = {}
eng = Engine(m.model, max_batch=32, max_len=256)
sk = SkipSchedule(30, 16, 6, 64, warmup_layers=4)
for b in (1, 8, 32):
    ps = [tok(base[i % 8] + " " * (i // 8))["input_ids"] for i in range(b)]
    for name, s in (("full", None), ("2x", sk)):
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            eng.generate(ps, P(64), s) if s is not None else eng.generate(ps, P(64))
            best = min(best, time.perf_counter() - t)
        out[f"{name}_b{b}"] = round(b * 64 / best, 1)
print(json.dumps(out))
