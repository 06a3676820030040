"""A small OpenAI-compatible chat-completions server for a local transformers model.

    python scripts/serve_openai.py --model models/tiny-qwen2vl --served-model-name tiny-qwen2vl [--port 0]

It speaks the part of the protocol pairsel's `openai` backend uses, over real HTTP (stdlib
ThreadingHTTPServer): POST /v1/chat/completions with one user turn (text, or text and one image as a data
URL), `n`, `seed`, `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, and `usage` in the
answer; GET /v1/models, /health and /stats (requests and injected faults, as JSON). Generation runs through
stages.backends.hf.TransformersGenerator, so the choice for seed s is what the transformers backend samples
with seed s. With `n` > 1, choice i is sampled with seed + i (as vLLM does).

`transformers serve` would do, but it cannot load the tiny Qwen2-VL here (its processor needs torchvision).

Faults, for tests of the client. They hit every Nth *new* request (a request is identified by its body, so
a retry is the same request) on its first --fault-attempts attempts; its retries after that are answered
normally, so a client that retries enough loses nothing:
  --rate-limit-every N   429 with Retry-After: --retry-after seconds
  --error-every N        --error-status (default 503)
  --slow-every N         answer only after --slow-s seconds (a client timeout shorter than that fires)
  --reset-every N        close the connection without an answer
  --fail-matching TEXT   500 on every attempt of any request whose user text contains TEXT

Once listening it prints one line, `listening on http://HOST:PORT/v1` (with --port 0 the port is the one
the OS chose), so a parent process can read the URL; spawn() does exactly that.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make pairsel's packages importable
    sys.path.insert(0, str(REPO))

from stages.backends.base import IMAGE_MARKER, GenRequest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from stages.images import ImageError, decode_image  # noqa: E402

log = logging.getLogger("serve_openai")

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_N = 16
# the pixel limit a job applies to its input images (input.max_image_pixels), applied to the images it is sent
MAX_IMAGE_PIXELS = int(OmegaConf.load(REPO / "configs" / "default.yaml").input.max_image_pixels)
LISTENING = "listening on "


class RequestError(Exception):
    """An answer other than 200, in OpenAI's error format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or {}


# -- faults --------------------------------------------------------------------------------------------


@dataclass
class Faults:
    rate_limit_every: int = 0
    retry_after_s: float = 1.0
    error_every: int = 0
    error_status: int = 503
    slow_every: int = 0
    slow_s: float = 5.0
    reset_every: int = 0
    fault_attempts: int = 1
    fail_matching: Optional[str] = None
    # what happened so far (GET /stats)
    requests: int = 0
    distinct: int = 0
    injected: dict = field(default_factory=lambda: {"rate_limit": 0, "error": 0, "slow": 0, "reset": 0, "fail": 0})
    _seen: dict = field(default_factory=dict)  # body fingerprint -> [number of the request, attempts]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, body: bytes, user_text: str) -> Optional[str]:
        """The fault for this attempt: rate_limit | error | slow | reset | fail, or None."""
        fingerprint = hashlib.sha256(body).hexdigest()
        with self._lock:
            self.requests += 1
            if fingerprint not in self._seen:
                self.distinct += 1
                self._seen[fingerprint] = [self.distinct, 0]
            entry = self._seen[fingerprint]
            entry[1] += 1
            number, attempt = entry
            fault = None
            if self.fail_matching and self.fail_matching in user_text:
                fault = "fail"
            elif attempt <= self.fault_attempts:
                for kind, every in (("rate_limit", self.rate_limit_every), ("error", self.error_every),
                                    ("slow", self.slow_every), ("reset", self.reset_every)):
                    if every and number % every == 0:
                        fault = kind
                        break
            if fault:
                self.injected[fault] += 1
            return fault

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "distinct_requests": self.distinct, "injected": dict(self.injected)}


# -- the request --------------------------------------------------------------------------------------


