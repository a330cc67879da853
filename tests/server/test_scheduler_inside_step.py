"""A newcomer prefilled between two layers of a decode step (server/engine/scheduler.py,
``_prefill_inside_step``): its first token comes before the step under way ends, and every
stream's tokens stay those it gets alone, each row with its own LoRA adapter.

The order of events is made deterministic by a runner that submits the newcomer as a
chosen step starts (after the scheduler's look for newcomers between steps, so only the
step itself can take it early), and records when each step ends."""

from __future__ import annotations

import threading

import pytest

from server.engine import vnni
from server.engine.base import BASE_ADAPTER, GenerationRequest, SamplingParams
from server.engine.fast_runner import FastModelRunner
from server.engine.int4 import repack_linear_layers
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, new_sequences
from tests.support import load_causal_lm, read_adapter
from tests.tiny_model import build_lora_adapter, build_peft_adapter, build_tiny_model

LONG = [2, 40, 41, 42, 43, 44, 45]  # the stream that is decoding
SHORT = [2, 60, 61, 62]  # the newcomer: one chunk
LONGER = [2, 70, 71, 72, 73, 74, 75, 76, 77, 78]  # a newcomer of three chunks
CHUNK = 4
ARRIVES_AT_STEP = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two LoRA adapters, a prompt-tuning one (5 virtual tokens in front of the prompt)
    and a prefix-tuning one (6 cache columns in front of it)."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("inside-step")
    model_path = build_tiny_model(root / "model")
    adapters = {
        "a": build_lora_adapter(model_path, root / "a", r=4, seed=1),
        "b": build_lora_adapter(model_path, root / "b", r=4, seed=2),
        "prompt": build_peft_adapter(
            model_path,
            root / "prompt",
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
            seed=3,
        ),
        "prefix": build_peft_adapter(
            model_path,
            root / "prefix",
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
            seed=4,
        ),
    }
    return model_path, adapters


