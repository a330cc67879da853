"""P-tuning (peft_type ``P_TUNING``): virtual tokens made by a prompt encoder.

During training PEFT's prompt encoder (an MLP or an LSTM over learned embeddings) makes
the virtual tokens; ``save_pretrained`` runs it once and saves its output as
``prompt_embeddings`` (num_virtual_tokens, hidden), and PeftModel.from_pretrained serves
that tensor as is (inference mode). At inference a p-tuning adapter is therefore
virtual tokens, served exactly as prompt tuning's (server/engine/kinds/prompt_tuning.py).
A file that holds the encoder's own weights instead is refused by name.
"""

from __future__ import annotations

from server.engine.kinds.prompt_tuning import PromptTuningKind


class PTuningKind(PromptTuningKind):
    name = "p_tuning"
    peft_type = "P_TUNING"


KIND = PTuningKind()
