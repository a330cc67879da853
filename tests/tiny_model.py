"""Tiny random models for unit tests, built locally: no downloads, a few seconds.

A 2-layer Gemma 3 text model (hidden 64), or a 2-layer Llama (the architecture of the
bundled SmolLM2), each with a byte-level BPE tokenizer trained here on a small corpus.
Written as an ordinary Hugging Face folder, so it goes through the very same loader as the
real base models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny test model for swapserve.",
    "Adapters change behaviour; retrieval brings knowledge.",
    "What is the capital of France? Paris is the capital of France.",
    "One base model, many LoRA adapters, served per request.",
    "0 1 2 3 4 5 6 7 8 9 { } [ ] : , \" ' ? ! . -",
] * 20

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# The Llama fixture speaks ChatML, as SmolLM2 does: the same ids, other turn markers, and
# <|im_end|> is its eos (there is no separate <eos>).
CHATML_TOKENS = ["<pad>", "<|endoftext|>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHITECTURES = ("gemma", "llama")


def build_tokenizer(path: Path, chatml: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = CHATML_TOKENS if chatml else SPECIAL_TOKENS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>" if chatml else "<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        # ChatML's <|endoftext|> takes <eos>'s place but is not the eos
        additional_special_tokens=(["<|endoftext|>"] if chatml else []) + specials[4:],
    )
    if chatml:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    head_dim: int = 16,
    arch: str = "gemma",
) -> Path:
    """Write a tiny random Gemma 3 (``arch="gemma"``) or Llama (``"llama"``) causal LM +
    tokenizer into ``path``.

    A larger ``max_position_embeddings`` allows streams long enough to outlast a test's
    timing window (the shutdown tests cut a stream that must still be running).
    ``tie_word_embeddings`` shares the input embedding with the output layer, as the bundled
    Gemma 3 270M does (off by default: see the note on greedy decoding below).
    ``head_dim`` 32 suits vLLM's CPU attention, which takes head sizes from 32 up."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, not {arch!r}")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, chatml=arch == "llama")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model: Any
    if arch == "llama":
        # SmolLM2's shape in small: grouped-query attention (2 KV heads for 4), no biases
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    else:
        config = Gemma3TextConfig(
            num_key_value_heads=1,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            **common,
        )
        model = Gemma3ForCausalLM(config)
    # Default init + tied embeddings make a random model repeat its last token forever.
    # Untied and with larger weights, greedy decoding wanders over the vocabulary, so
    # "same tokens in a batch as alone" is a test that can fail.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_lora_adapter(
    base_path: Path,
    out: Path,
    *,
    r: int = 4,
    seed: int = 1,
    target_modules: list[str] | str = "all-linear",
    **lora_kwargs,
) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved the way PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=target_modules,
        init_lora_weights=False,  # random A and B: the adapter visibly changes outputs
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.5)
            elif "trainable_tokens_delta" in name:  # PEFT starts these at the base's rows
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def build_peft_adapter(base_path: Path, out: Path, config, *, seed: int = 1, scale: float = 0.5):
    """An adapter of any PEFT method (``config``: a PEFT config object), its trainable
    parameters moved away from their initial values so that it visibly changes outputs,
    saved the way PEFT saves it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
