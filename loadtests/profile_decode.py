"""Where a decode step of the hf engine spends its time, by part of the model and by operator.

    python loadtests/profile_decode.py [--batch 1 8] [--steps 10] [--adapters 0]
                                       [--fast-path auto|off] [--threads N] [--compile]
                                       [--against SETTING=VALUE ...] [--turns 40]

Builds the engine exactly as the server does (same settings, SWAPSERVE_* honoured),
prefills one prompt per row, then runs decode steps under torch's profiler. Printed per
batch size:
- the wall time of a step without the profiler;
- by part: time inside the model's own modules (embedding, the q/k/v/o projections, the
  MLPs' projections, the output layer; LoRA deltas apart from the base layers when adapters
  are on), and the rest of the step (attention itself, norms, rotary embedding, the MLPs'
  activation, cache updates, masks and the Python and framework work between operators);
- by operator: the operators with the most self time, and how many operators a step
  launches (each costs a few microseconds of framework work on top of its arithmetic).

With --adapters K, rows cycle over K random rank-16 adapters on every linear layer.
Timings move with the machine's load: compare the parts and ratios of one run.

--against SETTING=VALUE (e.g. huge_pages=off, int4_kernel=torch) builds a second engine in
this process with those settings changed and times the two engines' decode steps in turns
(--turns steps each, over the same rows), printing the medians and their ratio: a
difference of a few percent that separate runs, minutes apart, cannot show.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

# module class name -> part of the model (linear bases are told apart by their path)
_PARTS = {
    "q_proj": "attention projections (q, k, v, o)",
    "k_proj": "attention projections (q, k, v, o)",
    "v_proj": "attention projections (q, k, v, o)",
    "o_proj": "attention projections (q, k, v, o)",
    "gate_proj": "MLP projections (gate, up, down)",
    "up_proj": "MLP projections (gate, up, down)",
    "down_proj": "MLP projections (gate, up, down)",
    "lm_head": "output layer (logits)",
    "embed_tokens": "embedding",
}


def _hook_parts(model) -> list:
    """record_function ranges around the modules both paths call, labelled by part."""
    from server.engine.kinds.lora import LoRALinear

    handles = []
    labels: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        part = _PARTS.get(name.rsplit(".", 1)[-1])
        if part is not None:
            labels[id(module)].append(part)
        if isinstance(module, LoRALinear):  # LoRA = the wrapper's time less its base's
            labels[id(module)].append(_WRAPPED)
            labels[id(module.base)].append(_WRAPPED_BASE)
    for module in model.modules():
        for label in labels.get(id(module), []):
            handles += _hook(module, label)
    return handles + [_label_whole_layers()]


_WHOLE_LAYERS = "decoder layers as whole calls (CPU kernel)"


def _label_whole_layers():
    """Decoder layers run as whole calls on the CPU kernel (vnni.decode_layers) call none
    of the modules hooked above: their time gets a label of its own. Returns the undoer."""
    import torch

    from server.engine import vnni

    original = vnni.decode_layers

    def labelled(*args, **kwargs):
        with torch.autograd.profiler.record_function(_WHOLE_LAYERS):
            return original(*args, **kwargs)

    vnni.decode_layers = labelled

    class Undo:
        def remove(self) -> None:
            vnni.decode_layers = original

    return Undo()


_WRAPPED, _WRAPPED_BASE = "lora layer", "lora base layer"


def _hook(module, label: str) -> list:
    import torch

    stack: list = []

    def pre(_m, _a):
        ctx = torch.autograd.profiler.record_function(label)
        ctx.__enter__()
        stack.append(ctx)

    def post(_m, _a, _o):
        stack.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _prefilled(runner, tokens: list[int], adapters: list[str]):
    group = runner.new_group([tokens] * len(adapters), adapters)
    while not group.finished:
        runner.prefill_chunk(group, 512)
    batch, logits = runner.finish_prefill(group)
    return batch, _greedy(logits)


def _greedy(logits) -> list[int]:
    """Each row's argmax as the server's greedy sampling takes it (two passes over blocks)."""
    from server.engine.topk import argmax_rows

    return argmax_rows(logits.reshape(len(logits), -1)).tolist()


def profile(engine, batch_size: int, steps: int, adapters: list[str]) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = engine.runner
    rows = [adapters[i % len(adapters)] for i in range(batch_size)]
    tokens = engine.tokenize(PROMPT)
    batch, next_tokens = _prefilled(runner, tokens, rows)
    for _ in range(3):  # warm-up
        next_tokens = _greedy(runner.decode(batch, next_tokens, rows))
    start = time.perf_counter()
    for _ in range(steps):
        next_tokens = _greedy(runner.decode(batch, next_tokens, rows))
    wall_ms = (time.perf_counter() - start) / steps * 1000

    handles = _hook_parts(runner.model)
    try:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                with torch.autograd.profiler.record_function("decode step"):
                    next_tokens = _greedy(runner.decode(batch, next_tokens, rows))
            profiled_ms = (time.perf_counter() - start) / steps * 1000
    finally:
        for handle in handles:
            handle.remove()
    events = prof.key_averages()
    by_label = {e.key: e.cpu_time_total / 1000 / steps for e in events}
    step_ms = by_label.get("decode step", profiled_ms)
    parts = {label: by_label.get(label, 0.0) for label in dict.fromkeys(_PARTS.values())}
    if _WRAPPED in by_label:
        lora = by_label[_WRAPPED] - by_label.get(_WRAPPED_BASE, 0.0)
        parts["  of which LoRA (in the two above)"] = max(0.0, lora)
    parts[_WHOLE_LAYERS] = by_label.get(_WHOLE_LAYERS, 0.0)
    in_modules = sum(v for k, v in parts.items() if not k.startswith("  "))
    parts["rest: attention, norms, rotary, activation, cache, Python"] = max(
        0.0, step_ms - in_modules
    )
    ops = [e for e in events if "::" in e.key]  # operators, not our labelled ranges
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    launched = sum(e.count for e in ops if e.key.startswith("aten::")) / steps
    return {
        "batch": batch_size,
        "wall_ms": wall_ms,
        "profiled_ms": step_ms,
        "parts": parts,
        "top_ops": [(e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in top],
        "aten_ops_per_step": launched,
    }


def steps_in_turns(engines: dict, batch_size: int, adapters: list[str], turns: int) -> dict:
    """Median decode step (ms) of each engine, their steps taken in turns."""
    import statistics

    rows = [adapters[i % len(adapters)] for i in range(batch_size)]
    state = {}
    for name, engine in engines.items():
        batch, next_tokens = _prefilled(engine.runner, engine.tokenize(PROMPT), rows)
        state[name] = [batch, next_tokens]
    times: dict[str, list[float]] = {name: [] for name in engines}
    for turn in range(turns + 3):  # three warm-up turns
        for name, engine in engines.items():
            batch, next_tokens = state[name]
            start = time.perf_counter()
            state[name][1] = _greedy(engine.runner.decode(batch, next_tokens, rows))
            if turn >= 3:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def _with_adapters(engine, count: int) -> list[str]:
    """Registers `count` random rank-16 adapters on every linear layer; their names."""
    if not count:
        return ["__base__"]
    from loadtests._adapters import linear_shapes_from_config, random_lora_adapter

    config = json.loads((engine.loaded.path / "config.json").read_text())
    shapes = linear_shapes_from_config(config)
    work = Path(tempfile.mkdtemp(prefix="swapserve-profile-"))
    atexit.register(shutil.rmtree, work, True)
    for i in range(count):
        engine._load_adapter(f"ad{i}", random_lora_adapter(work / f"ad{i}", shapes, r=16, seed=i))
    return [f"ad{i}" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--adapters", type=int, default=0, help="distinct adapters over rows")
    parser.add_argument("--fast-path", choices=["auto", "on", "off"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--against",
        nargs="+",
        default=None,
        metavar="SETTING=VALUE",
        help="a second engine with these settings changed, its steps timed in turns",
    )
    parser.add_argument("--turns", type=int, default=40, help="steps each engine, --against")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the fast path's decoder under torch.compile (the compile time is printed; "
        "each new batch size compiles again)",
    )
    args = parser.parse_args()

    import torch

    from loadtests._server import BENCH_BASE
    from server.config import Settings
    from server.engine.factory import build_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {} if args.fast_path is None else {"fast_path": args.fast_path}
    engine = build_engine(Settings(base_model=BENCH_BASE, **overrides))
    adapters = _with_adapters(engine, args.adapters)
    info = engine.info
    print(
        f"{info.model_id}, {info.quantization}, runner {info.runner}, "
        f"{torch.get_num_threads()} threads; weights: {info.weights_format}"
    )
    if args.compile:
        decoder = engine.runner.decoder  # the fast path's (FastDecoder)
        decoder.forward = torch.compile(decoder.forward)
    results = []
    for batch_size in args.batch:
        if args.compile:  # compiled (or compiled again) for this batch size before timing
            start = time.perf_counter()
            profile(engine, batch_size, 1, adapters)
            print(f"\nbatch {batch_size}: compiled in {time.perf_counter() - start:.0f} s")
        r = profile(engine, batch_size, args.steps, adapters)
        results.append(r)
        print(
            f"\nbatch {batch_size}: {r['wall_ms']:.1f} ms a step "
            f"({r['profiled_ms']:.1f} ms under the profiler), "
            f"{r['aten_ops_per_step']:.0f} operators a step"
        )
        total = max(r["profiled_ms"], 1e-9)
        for label, ms in r["parts"].items():
            print(f"  {label:<48} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
        print("  top operators by self time:")
        for name, ms, count in r["top_ops"]:
            print(f"    {name:<46} {ms:8.2f} ms  x{count}")
    if args.against:
        changed = dict(item.split("=", 1) for item in args.against)
        other = build_engine(Settings(base_model=BENCH_BASE, **{**overrides, **changed}))
        _with_adapters(other, args.adapters)
        label = ", ".join(f"{k}={v}" for k, v in changed.items())
        engines = {"as set": engine, label: other}
        print(f"\ndecode steps in turns ({args.turns} each), as set against {label}:")
        for batch_size in args.batch:
            ms = steps_in_turns(engines, batch_size, adapters, args.turns)
            mine, theirs = ms["as set"], ms[label]
            print(
                f"  batch {batch_size}: {mine:.2f} ms against {theirs:.2f} ms "
                f"(as set / {label}: {theirs / mine:.3f}x the speed)"
            )
            results.append({"batch": batch_size, "against": label, "ms": ms})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
