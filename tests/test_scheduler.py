"""Continuous batching: every row gets what it would get alone (greedy and seeded sampling),
whatever joins or leaves the batch around it."""

import threading

import pytest
import torch
from test_api import gold_case, gold_prompts

from paligemma.generate import generate
from paligemma.scheduler import Request, Scheduler

SETTINGS = [  # (temperature, top_p, seed, max_new_tokens): greedy and sampled, mixed lengths
    (0.0, None, None, 4), (1.0, 0.9, 3, 13), (0.0, None, None, 11), (0.8, None, 5, 6),
    (1.2, 0.95, 7, 9),
]


def alone(pg, request: Request) -> tuple[list[int], torch.Tensor]:
    """Tokens (eos excluded) and logits of `request` generated as a batch of one."""
    image = request.image if isinstance(request.image, torch.Tensor) else None
    inputs = pg._prepare([request.image] if image is None else image[None], [request.prompt],
                         [request.suffix], request.max_new_tokens)
    sampler = pg._sampler(request.temperature, request.top_k, request.top_p, request.seed)
    tokens, logits = generate(pg.model, *inputs, request.max_new_tokens, sampler,
                              pg.tokenizer.eos_id)
    return pg._until_eos(tokens[0].tolist()), logits[0]


def check_alone(pg, requests: list[Request], max_batch: int) -> list:
    done = list(Scheduler(pg, max_batch).run(requests))
    assert sorted(h.id for h in done) == [r.id for r in requests]
    for handle in done:
        tokens, logits = alone(pg, handle.request)
        assert handle.tokens == tokens, handle.id
        assert handle.finish_reason == ("length" if len(tokens) == handle.request.max_new_tokens
                                        else "eos")
        torch.testing.assert_close(torch.stack(handle.logits), logits[: len(handle.logits)],
                                   atol=1e-4, rtol=1e-5)  # float32 summation order only
    return done


@pytest.mark.parametrize("case", ["pg1_tiny", "pg2_tiny"])
def test_rows_of_gold_checkpoints_equal_generating_alone(case):
    pg, vec = gold_case(case)
    images = torch.from_numpy(vec["image"]).permute(0, 3, 1, 2)
    prefixes, suffixes = gold_prompts(pg, vec)  # two prompt lengths, one with a suffix
    requests = [
        Request(images[i % 2], prefixes[i % 2], suffixes[i % 2], max_new_tokens=n,
                temperature=t, top_p=p, seed=s, return_logits=True, id=i)
        for i, (t, p, s, n) in enumerate(SETTINGS * 2)
    ]
    check_alone(pg, requests, max_batch=3)  # 10 rows through 3: rows join as others leave


def test_demo_captions_leave_on_eos_and_equal_generating_alone(demo_pg, demo_scenes):
    prompts = ["caption en", "answer en how many shapes are there", "detect circle"]
    requests = [Request(image, prompts[i % 3], max_new_tokens=24, return_logits=True, id=i)
                for i, image in enumerate(demo_scenes(9))]
    done = check_alone(demo_pg, requests, max_batch=4)
    assert "eos" in {h.finish_reason for h in done}
    assert len({len(h.tokens) for h in done}) > 2  # the rows really left at different steps


def test_events_stream_each_rows_tokens_and_one_finish(demo_pg, demo_scenes):
    sched = Scheduler(demo_pg, max_batch=2)
    handles = [sched.submit(Request(im, "caption en", id=i))
               for i, im in enumerate(demo_scenes(3))]
    streamed = {h.id: [] for h in handles}
    finished = []
    while sched.has_work():
        for event in sched.step():
            if event.token is not None:
                streamed[event.handle.id].append(event.token)
            if event.finished:
                finished.append(event.handle.id)
    assert sorted(finished) == [0, 1, 2]
    assert all(streamed[h.id] == h.tokens and h.done for h in handles)


def test_cancel_ends_one_row_and_leaves_the_others_exact(demo_pg, demo_scenes):
    images = demo_scenes(3, seed=1)
    sched = Scheduler(demo_pg, max_batch=3)
    handles = [sched.submit(Request(im, "caption en", max_new_tokens=20)) for im in images]
    queued = sched.submit(Request(images[0], "caption en"))
    sched.step()
    handles[1].cancel()
    queued.cancel()
    while sched.has_work():
        sched.step()
    assert handles[1].finish_reason == queued.finish_reason == "cancelled"
    assert len(handles[1].tokens) == 1 and queued.tokens == []
    for h in (handles[0], handles[2]):
        assert h.tokens == alone(demo_pg, h.request)[0]


def test_bad_requests_raise_at_submit(demo_pg, demo_scenes, tmp_path):
    sched = Scheduler(demo_pg, max_batch=2)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sched.submit(Request(tmp_path / "missing.png", "caption en"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.submit(Request(demo_scenes(1)[0], "caption en", max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        sched.submit(Request(demo_scenes(1)[0], "caption en", temperature=1.0, top_p=2.0))
    assert not sched.has_work()


def test_submit_from_another_thread_while_a_worker_steps(demo_pg, demo_scenes):
    sched = Scheduler(demo_pg, max_batch=2)
    stop, results = threading.Event(), {}

    def worker():
        while not stop.is_set():
            if sched.wait(timeout=0.05):
                for event in sched.step():
                    if event.finished:
                        results[event.handle.id] = event.handle.tokens

    thread = threading.Thread(target=worker)
    thread.start()
    images = demo_scenes(4, seed=2)
    handles = [sched.submit(Request(im, "caption en", id=i)) for i, im in enumerate(images)]
    while len(results) < len(handles) and thread.is_alive():
        threading.Event().wait(0.02)
    stop.set()
    thread.join()
    assert results == {h.id: alone(demo_pg, h.request)[0] for h in handles}
