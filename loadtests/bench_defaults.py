"""Do the trainer's defaults teach? Held-out format tasks, trained with no tuning flag.

    HF_HUB_OFFLINE=1 python loadtests/bench_defaults.py [--task tag --task shout ...]
        [--train 60] [--eval 40] [--out results.json] [--keep DIR]

For each task of ``loadtests/format_tasks.py`` (none of them is in ``trainer/examples``) it
writes 60 training examples, then runs the command a user would type, in a process of its
own and with no tuning flag:

    swapserve train sft --data <task>_train.jsonl --name <task>

so the number of steps, the learning rate, the warm-up, the eval split and early stopping
are the trainer's defaults (``trainer/defaults.py``). Then it loads the bundled base once,
puts each adapter on it, and answers the task's held-out prompts greedily, as the server
renders a one-turn chat, with the adapter and without it (the base). Each answer's budget is
the longest reference in tokens + 8, as the trainer's own eval uses.

Printed per task, base against adapter: how many answers follow the format (begin with it),
how many stop cleanly (the format, then the end-of-turn token, nothing else), how many are
exactly the reference, and the training's wall time and the settings the defaults chose.
The run fails (exit 1) unless every adapter beats the base by at least ``--margin`` (0.5) on
both rates; whether each reaches the goal (0.8) is reported, not asserted. Timings are
reported, never asserted: they depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtests.format_tasks import (  # noqa: E402
    TASKS,
    generate_answers,
    judge,
    read_eval,
    write_task,
)

GOAL = 0.8
ANSWER_MARGIN_TOKENS = 8


def train(task: str, data: Path, data_dir: Path, log: Path) -> dict:
    """`swapserve train sft --data ... --name ...` and no other flag, in its own process; the
    adapter goes where the CLI puts it, under $SWAPSERVE_DATA_DIR/trained/<name>."""
    cmd = [sys.executable, "-m", "server.cli", "train", "sft", "--data", str(data), "--name", task]
    env = {**os.environ, "SWAPSERVE_DATA_DIR": str(data_dir)}
    out_dir = data_dir / "trained" / task
    started = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False
        )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"training {task} failed ({proc.returncode}); see {log}")
    card = json.loads((out_dir / "swapserve_card.json").read_text())
    chosen = card["defaults"]["chosen"]
    return {
        "wall_s": round(wall, 1),
        "steps": card["train"]["steps"],
        "early_stopping": card["defaults"].get("early_stopping"),
        "settings": {k: v["value"] for k, v in chosen.items()},
        "final_loss": card["train"]["final_loss"],
        "eval_loss": (card.get("eval") or {}).get("eval_loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="default: all")
    parser.add_argument("--train", type=int, default=60, help="training examples per task")
    parser.add_argument("--eval", type=int, default=40, help="held-out prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="keep data and adapters here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = args.task or sorted(TASKS)

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in tasks:
        # one task at a time, each figure printed as soon as it is known (an hour or more
        # on a busy 2-core machine)
        train_path, eval_path = write_task(
            TASKS[name], work, n_train=args.train, n_eval=args.eval, seed=args.seed
        )
        print(f"[{name}] swapserve train sft --data {train_path} --name {name}", flush=True)
        t = train(name, train_path, work / "data", work / f"{name}-train.log")
        results[name] = {"train": t}
        print(f"[{name}] trained: {t['steps']} steps in {t['wall_s']:.0f} s; {t['settings']}",
              flush=True)  # fmt: skip

        from peft import PeftModel

        from trainer.base_model import load_base_model

        # a fresh base for each adapter: PEFT's trainable token rows of a second adapter on a
        # tied embedding corrupted the first's base (seen on SmolLM2)
        base = load_base_model(None, quantization="nf4")
        tok = base.tokenizer
        model = PeftModel.from_pretrained(base.model, str(work / "data" / "trained" / name))
        held = read_eval(eval_path)
        prompts = [h["prompt"] for h in held]
        refs = [h["reference"] for h in held]
        budget = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs)
        budget += ANSWER_MARGIN_TOKENS
        started = time.monotonic()
        with model.disable_adapter():
            base_answers = generate_answers(model, tok, prompts, base.stop_token_ids, budget)
        adapter_answers = generate_answers(model, tok, prompts, base.stop_token_ids, budget)
        r = results[name]
        r["eval_s"] = round(time.monotonic() - started, 1)
        r["max_new_tokens"] = budget
        r["base"] = judge(TASKS[name], base_answers, refs).to_dict()
        r["adapter"] = judge(TASKS[name], adapter_answers, refs).to_dict()
        b, a = r["base"], r["adapter"]
        print(f"[{name}] follows {b['follows']}/{b['n']} -> {a['follows']}/{a['n']}, clean stops "
              f"{b['clean_stops']}/{b['n']} -> {a['clean_stops']}/{a['n']}", flush=True)  # fmt: skip
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        del model, base
        gc.collect()

    failed = []
    print()
    from trainer.base_model import DEFAULT_BUNDLED

    print(f"held-out prompts, {DEFAULT_BUNDLED.title} (NF4), no tuning flag; base -> adapter")
    header = ("task", "format", "follows", "clean stop", "exact", "steps", "lr", "train s")
    rows = [header]
    for name in tasks:
        r, t = results[name], results[name]["train"]
        b, a = r["base"], r["adapter"]
        stop = t["early_stopping"] or {}
        steps = f"{t['steps']}/{t['settings']['max_steps']}"
        if stop.get("stopped_early_at"):
            steps += f" (best {stop['best_step']})"
        rows.append(
            (
                name,
                TASKS[name].description,
                f"{b['follows']}/{b['n']} -> {a['follows']}/{a['n']}",
                f"{b['clean_stops']}/{b['n']} -> {a['clean_stops']}/{a['n']}",
                f"{b['exact']}/{b['n']} -> {a['exact']}/{a['n']}",
                steps,
                f"{t['settings']['learning_rate']:g}",
                f"{t['wall_s']:.0f}",
            )
        )
        for metric in ("follows_rate", "clean_rate"):
            if a[metric] - b[metric] < args.margin:
                failed.append(f"{name}: {metric} {b[metric]:.2f} -> {a[metric]:.2f}")
        r["goal_met"] = a["follows_rate"] >= GOAL and a["clean_rate"] >= GOAL
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    met = [n for n in tasks if results[n]["goal_met"]]
    print(f"goal (>= {GOAL:.0%} follow and >= {GOAL:.0%} clean stops) met on {len(met)} of "
          f"{len(tasks)} tasks: {', '.join(met) or 'none'}")  # fmt: skip
    for name in tasks:
        for s in results[name]["adapter"]["samples"][:2]:
            print(f"  {name} adapter: {s['answer']!r} (stopped: {s['stopped']})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if failed:
        print("FAILED: the adapter does not beat the base by", args.margin, "on", "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
