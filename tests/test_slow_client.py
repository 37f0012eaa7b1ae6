"""A client that stops reading a stream cannot hold its slot: it is dropped and its generation stopped."""

from __future__ import annotations

import json
import socket

from conftest import start_server, wait_until

ENDLESS = {
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1500,
    "logit_bias": {"0": -100, "2": -100},  # never stop early
    "stream": True,
    "logprobs": True, "top_logprobs": 20,  # a few KB per chunk: the socket buffers fill in a second, not ten
}


def test_a_stalled_streaming_client_is_dropped_and_its_generation_stopped(tmp_path):
    server = start_server(tmp_path, **{"worker.slots": "1", "http.send-timeout": "1", "engines": "cpu"})
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffers fill
        stalled.connect(("127.0.0.1", server.port))
        body = json.dumps(ENDLESS).encode()
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        assert stalled.recv(64).startswith(b"HTTP/1.1 200")  # then it reads nothing more
        # Without the send timeout its handler would wait on the full connection for ever.
        wait_until(lambda: "status=499" in server.log.read_text(), 40, "the stalled client was never dropped")
        [line] = [line for line in server.log.read_text().splitlines() if "status=499" in line]
        assert server.status()["workers"][0]["running"] == 0  # its generation was stopped, the slot is free
        stalled.close()
    finally:
        assert server.stop() == 0
