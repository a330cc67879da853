"""/v1/completions: a prompt (text or token ids, one or several) and the answer in
OpenAI's text_completion shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from server.errors import APIError
from server.protocol import Completion, CompletionChoice, CompletionRequest, new_id, now
from server.serving.base import Prepared, ServingBase, passages_hint


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
        return Prepared(model=req.model, adapter=adapter, prompts=token_lists, sampling=sampling)

    async def create(self, prep: Prepared) -> Completion:
        texts, finish, usage = await self.collect(prep)
        if prep.on_complete is not None:
            prep.on_complete(texts.get(0, ""))
        choices = [
            CompletionChoice(index=i, text=texts.get(i, ""), finish_reason=finish.get(i, "length"))  # type: ignore[arg-type]
            for i in range(prep.n_choices)
        ]
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

    def _text_chunk(
        self, prep: Prepared, rid: str, created: int, index: int, text: str, finish: str | None
    ) -> dict[str, Any]:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish)  # type: ignore[arg-type]
        return self._chunk(prep, rid, created, choice)

    def _end_chunk(
        self, prep: Prepared, rid: str, created: int, index: int, finish: str
    ) -> dict[str, Any]:
        return self._text_chunk(prep, rid, created, index, "", finish)


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)
