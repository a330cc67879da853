"""`swapserve train sft|dpo`: train an adapter in the foreground, no server needed.

The main CLI (server/cli.py) calls ``register(subparsers)``. ``--server URL`` registers the
result with a running server afterwards (POST URL/adapters). ``--dry-run`` validates the
data and prints the loss mask of the first example, before any weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer.config import QUANTIZATIONS, ConfigError


def default_data_dir() -> Path:
    return Path(
        os.environ.get("SWAPSERVE_DATA_DIR", Path.home() / ".local" / "share" / "swapserve")
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train sft`` and ``train dpo`` to an argparse subparsers object."""
    train = subparsers.add_parser("train", help="train a LoRA adapter (SFT or DPO) from JSONL data")
    methods = train.add_subparsers(dest="train_method", metavar="{sft,dpo}", required=True)
    for method, help_text in (
        ("sft", "supervised fine-tuning on chat or prompt/completion data"),
        ("dpo", "direct preference optimisation on prompt/chosen/rejected pairs"),
    ):
        p = methods.add_parser(method, help=help_text, description=help_text)
        _add_arguments(p, method)
        p.set_defaults(func=run_command, train_kind=method)
    return train


def _add_arguments(p: argparse.ArgumentParser, method: str) -> None:
    from trainer.jobs import config_class

    helps = config_class(method).field_help()
    p.add_argument("--data", required=True, type=Path, help="training data, JSONL")
    p.add_argument("--name", required=True, help="adapter name (letters, digits, . _ -)")
    p.add_argument(
        "--base",
        default=None,
        help=helps["base_model"] + " Default: $SWAPSERVE_BASE_MODEL (the server's base) if set.",
    )
    p.add_argument(
        "--quantization", choices=QUANTIZATIONS, default=None, help=helps["quantization"]
    )
    p.add_argument("--device", default=None, help=helps["device"])
    p.add_argument("--rank", type=int, default=None, help=helps["r"])
    p.add_argument("--alpha", type=float, default=None, help=helps["lora_alpha"])
    p.add_argument("--dropout", type=float, default=None, help=helps["lora_dropout"])
    p.add_argument(
        "--target-modules",
        default=None,
        help="'all-linear' or a comma-separated list of module names",
    )
    p.add_argument(
        "--trainable-tokens",
        default=None,
        help="'auto', 'none', or a comma-separated list of token strings or ids "
        "(e.g. '<end_of_turn>' or '106'). " + helps["trainable_tokens"],
    )
    p.add_argument("--rslora", action="store_true", default=None, help=helps["use_rslora"])
    p.add_argument("--dora", action="store_true", default=None, help=helps["use_dora"])
    p.add_argument("--lr", type=float, default=None, help=helps["learning_rate"])
    p.add_argument("--epochs", type=float, default=None, help=helps["epochs"])
    p.add_argument("--max-steps", type=int, default=None, help=helps["max_steps"])
    p.add_argument("--batch-size", type=int, default=None, help=helps["batch_size"])
    p.add_argument(
        "--grad-accum", type=int, default=None, help=helps["gradient_accumulation_steps"]
    )
    p.add_argument("--max-length", type=int, default=None, help=helps["max_length"])
    p.add_argument("--warmup-steps", type=int, default=None, help=helps["warmup_steps"])
    p.add_argument("--eval-steps", type=int, default=None, help=helps["eval_steps"])
    p.add_argument(
        "--early-stopping-patience",
        type=int,
        default=None,
        help=helps["early_stopping_patience"],
    )
    if method == "sft":
        p.add_argument(
            "--loss-turns", choices=("all", "last"), default=None, help=helps["loss_turns"]
        )
    p.add_argument("--eval-fraction", type=float, default=None, help=helps["eval_fraction"])
    p.add_argument("--eval-file", default=None, help=helps["eval_file"])
    p.add_argument("--seed", type=int, default=None, help=helps["seed"])
    if method == "dpo":
        p.add_argument("--beta", type=float, default=None, help=helps["beta"])
        p.add_argument(
            "--sft-weight", type=float, default=None, help=helps["sft_weight"], dest="sft_weight"
        )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a JSON file of config fields (the same shape as the HTTP job request); "
        "flags given on the command line win",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the adapter folder goes (default: $SWAPSERVE_DATA_DIR/trained/<name>)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data, print the loss mask of the first examples and the settings "
        "training would use; train nothing",
    )
    p.add_argument("--server", default=None, help="register the result with this server URL")
    p.add_argument("--api-key", default=os.environ.get("SWAPSERVE_API_KEY"), help="bearer token")


