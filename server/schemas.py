"""The admin API's request and response bodies: adapters, training, retrieval, A/B, session.

One module, shared: the routes declare these models (so /openapi.json shows them), and
`clients/` imports the very same classes to build requests and parse answers. It imports
pydantic and nothing else of the project, so `import clients` never pulls in torch,
transformers or FastAPI. Inference bodies mirror OpenAI's and live in server/protocol.py;
the `openai` SDK is the client for those.

Bodies a client sends refuse unknown fields where a typo would change what happens
(`arm` for `arms` would silently run the default arms); answers allow extra fields, so an
older client keeps working against a newer server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Adapters, collections and trained adapters share one safe-name rule.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# A/B arm and split names may also hold '+' ("adapter+rag").
ARM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
MAX_TOP_K = 100  # rag.collection.MAX_TOP_K (tests check they agree)
MAX_DOC_ID_CHARS = 512  # rag.collection.MAX_DOC_ID_CHARS

SafeName = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def binary(description: str) -> Any:
    """A multipart file part, as OpenAPI writes it."""
    return Field(description=description, json_schema_extra={"format": "binary"})


# --- errors -------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- the `rag` extension of chat/completions requests, A/B arms and splits ---------------


class RAGOptions(BaseModel):
    """The `rag` extension of chat and completions requests: retrieve, then answer.

    `model` picks the behaviour (base or adapter), `rag` picks the knowledge; any
    combination works. Unknown keys are refused (400), so a typo such as `topk` is not
    silently ignored.
    """

    model_config = ConfigDict(extra="forbid")
    collection: str = Field(min_length=1, description="The collection to search.")
    top_k: int = Field(4, ge=1, le=100, description="Passages put into the prompt.")
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, description="Drop passages below this cosine similarity."
    )
    filter: dict[str, Any] | None = Field(
        None, description='Metadata pre-filter: {"field": value} or {"field": {"$in": [...]}}.'
    )
    mode: Literal["user", "system"] = Field(
        "user",
        description="Chat only: put the passages in the last user message (default) or in "
        "the system message.",
    )


# --- adapters -----------------------------------------------------------------------------


class RegisterAdapter(BaseModel):
    """JSON body of POST /adapters: a PEFT adapter folder the server can read."""

    name: SafeName = Field(description="The `model` id clients will use for this adapter.")
    path: str = Field(
        min_length=1,
        description="A PEFT adapter folder on the server (LoRA, IA3, prompt tuning, "
        "P-tuning, prefix tuning, LN tuning or trainable tokens).",
    )
    replace: bool = Field(False, description="Replace an adapter of the same name.")


class RegisterAdapterUpload(Strict):
    """Multipart body of POST /adapters: an archive of the adapter folder."""

    name: SafeName = Field(description="The `model` id clients will use for this adapter.")
    file: str = binary("The folder as .tar.gz, .tgz, .tar or .zip.")
    replace: bool = Field(False, description="Replace an adapter of the same name.")


class AdapterInfo(Open):
    id: str
    object: str = "adapter"
    name: str
    parent: str = Field(description="The base model's id.")
    path: str = Field(description="Where the server stores the adapter's files.")
    kind: str = Field(
        "lora",
        description="the adapter's method: lora, ia3, prompt_tuning, p_tuning, prefix_tuning, "
        "ln_tuning or trainable_tokens (PEFT's peft_type, lower-cased)",
    )
    peft_type: str = "LORA"
    parameters: int = Field(0, description="trained numbers the adapter applies")
    rank: int | None = Field(None, description="LoRA's largest rank; null for other kinds")
    virtual_tokens: int = Field(
        0,
        description="context positions every request gives up to the adapter's virtual "
        "tokens or KV prefix (prompt tuning, P-tuning, prefix tuning)",
    )
    target_modules: list[str]
    trained_tokens: list[int] = Field(
        default_factory=list, description="token ids whose embedding rows the adapter trained"
    )
    size_bytes: int
    base_check: dict[str, str | None] = Field(
        default_factory=dict,
        description="what its base_model_name_or_path says: status matches, "
        "same_architecture, unverified (a name this server cannot judge) or none",
    )
    location: str = Field(description="Where it lives now: device, host or disk.")
    load_count: int
    requests: int
    last_used: int | None = Field(
        None, description="Unix time of its last request (or load); null before any"
    )


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterInfo]


class AdapterDeleted(BaseModel):
    id: str
    object: str = "adapter"
    deleted: bool = True


class LoadLoRA(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: SafeName
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRA(BaseModel):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# --- training -----------------------------------------------------------------------------

Record = dict[str, Any] | str


class TrainJobRequest(Open):
    """JSON body of POST /train/{sft,dpo,orpo,kto} (and their dry runs). Give exactly one
    of `data_path` and `data`."""

    name: SafeName = Field(description="The adapter's name: the `model` id clients will use.")
    data_path: str | None = Field(
        None, min_length=1, description="A JSONL file on the server's file system."
    )
    data: list[Record] | None = Field(
        None,
        min_length=1,
        description="The JSONL records inline: objects, or strings holding one JSON line each.",
    )
    eval_path: str | None = Field(None, min_length=1, description="A JSONL eval set on the server.")
    eval_data: list[Record] | None = Field(
        None, min_length=1, description="The eval records inline."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Hyper-parameters: the trainer's config fields, `method` among them "
        "(lora, qlora, ia3, prompt_tuning, prefix_tuning, p_tuning, ln_tuning, full). "
        "base_model is the server's; quantization defaults to the server's where the method "
        "allows it.",
    )
    # aliased: `register` would shadow BaseModel.register
    register_: bool = Field(
        True, alias="register", description="Register the adapter with this server when done."
    )
    replace: bool = Field(False, description="Replace a registered adapter of the same name.")

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        # exactly one source of data; not both eval sources (the route refuses either)
        json_schema_extra={
            "oneOf": [{"required": ["data_path"]}, {"required": ["data"]}],
            "not": {"required": ["eval_path", "eval_data"]},
        },
    )


class TrainJobUpload(Strict):
    """Multipart body of POST /train/sft and /train/dpo: the JSONL as an upload."""

    name: SafeName = Field(description="The adapter's name.")
    file: str = binary("The training data (JSONL).")
    eval_file: str | None = binary("An eval set (JSONL).")
    config: str | None = Field(None, description="The hyper-parameters as a JSON object.")
    register_: bool = Field(True, alias="register")
    replace: bool = False


class LossPoint(BaseModel):
    step: int
    loss: float


class EvalLossPoint(BaseModel):
    step: int
    eval_loss: float


class TrainJob(Open):
    id: str
    object: str = "train.job"
    name: str
    kind: str
    state: str = Field(description="queued, running, succeeded, failed, cancelled or interrupted")
    step: int = 0
    total_steps: int | None = None
    progress: float = Field(0.0, description="0..1")
    loss: float | None = None
    loss_history: list[LossPoint] = Field(default_factory=list)
    eval_loss: float | None = Field(
        None, description="The last eval loss measured during training (eval_steps)"
    )
    eval_loss_history: list[EvalLossPoint] = Field(
        default_factory=list,
        description="The eval loss at each eval during training (every eval_steps steps, when "
        "the job has an eval set); the eval after training is in result.eval",
    )
    eta_s: float | None = None
    phase: str | None = Field(
        None,
        description="train, then eval after the last step (eval loss and generated answers, "
        "base and adapter); null before the first step",
    )
    eval_done: int | None = Field(None, description="eval answers generated so far")
    eval_total: int | None = Field(None, description="eval answers to generate")
    error: str | None = None
    output_dir: str
    data_sha256: str | None = None
    data_counts: dict[str, Any] | None = None
    config: dict[str, Any]
    result: dict[str, Any] | None = None
    register_: bool = Field(True, alias="register")
    replace: bool = False
    registered: bool = False
    registration_error: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TrainJobList(BaseModel):
    object: str = "list"
    data: list[TrainJob]


class TrainEvent(Open):
    seq: int
    time: float
    type: str = Field(
        description="state, progress, eval_loss (an eval during training: step, eval_loss), "
        "cancel_requested, registered, ..."
    )


class TrainEventList(BaseModel):
    object: str = "list"
    data: list[TrainEvent]
    next_since: int = Field(description="Pass as `since` to get only newer events.")
    state: str


class DryRun(Open):
    """What a job would train on, before it starts: the trainer's dry run."""

    object: str = "train.dry_run"
    kind: str
    counts: dict[str, Any] = Field(description="examples and their format")
    lengths: dict[str, Any] = Field(description="token lengths against max_length")
    first_line: int
    first_tokens: int
    first_loss_tokens: int
    rendered: str = Field(
        description="The first example as the model sees it, with the tokens that carry "
        "loss between the markers `loss_open` and `loss_close`."
    )
    loss_open: str
    loss_close: str
    legend: str
    method: str | None = Field(None, description="The PEFT method the job would train.")
    trainable_tokens: str = Field(description="The token rows that will be trained, if any.")
    config: dict[str, Any] = Field(description="The resolved config the job would run with.")


