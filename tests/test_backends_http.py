"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 whose
answers each test scripts (a stub: a real model server would not be
deterministic, and could not be made to fail on cue)."""
import base64
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from stages.backends.base import IMAGE_MARKER, GenRequest
from stages.backends.openai_http import OpenAIGenerator, parse_chat_response
from tests import job_runs

HANG = object()  # a behaviour's answer meaning: never answer
SECRET = "sk-test-5f2b9c0e-do-not-leak"


class StubServer:
    """behaviour(call_index, body, headers) -> (status, headers, body) or HANG."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.calls = []  # (arrival time, request body as JSON, request headers)
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    index = len(stub.calls)
                    # header names as lower case: HTTP names are case-insensitive and clients differ
                    stub.calls.append((time.monotonic(), body, {k.lower(): v for k, v in self.headers.items()}))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    answer = stub.behaviour(index, body, self.headers)
                    if answer is HANG:
                        stub.release.wait(10)
                        return
                    status, headers, payload = answer
                    if not isinstance(payload, bytes):
                        payload = json.dumps(payload).encode()
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def bodies(self):
        return [body for _, body, _ in self.calls]


@pytest.fixture
def serve():
    servers = []

    def start(behaviour):
        servers.append(StubServer(behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def user_text(body) -> str:
    content = body["messages"][0]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def completion(texts, finish="stop", usage=None, **message_extra):
    body = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": t, **message_extra}, "finish_reason": finish}
            for i, t in enumerate(texts)
        ],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": usage, "total_tokens": 5 + usage}
    return 200, {"Content-Type": "application/json"}, body


def honours_n(index, body, headers):
    """One choice per n, each naming the seed it would come from (vLLM: seed + i)."""
    n = body.get("n", 1)
    seed = body.get("seed")
    texts = [f"seed {seed + i if seed is not None else None} for {user_text(body)}" for i in range(n)]
    return completion(texts, usage=4 * n)


def ok(index, body, headers):
    return completion([f"answer to {user_text(body)}"])


def request(prompt="Query: a dog", seeds=(11, 12, 13), image=None, **kw):
    return GenRequest(
        prompt=prompt, image=image, seeds=list(seeds), temperature=kw.get("temperature", 0.7),
        top_p=kw.get("top_p", 0.9), max_new_tokens=kw.get("max_new_tokens", 32),
    )


def fast(url, **kw):
    """A client that gives up on a silent server soon. Retries wait what the openai client waits (0.5 s, then
    doubling, or Retry-After): pairsel does not set the backoff."""
    return OpenAIGenerator("stub-model", base_url=url, **{"timeout_s": 5, **kw})


# -- normal answers -----------------------------------------------------------


def test_n_mode_one_call_per_request(serve):
    server = serve(honours_n)
    gen = fast(server.url, max_in_flight=4)
    assert gen.model_id == f"openai:stub-model@{server.url}"
    out = gen.generate([request("Query: a dog"), request("Query: a cat", seeds=[7, 8])])
    assert [[g.text for g in gens] for gens in out] == [
        ["seed 11 for Query: a dog", "seed 12 for Query: a dog", "seed 13 for Query: a dog"],
        ["seed 7 for Query: a cat", "seed 8 for Query: a cat"],
    ]
    assert all(g.finish_reason == "stop" and g.error is None for gens in out for g in gens)
    # usage.completion_tokens (12 for n=3) shared in proportion to length: equal-length texts
    assert [g.tokens for g in out[0]] == [4, 4, 4]
    bodies = sorted(server.bodies(), key=lambda b: b["seed"])
    assert len(bodies) == 2
    assert bodies[0]["n"] == 2 and bodies[0]["seed"] == 7
    assert bodies[1] == {
        "model": "stub-model",
        "messages": [{"role": "user", "content": "Query: a dog"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 32,
        "n": 3,
        "seed": 11,
    }


def test_per_seed_mode_keeps_seed_order(serve):
    def slower_for_smaller_seeds(index, body, headers):
        time.sleep(0.03 * (20 - body["seed"]))  # seed 11 answers last
        return completion([f"seed {body['seed']}"])

    server = serve(slower_for_smaller_seeds)
    out = fast(server.url, use_n=False).generate([request(seeds=[11, 12, 13]), request(seeds=[14])])
    assert [[g.text for g in gens] for gens in out] == [["seed 11", "seed 12", "seed 13"], ["seed 14"]]
    assert sorted(b["seed"] for b in server.bodies()) == [11, 12, 13, 14]
    assert all("n" not in b for b in server.bodies())
    # no usage in the answers: whitespace tokens
    assert out[0][0].tokens == 2


def test_server_that_ignores_n_falls_back_to_one_call_per_seed(serve):
    def one_choice_only(index, body, headers):
        return completion([f"seed {body['seed']}"], usage=3)

    server = serve(one_choice_only)
    gen = fast(server.url, max_in_flight=1)
    out = gen.generate([request(seeds=[1, 2, 3]), request(seeds=[4, 5])])
    assert [[g.text for g in gens] for gens in out] == [["seed 1", "seed 2", "seed 3"], ["seed 4", "seed 5"]]
    assert [g.tokens for g in out[0]] == [3, 3, 3]
    # the first request goes with n; the second too if it left before the first answer came back (the
    # worker thread and the submitting thread race: either is right); then one call per seed
    sent = [b.get("n") for b in server.bodies()]
    assert sent in ([3, 2] + [None] * 5, [3] + [None] * 5), sent
    out = gen.generate([request(seeds=[6, 7])])
    assert [g.text for g in out[0]] == ["seed 6", "seed 7"]
    # later batches do not try n again
    assert [b.get("n") for b in server.bodies()[len(sent):]] == [None, None]


def test_send_seed_off_and_extra_body(serve):
    server = serve(honours_n)
    gen = fast(server.url, send_seed=False, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    out = gen.generate([request(seeds=[1, 2])])
    (body,) = server.bodies()
    assert "seed" not in body and body["n"] == 2
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert [g.text for g in out[0]] == ["seed None for Query: a dog"] * 2
    # the client merges extra_body over the request: what pairsel sets stays pairsel's
    gen = fast(server.url, extra_body={"seed": 99, "max_tokens": 1, "top_k": 5})
    gen.generate([request(seeds=[1, 2])])
    body = server.bodies()[1]
    assert (body["seed"], body["max_tokens"], body["top_k"]) == (1, 32, 5)


def test_max_in_flight_bounds_concurrency(serve):
    def slow(index, body, headers):
        time.sleep(0.15)
        return completion(["x"])

    server = serve(slow)
    out = fast(server.url, max_in_flight=2, use_n=False).generate([request(seeds=[k]) for k in range(6)])
    assert all(gens[0].text == "x" for gens in out)
    assert server.max_in_flight == 2


def test_finish_reason_tokens_and_reasoning(serve):
    answers = iter(
        [
            completion(["cut off here"], finish="length", usage=9),
            completion(["filtered"], finish="content_filter"),
            completion(["The answer."], reasoning_content="I look at the query."),
            completion([None]),
        ]
    )
    server = serve(lambda index, body, headers: next(answers))
    gen = fast(server.url, max_in_flight=1, use_n=False)
    out = gen.generate([request(seeds=[1]) for _ in range(4)])
    length, filtered, reasoned, empty = (gens[0] for gens in out)
    assert (length.text, length.finish_reason, length.tokens) == ("cut off here", "length", 9)
    assert (filtered.finish_reason, filtered.tokens) == ("content_filter", 1)
    assert reasoned.text == "<think>I look at the query.</think>The answer."
    assert (empty.text, empty.finish_reason, empty.error) == ("", "stop", None)


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def test_images_arrive_as_data_urls_where_the_marker_was(serve):
    server = serve(ok)
    red = Image.new("RGB", (7, 5), (200, 10, 30))
    red.putpixel((3, 2), (1, 2, 3))
    gray = Image.new("L", (4, 4), 99)
    prompts = [
        f"Look at {IMAGE_MARKER} and say what it shows.",
        "No marker here.",
        f"Marker {IMAGE_MARKER} but no image.",
    ]
    images = [red, gray, None]
    gen = fast(server.url, use_n=False, max_in_flight=1)
    out = gen.generate([request(p, seeds=[1], image=im) for p, im in zip(prompts, images)])
    assert all(gens[0].error is None for gens in out)
    first, second, third = (b["messages"][0]["content"] for b in server.bodies())
    assert [p["type"] for p in first] == ["text", "image_url", "text"]
    # the text around the image as it is, as every backend sees it (stages/backends/prompt_text.py)
    assert (first[0]["text"], first[2]["text"]) == ("Look at ", " and say what it shows.")
    sent = decode_data_url(first[1]["image_url"]["url"])
    assert sent.size == (7, 5) and sent.convert("RGB").getpixel((3, 2)) == (1, 2, 3)
    # no marker: the image goes first
    assert [p["type"] for p in second] == ["image_url", "text"] and second[1]["text"] == "\nNo marker here."
    assert decode_data_url(second[0]["image_url"]["url"]).getpixel((1, 1)) == 99
    # no image: plain text, marker gone
    assert third == "Marker  but no image."
    assert IMAGE_MARKER not in json.dumps(server.bodies())


def test_empty_inputs(serve):
    server = serve(ok)
    gen = fast(server.url)
    assert gen.generate([]) == []
    assert gen.generate([request(seeds=[])]) == [[]]
    assert server.calls == []


# -- the API key --------------------------------------------------------------


def test_api_key_is_sent_and_never_leaks(serve, monkeypatch, caplog):
    monkeypatch.setenv("PAIRSEL_TEST_KEY", SECRET)

    def echo_auth_on_errors(index, body, headers):
        text = user_text(body)
        if "bad" in text:  # a careless server echoing the request headers back
            return 400, {}, f"rejected request with Authorization: {headers['Authorization']}".encode()
        if "flaky" in text:
            return 503, {}, f"busy; you sent {headers['Authorization']}".encode()
        return completion(["fine"])

    server = serve(echo_auth_on_errors)
    gen = fast(server.url, api_key_env="PAIRSEL_TEST_KEY", max_retries=1, use_n=False)
    with caplog.at_level(logging.DEBUG):
        out = gen.generate([request("good", seeds=[1]), request("bad", seeds=[1]), request("flaky", seeds=[1])])
    assert {headers["authorization"] for _, _, headers in server.calls} == {f"Bearer {SECRET}"}
    good, bad, flaky = (gens[0] for gens in out)
    assert good.text == "fine"
    assert bad.finish_reason == "error" and "HTTP 400" in bad.error and "Bearer ***" in bad.error
    assert flaky.finish_reason == "error" and "HTTP 503" in flaky.error and "2 attempts" in flaky.error
    assert "Bearer ***" in caplog.text  # the retry warning, redacted
    everything = repr(out) + repr(gen) + str(gen) + caplog.text
    assert SECRET not in everything


def test_without_api_key_env_no_key_is_sent(serve, monkeypatch):
    """OPENAI_API_KEY is OpenAI's key: a job without api_key_env must not hand it to whatever server base_url
    names (the openai client would read it by default)."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server = serve(ok)
    # backoff_s and max_backoff_s are still accepted (configs written before the openai client set them)
    out = fast(server.url, backoff_s=0.5, max_backoff_s=60).generate([request("hello", seeds=[1])])
    assert out[0][0].text == "answer to hello"
    ((_, _, headers),) = server.calls
    assert "authorization" not in headers and SECRET not in json.dumps(headers)


def test_missing_api_key_env_fails_fast(monkeypatch):
    monkeypatch.delenv("PAIRSEL_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="PAIRSEL_TEST_KEY"):
        OpenAIGenerator("m", base_url="http://127.0.0.1:9/v1", api_key_env="PAIRSEL_TEST_KEY")


# -- failures and retries -----------------------------------------------------


def test_429_with_retry_after_then_success(serve):
    def rate_limited_once(index, body, headers):
        if index == 0:
            return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
        return completion(["made it"])

    server = serve(rate_limited_once)
    out = fast(server.url).generate([request(seeds=[1])])
    assert out[0][0].text == "made it"
    assert len(server.calls) == 2
    waited = server.calls[1][0] - server.calls[0][0]
    assert waited >= 0.95  # Retry-After wins over the 0.01 s backoff


def test_5xx_then_success(serve):
    statuses = iter([500, 502, 200])

    def flaky(index, body, headers):
        status = next(statuses)
        return completion(["recovered"]) if status == 200 else (status, {}, b"upstream trouble")

    server = serve(flaky)
    out = fast(server.url, max_retries=4).generate([request(seeds=[1])])
    assert out[0][0].text == "recovered" and out[0][0].error is None
    assert len(server.calls) == 3


def test_5xx_forever_gives_up(serve):
    server = serve(lambda index, body, headers: (503, {}, b"overloaded"))
    out = fast(server.url, max_retries=2).generate([request(seeds=[1, 2])])
    assert len(server.calls) == 3
    assert [g.finish_reason for g in out[0]] == ["error", "error"]
    assert out[0][0].error == f"HTTP 503 from {server.url}/chat/completions: overloaded (gave up after 3 attempts)"
    assert out[0][0] is not out[0][1]


def test_4xx_is_not_retried_and_only_hits_its_request(serve):
    def rejects_long(index, body, headers):
        if "too long" in user_text(body):
            return 400, {}, {"error": {"message": "maximum context length exceeded"}}
        return completion(["fine"])

    server = serve(rejects_long)
    out = fast(server.url, use_n=False).generate([request("ok"), request("too long"), request("ok too")])
    assert [g.text for g in out[0] + out[2]] == ["fine"] * 6
    assert all(g.finish_reason == "error" and "HTTP 400" in g.error and "context length" in g.error for g in out[1])
    assert sum("too long" in user_text(b) for b in server.bodies()) == 3  # once per seed, no retries


def test_server_that_never_answers_times_out(serve):
    server = serve(lambda index, body, headers: HANG)
    start = time.monotonic()
    out = fast(server.url, timeout_s=0.3, max_retries=1).generate([request(seeds=[1])])
    assert time.monotonic() - start < 3
    assert out[0][0].finish_reason == "error"
    assert "no answer" in out[0][0].error and "0.3 s" in out[0][0].error
    assert len(server.calls) == 2


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"<html>bad gateway</html>", "body is not JSON"),
        ([1, 2], "JSON list, not an object"),
        ({"choices": "nope"}, "no `choices` list"),
        ({"choices": []}, "no `choices` list"),
        ({"choices": [{"text": "completions, not chat"}]}, "choices[0] has no `message`"),
        ({"choices": [{"message": {"content": 5}}]}, "content is a int"),
        ({"error": {"message": "engine overloaded"}}, "server error in a 2xx answer: engine overloaded"),
    ],
)
def test_malformed_response(serve, payload, message):
    server = serve(lambda index, body, headers: (200, {"Content-Type": "application/json"}, payload))
    out = fast(server.url).generate([request(seeds=[1, 2])])
    assert len(server.calls) == 1  # not retried
    for g in out[0]:
        assert g.finish_reason == "error" and g.error.startswith("malformed response: ")
        assert message in g.error


def test_connection_refused():
    port = job_runs.free_port()  # nothing listens on it
    out = fast(f"http://127.0.0.1:{port}/v1", max_retries=2).generate([request(seeds=[1])])
    g = out[0][0]
    assert g.finish_reason == "error"
    assert "cannot reach" in g.error and "refused" in g.error.lower() and "3 attempts" in g.error


# -- the response parser on its own -------------------------------------------


def test_parse_orders_choices_and_splits_usage():
    body = {
        "choices": [
            {"index": 1, "message": {"content": "b b b"}, "finish_reason": "stop"},
            {"index": 0, "message": {"content": "a"}, "finish_reason": None},
        ],
        "usage": {"completion_tokens": 9},
    }
    first, second = parse_chat_response(json.dumps(body), expected=2)
    assert (first.text, first.finish_reason) == ("a", "stop")
    assert second.text == "b b b"
    assert first.tokens + second.tokens == 9 and second.tokens > first.tokens
    # more choices than asked for: the extra ones are dropped, tokens counted per text
    (only,) = parse_chat_response(body, expected=1)
    assert (only.text, only.tokens) == ("a", 1)
