"""Asking a running server's broker for its status over the control socket."""

from __future__ import annotations

import uuid

import zmq

from infersnap import paths, wire


class NotRunning(Exception):
    pass


def query_status(timeout: float = 2.0) -> wire.Status:
    """The broker's Status, or NotRunning if no server answers for this data folder."""
    if not paths.socket_file("clients").exists():
        raise NotRunning("infersnap is not running (no server for this data folder)")
    zctx = zmq.Context.instance()
    socket = zctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(paths.socket_address("clients"))
        query = wire.StatusQuery(id=uuid.uuid4().hex)
        socket.send(wire.encode(query))
        while socket.poll(int(timeout * 1000)):
            reply = wire.decode(socket.recv())
            if isinstance(reply, wire.Status) and reply.id == query.id:
                return reply
        raise NotRunning("infersnap is not running (its broker does not answer)")
    finally:
        socket.close()
