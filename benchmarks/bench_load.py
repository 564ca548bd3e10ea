"""Peak host memory and time of loading a model: ``ModelAdapter.load`` (weights read straight
onto their device, ``device_map``) against the former path (load on the CPU, then ``.to(device)``).

Each way runs in its own process, so each peak is its own. Without ``--model`` it saves a random
LLaVA of ``--hidden`` x ``--layers`` (float32) to a temporary folder first.

    python benchmarks/bench_load.py                       # random 8 x 1024 LLaVA (about 0.5 GB) on cpu
    python benchmarks/bench_load.py --model data/models/tiny-llava --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, table

_CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
from pipeline.timings import peak_rss_mib
folder, dtype, device, way = sys.argv[1:5]
base = peak_rss_mib()
t0 = time.perf_counter()
if way == "adapter":
    from pipeline.model.adapter import ModelAdapter
    model = ModelAdapter.load(folder, dtype=dtype, device=device).model
else:
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
seconds = time.perf_counter() - t0
peak = peak_rss_mib()
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
print(json.dumps({{"seconds": seconds, "peak_mib": peak, "after_imports_mib": base, "gpu_mib": gpu}}))
"""


def random_llava(folder: Path, hidden: int, layers: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
        projection_dim=256,
    )
    from tiny_models import tiny_llava

    _, processor = tiny_llava()
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text)).save_pretrained(folder)
    processor.save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp) / "model"
            random_llava(folder, args.hidden, args.layers)
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20
        rows = []
        for way in ("to_device", "adapter"):
            out = subprocess.run(
                [sys.executable, "-c", _CHILD.format(repo=str(REPO)), str(folder), args.dtype, args.device, way],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                (
                    way,
                    r["seconds"],
                    r["after_imports_mib"],
                    r["peak_mib"],
                    r["peak_mib"] - r["after_imports_mib"],
                    r["gpu_mib"],
                )
            )
    print(f"{folder}: {size:,.0f} MiB of safetensors, {args.dtype} on {args.device}")
    print(
        table(("way", "seconds", "RSS after imports MiB", "peak RSS MiB", "peak - imports MiB", "GPU peak MiB"), rows)
    )


if __name__ == "__main__":
    main()
