"""An HTTP service inside the bank: score and explain applications, one or a batch at a time.

`POST /score` takes one application (a JSON object keyed by the bank's feature names) or a
list of up to `max_batch` of them. The column rules are `fedfin score`'s
(`client.scoring.application_column_problems`): every feature present (null or "" means
missing and is imputed as in training), an id and any other field kept out of the model;
numbers must be finite numbers. Anything else is a 422 whose `detail` names the field (and
the application's position in a batch); a batch is scored whole or not at all.

Every answer carries the request id (the caller's `X-Request-ID`, or a new one), the model
version (`client.model_choice.model_version`), and per application its reason codes, the
features imputed and any category the model never saw (scored as unknown, never silently).
Each request adds one JSON line to the request log: time, request id, path, status, rows,
the caller's own ids, model version and latency; no applicant data beyond those ids.

`GET /drift` reports how far the applications scored since the service started, and their
scores, are from the bank's training reference (client/drift.py): PSI and a verdict per
feature and for the score; a threshold crossed is logged once as a warning on `fedfin.bank`.

The service loads the model once, binds to loopback unless told otherwise, serves no web UI
that would fetch scripts from elsewhere, and calls nothing.
"""

import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TextIO

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from fedfin.client.drift import DriftMonitor
from fedfin.client.explain import SPACE, Explainer
from fedfin.client.scoring import (
    DECISION_COLUMN,
    PROBABILITY_COLUMN,
    TAKEN,
    RowNotes,
    Scorer,
    application_column_problems,
)
from fedfin.common.errors import DataError

logger = logging.getLogger("fedfin.bank")
MAX_BATCH = 1000
ID_FIELD = "id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_MAX_ID_LENGTH = 128


