"""Training cost of LoRA (unquantized base) vs QLoRA (4-bit NF4 base), measured in one run.

    HF_HUB_OFFLINE=1 python loadtests/bench_train.py [--steps 6] [--batch-size 4] [--base PATH]

Each arm runs SFT on the house-style example data for a few steps in a fresh process of
its own, so peak RSS belongs to that arm alone. Seconds per step skip the first step
(allocation and kernel warm-up). The result is printed as QLoRA/LoRA ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "trainer" / "examples" / "house_style_sft.jsonl"


def run_arm(quantization: str, steps: int, batch_size: int, base_spec: str | None) -> dict:
    """One arm, in this process: load, train ``steps`` steps, report timings and memory."""
    sys.path.insert(0, str(ROOT))
    from trainer.base_model import load_base_model
    from trainer.common import peak_memory
    from trainer.sft import SFTJobConfig, run_sft

    t0 = time.perf_counter()
    base = load_base_model(base_spec, quantization=quantization)
    load_s = time.perf_counter() - t0
    weights = base.memory_bytes
    stamps: list[float] = []
    config = SFTJobConfig(
        base_model=base_spec,
        quantization=quantization,
        max_steps=steps,
        batch_size=batch_size,
        r=16,
        learning_rate=2e-4,
        max_length=256,
        eval_fraction=0.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sft(
            config,
            DATA,
            Path(tmp) / "adapter",
            progress=lambda update: stamps.append(time.perf_counter()),
            base=base,
        )
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "quantization": quantization,
        "device": base.device,
        "load_s": load_s,
        "weights_bytes": weights,
        "s_per_step": sum(gaps) / len(gaps) if gaps else float("nan"),
        "steps": result.steps,
        "final_loss": result.final_loss,
        **peak_memory(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--base",
        # as loadtests/_server.py's BENCH_BASE: the model the README's figures were measured on
        default=os.environ.get("SWAPSERVE_BASE_MODEL") or "gemma3-270m",
        help="a bundled model's short name or a model folder (default: $SWAPSERVE_BASE_MODEL, "
        "else gemma3-270m)",
    )
    parser.add_argument("--arm", choices=("none", "nf4"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # child process: one arm, JSON on the last line
        print(json.dumps(run_arm(args.arm, args.steps, args.batch_size, args.base)))
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for arm in ("none", "nf4"):
        cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size)]
        if args.base:
            cmd += ["--base", args.base]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results[arm] = json.loads(proc.stdout.strip().splitlines()[-1])

    lora, qlora = results["none"], results["nf4"]
    print(
        f"device: {lora['device']}; {args.steps} steps, batch {args.batch_size}, r=16, max_length 256"
    )
    print(f"{'':24}{'LoRA (fp32/bf16)':>18}{'QLoRA (NF4)':>14}{'QLoRA/LoRA':>12}")
    rows = [
        ("seconds per step", "s_per_step", 1.0, "{:.3f}"),
        ("peak RSS (MB)", "peak_rss_bytes", 1e6, "{:.0f}"),
        ("resident weights (MB)", "weights_bytes", 1e6, "{:.0f}"),
        ("load time (s)", "load_s", 1.0, "{:.2f}"),
    ]
    if "peak_cuda_allocated_bytes" in lora:
        rows.append(("peak CUDA alloc (MB)", "peak_cuda_allocated_bytes", 1e6, "{:.0f}"))
    for label, key, scale, fmt in rows:
        a, b = lora[key] / scale, qlora[key] / scale
        print(f"{label:24}{fmt.format(a):>18}{fmt.format(b):>14}{b / a:>12.2f}")
    print(f"final loss: LoRA {lora['final_loss']:.4f}, QLoRA {qlora['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
