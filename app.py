"""Gradio Space of SmolLM2-DeepSeek: complete a text or chat with it, watch which experts route every token, and see
what each routed expert took over a fixed sample text.

    python app.py                       # serves checkpoints/final on http://127.0.0.1:7860 (0.0.0.0 on a Space)
    MODEL_DIR=runs/x/final python app.py
    MODEL_REPO=user/smollm2-deepseek python app.py   # download from the Hub, fall back to MODEL_DIR on any error

The engine (loading, the dtype probe, input checks, admission, streaming with routing capture) is serve.py; this
file is the page around it. Tests build the page without launching it: `build_demo(model_dir)`
returns the gr.Blocks, `launch(demo, ...)` serves.
Environment: MODEL_DIR (default checkpoints/final next to this file), MODEL_REPO (optional Hub repo id),
GRADIO_SERVER_NAME (default 127.0.0.1; 0.0.0.0 when SPACE_ID says this is a Hugging Face Space),
GRADIO_SERVER_PORT or PORT (default 7860).
API: /generate(prompt, temperature, top_k, max_new_tokens) and /chat(message, history, temperature, top_k,
max_new_tokens), both streaming (gradio_client).
"""
import asyncio
import base64
import contextlib
import html
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
import gradio as gr
import plotly.graph_objects as go
from gradio.data_classes import GradioRootModel

from serve import (MAX_BATCH, MAX_PROMPT_CHARS, MAX_TEMPERATURE, Engine, clean_text, display_path, probe_summary,
                   resolve_model_dir)

APP_DIR = os.path.dirname(os.path.abspath(__file__))
EXPERTS_JSON = "experts.json"  # beside the weights; written by experts_report.py
# Streamed updates cost the server CPU that the decode loop needs (2 cores): a stream's text and token view are sent
# at most every UI_UPDATE_S x the streams running (so the page sends ~1 / UI_UPDATE_S updates a second in all, however
# many visitors), the heatmap and the routing JSON (~2 KB per token so far, which Gradio diffs against the last one
# sent: the costliest part) at most every ROUTING_EVERY_S x the streams running; all of them at the start and the end.
# Measured on the shipped model, one stream: 6.8-7.7 tok/s through the page with the JSON in every update, 10.4-10.7
# without it, against 9.5-11.2 from the engine itself.
UI_UPDATE_S = 0.1
ROUTING_EVERY_S = 1.0
# Admission, chosen by bench/bench_app_load.py on 2 cores (results/app_load.json): streams running at once, and how
# many more may wait in line before visitors are asked to come back later
QUEUE_WORKERS = MAX_BATCH  # running streams are decoded together in one batch (serve.Batcher)
QUEUE_MAX_WAITING = 16
WAIT_POLL_S = 0.25  # how often a waiting visitor's place in line is refreshed
STOP_TEXT = "\nUser:"  # a chat reply ends where the model starts the visitor's next turn
CORPUS_TOKENS = 11.34e6  # the offline training corpus (open textbooks) in this tokenizer's tokens
SMOLLM2_GQA_VALUES = 2 * 3 * 64  # SmolLM2-135M caches K and V of 3 kv heads x 64 dims per token per layer
LOCK = threading.Lock()
EXAMPLES = [
    "Photosynthesis is the process by which",
    "By the end of this section, you will be able to:",
    "The law of demand states that",
    "In the early nineteenth century, the United States",
    "A good way to prepare for an exam is",
]
# ColorBrewer Set3: light enough for dark text on top
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#d9d9d9",
           "#bc80bd", "#ccebc5", "#ffed6f"]


# ----------------------------------------------------------------------------------------------------------------
# The streams behind the page's events (Gradio-facing: admission messages, per-token updates)


def _session(request) -> str | None:
    return getattr(request, "session_hash", None)


def busy_message(engine: Engine) -> str:
    a = engine.admission
    return (f"🚦 **The Space is busy**: {a.active} generation{'s' if a.active != 1 else ''} running and {a.waiting} "
            "waiting, as many as it takes at once on its 2 CPU cores. Nothing was queued: please try again in a "
            "minute.")


def waiting_message(engine: Engine, ticket, place: int) -> str:
    eta = engine.admission.estimate(ticket)
    when = f"about {eta:.0f} s before yours starts" if eta is not None else "it starts as soon as a slot frees up"
    return (f"⏳ **In line**: number {place} (the Space runs {engine.admission.workers} generations at once on 2 CPU "
            f"cores); {when}.")


async def _wait_turn(engine: Engine, ticket):
    """Yields the ticket's place in line while it waits; returns once a running slot is held."""
    while (place := engine.admission.poll(ticket)) > 0:
        yield place
        await asyncio.sleep(WAIT_POLL_S)


@dataclass
class StreamOutcome:
    """How a stream ended, filled in by UI._token_steps: why it stopped, an error, and its TextAssembler."""

    reason: str = "reached the max new tokens"
    error: str | None = None
    text: object = None