class RequestRejected(Exception):
    """A request that gets a 422: `detail` names the field; nothing was scored."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _empty_is_missing(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


def application_model(scorer: Scorer) -> type[BaseModel]:
    """A pydantic model of one application's features: finite numbers, text categories.

    Other fields are ignored here: `application_column_problems` decides what may be there.
    """
    fields: dict[str, Any] = {}
    empty_is_none = BeforeValidator(_empty_is_missing)
    for i, feature in enumerate(scorer.schema.numeric):
        number = Annotated[float | None, empty_is_none]
        fields[f"n{i}"] = (number, Field(alias=feature.name, allow_inf_nan=False))
    for i, cat in enumerate(scorer.schema.categorical):
        fields[f"c{i}"] = (Annotated[str | None, empty_is_none], Field(alias=cat.name))
    config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, populate_by_name=False)
    model: type[BaseModel] = create_model("Application", __config__=config, **fields)
    return model


class RequestLog:
    """One JSON line per request, appended to a file (or a stream) and flushed at once."""

    def __init__(self, path: Path | None = None, stream: TextIO | None = None) -> None:
        self._lock = threading.Lock()
        self._stream: TextIO = open(path, "a", buffering=1) if path else (stream or sys.stderr)  # noqa: SIM115
        self._owned = path is not None

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()


def create_app(
    scorer: Scorer,
    explainer: Explainer | None = None,
    threshold: float | None = None,
    *,
    max_batch: int = MAX_BATCH,
    request_log: RequestLog | None = None,
    drift: DriftMonitor | None = None,
    drift_note: str = "",
) -> FastAPI:
    """The service for one bank's model; `explainer` None leaves out /explain and reasons.

    `drift` watches what /score scores against the bank's training reference; without one,
    /drift says why (`drift_note`)."""
    application = application_model(scorer)
    version = str(scorer.card.get("model_version", "unknown"))
    log = request_log or RequestLog()
    app = FastAPI(
        title="fedfin bank scoring",
        description="Default probability and its reasons, computed inside the bank.",
        docs_url=None,  # the interactive docs load scripts from a CDN: not inside a bank
        redoc_url=None,
    )

    def parse(raw: object, where: str) -> tuple[dict[str, Any], object]:
        """One application's feature values and the caller's id, or a `RequestRejected`."""
        prefix = f"{where}: " if where else ""
        if not isinstance(raw, dict):
            raise RequestRejected(f"{prefix or 'request body: '}expected a JSON object")
        problems = application_column_problems(raw.keys(), scorer.schema)
        if problems:
            field, kind = problems[0]
            problem = (
                "a name fedfin answers under; rename it"
                if kind == TAKEN
                else "required feature is missing (send null if unknown: it is imputed)"
            )
            raise RequestRejected(f"{prefix}field '{field}': {problem}")
        try:
            values = application.model_validate(raw).model_dump(by_alias=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error.get("loc", ())) or "request body"
            raise RequestRejected(
                f"{prefix}field '{field}': {error.get('msg', 'invalid')}"
            ) from None
        caller_id = raw.get(ID_FIELD)
        if caller_id is not None and not (
            isinstance(caller_id, str | int)
            and not isinstance(caller_id, bool)
            and len(str(caller_id)) <= _MAX_ID_LENGTH
        ):
            raise RequestRejected(
                f"{prefix}field '{ID_FIELD}': a string or integer of at most "
                f"{_MAX_ID_LENGTH} characters"
            )
        return values, caller_id

    def parse_body(body: object) -> tuple[list[tuple[dict[str, Any], object]], bool]:
        """The applications of a request and whether it was a batch (a list)."""
        if isinstance(body, list):
            if not body:
                raise RequestRejected("request body: an empty list; send 1 to a batch")
            if len(body) > max_batch:
                raise RequestRejected(
                    f"request body: {len(body)} applications; at most {max_batch} a request"
                )
            return [parse(item, f"application {i}") for i, item in enumerate(body)], True
        return [parse(body, "")], False

    def result(
        values: dict[str, Any], caller_id: object, codes: list[str] | None
    ) -> dict[str, Any]:
        probability = scorer.score_one(values, "request")
        notes: RowNotes = scorer.notes_one(values)
        out: dict[str, Any] = {} if caller_id is None else {ID_FIELD: caller_id}
        out[PROBABILITY_COLUMN] = probability
        if threshold is not None:
            out[DECISION_COLUMN] = "decline" if probability >= threshold else "approve"
        if codes is not None:
            out["reason_codes"] = codes
        out["imputed"] = list(notes.imputed)
        out["unseen_categories"] = dict(notes.unseen_categories)
        return out

    async def json_body(request: Request) -> object:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError:
            raise RequestRejected("request body: not valid JSON") from None

    @app.middleware("http")
    async def logged(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        request.state.rows = 0
        request.state.ids = []
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "rows": request.state.rows,
            "model_version": version,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if request.state.ids:
            record["ids"] = request.state.ids
        log.write(record)
        return response

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse(
            status_code=422,
            content={
                "detail": exc.detail,
                "request_id": getattr(request.state, "request_id", None),
                "model_version": version,
            },
        )

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
            "model_version": version,
            "max_batch": max_batch,
        }

    @app.get("/drift")
    async def drift_report() -> dict[str, Any]:
        if drift is None:
            return {"watching": False, "note": drift_note, "model_version": version}
        return {"watching": True, "model_version": version, **drift.report()}

    @app.exception_handler(DataError)
    async def invalid_data(request: Request, exc: DataError) -> JSONResponse:
        return await rejected(request, RequestRejected(str(exc)))

    @app.post("/score")
    async def score(request: Request) -> dict[str, Any]:  # reads its body: one or a list
        applications, batch = parse_body(await json_body(request))
        codes: list[list[str]] | list[None]
        if explainer is not None:
            encoded = [scorer.encode_one(values, "request") for values, _ in applications]
            numeric = np.stack([n for n, _ in encoded])
            categorical = np.stack([c for _, c in encoded])
            codes = explainer.reason_codes(numeric, categorical)
        else:
            codes = [None] * len(applications)
        results = [
            result(values, caller_id, row_codes)
            for (values, caller_id), row_codes in zip(applications, codes, strict=True)
        ]
        request.state.rows = len(results)
        request.state.ids = [str(c) for _, c in applications if c is not None]
        if drift is not None:
            drift.add_rows([v for v, _ in applications], [r[PROBABILITY_COLUMN] for r in results])
            for line in drift.new_warnings():
                logger.warning(line)
        head = {"request_id": request.state.request_id, "model_version": version}
        return {**head, "results": results} if batch else {**head, **results[0]}

    if explainer is not None:
        active = explainer

        @app.post("/explain")
        async def explain(request: Request) -> dict[str, Any]:
            body = await json_body(request)
            if isinstance(body, list):
                raise RequestRejected("request body: /explain takes one application, not a list")
            [(values, caller_id)], _ = parse_body(body)
            explanation = active.explain_one(values, "request")
            notes = scorer.notes_one(values)
            request.state.rows = 1
            request.state.ids = [] if caller_id is None else [str(caller_id)]
            return {
                "request_id": request.state.request_id,
                "model_version": version,
                **({} if caller_id is None else {ID_FIELD: caller_id}),
                "default_probability": explanation.probability,
                "reference_probability": explanation.reference_probability,
                "space": SPACE,
                "attributions": [
                    {"feature": name, "value": value, "attribution": attribution}
                    for name, value, attribution in explanation.ranked()
                ],
                "top_reasons": [name for name, _, _ in explanation.top_reasons(5)],
                "reason_codes": list(explanation.reason_codes),
                "imputed": list(notes.imputed),
                "unseen_categories": dict(notes.unseen_categories),
                "convergence_delta": explanation.convergence_delta,
            }

    return app