_FLAG_TO_FIELD = {
    "base": "base_model",
    "quantization": "quantization",
    "device": "device",
    "rank": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "rslora": "use_rslora",
    "dora": "use_dora",
    "lr": "learning_rate",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "batch_size": "batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "max_length": "max_length",
    "warmup_steps": "warmup_steps",
    "eval_steps": "eval_steps",
    "early_stopping_patience": "early_stopping_patience",
    "loss_turns": "loss_turns",
    "eval_fraction": "eval_fraction",
    "eval_file": "eval_file",
    "seed": "seed",
    "beta": "beta",
    "sft_weight": "sft_weight",
}


def config_from_args(args: argparse.Namespace) -> Any:
    from trainer.jobs import build_config

    fields: dict[str, Any] = {}
    if args.config is not None:
        fields.update(json.loads(args.config.read_text()))
    for flag, field_name in _FLAG_TO_FIELD.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[field_name] = value
    # the server's base unless told otherwise, so the adapter fits the server it goes to
    if fields.get("base_model") is None and os.environ.get("SWAPSERVE_BASE_MODEL"):
        fields["base_model"] = os.environ["SWAPSERVE_BASE_MODEL"]
    if args.target_modules:
        tm = args.target_modules
        fields["target_modules"] = tm if tm == "all-linear" else [s.strip() for s in tm.split(",")]
    if args.trainable_tokens is not None:
        fields["trainable_tokens"] = parse_trainable_tokens(args.trainable_tokens)
    return build_config(args.train_kind, fields)


def parse_trainable_tokens(value: str) -> str | list[str | int]:
    """'auto' / 'none', or a comma list where all-digit entries are ids and the rest token
    strings (a token that is itself digits or holds a comma needs the JSON config)."""
    value = value.strip()
    if value in ("auto", "none"):
        return value
    items = [s.strip() for s in value.split(",") if s.strip()]
    return [int(s) if s.isdigit() else s for s in items]