class UpdatePacer:
    """Whether a stream's next page update is due (see UI_UPDATE_S): the first token's at once, then text at most
    every UI_UPDATE_S and routing (heatmap, JSON) at most every ROUTING_EVERY_S, each times the streams running."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.shown, self.routed = float("-inf"), time.perf_counter()

    def due(self) -> tuple[bool, bool]:
        """(send the text now, send the routing with it)."""
        now, running = time.perf_counter(), max(1, self.engine.admission.active)
        if now - self.shown < UI_UPDATE_S * running:
            return False, False
        self.shown = now
        routing = now - self.routed >= ROUTING_EVERY_S * running
        if routing:
            self.routed = now
        return True, routing


async def _next(iterator):
    """One step of a (blocking, torch) iterator in a worker thread: the event loop keeps serving other visitors."""
    return await anyio.to_thread.run_sync(next, iterator, None)


def new_record(engine: Engine, prompt_ids: list[int]) -> dict:
    cfg = engine.model.config
    return {"prompt": engine.tokenizer.decode(prompt_ids, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False),
            "prompt_tokens": len(prompt_ids), "moe_layers": engine.moe_layers,
            "n_routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "expert_load": [[0] * cfg.n_routed_experts for _ in engine.moe_layers], "tokens": []}


def add_token(data: dict, token_id: int, piece: str, routing: list[dict]) -> None:
    for pos, r in enumerate(routing):
        for e in r["experts"]:
            data["expert_load"][pos][e] += 1
    data["tokens"].append({"index": len(data["tokens"]), "id": token_id, "text": piece, "routing": routing})


def _snapshot(data: dict) -> dict:
    """A copy for one streamed update: Gradio diffs consecutive outputs, so the mutable parts must not be shared."""
    return {**data, "expert_load": [row[:] for row in data["expert_load"]], "tokens": list(data["tokens"])}


def _settings_line(s: dict, prompt_tokens: int) -> str:
    sampling = ("greedy (temperature 0)" if s["temperature"] == 0 else
                f"temperature {s['temperature']:g}, " + (f"top-k {s['top_k']}" if s["top_k"] else "top-k off"))
    return f"**Settings**: {sampling}; prompt {prompt_tokens} tokens; max {s['max_new']} new tokens."


class Streams:
    """The /generate and /chat streams: one stream per visitor at a time, admitted by engine.admission, each token's
    routing captured; Stop ends a stream after its current token with a complete final update."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # (session, tab) -> the MoE layer that tab's token view shows: each tab keeps its own choice
        self.layer_choice: dict[tuple[str, str], int] = {}

    def _begin(self, session, kind) -> bool:
        """Claim this session's one stream (False: it already has one running, e.g. two clicks in one tick)."""
        if session is None:
            return True
        with LOCK:
            if session in self.engine.running:
                return False
            self.engine.running[session] = kind
            self.engine.stopping.discard(session)
            return True

    def _end(self, session) -> None:
        if session is not None:
            self.engine.running.pop(session, None)
            self.engine.stopping.discard(session)

    async def generate(self, prompt, temperature, top_k, max_new_tokens, request: gr.Request = None):
        """`/generate`: yields (continuation, status, token view html, heatmap, routing json)."""
        engine, session = self.engine, _session(request)
        if not engine.ok:
            yield "", error_markdown(engine), empty_view("No model loaded."), None, None
            return
        settings, notes = engine.prepare(prompt, temperature, top_k, max_new_tokens)
        if settings is None:
            yield "", "\n\n".join(notes), empty_view("Nothing generated yet."), None, None
            return
        if not self._begin(session, "generate"):
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()  # its stream is already running
            return
        async for update in self._in_line(
                session, settings["max_new"],
                busy=lambda: ("", busy_message(engine), empty_view("Nothing generated: the Space is busy."), None,
                              None),
                waiting=lambda ticket, place: ("", waiting_message(engine, ticket, place),
                                               empty_view("Waiting for a free slot…"), None, None),
                run=lambda ticket: self._generate_admitted(settings, notes, session, ticket)):
            yield update

    async def _in_line(self, session, budget, busy, waiting, run):
        """A stream of up to `budget` tokens through the admission line, after _begin let the session start one:
        `busy()` when the line is full, `waiting(ticket, place)` while it waits, then run(ticket)'s updates once
        admitted; the slot is always given back."""
        engine = self.engine
        try:
            ticket = engine.admission.join(budget)
            if ticket is None:
                yield busy()
                return
            admitted = False
            try:
                async for place in _wait_turn(engine, ticket):
                    yield waiting(ticket, place)
                admitted = True
                engine.streams_started += 1
                async for update in run(ticket):
                    yield update
            finally:
                if admitted:
                    engine.admission.leave(ticket)
                else:
                    engine.admission.cancel(ticket)
        finally:
            self._end(session)

    async def _token_steps(self, data, ids, settings, session, ticket, outcome: "StreamOutcome"):
        """The stream's tokens from the engine (in a worker thread), each added to `data`; yields the token count
        after each. It ends at the Stop button or the end-of-text token (outcome.reason says which) or on a failure
        (outcome.error: reported with what was generated so far); the engine's producer is always closed."""
        engine = self.engine
        steps = engine.tokens(ids, settings)
        try:
            while (step := await _next(steps)) is not None:
                token_id, piece, routing, outcome.text = step
                add_token(data, token_id, piece, routing)
                engine.admission.progress(ticket, len(data["tokens"]))  # what waiting visitors' estimates use
                if session is not None and session in engine.stopping:
                    outcome.reason = "stopped with the Stop button"
                    return
                yield len(data["tokens"])
            if len(data["tokens"]) < settings["max_new"]:
                outcome.reason = ("stopped at the end of the model's turn" if "stop" in settings
                                  else "stopped at the end-of-text token")
        except Exception as err:
            outcome.error = f"⚠️ **Generation failed**: {type(err).__name__}: {err}"
        finally:
            _close(steps)

    def _layer(self, session, tab: str):
        """The MoE layer `tab` ("generate" or "chat") shows for this session: its own dropdown's last choice."""
        default = self.engine.moe_layers[0] if self.engine.moe_layers else None
        return self.layer_choice.get((session, tab), default)

    def _new_view(self, ids, settings, notes):
        """A fresh routing record for a stream, its status header and token view."""
        engine = self.engine
        header = "\n\n".join(notes + [_settings_line(settings, len(ids))])
        return new_record(engine, ids), header, TokenView(engine.moe_layers)

    async def _generate_admitted(self, settings, notes, session, ticket):
        ids, max_new = settings["ids"], settings["max_new"]
        data, header, view = self._new_view(ids, settings, notes)
        layer = self._layer(session, "generate")
        yield "", f"{header}\n\n⏳ Generating…", view.render(data, layer), load_heatmap(data), _snapshot(data)
        t0, outcome, pacer = time.perf_counter(), StreamOutcome(), UpdatePacer(self.engine)
        async with contextlib.aclosing(self._token_steps(data, ids, settings, session, ticket, outcome)) as tokens:
            async for n in tokens:
                text_due, routing_due = pacer.due() if n < max_new else (False, False)
                if text_due:
                    layer = self._layer(session, "generate")
                    rate = n / max(time.perf_counter() - t0, 1e-9)
                    plot = routing = gr.skip()
                    if routing_due:
                        plot, routing = load_heatmap(data), _snapshot(data)
                    status = f"{header}\n\n⏳ Generating… {n}/{max_new} tokens ({rate:.1f} tokens/s)"
                    yield outcome.text.text, status, view.render(data, layer), plot, routing
        n = len(data["tokens"])
        seconds = time.perf_counter() - t0
        label = "⏹ Stopped" if outcome.reason.startswith("stopped with") else "✓ Done"
        done = outcome.error or (
            f"{label}: {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s); {outcome.reason}."
            if n else "✓ Done: the model ended the text at once (end-of-text token); nothing to show.")
        layer = self._layer(session, "generate")
        data["text"] = outcome.text.final() if outcome.text else ""
        yield data["text"], f"{header}\n\n{done}", view.render(data, layer), load_heatmap(data), _snapshot(data)

    async def chat(self, message, history, temperature, top_k, max_new_tokens, request: gr.Request = None):
        """`/chat`: yields (conversation, status, token view html of the reply, routing json of the reply)."""
        engine, session = self.engine, _session(request)
        history, problem = normalise_history(history)
        if problem:  # an API client sent something that is not a conversation: say what, never a traceback
            yield [], f"⚠️ **The chat history was not understood**: {problem}.", gr.skip(), gr.skip()
            return
        message = "" if message is None else str(message)
        if not engine.ok:
            yield history, error_markdown(engine), empty_view("No model loaded."), None
            return
        if not message.strip():
            yield history, "⚠️ **Empty message**: type something to say.", gr.skip(), gr.skip()
            return
        settings, notes = engine.check_settings(temperature, top_k, max_new_tokens)
        message = message[-MAX_PROMPT_CHARS:]
        ids = engine.chat_prompt(history, message, settings["max_new"], notes)  # notes any invalid characters
        if engine.end_of_turn is not None:  # a chat model's reply ends at its end-of-turn token (or end of text)
            settings["stop"] = (engine.model.config.eos_token_id, engine.end_of_turn)
        message = clean_text(message)[0]
        if ids is None:
            yield history, "\n\n".join(notes), gr.skip(), gr.skip()
            return
        if not self._begin(session, "chat"):
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        conversation = history + [{"role": "user", "content": message}]
        async for update in self._in_line(
                session, settings["max_new"],
                busy=lambda: (conversation, busy_message(engine), empty_view("Nothing generated: the Space is busy."),
                              None),
                waiting=lambda ticket, place: (conversation, waiting_message(engine, ticket, place), gr.skip(),
                                               gr.skip()),
                run=lambda ticket: self._chat_admitted(conversation, ids, settings, notes, session, ticket)):
            yield update

    async def _chat_admitted(self, conversation, ids, settings, notes, session, ticket):
        data, header, view = self._new_view(ids, settings, notes)
        layer = self._layer(session, "chat")
        data["prompt"] = ""  # the token view shows the reply alone (the transcript is on the left)
        reply = {"role": "assistant", "content": ""}
        yield conversation + [reply], f"{header}\n\n⏳ Replying…", view.render(data, layer), _snapshot(data)
        t0, outcome, pacer = time.perf_counter(), StreamOutcome(), UpdatePacer(self.engine)
        async with contextlib.aclosing(self._token_steps(data, ids, settings, session, ticket, outcome)) as tokens:
            async for n in tokens:
                cut = outcome.text.text.find(STOP_TEXT)
                if cut >= 0:  # the model started the visitor's next turn: the reply ends before it
                    outcome.reason = f"stopped at the next “{STOP_TEXT.strip()}”"
                    _keep_tokens_before(data, cut)
                    break
                text_due, routing_due = pacer.due()
                if not text_due:
                    continue
                reply["content"] = shown_reply(outcome.text.text)
                layer = self._layer(session, "chat")
                routing = _snapshot(data) if routing_due else gr.skip()
                yield (conversation + [dict(reply)], f"{header}\n\n⏳ Replying… {n} tokens",
                       view.render(data, layer), routing)
        full = outcome.text.final() if outcome.text else ""
        cut = full.find(STOP_TEXT)
        reply["content"] = (full[:cut] if cut >= 0 else full).strip()
        data["text"] = reply["content"]
        n, seconds = len(data["tokens"]), time.perf_counter() - t0
        if not reply["content"]:
            reply["content"] = "…"  # an empty bubble would look like a bug: say nothing came
        done = outcome.error or (f"✓ Done: {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s); "
                                 f"{outcome.reason}.")
        layer = self._layer(session, "chat")
        view.spans = []  # tokens may have been dropped after the stop: redraw
        yield conversation + [reply], f"{header}\n\n{done}", view.render(data, layer), _snapshot(data)

    def request_stop(self, request: gr.Request = None):
        """Stop: this session's stream (waiting or running) ends after its current token with a final update."""
        session = _session(request)
        if session is not None and session in self.engine.running:
            self.engine.stopping.add(session)

    def select_layer(self, tab: str, layer, data, request: gr.Request = None):
        """`tab`'s layer dropdown ("generate" or "chat"): remember the choice for this session's streams in that tab
        (the other tab keeps its own) and redraw that tab's token view."""
        session = _session(request)
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            layer = self.engine.moe_layers[0] if self.engine.moe_layers else None
        if session is not None:
            self.layer_choice[(session, tab)] = layer
        if not data or not data.get("moe_layers"):
            return empty_view("Generate some text to see its routing.")
        return TokenView(data["moe_layers"]).render(data, layer)

    def select_generate_layer(self, layer, data, request: gr.Request = None):
        return self.select_layer("generate", layer, data, request)

    def select_chat_layer(self, layer, data, request: gr.Request = None):
        return self.select_layer("chat", layer, data, request)

    def forget_session(self, request: gr.Request = None):
        session = _session(request)
        for tab in ("generate", "chat"):
            self.layer_choice.pop((session, tab), None)
        self.engine.stopping.discard(session)


