"""create_app(settings) -> FastAPI. Routers are mounted here and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server.ab.experiments import ExperimentService, make_arm_check
from server.ab.splits import SplitService
from server.adapters import AdapterRegistry, UploadLimits
from server.auth import ADMIN, INFERENCE, PUBLIC, Auth, StreamLimitMiddleware, current_key
from server.auth import require_scope as scope
from server.config import Settings
from server.drain import Drain, DrainMiddleware
from server.engine.base import Engine
from server.engine.factory import build_engine
from server.errors import (
    APIError,
    BodyLimitMiddleware,
    RequestIdMiddleware,
    install_error_handlers,
)
from server.metrics import MetricsHistory, ServerMetrics, requests_total
from server.protocol import ModelCard
from server.retrieval import RetrievalService
from server.routes import ab as ab_routes
from server.routes import adapters as adapter_routes
from server.routes import console as console_routes
from server.routes import openai as openai_routes
from server.routes import ops as ops_routes
from server.routes import rag as rag_routes
from server.routes import train as train_routes
from server.serving import OpenAIServing, ServingContext
from server.training import TrainingService

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def create_app(
    settings: Settings | None = None, engine_factory: EngineFactory | None = None
) -> FastAPI:
    settings = settings or Settings()
    factory = engine_factory or build_engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /health answers at once and /ready says when to come.
        loader = asyncio.create_task(_load(app, settings, factory))
        sampler = asyncio.create_task(_sample_metrics(app))
        try:
            yield
        finally:
            loader.cancel()
            sampler.cancel()
            await app.state.ab_experiments.shutdown()
            training = getattr(app.state, "training", None)
            if training is not None:
                # In a thread: a job finishing now registers through this very loop.
                await asyncio.to_thread(training.close)
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                await engine.shutdown()
            await asyncio.to_thread(app.state.rag.close)

    app = FastAPI(
        title="swapserve",
        version="0.1.0",
        description="One 4-bit base model, many LoRA adapters, an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.metrics_history = MetricsHistory()
    app.state.started_at = int(time.time())
    app.state.engine = None
    app.state.serving = None
    app.state.load_error = None
    # Collections are usable while the base model loads: they need no engine, and the
    # embedding model is loaded on the first request that needs it.
    app.state.rag = RetrievalService(
        settings.rag_dir,
        embedder_path=settings.embedder,
        max_doc_bytes=settings.rag_max_doc_bytes,
        approx_threshold=settings.rag_approx_threshold,
        max_docs_per_request=settings.rag_max_docs_per_request,
    )
    # metadata reads and index checksums only (no embedder): broken collections are set
    # aside with a log line, the others serve
    app.state.rag.recover()
    app.state.adapters = None
    app.state.training = None
    app.state.training_error = None
    app.state.extra_models = list
    app.state.auth = Auth.from_settings(settings)
    app.state.drain = drain = Drain(settings.shutdown_grace_s)
    drain.on_start(lambda: _stop_background_work(app))
    if not app.state.auth.enabled:
        logger.warning(
            "no API keys configured: the server on %s is open to anyone who can reach it "
            "(create a key with `swapserve keys create`)",
            settings.host,
        )
    _install_ab(app, settings)
    install_error_handlers(app)
    app.add_middleware(StreamLimitMiddleware, limits=app.state.auth.limits)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        overrides={
            "/adapters": settings.max_adapter_bytes + 1024 * 1024,
            "/rag/": settings.rag_max_upload_bytes,
            "/train/": settings.max_train_data_bytes,
        },
    )
    # inside RequestIdMiddleware, so a 503 during the drain carries a request id too
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(RequestIdMiddleware)
    # Every router declares its scope here, and only here (tests/server/routes/
    # test_auth_routes.py fails for a route without one).
    app.include_router(openai_routes.router, dependencies=[Depends(scope(INFERENCE))])
    app.include_router(adapter_routes.router, dependencies=[Depends(scope(ADMIN))])
    app.include_router(ops_routes.router, dependencies=[Depends(scope(PUBLIC))])
    app.include_router(rag_routes.router, dependencies=[Depends(scope(ADMIN))])
    app.include_router(rag_routes.search_router, dependencies=[Depends(scope(INFERENCE))])
    app.include_router(train_routes.router, dependencies=[Depends(scope(ADMIN))])
    app.include_router(ab_routes.router, dependencies=[Depends(scope(ADMIN))])
    app.include_router(ab_routes.feedback_router, dependencies=[Depends(scope(INFERENCE))])
    # admin: the metrics' labels name every adapter, which allow-listed keys must not see
    app.include_router(ops_routes.metrics_router, dependencies=[Depends(scope(ADMIN))])
    # the console's files are open like /docs (they hold no data; the page calls the API
    # with the user's key); who-am-I and the load history need a key like inference does
    app.include_router(console_routes.router, dependencies=[Depends(scope(PUBLIC))])
    app.include_router(console_routes.session_router, dependencies=[Depends(scope(INFERENCE))])
    return app


async def _sample_metrics(app: FastAPI) -> None:
    """Every few seconds, the engine's counters into the history the console draws."""
    history: MetricsHistory = app.state.metrics_history
    while True:
        await asyncio.sleep(history.interval_s)
        engine = getattr(app.state, "engine", None)
        if engine is None:
            continue
        try:
            history.sample(engine.stats(), requests_total(app.state.metrics), time.time())
        except Exception:  # a metrics hiccup must never take the server down
            logger.exception("sampling the engine's counters failed")