class Events:
    """What happened, in order, across the scheduler thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log: list[tuple[str, ...]] = []
        self.done = threading.Event()

    def add(self, *event: str) -> None:
        with self.lock:
            self.log.append(event)


def recording(base: type, events: Events):
    """``base`` (a runner class) whose decode logs its end, and whose step number
    ARRIVES_AT_STEP submits the pending newcomer as it starts, after the scheduler's look
    for newcomers: a runner that takes the between-layers callback may take the newcomer
    in there (the fast runner's whole layers on the kernel stop for it: ``submit``
    interrupts them), another only after the step."""

    class Recording(base):  # type: ignore[misc, valid-type]
        steps = 0
        scheduler: Scheduler | None = None
        pending: list = []
        callback_seen: list[bool] = []

        def _submit_pending(self) -> None:
            if self.pending and self.scheduler is not None:
                self.scheduler.submit(self.pending)
                events.add("submitted")
                self.pending = []

        def decode(self, batch, tokens, adapters, **kwargs):
            step = self.steps
            self.steps += 1
            callback = kwargs.get("between_layers")
            self.callback_seen.append(callback is not None)
            if step == ARRIVES_AT_STEP:
                self._submit_pending()
            logits = super().decode(batch, tokens, adapters, **kwargs)
            events.add("step end", str(step))
            return logits

    return Recording


def sequences(prompt, adapter, max_tokens, name, events, outputs):
    request = GenerationRequest(
        request_id=name,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        adapter=adapter,
    )

    def emit(out):
        if isinstance(out, BaseException):
            events.add("error", name, repr(out))
            events.done.set()
            return
        if out.token_ids:
            events.add("token", name)
            outputs.setdefault(name, []).extend(out.token_ids)
        if out.finish_reason is not None:
            events.add("finished", name)

    return new_sequences(request, emit, default_timeout_s=60)


def serve(runner_class, setup, requests, *, newcomer=None, chunk=CHUNK, also=(), int4=None):
    """Run the long request (and the newcomer with those in ``also``, submitted together
    inside step ARRIVES_AT_STEP) on a fresh scheduler; returns (tokens by name, events,
    runner). ``int4``: the linear layers re-packed to 4 bits on that kernel first ("vnni":
    a decode step's layers then run as whole calls on the CPU kernel)."""
    model_path, adapter_paths = setup
    events = Events()
    model = load_causal_lm(model_path)
    if int4 is not None:
        repack_linear_layers(model, kernel=int4)
    runner = recording(runner_class, events)(model, pad_token_id=0)
    for name, path in adapter_paths.items():
        runner.adapters.add(read_adapter(name, path))
    scheduler = Scheduler(
        runner,
        lambda ids: " ".join(map(str, ids)),
        [],
        max_model_len=128,
        max_num_seqs=4,
        prefill_chunk_tokens=chunk,
    )
    runner.scheduler = scheduler
    outputs: dict[str, list[int]] = {}
    arriving = ([newcomer] if newcomer else []) + list(also)
    names = [r[3] for r in requests + arriving]
    runner.pending = [seq for r in arriving for seq in sequences(*r, events, outputs)]
    scheduler.start()
    try:
        for prompt, adapter, max_tokens, name in requests:
            scheduler.submit(sequences(prompt, adapter, max_tokens, name, events, outputs))
        for _ in range(600):
            finished = {e[1] for e in events.log if e[0] == "finished"}
            if finished >= set(names) or events.done.wait(0.05):
                break
    finally:
        scheduler.stop()
    assert not [e for e in events.log if e[0] == "error"], events.log
    assert set(outputs) == set(names)
    return outputs, events.log, runner


def first_token_before_step_end(log, name, step):
    return log.index(("token", name)) < log.index(("step end", str(step)))


@pytest.mark.parametrize("int4", [None, "vnni"])
@pytest.mark.parametrize("adapters", [("a", "b"), (BASE_ADAPTER, "b"), ("a", BASE_ADAPTER)])
def test_newcomer_gets_its_first_token_inside_the_step_and_both_decode_as_alone(
    setup, adapters, int4
):
    """int4 "vnni": the step under way runs its layers as whole calls on the CPU kernel,
    the newcomer's prefill between two of them."""
    if int4 == "vnni" and vnni.unavailable() is not None:
        pytest.skip(f"VNNI kernel out: {vnni.unavailable()}")
    long_adapter, short_adapter = adapters
    long = (LONG, long_adapter, 10, "long")
    short = (SHORT, short_adapter, 6, "short")
    alone_long = serve(FastModelRunner, setup, [long], int4=int4)[0]["long"]
    alone_short = serve(FastModelRunner, setup, [short], int4=int4)[0]["short"]
    outputs, log, runner = serve(FastModelRunner, setup, [long], newcomer=short, int4=int4)
    if int4 == "vnni":
        kernels = runner.decoder._layer_kernels.values()
        assert any(kernel is not None for _, kernel in kernels)  # layers as whole calls
    assert runner.callback_seen and all(runner.callback_seen)
    assert log.index(("submitted",)) < log.index(("step end", str(ARRIVES_AT_STEP)))
    # the newcomer did not wait for the step under way: prefilled between its layers
    assert first_token_before_step_end(log, "short", ARRIVES_AT_STEP)
    # ... and the long stream's step, resumed after that prefill, kept its own adapter
    assert outputs["long"] == alone_long
    assert outputs["short"] == alone_short
    # the adapters do change the tokens: a plan lost after the nested prefill would show
    if long_adapter != BASE_ADAPTER:
        plain = serve(FastModelRunner, setup, [(LONG, BASE_ADAPTER, 10, "long")], int4=int4)
        assert plain[0]["long"] != alone_long


@pytest.mark.parametrize("adapters", [("prompt", "prefix"), ("prefix", "prompt")])
def test_virtual_tokens_and_kv_prefixes_inside_the_step(setup, adapters):
    """A prompt-tuning row's placeholders and a prefix-tuning row's cache columns go
    through the same prefill inside the step (9 input columns: one chunk of 16)."""
    long_adapter, short_adapter = adapters
    long = (LONG, long_adapter, 8, "long")
    short = (SHORT, short_adapter, 6, "short")
    alone_long = serve(FastModelRunner, setup, [long], chunk=16)[0]["long"]
    alone_short = serve(FastModelRunner, setup, [short], chunk=16)[0]["short"]
    outputs, log, _ = serve(FastModelRunner, setup, [long], newcomer=short, chunk=16)
    assert first_token_before_step_end(log, "short", ARRIVES_AT_STEP)
    assert outputs == {"long": alone_long, "short": alone_short}
    plain = serve(FastModelRunner, setup, [(SHORT, BASE_ADAPTER, 6, "short")])[0]["short"]
    assert plain != alone_short


def test_newcomer_done_at_its_first_token_leaves_at_the_join(setup):
    long = (LONG, "a", 10, "long")
    short = (SHORT, "b", 1, "short")
    alone_short = serve(FastModelRunner, setup, [short])[0]["short"]
    outputs, log, runner = serve(FastModelRunner, setup, [long], newcomer=short)
    assert first_token_before_step_end(log, "short", ARRIVES_AT_STEP)
    assert outputs["short"] == alone_short and len(alone_short) == 1
    assert outputs["long"] == serve(FastModelRunner, setup, [long])[0]["long"]
    assert runner.scheduler.stats.requests_finished == 2


def test_newcomers_join_a_batch_emptied_by_the_step(setup):
    """The long stream ends in the very step inside which two newcomers are prefilled: the
    newcomers' own cache becomes the batch, and one of them leaves it at once (max_tokens
    1), so the batch's rows move in place after the step, outside inference mode."""
    long = (LONG, "a", 5, "long")  # its 5th token comes from step 3
    first = (SHORT, "b", 1, "first")
    second = ([2, 63, 64], BASE_ADAPTER, 6, "second")
    alone = {
        name: serve(FastModelRunner, setup, [r])[0][name]
        for r, name in ((long, "long"), (first, "first"), (second, "second"))
    }
    outputs, log, runner = serve(FastModelRunner, setup, [long], newcomer=first, also=[second])
    # the long stream's last token is sampled from step 3's logits, before step 4 runs
    ended = log.index(("finished", "long"))
    assert log.index(("step end", str(ARRIVES_AT_STEP))) < ended
    assert ended < log.index(("step end", str(ARRIVES_AT_STEP + 1)))
    assert first_token_before_step_end(log, "second", ARRIVES_AT_STEP)
    assert outputs == alone
    assert runner.scheduler.stats.requests_finished == 3


def test_a_prompt_longer_than_one_chunk_waits_for_the_step(setup):
    long = (LONG, "a", 10, "long")
    longer = (LONGER, "b", 6, "longer")
    alone_longer = serve(FastModelRunner, setup, [longer])[0]["longer"]
    outputs, log, _ = serve(FastModelRunner, setup, [long], newcomer=longer)
    assert log.index(("submitted",)) < log.index(("step end", str(ARRIVES_AT_STEP)))
    assert not first_token_before_step_end(log, "longer", ARRIVES_AT_STEP)
    # chunks between steps, one per loop turn (only a last chunk may run inside a step)
    assert not first_token_before_step_end(log, "longer", ARRIVES_AT_STEP + 1)
    assert outputs["longer"] == alone_longer
    assert outputs["long"] == serve(FastModelRunner, setup, [long])[0]["long"]


def test_reference_runner_never_receives_the_callback(setup):
    long = (LONG, "a", 10, "long")
    short = (SHORT, "b", 6, "short")
    alone_short = serve(ModelRunner, setup, [short])[0]["short"]
    outputs, log, runner = serve(ModelRunner, setup, [long], newcomer=short)
    assert runner.callback_seen and not any(runner.callback_seen)
    assert not first_token_before_step_end(log, "short", ARRIVES_AT_STEP)
    assert outputs["short"] == alone_short
