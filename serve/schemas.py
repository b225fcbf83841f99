"""Request and response bodies of the HTTP API (pydantic v2). The OpenAPI schema built from them
is the API's reference documentation, so every field says what it means.

Items and users are referenced the same way everywhere: by id when the served embeddings know
them (scored from precomputed embeddings, no T5 call), or by text (encoded on the fly by the
same Predictor code the embed job uses: the cold path). Unknown fields are rejected (a typo such
as ``itemid`` is a 422 naming it, not a silently ignored key). Size limits that depend on the
run config (serve.max_candidates, max_history, max_k) are checked by the API, which answers 413;
the bounds below are the config-independent ones (the API writes the configured ones into the
served OpenAPI schema). Optional request fields are omitted rather than sent as null (null is
accepted and means omitted, but the schema does not advertise it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ID_CHARS = 512
MAX_TEXT_CHARS = 20_000


def _omit_null(schema: dict[str, Any]) -> None:
    """Optional request fields are omitted, not null: advertise only the non-null type."""
    schema.pop("default", None)
    options = [o for o in schema.pop("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        schema.update(options[0])
    elif options:
        schema["anyOf"] = options


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemRef(_Request):
    """One item: a catalog id, its text, or both (text is used only when the id is unknown)."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"anyOf": [{"required": ["item_id"]}, {"required": ["text"]}]})

    item_id: str | None = Field(
        None, json_schema_extra=_omit_null, min_length=1, max_length=MAX_ID_CHARS,
        description="Catalog item id. Known ids are scored from precomputed embeddings.")
    text: str | None = Field(
        None, json_schema_extra=_omit_null, max_length=MAX_TEXT_CHARS,
        description="Item text (title, category, abstract...), as the catalog formats it. Needed only for items "
                    "the served embeddings do not know: they are encoded on the fly.")

    @model_validator(mode="after")
    def _id_or_text(self) -> ItemRef:
        if self.item_id is None and self.text is None:
            raise ValueError("an item needs item_id or text (or both)")
        return self


_USER_OR_HISTORY: dict[str, Any] = {"anyOf": [{"required": ["user_id"]}, {"required": ["history"]}]}


class _UserQuery(_Request):
    user_id: str | None = Field(
        None, json_schema_extra=_omit_null, min_length=1, max_length=MAX_ID_CHARS,
        description="A user known to the served embeddings (precomputed UPE). Without `history` an unknown id "
                    "is a 404.")
    history: list[ItemRef] | None = Field(
        None, json_schema_extra=_omit_null, min_length=1,
        description="The user's history, oldest first, as items (ids and/or texts). When given, the user is "
                    "encoded on the fly from it (the cold path) even if user_id is known; at most "
                    "serve.max_history items.")

    @model_validator(mode="after")
    def _user_or_history(self) -> _UserQuery:
        if self.user_id is None and self.history is None:
            raise ValueError("give user_id (a known user) or history (items, for any user)")
        return self


class ScoreRequest(_UserQuery):
    """Score candidates for one user."""

    candidates: list[ItemRef] = Field(..., min_length=1,
                                      description="Items to score, at most serve.max_candidates.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={**_USER_OR_HISTORY, "examples": [
        {"user_id": "U13", "candidates": [{"item_id": "N101"}, {"item_id": "N7"},
                                          {"text": "Local team wins the final | sports"}]}]})


class RecommendRequest(_UserQuery):
    """Top k of the whole catalog for one user, by exact scoring of every item."""

    k: int = Field(10, ge=1, description="How many items to return, at most serve.max_k.")
    exclude: list[str] = Field(default_factory=list, description="Item ids never to recommend.")
    exclude_history: bool = Field(True, description="Also exclude the user's own history items (the stored "
                                                    "history of a known user, or the ids in `history`).")

    model_config = ConfigDict(extra="forbid", json_schema_extra={**_USER_OR_HISTORY,
                                                                 "examples": [{"user_id": "U13", "k": 5}]})


class ScoredItem(BaseModel):
    item_id: str | None = Field(description="The candidate's id (null when it was given by text only).")
    score: float = Field(description="EmbSum relevance score s_ij (higher = more relevant; not a probability).")
    encoded: bool = Field(description="True when the item was encoded on the fly (cold path).")


class ScoreResponse(BaseModel):
    model_version: str = Field(description="Registered model version that produced every score here.")
    user_id: str | None = Field(description="The user scored (as given).")
    user_encoded: bool = Field(description="True when the user was encoded on the fly from `history`.")
    scores: list[ScoredItem] = Field(description="One entry per candidate, in request order.")


class RecommendedItem(BaseModel):
    item_id: str = Field(description="Catalog item id.")
    score: float = Field(description="EmbSum relevance score.")
    text: str = Field(description="The item's catalog text.")


class RecommendResponse(BaseModel):
    model_version: str = Field(description="Registered model version that ranked the catalog.")
    user_id: str | None = Field(description="The user (as given).")
    user_encoded: bool = Field(description="True when the user was encoded on the fly from `history`.")
    items: list[RecommendedItem] = Field(description="Best first; fewer than k when fewer items are eligible.")


class SummaryResponse(BaseModel):
    model_version: str = Field(description="Model version whose decoder generated the summary.")
    user_id: str
    summary: str = Field(description="The user-interest summary generated offline by the model's decoder.")


class RolloutError(BaseModel):
    version: str = Field(description="The version that failed to load.")
    error: str = Field(description="Why it failed.")
    at: float = Field(description="Unix time of the failure.")


class ModelResponse(BaseModel):
    model_name: str = Field(description="Registered model name.")
    model_version: str = Field(description="Version being served.")
    aliases: list[str] = Field(description="Registry aliases pointing at that version when it was loaded.")
    alias: str = Field(description="The registry alias (mlflow.alias) a deploy or rollout resolves once to pick "
                                   "a version; moving it changes nothing served until the next rollout.")
    requested_version: str = Field(description="The version number the last rollout asked for.")
    loaded_at: float = Field(description="Unix time the version was loaded.")
    embeddings: dict[str, Any] = Field(description="The embeddings manifest (counts, shapes, fingerprint).")
    last_rollout_error: RolloutError | None = Field(
        description="Set when the last rollout could not load its version; the version above kept serving.")


class Status(BaseModel):
    status: str = Field(description="'ok', or why not.")
    model_version: str | None = Field(None, description="Served version (readiness only).")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What was wrong, naming the field, ids or limit involved.")
