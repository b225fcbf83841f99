"""EmbSumIngress: the FastAPI ingress deployment, calling the scorer through a DeploymentHandle.

The routes live in serve/api.py (a plain FastAPI app, tested without Ray); this class only
builds that app at replica start (``@serve.ingress()`` with ``__serve_build_asgi_app__``) with
the config's limits, the bearer token read in the replica (the secret never travels in the Serve
config), Prometheus metrics, and an adapter that forwards to the scorer's methods.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from embsum.client import read_token
from embsum.config import config_from_dict
from embsum.runtime import setup_env
from serve.api import ApiSettings, build_api
from serve.engine import RecommendQuery, RecommendResult, Rejection, ScoreQuery, ScoreResult
from serve.metrics import IngressMetrics
from serve.schemas import ModelResponse, Status, SummaryResponse

INGRESS_NAME = "EmbSumIngress"
READY_TIMEOUT_S = 2.0


class HandleScorer:
    """The API's ScorerClient over the scorer deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def score(self, query: ScoreQuery) -> ScoreResult | Rejection:
        return await self.handle.score.remote(query)

    async def recommend(self, query: RecommendQuery) -> RecommendResult | Rejection:
        return await self.handle.recommend.remote(query)

    async def summary(self, user_id: str) -> SummaryResponse | Rejection:
        return await self.handle.summary.remote(user_id)

    async def model_info(self) -> ModelResponse | Rejection:
        return await self.handle.model_info.remote()

    async def ready(self) -> Status:
        response = self.handle.ready.remote()

        async def wait() -> Status:
            return await response

        try:
            return await asyncio.wait_for(wait(), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            response.cancel()
            return Status(status=f"scorer did not answer within {READY_TIMEOUT_S}s")


@serve.deployment(name=INGRESS_NAME, max_constructor_retry_count=3)
@serve.ingress()
class EmbSumIngress:
    def __init__(self, scorer: DeploymentHandle, config: dict[str, Any]) -> None:
        setup_env()
        self.cfg = config_from_dict(config)
        self.scorer = scorer
        # Read here, in the replica: a missing token file fails the replica instead of serving open.
        self.settings = ApiSettings.from_config(self.cfg.serve, token=read_token(self.cfg.serve))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(HandleScorer(self.scorer), self.settings, observer=IngressMetrics())
