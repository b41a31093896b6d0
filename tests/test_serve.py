"""`paligemma serve`'s HTTP API on the demo model (FastAPI TestClient): every answer is what the
Python API gives for the same input; errors, limits, API key, queue and timeout.

Shared helpers (`data_url`, `scene_image`, `chat_body`, `forced_output`) are imported
by test_serve_load.py and test_serve_page.py.
"""

import asyncio
import base64
import io
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi) is not installed")
pytest.importorskip("pycocotools", reason="the [serve] extra (pycocotools) is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402

from paligemma import cli  # noqa: E402
from paligemma.api import PaliGemma  # noqa: E402
from paligemma.demo import scenes  # noqa: E402
from paligemma.image import preprocess, to_rgb_array  # noqa: E402
from paligemma.segmentation import load_mask_decoder  # noqa: E402
from paligemma.serve.app import ServeConfig, create_app  # noqa: E402
from paligemma.serve.engine import Engine, Sampling, ShuttingDown  # noqa: E402
from paligemma.tasks import parse_detections, parse_segments  # noqa: E402

VAE = Path(__file__).parents[1] / "parity_tests" / "data" / "seg_vae" / "params.npz"


def scene_image(seed: int, size: tuple[int, int] = (448, 448)) -> PIL.Image.Image:
    """A demo scene (the model was trained on these), stretched to `size` (width, height)."""
    return scenes.draw_scene(random.Random(seed), 448).image.resize(size)


def data_url(image: PIL.Image.Image | bytes, mime: str = "image/png") -> str:
    if isinstance(image, PIL.Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = buffer.getvalue()
    return f"data:{mime};base64," + base64.b64encode(image).decode()


def chat_body(url: str, prompt: str, **options) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}],
        **options}


@contextmanager
def forced_output(pg: PaliGemma, text: str):
    """Makes the model's logits pick `text` then eos, one token per logits call (one request
    at a time), whatever the weights say."""
    ids = iter(pg.tokenizer.encode(text))
    original = pg.model.decoder.logits

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(original(hidden))
        out[:, next(ids, pg.tokenizer.eos_id)] = 100.0
        return out

    pg.model.decoder.logits = logits
    try:
        yield
    finally:
        del pg.model.decoder.logits


@pytest.fixture(scope="module")
def client(demo_pg):
    with TestClient(create_app(demo_pg, ServeConfig(model_id="demo"))) as c:
        yield c


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == status
    return body["message"]


# -- answers equal the Python API -------------------------------------------------------------

def test_models_lists_the_model_and_its_tasks(client):
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == "demo" and model["image_size"] == 112
    assert "detect" in model["tasks"] and "segment" not in model["tasks"]  # no VAE


@pytest.mark.parametrize("prompt", ["caption en", "answer en how many shapes are there"])
def test_chat_completion_is_the_greedy_generation(demo_pg, client, prompt):
    image = scene_image(3)
    expected = demo_pg.generate(image, prompt, max_new_tokens=20)
    response = client.post("/v1/chat/completions",
                           json=chat_body(data_url(image), prompt, max_tokens=20))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(expected.tokens)
    n_text = len(demo_pg.tokenizer.prompt(prompt)[0])
    assert body["usage"]["prompt_tokens"] == 49 + n_text  # (112 / 16)^2 image tokens


def test_sampling_settings_are_used_and_seeded(demo_pg, client):
    image, prompt = scene_image(4), "caption en"
    options = dict(temperature=2.0, top_p=0.9, seed=0)
    expected = demo_pg.generate(image, prompt, max_new_tokens=12, **options)
    answers = {client.post("/v1/chat/completions", json=chat_body(
        data_url(image), prompt, max_tokens=12, **options)).json()["choices"][0]["message"][
        "content"] for _ in range(2)}
    assert answers == {expected.text}
    greedy = demo_pg.generate(image, prompt, max_new_tokens=12).text
    assert expected.text != greedy  # the settings did something


