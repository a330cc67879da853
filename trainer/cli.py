"""`swapserve train sft|dpo|orpo|kto|compare`: train in the foreground, no server needed.

The main CLI (server/cli.py) calls ``register(subparsers)``. One subcommand per objective
(``trainer.objectives``); its flags are generated from that objective's config dataclass, so
every field (the method table's included: ``--method``, ``--num-virtual-tokens``, ...) has a
flag with the field's own help. ``--server URL`` registers the result with a running server
afterwards (POST URL/adapters). ``--dry-run`` validates the data and the method against the
base and prints the loss mask of the first example, before any weights are loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from trainer.config import QUANTIZATIONS, ConfigError

# Short flags kept from before the flags were generated from the config fields.
FLAG_ALIASES = {
    "base_model": "--base",
    "r": "--rank",
    "lora_alpha": "--alpha",
    "lora_dropout": "--dropout",
    "use_rslora": "--rslora",
    "use_dora": "--dora",
    "learning_rate": "--lr",
    "gradient_accumulation_steps": "--grad-accum",
}
# Comma-separated lists on the command line.
LIST_FIELDS = {"target_modules", "feedforward_modules", "trainable_tokens"}


def default_data_dir() -> Path:
    return Path(
        os.environ.get("SWAPSERVE_DATA_DIR", Path.home() / ".local" / "share" / "swapserve")
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train <objective>`` and ``train compare`` to an argparse subparsers object."""
    from trainer.objectives import get_objective, objective_names

    names = objective_names()
    train = subparsers.add_parser(
        "train", help=f"train an adapter ({', '.join(names)}) from JSONL data, or compare methods"
    )
    methods = train.add_subparsers(
        dest="train_method", metavar="{" + ",".join([*names, "compare"]) + "}", required=True
    )
    for name in names:
        objective = get_objective(name)
        help_text = f"{objective.summary}; data: {objective.data}"
        p = methods.add_parser(name, help=objective.summary, description=help_text)
        _add_arguments(p, objective.config_class)
        p.set_defaults(func=run_command, train_kind=name)
    from trainer.compare import register_compare

    register_compare(methods)
    return train


def field_flags(p: argparse.ArgumentParser, config_cls: Any, skip: Collection[str] = ()) -> None:
    """One flag per config field (dest = the field name), typed from its annotation."""
    from trainer.methods import method_names

    helps = config_cls.field_help()
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = FLAG_ALIASES.get(f.name, "--" + f.name.replace("_", "-"))
        kind = str(f.type)
        help_text = helps[f.name]
        if f.name == "method":
            p.add_argument(flag, dest=f.name, choices=method_names(), default=None, help=help_text)
        elif f.name == "quantization":
            p.add_argument(flag, dest=f.name, choices=QUANTIZATIONS, default=None, help=help_text)
        elif f.name in LIST_FIELDS:
            p.add_argument(flag, dest=f.name, default=None, help=help_text + " (comma-separated)")
        elif kind == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif kind.startswith("bool"):
            p.add_argument(flag, dest=f.name, type=_parse_bool, default=None, help=help_text)
        elif kind.startswith("int"):
            p.add_argument(flag, dest=f.name, type=int, default=None, help=help_text)
        elif kind.startswith("float"):
            p.add_argument(flag, dest=f.name, type=float, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, default=None, help=help_text)


def _parse_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r}: use true or false")


def _add_arguments(p: argparse.ArgumentParser, config_cls: Any) -> None:
    p.add_argument("--data", required=True, type=Path, help="training data, JSONL")
    p.add_argument("--name", required=True, help="adapter name (letters, digits, . _ -)")
    field_flags(p, config_cls)
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
        "--model-dir",
        type=Path,
        default=None,
        help="method full: where the fine-tuned model folder goes (default: "
        "$SWAPSERVE_DATA_DIR/models/<name>); usable as SWAPSERVE_BASE_MODEL",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the data, print the loss mask of the first examples and the settings "
        "training would use; train nothing",
    )
    p.add_argument("--server", default=None, help="register the result with this server URL")
    p.add_argument("--api-key", default=os.environ.get("SWAPSERVE_API_KEY"), help="bearer token")


def fields_from_args(args: argparse.Namespace, config_cls: Any) -> dict[str, Any]:
    """The config fields given as flags (and in --config), as a JSON-shaped dict."""
    fields: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        fields.update(json.loads(args.config.read_text()))
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "trainable_tokens":
            value = parse_trainable_tokens(value)
        elif f.name == "target_modules":
            value = value if value == "all-linear" else [s.strip() for s in value.split(",")]
        elif f.name in LIST_FIELDS:
            value = [s.strip() for s in value.split(",") if s.strip()]
        fields[f.name] = value
    # the server's base unless told otherwise, so the adapter fits the server it goes to
    if fields.get("base_model") is None and os.environ.get("SWAPSERVE_BASE_MODEL"):
        fields["base_model"] = os.environ["SWAPSERVE_BASE_MODEL"]
    return fields


