"""The API's JSON response: ASCII-escaped, so any text a client sent and the API echoes (even a lone
surrogate from a JSON body) renders instead of failing, and compact."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

__all__ = ["ApiJSON"]


class ApiJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