def test_max_tokens_cuts_with_finish_reason_length(client):
    body = client.post("/v1/chat/completions", json=chat_body(
        data_url(scene_image(3)), "caption en", max_tokens=2)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_stream_sends_the_same_text_as_server_sent_events(demo_pg, client):
    image, prompt = scene_image(5), "caption en"
    expected = demo_pg.generate(image, prompt, max_new_tokens=20)
    with client.stream("POST", "/v1/chat/completions", json=chat_body(
            data_url(image), prompt, max_tokens=20, stream=True)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected.text and len(chunks) > 3  # token by token, not one blob
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.tokens)


def test_detect_gives_boxes_in_pixels_of_the_image_sent(demo_pg, client):
    image = scene_image(1, size=(600, 300))  # not square: x and y scale differently
    text = demo_pg.generate(image, "detect circle ; star", max_new_tokens=64).text
    expected = [o.to_json() for o in parse_detections(text, 600, 300)]
    response = client.post("/v1/detect", json={"image": data_url(image),
                                                "objects": ["circle", "star"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["text"], body["width"], body["height"]) == (text, 600, 300)
    assert body["objects"] == expected and len(expected) >= 1
    assert body["prompt"] == "detect circle ; star"


def test_segment_masks_as_png_and_rle(demo_pg):
    pg = PaliGemma(demo_pg.model, demo_pg.tokenizer, vae=load_mask_decoder(VAE))
    output = "<loc0100><loc0200><loc0700><loc0900>" + "".join(
        f"<seg{c:03d}>" for c in [0, 68, 84, 96, 33, 73, 18, 28, 47, 32, 6, 41, 9, 119, 42, 127]
    ) + " circle"
    image = scene_image(2, size=(320, 240))
    (expected,) = parse_segments(output, 320, 240, pg.vae)
    with TestClient(create_app(pg)) as client:
        assert "segment" in client.get("/v1/models").json()["data"][0]["tasks"]
        masks = {}
        for fmt in ("png", "rle"):
            with forced_output(pg, output):
                response = client.post("/v1/segment", json={
                    "image": data_url(image), "object": "circle", "mask_format": fmt})
            assert response.status_code == 200, response.text
            (obj,) = response.json()["objects"]
            assert obj["label"] == "circle" and obj["box"] == expected.to_json()["box"]
            masks[fmt] = obj["mask"]
    png = masks["png"].removeprefix("data:image/png;base64,")
    decoded = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(png)))).astype(bool)
    np.testing.assert_array_equal(decoded, expected.mask)
    rle = {"size": masks["rle"]["size"], "counts": masks["rle"]["counts"].encode()}
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), expected.mask)
    assert 0.05 < expected.mask.mean() < 0.95  # a real mask


def test_explain_gives_the_maps_of_the_python_api(demo_pg, client):
    image = scene_image(6)
    expected = demo_pg.explain(to_rgb_array(image), "caption en", max_new_tokens=20)
    body = client.post("/v1/explain", json={"image": data_url(image), "prompt": "caption en",
                                            "max_tokens": 20}).json()
    assert body["text"] == expected.text and body["pieces"] == expected.pieces
    assert body["grid"] == 7
    np.testing.assert_allclose(np.array(body["maps"]), expected.maps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(body["mean"]), expected.maps.mean(0), atol=1e-5,
                               rtol=0)
    heatmap = base64.b64decode(body["heatmap"].removeprefix("data:image/png;base64,"))
    assert PIL.Image.open(io.BytesIO(heatmap)).format == "PNG"