def _close(iterator) -> None:
    try:
        iterator.close()
    except ValueError:  # still running a step in its worker thread (the visitor left): it ends after that step
        pass


def _keep_tokens_before(data: dict, cut: int) -> None:
    """Drop the tokens that start at or after character `cut` of the generated text (and their expert load)."""
    start, kept = 0, []
    for token in data["tokens"]:
        if start >= cut:
            break
        kept.append(token)
        start += len(token["text"])
    for token in data["tokens"][len(kept):]:
        for pos, r in enumerate(token["routing"]):
            for e in r["experts"]:
                data["expert_load"][pos][e] -= 1
    data["tokens"] = kept


def shown_reply(text: str) -> str:
    """The reply as streamed: without a trailing partial "\\nUser:" that may be the start of the next turn."""
    for k in range(len(STOP_TEXT) - 1, 0, -1):
        if text.endswith(STOP_TEXT[:k]):
            return text[: -k].strip()
    return text.strip()


def normalise_history(history) -> tuple[list[dict], str | None]:
    """A Chatbot value (from the page or an API client) -> ([{"role", "content": str}], None), text messages only;
    or ([], what is wrong) for a value that is not a conversation (the caller tells the client, no traceback)."""
    if history is None or history == "":
        return [], None
    if not isinstance(history, (list, tuple)):
        return [], f"expected a list of messages, got {type(history).__name__}"
    out = []
    for i, m in enumerate(history, 1):
        if isinstance(m, (list, tuple)) and len(m) == 2:  # [user, assistant] pairs from older clients
            out += [{"role": "user", "content": _content_text(m[0])},
                    {"role": "assistant", "content": _content_text(m[1])}]
        elif isinstance(m, dict) and m.get("role") in ("user", "assistant"):
            out.append({"role": m["role"], "content": _content_text(m.get("content"))})
        elif isinstance(m, dict):
            role = str(m.get("role"))[:40]
            return [], (f"message {i} has the role {role!r}; each message needs \"role\": \"user\" or "
                        "\"assistant\" and a \"content\"")
        else:
            return [], (f"message {i} is a {type(m).__name__}, not a {{\"role\", \"content\"}} message or a "
                        "[user, assistant] pair")
    return [m for m in out if m["content"] is not None], None


def _content_text(content) -> str | None:
    if content is None:
        return None
    if isinstance(content, str):
        return clean_text(content)[0]
    if isinstance(content, dict):
        return _content_text(content.get("text", content.get("value")))
    if isinstance(content, list):
        parts = [_content_text(c) for c in content]
        return " ".join(p for p in parts if p)
    return clean_text(str(content))[0]