def config_from_args(args: argparse.Namespace) -> Any:
    from trainer.objectives import build_config, get_objective

    cls = get_objective(args.train_kind).config_class
    return build_config(args.train_kind, fields_from_args(args, cls))


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
    from trainer.methods import check_against_base, get_method
    from trainer.objectives import get_objective

    task = get_objective(args.train_kind).task
    method = get_method(config.method)
    check_against_base(config, path)  # module names, context: refused now, not after loading
    report = dry_run(args.data, tokenizer, config.max_length, task, config.loss_turns)
    tokens = _dry_run_tokens(config, tokenizer, path, args.data, task)
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
    print(f"method: {method.name} ({method.summary}); base {config.quantization}")
    print(
        tokens.describe()
        if method.trains_token_rows
        else f"trainable tokens: none (method {method.name} trains no embedding rows)"
    )
    for line in _chosen_settings(args, config).describe():
        print(line)
    return 0


def _chosen_settings(args: argparse.Namespace, config: Any) -> Any:
    """What trainer.defaults makes of this config and data: the same call training makes."""
    from trainer.data import load_jsonl
    from trainer.defaults import resolve_for_data
    from trainer.objectives import get_objective

    task = get_objective(args.train_kind).task
    data = load_jsonl(args.data, task)
    eval_data = load_jsonl(config.eval_file, task) if config.eval_file else None
    return resolve_for_data(config, args.train_kind, data, eval_data)[1]


def _dry_run_tokens(config: Any, tokenizer: Any, path: Path, data_path: Path, task: Any) -> Any:
    """What ``config.trainable_tokens`` resolves to, as training will resolve it: over the
    training split (after the eval hold-out), with the model's stop tokens."""
    from transformers import GenerationConfig

    from trainer.base_model import stop_token_ids
    from trainer.common import split_eval
    from trainer.data import load_jsonl
    from trainer.tokens import config_vocab_size, resolve_trainable_tokens

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
    if config.method == "full" and args.model_dir is None:
        args.model_dir = default_data_dir() / "models" / args.name
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
    # the bar's postfix: the last train loss and, once an eval has run (eval_steps), the
    # last eval loss, which stays shown until the next eval replaces it
    postfix: dict[str, str] = {}

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
            bar = tqdm(
                total=update.total_steps,
                desc=f"train {args.train_kind}/{config.method}",
                unit="step",
            )
        bar.update(update.step - bar.n)
        if update.loss is not None:
            postfix["loss"] = f"{update.loss:.4f}"
        if update.eval_loss is not None:
            postfix["eval_loss"] = f"{update.eval_loss:.4f}"
        if postfix:
            bar.set_postfix(postfix)

    from trainer.train import train

    try:
        result = train(
            config,
            args.data,
            output_dir,
            progress=progress,
            name=args.name,
            model_dir=args.model_dir,
        )
    finally:
        for b in (bar, eval_bar):
            if b is not None:
                b.close()
    card = result.card
    params = card["method"]["parameters"]
    print(f"adapter: {result.output_dir} ({card['method']['name']}, {card['adapter_bytes']} bytes)")
    print(
        f"trainable parameters: {params['trainable']:,} ({params['trainable_pct']:.3f}% of "
        f"{params['base']:,})"
    )
    print(f"final loss: {result.final_loss}")
    extraction = card.get("extraction")
    if extraction:
        print(f"full model: {extraction['model_dir']}")
        print(
            f"extracted LoRA: ranks {extraction['ranks']}, relative error "
            f"{extraction['relative_error']:.4f}, the linear layers hold "
            f"{100 * extraction['linear_share']:.1f}% of the weight change"
        )
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
        labels = {"base": "base", "adapter": "full model" if extraction else "adapter"}
        for arm, label in labels.items():
            if arm in result.eval:
                m = result.eval[arm]
                print(
                    f"eval {label}: exact_match {m['exact_match']:.3f}, "
                    f"token_f1 {m['token_f1']:.3f}"
                )
        ex = result.eval.get("extracted")
        if ex and "adapter" in ex:
            loss = ex.get("eval_loss")
            print(
                f"eval extracted adapter: exact_match {ex['adapter']['exact_match']:.3f}, "
                f"token_f1 {ex['adapter']['token_f1']:.3f}"
                + (f", eval loss {loss:.4f}" if loss is not None else "")
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
