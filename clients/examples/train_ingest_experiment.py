"""Train, register, ingest and compare with `clients` alone (inference: the `openai` SDK).

    python clients/examples/train_ingest_experiment.py --url http://127.0.0.1:8000 [--steps 2]

1. ingests the Marrowick notes into a collection and searches it;
2. trains a house-style SFT adapter from a local JSONL (uploaded), following its progress;
3. registers the trained folder a second time under another name, by path;
4. runs an experiment (base, base+rag, adapter+rag) on three questions and prints it.
The defaults are short (2 training steps, 3 questions): a demonstration, not a result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clients import ConflictError, NotFoundError, Swapserve

ROOT = Path(__file__).resolve().parents[2]
KB = ROOT / "server" / "ab" / "examples" / "marrowick"
TRAIN = ROOT / "trainer" / "examples" / "house_style_sft.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--questions", type=int, default=3)
    args = parser.parse_args()

    with Swapserve(args.url, args.api_key) as ss:
        print("server:", ss.wait_ready()["model"])

        # 1. knowledge
        try:
            ss.rag.delete("marrowick")
        except NotFoundError:
            pass
        ss.rag.create("marrowick")
        result = ss.rag.ingest("marrowick", sorted((KB / "kb").glob("*.md")))
        print(f"ingested {result.added} notes, {result.chunks} chunks")
        hit = ss.rag.search("marrowick", "When does the ferry leave?", top_k=1).data[0]
        print(f"search: {hit.doc_id} (score {hit.score:.2f})")

        # 2. training, followed live
        config = {"max_steps": args.steps, "batch_size": 2, "r": 8, "eval_fraction": 0.0}
        job = ss.training.sft("example-style", TRAIN, config=config, replace=True)
        for event in ss.training.follow(job.id):
            if event.type == "progress":
                e = event.model_extra or {}
                print(f"  step {e.get('step')}/{e.get('total_steps')} loss {e.get('loss')}")
        job = ss.training.wait(job.id)
        card = ss.training.card(job.id)
        print(
            f"trained {job.name}: final loss {job.result['final_loss']:.3f}, "
            f"{card['wall_time_s']:.0f} s; registered: {job.registered}"
        )

        # 3. register a folder by path (here: the one just trained)
        try:
            info = ss.adapters.register("example-copy", job.output_dir)
        except ConflictError:
            info = ss.adapters.register("example-copy", job.output_dir, replace=True)
        print(f"registered {info.name}: rank {info.rank}, on {info.location}")

        # 4. experiment
        lines = (KB / "questions.jsonl").read_text().splitlines()[: args.questions]
        questions = [json.loads(line) for line in lines]
        rag = {"collection": "marrowick", "top_k": 2}
        exp = ss.experiments.run(
            questions,
            [
                {"name": "base", "model": "base", "stop": ["\n"]},
                {"name": "base+rag", "model": "base", "rag": rag, "stop": ["\n"]},
                {"name": "adapter+rag", "model": "example-style", "rag": rag, "stop": ["\n"]},
            ],
            max_tokens=16,
        )
        for status in ss.experiments.follow(exp.id):
            print(f"  {status.progress['done']}/{status.progress['total']} questions")
        for name, arm in status.summary["arms"].items():
            f1 = arm["scores"]["token_f1"]
            print(f"{name:12s} token F1 {f1['mean']:.2f} [{f1['low']:.2f}, {f1['high']:.2f}]")
        Path("example-report.html").write_text(ss.experiments.report(exp.id))
        print("report: example-report.html")


if __name__ == "__main__":
    main()
