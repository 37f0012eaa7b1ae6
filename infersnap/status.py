"""A running server's status as a document: what `infersnap status` prints and `GET /v1/status` serves
(shared here because the frontend must not import from cli/)."""

from __future__ import annotations

from infersnap import wire


def status_document(status: wire.Status) -> dict:
    """The status as `infersnap status` prints it."""
    engines = sorted({w.engine for w in status.workers if "generate" in w.capabilities.tasks})
    default = status.models[0] if status.models else None
    return {
        "engine": ", ".join(engines) if engines else None,
        "endpoints": dict(status.endpoints),
        "model": default.name if default else None,  # the default one; `models` has them all
        **({"context": f"{default.context} tokens per sequence ({default.context_note})"}
           if default and default.context_note else {}),
        "queued": status.queued,  # in the broker, for a free slot (a worker's own `waiting` is inside its engine)
        **({"draining": True} if status.draining else {}),
        **({"left-out": default.left_out} if default and default.left_out else {}),
        "models": [
            {
                "id": m.name,
                "state": m.state,
                **({"error": m.error} if m.error else {}),
                "context": m.context,
                "keep-alive": m.keep_alive,
                **({"idle": round(m.idle_seconds, 1)} if m.idle_seconds is not None else {}),
            }
            for m in status.models
        ],
        "workers": [
            {
                "id": w.worker_id,
                "device": w.device,
                "engine": w.engine,
                "task": w.capabilities.tasks[0],  # its own: generate (with tokenizer lookups) or embed
                **({"can": w.capabilities.features} if w.capabilities.features else {}),
                "model": w.model,
                "state": w.state,
                **({"error": w.error} if w.error else {}),
                # the runtime settings it runs with, and why (what crashed with others: infersnap/probes.py)
                **({"settings": w.settings} if w.settings else {}),
                "slots": w.slots,
                "context": w.context,
                "running": len(w.running),
                "waiting": w.waiting,
                # its measured generated tokens/s by streams at once: what the broker routes by
                **({"tok/s": {lv.streams: round(lv.tokens_per_second, 1) for lv in w.speed.levels}} if w.speed else {}),
                "pid": w.pid,
                **({"restarts": w.restarts} if w.restarts else {}),
            }
            for w in status.workers
        ],
    }
