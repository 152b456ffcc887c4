"""/v1/models: the models jobs may ask for, in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import OwnerDep, SessionDep, SettingsDep
from core import submit, workers

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(session: SessionDep, settings: SettingsDep, _owner: OwnerDep) -> dict[str, Any]:
    """Models that live workers serve (with how many) and the configured ones."""
    live = workers.live_models(session, within_s=settings.worker_heartbeat_s * 3)
    data = [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "genq",
            "workers": live.get(model, 0),
        }
        for model in submit.served_models(session, settings)
    ]
    return {"object": "list", "data": data}
