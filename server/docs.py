"""/docs (Swagger UI) and /redoc (ReDoc) that work offline.

FastAPI's own pages load their JavaScript, CSS, favicon and fonts from CDNs, so they are blank
on a machine without internet access. These pages load the same tools from the
`fastapi-offline` package (a dependency: it ships Swagger UI and ReDoc as static files), served
under /docs-assets; nothing they reference lies outside this server (a browser test checks it
with every other request refused).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/docs-assets"
# Swagger UI asks an online validator about the spec unless told not to.
SWAGGER_PARAMETERS = {"validatorUrl": None}
# ReDoc's footer ("API docs by Redocly") loads its logo from a CDN; the favicon stands in.
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def add_offline_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc from local assets (create the app with docs_url=None and
    redoc_url=None). Call before mounting anything at /, which would shadow these routes."""
    @app.get(f"{ASSETS_URL}/redoc.offline.js", include_in_schema=False)
    def redoc_js() -> Response:
        return Response(_offline_redoc_js(), media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")  # after the route

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        spec, assets = _urls(app, request)
        return get_swagger_ui_html(
            openapi_url=spec, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css", swagger_favicon_url=f"{assets}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS)  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        spec, assets = _urls(app, request)
        return get_redoc_html(openapi_url=spec, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc.offline.js",
                              redoc_favicon_url=f"{assets}/favicon.png", with_google_fonts=False)


def _urls(app: FastAPI, request: Request) -> tuple[str, str]:
    """The OpenAPI document's and the assets' URLs, behind a proxy's root_path too."""
    root = request.scope.get("root_path", "")
    return f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}"


@cache
def _offline_redoc_js() -> bytes:
    """redoc.standalone.js with its one CDN reference pointed at this server."""
    script = (ASSETS / "redoc.standalone.js").read_bytes()
    return script.replace(REDOC_CDN_LOGO, f"{ASSETS_URL}/favicon.png".encode())
