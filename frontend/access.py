"""Who may call the HTTP API: API keys for /v1/, and CORS for browsers, as Sanic middleware.

With API keys set, every request under /v1/ but the render routes a router
calls (and to /tokenize and /detokenize, which use the model too) needs `Authorization: Bearer KEY` with
one of them (or `x-api-key: KEY`, as Anthropic's clients send it), else 401 in the
API's shape; /health and other routes stay
open. With CORS origins set, OPTIONS preflights are answered (without a key:
browsers send none on a preflight) and responses to an allowed origin carry
Access-Control-Allow-Origin. Sanic runs response middleware inside
`request.respond`, before the first byte is sent, so SSE streams, error
responses and preflights get the header like any other response.
"""

from __future__ import annotations

import hmac

from sanic import Request, Sanic
from sanic.response import HTTPResponse, empty

from infersnap.frontend.errors import APIError
from infersnap.plan import ServePlan

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, X-Api-Key"
MAX_AGE_SECONDS = 600
KEYED_OUTSIDE_V1 = ("/tokenize", "/detokenize")  # llama-server's routes: they use the model, so a key too
# vLLM's render routes: vllm-router's cache_aware policy asks them of every node with no key (docs/cluster.md);
# they give a prompt's token ids and generate nothing
OPEN_INSIDE_V1 = ("/v1/chat/completions/render", "/v1/completions/render")
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an x-api-key header."
)
WRONG_KEY = "Incorrect API key provided. Use one of the keys this server was configured with (http.api-keys)."


def install(app: Sanic, plan: ServePlan) -> None:
    """Register the middleware `plan` asks for; none when it sets no keys and no origins."""
    if plan.cors_origins:
        _install_cors(app, plan.cors_origins)
    if plan.api_keys:  # after the preflight answer, which needs no key
        _install_keys(app, plan.api_keys)


def _install_keys(app: Sanic, api_keys: list[str]) -> None:
    keys = [key.encode() for key in api_keys]

    async def require_key(request: Request) -> None:
        path = request.path
        if not (path == "/v1" or path.startswith("/v1/") or path.rstrip("/") in KEYED_OUTSIDE_V1) \
                or path.rstrip("/") in OPEN_INSIDE_V1:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        token = token or request.headers.get("x-api-key", "").strip()  # as Anthropic's clients send it
        if not token:
            raise _unauthorized(NO_KEY)
        presented = token.encode("utf-8", "surrogateescape")
        matched = False
        for key in keys:  # every key is compared, so the time taken does not tell which one nearly matched
            matched |= hmac.compare_digest(key, presented)
        if not matched:
            raise _unauthorized(WRONG_KEY)

    app.register_middleware(require_key, "request")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _install_cors(app: Sanic, cors_origins: list[str]) -> None:
    any_origin = "*" in cors_origins
    origins = set(cors_origins)

    def allowed_origin(request: Request) -> str | None:
        """The Access-Control-Allow-Origin value for this request; None: no CORS headers."""
        origin = request.headers.get("origin")
        if any_origin:
            return "*"
        if origin and origin.rstrip("/").lower() in origins:
            return origin
        return None

    async def preflight(request: Request) -> HTTPResponse | None:
        if request.method != "OPTIONS":
            return None
        headers = {}
        if allowed_origin(request):
            headers = {
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers") or ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
            }
        return empty(status=204, headers=headers)  # the response middleware adds the origin

    async def add_origin(request: Request, response: HTTPResponse) -> None:
        allowed = allowed_origin(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = allowed
        if not any_origin:  # the answer depends on the Origin header: caches must know
            vary = response.headers.get("vary")
            if not vary:
                response.headers["Vary"] = "Origin"
            elif "origin" not in vary.lower():
                response.headers["Vary"] = f"{vary}, Origin"

    app.register_middleware(preflight, "request")
    app.register_middleware(add_origin, "response")