def test_page_and_openapi_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "/v1/detect" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/detect", "/v1/segment", "/v1/explain",
            "/v1/models"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_concurrent_requests_share_the_batch_and_get_what_they_get_alone(demo_pg):
    """Eight requests with their own settings and lengths queue while the model is busy, then
    decode four at a time: later ones join as earlier ones leave."""
    settings = [(0.0, None, None, 20), (2.0, 0.9, 0, 12), (0.0, None, None, 3),
                (1.5, None, 7, 16), (0.0, None, None, 9), (2.0, 0.95, 4, 20),
                (1.0, 0.8, 2, 5), (0.0, None, None, 20)]
    prompts = ["caption en", "caption en", "answer en how many shapes are there",
               "detect circle", "answer en what color is the star", "caption en",
               "detect star ; square", "detect triangle"]
    images = [scene_image(10 + i) for i in range(8)]
    expected = [demo_pg.generate(im, p, max_new_tokens=n, temperature=t, top_p=tp, seed=sd).text
                for im, p, (t, tp, sd, n) in zip(images, prompts, settings, strict=True)]
    with TestClient(create_app(demo_pg, ServeConfig(max_batch=4))) as client:
        engine = client.app.state.engine
        batches = []
        step = engine.scheduler.step
        engine.scheduler.step = lambda: [batches.append(
            {id(r) for r in engine.scheduler._rows}), step()][1]
        bodies = [chat_body(data_url(im), p, temperature=t, top_p=tp, seed=sd, max_tokens=n)
                  for im, p, (t, tp, sd, n) in zip(images, prompts, settings, strict=True)]
        with ThreadPoolExecutor(8) as pool:
            with blocked_engine(client):
                futures = [pool.submit(client.post, "/v1/chat/completions", json=b)
                           for b in bodies]
                while engine.load < 9:  # all eight queued behind the blocker
                    time.sleep(0.01)
            answers = [f.result().json()["choices"][0]["message"]["content"] for f in futures]
    assert answers == expected
    sizes = [len(b) for b in batches]
    assert max(sizes) == 4  # batched, never more than max_batch
    joined_midway = [b for before, b in pairwise(batches) if before and b - before
                     and before & b]
    assert joined_midway  # a row joined a batch whose other rows kept decoding


# -- errors and limits ------------------------------------------------------------------------

@pytest.mark.parametrize("image, problem", [
    ("https://example.com/cat.png", "never fetches URLs"),
    ("file:///etc/passwd", "never fetches URLs"),
    ("/etc/passwd", "not a base64 data URL"),
    ("data:image/png;base64,%%%%", "invalid base64"),
    (data_url(b"not an image at all"), "not an image"),
    (data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "not an image"),
    (data_url(b""), "empty image"),
])
def test_images_are_only_inline_data(client, image, problem):
    response = client.post("/v1/detect", json={"image": image, "objects": "circle"})
    assert problem in error_of(response, 400)
    assert response.json()["error"]["param"] == "image"


@pytest.mark.parametrize("body, status, problem", [
    ({"objects": "circle"}, 400, "image: Field required"),
    ({"image": "x", "objects": ""}, 400, "objects"),
    ({"image": "x", "objects": "circle", "max_tokens": 0}, 400, "max_tokens"),
    ({"image": "x", "objects": "circle", "max_tokens": 10_000}, 400, "server's limit"),
    ({"image": "x", "objects": " ".join(["circle"] * 300)}, 400, "tokens, over"),
])
def test_bad_fields_name_the_field(client, body, status, problem):
    if body.get("image") == "x":
        body["image"] = data_url(scene_image(1))
    assert problem in error_of(client.post("/v1/detect", json=body), status)


def test_chat_needs_one_user_message_with_one_image(client):
    url = data_url(scene_image(1))
    two_turns = chat_body(url, "caption en")
    two_turns["messages"] *= 2
    no_image = {"messages": [{"role": "user", "content": "caption en"}]}
    for body, problem in [(two_turns, "one user message"), (no_image, "exactly one image_url"),
                          (chat_body(url, "  "), "task prefix"),
                          (chat_body(url, "caption en", n=2), "n:"),
                          (chat_body(url, "caption en", temperature=-1), "temperature")]:
        assert problem in error_of(client.post("/v1/chat/completions", json=body), 400)


def test_not_json_and_unknown_routes_are_json_errors(client):
    assert "JSON" in error_of(client.post("/v1/detect", content=b"{nope",
                                          headers={"content-type": "application/json"}), 400)
    error_of(client.get("/v1/nothing"), 404)
    error_of(client.get("/v1/detect"), 405)


