"""/v1/models: the bundles this server serves, described from their configs (no weights)."""

from __future__ import annotations

from fastapi import APIRouter

from dfserve.server.catalog import Catalog
from dfserve.server.errors import ApiError
from dfserve.server.routes.deps import CatalogDep
from dfserve.server.schemas import ErrorBody, ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_list(catalog: Catalog) -> ModelList:
    """The document of GET /v1/models, and of `dfserve models --json`."""
    models = [ModelInfo(**catalog.describe(m)) for m in sorted(catalog.configs)]
    return ModelList(default=catalog.default, models=models)


@router.get("", response_model=ModelList, response_model_exclude_none=True)
def list_models(catalog: CatalogDep) -> ModelList:
    return model_list(catalog)


@router.get("/{model_id}", response_model=ModelInfo, response_model_exclude_none=True,
            responses={404: {"model": ErrorBody}})
def get_model(model_id: str, catalog: CatalogDep) -> ModelInfo:
    if model_id not in catalog.configs:
        raise ApiError(404, "model", f"{model_id!r} is not a model this server serves",
                       sorted(catalog.configs))
    return ModelInfo(**catalog.describe(model_id))