def _image_from_data_url(url: str):
    if not url.startswith("data:"):
        raise RequestError(400, "only data: image URLs are accepted (this server fetches nothing)")
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError(400, "image data URL must be base64: data:<type>;base64,<data>")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image data URL is not valid base64: {e}") from None
    try:
        return decode_image(raw, MAX_IMAGE_PIXELS)
    except ImageError as e:
        raise RequestError(400, f"bad image ({e.reason}): {e.detail}") from None


def user_turn(messages) -> tuple[str, list]:
    """(prompt text with IMAGE_MARKER where the image part was, [images]) of the one user message."""
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise RequestError(400, "`messages` must hold exactly one user message (this server has no history)")
    message = messages[0]
    if message.get("role") != "user":
        raise RequestError(400, f"the message role must be user, not {message.get('role')!r}")
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(400, "message content must be a string or a list of parts")
    text, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise RequestError(400, "image_url part without a url")
            images.append(_image_from_data_url(url))
            text.append(IMAGE_MARKER)
        else:
            raise RequestError(400, f"unsupported content part: {str(part)[:80]}")
    if len(images) > 1:
        raise RequestError(400, "at most one image per request")
    return "".join(text), images


def _user_text(payload) -> str:
    """The text parts of the request's messages, images left out (for --fail-matching)."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    texts = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(texts)


def _number(body: dict, key: str, default, kind, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(400, f"`{key}` must be a {kind.__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"`{key}` must be in [{low}, {high}], got {value}")
    return kind(value)


@dataclass
class Completion:
    prompt: str
    image: object
    seeds: list
    temperature: float
    top_p: float
    max_tokens: int


def parse_completion_request(body: dict, served_name: str) -> Completion:
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if body.get("model") != served_name:
        raise RequestError(404, f"The model `{body.get('model')}` does not exist (this server serves "
                                f"`{served_name}`)", kind="NotFoundError")
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported")
    prompt, images = user_turn(body.get("messages"))
    n = _number(body, "n", 1, int, 1, MAX_N)
    seed = body.get("seed")
    if seed is None:
        seed = random.randrange(2**31)  # OpenAI semantics: no seed, no reproducibility
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise RequestError(400, "`seed` must be an integer")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Completion(
        prompt=prompt,
        image=images[0] if images else None,
        seeds=[seed + i for i in range(n)],
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 1e-9, 1.0),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 16, int, 1, 32768),
    )


# -- the server ---------------------------------------------------------------------------------------


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, generator, served_name: str, faults: Faults):
        super().__init__(address, Handler)
        self.generator = generator
        self.served_name = served_name
        self.faults = faults
        # one model, one forward pass at a time; faults and parsing run outside the lock
        self.model_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def complete(self, request: Completion) -> dict:
        backend_request = GenRequest(prompt=request.prompt, image=request.image, seeds=request.seeds,
                                     temperature=request.temperature, top_p=request.top_p,
                                     max_new_tokens=request.max_tokens)
        with self.model_lock:
            generations = self.generator.generate([backend_request])[0]
            prompt_tokens = self._prompt_tokens(request)
        failed = [g.error for g in generations if g.finish_reason == "error"]
        if failed:  # the backend rejected this input: retrying the same request will not help
            raise RequestError(400, f"generation failed: {failed[0]}")
        completion_tokens = sum(g.tokens for g in generations)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": g.text},
                         "finish_reason": g.finish_reason, "logprobs": None}
                        for i, g in enumerate(generations)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _prompt_tokens(self, request: Completion) -> int:
        inputs = self.generator.inputs
        text = inputs.chat_prompt(request.prompt, request.image)
        return int(inputs.encode(text, request.image, add_special_tokens=False)["input_ids"].shape[1])


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    server_version = "pairsel-serve-openai/1"

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload, headers: Optional[dict] = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (slow fault)
            log.debug("client left before the answer was sent")

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}}, e.headers)

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.served_name, "object": "model", "owned_by": "pairsel"}]})
        elif self.path.rstrip("/") == "/stats":
            self._send_json(200, self.server.faults.stats())
        else:
            self._send_error(RequestError(404, f"no route {self.path}", kind="NotFoundError"))

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_error(RequestError(404, f"no route {self.path}", kind="NotFoundError"))
            return
        try:
            body = self._read_body()
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the body is not JSON: {e}") from None
            if self._inject_fault(body, payload):
                return
            request = parse_completion_request(payload, self.server.served_name)
            self._send_json(200, self.server.complete(request))
        except RequestError as e:
            self._send_error(e)
        except Exception as e:  # a bug here answers 500 and keeps the server up
            log.exception("request failed")
            self._send_error(RequestError(500, f"{type(e).__name__}: {e}", kind="InternalServerError"))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def _inject_fault(self, body: bytes, payload) -> bool:
        """Apply this attempt's fault; True when the request is finished with."""
        faults = self.server.faults
        fault = faults.decide(body, _user_text(payload))
        if fault == "rate_limit":
            self._send_error(RequestError(429, "rate limit reached, slow down", kind="RateLimitError",
                                          headers={"Retry-After": f"{faults.retry_after_s:g}"}))
        elif fault == "error":
            self._send_error(RequestError(faults.error_status, "the engine is overloaded", kind="ServiceUnavailable"))
        elif fault == "fail":
            self._send_error(RequestError(500, "injected failure for this prompt", kind="InternalServerError"))
        elif fault == "reset":
            self.close_connection = True  # no status line: the client sees the connection drop
        elif fault == "slow":
            time.sleep(faults.slow_s)
            return False
        return fault is not None


