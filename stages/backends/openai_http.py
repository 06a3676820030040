"""A generator behind any OpenAI-compatible chat-completions server (vLLM,
SGLang, TGI, `transformers serve`, hosted APIs), on the `openai` client.

The client does the HTTP: timeouts, retries of 408/409/429/5xx, timeouts and
dropped connections with exponential backoff and jitter, Retry-After. This
module adds what pairsel needs on top: per-candidate seeds (one request with
`n`, or one per seed when the server ignores `n`), at most `max_in_flight`
requests at once (a thread pool; the client is thread-safe), and a request
that still fails becomes error Generations for its pair only; the job goes on.

The API key is read from an environment variable, sent only in the
Authorization header, and scrubbed from every message this module produces
(a misbehaving server may echo headers back in its error body).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Dict, Optional

import openai
from PIL import Image

from stages.backends.base import GenRequest, Generation
from stages.backends.options import BackendOptions, option
from stages.backends.prompt_text import chat_content

log = logging.getLogger(__name__)

_BODY_SNIPPET = 300  # characters of an error body kept in a message
# The request fields OpenAIGenerator sets from a GenRequest.
_REQUEST_KEYS = ("model", "messages", "temperature", "top_p", "max_tokens", "n", "seed")


class MalformedResponse(ValueError):
    """The server answered 2xx with something that is not a chat completion."""


def image_data_url(image: Image.Image) -> str:
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_content(prompt: str, image: Optional[Image.Image]) -> str | list[dict]:
    """The user message content, the image placed as every backend places it (prompt_text.chat_content):
    plain text without an image; with one, a list of parts with the image as a data URL. Markers never reach
    the server."""
    if image is None:
        return chat_content(prompt, False)
    return chat_content(prompt, True, image_part={"type": "image_url", "image_url": {"url": image_data_url(image)}})


def _whitespace_tokens(text: str) -> int:
    return len(text.split())


def _split_total(total: int, texts: list[str]) -> list[int]:
    """Share a completion-token total across choices in proportion to their
    length, keeping the sum exact (largest remainder)."""
    weights = [_whitespace_tokens(t) for t in texts]
    if not sum(weights):
        weights = [1] * len(texts)
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(texts)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def parse_chat_response(body: bytes | str | dict, expected: int) -> list[Generation]:
    """`expected` Generations from a chat-completions body, in choice-index order.
    Raises MalformedResponse when the body is not a usable completion; a body
    with fewer choices than expected gives fewer Generations (the caller decides).

    The raw body, not the client's ChatCompletion model: the client builds its
    models leniently (a body without choices would pass), and servers put the
    thinking of a reasoning parser in fields the model does not declare."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MalformedResponse(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise MalformedResponse(f"body is a JSON {type(body).__name__}, not an object")
    if "choices" not in body and isinstance(body.get("error"), (dict, str)):
        error = body["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise MalformedResponse(f"server error in a 2xx answer: {str(message)[:_BODY_SNIPPET]}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("no `choices` list in the answer")
    parsed = []
    for pos, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise MalformedResponse(f"choices[{pos}] has no `message` object")
        message = choice["message"]
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise MalformedResponse(f"choices[{pos}].message.content is a {type(content).__name__}, not a string")
        # Servers running a reasoning parser return the thinking apart; put it back
        # in tags so parsing.select_rationale treats every backend alike.
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content = f"<think>{reasoning}</think>{content}"
        finish = choice.get("finish_reason")
        index = choice.get("index", pos)
        if not isinstance(index, int):
            raise MalformedResponse(f"choices[{pos}].index is not an integer")
        parsed.append((index, content, finish if isinstance(finish, str) and finish else "stop"))
    parsed.sort(key=lambda c: c[0])
    parsed = parsed[:expected]
    texts = [text for _, text, _ in parsed]
    usage = body.get("usage")
    total = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0 and len(choices) == len(parsed):
        tokens = _split_total(total, texts)
    else:
        tokens = [_whitespace_tokens(t) for t in texts]
    return [Generation(text=text, tokens=n, finish_reason=finish) for (_, text, finish), n in zip(parsed, tokens)]


@dataclasses.dataclass(frozen=True)
class OpenAIOptions(BackendOptions):
    # How to reach the server and how hard to retry are not labels: a resumed run may use another port, timeout
    # or key variable. What the server is asked for (use_n, send_seed, extra_body) is.
    base_url: str = option("http://127.0.0.1:8000/v1", "the server's OpenAI-compatible root", label=False)
    api_key_env: Optional[str] = option(None, "the environment variable holding the key", label=False)
    max_in_flight: int = option(8, "requests at once, per actor", label=False, at_least=1)
    timeout_s: float = option(60.0, "each socket wait (connect, each read), not a whole answer", label=False)
    max_retries: int = option(4, "retries after the first attempt (the `openai` client's `max_retries`)",
                              label=False, at_least=0)
    use_n: bool = option(True, "K candidates in one request with `n` (see below)", label=True)
    send_seed: bool = option(True, "send `seed` (switch off for a server that rejects it)", label=True)
    extra_body: Optional[Dict[str, Any]] = option(
        None, "merged into every request, e.g. `{chat_template_kwargs: {enable_thinking: true}}`; the fields "
              "pairsel sets itself (`model`, `messages`, `temperature`, `top_p`, `max_tokens`, `n`, `seed`) are "
              "ignored there, with a warning", label=True)
    backoff_s: Optional[float] = option(None, "accepted so that older configs load; does nothing (the client "
                                              "backs off as above)", label=False)
    max_backoff_s: Optional[float] = option(None, "as `backoff_s`", label=False)


class OpenAIGenerator:
    Options = OpenAIOptions

    def __init__(self, model: str, trust_remote_code: bool = False, **options):
        """`trust_remote_code` means nothing for a remote server. The client waits 0.5 s doubling up to 8 s
        between attempts, with jitter, or what a Retry-After of up to 2 minutes says."""
        o = self.options = self.Options.parse(options, "openai generator")
        if o.backoff_s is not None or o.max_backoff_s is not None:
            log.info("openai backend: backoff_s and max_backoff_s are ignored; the openai client backs off "
                     "0.5 s doubling up to 8 s and honours Retry-After")
        extra_body, api_key_env = o.extra_body, o.api_key_env
        self.model = model
        self.base_url = o.base_url.rstrip("/")
        self.model_id = f"openai:{model}@{self.base_url}"
        self.max_in_flight = o.max_in_flight
        self.timeout_s = o.timeout_s
        self.max_retries = o.max_retries
        self.use_n = o.use_n
        self.send_seed = o.send_seed
        # the client merges extra_body over the request it builds: keys pairsel sets stay pairsel's (a seed
        # there would sample every candidate alike)
        self.extra_body = {k: v for k, v in (extra_body or {}).items() if k not in _REQUEST_KEYS}
        if len(self.extra_body) < len(extra_body or {}):
            log.warning("openai backend ignores extra_body keys it sets itself: %s",
                        ", ".join(sorted(set(extra_body) & set(_REQUEST_KEYS))))
        self._api_key = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set")
        # Flipped off the first time the server returns fewer choices than `n`.
        self._server_honours_n = True
        self._url = self.base_url + "/chat/completions"
        # HTTP attempts of the request this thread is making (the client retries inside one call): an httpx
        # request hook counts them, so a failure can say how many attempts it took.
        self._attempts = threading.local()
        self._client = openai.OpenAI(
            base_url=self.base_url,
            # always this key, never OPENAI_API_KEY from the environment: that key is for OpenAI, not for
            # whatever server base_url names. Without a key, _post omits the Authorization header.
            api_key=self._api_key or "no-key",
            timeout=o.timeout_s,
            max_retries=o.max_retries,
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._count_attempt]}),
        )

    def __repr__(self) -> str:
        return f"OpenAIGenerator(model_id={self.model_id!r}, api_key={'set' if self._api_key else 'none'})"

    def _redact(self, message: str) -> str:
        return message.replace(self._api_key, "***") if self._api_key else message

    def _count_attempt(self, request) -> None:
        self._attempts.count = getattr(self._attempts, "count", 0) + 1

    # -- one chat completion (one or all seeds of a request) ----------------

    def _post(self, request: GenRequest, content, seeds: list[int]) -> bytes:
        """The raw answer body of one chat completion; raises the client's errors once its retries are spent."""
        sampling = {"temperature": request.temperature, "top_p": request.top_p, "max_tokens": request.max_new_tokens}
        if len(seeds) > 1:
            sampling["n"] = len(seeds)
        if self.send_seed:
            sampling["seed"] = seeds[0]
        raw = self._client.chat.completions.with_raw_response.create(
            model=self.model, messages=[{"role": "user", "content": content}], extra_body=self.extra_body or None,
            extra_headers=None if self._api_key else {"Authorization": openai.omit}, **sampling)
        return raw.http_response.content

    def _describe(self, e: openai.APIError) -> str:
        if isinstance(e, openai.APIStatusError):
            detail = e.response.text[:_BODY_SNIPPET]
            message = f"HTTP {e.status_code} from {self._url}" + (f": {detail}" if detail.strip() else "")
        elif isinstance(e, openai.APITimeoutError):
            message = f"no answer from {self._url} within {self.timeout_s:g} s"
        elif isinstance(e, openai.APIConnectionError):
            message = f"cannot reach {self._url}: {e.__cause__ or e}"
        else:
            message = f"{type(e).__name__}: {e}"
        attempts = getattr(self._attempts, "count", 1)
        return message + (f" (gave up after {attempts} attempts)" if attempts > 1 else "")

    def _complete(self, request: GenRequest, content, slots: list[int]) -> Optional[list[Generation]]:
        """Generations for the seeds at `slots` (all of them with `n`, else one),
        or None when the server ignored `n` (the caller then asks seed by seed).
        Never raises."""
        self._attempts.count = 0
        try:
            body = self._post(request, content, [request.seeds[k] for k in slots])
            generations = parse_chat_response(body, expected=len(slots))
        except openai.APIError as e:
            message = self._redact(self._describe(e))
            log.warning("%s", message)
            return _errors(message, len(slots))
        except MalformedResponse as e:
            return _errors(self._redact(f"malformed response: {e}"), len(slots))
        except Exception as e:  # a bug here must not end the job
            return _errors(self._redact(f"{type(e).__name__}: {e}"), len(slots))
        if len(generations) < len(slots):
            if len(slots) > 1:
                self._server_honours_n = False
                return None
            return _errors("malformed response: no choice in the answer", 1)
        return generations

    def generate(self, requests: list[GenRequest]) -> list[list[Generation]]:
        out: list[list[Optional[Generation]]] = [[None] * len(r.seeds) for r in requests]
        with ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="openai") as pool:
            pending = {}

            def submit(i: int, content, slots: list[int]):
                pending[pool.submit(self._complete, requests[i], content, slots)] = (i, content, slots)

            for i, request in enumerate(requests):
                if not request.seeds:
                    continue
                try:
                    content = build_content(request.prompt, request.image)
                except Exception as e:  # an image PIL cannot encode
                    out[i] = _errors(f"cannot encode the image: {type(e).__name__}: {e}", len(request.seeds))
                    continue
                slots = list(range(len(request.seeds)))
                if self.use_n and self._server_honours_n and len(slots) > 1:
                    submit(i, content, slots)
                else:
                    for k in slots:
                        submit(i, content, [k])
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i, content, slots = pending.pop(future)
                    generations = future.result()
                    if generations is None:
                        for k in slots:
                            submit(i, content, [k])
                        continue
                    for k, generation in zip(slots, generations):
                        out[i][k] = generation
        return out  # type: ignore[return-value]


def _errors(message: str, count: int) -> list[Generation]:
    return [Generation(text="", tokens=0, finish_reason="error", error=message) for _ in range(count)]