# ----------------------------------------------------------------------------------------------------------------
# Routing views


def expert_color(expert: int) -> str:
    if expert < len(PALETTE):
        return PALETTE[expert]
    return f"hsl({(expert * 137.508) % 360:.0f}, 65%, 78%)"


def empty_view(message: str) -> str:
    return f'<div id="routing-empty" style="color:#777;padding:8px">{html.escape(message)}</div>'


class TokenView:
    """The generated text coloured by each token's top-weighted expert in one MoE layer, with every layer's choice
    in the hover title. Spans are cached per layer so a streamed update costs one join, not a re-render."""

    def __init__(self, moe_layers: list[int]):
        self.moe_layers = list(moe_layers)
        self.layer = None
        self.spans: list[str] = []

    def render(self, data: dict, layer) -> str:
        if layer not in self.moe_layers:
            layer = self.moe_layers[0] if self.moe_layers else None
        if layer != self.layer:
            self.layer, self.spans = layer, []
        tokens = data["tokens"]
        pos = self.moe_layers.index(layer) if layer is not None else None
        for token in tokens[len(self.spans):]:
            self.spans.append(token_span(token, pos))
        prompt = data.get("prompt", "")
        if len(prompt) > 600:
            prompt = "…" + prompt[-600:]
        legend = ""
        if pos is not None:
            chips = "".join(f'<span style="background:{expert_color(e)};color:#111;border-radius:4px;padding:1px 6px;'
                            f'margin-right:4px">E{e}</span>' for e in range(len(data["expert_load"][pos])))
            legend = (f'<div style="margin-bottom:6px;font-size:0.85em;line-height:1.9">Layer {layer}: colour = '
                      'top-weighted routed expert, underline = its weight; tap (or hover) a token to see its '
                      'routing in every layer. '
                      f'{chips}</div>')
        # Append-only on purpose: while streaming each update only adds spans, so Gradio sends just the new ones
        # (it diffs string outputs by prefix). The HTML parser closes the two open divs at the end of the fragment.
        return (f'<div id="routing-tokens" data-layer="{layer}">{legend}'
                '<div style="white-space:pre-wrap;font-family:ui-monospace,monospace;line-height:1.7">'
                f'<span style="color:#888">{html.escape(prompt)}</span>{"".join(self.spans)}')


def token_span(token: dict, pos: int | None) -> str:
    lines = [f"token {token['index']}: {token['text']!r} (id {token['id']})"]
    for i, r in enumerate(token["routing"]):
        mark = "▶ " if i == pos else "  "
        lines.append(mark + f"layer {r['layer']}: " +
                     ", ".join(f"E{e} {w:.2f}" for e, w in zip(r["experts"], r["weights"])))
    title = html.escape("\n".join(lines), quote=True)
    text = token["text"]
    # a token that completes no character on its own (one byte of a multi-byte one) gets a mark: an empty span
    # could be neither seen nor tapped
    shown = html.escape(text.replace("\n", "↵\n")) if text else '<span style="color:#888">◌</span>'
    if pos is None or pos >= len(token["routing"]):
        return f'<span class="tok" title="{title}">{shown}</span>'
    top = token["routing"][pos]["experts"][0]
    weight = token["routing"][pos]["weights"][0]
    return (f'<span class="tok" data-expert="{top}" title="{title}" style="background:{expert_color(top)};color:#111;'
            f'border-radius:3px;box-shadow:inset -1px 0 #fff,inset 0 -{1 + round(3 * weight)}px rgba(0,0,0,0.3)">'
            f'{shown}</span>')


def load_heatmap(data: dict):
    """Layers x experts: how many generated tokens each routed expert took (a plotly figure, ~ms to build)."""
    if not data or not data.get("moe_layers"):
        return None
    n = len(data["tokens"])
    z = data["expert_load"]
    experts = [f"E{e}" for e in range(data["n_routed_experts"])]
    layers = [f"layer {layer}" for layer in data["moe_layers"]]
    fig = go.Figure(go.Heatmap(
        z=z, x=experts, y=layers, colorscale="Blues", zmin=0, zmax=max(1, n), text=z, texttemplate="%{text}",
        hovertemplate="%{y}, expert %{x}: %{z} of " + str(n) + " tokens<extra></extra>",
        colorbar=dict(title=dict(text="tokens"), thickness=10)))
    # a short two-line title, left-aligned: it fits a 390-px phone (the one-line title was cut there)
    fig.update_layout(title=dict(text=f"Expert load: {n} tokens<br><sup>top-{data['experts_per_token']} experts "
                                      "per token per layer</sup>", font=dict(size=14), x=0, xanchor="left",
                                 xref="paper"),
                      height=150 + 28 * len(layers), margin=dict(l=64, r=10, t=56, b=30), autosize=True)
    fig.update_yaxes(autorange="reversed")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Experts view: what each routed expert took over a fixed sample text (experts_report.py writes the JSON)


def load_experts_report(engine: Engine) -> tuple[dict | None, str]:
    """The checkpoint's experts.json when it was computed from these very weights, and a note for the page."""
    path = os.path.join(engine.model_dir, EXPERTS_JSON)
    report = _read_json(path)
    if not engine.ok:
        return None, "No model loaded."
    if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
        return None, (f"No expert report beside this checkpoint (`{EXPERTS_JSON}`). Make one with "
                      f"{report_command(engine.model_dir)} (a few seconds).")
    if report.get("weights_sha256") != engine.weights_hash:
        return None, (f"⚠️ The expert report beside this checkpoint is **stale**: it was computed from other weights "
                      f"(sha256 {str(report.get('weights_sha256'))[:12]}…, these are {engine.weights_hash[:12]}…), "
                      f"so it is not shown. Regenerate it with {report_command(engine.model_dir)}.")
    sample = report.get("sample", {})
    texts = sample.get("texts")
    what = f"{texts} short paragraphs in the style of the training textbooks" if isinstance(texts, int) else "text"
    return report, (f"Over a fixed sample of {sample.get('tokens', '?')} tokens ({what}), the "
                    "tokens each routed expert took most often. **share** = that token's part of the expert's load; "
                    "**of token** = how often that token went to this expert (out of all its occurrences). The bar "
                    "under each expert is its load relative to an even split. Tokens shown are what the router "
                    "picked, not what an expert 'means'.")


WHITESPACE_MARKS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def shown_token(token: str) -> str:
    """A token as the Experts tab shows it: whitespace drawn (␣ ↵ ⇥), other control characters escaped, an empty
    one as ◌, so no cell looks blank."""
    if not token:
        return "◌"
    return "".join(WHITESPACE_MARKS.get(c) or (repr(c)[1:-1] if not c.isprintable() else c) for c in token)


