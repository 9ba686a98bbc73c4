"""An OpenAI-compatible HTTP server for a Memory³ model, with knowledge endpoints.

Endpoints (all but `/health` need `Authorization: Bearer <key>` when the server has a key):

    POST /v1/completions, /v1/chat/completions   OpenAI bodies, streaming (SSE) or not
    GET  /v1/models, /health
    POST /v1/documents                            add documents ({"documents": [{text, id?, title?, metadata?}]})
    GET  /v1/documents, /v1/documents/{id}        list, inspect
    PUT  /v1/documents/{id}                       replace (or create) one document
    DELETE /v1/documents/{id}
    GET  /v1/stores, /v1/stores/{name}

Memory per request: an extra body field `"memory": {"mode": "memory" | "none" | "rag", "k": 5,
"store": "name", "min_score": 0.45}` (all optional; `min_score` drops hits less similar to the
query than that, so a question the store knows nothing about reads nothing unrelated). Each choice carries `references`: the retrieved references
(`id`, `doc_id`, `title`, `score`, `chunks` = which 64-token chunks read them), so an answer can
be traced to its sources. Document endpoints take `?store=name`. Stores are looked up by name in
the dict the server was started with; nothing from a request is ever joined to a path.

No model logic lives here: requests are validated, turned into `GenerationRequest`s and handed
to the `Scheduler`, which owns the model on its own thread and batches requests that arrive
together.
"""

from memory3.serve.api import APIError, ServerConfig
from memory3.serve.routes import BackgroundServer, create_app

__all__ = ["APIError", "BackgroundServer", "ServerConfig", "create_app"]
