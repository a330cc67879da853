"""/v1/completions: a prompt (text or token ids, one or several) and the answer in
OpenAI's text_completion shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from server.engine.base import GenerationOutput
from server.errors import APIError
from server.protocol import Completion, CompletionChoice, CompletionRequest, new_id, now
from server.serving.base import ChoiceState, Prepared, ServingBase, passages_hint
from server.serving.logprobs import check_count, completion_logprobs


class ServingCompletion(ServingBase):
    endpoint = "completions"
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    async def prepare(self, body: CompletionRequest) -> Prepared:
        """Request -> Prepared: A/B routing, retrieval, validation, the prompts' token ids."""
        body, routed = self._route_split(body)
        prompt = None
        citations = None
        if body.rag is not None:
            if not isinstance(body.prompt, str):
                raise APIError(
                    400,
                    "with `rag`, prompt must be a single string (it is the retrieval query)",
                    param="prompt",
                )
            retrieval = self._retrieval(body)
            prompt, citations = await retrieval.augment_prompt(body.rag, body.prompt)
        with passages_hint(body.rag, citations):
            prep = self.prepare_prompts(body, prompt)
        prep.citations = citations
        if routed is not None:
            routed.attach(prep)
        return prep

    def prepare_prompts(
        self, req: CompletionRequest, prompt_override: str | None = None
    ) -> Prepared:
        """Validation and the prompts' token ids (`prompt_override`: one prompt instead of
        the request's, e.g. with retrieved passages)."""
        adapter = self._check_common(req)
        prompts = completion_prompts(req.prompt)
        if prompt_override is not None:
            prompts = [prompt_override]
        token_lists: list[list[int]] = []
        vocab = self.engine.info.vocab_size
        for p in prompts:
            ids = self.engine.tokenize(p) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if not isinstance(p, str) and vocab is not None:
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    # caught here: in the model it would fail the whole batch's step
                    raise APIError(
                        400,
                        f"prompt holds token id {bad}, outside this model's vocabulary "
                        f"(0 to {vocab - 1})",
                        param="prompt",
                    )
            token_lists.append(ids)
        longest = max(len(t) for t in token_lists)
        sampling = self._sampling(req, longest, "prompt", adapter)
        if len(token_lists) * req.n > self.ctx.max_n:
            raise APIError(400, f"prompts x n must be at most {self.ctx.max_n}", param="prompt")
        sampling.structured_outputs = self._response_format(req.response_format)
        if req.logprobs is not None and req.logprobs is not False:
            if req.logprobs is True:
                raise APIError(
                    400,
                    "logprobs on completions is a number of alternatives (0-20), not true",
                    param="logprobs",
                )
            sampling.logprobs = check_count(req.logprobs, "logprobs")
        prep = Prepared(model=req.model, adapter=adapter, prompts=token_lists, sampling=sampling)
        if req.echo:
            # the prompt's own token logprobs come with the echo when logprobs are asked;
            # token-id prompts are echoed from their tokens' bytes (prompt_logprobs 0)
            texts = [p if isinstance(p, str) else None for p in prompts]
            if sampling.logprobs is not None or any(t is None for t in texts):
                sampling.prompt_logprobs = sampling.logprobs or 0
            prep.echo = [t or "" for t in texts]
        return prep

    def _echo_text(self, prep: Prepared, index: int, state: ChoiceState) -> str:
        assert prep.echo is not None
        text = prep.echo[index // prep.sampling.n]
        if not text and state.prompt_logprobs:
            raw = b"".join(e.chosen.token_bytes for e in state.prompt_logprobs)
            text = raw.decode("utf-8", errors="replace")
        return text

    def _choice_logprobs(self, prep: Prepared, index: int, state: ChoiceState, offset: int = 0):
        if prep.sampling.logprobs is None:
            return None
        entries = list(state.logprobs)
        echo = None
        if prep.echo is not None and state.prompt_logprobs is not None:
            entries = [*state.prompt_logprobs, *entries]
            echo = self._echo_text(prep, index, state)
        return completion_logprobs(entries, offset, echo_text=echo)

    async def create(self, prep: Prepared) -> Completion:
        states, usage = await self.collect(prep)
        if prep.on_complete is not None:
            prep.on_complete(states[0].text)
        choices = []
        for i, state in states.items():
            text = state.text
            if prep.echo is not None:
                text = self._echo_text(prep, i, state) + text
            choices.append(
                CompletionChoice(
                    index=i,
                    text=text,
                    finish_reason=state.finish or "length",  # type: ignore[arg-type]
                    logprobs=self._choice_logprobs(prep, i, state),
                )
            )
        return Completion(
            id=prep.response_id or new_id(self.id_prefix),
            created=now(),
            model=prep.model,
            choices=choices,
            usage=usage,
            citations=prep.citations,
            ab_arm=prep.ab_arm,
        )

    # --- streaming --------------------------------------------------------------------------

    def _chunk(
        self, prep: Prepared, rid: str, created: int, choice: CompletionChoice
    ) -> dict[str, Any]:
        body = Completion(id=rid, created=created, model=prep.model, choices=[choice])
        data = body.model_dump(exclude_none=False, exclude={"citations", "ab_arm"})
        return self._extensions(prep, data)

    def _opening_chunks(self, prep: Prepared, rid: str, created: int) -> Iterator[dict[str, Any]]:
        # Citations ride on an empty text chunk sent before any token (see chat.py)
        if prep.citations is not None:
            choice = CompletionChoice(index=0, text="", finish_reason=None)
            data = self._chunk(prep, rid, created, choice)
            data["citations"] = [c.model_dump() for c in prep.citations]
            yield data

    def _delta_chunks(
        self, prep: Prepared, rid: str, created: int, out: GenerationOutput, state: ChoiceState
    ) -> Iterator[dict[str, Any]]:
        text = out.text
        first = not state.parts  # this choice's first output
        view = ChoiceState(logprobs=list(out.logprobs or []), prompt_logprobs=out.prompt_logprobs)
        # text_offset counts from the start of the choice's text, echo included
        offset = sum(len(p) for p in state.parts) + (state.echo_len if not first else 0)
        if first and prep.echo is not None:
            echo = self._echo_text(prep, out.index, view)
            state.echo_len = len(echo)
            text = echo + text
        if not text and not out.logprobs and not (first and out.prompt_logprobs):
            return
        logprobs = None
        if prep.sampling.logprobs is not None:
            entries = list(out.logprobs or [])
            echo_text = None
            if first and prep.echo is not None and out.prompt_logprobs is not None:
                entries = [*out.prompt_logprobs, *entries]
                echo_text = text[: state.echo_len]
            logprobs = completion_logprobs(entries, offset, echo_text=echo_text)
        choice = CompletionChoice(index=out.index, text=text, finish_reason=None, logprobs=logprobs)
        yield self._chunk(prep, rid, created, choice)

    def _end_chunks(
        self, prep: Prepared, rid: str, created: int, index: int, finish: str, state: ChoiceState
    ) -> Iterator[dict[str, Any]]:
        choice = CompletionChoice(index=index, text="", finish_reason=finish)  # type: ignore[arg-type]
        yield self._chunk(prep, rid, created, choice)


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