def _install_ab(app: FastAPI, settings: Settings) -> None:
    """A/B services; they need no engine until an experiment or split request comes."""
    state = app.state
    check = make_arm_check(state)

    def serving() -> OpenAIServing:
        if state.serving is None:
            raise RuntimeError("the base model is not loaded")
        return state.serving

    root = settings.data_dir / "ab"
    state.ab_experiments = ExperimentService(
        root / "experiments",
        serving=serving,
        check_arm=check,
        base_model=settings.served_model_name,
    )
    state.ab_splits = SplitService(root, check_arm=check)
    state.ab_experiments.recover()
    state.ab_splits.recover()


async def _load(app: FastAPI, settings: Settings, factory: EngineFactory) -> None:
    try:
        engine = await asyncio.to_thread(factory, settings)
        await engine.start()
    except Exception as exc:
        logger.exception("loading the base model failed")
        app.state.load_error = str(exc)
        return
    served = settings.served_model_name
    registry = AdapterRegistry(
        engine,
        settings.data_dir / "adapters",
        base_id=served,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        max_cpu_loras=settings.max_cpu_loras,
        limits=UploadLimits(max_bytes=settings.max_adapter_bytes),
        metrics=app.state.metrics,
    )
    await asyncio.to_thread(registry.recover)

    embedding_model = app.state.rag.embedder.model_id

    def resolve(model: str) -> str | None:
        if model == served:
            return None
        if model == embedding_model and model not in registry.records:
            raise APIError(
                400,
                f"model {model!r} is an embedding model: it answers /v1/embeddings and "
                "cannot generate text",
                param="model",
                code="model_cannot_generate",
            )
        key = current_key()
        if key is not None and not key.allows_model(model):
            # the same 404 as an unknown model: a key cannot learn what others serve
            raise registry.unknown_model(model)
        return registry.resolve(model)

    def adapter_cards() -> list[ModelCard]:
        key = current_key()
        return [
            ModelCard(id=r.name, created=r.created, root=r.path, parent=served)
            for r in registry.records.values()
            if key is None or key.allows_model(r.name)
        ]

    app.state.adapters = registry
    app.state.extra_models = adapter_cards
    try:
        app.state.training = await _start_training(
            registry, settings, serves_token_rows=engine.info.adapter_token_rows
        )
    except Exception as exc:
        # Serving must not die with the trainer: the /train routes answer 503 with this.
        logger.exception("starting the training job manager failed; /train is unavailable")
        app.state.training_error = f"{type(exc).__name__}: {exc}"
    app.state.serving = OpenAIServing(
        ServingContext(
            engine,
            resolve_model=resolve,
            lease=registry.use,
            context_tokens=registry.context_tokens,
            metrics=app.state.metrics,
            max_model_len=engine.info.max_model_len,
            default_max_tokens=settings.default_max_tokens,
            max_n=settings.max_n,
            request_timeout_s=settings.request_timeout_s,
            abort=app.state.drain.aborting,
            retrieval=app.state.rag,
            splits=app.state.ab_splits,
        )
    )
    app.state.engine = engine
    if app.state.training is not None:
        _install_compare_probe(app)
    logger.info(
        "ready: %s (%s, %s)", engine.info.model_id, engine.info.quantization, engine.info.device
    )


def _install_compare_probe(app: FastAPI) -> None:
    """Method comparisons measure serving through the same path as the chat route."""
    from server.train_compare import make_throughput_probe

    state = app.state
    state.training.compare.measure = make_throughput_probe(lambda: state.serving)


async def _stop_background_work(app: FastAPI) -> None:
    """At the start of a drain: training workers get SIGTERM now, so they have the grace
    period to stop at their next step (they end 'interrupted'); the ones still running at
    its end are killed and recorded 'interrupted' too. Queued jobs stay queued for the next
    start. Running A/B experiments stop now (the next start shows them interrupted): the
    grace belongs to the clients' requests."""
    await app.state.ab_experiments.shutdown()
    training = getattr(app.state, "training", None)
    if training is not None:
        grace = app.state.settings.shutdown_grace_s
        await asyncio.to_thread(training.close, timeout_s=grace)


async def _start_training(
    registry: AdapterRegistry, settings: Settings, *, serves_token_rows: bool = True
) -> TrainingService:
    """Jobs under data_dir/train, adapters to data_dir/trained, on this server's base."""
    from trainer.base_model import resolve_base_model

    # The engine has loaded (and, for the bundled model, converted) it: this only looks it up.
    base_path = await asyncio.to_thread(resolve_base_model, settings.base_model, settings.cache_dir)
    training = TrainingService(
        settings.data_dir / "train",
        settings.data_dir / "trained",
        registry=registry,
        loop=asyncio.get_running_loop(),
        base_spec=settings.base_model,
        base_path=base_path,
        quantization=settings.quantization,
        device=settings.device,
        served_model_name=settings.served_model_name,
        max_running=settings.max_training_jobs,
        serves_token_rows=serves_token_rows,
    )
    # In a thread: recover() hands finished-but-unregistered jobs to on_success, which
    # waits on this loop.
    interrupted = await asyncio.to_thread(training.recover)
    if interrupted:
        logger.warning("training jobs interrupted by the last shutdown: %s", interrupted)
    return training
