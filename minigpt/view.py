"""`minigpt view`: a local web page onto one trained model.

The page (minigpt/web: one HTML file, one script, one style sheet, nothing fetched from the
internet) asks this server for plain JSON, and every number it gets comes from the Python API
(`minigpt.load(...)` and its methods), the same code path as `minigpt sample`, `surprise`,
`attention`, `explain`, `info`, `eval` and `plot`:

    GET  /api/info        the checkpoint's description (model.info()) and the device
    GET  /api/exact       exact val loss and bits per char (model.evaluate(split="val")), computed once
    GET  /api/curves      train and val loss from the run's TensorBoard event files
    POST /api/generate    the continuation of a prompt, one JSON line per piece as it is generated
    POST /api/read        each character's surprise in bits and the five characters expected there
    POST /api/attention   where every head of every layer looks from one character
    POST /api/explain     one head's steps (q . k, scaling, mask, softmax, weighted values) for that row

The server is the standard library's ThreadingHTTPServer: the page is for one person on one
machine, so a framework would add a dependency and nothing the page needs. One lock lets one
request at a time use the model. A user's mistake (an unknown character, a temperature of -1) is
answered with status 400 and one sentence; anything else with status 500 and one line, and the
server keeps running. It serves nothing but its own three files and the run it was given.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from minigpt.errors import ConfigError, MiniGPTError, PromptError, first_line
from minigpt.generation import MAX_NEW_TOKENS, SEED, TEMPERATURE

PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/view.js": ("view.js", "text/javascript; charset=utf-8"),
         "/view.css": ("view.css", "text/css; charset=utf-8")}
TOP = 5  # expected characters shown when hovering over one
MAX_TEXT = 20_000  # characters the page may send: generation and scoring stay interactive
MAX_LENGTH = 5_000  # characters one generation may add
MAX_BODY = 1_000_000  # bytes of one request
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Viewer:
    """What the page asks of one model, as plain data from the Python API."""

    def __init__(self, model: Any):
        self.model = model  # a minigpt.Model
        self.lock = threading.Lock()  # one request at a time on the model
        self.exact_result: dict | None = None

    def info(self) -> dict:
        """The checkpoint's description, as `minigpt info --json` prints it, and where the model runs."""
        return {**self.model.info(), "device": str(self.model.device), "block_size": self.model.config.model.block_size}

    def exact(self) -> dict:
        """Exact val loss and bits per char of the whole validation split, computed on first request."""
        if self.exact_result is None:
            with self.lock:
                result = self.model.evaluate(split="val")
            self.exact_result = {"loss": result.loss, "bpc": result.bpc, "characters": result.characters}
        return self.exact_result

    def curves(self) -> dict:
        """Train and val loss of the run, from its event files: {tag: [[step, loss], ...]}."""
        from minigpt.viz import read_scalars

        return {tag: [[s, v] for s, v in points] for tag, points in read_scalars(self.model.path.parent).items()}

    def read(self, body: dict) -> dict:
        """Each character of a text, its surprise in bits and the TOP characters the model expected there."""
        text = field(body, "text", str)
        check_length(text)
        with self.lock:
            result = self.model.surprise(text, unknown=unknown(body), top=TOP)
        return {"chars": result.chars, "bits": [None, *result.bits], "top": [[], *result.top],
                "mean_bits": result.mean_bits}

    def attention(self, body: dict) -> dict:
        """Every head's weights from the character at `position` over the characters it can see."""
        text = upto(body)
        with self.lock:
            maps = self.model.attention_maps(text, unknown=unknown(body))
        c = self.model.config.model
        weights = [[maps.maps[(layer, head)][-1].tolist() for head in range(c.n_head)] for layer in range(c.n_layer)]
        return {"chars": maps.chars, "start": len(text) - len(maps.chars), "weights": weights}

    def explain(self, body: dict) -> dict:
        """One head's steps for the row of the character at `position` (its query against every key)."""
        text = upto(body)
        layer, head = field(body, "layer", int), field(body, "head", int)
        with self.lock:
            explanation = self.model.explain(text, layer, head, unknown=unknown(body))
        steps = [{"key": s.key, "title": s.title, "columns": s.columns,
                  "values": [None if math.isinf(v) else v for v in s.value[-1].tolist()]} for s in explanation.steps]
        return {"chars": explanation.chars, "layer": layer, "head": head, "steps": steps,
                "next": [[c, p] for c, p in explanation.next_chars]}

    def generate(self, body: dict) -> Iterator[str]:
        """The continuation of the prompt, piece by piece; settings are checked before the first piece."""
        prompt = field(body, "prompt", str)
        check_length(prompt)
        length = field(body, "length", int, MAX_NEW_TOKENS)
        if not 0 <= length <= MAX_LENGTH:
            raise PromptError(f"length must be 0 to {MAX_LENGTH:,} characters (what this page generates at once), got {length}")
        settings = dict(max_new_tokens=length, temperature=field(body, "temperature", float, TEMPERATURE),
                        top_k=field(body, "top_k", int, None), top_p=field(body, "top_p", float, None),
                        seed=field(body, "seed", int, SEED), unknown=unknown(body))
        with self.lock, closing(self.model.stream(prompt, include_prompt=False, **settings)) as pieces:
            yield from pieces  # a bad setting or prompt raises at the first piece, before the answer starts


