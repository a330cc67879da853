"""What serving other adapter kinds beside LoRA costs a decode step, as ratios in one run.

    python loadtests/bench_kinds.py [--rows 8] [--steps 16] [--quantization nf4] [--base gemma3-270m]

On the bundled Gemma 3 270M, in this process (no server), with the server's int8 output layer:
the runner prefills ``--rows`` rows for each batch composition, then times their decode
steps in turns (a step of each, then the next), so that a busy machine slows all alike:

a) every row on the base                                  (the reference)
b) every row on its own LoRA adapter (rank 16, all linear layers)
c) rows over one adapter of every kind: LoRA (two), IA3, prompt tuning, prefix tuning,
   LN tuning, trainable tokens, base (P-tuning is prompt tuning at inference)
d) one kind at a time, every row on it (which kind costs what)
e) b) again with the LoRA blocks in the base's compute dtype (bfloat16 for NF4) instead of
   float32, timed in turns with a) (why the engine computes adapter blocks in float32 on
   a CPU: server/engine/multi_adapter.py, adapter_dtype)

Printed: CPU ms per decode step (this process's CPU time, all its threads: on a machine
shared with other work, wall-clock time measures the neighbours as much as the step) and
the ratio to a).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from loadtests._adapters import linear_shapes_from_config, random_lora_adapter  # noqa: E402
from server.engine.base import BASE_ADAPTER  # noqa: E402
from server.engine.kinds import kind_for  # noqa: E402
from server.engine.lm_head import use_int8_lm_head  # noqa: E402
from server.engine.multi_adapter import compute_dtype  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from trainer.base_model import load_base_model, resolve_base_model  # noqa: E402

PROMPT = [2, 818, 5279, 529, 7001, 563, 496, 3618, 1902, 236761]


def build_adapters(base: Path, root: Path) -> dict[str, Path]:
    """One adapter of every kind in PEFT's file format, written from the base's config
    (speed does not depend on weight values), and 8 LoRA adapters."""
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    text = config.get("text_config", config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv, head_dim = text.get("num_key_value_heads", heads), text.get("head_dim") or hidden // heads
    shapes = linear_shapes_from_config(text)
    g = torch.Generator().manual_seed(0)

    def write(name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
        out = root / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(out / "adapter_model.safetensors"))
        return out

    pre = "base_model.model."
    made = {
        "ia3": write("ia3", {"peft_type": "IA3"}, {
            f"{pre}{m}.ia3_l": 1 + 0.01 * torch.randn(out_f, 1, generator=g)
            for m, (_, out_f) in shapes.items() if m.endswith(("k_proj", "v_proj"))
        } | {
            f"{pre}{m}.ia3_l": 1 + 0.01 * torch.randn(1, in_f, generator=g)
            for m, (in_f, _) in shapes.items() if m.endswith("down_proj")
        }),
        "prompt_tuning": write("prompt_tuning", {"peft_type": "PROMPT_TUNING",
            "num_virtual_tokens": 16, "token_dim": hidden, "num_layers": layers,
            "num_attention_heads": heads}, {"prompt_embeddings": torch.randn(16, hidden, generator=g)}),
        "prefix_tuning": write("prefix_tuning", {"peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": 16, "token_dim": kv * head_dim, "num_layers": layers,
            "num_attention_heads": kv},
            {"prompt_embeddings": torch.randn(16, layers * 2 * kv * head_dim, generator=g)}),
        "ln_tuning": write("ln_tuning", {"peft_type": "LN_TUNING"}, {
            f"{pre}model.layers.{i}.{n}.ln_tuning_layers.weight": 0.01 * torch.randn(hidden, generator=g)
            for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")
        }),
        "trainable_tokens": write("trainable_tokens", {"peft_type": "TRAINABLE_TOKENS",
            "token_indices": [106, 1], "target_modules": "model.embed_tokens"},
            {f"{pre}model.embed_tokens.trainable_tokens_delta": torch.randn(2, hidden, generator=g)}),
    }  # fmt: skip
    for i in range(8):
        made[f"lora{i}"] = random_lora_adapter(root / f"lora{i}", shapes, r=16, seed=i)
    return made


def interleaved_ms(
    runner: ModelRunner, compositions: dict[str, list[str]], steps: int
) -> dict[str, float]:
    """Prefill every composition, then time their decode steps in turns (one step of each,
    then the next), so that a machine whose load drifts slows all of them alike."""
    state = {}
    for name, rows in compositions.items():
        group = runner.new_group([PROMPT] * len(rows), rows)
        while not group.finished:
            runner.prefill_chunk(group, 512)
        state[name] = runner.finish_prefill(group)
    times: dict[str, list[float]] = {name: [] for name in compositions}
    for _ in range(steps):
        for name, rows in compositions.items():
            batch, logits = state[name]
            tokens = logits.argmax(-1).tolist()
            start = time.process_time()
            logits = runner.decode(batch, tokens, rows)
            times[name].append(time.process_time() - start)
            state[name] = (batch, logits)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--base", default="gemma3-270m", help="a bundled model or a folder")
    args = parser.parse_args()

    base = resolve_base_model(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        print("writing adapters ...", flush=True)
        paths = build_adapters(base, Path(tmp))
        loaded = load_base_model(base, quantization=args.quantization, device="cpu")
        # as the server does on a CPU without native bfloat16 (SWAPSERVE_LM_HEAD=auto)
        int8_head = args.quantization == "nf4" and use_int8_lm_head(loaded.model)
        runner = ModelRunner(loaded.model, pad_token_id=int(loaded.tokenizer.pad_token_id))
        for name, path in paths.items():
            peft_type = json.loads((path / "adapter_config.json").read_text())["peft_type"]
            kind = kind_for(peft_type)
            assert kind is not None
            runner.adapters.add(kind.read(name, path, runner.adapters.dtype))
        n = args.rows
        mixed = ["lora0", "ia3", "prompt_tuning", "lora1", "prefix_tuning", "ln_tuning",
                 "trainable_tokens", BASE_ADAPTER]  # fmt: skip
        compositions = {
            "a) base": [BASE_ADAPTER] * n,
            "b) LoRA, one adapter per row": [f"lora{i % 8}" for i in range(n)],
            "c) every kind, one per row": [mixed[i % len(mixed)] for i in range(n)],
        }
        for kind in ("ia3", "prompt_tuning", "prefix_tuning", "ln_tuning", "trainable_tokens"):
            compositions[f"d) all rows {kind}"] = [kind] * n
        with torch.inference_mode():
            interleaved_ms(runner, {"warm-up": [BASE_ADAPTER] * n}, 2)
            results = interleaved_ms(runner, compositions, args.steps)
            compute = compute_dtype(loaded.model)
            if compute != runner.adapters.dtype:
                lora = runner.adapters.rows["lora"]
                lora.dtype = compute  # type: ignore[attr-defined]
                for i in range(8):
                    runner.adapters.remove(f"lora{i}")
                    kind = kind_for("LORA")
                    assert kind is not None
                    runner.adapters.add(kind.read(f"lora{i}", paths[f"lora{i}"], compute))
                again = interleaved_ms(
                    runner,
                    {
                        "base": compositions["a) base"],
                        "lora": compositions["b) LoRA, one adapter per row"],
                    },
                    args.steps,
                )
                # scaled to a)'s time of the first run, so the column reads as the others
                results[f"e) b) with {str(compute).removeprefix('torch.')} blocks"] = (
                    again["lora"] / again["base"] * results["a) base"]
                )
    reference = results["a) base"]
    head = ", int8 output layer" if int8_head else ""
    print(f"\n{n} rows, {args.quantization}{head}, median CPU ms per decode step (ratio to a)")
    for name, ms in results.items():
        print(f"{name:36s} {ms:8.1f} ms   {ms / reference:5.2f}x")


if __name__ == "__main__":
    main()
