"""EmbSumScorer: the one Serve deployment. Each replica is the HTTP ingress (the FastAPI app of
serve/api.py) and the scorer (serve/scorer.py) in one process.

Why one deployment and not an ingress in front of a scorer: on the request path every Serve hop
is a Ray actor call with its own serialization, queueing and event-loop switches, and the serve
benchmark measured one such hop at several milliseconds on a small machine, many times the
scoring itself (1 user x 100 candidates is a fraction of a millisecond). Merged, a request goes
HTTP ingress -> this replica's route -> @serve.batch -> engine, with no actor call at all.
Nothing is lost by it: the ingress only validated and forwarded, so it scaled with the scorer
anyway; @serve.batch batches the concurrent route calls of a replica exactly as it batched the
handle calls; ``reconfigure(user_config)`` rolls the model out in place on this same class; the
deployment still autoscales on ``max_ongoing_requests`` / ``target_ongoing_requests``.

The routes call the scorer in process (the Scorer is the API's ScorerClient), so the API code
path is the one the unit tests and the bench's bare app run. The bearer token is read here, in
the replica (the secret never travels in the Serve config) under serve/auth.py's rules: a
missing token file, a placeholder token, or no token on a bind beyond loopback fails the replica
instead of serving open.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from embsum.config import config_from_dict
from embsum.runtime import setup_env

from .api import ApiSettings, build_api
from .auth import api_token
from .metrics import IngressMetrics
from .scorer import Scorer

DEPLOYMENT_NAME = "EmbSumScorer"


@serve.deployment(name=DEPLOYMENT_NAME, max_constructor_retry_count=3)
@serve.ingress()
class EmbSumScorer(Scorer):
    def __init__(self, config: dict[str, Any]) -> None:
        setup_env()
        super().__init__(config_from_dict(config))
        self.settings = ApiSettings.from_config(self.cfg.serve, token=api_token(self.cfg.serve))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.settings, observer=IngressMetrics())