def field(body: dict, name: str, kind: type, default: Any = ...) -> Any:
    """body[name] as `kind` (str, int or a finite float); missing or empty means `default`, required when there is none."""
    value = body.get(name)
    if value is None or value == "":
        if default is ...:
            raise PromptError(f"{name} is missing; fill it in")
        return default
    try:
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = kind(value)
        if kind is int and isinstance(value, float) and not value.is_integer() or not math.isfinite(number):
            raise ValueError
        return number
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number", str: "text"}[kind]
        raise PromptError(f"{name} must be {what}, got {value!r}") from None


def unknown(body: dict) -> str:
    """The page's policy for characters the model never saw: error (the default), skip or replace."""
    return field(body, "unknown", str, "error")


def check_length(text: str) -> None:
    if len(text) > MAX_TEXT:
        raise PromptError(f"the text has {len(text):,} characters; this page reads at most {MAX_TEXT:,} at a time")


def upto(body: dict) -> str:
    """The text up to and including the character at `position`: what the model had read there."""
    text, position = field(body, "text", str), field(body, "position", int)
    check_length(text)
    if not 0 <= position < len(text):
        raise PromptError(f"position {position} is outside the text (0 to {len(text) - 1})")
    return text[:position + 1]


GETS: dict[str, Callable[[Viewer], dict]] = {"/api/info": Viewer.info, "/api/exact": Viewer.exact, "/api/curves": Viewer.curves}
POSTS: dict[str, Callable[[Viewer, dict], dict]] = {"/api/read": Viewer.read, "/api/attention": Viewer.attention,
                                                    "/api/explain": Viewer.explain}


class Handler(BaseHTTPRequestHandler):
    """One request: a page file, a JSON answer, or the lines of a generation."""

    viewer: Viewer  # set on the class made by `make_server`
    server_version = "minigpt-view"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in PAGES:
            name, kind = PAGES[path]
            self.send(HTTPStatus.OK, (resources.files("minigpt") / "web" / name).read_bytes(), kind)
        elif path in GETS:
            self.answer(lambda: GETS[path](self.viewer))
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}; the page is at /"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/generate":
            self.stream_lines()
        elif path in POSTS:
            self.answer(lambda: POSTS[path](self.viewer, self.body()))
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {path}"})

    def body(self) -> dict:
        size = int(self.headers.get("Content-Length") or 0)
        if size > MAX_BODY:
            raise PromptError(f"the request is {size:,} bytes; at most {MAX_BODY:,} are read")
        try:
            body = json.loads(self.rfile.read(size).decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PromptError(f"the request is not JSON in UTF-8 ({e})") from None
        if not isinstance(body, dict):
            raise PromptError("the request must be a JSON object")
        return body

    def answer(self, compute: Callable[[], dict]) -> None:
        try:
            self.send_json(HTTPStatus.OK, compute())
        except MiniGPTError as e:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": e.for_page()})
        except Exception as e:  # a bug: one line on the page, the traceback on the server's terminal
            traceback.print_exc()
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {first_line(str(e)) or type(e).__name__}"})

    def stream_lines(self) -> None:
        """Lines of JSON: {"piece": text} as the characters come, then {"done": true} (or {"error": ...})."""
        try:
            pieces = self.viewer.generate(self.body())
            first = next(pieces, "")
        except MiniGPTError as e:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": e.for_page()})
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            for piece in [first] if first else []:
                self.line({"piece": piece})
            for piece in pieces:
                self.line({"piece": piece})
            self.line({"done": True})
        except (BrokenPipeError, ConnectionResetError):
            pieces.close()  # the page went away: stop generating
        except MiniGPTError as e:
            self.line({"error": e.for_page()})

    def line(self, message: dict) -> None:
        self.wfile.write(json.dumps(message).encode("utf-8") + b"\n")
        self.wfile.flush()

    def send_json(self, status: HTTPStatus, data: Any) -> None:
        self.send(status, json.dumps(data, allow_nan=False).encode("utf-8"), "application/json")

    def send(self, status: HTTPStatus, content: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
        pass  # quiet: the terminal shows the address and errors, not every request


def make_server(model: Any, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server for `model` on host:port (port 0: a free one), not yet serving."""
    handler = type("ModelHandler", (Handler,), {"viewer": Viewer(model)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another {{--port}}, "
                          "or --port 0 for any free one") from None
    server.daemon_threads = True
    return server


def address(server: ThreadingHTTPServer) -> str:
    """The page's URL."""
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in str(host) else host
    return f"http://{host}:{port}/"


def serve(model: Any, host: str, port: int, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
    """Serve the page until Ctrl-C."""
    server = make_server(model, host, port)
    if host not in LOOPBACK:
        say(f"warning: listening on {host}: anyone who can reach this machine on port {server.server_address[1]} "
            "can use this model and read its run; use --host 127.0.0.1 to keep it to this machine")
    say(f"minigpt view: {model.path} at {address(server)} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:  # Ctrl-C: the command says what it stopped
        server.server_close()