def test_size_limits_give_413(demo_pg):
    small = ServeConfig(max_image_bytes=4000, max_image_pixels=100 * 100)
    with TestClient(create_app(demo_pg, small)) as client:
        big_pixels = data_url(PIL.Image.new("RGB", (200, 100)))  # a few hundred bytes
        assert "over the server's limit of 10000 pixels" in error_of(
            client.post("/v1/detect", json={"image": big_pixels, "objects": "x"}), 413)
        noise = PIL.Image.fromarray(np.random.default_rng(0).integers(
            0, 255, (60, 60, 3), dtype=np.uint8))
        assert "bytes" in error_of(client.post("/v1/detect", json={
            "image": data_url(noise), "objects": "x"}), 413)
        assert "request body" in error_of(client.post(
            "/v1/detect", content=b"x" * 100_000, headers={"content-type": "application/json"}),
            413)
        chunks = (b"x" * 10_000 for _ in range(10))  # no Content-Length: counted as it comes
        error_of(client.post("/v1/detect", content=chunks,
                             headers={"content-type": "application/json"}), 413)


def test_api_key_is_required_on_v1_when_set(demo_pg):
    with TestClient(create_app(demo_pg, ServeConfig(api_key="s3cret"))) as client:
        assert "API key" in error_of(client.get("/v1/models"), 401)
        error_of(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/").status_code == 200  # the page itself; it sends the key


@contextmanager
def blocked_engine(client: TestClient):
    """Occupies the model's thread with a job that waits until the block is released."""
    release = threading.Event()
    engine = client.app.state.engine
    client.portal.call(lambda: engine.call(lambda: release.wait(30)))
    try:
        yield engine
    finally:
        release.set()


def test_full_queue_gives_429_and_frees_up(demo_pg):
    with TestClient(create_app(demo_pg, ServeConfig(max_queue=1))) as client:
        body = {"image": data_url(scene_image(1)), "objects": "circle"}
        with blocked_engine(client):
            response = client.post("/v1/detect", json=body)
            assert "server busy" in error_of(response, 429)
            assert response.headers["retry-after"] == "1"
        assert client.post("/v1/detect", json=body).status_code == 200


def test_timeout_gives_504_and_drops_the_work(demo_pg):
    # long enough for the second request to finish on a busy 2-core machine
    with TestClient(create_app(demo_pg, ServeConfig(timeout=2.0))) as client:
        url = data_url(scene_image(1))
        with blocked_engine(client) as engine:
            assert "timed out" in error_of(client.post(
                "/v1/chat/completions", json=chat_body(url, "caption en")), 504)
            assert engine.load == 2  # the blocker and the abandoned request
        ok = client.post("/v1/chat/completions", json=chat_body(url, "caption en"))
        assert ok.status_code == 200 and engine.load == 0


def test_shutdown_fails_cleanly_what_cannot_finish_in_time(demo_pg):
    pixels = preprocess([to_rgb_array(scene_image(1))], 112)[0]

    async def scenario():
        engine = Engine(demo_pg)
        engine.start()
        release = threading.Event()
        blocker = engine.call(lambda: release.wait(30) and "released")
        waiting = engine.generate(pixels, "caption en", Sampling(8))
        stopping = asyncio.get_running_loop().run_in_executor(None, engine.shutdown, 0.2)
        await asyncio.sleep(0.5)  # the grace period is over while the blocker runs
        with pytest.raises(ShuttingDown):
            engine.generate(pixels, "caption en", Sampling(8))  # no new work
        release.set()
        await stopping
        assert (await blocker.result()).value == "released"  # running work finished
        with pytest.raises(ShuttingDown, match="shut down before this request finished"):
            await waiting.result()
        assert engine.load == 0

    asyncio.run(scenario())


# -- the command line -------------------------------------------------------------------------

def test_serve_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--vae", "--host", "--port", "--api-key", "--max-queue",
                 "--timeout", "--max-image-bytes", "127.0.0.1"):
        assert flag in out


def test_serve_refuses_a_missing_model(capsys, tmp_path):
    assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "no such model directory" in capsys.readouterr().err
