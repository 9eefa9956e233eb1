"""The web console (U, S3's web push): static pages at /ui and /whoami, which tells the page what its token
may see. The pages hold no data: each one asks the API with the token the person typed in (kept in the
tab's sessionStorage, sent as ``Authorization: Bearer``), so the console has the API's roles and project
scoping and nothing of its own. The chart library (uPlot) is installed from the npm registry by
``./dev setup`` into .aima/npm (an image puts it where ``AIMA_API_UI_LIBRARY_DIR`` says) and served from
there; without it the pages show tables and say so."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, RedirectResponse

from api import audit
from api.auth import Auth
from api.deps import api_state
from api.errors import ApiError, error_responses
from api.responses import ApiJSON
from api.routes.fleet import FLEET_METRICS
from bus import catalogue

router = APIRouter(tags=["console"])

PAGES = FsPath(__file__).resolve().parent.parent / "ui"
LIBRARY_FILES = ("uPlot.iife.min.js", "uPlot.min.css")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# Pages may load only what the API serves itself: no inline script, no other origin.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(path: FsPath) -> FileResponse:
    return FileResponse(
        path, media_type=_TYPES.get(path.suffix, "application/octet-stream"), headers=_HEADERS
    )


@router.get("/ui", include_in_schema=False)
def index() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
def page() -> FileResponse:
    return _file(PAGES / "index.html")


@router.get("/ui/lib/{name}", include_in_schema=False)
def library(request: Request, name: Annotated[str, Path(max_length=100)]) -> FileResponse:
    folder = api_state(request).config.ui_library_dir
    if name not in LIBRARY_FILES or not (folder / name).is_file():
        raise ApiError(
            404,
            "not_found",
            f"{name[:100]!r}: the chart library is not installed (./dev setup, AIMA_API_UI_LIBRARY_DIR)",
        )
    return _file(folder / name)


@router.get("/ui/{name}", include_in_schema=False)
def asset(name: Annotated[str, Path(max_length=100)]) -> FileResponse:
    # Only the files of api/ui by their plain names: no path (the route takes no '/'), no hidden file.
    target = PAGES / name
    if name.startswith(".") or target.suffix not in _TYPES or not target.is_file():
        raise ApiError(404, "not_found", f"no console file {name[:100]!r}")
    return _file(target)


@router.get("/whoami", responses=error_responses(401))
def whoami(request: Request, principal: Auth) -> ApiJSON:
    """The token's name, role and projects, and which console pages it may read."""
    audit.note(request, rows=1)
    return ApiJSON(
        {
            "name": principal.name,
            "role": principal.role,
            "projects": list(principal.projects) if principal.restricted else None,
            "can": {
                "alerts": principal.role == "admin",
                "fleet": all(principal.can_read(catalogue.BY_NAME[m]) for m in FLEET_METRICS),
                "costs": True,
                "jobs": True,
            },
        }
    )