def run_command(args: argparse.Namespace) -> int:
    from trainer.data import DataError

    try:
        config = config_from_args(args)
        if args.dry_run:
            return _dry_run(args, config)
        return _train(args, config)
    except (ConfigError, DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dry_run(args: argparse.Namespace, config: Any) -> int:
    from transformers import AutoTokenizer

    from trainer.base_model import ensure_chat_template, resolve_base_model
    from trainer.data import dry_run

    # Only the tokenizer is needed to see the mask: no weights are loaded.
    path = resolve_base_model(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ensure_chat_template(tokenizer)
    loss_turns = getattr(config, "loss_turns", "all")
    report = dry_run(args.data, tokenizer, config.max_length, args.train_kind, loss_turns)
    tokens = _dry_run_tokens(config, tokenizer, path, args.data, args.train_kind)
    lengths = report["lengths"]
    print(f"data: {report['path']} (sha256 {report['sha256'][:16]}...)")
    print(f"examples: {report['counts']['examples']} ({report['counts']['format']})")
    print(
        f"tokens: longest {lengths['longest']}, mean {lengths['mean']:.1f}, "
        f"{lengths['n_truncated']} of {lengths['n_examples']} over max_length={lengths['max_length']}"
    )
    print(f"first {len(report['examples'])} example(s), {report['legend']}:")
    print(report["rendered"])
    if report["tool_fallback"]:
        print(
            "note: the chat template has no tool format; tools, tool calls and tool results "
            "are rendered as plain turns in the Hermes format (trainer/chat.py)"
        )
    print(tokens.describe())
    for line in _chosen_settings(args, config).describe():
        print(line)
    return 0


def _chosen_settings(args: argparse.Namespace, config: Any) -> Any:
    """What trainer.defaults makes of this config and data: the same call training makes."""
    from trainer.data import Task, load_jsonl
    from trainer.defaults import resolve_for_data

    task: Task = "dpo" if args.train_kind == "dpo" else "sft"
    data = load_jsonl(args.data, task)
    eval_data = load_jsonl(config.eval_file, task) if config.eval_file else None
    return resolve_for_data(config, args.train_kind, data, eval_data)[1]


def _dry_run_tokens(config: Any, tokenizer: Any, path: Path, data_path: Path, kind: str) -> Any:
    """What ``config.trainable_tokens`` resolves to, as training will resolve it: over the
    training split (after the eval hold-out), with the model's stop tokens."""
    from transformers import GenerationConfig

    from trainer.base_model import stop_token_ids
    from trainer.common import split_eval
    from trainer.data import Task, load_jsonl
    from trainer.tokens import config_vocab_size, resolve_trainable_tokens

    task: Task = "dpo" if kind == "dpo" else "sft"
    data = load_jsonl(data_path, task)
    eval_data = load_jsonl(config.eval_file, task) if config.eval_file else None
    train_examples, _ = split_eval(data, config, eval_data)
    try:
        generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        generation_config = None
    return resolve_trainable_tokens(
        config.trainable_tokens,
        tokenizer,
        stop_token_ids=stop_token_ids(tokenizer, generation_config),
        examples=train_examples,
        model_vocab_size=config_vocab_size(path),
    )


def _train(args: argparse.Namespace, config: Any) -> int:
    from tqdm import tqdm

    from trainer.common import ProgressUpdate
    from trainer.jobs import NAME_RE

    if not NAME_RE.match(args.name):
        raise ConfigError("name", f"{args.name!r}: use letters, digits, '.', '_' or '-'")
    if not isinstance(config.trainable_tokens, str):
        from trainer.base_model import resolve_base_model
        from trainer.tokens import check_trainable_tokens

        # a token the tokenizer lacks fails now, not after the base model has loaded
        check_trainable_tokens(config.trainable_tokens, resolve_base_model(config.base_model))
    output_dir = args.output_dir or default_data_dir() / "trained" / args.name
    # the settings, before the minutes of loading and training (the card records them too)
    for line in _chosen_settings(args, config).describe():
        print(line, flush=True)
    bar: tqdm | None = None
    eval_bar: tqdm | None = None

    def progress(update: ProgressUpdate) -> None:
        nonlocal bar, eval_bar
        if update.phase == "eval":
            # base and adapter answers to the eval prompts: minutes on a CPU
            if eval_bar is None:
                if bar is not None:
                    bar.close()
                eval_bar = tqdm(total=update.eval_total, desc="eval answers", unit="answer")
            eval_bar.update((update.eval_done or 0) - eval_bar.n)
            return
        if bar is None:
            bar = tqdm(total=update.total_steps, desc=f"train {args.train_kind}", unit="step")
        bar.update(update.step - bar.n)
        if update.loss is not None:
            bar.set_postfix(loss=f"{update.loss:.4f}")

    if args.train_kind == "sft":
        from trainer.sft import run_sft as runner
    else:
        from trainer.dpo import run_dpo as runner
    try:
        result = runner(config, args.data, output_dir, progress=progress, name=args.name)
    finally:
        for b in (bar, eval_bar):
            if b is not None:
                b.close()
    print(f"adapter: {result.output_dir}")
    print(f"final loss: {result.final_loss}")
    stopping = (result.card.get("defaults") or {}).get("early_stopping")
    if stopping and stopping.get("best_step"):
        how = (
            f"stopped early at step {stopping['stopped_early_at']}"
            if stopping.get("stopped_early_at")
            else f"ran all {result.steps} steps"
        )
        print(
            f"early stopping: {how}; kept the weights of step {stopping['best_step']} "
            f"(eval loss {stopping['best_eval_loss']:.4f})"
        )
    if result.eval:
        for arm in ("base", "adapter"):
            if arm in result.eval:
                m = result.eval[arm]
                print(
                    f"eval {arm}: exact_match {m['exact_match']:.3f}, token_f1 {m['token_f1']:.3f}"
                )
    if not result.card["mixed_batch_servable"]:
        print("note: DoRA adapter; it cannot be served in a mixed-adapter batch")
    if args.server:
        return register_with_server(args.server, args.name, result.output_dir, args.api_key)
    return 0


def register_with_server(url: str, name: str, path: Path, api_key: str | None = None) -> int:
    """POST {name, path} to URL/adapters; print the server's answer."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(
            url.rstrip("/") + "/adapters",
            json={"name": name, "path": str(Path(path).resolve())},
            headers=headers,
            timeout=120,
        )
    except httpx.HTTPError as exc:
        print(f"error: could not reach {url}: {exc}", file=sys.stderr)
        return 1
    if response.is_success:
        print(f"registered {name!r} with {url}")
        return 0
    print(
        f"error: the server refused the adapter ({response.status_code}): {response.text}",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m trainer.cli train sft ...``."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="swapserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
