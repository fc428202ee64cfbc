"""The OpenAPI document states what the server enforces, not only the fields' types.

Two pieces, both registered in ``settings.py``:

- :class:`ContractAutoSchema` (``DEFAULT_SCHEMA_CLASS``) reads each input serializer: a
  :class:`~backend.internal_api.serializers.StrictSerializer` refuses unknown fields
  (``additionalProperties: false``); a string field that trims whitespace and refuses blanks
  needs a character that is not whitespace; a field validated as an http(s) URL gets
  ``format: uri`` and the URL's pattern; a :class:`ResultField` says how deep it may nest.
- :func:`state_enforced_constraints` (a postprocessing hook) bounds the parameters the views
  and middleware check by name: ``limit`` 1 to 500, ``Idempotency-Key`` 1 to 255 printable
  characters, ``X-Organization-ID`` an organization id (at most 64 characters, not blank);
  and every operation may be answered 414 or 431 by gunicorn itself.

Every JSON string in a body is also refused when it holds NUL or an unpaired surrogate (the
parser, for every field): the document's description says so once.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from rest_framework import serializers

from backend.internal_api.idempotency import MAX_KEY_LENGTH
from backend.internal_api.models import Organization
from backend.internal_api.serializers import ResultField, StrictSerializer, _http_url

# No NUL (the parser and the middleware refuse it in every string); NOT_BLANK also needs a
# character that is not whitespace (what DRF leaves of a trimmed value that must not be blank).
NO_NUL = r"^[^\x00]*$"
NOT_BLANK = r"^[^\x00]*[^\x00\s][^\x00]*$"
# What ``serializers._http_url`` accepts: http or https (any case), an ASCII host with an
# optional user and port 0-65535, then no whitespace.
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
HTTP_URL = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~!$&'()*+,;=%:-]*@)?[A-Za-z0-9._~!$&'()*+,;=%-]+"
    rf"(:{_PORT}?)?([/?#][^\s\x00]*)?$"
)
# ``str.isprintable`` over the Latin-1 text a WSGI header value is, at least one character
# that is not a space (the server strips a header value's surrounding spaces).
HEADER_PRINTABLE = r"^[ -~\xa1-\xac\xae-\xff]*[!-~\xa1-\xac\xae-\xff][ -~\xa1-\xac\xae-\xff]*$"
# What gunicorn answers before Django (its own HTML page; README "What gunicorn answers").
GUNICORN_ANSWERS = {
    "414": {"description": "request line over 4094 bytes (gunicorn's HTML page)"},
    "431": {"description": "a header line over 8188 bytes or over 100 headers (gunicorn's HTML)"},
}
BODY_STRINGS = (
    "Every JSON string in a request body is refused (400 naming the field) when it holds a "
    "NUL character or an unpaired surrogate; numbers must be finite; bodies are at most "
    "1 MiB (413)."
)




class ContractAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus the input constraints the serializers enforce."""

    def _map_serializer_field(
        self, field: serializers.Field, direction: str, bypass_extensions: bool = False
    ) -> dict[str, Any]:
        schema: dict[str, Any] = super()._map_serializer_field(field, direction, bypass_extensions)
        if direction != "request":
            return schema
        if isinstance(field, ResultField):
            schema["description"] = "any JSON value, nested at most 64 levels deep"
        elif isinstance(field, serializers.CharField):
            if _http_url in field.validators:
                schema.update(format="uri", pattern=HTTP_URL)
            elif "pattern" not in schema:  # a field's own pattern (webhook_id) says more
                blank = field.allow_blank or not field.trim_whitespace
                schema["pattern"] = NO_NUL if blank else NOT_BLANK
        return schema

    def _map_basic_serializer(
        self, serializer: serializers.Serializer, direction: str
    ) -> dict[str, Any]:
        schema: dict[str, Any] = super()._map_basic_serializer(serializer, direction)
        if direction == "request" and isinstance(serializer, StrictSerializer):
            schema["additionalProperties"] = False
        return schema


def _free_text(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and not {"enum", "format", "pattern"} & set(schema)


def state_enforced_constraints(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: bound the parameters checked by name (above)."""
    # Imported here: the views' ``extend_schema`` loads this module while the views load.
    from backend.internal_api.contract import DEFAULT_PAGE, MAX_PAGE, ORG_HEADER

    parameters: dict[tuple[str, str], dict[str, Any]] = {
        ("query", "limit"): {"minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
        ("header", "Idempotency-Key"): {
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH,
            "pattern": HEADER_PRINTABLE,
        },
        ("header", ORG_HEADER): {
            "minLength": 1,
            "maxLength": Organization._meta.get_field("id").max_length,
            "pattern": NOT_BLANK,
        },
    }
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            operation.setdefault("responses", {}).update(GUNICORN_ANSWERS)
            for parameter in operation.get("parameters", ()):
                bounds = parameters.get((parameter["in"], parameter["name"]))
                schema = parameter["schema"]
                if bounds is not None:
                    schema.update(bounds)
                elif parameter["in"] == "query" and _free_text(schema):
                    schema["pattern"] = NO_NUL
    info = result.setdefault("info", {})
    info["description"] = f"{info.get('description', '')} {BODY_STRINGS}".strip()
    return result
