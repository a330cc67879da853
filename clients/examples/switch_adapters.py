"""Pick a behaviour per request with the `model` field, using the official openai SDK.

    python clients/examples/switch_adapters.py --adapter path/to/peft-folder

Registers the adapter under the name `demo` (if given), then asks the same question of the
base model and of the adapter, streamed.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from clients.admin import SwapserveAdmin, SwapserveError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--adapter", help="a PEFT LoRA folder to register as `demo`")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()

    models = ["base"]
    if args.adapter:
        with SwapserveAdmin(args.url) as admin:
            try:
                admin.register_adapter("demo", args.adapter, replace=True)
            except SwapserveError as exc:  # e.g. rank too high, wrong base model
                raise SystemExit(f"adapter refused: {exc}") from exc
        models.append("demo")

    client = OpenAI(base_url=f"{args.url}/v1", api_key="unused")
    for model in models:
        print(f"--- {model}: ", end="", flush=True)
        stream = client.completions.create(
            model=model, prompt=args.prompt, max_tokens=24, temperature=0, stream=True
        )
        for chunk in stream:
            print(chunk.choices[0].text, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
