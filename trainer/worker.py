"""One training job in its own process: ``python -m trainer.worker <job_dir>``.

Reads the job record, trains, and keeps the record and event log up to date. It stops at
the next step when the ``cancel`` flag appears (-> cancelled), when its parent (the server)
dies, or on SIGTERM/SIGINT (-> interrupted). It always leaves a terminal state behind,
unless killed outright, which the parent or ``JobManager.recover`` then records.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from trainer.common import ProgressUpdate, TrainingCancelled
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.records import (
    CANCEL_FLAG,
    append_event,
    read_record,
    write_record,
)

logger = logging.getLogger("trainer.worker")

MAX_HISTORY_IN_RECORD = 2000


def run_job(job_dir: Path) -> int:
    from trainer.objectives import build_config
    from trainer.train import train

    record = read_record(job_dir)
    parent = os.getppid()
    stop_reason: dict[str, str] = {}

    def on_signal(signum: int, frame: Any) -> None:
        stop_reason.setdefault("reason", f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def should_stop() -> bool:
        if (job_dir / CANCEL_FLAG).exists():
            stop_reason.setdefault("reason", "cancel")
        elif os.getppid() != parent:
            # Re-parented: the server died. Nobody would register the result, so stop.
            stop_reason.setdefault("reason", "parent process died")
        return bool(stop_reason)

    def progress(update: ProgressUpdate) -> None:
        if update.eval_loss is not None:
            eval_loss(update)
            return
        history = record.setdefault("loss_history", [])
        if update.loss is not None and update.phase == "train":
            history.append({"step": update.step, "loss": update.loss})
            del history[:-MAX_HISTORY_IN_RECORD]
        record.update(
            step=update.step,
            total_steps=update.total_steps,
            loss=update.loss,
            eta_s=update.eta_s,
            progress=update.progress,
            epoch=update.epoch,
            phase=update.phase,
            eval_done=update.eval_done,
            eval_total=update.eval_total,
        )
        write_record(job_dir, record)
        append_event(
            job_dir,
            "progress",
            step=update.step,
            total_steps=update.total_steps,
            loss=update.loss,
            eta_s=update.eta_s,
            progress=update.progress,
            phase=update.phase,
            eval_done=update.eval_done,
            eval_total=update.eval_total,
        )

    def eval_loss(update: ProgressUpdate) -> None:
        # an eval during training (eval_steps): its own history and its own event
        history = record.setdefault("eval_loss_history", [])
        history.append({"step": update.step, "eval_loss": update.eval_loss})
        del history[:-MAX_HISTORY_IN_RECORD]
        record["eval_loss"] = update.eval_loss
        write_record(job_dir, record)
        append_event(
            job_dir,
            "eval_loss",
            step=update.step,
            total_steps=update.total_steps,
            eval_loss=update.eval_loss,
            loss=update.loss,
        )

    record.update(
        state="running", pid=os.getpid(), started_at=record.get("started_at") or time.time()
    )
    write_record(job_dir, record)
    append_event(job_dir, "state", state="running", pid=os.getpid())

    try:
        config = build_config(record["kind"], record["config"])
        result = train(
            config,
            record["data_path"],
            record["output_dir"],
            progress=progress,
            should_stop=should_stop,
            name=record["name"],
        )
        record.update(
            state="succeeded",
            progress=1.0,
            eta_s=0.0,
            result={
                "final_loss": result.final_loss,
                "steps": result.steps,
                "wall_time_s": result.wall_time_s,
                "eval": _summary(result.eval),
                "mixed_batch_servable": result.card.get("mixed_batch_servable"),
                "method": config.method,
                "parameters": result.card["method"]["parameters"],
                "adapter_bytes": result.card.get("adapter_bytes"),
                "train_time_s": result.card["train"]["train_time_s"],
                "memory": result.card.get("memory"),
                "extraction": _extraction_summary(result.card.get("extraction")),
                # the settings trainer.defaults chose from the data, and why
                "defaults": result.card.get("defaults"),
            },
        )
    except TrainingCancelled as exc:
        reason = stop_reason.get("reason", "cancel")
        state = "cancelled" if reason == "cancel" else "interrupted"
        record.update(state=state, error=None if state == "cancelled" else f"stopped: {reason}")
        logger.info("job %s %s: %s", record["id"], state, exc)
    except DataError as exc:
        record.update(
            state="failed",
            error=str(exc),
            error_type="data",
            problems=exc.to_dict()["problems"],
        )
    except ConfigError as exc:
        record.update(state="failed", error=str(exc), error_type="config", field=exc.field)
    except Exception as exc:  # the job failed, the worker must still leave a record
        logger.error("job %s failed:\n%s", record["id"], traceback.format_exc())
        if _disk_full(exc):
            # the operator's to fix, said as the server says it for a request (its 507)
            record.update(
                state="failed",
                error="the data directory is full (no space left on device) while the job "
                f"wrote its output; nothing was registered: free space and retry ({exc})",
                error_type="insufficient_storage",
            )
        else:
            record.update(
                state="failed", error=f"{type(exc).__name__}: {exc}", error_type="internal"
            )
    record["finished_at"] = time.time()
    write_record(job_dir, record)
    append_event(job_dir, "state", state=record["state"], error=record.get("error"))
    return 0


def _extraction_summary(extraction: dict[str, Any] | None) -> dict[str, Any] | None:
    if not extraction:
        return None
    return {k: v for k, v in extraction.items() if k != "per_layer"}


def _summary(eval_results: dict[str, Any] | None) -> dict[str, Any] | None:
    if not eval_results:
        return None
    out = {k: v for k, v in eval_results.items() if k != "samples"}
    if isinstance(out.get("extracted"), dict):
        out["extracted"] = {k: v for k, v in out["extracted"].items() if k != "samples"}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainer.worker JOB_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_job(Path(argv[0]))


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library wrapped it in its own error (safetensors says
    "No space left on device (os error 28)")."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left on device" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


if __name__ == "__main__":
    sys.exit(main())