class TrainCompareRequest(Strict):
    """JSON body of POST /train/compare: every method in `methods` trained with the same
    objective, data and budget (`config`), one job each, named `<name>-<method>`. Give
    exactly one of `data_path` and `data`, and one of `eval_path` and `eval_data`."""

    name: SafeName = Field("cmp", description="Prefix of the adapters' names.")
    methods: list[str] | None = Field(
        None,
        min_length=1,
        description="Methods to compare (default: lora, qlora, ia3, prompt_tuning, "
        "prefix_tuning, p_tuning, ln_tuning, full).",
    )
    objective: str = Field("sft", description="sft, dpo, orpo or kto.")
    data_path: str | None = Field(None, min_length=1)
    data: list[Record] | None = Field(None, min_length=1)
    eval_path: str | None = Field(None, min_length=1)
    eval_data: list[Record] | None = Field(None, min_length=1)
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The shared budget: the trainer's common config fields (max_steps, "
        "batch_size, max_length, seed, ...); each method keeps its own learning rate and "
        "base precision unless set here.",
    )
    method_config: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Per-method fields, e.g. {"lora": {"r": 8}, "full": {"extract_rank": 16}}.',
    )
    # aliased: `register` would shadow BaseModel.register
    register_: bool = Field(True, alias="register", description="Register each result.")
    replace: bool = Field(False, description="Replace registered adapters of the same names.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TrainCompare(Open):
    """A method comparison: its jobs, then one row per method (two for full: the model and
    its extracted LoRA) and the base, with serving tok/s once every job has ended."""

    id: str
    object: str = "train.compare"
    name: str
    state: str = Field(description="running (jobs), measuring (serving tok/s), done")
    objective: str
    methods: list[str]
    names: dict[str, str]
    jobs: dict[str, str] = Field(description="method -> job id (GET /train/jobs/{id})")
    job_states: dict[str, str | None] = Field(default_factory=dict)
    rows: list[dict[str, Any]] = Field(default_factory=list)
    markdown: str = Field("", description="The table as Markdown.")
    serving: dict[str, Any] = Field(default_factory=dict)
    created_at: float | None = None
    finished_at: float | None = None


class TrainCompareList(BaseModel):
    object: str = "list"
    data: list[TrainCompare]


# --- retrieval ----------------------------------------------------------------------------


class CreateCollection(Strict):
    """Chunking: `overlap` must stay below half of `chunk_tokens` (defaults 200 and 32)."""

    name: SafeName = Field(description="1-64 letters, digits, '.', '_' or '-'.")
    chunk_tokens: int | None = Field(
        None, ge=8, le=1_000_000, description="Chunk length in embedder tokens."
    )
    overlap: int | None = Field(
        None,
        ge=0,
        le=500_000,
        description="Tokens shared by consecutive chunks (< chunk_tokens/2).",
    )


class Collection(BaseModel):
    id: str
    object: str = "rag.collection"
    embedder: str = Field(description="Embedding model (name@fingerprint) of the vectors.")
    dim: int
    created_at: float
    documents: int
    chunks: int
    index_kind: str
    chunk_tokens: int
    overlap: int


class CollectionList(BaseModel):
    object: str = "list"
    data: list[Collection]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class DocumentIn(Strict):
    id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_DOC_ID_CHARS,
        pattern=r"^[^\x00-\x1f]+$",
        description="Your key (no control characters); adding an existing id replaces that document. Default: a "
        "hash of the text, so re-sending the same text changes nothing.",
    )
    text: str = Field(min_length=1, pattern=r"\S", description="Not empty, not only blanks.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class IngestDocuments(Strict):
    documents: list[DocumentIn] = Field(min_length=1)


class IngestFiles(Strict):
    """Multipart body of POST /rag/collections/{name}/documents."""

    files: list[str] = Field(
        min_length=1,
        description=".txt/.md (one document each, id = file name), .json (a list of "
        "documents) or .jsonl (one per line)",
        json_schema_extra={"items": {"type": "string", "format": "binary"}},
    )
    metadata: str | None = Field(
        None, description="A JSON object merged into every document's metadata."
    )


class IngestResult(BaseModel):
    object: str = "rag.ingest"
    collection: str
    ids: list[str] = Field(description="The documents' ids, in the order given.")
    added: int
    replaced: int
    unchanged: int
    metadata_updated: int
    chunks: int = Field(description="Chunks embedded by this request.")
    documents: int = Field(description="Documents in the collection afterwards.")


class Document(BaseModel):
    id: str
    metadata: dict[str, Any]
    chunks: int
    chars: int
    updated_at: float


class DocumentList(BaseModel):
    object: str = "list"
    data: list[Document]


class SearchRequest(Strict):
    query: str = Field(min_length=1, pattern=r"\S", description="Not only blanks.")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    filter: dict[str, Any] | None = Field(
        None, description='{"field": value} or {"field": {"$in": [v1, v2]}}, ANDed.'
    )


class SearchHit(BaseModel):
    score: float
    doc_id: str
    chunk_index: int
    text: str
    char_start: int
    char_end: int
    metadata: dict[str, Any]


class SearchResult(BaseModel):
    object: str = "list"
    collection: str
    data: list[SearchHit]


# --- A/B ----------------------------------------------------------------------------------


class Question(Strict):
    id: str | None = Field(None, description="Defaults to q<position>.")
    question: str = Field(min_length=1, description="Sent as the user message.")
    references: list[str] = Field(
        min_length=1, description="Acceptable answers; each score is the best over them."
    )
    doc_id: str | None = Field(
        None,
        description="The document that holds the answer (the RAFT builder's oracle); an "
        "experiment keeps it with the question and reports whether retrieval found it.",
    )


class ArmSpec(Strict):
    name: str = Field(pattern=ARM_NAME_PATTERN, description="Shown in the report.")
    model: str = Field(min_length=1, description="The base id or an adapter name.")
    rag: RAGOptions | None = Field(
        None, description="Passed as the chat request's `rag` field, e.g. {collection}."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Unset: the experiment's max_tokens, else the longest reference in tokens "
        "+ 8 (at most 256 and the server's default).",
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=4, description="Stop sequences, as in a chat request (up to 4)."
    )


class ExperimentRequest(Strict):
    name: str | None = None
    questions: list[Question] = Field(min_length=1)
    arms: list[ArmSpec] = Field(
        default_factory=list,
        description="Unset = base, base+rag, adapter, adapter+rag from `adapter`/`collection`.",
    )
    adapter: str | None = Field(None, description="For the default arms.")
    collection: str | None = Field(None, description="For the default arms.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Default for arms that set none; unset: the longest reference in tokens + 8 "
        "(at most 256 and the server's default).",
    )
    concurrency: int = Field(
        4, ge=1, le=64, description="Questions in flight; every arm of a question runs at once."
    )
    seed: int = Field(0, description="Seeds sampling and the bootstrap.")


class ExperimentStatus(Open):
    id: str
    object: Literal["ab.experiment"] = "ab.experiment"
    name: str | None
    status: Literal["running", "completed", "failed", "cancelled", "interrupted"]
    created: int
    finished: int | None = None
    progress: dict[str, Any]
    arms: list[ArmSpec]
    error: str | None = None
    summary: dict[str, Any] | None = None
    questions: list[dict[str, Any]] | None = None


class ExperimentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExperimentStatus]