def load_generator(model: str, device: Optional[str] = None, dtype: Optional[str] = None):
    from stages.backends.hf import TransformersGenerator

    return TransformersGenerator(model, device=device, dtype=dtype)


def serve(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    generator = load_generator(args.model, args.device, args.dtype)
    faults = Faults(
        rate_limit_every=args.rate_limit_every, retry_after_s=args.retry_after, error_every=args.error_every,
        error_status=args.error_status, slow_every=args.slow_every, slow_s=args.slow_s,
        reset_every=args.reset_every, fault_attempts=args.fault_attempts, fail_matching=args.fail_matching,
    )
    name = args.served_model_name or Path(args.model).name
    httpd = ModelServer((args.host, args.port), generator, name, faults)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds serve_forever cleanly
    try:
        print(f"{LISTENING}{httpd.url}", flush=True)
        log.info("serving %s as %r on %s", args.model, name, httpd.url)
        httpd.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        httpd.server_close()
        log.info("stopped; %s", json.dumps(faults.stats()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local transformers model folder")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100, help="0: any free port (printed)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    f = p.add_argument_group("faults (for tests)")
    f.add_argument("--rate-limit-every", type=int, default=0, metavar="N")
    f.add_argument("--retry-after", type=float, default=1.0, metavar="S")
    f.add_argument("--error-every", type=int, default=0, metavar="N")
    f.add_argument("--error-status", type=int, default=503)
    f.add_argument("--slow-every", type=int, default=0, metavar="N")
    f.add_argument("--slow-s", type=float, default=5.0, metavar="S")
    f.add_argument("--reset-every", type=int, default=0, metavar="N")
    f.add_argument("--fault-attempts", type=int, default=1, metavar="A",
                   help="how many attempts of a faulted request fail before it is answered (default 1)")
    f.add_argument("--fail-matching", default=None, metavar="TEXT")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return serve(args)


# -- for parents: run the server as a subprocess --------------------------------------------------------


def spawn(model: str, served_model_name: str, *extra_args: str, port: int = 0, timeout_s: float = 120,
          stderr=None) -> tuple[subprocess.Popen, str]:
    """Start this script as a subprocess on 127.0.0.1 and wait until it listens; returns (process, base_url).
    The caller stops it with stop(process)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--model", str(model),
         "--served-model-name", served_model_name, "--port", str(port), *extra_args],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
    )
    found: list[str] = []

    def read_url():  # readline blocks; a thread lets the wait time out
        for line in proc.stdout:
            if line.startswith(LISTENING):
                found.append(line[len(LISTENING):].strip())
                return

    reader = threading.Thread(target=read_url, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not found:
        stop(proc)
        raise RuntimeError(f"serve_openai did not start within {timeout_s} s (exit code {proc.returncode})")
    return proc, found[0]


def stop(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
