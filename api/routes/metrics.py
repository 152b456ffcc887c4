"""/metrics: cluster-wide figures in Prometheus' text format, computed from SQL.

Open like /healthz: it is for operators' scrapers and shows counts and model
names, never prompts or outputs (keep it off the public edge; see docs/web.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from core.metrics import make_registry

router = APIRouter(tags=["metrics"])


def _registry(request: Request) -> CollectorRegistry:
    """The app's own registry, made on the first scrape."""
    state = request.app.state
    registry: CollectorRegistry | None = getattr(state, "metrics_registry", None)
    if registry is None:
        registry = make_registry(state.settings, state.queue)
        state.metrics_registry = registry
    return registry


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Jobs by status, queue depths, workers alive, tokens and latency histograms."""
    return Response(generate_latest(_registry(request)), media_type=CONTENT_TYPE_LATEST)
