"""Web chat over the one engine: a static page + a Server-Sent-Events endpoint, standard library only.

    modern-llm serve --checkpoint runs/lm [--verifier runs/verifier] [--port 8000]
    modern-llm serve --hf-model smollm2-135m-instruct

Endpoints (``http.server.ThreadingHTTPServer``)
- ``GET /``: the chat page (``modern_llm/web/index.html`` + ``chat.js`` + ``style.css``, package data).
  ``/?q=TEXT&autosend=1`` fills the input and sends it on load (used by the browser test and for links).
- ``GET /api/info``: JSON with the model name, whether a verifier is loaded and the default settings.
- ``POST /api/chat``: JSON ``{"messages": [{"role", "content"}...], "max_new_tokens", "temperature", "top_p",
  "alternatives", "alt_temperature", "seed"}`` -> ``text/event-stream`` with events
  ``token`` (``{"text": delta}``, the engine's ``stream=True`` deltas), ``done`` (the full reply, finish reason,
  token count and the verifier score or null), ``alternatives`` (N further samples of the same prompt from one
  engine call with ``num_samples=N``, each with its score), and ``error`` (``{"message"}``).

Design choices
- Nothing here samples or loads weights by itself: prompts are rendered with the tokenizer's chat template
  (or a plain "User:/Assistant:" transcript when it has none), replies come from
  ``inference.engine.generate``, models from ``inference.cli.load_for_inference`` (the same loaders as the
  ``generate``/``chat`` CLIs), the verifier from ``models.verifier.load_verifier`` and its scores from
  ``training.train_verifier.score_solutions`` (P(correct) of (rendered prompt, reply)).
- One generation at a time (a lock): a CPU model gains nothing from concurrent decodes, and a second request
  simply waits; the threaded server keeps serving the page meanwhile.
- The conversation is trimmed from the oldest turn (then left-truncated) so prompt + ``max_new_tokens`` fits
  the model's context; request fields are validated and capped (400 with a message naming the field).
- Binds to 127.0.0.1 by default. The page renders model text with ``textContent`` only, never as HTML.

Footguns
- POST bodies are read whole and limited to ``MAX_BODY_BYTES``; the browser side uses ``fetch`` + a stream
  reader (``EventSource`` cannot POST).
- A verifier score is only meaningful for the kind of question the verifier was trained on (e.g. arithmetic
  word problems); on open chat it is shown but says little.
- If the client disconnects mid-stream, the generator is closed and the remaining tokens are not computed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 16_000
MAX_NEW_TOKENS_CAP = 1024
MAX_ALTERNATIVES = 8
ROLES = ("system", "user", "assistant")
STATIC_FILES = {  # URL path -> (package file, content type); nothing else is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


# ----------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    top_p: float
    alternatives: int
    alt_temperature: float
    seed: int | None


def _number(body: dict[str, Any], key: str, default, kind: type, low: float, high: float):
    value = body.get(key, default)
    if value is None and key == "seed":
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and value != int(value))
    ):
        raise ValueError(f"'{key}' must be a {kind.__name__}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"'{key}' must be in [{low}, {high}], got {value!r}")
    return kind(value)


def parse_chat_request(body: Any, default_max_new_tokens: int = 128) -> ChatRequest:
    """Validate a /api/chat JSON body; errors name the field and the allowed range."""
    if not isinstance(body, dict):
        raise ValueError(
            'the body must be a JSON object like {"messages": [{"role": "user", "content": "hi"}]}'
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"'messages' has {len(messages)} entries; at most {MAX_MESSAGES} are accepted")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise ValueError(f"messages[{i}].content is longer than {MAX_MESSAGE_CHARS} characters")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise ValueError("the last message must have role 'user' (the turn to answer)")
    return ChatRequest(
        messages=clean,
        max_new_tokens=_number(body, "max_new_tokens", default_max_new_tokens, int, 1, MAX_NEW_TOKENS_CAP),
        temperature=_number(body, "temperature", 0.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, float, 0.01, 1.0),
        alternatives=_number(body, "alternatives", 0, int, 0, MAX_ALTERNATIVES),
        alt_temperature=_number(body, "alt_temperature", 0.8, float, 0.05, 2.0),
        seed=_number(body, "seed", None, int, 0, 2**31 - 1),
    )


# ----------------------------------------------------------------------------------------------- backend


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus any known end-of-turn token in the vocabulary (``<|end|>``, ``<|im_end|>``, ...)."""
    from modern_llm.inference.cli import END_OF_TURN_TOKENS

    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def context_limit(model) -> int | None:
    """The model's usable context in tokens (None = unknown)."""
    cfg = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class ChatBackend:
    """Model + tokenizer (+ verifier): renders conversations and yields (event, payload) pairs for a reply."""

    def __init__(self, model, tokenizer, verifier=None, verifier_tokenizer=None, name: str = "model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.verifier = verifier
        self.verifier_tokenizer = verifier_tokenizer or tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.stop_strings = [] if self.has_template else ["\nUser:"]
        self.context = context_limit(model)
        self.lock = threading.Lock()

    # -- prompts
    def _render_text(self, messages: list[dict[str, str]]) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        if self.has_template:
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(out["input_ids"])
        return list(self.tokenizer(self._render_text(messages), add_special_tokens=True)["input_ids"])

    def render(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], str]:
        """(prompt ids, prompt text): oldest non-system turns dropped, then left-truncated, to fit the context."""
        messages = list(messages)
        ids = self._encode(messages)
        budget = None if self.context is None else max(1, self.context - max_new_tokens)
        while budget is not None and len(ids) > budget and len(messages) > 1:
            drop = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if drop is None:
                break
            messages.pop(drop)
            ids = self._encode(messages)
        if budget is not None and len(ids) > budget:
            ids = ids[-budget:]
        return ids, self._render_text(messages)

    # -- verifier
    def score(self, prompt_text: str, replies: list[str]) -> list[float | None]:
        if self.verifier is None or not replies:
            return [None] * len(replies)
        from modern_llm.training.train_verifier import score_solutions

        scores = score_solutions(
            self.verifier, self.verifier_tokenizer, [prompt_text] * len(replies), replies
        )
        return [round(float(s), 6) for s in scores]

    # -- generation
    def _sampling(self, temperature: float, top_p: float, max_new_tokens: int, seed: int | None):
        from modern_llm.inference.sampling import SamplingParams

        return SamplingParams(
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )

    def reply_events(self, req: ChatRequest) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ("token", ...)*, ("done", ...), then ("alternatives", ...) when requested."""
        from modern_llm.inference.engine import generate

        with self.lock:
            ids, prompt_text = self.render(req.messages, req.max_new_tokens)
            started = time.perf_counter()
            events = generate(
                self.model,
                self.tokenizer,
                [ids],
                self._sampling(req.temperature, req.top_p, req.max_new_tokens, req.seed),
                stop=self.stop_strings or None,
                eos_token_id=self.stop_ids or None,
                stream=True,
            )
            result = None
            try:
                for event in events:
                    if event.text:
                        yield "token", {"text": event.text}
                    if event.finished:
                        result = event.result
            finally:
                events.close()  # a disconnected client stops the decode here
            elapsed = time.perf_counter() - started
            text = result.text.strip()
            yield (
                "done",
                {
                    "text": text,
                    "finish_reason": result.finish_reason,
                    "num_tokens": result.num_generated_tokens,
                    "seconds": round(elapsed, 3),
                    "score": self.score(prompt_text, [text])[0],
                    "prompt_tokens": len(ids),
                },
            )
            if req.alternatives:
                alt_seed = None if req.seed is None else req.seed + 1
                params = self._sampling(req.alt_temperature, req.top_p, req.max_new_tokens, alt_seed)
                results = generate(
                    self.model,
                    self.tokenizer,
                    [ids],
                    params,
                    num_samples=req.alternatives,
                    stop=self.stop_strings or None,
                    eos_token_id=self.stop_ids or None,
                )[0]
                texts = [r.text.strip() for r in results]
                scores = self.score(prompt_text, texts)
                yield (
                    "alternatives",
                    {
                        "temperature": req.alt_temperature,
                        "samples": [
                            {
                                "text": t,
                                "score": s,
                                "finish_reason": r.finish_reason,
                                "num_tokens": r.num_generated_tokens,
                            }
                            for t, s, r in zip(texts, scores, results)
                        ],
                    },
                )

    def info(self, default_max_new_tokens: int) -> dict[str, Any]:
        return {
            "model": self.name,
            "verifier": self.verifier is not None,
            "chat_template": self.has_template,
            "context": self.context,
            "defaults": {
                "max_new_tokens": default_max_new_tokens,
                "temperature": 0.0,
                "alternatives": 2,
                "alt_temperature": 0.8,
            },
        }


# ----------------------------------------------------------------------------------------------- HTTP


def sse_frame(event: str, payload: Any) -> bytes:
    """One Server-Sent-Events frame (``json.dumps`` never emits a raw newline, so one data line suffices)."""
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


def read_static(name: str) -> bytes:
    return resources.files("modern_llm.web").joinpath(name).read_bytes()


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    server_version = "modern-llm-chat"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = urlparse(self.path).path
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            self._send(HTTPStatus.OK, read_static(name), content_type)
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.server.backend.info(self.server.default_max_new_tokens))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}; the page is at /"})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        if urlparse(self.path).path != "/api/chat":
            self._json(HTTPStatus.NOT_FOUND, {"error": "POST only to /api/chat"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"need a JSON body of 1..{MAX_BODY_BYTES} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            req = parse_chat_request(body, self.server.default_max_new_tokens)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON: {err}"})
            return
        except ValueError as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        events = self.server.backend.reply_events(req)
        try:
            for event, payload in events:
                self.wfile.write(sse_frame(event, payload))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away; generation stopped")
        except Exception as err:  # report to the page, keep the server up
            log.exception("generation failed")
            with contextlib.suppress(OSError):
                self.wfile.write(sse_frame("error", {"message": f"{type(err).__name__}: {err}"}))
        finally:
            events.close()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: ChatBackend, default_max_new_tokens: int = 128):
        super().__init__(address, ChatHandler)
        self.backend = backend
        self.default_max_new_tokens = default_max_new_tokens

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modern-llm serve",
        description="Web chat on http://HOST:PORT/ : streams replies token by token, shows N sampled "
        "alternatives and (with --verifier) each answer's verifier score.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="trainer checkpoint folder (or run folder: newest checkpoint)")
    source.add_argument("--hf-model", help="HF causal LM: local folder, registered short name or Hub id")
    parser.add_argument("--tokenizer", help="override the tokenizer (folder or 'gpt2-bpe')")
    parser.add_argument("--verifier", help="verifier folder written by models.verifier.save_verifier")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default reply length cap")
    return parser


def load_backend(args: argparse.Namespace) -> ChatBackend:
    from modern_llm.inference.cli import load_for_inference

    model, tokenizer = load_for_inference(args)
    verifier, verifier_tok = None, None
    if args.verifier:
        from pathlib import Path

        from modern_llm.models.verifier import load_verifier

        device = next(model.parameters()).device
        verifier = load_verifier(args.verifier, device=str(device))
        tok_dir = Path(args.verifier) / "tokenizer"
        if tok_dir.is_dir():
            from modern_llm.data.tokenizer import load_tokenizer

            verifier_tok = load_tokenizer(tok_dir)
    name = args.checkpoint or args.hf_model
    return ChatBackend(model, tokenizer, verifier, verifier_tok, name=str(name))


def create_server(args: argparse.Namespace, backend: ChatBackend | None = None) -> ChatServer:
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_CAP:
        raise ValueError(f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS_CAP}], got {args.max_new_tokens}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "binding to %s: the chat is reachable from other machines; it has no authentication", args.host
        )
    return ChatServer((args.host, args.port), backend or load_backend(args), args.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = create_server(args)
    print(f"chat on {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