def report_command(model_dir: str) -> str:
    """The command that writes experts.json for the served model: its directory named when it is inside the app
    (a path outside it is not shown to visitors; experts_report.py then follows the app's MODEL_DIR)."""
    where = display_path(model_dir)
    if os.path.abspath(model_dir).startswith(APP_DIR + os.sep):
        return f"`python experts_report.py {where}` (it writes `{where}/{EXPERTS_JSON}`)"
    return (f"`python experts_report.py` run with the app's `MODEL_DIR` (it writes `{EXPERTS_JSON}` into the served "
            f"model's directory, `…/{where}`)")


def experts_table(report: dict | None, layer) -> str:
    if not report:
        return empty_view("No expert report to show.")
    layers = {entry["layer"]: entry for entry in report["layers"]}
    try:
        entry = layers[int(layer)]
    except (KeyError, TypeError, ValueError):
        entry = report["layers"][0]
    experts = entry["experts"]
    total = sum(e["load"] for e in experts) or 1
    even = total / max(1, len(experts))
    cells = []
    for e in experts:
        rows = "".join(
            f'<tr><td class="tokcell" title="{html.escape(repr(t["token"]), quote=True)}">'
            f'<code>{html.escape(shown_token(t["token"]))}</code></td>'
            f'<td style="text-align:right">{100 * t["share"]:.0f}%</td>'
            f'<td style="text-align:right;color:#666">{100 * t["of_token"]:.0f}%</td></tr>'
            for t in e["top"])
        rel = e["load"] / even
        cells.append(
            f'<div class="expert-card" data-expert="{e["expert"]}">'
            f'<div style="background:{expert_color(e["expert"])};color:#111;border-radius:4px;padding:2px 6px;'
            f'font-weight:600">E{e["expert"]} · {e["load"]} tokens</div>'
            f'<div title="load vs an even split" style="height:5px;background:#eee;margin:4px 0">'
            f'<div style="height:5px;width:{min(100, 50 * rel):.0f}%;background:#555"></div></div>'
            '<table><colgroup><col style="width:46%"><col style="width:24%"><col style="width:30%"></colgroup>'
            f'<tr><th style="text-align:left">token</th><th>share</th><th>of token</th></tr>{rows}</table></div>')
    # the grid and the fixed-layout tables are styled in CSS below: every card is as wide as its column and every
    # table as wide as its card, whatever the tokens
    return f'<div id="experts-grid" data-layer="{entry["layer"]}">' + "".join(cells) + "</div>"


# ----------------------------------------------------------------------------------------------------------------
# About panel


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill
    except OSError:
        pass
    return [r for r in rows if isinstance(r, dict)]


def _find(model_dir: str, name: str) -> str | None:
    """Training artefacts sit in the checkpoint dir or beside it (checkpoints/ holds final/ and the plot)."""
    for folder in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _fmt(value, spec: str = ".4f") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "n/a"


