"""Copy a trained LoRA adapter into the package as the default, stored in fp16 (half the size).

Usage: python scripts/package_adapter.py RUN_DIR DEST_DIR [SCHEDULE_JSON]
With SCHEDULE_JSON the package serves that schedule instead of the one the adapter was trained for
(recorded as ``trained_schedule``), e.g. a hold schedule found better zero-shot by ``skipray eval``.
"""

import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def project_command(command: str, root: Path) -> str:
    """The training command as run from the project root: ``skipray`` for the entry point's path, and
    every absolute path made relative to ``root`` (or to its ``runs/`` folder, wherever that lived)."""
    args = shlex.split(command)
    if args and Path(args[0]).name in ("skipray", "cli.py"):
        args[0] = "skipray"
    for i, a in enumerate(args):
        if a.startswith("/"):
            p = Path(a)
            if p.is_relative_to(root):
                args[i] = str(p.relative_to(root))
            elif "/runs/" in a:
                args[i] = "runs/" + a.split("/runs/", 1)[1]
    return shlex.join(args)


def main(src: str, dst: str, schedule: str | None = None) -> None:
    src_p, dst_p = Path(src), Path(dst)
    dst_p.mkdir(parents=True, exist_ok=True)
    weights = load_file(src_p / "adapter_model.safetensors")
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, dst_p / "adapter_model.safetensors")
    shutil.copy(src_p / "adapter_config.json", dst_p / "adapter_config.json")
    meta = json.loads((src_p / "skipray.json").read_text())
    meta["base_model"] = "smollm2-base"
    meta.pop("train_config", None)
    meta["made_by"] = "scripts/train_default.sh"
    if "command" in meta:
        meta["command"] = project_command(meta["command"], Path(__file__).resolve().parents[1])
    if schedule:
        from skipray.core.schedule import SkipSchedule

        new = SkipSchedule.from_dict(json.loads(Path(schedule).read_text())).to_dict()  # refuses unknown keys
        meta["trained_schedule"], meta["schedule"] = meta["schedule"], new
    (dst_p / "skipray.json").write_text(json.dumps(meta, indent=2))
    size = (dst_p / "adapter_model.safetensors").stat().st_size
    print(f"packaged {src} -> {dst} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
