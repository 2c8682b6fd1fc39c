"""serving/httpclient.py against a real socket server: statuses, keep-alive, reconnects, multipart."""

from __future__ import annotations

import email.parser
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.httpclient import NoAnswer, Session, multipart, request, wait_until_ok
from serving.server import free_port


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless a request says otherwise
    connections: set[int] = set()

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Handler.connections.add(self.client_address[1])
        status = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/status/") else 200
        out = b'{"echo": %d}' % len(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Path", self.path)
        self.end_headers()
        self.wfile.write(out)
        if self.path == "/close-after":  # as a server whose keep-alive timeout ran out
            self.close_connection = True

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture()
def server():
    _Handler.connections = set()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_every_status_is_an_answer(server):
    r = request("POST", server + "/status/413", b"abc")
    assert (r.status, r.json(), r.headers["x-path"]) == (413, {"echo": 3}, "/status/413")


def test_a_session_keeps_one_connection(server):
    with Session(server) as s:
        for _ in range(3):
            assert s.request("POST", "/x", b"1").status == 200
    assert len(_Handler.connections) == 1


def test_a_connection_closed_while_idle_is_replaced(server):
    with Session(server) as s:
        assert s.request("POST", "/close-after", b"1").status == 200
        assert s.request("POST", "/x", b"22").json() == {"echo": 2}
    assert len(_Handler.connections) == 2


def test_no_server_is_no_answer():
    with pytest.raises(NoAnswer, match="POST http://127.0.0.1"):
        request("POST", f"http://127.0.0.1:{free_port()}/x", b"1", timeout=5)


def test_a_silent_server_is_no_answer_after_the_timeout():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        with pytest.raises(NoAnswer, match="timed out"):
            request("GET", f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.5)


def test_multipart_is_what_a_standard_parser_reads():
    body, ctype = multipart({"a": ("a.png", b"\x89PNG\r\n--x", "image/png"), "b": ("b.txt", b"hi", "text/plain")})
    msg = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
    assert parts["a"].get_payload(decode=True) == b"\x89PNG\r\n--x"
    assert parts["a"].get_content_type() == "image/png" and parts["b"].get_payload(decode=True) == b"hi"


def test_wait_until_ok_answers_true_once_ready_and_false_when_dead_or_late(server):
    assert wait_until_ok(server + "/x", timeout=10)
    assert not wait_until_ok(server + "/status/503", timeout=0.5)
    calls = []
    assert not wait_until_ok(server + "/status/503", timeout=60, alive=lambda: calls.append(1) or len(calls) < 3)
    assert len(calls) == 3  # gave up as soon as the process was gone, not after 60 s
    assert not wait_until_ok(f"http://127.0.0.1:{free_port()}/", timeout=0.5)