def _tokens(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "n/a"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{int(n):,}"


def layer_pattern_row(cfg) -> str:
    """About's table row for a KDA + MLA hybrid (issue 22): which layers are which; "" for an all-MLA model."""
    if not cfg.is_hybrid:
        return ""
    pattern = " ".join("M" if i in cfg.mla_layers else "K" for i in range(cfg.num_hidden_layers))
    return (f"| Layer pattern | hybrid in the way of Kimi Linear: `{pattern}` (K = KDA, Kimi Delta Attention, "
            f"{cfg.linear_num_heads} heads × {cfg.linear_head_dim}, a fixed-size state of {cfg.kda_state_values:,} "
            f"values per sequence; M = MLA without rope, at layers {', '.join(map(str, cfg.mla_layers))}): "
            f"the KV cache grows in {len(cfg.mla_layers)} of {cfg.num_hidden_layers} layers only |\n")


def about_markdown(engine: Engine) -> str:
    parts = []
    tokens_seen = None
    summary = _read_json(os.path.join(engine.model_dir, "training_summary.json"))
    if engine.ok:
        cfg = engine.model.config
        counts = engine.model.count_parameters()
        values = cfg.kv_cache_values_per_token
        parts.append(
            "### Architecture\n"
            "SmolLM2's recipe (tokenizer, pre-norm blocks, SwiGLU, tied embeddings) rebuilt with DeepSeek-V3's "
            "**Multi-head Latent Attention** and **Mixture-of-Experts** with auxiliary-loss-free load balancing.\n\n"
            "| Part | This model |\n|---|---|\n"
            f"| Parameters | **{counts['total'] / 1e6:.2f} M total**, **{counts['active'] / 1e6:.2f} M active** per "
            f"token ({counts['routed_expert'] / 1e6:.2f} M in routed experts) |\n"
            f"| Layers | {cfg.num_hidden_layers} (first {cfg.first_k_dense_replace} dense, {cfg.num_moe_layers} MoE), "
            f"hidden size {cfg.hidden_size}, {cfg.num_attention_heads} heads |\n"
            f"| MLA | latent c<sub>KV</sub> of {cfg.kv_lora_rank} + shared rope key of {cfg.qk_rope_head_dim}; "
            f"per-head dims nope {cfg.qk_nope_head_dim}, rope {cfg.qk_rope_head_dim}, value {cfg.v_head_dim}; "
            f"queries {'low-rank ' + str(cfg.q_lora_rank) if cfg.q_lora_rank else 'full-rank'} |\n"
            f"| KV cache | **{values} values per token per layer** ({values * 4} B fp32, {values * 2} B bf16; "
            f"{values * 4 * len(cfg.mla_layers) / 1024:.1f} KiB per token over all MLA layers in fp32) vs "
            f"{SMOLLM2_GQA_VALUES} for SmolLM2-135M's GQA (3 kv heads × 64 dims × K and V): "
            f"**{values / SMOLLM2_GQA_VALUES:.2f}×** |\n"
            f"{layer_pattern_row(cfg)}"
            f"| MoE | {cfg.n_routed_experts} routed experts, top-{cfg.num_experts_per_tok} per token, "
            f"{cfg.n_shared_experts} shared; sigmoid router, a bias picks experts (balancing), weights from the "
            f"unbiased scores; expert size {cfg.moe_intermediate_size} |\n"
            f"| Context, vocabulary | context {cfg.max_position_embeddings} tokens; vocabulary {cfg.vocab_size:,} "
            "(SmolLM2 tokenizer) |\n")
    parts.append("### Training")
    if isinstance(summary, dict):
        tokens_seen = summary.get("tokens_seen")
        val = summary.get("val_loss")
        ppl = f" (perplexity {math.exp(val):.1f})" if isinstance(val, (int, float)) and val < 50 else ""
        parts.append(f"- Steps: {summary.get('step', 'n/a')}; tokens seen: {_tokens(tokens_seen)}\n"
                     f"- Final train loss {_fmt(summary.get('train_loss'))}, validation loss {_fmt(val)}{ppl}")
    else:
        parts.append("- No `training_summary.json` next to the checkpoint.")
    metrics_path = _find(engine.model_dir, "metrics.jsonl")
    rows = _read_jsonl(metrics_path) if metrics_path else []
    if rows:
        val_rows = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
        line = f"- metrics.jsonl: {len(rows)} logged steps"
        if val_rows:
            best = min(val_rows, key=lambda r: r["val_loss"])
            line += f"; best validation loss {_fmt(best['val_loss'])} at step {best.get('step', '?')}"
        vio = rows[-1].get("max_vio")
        if isinstance(vio, list) and vio:
            line += f"; last MaxVio (expert load imbalance, 0 = perfect) {sum(vio) / len(vio):.3f} mean over layers"
        parts.append(line)
    samples_path = _find(engine.model_dir, "samples.jsonl")
    samples = _read_jsonl(samples_path) if samples_path else []
    if samples:
        last = samples[-1].get("step")
        shown = [s for s in samples if s.get("step") == last][:3]
        parts.append(f"\n**Samples logged at step {last}** (temperature 0.8, top-k 50):\n" + "\n".join(
            "> " + html.escape(str(s.get("text", ""))[:300]).replace("\n", " ") + "…\n" for s in shown))
    # the checkpoint's own card (README.md: provenance, licence, its limits) says what it is; without one, the
    # limits of a model trained here from scratch
    parts.append(model_card(engine.model_dir) or honest_limits(tokens_seen))
    if engine.note:
        parts.append(f"\n*{engine.note}*")
    if engine.ok:
        probe = engine.dtype_probe or {}
        measured = f" (start-up probe, {probe_summary(probe)})" if probe else ""
        parts.append(f"\n### Serving\n- Weights in **{engine.dtype_name}** on this CPU{measured}.\n"
                     f"- {engine.admission.workers} generations run at once; up to {engine.admission.max_waiting} "
                     "more wait in line (told their place); beyond that a visitor is asked to try again. Streams "
                     "running at the same time are decoded together, one forward per token for all of them.")
        compiled = engine.compiled
        if compiled["state"] == "failed":
            parts.append(f"- Compiled decoding is unavailable here ({html.escape(compiled['why'])}): every step "
                         "runs eagerly.")
        elif compiled["state"] != "off":
            parts.append("- A stream running alone decodes through `torch.compile` once a warm-up started at load "
                         "(a few minutes on 2 cores, in the background) has measured it faster than eager steps.")
    parts.append(f"\n<small>Checkpoint: `{display_path(engine.model_dir)}`</small>")
    return "\n".join(parts)


def model_card(model_dir: str) -> str | None:
    """The body of the checkpoint's README.md (its Hub model card), without the YAML front matter."""
    try:
        with open(os.path.join(model_dir, "README.md"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4:] if end >= 0 else text
    return text.strip() or None


def honest_limits(tokens_seen) -> str:
    if isinstance(tokens_seen, (int, float)) and tokens_seen > 0:
        seen = (f"{_tokens(tokens_seen)} tokens, ≈ {tokens_seen / CORPUS_TOKENS:.1f} passes over ~11 M tokens of "
                "OpenStax textbooks (CC BY 4.0)")
    else:
        seen = "~11 M tokens of OpenStax textbooks (CC BY 4.0)"
    return ("### Honest limits\n"
        f"- **Tiny**: trained on {seen}, on a small compute "
        "budget; SmolLM2-135M saw 2 trillion tokens. Expect textbook-flavoured prose that loses the thread after a "
        "sentence or two.\n"
        "- **No instruction tuning**: it continues text; it does not answer questions, follow instructions or chat. "
        "Start a sentence and let it finish.\n"
        "- **It makes things up**: facts, numbers, names, dates and citations are often wrong or invented. Do not "
        "rely on anything it writes.\n"
        "- English only, no safety tuning, short context; the expert colours show what the router chose, not what "
        "an expert 'means'.")

# ----------------------------------------------------------------------------------------------------------------


def error_markdown(engine: Engine) -> str:
    text = (f"### ⚠️ No model loaded\n\nThe checkpoint in `{display_path(engine.model_dir)}` could not be loaded:\n\n"
            f"> {engine.error}\n\nTrain one with `python train.py` (it writes `checkpoints/final/`), or point "
            "`MODEL_DIR` at a checkpoint directory (config.json, model.safetensors and tokenizer files), or set "
            "`MODEL_REPO` to a Hugging Face Hub repo id. Generation is disabled until then.")
    if engine.note:
        text += f"\n\n{engine.note}"
    return text


# ----------------------------------------------------------------------------------------------------------------
# The page

CSS = """
#about-text table { display: block; overflow-x: auto; }
#about-text td, #about-text th { word-break: normal; overflow-wrap: normal; hyphens: none; min-width: 7em; }
/* Experts: an even grid (at most 4 columns, at least 160 px each: 2 rows of 4 cards on a laptop, 2 columns on a
   phone); each card as wide as its column, each table as wide as its card (fixed layout: long tokens are cut with
   an ellipsis, their full text in the cell's title) */
#experts-grid { display: grid; gap: 8px;
  grid-template-columns: repeat(auto-fill, minmax(max(160px, calc((100% - 24px) / 4)), 1fr)); }
#experts-grid .expert-card { border: 1px solid #ddd; border-radius: 6px; padding: 6px; min-width: 0;
  overflow: hidden; }
#experts-grid table { width: 100%; table-layout: fixed; border-collapse: collapse; font-size: 0.85em; margin: 0; }
#experts-grid th, #experts-grid td { padding: 1px 3px; min-width: 0; overflow: hidden; text-overflow: ellipsis;
  border: none; }
#experts-grid th { font-weight: 600; overflow-wrap: anywhere; }
#experts-grid td.tokcell { white-space: nowrap; }
#experts-grid code { white-space: pre; }
/* action buttons keep their label on one line (a phone gave "New" / "chat") */
.action-row button { white-space: nowrap; }
/* a tapped token's routing (TAP_JS) */
#token-info { position: fixed; z-index: 1000; max-width: min(92vw, 440px); white-space: pre-wrap;
  font: 12px/1.4 ui-monospace, monospace; background: #fff; color: #111; border: 1px solid #888;
  border-radius: 6px; padding: 6px 8px; box-shadow: 0 2px 8px rgba(0, 0, 0, .25); }
span.tok { cursor: pointer; }
"""
# A phone cannot hover: tapping (clicking) a token shows its title (the routing in every layer) in a box beside it;
# tapping elsewhere or scrolling closes it
TAP_JS = """() => {
  const close = () => { const box = document.getElementById('token-info'); if (box) box.remove(); };
  document.addEventListener('click', (ev) => {
    const tok = ev.target.closest ? ev.target.closest('span.tok') : null;
    if (!tok) { if (!(ev.target.closest && ev.target.closest('#token-info'))) close(); return; }
    let box = document.getElementById('token-info');
    if (!box) { box = document.createElement('div'); box.id = 'token-info'; document.body.appendChild(box); }
    box.textContent = tok.getAttribute('title') || '';
    const r = tok.getBoundingClientRect(), w = box.offsetWidth, h = box.offsetHeight;
    box.style.left = Math.max(4, Math.min(r.left, window.innerWidth - w - 4)) + 'px';
    box.style.top = (r.bottom + 6 + h <= window.innerHeight ? r.bottom + 6 : Math.max(4, r.top - h - 6)) + 'px';
  });
  window.addEventListener('scroll', close, {passive: true});
}"""
# Pressing Generate on a phone: the columns stack, so bring the output box into view as the stream starts
# (the Generate event's own js: it runs in the browser before the request and passes the inputs on unchanged; a
# separate js-only event on the same click ran only after the stream had ended)
SCROLL_TO_OUTPUT = """(...args) => {
  const out = document.querySelector('#output');
  if (out) {
    const r = out.getBoundingClientRect();
    if (r.top < 0 || r.bottom > window.innerHeight) out.scrollIntoView({block: 'start', behavior: 'instant'});
  }
  return args;
}"""
CHAT_LIMITS = (
    "**What to expect**: this is a small *base* model trained on textbooks, not a chat assistant. The conversation "
    "is rendered as a plain-text transcript (`User: …` / `Assistant: …`) that it continues; its reply ends where it "
    "starts the next `User:` line. It does not follow instructions, keeps no memory beyond the context (oldest turns "
    "are dropped first), and makes facts up. Expect textbook-flavoured sentences loosely related to what you wrote.")
CHAT_MODEL_LIMITS = (
    "**What to expect**: a small chat model. The conversation goes through its own chat template and its reply ends "
    "at its end-of-turn token. It keeps no memory beyond the context (oldest exchanges are dropped first), answers "
    "briefly and often makes facts up: check anything that matters.")


def build_demo(model_dir: str | None = None, engine: Engine | None = None,
               compile_decoding: bool = False) -> gr.Blocks:
    """The whole page for a checkpoint directory (None: MODEL_REPO / MODEL_DIR / checkpoints/final), queued but not
    launched. A missing or corrupt checkpoint gives a page that says so, with generation disabled.
    compile_decoding: see serve.Engine (`python app.py` turns it on unless COMPILE_DECODING=0)."""
    if engine is None:
        engine = Engine(*resolve_model_dir(model_dir), workers=QUEUE_WORKERS, max_waiting=QUEUE_MAX_WAITING,
                        compile_decoding=compile_decoding)
    streams = Streams(engine)
    report, report_note = load_experts_report(engine)
    first_layer = engine.moe_layers[0] if engine.moe_layers else None
    layer_choices = [(f"layer {i}", i) for i in engine.moe_layers]
    with gr.Blocks(title="SmolLM2-DeepSeek: MLA + MoE explorer") as demo:
        demo.engine, demo.streams, demo.experts_report = engine, streams, report
        gr.Markdown("# SmolLM2-DeepSeek\nA tiny language model with DeepSeek-V3's Multi-head Latent Attention and "
                    "Mixture-of-Experts: complete a text or chat, and see which experts every token is routed to.",
                    elem_id="title")
        if not engine.ok:
            gr.Markdown(error_markdown(engine), elem_id="load-error")
        elif engine.note:
            gr.Markdown(f"*{engine.note}*", elem_id="load-note")
        with gr.Accordion("Sampling settings (both tabs)", open=True, elem_id="settings"):
            with gr.Row():
                temperature = gr.Slider(0, MAX_TEMPERATURE, value=0.8, step=0.05, label="Temperature",
                                        info="0 = greedy (deterministic)", elem_id="temperature")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k", info="0 = off", elem_id="top-k")
                max_new = gr.Slider(1, engine.max_new_limit, value=min(96, engine.max_new_limit), step=1,
                                    label="Max new tokens", elem_id="max-new-tokens")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Complete", id="complete", elem_id="tab-complete"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        prompt = gr.Textbox(label="Prompt", lines=4, elem_id="prompt", autofocus=True,
                                            placeholder="Photosynthesis is the process by which")
                        with gr.Row(elem_classes="action-row"):
                            generate = gr.Button("Generate", variant="primary", elem_id="generate",
                                                 interactive=engine.ok, min_width=80)
                            stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60)
                            clear = gr.Button("Clear", elem_id="clear", min_width=60)
                    with gr.Column(scale=1, min_width=300):
                        output = gr.Textbox(label="Continuation", lines=8, interactive=False, autoscroll=True,
                                            elem_id="output")
                        status = gr.Markdown("Ready." if engine.ok else "Generation is disabled: no model loaded.",
                                             label="Status", elem_id="status")
                gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts",
                            cache_examples=False)
                gr.Markdown("## Expert routing")
                layer = gr.Dropdown(choices=layer_choices, value=first_layer, label="MoE layer to colour by",
                                    elem_id="layer", interactive=bool(engine.moe_layers))
                view = gr.HTML(empty_view("Generate some text to see its routing."), label="Token routing (HTML)",
                               elem_id="routing-view")
                heatmap = gr.Plot(label="Expert load (layers × experts)", elem_id="heatmap")
                with gr.Accordion("Routing data (JSON, also returned by the /generate API)", open=False):
                    routing = gr.JSON(label="Per-token routing", elem_id="routing-json", open=False)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                gr.Markdown(CHAT_LIMITS if engine.end_of_turn is None else CHAT_MODEL_LIMITS, elem_id="chat-limits")
                with gr.Row():
                    with gr.Column(scale=3, min_width=300):
                        # plain text, as the routing view shows the same reply (Markdown made "- " a list); no
                        # floating label over the messages
                        chatbot = gr.Chatbot(label="Conversation", show_label=False, elem_id="chatbot", height=380,
                                             render_markdown=False,
                                             placeholder="Say something; the model continues the transcript.")
                        accept_any_history(chatbot)
                        chat_in = gr.Textbox(label="Message", lines=1, elem_id="chat-input",
                                             placeholder="Tell me about photosynthesis.")
                        with gr.Row(elem_classes="action-row"):
                            send = gr.Button("Send", variant="primary", elem_id="chat-send", interactive=engine.ok,
                                             min_width=80)
                            chat_stop = gr.Button("Stop", variant="stop", elem_id="chat-stop", min_width=60)
                            chat_clear = gr.Button("New chat", elem_id="chat-clear", min_width=60)
                        chat_status = gr.Markdown("", label="Chat status", elem_id="chat-status")
                    with gr.Column(scale=2, min_width=260):
                        chat_layer = gr.Dropdown(choices=layer_choices, value=first_layer, elem_id="chat-layer",
                                                 label="Routing of the last reply: MoE layer",
                                                 interactive=bool(engine.moe_layers))
                        chat_view = gr.HTML(empty_view("The last reply's routing shows here."),
                                            label="Reply routing (HTML)", elem_id="chat-routing-view")
                        with gr.Accordion("Reply routing data (JSON)", open=False):
                            chat_routing = gr.JSON(label="Reply routing", elem_id="chat-routing-json", open=False)
            with gr.Tab("Experts", id="experts", elem_id="tab-experts"):
                gr.Markdown(report_note, elem_id="experts-note")
                experts_layer = gr.Dropdown(choices=layer_choices, value=first_layer, label="MoE layer",
                                            elem_id="experts-layer", interactive=report is not None)
                experts_view = gr.HTML(experts_table(report, first_layer), label="Experts (HTML)",
                                       elem_id="experts-view")
            with gr.Tab("About", id="about", elem_id="tab-about"):
                gr.Markdown(about_markdown(engine), elem_id="about-text")
                plot_path = _find(engine.model_dir, "training_plot.png")
                # a PIL image, not the path: a path would put the server's own layout into the page config
                # the plot at the page's width and its own aspect (a fixed 480-px image box left a phone's plot tiny
                # in the middle of empty space); inlined, so no server path reaches the page
                gr.HTML(plot_html(plot_path), label="Training curves", visible=plot_path is not None,
                        elem_id="training-plot")

        # preprocess=False: the raw values reach Engine.check_settings, which clamps out-of-range numbers and says
        # so (gr.Slider's own preprocess would reject an API call's top-k above 200 or max tokens above the limit)
        event = gr.on([generate.click, prompt.submit], streams.generate, inputs=[prompt, temperature, top_k, max_new],
                      outputs=[output, status, view, heatmap, routing], api_name="generate",
                      show_progress="minimal", preprocess=False, concurrency_limit=None, trigger_mode="once",
                      js=SCROLL_TO_OUTPUT)
        stop.click(streams.request_stop, queue=False, api_visibility="private")
        clear.click(lambda: ("", "", "Ready." if engine.ok else "Generation is disabled: no model loaded.",
                             empty_view("Generate some text to see its routing."), None, None),
                    outputs=[prompt, output, status, view, heatmap, routing], cancels=[event],
                    api_visibility="private")
        layer.change(streams.select_generate_layer, inputs=[layer, routing], outputs=[view], api_visibility="private")

        chat_event = gr.on([send.click, chat_in.submit], streams.chat,
                           inputs=[chat_in, chatbot, temperature, top_k, max_new],
                           outputs=[chatbot, chat_status, chat_view, chat_routing], api_name="chat",
                           show_progress="minimal", preprocess=False, concurrency_limit=None, trigger_mode="once")
        # registered after the chat event, so the message is read before the box is emptied (in the browser alone)
        gr.on([send.click, chat_in.submit], None, outputs=[chat_in], js="() => ''", api_visibility="private")
        chat_stop.click(streams.request_stop, queue=False, api_visibility="private")
        chat_clear.click(lambda: ([], "", empty_view("The last reply's routing shows here."), None),
                         outputs=[chatbot, chat_status, chat_view, chat_routing], cancels=[chat_event],
                         api_visibility="private")
        chat_layer.change(streams.select_chat_layer, inputs=[chat_layer, chat_routing], outputs=[chat_view],
                          api_visibility="private")
        experts_layer.change(lambda value: experts_table(report, value), inputs=[experts_layer],
                             outputs=[experts_view], api_visibility="private")
        demo.unload(streams.forget_session)
    # Admission (Engine.admission) bounds the work and tells visitors their place; Gradio's own queue is only a
    # backstop above it (its "Queue is full" reaches API clients as a bare exception).
    demo.queue(default_concurrency_limit=QUEUE_WORKERS, max_size=4 * (QUEUE_WORKERS + QUEUE_MAX_WAITING))
    demo.engine = engine  # main() hands its decode loop the main thread
    return demo


