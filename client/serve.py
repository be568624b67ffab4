"""An HTTP service inside the bank: score and explain one application per request.

The request body is one application as a JSON object keyed by the bank's feature names.
Every feature must be present (null means missing and is imputed as in training), no other
field is accepted, numbers must be finite numbers: anything else is a 422 whose `detail`
names the field. The service loads the model once, binds to loopback unless told
otherwise, serves no web UI that would fetch scripts from elsewhere, and calls nothing.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from client.explain import SPACE, Explainer
from client.scoring import Scorer
from common.errors import DataError


def application_model(scorer: Scorer) -> type[BaseModel]:
    """A pydantic model of one application: required fields, no extras, finite numbers."""
    fields: dict[str, Any] = {}
    for i, feature in enumerate(scorer.schema.numeric):
        fields[f"n{i}"] = (float | None, Field(alias=feature.name, allow_inf_nan=False))
    for i, cat in enumerate(scorer.schema.categorical):
        fields[f"c{i}"] = (str | None, Field(alias=cat.name))
    config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, populate_by_name=False)
    model: type[BaseModel] = create_model("Application", __config__=config, **fields)
    return model


def _field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = loc[0] if loc else "request body"
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "extra_forbidden":
            message = "unknown field (not a feature of this model)"
        out.append({"field": field, "message": message})
    return out


def create_app(
    scorer: Scorer, explainer: Explainer | None = None, threshold: float | None = None
) -> FastAPI:
    """The service for one bank's model; `explainer` None leaves out /explain."""
    application = application_model(scorer)
    app = FastAPI(
        title="fedfin bank scoring",
        description="Default probability and its reasons, computed inside the bank.",
        docs_url=None,  # the interactive docs load scripts from a CDN: not inside a bank
        redoc_url=None,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(list(exc.errors()))
        detail = "; ".join(f"field '{e['field']}': {e['message']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    @app.exception_handler(DataError)
    async def invalid_data(_: Request, exc: DataError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "features": list(scorer.feature_names),
            "schema_fingerprint": scorer.schema.fingerprint,
            "explain": explainer is not None,
            # which model the bank chose to serve (public or federated), and whether that
            # choice and its calibration were made for this encoder (`fedfin choose-model`)
            "served_model": scorer.card.get("served", "federated"),
            "calibrated": bool(scorer.card.get("validated")),
        }

    @app.post("/score")
    async def score(body: application) -> dict[str, Any]:  # type: ignore[valid-type]
        values = body.model_dump(by_alias=True)  # type: ignore[attr-defined]
        probability = scorer.score_one(values, "request")
        result: dict[str, Any] = {"default_probability": probability}
        if threshold is not None:
            result["decision"] = "decline" if probability >= threshold else "approve"
        return result

    if explainer is not None:
        active = explainer

        @app.post("/explain")
        def explain(body: application) -> dict[str, Any]:  # type: ignore[valid-type]
            values = body.model_dump(by_alias=True)  # type: ignore[attr-defined]
            explanation = active.explain_one(values, "request")
            return {
                "default_probability": explanation.probability,
                "reference_probability": explanation.reference_probability,
                "space": SPACE,
                "attributions": [
                    {"feature": name, "value": value, "attribution": attribution}
                    for name, value, attribution in explanation.ranked()
                ],
                "top_reasons": [name for name, _, _ in explanation.top_reasons(5)],
                "convergence_delta": explanation.convergence_delta,
            }

    return app