class SplitArm(Strict):
    name: str = Field(pattern=ARM_NAME_PATTERN)
    model: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0.0, description="Relative share of the traffic.")
    rag: RAGOptions | None = None


class SplitRequest(Strict):
    name: str = Field(pattern=ARM_NAME_PATTERN, description="Clients send model `ab:<name>`.")
    arms: list[SplitArm] = Field(min_length=1)
    replace: bool = False


class Split(Open):
    object: Literal["ab.split"] = "ab.split"
    name: str
    model: str
    arms: list[SplitArm]
    created: int
    counts: dict[str, int] = Field(default_factory=dict, description="Responses per arm.")
    feedback: dict[str, int] = Field(
        default_factory=dict, description="Feedback entries per arm (of the rated response)."
    )


class SplitList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Split]


class FeedbackRequest(Strict):
    response_id: str = Field(min_length=1)
    rating: Literal[-1, 1] | None = None
    preferred_over: str | None = Field(
        None, description="Another response id, to the same prompt, that this one beat."
    )


class FeedbackAck(BaseModel):
    object: Literal["ab.feedback"] = "ab.feedback"
    response_id: str
    split: str
    arm: str


# --- session and server -------------------------------------------------------------------


class Session(BaseModel):
    """Who the caller's key is: what the console shows and hides."""

    object: Literal["session"] = "session"
    auth_enabled: bool = Field(description="False: the server runs without keys (loopback).")
    key_name: str | None = Field(None, description="The key's name; null without keys.")
    scopes: list[str] = Field(description="inference, admin (admin implies inference).")
    admin: bool
    models: list[str] | None = Field(None, description="Adapter allow-list; null = all.")
    collections: list[str] | None = Field(None, description="Collection allow-list; null = all.")


class MetricsSample(BaseModel):
    time: float = Field(description="Unix time of the sample.")
    completion_tokens_per_s: float = Field(description="Since the previous sample.")
    prompt_tokens_per_s: float
    requests_per_s: float
    queue_depth: float
    running: float
    batch_size: float


class MetricsHistory(BaseModel):
    object: Literal["metrics.history"] = "metrics.history"
    interval_s: float
    data: list[MetricsSample] = Field(description="Oldest first.")
