"""create_app(settings) -> FastAPI. Routers are mounted here and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.adapters import AdapterRegistry, UploadLimits
from server.config import Settings
from server.engine.base import Engine
from server.errors import (
    BodyLimitMiddleware,
    RequestIdMiddleware,
    install_error_handlers,
)
from server.metrics import ServerMetrics
from server.protocol import ModelCard
from server.routes import adapters as adapter_routes
from server.routes import openai as openai_routes
from server.routes import ops as ops_routes
from server.routes import train as train_routes
from server.serving import OpenAIServing
from server.training import TrainingService

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def build_engine(settings: Settings) -> Engine:
    """The engine named by the settings, on the one shared base-model loader."""
    if settings.engine == "vllm":
        raise ValueError("the vllm engine is not available in this build; use engine=hf")
    from server.engine.hf import HFEngine
    from trainer.base_model import load_base_model

    loaded = load_base_model(
        settings.base_model,
        quantization=settings.quantization,
        device=settings.device,
        cache_dir=settings.cache_dir,
    )
    return HFEngine(
        loaded,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_queue=settings.max_queue,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        request_timeout_s=settings.request_timeout_s,
    )


def create_app(
    settings: Settings | None = None, engine_factory: EngineFactory | None = None
) -> FastAPI:
    settings = settings or Settings()
    factory = engine_factory or build_engine

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /health answers at once and /ready says when to come.
        loader = asyncio.create_task(_load(app, settings, factory))
        try:
            yield
        finally:
            loader.cancel()
            training = getattr(app.state, "training", None)
            if training is not None:
                # In a thread: a job finishing now registers through this very loop.
                await asyncio.to_thread(training.close)
            engine = getattr(app.state, "engine", None)
            if engine is not None:
                await engine.shutdown()

    app = FastAPI(
        title="swapserve",
        version="0.1.0",
        description="One 4-bit base model, many LoRA adapters, an OpenAI-compatible API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.started_at = int(time.time())
    app.state.engine = None
    app.state.serving = None
    app.state.load_error = None
    app.state.chat_hooks = []
    app.state.adapters = None
    app.state.training = None
    app.state.training_error = None
    app.state.extra_models = list
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        overrides={
            "/adapters": settings.max_adapter_bytes + 1024 * 1024,
            "/train/": settings.max_train_data_bytes,
        },
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(openai_routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(ops_routes.router)
    app.include_router(train_routes.router)
    return app


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
        limits=UploadLimits(max_bytes=settings.max_adapter_bytes),
        metrics=app.state.metrics,
    )
    await asyncio.to_thread(registry.recover)

    def resolve(model: str) -> str | None:
        return None if model == served else registry.resolve(model)

    def adapter_cards() -> list[ModelCard]:
        return [
            ModelCard(id=r.name, created=r.created, root=r.path, parent=served)
            for r in registry.records.values()
        ]

    app.state.adapters = registry
    app.state.extra_models = adapter_cards
    try:
        app.state.training = await _start_training(registry, settings)
    except Exception as exc:
        # Serving must not die with the trainer: the /train routes answer 503 with this.
        logger.exception("starting the training job manager failed; /train is unavailable")
        app.state.training_error = f"{type(exc).__name__}: {exc}"
    app.state.serving = OpenAIServing(
        engine,
        resolve_model=resolve,
        lease=registry.use,
        metrics=app.state.metrics,
        max_model_len=engine.info.max_model_len,
        default_max_tokens=settings.default_max_tokens,
        max_n=settings.max_n,
        request_timeout_s=settings.request_timeout_s,
    )
    app.state.engine = engine
    logger.info(
        "ready: %s (%s, %s)", engine.info.model_id, engine.info.quantization, engine.info.device
    )


async def _start_training(registry: AdapterRegistry, settings: Settings) -> TrainingService:
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
    )
    # In a thread: recover() hands finished-but-unregistered jobs to on_success, which
    # waits on this loop.
    interrupted = await asyncio.to_thread(training.recover)
    if interrupted:
        logger.warning("training jobs interrupted by the last shutdown: %s", interrupted)
    return training
