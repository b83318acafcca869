"""One replica of ``agpctl serve``: a trained run's :class:`Detector` behind HTTP routes.

Routes: ``POST /predict`` (see :mod:`agpctl.inference.serve_http`), ``GET /health``,
``GET /info``. Concurrent requests meet in ``serve.batch``: images that arrive within the
batch wait are scored in one model call. Parsing, decoding and PNG encoding run on worker
threads and the model on one thread of its own, so the event loop keeps reading requests (and
answering ``/health``) while a request is parsed or the model works. Scores come from
:meth:`Detector.predict`, the path of ``agpctl predict`` and the Python API, so all three give
the same numbers.

The class is Ray-free at import; :func:`agpctl.inference.serving.application` makes it a
Serve deployment.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from agp_data import storage
from agpctl import runs
from agpctl.cluster.connect import use_assigned_cpus
from agpctl.errors import first_line
from agpctl.inference.detector import Detection, Detector
from agpctl.inference.serve_http import (
    Outcome,
    RequestError,
    decode_parts,
    image_parts,
    predict_answer,
    predict_options,
    read_body,
)
from agpctl.inference.serve_options import ServeConfig
from agpctl.strict_json import to_json

logger = logging.getLogger("ray.serve")
ROUTES = {"/predict": "POST", "/health": "GET", "/info": "GET"}


class DetectorService:
    """The body of the Serve deployment; ``config`` as ``agpctl serve`` resolved it."""

    def __init__(self, config: ServeConfig):
        from ray import serve  # deferred: only replicas need it (see agpctl.cluster)

        use_assigned_cpus()
        self.config = config
        storage.configure_s3(config.s3_endpoint)
        self.device = torch.device("cuda" if config.gpus_per_replica and torch.cuda.is_available() else "cpu")
        self.loaded = runs.load_run(runs.select_model_run(config.run, config.category), self.device,
                                    warn=logger.warning)
        self.detector = Detector.from_run(self.loaded, category=config.category, threshold=config.threshold,
                                          pixel_threshold=config.pixel_threshold, batch_size=config.max_batch_size,
                                          device=self.device, warn=logger.warning)
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="agp-model")
        self.scored = {"images": 0, "batches": 0}  # this replica's, written by the model thread only
        self._detect = serve.batch(max_batch_size=config.max_batch_size,
                                   batch_wait_timeout_s=config.batch_wait_ms / 1000.0)(self._detect_batch)

    # -- HTTP -----------------------------------------------------------------------------
    async def __call__(self, request) -> Any:
        from starlette.responses import Response  # Serve's own web stack

        path = request.url.path.rstrip("/") or "/"
        try:
            status, body = await self._route(request, path)
        except RequestError as exc:
            status, body = exc.status, {"error": exc.message}
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the service down
            logger.error("agp serve: %s %s failed:\n%s", request.method, path, traceback.format_exc())
            status, body = 500, {"error": f"internal error: {first_line(exc)}"}
        headers = {"Allow": ROUTES[path]} if status == 405 else None
        return Response(to_json(body), status_code=status, media_type="application/json", headers=headers)

    async def _route(self, request, path: str) -> tuple[int, dict[str, Any]]:
        if path not in ROUTES:
            raise RequestError(404, f"no route {path}; use POST /predict, GET /health or GET /info")
        if request.method != ROUTES[path] and not (request.method == "HEAD" and ROUTES[path] == "GET"):
            raise RequestError(405, f"{path} takes {ROUTES[path]}, not {request.method}")
        if path == "/health":
            return 200, {"status": "ok"}
        if path == "/info":
            return 200, self.info()
        return await self._predict(request)

    async def _predict(self, request) -> tuple[int, dict[str, Any]]:
        options = predict_options(request.query_params.multi_items())
        if options.category is not None:
            self._check_category(options.category)
        limits = self.config.limits
        body = await read_body(request.stream(), request.headers.get("content-length"), limits)
        parts = await asyncio.to_thread(image_parts, request.headers.get("content-type"), body, limits)
        del body  # multipart parts are copies: a 200 MB body should not stay in memory twice
        decoded = await asyncio.to_thread(decode_parts, parts, limits)
        del parts
        detections = await asyncio.gather(*(self._detect((item.rgb, options.category)) for item in decoded
                                            if item.rgb is not None))
        found = iter(detections)
        outcomes = [Outcome(item.name, error=item.error) if item.rgb is None else Outcome(item.name, next(found))
                    for item in decoded]
        return await asyncio.to_thread(predict_answer, outcomes, options)

    def _check_category(self, category: str) -> None:
        names = self.detector.categories
        if names and category not in names:  # the rule of check_category, without the server's paths
            raise RequestError(400, f"?category={category}: the model has no such category; "
                                    f"choose one of {', '.join(names)}")

    # -- the model ------------------------------------------------------------------------
    async def _detect_batch(self, items: list[tuple[np.ndarray, str | None]]) -> list[Detection]:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self._detect_now, items)

    def _detect_now(self, items: list[tuple[np.ndarray, str | None]]) -> list[Detection]:
        """Decisions on a batch, in order; images asking for the same category are scored together."""
        by_category: dict[str | None, list[int]] = {}
        for index, (_, category) in enumerate(items):
            by_category.setdefault(category, []).append(index)
        self.scored["batches"] += 1
        self.scored["images"] += len(items)
        out: list[Detection | None] = [None] * len(items)
        for category, indices in by_category.items():
            found = self.detector.predict([items[i][0] for i in indices], category=category)
            for index, detection in zip(indices, found):
                out[index] = detection
        return out  # type: ignore[return-value] - every index was filled above

    # -- for the driver and GET /info -----------------------------------------------------
    def info(self) -> dict[str, Any]:
        """The model and how it decides: what ``GET /info`` answers and ``agpctl serve`` prints."""
        thresholds = self.detector.thresholds
        low, high = self.config.replica_bounds()
        return {
            "model": {**self.loaded.info(), "categories": list(self.detector.categories), "device": str(self.device)},
            "thresholds": asdict(thresholds.default),
            "category_thresholds": {name: asdict(t) for name, t in thresholds.per_category.items()},
            "batching": {"max_batch_size": self.config.max_batch_size, "batch_wait_ms": self.config.batch_wait_ms},
            "replicas": {"min": low, "max": high, "cpus_each": self.config.cpus_per_replica,
                         "gpus_each": self.config.gpus_per_replica},
            "limits": asdict(self.config.limits),
            "options": {"query": ["heatmap=1", "mask=1", "category=NAME"]},
            "replica": {"scored": dict(self.scored)},  # of the replica that answered
        }

