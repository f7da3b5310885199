"""`GET /v1/models` and `GET /v1/models/{id}`: the served model's card."""

from __future__ import annotations

from cats_serve.server.api.errors import model_not_found
from cats_serve.server.api.openapi import ERRORS
from cats_serve.server.api.responses import ModelCard, ModelList
from cats_serve.server.api.state import ServingDep, StateDep, v1_router

router = v1_router()


def _card(serving, state) -> ModelCard:
    return ModelCard(
        id=serving.name,
        created=state.started,
        max_model_len=serving.max_seq_len,
        sparsity_levels=serving.levels,
        default_sparsity=serving.default_sparsity,
        weights=serving.weights,
    )


@router.get("/models", response_model=ModelList, responses=ERRORS, summary="The served model")
async def models(serving: ServingDep, state: StateDep):
    return ModelList(data=[_card(serving, state)])


@router.get("/models/{model_id}", response_model=ModelCard, responses=ERRORS, summary="One model")
async def model(model_id: str, serving: ServingDep, state: StateDep):
    if model_id != serving.name:
        raise model_not_found(model_id, serving.name)
    return _card(serving, state)
