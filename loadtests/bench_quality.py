"""What 4 bits cost: the bundled model's weights as the server holds them, against float32.

    python loadtests/bench_quality.py [--tokens 32]

Variants of the bundled Gemma 3 270M (the float32 checkpoint is the reference; it was
itself converted from the Q4_K_M GGUF, so "float32" means that file's values), chosen with
``--variants``:
- nf4:  bitsandbytes NF4 (SWAPSERVE_FAST_PATH=off, and QLoRA training);
- int4: linear layers re-quantized to int4 (group 32) for PyTorch's int4 kernel, output
        layer and embedding in one int8 table (SWAPSERVE_LM_HEAD=int8);
- int4-screen: int4 as above, the output layer's logits screened by an int4 copy of the
        table (group 64) and each row's 64 leading ones from the int8 rows in float32
        (the CPU fast path with SWAPSERVE_INT4_KERNEL=torch);
- vnni: the same weights on the VNNI kernel (server/engine/vnni.py), each row's
        activations rounded to 8 bits per group of inputs: the CPU fast path where
        AVX-512 VNNI is there;
- int8-dynamic: the same with FBGEMM's int8 matmul as the screen (activations quantized
        per row; SWAPSERVE_LM_HEAD=int8-dynamic);
- int4-from-nf4: the int4 kernel format re-packed from NF4 instead of from the checkpoint
        (what a re-pack of loaded NF4 weights would give; shown for the choice made).
Printed per variant:
- greedy agreement: of the float32 model's greedy tokens on fixed prompts, the share the
  variant predicts too when fed the same prefix (teacher-forced), and the mean number of
  leading tokens its own greedy output shares with float32's;
- perplexity of a held text (written for this check, not from any training set).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "The capital of France is",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The theory of relativity explains",
    "Here is a list of fruits: apple, banana,",
]

HELD_TEXT = (
    "The harbour master kept two ledgers. In the first he wrote the ships that came in: "
    "their names, their cargo, the weather on the day they arrived. In the second he wrote "
    "the ships he had expected and that never came. Over thirty years the second ledger grew "
    "thicker than the first, and the people of the town began to visit him, not for news of "
    "arrivals, but to ask whether a name was written in the other book. He never refused "
    "them. He would open the ledger on the counter, run a finger down the columns, and read "
    "the entry aloud in the same level voice he used for the tide tables. Some left relieved, "
    "some did not leave for a long while. When he retired, the town council asked what should "
    "become of the ledgers. He kept the first and gave them the second, on one condition: that "
    "it be left open on the counter, so that anyone could add a name, and anyone could cross "
    "one out if a ship came home after all."
)


def _load(variant: str):
    from loadtests._server import BENCH_BASE
    from trainer.base_model import load_base_model

    if variant == "float32":
        return load_base_model(BENCH_BASE, quantization="none", device="cpu").model
    if variant == "nf4":
        return load_base_model(BENCH_BASE, quantization="nf4", device="cpu").model
    from server.engine.int4 import repack_linear_layers
    from server.engine.lm_head import use_int8_lm_head

    if variant in ("int4", "int4-screen", "int8-dynamic", "int4-bf16-embedding", "vnni"):
        model = load_base_model(BENCH_BASE, quantization="none", device="cpu").model
    else:  # int4 from nf4
        model = load_base_model(BENCH_BASE, quantization="nf4", device="cpu").model
    kernel = "vnni" if variant == "vnni" else "torch"
    repack_linear_layers(model, kernel=kernel)
    if variant == "int4-bf16-embedding":
        import torch

        embedding = model.get_input_embeddings()
        embedding.weight = torch.nn.Parameter(embedding.weight.detach().to(torch.bfloat16).float())
        use_int8_lm_head(model, share_embedding=False)
    elif variant in ("int4-screen", "int8-dynamic", "vnni"):
        screen = "int8-dynamic" if variant == "int8-dynamic" else "int4"
        use_int8_lm_head(model, share_embedding=True, screen=screen, kernel=kernel)
    else:
        use_int8_lm_head(model, share_embedding=True)
    return model


def _greedy(model, ids, tokens: int):
    import torch

    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1
        )
    return out[0, ids.shape[1] :]


def _teacher_forced_top1(model, ids, continuation):
    import torch

    full = torch.cat([ids[0], continuation]).unsqueeze(0)
    with torch.inference_mode():
        logits = model(full).logits[0]
    predicted = logits[ids.shape[1] - 1 : -1].argmax(-1)
    return (predicted == continuation).float().mean().item()


def _perplexity(model, ids) -> float:
    import torch

    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return float(torch.exp(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[
            "float32",
            "nf4",
            "int4",
            "int8-dynamic",
            "int4-screen",
            "vnni",
            "int4-from-nf4",
        ],
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from loadtests._server import BENCH_BASE
    from trainer.base_model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_base_model(BENCH_BASE)))
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    held = tokenizer(HELD_TEXT, return_tensors="pt")["input_ids"]
    reference: list[torch.Tensor] = []
    rows = []
    for variant in args.variants:
        model = _load(variant)
        outs = [_greedy(model, ids, args.tokens) for ids in prompts]
        if not reference:
            reference = outs
        forced = sum(
            _teacher_forced_top1(model, ids, ref)
            for ids, ref in zip(prompts, reference, strict=True)
        ) / len(prompts)
        prefix = []
        for out, ref in zip(outs, reference, strict=True):
            same = (out == ref).long()
            prefix.append(int(same.cumprod(0).sum()))
        ppl = _perplexity(model, held)
        rows.append((variant, forced, sum(prefix) / len(prefix), ppl))
        print(
            f"{variant:<14} next-token agreement {forced:6.1%}   "
            f"identical greedy prefix {sum(prefix) / len(prefix):5.1f} of {args.tokens}   "
            f"perplexity {ppl:7.2f}",
            flush=True,
        )
        del model
    print(
        f"\n{BENCH_BASE}, {len(PROMPTS)} prompts x {args.tokens} greedy tokens, "
        f"held text of {held.shape[1]} tokens; reference: float32"
    )


if __name__ == "__main__":
    main()
