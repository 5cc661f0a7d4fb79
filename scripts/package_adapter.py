"""Copy a trained LoRA adapter into the package as the default, stored in fp16 (half the size).

Usage: python scripts/package_adapter.py RUN_DIR DEST_DIR
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(src: str, dst: str) -> None:
    src_p, dst_p = Path(src), Path(dst)
    dst_p.mkdir(parents=True, exist_ok=True)
    weights = load_file(src_p / "adapter_model.safetensors")
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, dst_p / "adapter_model.safetensors")
    shutil.copy(src_p / "adapter_config.json", dst_p / "adapter_config.json")
    meta = json.loads((src_p / "skipray.json").read_text())
    meta["base_model"] = "smollm2-base"
    meta.pop("train_config", None)
    meta["made_by"] = "scripts/train_default.sh"
    (dst_p / "skipray.json").write_text(json.dumps(meta, indent=2))
    size = (dst_p / "adapter_model.safetensors").stat().st_size
    print(f"packaged {src} -> {dst} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
