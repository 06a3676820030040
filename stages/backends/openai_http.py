"""A generator behind any OpenAI-compatible chat-completions server (vLLM,
SGLang, TGI, `transformers serve`, hosted APIs).

Only the standard library: one urllib call per HTTP request, run in a thread
pool bounded by `max_in_flight`. A request that keeps failing becomes error
Generations for its pair only; the job goes on.

The API key is read from an environment variable, sent only in the
Authorization header, and scrubbed from every message this module produces
(a misbehaving server may echo headers back in its error body).
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Optional

from PIL import Image

from stages.backends.base import GenRequest, Generation
from stages.backends.prompt_text import chat_content

log = logging.getLogger(__name__)

_BODY_SNIPPET = 300  # characters of an error body kept in a message


class MalformedResponse(ValueError):
    """The server answered 2xx with something that is not a chat completion."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Failed(Exception):
    """Not worth retrying (4xx, malformed answer)."""


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
    with fewer choices than expected gives fewer Generations (the caller decides)."""
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


def _retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Retry-After is either seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIGenerator:
    def __init__(
        self,
        model: str,
        trust_remote_code: bool = False,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key_env: Optional[str] = None,
        max_in_flight: int = 8,
        timeout_s: float = 60,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        use_n: bool = True,
        send_seed: bool = True,
        max_backoff_s: float = 60,
        extra_body: Optional[dict] = None,
        **options,
    ):
        """`extra_body` is merged into every request body (e.g.
        {"chat_template_kwargs": {"enable_thinking": true}} for vLLM).
        `timeout_s` bounds each wait on the socket (connect, each read), not a
        whole answer. `trust_remote_code` means nothing for a remote server."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if options:
            log.warning("openai backend ignores unknown options: %s", ", ".join(sorted(options)))
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.model_id = f"openai:{model}@{self.base_url}"
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.use_n = use_n
        self.send_seed = send_seed
        self.extra_body = dict(extra_body or {})
        self._api_key = None
        if api_key_env:
            self._api_key = os.environ.get(api_key_env)
            if not self._api_key:
                raise ValueError(f"environment variable {api_key_env} (api_key_env) is not set")
        # Flipped off the first time the server returns fewer choices than `n`.
        self._server_honours_n = True
        self._url = self.base_url + "/chat/completions"
        self._opener = urllib.request.build_opener()
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"OpenAIGenerator(model_id={self.model_id!r}, api_key={'set' if self._api_key else 'none'})"

    def _redact(self, message: str) -> str:
        return message.replace(self._api_key, "***") if self._api_key else message

    # -- one HTTP exchange -------------------------------------------------

    def _post(self, payload: dict) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self._url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read().decode("utf-8", "replace")[:_BODY_SNIPPET]
            except Exception:  # the body of an error is best effort
                detail = ""
            message = f"HTTP {e.code} from {self._url}" + (f": {detail}" if detail.strip() else "")
            if e.code == 429 or e.code >= 500:
                raise _Retryable(message, _retry_after_seconds(e.headers.get("Retry-After"))) from None
            raise _Failed(message) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer from {self._url} within {self.timeout_s} s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer from {self._url} within {self.timeout_s} s") from None
            raise _Retryable(f"cannot reach {self._url}: {reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection to {self._url} failed: {type(e).__name__}: {e}") from None

    def _post_with_retries(self, payload: dict) -> bytes:
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(payload)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise _Failed(f"{e} (gave up after {attempt + 1} attempts)") from None
                delay = self.backoff_s * 2**attempt * self._random.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                delay = min(delay, self.max_backoff_s)
                log.warning("%s; retry %d/%d in %.2f s", self._redact(str(e)), attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- one chat completion (one or all seeds of a request) ----------------

    def _payload(self, request: GenRequest, content, seeds: list[int]) -> dict:
        payload = {
            **self.extra_body,
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_new_tokens,
        }
        if len(seeds) > 1:
            payload["n"] = len(seeds)
        if self.send_seed:
            payload["seed"] = seeds[0]
        return payload

    def _complete(self, request: GenRequest, content, slots: list[int]) -> Optional[list[Generation]]:
        """Generations for the seeds at `slots` (all of them with `n`, else one),
        or None when the server ignored `n` (the caller then asks seed by seed).
        Never raises."""
        try:
            seeds = [request.seeds[k] for k in slots]
            body = self._post_with_retries(self._payload(request, content, seeds))
            generations = parse_chat_response(body, expected=len(slots))
        except (_Failed, MalformedResponse) as e:
            kind = "malformed response: " if isinstance(e, MalformedResponse) else ""
            return _errors(self._redact(kind + str(e)), len(slots))
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
