"""A bounded load test against a real uvicorn server on 127.0.0.1 (demo model): clients send
good, malformed and abandoned requests at once; every good request gets its own answer, none is
lost, abandoned work is dropped, the server stays up. Also: graceful shutdown of
`paligemma serve` in a subprocess."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the [serve] extra (uvicorn) is not installed")
pytest.importorskip("httpx", reason="httpx is not installed")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from test_serve import chat_body, data_url, forced_output, scene_image  # noqa: E402

from paligemma.serve.app import ServeConfig, create_app  # noqa: E402

CLIENTS, REQUESTS = 6, 6  # 36 requests in all
MAX_TOKENS = 12


@contextmanager
def running_server(app):
    """uvicorn serving `app` on a free 127.0.0.1 port, in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def raw_request(base: str, path: str, body: dict) -> socket.socket:
    """Sends a POST over a bare socket (so the test can hang up whenever it likes)."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)))
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def test_many_clients_good_bad_and_abandoned_requests(demo_pg):
    # Distinct (image, prompt) pairs whose answers differ, so a mixed-up answer shows.
    cases = {}
    for i in range(4):
        image = scene_image(100 + i)
        for prompt in ("caption en", "answer en how many shapes are there"):
            text = demo_pg.generate(image, prompt, max_new_tokens=MAX_TOKENS).text
            cases.setdefault(text, (data_url(image), prompt))
    cases = [(url, prompt, text) for text, (url, prompt) in cases.items()]
    assert len(cases) >= 5
    # A sampled request that runs long alone, to abandon half way.
    long_body = chat_body(cases[0][0], "caption en", temperature=2.0, seed=0, max_tokens=200,
                          stream=True)
    app = create_app(demo_pg, ServeConfig(max_batch=8, max_queue=64, timeout=120))
    engine = app.state.engine
    outcomes: Counter[str] = Counter()
    problems: list[str] = []

    def client(worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=base, timeout=120) as http:
            for _ in range(REQUESTS):
                url, prompt, expected = rng.choice(cases)
                kind = rng.choice(["chat", "chat", "stream", "malformed", "hangup"])
                if kind == "chat":
                    r = http.post("/v1/chat/completions",
                                  json=chat_body(url, prompt, max_tokens=MAX_TOKENS))
                    got = r.json()["choices"][0]["message"]["content"] if r.is_success else r
                elif kind == "stream":
                    with http.stream("POST", "/v1/chat/completions", json=chat_body(
                            url, prompt, max_tokens=MAX_TOKENS, stream=True)) as r:
                        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
                    got = "".join(json.loads(x)["choices"][0]["delta"].get("content", "")
                                  for x in lines[:-1]) if lines[-1:] == ["[DONE]"] else lines
                elif kind == "malformed":
                    body = rng.choice([chat_body("data:image/png;base64,!!", prompt),
                                       chat_body("http://example.com/x.png", prompt),
                                       {"messages": []}, chat_body(url, prompt, max_tokens=-1)])
                    r = http.post("/v1/chat/completions", json=body)
                    got, expected = (r.status_code, "error" in r.json()), (400, True)
                else:  # hang up: right away, or after the first streamed bytes
                    conn = raw_request(base, "/v1/chat/completions", long_body)
                    if rng.random() < 0.5:
                        conn.recv(1)
                    conn.close()
                    outcomes[kind] += 1
                    continue
                outcomes[kind] += 1
                if got != expected:
                    problems.append(f"{kind} {prompt!r}: got {got!r}, expected {expected!r}")

    with running_server(app) as base:
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 30
        while engine.load and time.monotonic() < deadline:  # abandoned rows are retired
            time.sleep(0.05)
        health = httpx.get(f"{base}/health").json()
        after = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                           json=chat_body(cases[0][0], cases[0][1], max_tokens=MAX_TOKENS))
    print(f"{sum(outcomes.values())} requests from {CLIENTS} clients in {elapsed:.1f} s: "
          f"{dict(outcomes)}; server: {health}")
    assert problems == []  # no lost, failed or mixed-up answers
    assert sum(outcomes.values()) == CLIENTS * REQUESTS
    assert health["in_progress"] == 0 and health["failed"] == 0
    good = outcomes["chat"] + outcomes["stream"]
    # A hang-up may finish, be cancelled, or end before its request reached the model.
    assert good <= health["done"] <= good + outcomes["hangup"]
    assert health["done"] + health["cancelled"] <= good + outcomes["hangup"]
    assert after.json()["choices"][0]["message"]["content"] == cases[0][2]  # still serving


def test_a_client_that_hangs_up_mid_stream_has_its_row_dropped(demo_pg):
    app = create_app(demo_pg)
    with running_server(app) as base, forced_output(demo_pg, "<loc0001>" * 150):
        conn = raw_request(base, "/v1/chat/completions", chat_body(
            data_url(scene_image(100)), "caption en", max_tokens=200, stream=True))
        received = b""
        while received.count(b"data: ") < 3:  # the role chunk and two tokens
            received += conn.recv(4096)
        conn.close()
        deadline = time.monotonic() + 30
        while app.state.engine.load and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(f"{base}/health").json()
    assert health["cancelled"] == 1 and health["done"] == 0 and health["in_progress"] == 0


def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "paligemma", "serve", "--port", str(port), "--log-level",
         "info"], stderr=log.open("w"), env=env, cwd=Path(__file__).parents[1])
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        body = chat_body(data_url(scene_image(100)), "caption en", temperature=2.0, seed=0,
                         max_tokens=200, stream=True)
        assert httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False},
                          timeout=120).status_code == 200  # warm: the next one runs at speed
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the role chunk: the request is admitted (24 tokens to go alone)
            server.send_signal(signal.SIGTERM)
            rest = []
            try:
                rest += [x for x in lines if x]
            except httpx.TransportError as e:
                pytest.fail(f"stream cut ({e}) after {rest}; server log:\n{log.read_text()}")
        assert rest[-1] == "data: [DONE]"  # finished, not cut off
        assert len(rest) > 10  # tokens kept coming after the signal
        # uvicorn re-raises the signal once it has shut down gracefully
        assert server.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_openai_client_talks_to_the_server(demo_pg):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    image = scene_image(1)
    expected = demo_pg.generate(image, "caption en").text
    sampled = demo_pg.generate(image, "caption en", max_new_tokens=20, temperature=2.0,
                               top_p=0.9, seed=0).text
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "caption en"}]}]
    with running_server(create_app(demo_pg, ServeConfig(model_id="paligemma-demo"))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["paligemma-demo"]
        reply = client.chat.completions.create(model="paligemma-demo", messages=messages)
        assert reply.choices[0].message.content == expected
        chunks = client.chat.completions.create(
            model="paligemma-demo", messages=messages, stream=True, max_tokens=20,
            temperature=2.0, top_p=0.9, seed=0)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == sampled
        with pytest.raises(openai.BadRequestError, match="exactly one image_url"):
            client.chat.completions.create(model="paligemma-demo", messages=[
                {"role": "user", "content": "caption en"}])
