"""Adapter folders as other tools write them, generated for a test base (no committed files).

Each case is the folder a user would bring: PEFT's files as one tool or PEFT version writes
them (their config fields, key names, dtypes, the extra files beside them). The tensors come
from PEFT itself (random, non-trivial LoRA weights on the given base); the config and the
folder are then rewritten to the tool's documented format:

- PEFT as of this project's pin (0.21), with a local folder and with a hub id as the base;
  target_modules as a list, a regex string, ``all-linear`` and full module paths;
  ``layers_to_transform``, ``rank_pattern``/``alpha_pattern``, ``use_rslora``,
  ``modules_to_save`` null or empty, ``bias`` "all"/"lora_only" on a base without biases;
  LoRA on the output layer and the embedding (PEFT then also saves the base's embedding
  and output layers whole: ``save_embedding_layers``).
- Older PEFT configs: 0.3 (``enable_lora``, ``merge_weights``), 0.5 (``auto_mapping``,
  ``layers_pattern``), 0.14 (``eva_config``, ``lora_bias``, ``megatron_core``), and a config
  with fields from a PEFT newer than ours.
- TRL: a real one-step ``SFTTrainer`` run with a ``LoraConfig``, saved by ``save_model``
  (README card, tokenizer files, the pickled ``training_args.bin`` beside the adapter).
- Unsloth: its regex ``target_modules``, ``auto_mapping.unsloth_fixed``, a ``-bnb-4bit``
  base name, bfloat16 tensors, its model card.
- LLaMA-Factory: its sorted all-linear list, the base as a local (non-ASCII) path, its
  output folder (``trainer_state.json``, ``all_results.json``, ``training_loss.png``, ...).
- Axolotl: its card with the YAML config, ``checkpoint-N/`` copies inside the output.
- Keys with the adapter name (``lora_A.default.weight``), float16 tensors, a base named by
  its Hugging Face cache path.

``reference`` is the canonical PEFT folder holding the same tensors: PEFT's output on it is
what the server must give for the case's folder.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.tiny_model import build_lora_adapter

UNSLOTH_REGEX = (
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}"
    r"\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|"
    r"o_proj|gate_proj|up_proj|down_proj)))"
)
ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

# the fields each PEFT version wrote (values filled from the canonical config)
PEFT_0_3_FIELDS = [
    "base_model_name_or_path", "bias", "enable_lora", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "lora_alpha", "lora_dropout", "merge_weights", "modules_to_save",
    "peft_type", "r", "target_modules", "task_type",
]  # fmt: skip
PEFT_0_5_FIELDS = [
    "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "lora_alpha", "lora_dropout",
    "modules_to_save", "peft_type", "r", "revision", "target_modules", "task_type",
]  # fmt: skip
PEFT_0_14_FIELDS = [
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save",
    "peft_type", "r", "rank_pattern", "revision", "target_modules", "task_type", "use_dora",
    "use_rslora",
]  # fmt: skip
OLD_DEFAULTS = {"enable_lora": None, "merge_weights": False, "megatron_core": "megatron.core"}


@dataclass
class WildAdapter:
    case: str
    tool: str
    path: Path  # the folder as the tool leaves it
    reference: Path  # PEFT's canonical folder with the same tensors


@dataclass
class _Case:
    case: str
    tool: str
    make: Callable[[Path, Path, Path], None]  # (base, canonical, out) -> writes out


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "adapter_config.json").read_text())


def _write_config(path: Path, config: dict[str, Any]) -> None:
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _copy(canonical: Path, out: Path, **changes: Any) -> dict[str, Any]:
    shutil.copytree(canonical, out)
    config = _config(out)
    config.update(changes)
    _write_config(out, config)
    return config


def _fields(canonical: Path, out: Path, fields: list[str], **changes: Any) -> None:
    """Rewrite the config with only the fields an older PEFT wrote."""
    shutil.copytree(canonical, out)
    config = _config(canonical)
    config.update(changes)
    _write_config(out, {f: config.get(f, OLD_DEFAULTS.get(f)) for f in fields})


def _retype(out: Path, dtype: Any) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})  # fmt: skip


def _rename_keys(out: Path, rename: Callable[[str], str]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))


def _tokenizer_files(base: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copy(base / name, out / name)


def _pickle(path: Path, value: Any) -> None:
    # what transformers' Trainer leaves beside an adapter: never read by the server
    path.write_bytes(pickle.dumps(value))


def _card(out: Path, text: str) -> None:
    (out / "README.md").write_text(text)


# --- the tools -----------------------------------------------------------------------------


def _unsloth(base: Path, canonical: Path, out: Path) -> None:
    import torch

    config = _copy(
        canonical,
        out,
        base_model_name_or_path="unsloth/tiny-gemma3-it-unsloth-bnb-4bit",
        target_modules=UNSLOTH_REGEX,
        lora_dropout=0,
        auto_mapping={
            "base_model_class": "Gemma3ForCausalLM",
            "parent_library": "transformers.models.gemma3.modeling_gemma3",
            "unsloth_fixed": True,
        },
    )
    del config
    _retype(out, torch.bfloat16)
    _tokenizer_files(base, out)
    (out / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}...")
    _card(out, "---\nbase_model: unsloth/tiny-gemma3-it-unsloth-bnb-4bit\nlibrary_name: peft\n"
               "tags:\n- base_model:adapter:unsloth/tiny-gemma3-it-unsloth-bnb-4bit\n- lora\n"
               "- sft\n- transformers\n- trl\n- unsloth\n---\n")  # fmt: skip


def _llamafactory(base: Path, canonical: Path, out: Path) -> None:
    local = "/home/admin1/桌面/tiny-gemma3-base"
    _copy(canonical, out, base_model_name_or_path=local, target_modules=ALL_LINEAR)
    _tokenizer_files(base, out)
    for name, value in {
        "all_results.json": {"epoch": 3.0, "train_loss": 1.23},
        "train_results.json": {"epoch": 3.0, "train_loss": 1.23},
        "trainer_state.json": {"global_step": 30, "log_history": []},
    }.items():
        (out / name).write_text(json.dumps(value))
    (out / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.0}\n')
    (out / "training_loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _pickle(out / "training_args.bin", {"output_dir": "saves/tiny/lora/sft"})
    _card(out, f"---\nlibrary_name: peft\nlicense: other\nbase_model: {local}\ntags:\n"
               "- llama-factory\n- lora\n- generated_from_trainer\n---\n")  # fmt: skip


def _axolotl(base: Path, canonical: Path, out: Path) -> None:
    _copy(canonical, out, base_model_name_or_path="/workspace/models/tiny-gemma3")
    _card(out, "---\nlibrary_name: peft\ntags:\n- axolotl\n- generated_from_trainer\n---\n"
               "[<img src=\"https://raw.githubusercontent.com/axolotl-ai-cloud/axolotl/main/image/"
               "axolotl-badge-web.png\" alt=\"Built with Axolotl\"/>]\n<details><summary>See "
               "axolotl config</summary>\n\n```yaml\nadapter: lora\nlora_r: 4\nlora_alpha: 8\n"
               "lora_target_linear: true\n```\n</details>\n")  # fmt: skip
    for step in (5, 10):  # checkpoints inside the output folder, each a full adapter copy
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(out / name, ckpt / name)
        _pickle(ckpt / "optimizer.pt", {"state": {}})
        _pickle(ckpt / "rng_state.pth", {"python": 1})


def _trl(base: Path, canonical: Path, out: Path) -> None:
    """A real one-step SFT run with TRL; the tensors are TRL's, so it is its own reference."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    data = Dataset.from_list([{"text": "Hello world, this is a tiny test."}] * 4)
    args = SFTConfig(
        output_dir=str(out.parent / f"{out.name}-run"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1.0,  # one large step: the adapter visibly moves
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        max_length=32,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    with torch.no_grad():  # LoRA starts with B = 0: give B values so that one step shows
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    trainer.train()
    trainer.save_model(str(out))
    shutil.rmtree(out.parent / f"{out.name}-run", ignore_errors=True)


def _cases() -> list[_Case]:
    def peft(**changes: Any) -> Callable[[Path, Path, Path], None]:
        def make(base: Path, canonical: Path, out: Path) -> None:
            _copy(canonical, out, **changes)

        return make

    def old(fields: list[str], **changes: Any) -> Callable[[Path, Path, Path], None]:
        return lambda base, canonical, out: _fields(canonical, out, fields, **changes)

    def default_keys(base: Path, canonical: Path, out: Path) -> None:
        _copy(canonical, out)
        _rename_keys(out, lambda k: k.replace(".weight", ".default.weight"))

    def half(base: Path, canonical: Path, out: Path) -> None:
        import torch

        _copy(canonical, out)
        _retype(out, torch.float16)

    return [
        _Case("peft-local-base", "peft", peft(base_model_name_or_path="/data/models/adapters")),
        _Case("peft-hub-base", "peft", peft(base_model_name_or_path="my-org/tiny-gemma3")),
        _Case("peft-no-base-name", "peft", peft(base_model_name_or_path=None)),
        _Case(
            "peft-hf-cache-base",
            "peft",
            peft(
                base_model_name_or_path="/root/.cache/huggingface/hub/models--my-org--tiny-gemma3/"
                "snapshots/0123456789abcdef0123456789abcdef01234567"
            ),
        ),  # fmt: skip
        _Case("peft-target-list", "peft", peft()),
        _Case("peft-target-regex", "peft", peft()),
        _Case("peft-all-linear", "peft", peft()),
        _Case("peft-full-module-paths", "peft", peft()),
        _Case("peft-layers-to-transform", "peft", peft()),
        _Case("peft-rank-pattern", "peft", peft()),
        _Case("peft-rslora", "peft", peft()),
        _Case("peft-modules-to-save-null", "peft", peft(modules_to_save=None)),
        _Case("peft-modules-to-save-empty", "peft", peft(modules_to_save=[])),
        _Case("peft-bias-all-no-bias-tensors", "peft", peft(bias="all")),
        _Case("peft-bias-lora-only", "peft", peft(bias="lora_only")),
        _Case("peft-lm-head-and-embedding", "peft", peft()),
        _Case("peft-0.3-config", "peft 0.3", old(PEFT_0_3_FIELDS)),
        _Case("peft-0.5-config", "peft 0.5", old(PEFT_0_5_FIELDS)),
        _Case("peft-0.14-config", "peft 0.14", old(PEFT_0_14_FIELDS)),
        _Case(
            "peft-newer-config",
            "peft (newer)",
            peft(peft_version="0.99.0", some_future_option={"enabled": False}, arrow_config=None),
        ),  # fmt: skip
        _Case("peft-keys-with-adapter-name", "peft", default_keys),
        _Case("peft-float16", "peft", half),
        _Case("trl-sft", "trl", _trl),
        _Case("unsloth", "unsloth", _unsloth),
        _Case("llamafactory", "llama-factory", _llamafactory),
        _Case("axolotl", "axolotl", _axolotl),
    ]


# how PEFT builds each case's tensors (LoraConfig arguments)
_LORA: dict[str, dict[str, Any]] = {
    "peft-target-list": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "peft-target-regex": {"target_modules": r".*\.(q_proj|v_proj|down_proj)$"},
    "peft-full-module-paths": {
        "target_modules": ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    },
    "peft-layers-to-transform": {
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": [1],
        "layers_pattern": "layers",
    },
    "peft-rank-pattern": {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"o_proj": 3}},
    "peft-rslora": {"use_rslora": True},
    "peft-bias-all-no-bias-tensors": {"bias": "all"},
    "peft-bias-lora-only": {"bias": "lora_only"},
    "peft-lm-head-and-embedding": {"target_modules": ["q_proj", "lm_head", "embed_tokens"]},
    "peft-0.3-config": {"target_modules": ["q_proj", "v_proj", "k_proj", "o_proj"]},
    "peft-0.5-config": {"target_modules": ["model.layers.1.self_attn.q_proj"]},
    "unsloth": {"target_modules": ALL_LINEAR, "lora_dropout": 0.0},
    "llamafactory": {"target_modules": ALL_LINEAR},
}


def build_wild_adapters(base: Path, root: Path) -> dict[str, WildAdapter]:
    """Every case, built for ``base`` under ``root``."""
    made = {}
    for i, case in enumerate(_cases()):
        out = root / case.case
        if case.tool == "trl":
            case.make(base, out, out)
            made[case.case] = WildAdapter(case.case, case.tool, out, out)
            continue
        canonical = build_lora_adapter(
            base, root / f"{case.case}.peft", r=4, seed=100 + i, **_LORA.get(case.case, {})
        )
        case.make(base, canonical, out)
        made[case.case] = WildAdapter(case.case, case.tool, out, canonical)
    return made


CASES = [c.case for c in _cases()]
