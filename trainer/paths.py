"""Where a job's outputs go (shared by the skeleton, the job manager and the CLI)."""

from __future__ import annotations

from pathlib import Path


def full_model_dir(output_dir: Path) -> Path:
    """Where a full fine-tune's model folder goes: ``<root>/models/<name>`` beside the
    adapters' ``<root>/trained/<name>`` (so a model folder never looks like an adapter)."""
    return Path(output_dir).parent.parent / "models" / Path(output_dir).name