class AnyHistory(GradioRootModel):
    """The /chat history as sent, unchecked: normalise_history reads it and names what is wrong."""

    root: Any = None


def accept_any_history(chatbot: gr.Chatbot) -> None:
    """Gradio validates an input against its component's data model before the event's function runs, even with
    preprocess=False: a malformed /chat history (a "wizard" role, a str content) ended in pydantic's error and a
    server traceback. This Chatbot accepts any value as input, and normalise_history answers with a clear message;
    its API schema (what gradio_client documents) stays the Chatbot's."""
    chatbot.api_info()  # cached with the Chatbot's own message schema
    chatbot.data_model = AnyHistory


def plot_html(path: str | None) -> str:
    """The training plot as an <img> that fills the width and keeps its aspect (a data: URI of the PNG)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
    except OSError:
        return ""
    return (f'<img src="data:image/png;base64,{data}" alt="Training curves: loss and validation loss by step" '
            'style="width:100%;height:auto;display:block">')


def launch(demo: gr.Blocks, **kwargs):
    """Serve the page; kwargs go to gr.Blocks.launch (tests pass server_name/server_port/prevent_thread_lock)."""
    options = dict(theme=gr.themes.Soft(), css=CSS, js=TAP_JS, show_error=True)
    options.update(kwargs)
    return demo.launch(**options)


def default_host() -> str:
    """GRADIO_SERVER_NAME when set; 0.0.0.0 on a Hugging Face Space (SPACE_ID set), where the proxy must reach the
    app; else loopback: a local run is not exposed to the network unless asked."""
    if os.environ.get("GRADIO_SERVER_NAME"):
        return os.environ["GRADIO_SERVER_NAME"]
    return "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"


def main():
    port_text = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or "7860"
    try:
        port = int(port_text)
    except ValueError:
        raise SystemExit(f"GRADIO_SERVER_PORT / PORT must be a port number, got {port_text!r}") from None
    # a stream alone decodes through torch.compile once a background warm-up has measured it faster (~1.5x on the
    # CPUs measured); COMPILE_DECODING=0 keeps every step eager (no compiler use at all)
    compile_decoding = os.environ.get("COMPILE_DECODING", "1").strip() not in ("0", "false", "no", "off")
    demo = build_demo(compile_decoding=compile_decoding)
    launch(demo, server_name=default_host(), server_port=port, prevent_thread_lock=True)
    serve_forever(demo)


def serve_forever(demo) -> None:
    """Block until Ctrl-C, running the batched decode loop in this (the main) thread: the server has its own threads,
    and the loop's GEMMs ran ~10-25% faster here than in a thread of their own (serve.Batcher.serve_forever)."""
    engine = getattr(demo, "engine", None)
    try:
        if engine is not None and engine.batcher is not None:
            engine.batcher.serve_forever()
        else:  # no model loaded: the page says why; nothing to decode
            demo.block_thread()
    except KeyboardInterrupt:
        demo.close()


if __name__ == "__main__":
    main()
