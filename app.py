"""Gradio demo of SmolLM2-DeepSeek: stream a continuation and watch which experts route every token.

    python app.py                       # serves checkpoints/final on 0.0.0.0:7860 (a Hugging Face Space runs this)
    MODEL_DIR=runs/x/final python app.py
    MODEL_REPO=user/smollm2-deepseek python app.py   # download from the Hub, fall back to MODEL_DIR on any error

Only UI and light formatting live here; generation and routing come from model.py (`SmolLM2DeepSeek.generate`).
Tests build the page without launching it: `build_demo(model_dir)` returns the gr.Blocks, `launch(demo, ...)` serves.
Environment: MODEL_DIR (default checkpoints/final next to this file), MODEL_REPO (optional Hub repo id),
GRADIO_SERVER_NAME (default 0.0.0.0), GRADIO_SERVER_PORT or PORT (default 7860).
"""
import html
import json
import math
import os
import time

import gradio as gr
import plotly.graph_objects as go
import torch

from model import SmolLM2DeepSeek

APP_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = os.path.join(APP_DIR, "checkpoints", "final")
MAX_NEW_TOKENS = 512  # the app's cap; also at most half the context, so a prompt keeps the other half
MAX_PROMPT_CHARS = 50_000  # longer prompts keep their end before tokenizing (the context holds far less anyway)
MAX_TEMPERATURE = 2.0
HEATMAP_EVERY = 8  # re-send the plotly heatmap every N tokens (and at the end); the token view updates every token
QUEUE_CONCURRENCY = 4
QUEUE_MAX_SIZE = 32
CORPUS_TOKENS = 11.34e6  # training split of ../shared/corpus with this tokenizer (DESIGN.md §4)
SMOLLM2_GQA_VALUES = 2 * 3 * 64  # SmolLM2-135M caches K and V of 3 kv heads x 64 dims per token per layer
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
# Loading


def resolve_model_dir(model_dir: str | None = None) -> tuple[str, str | None]:
    """The checkpoint directory to load and a note about how it was found (None when nothing to say).

    An explicit model_dir wins; otherwise MODEL_REPO is downloaded from the Hub if set (any failure, offline
    included, falls back to the local directory), else MODEL_DIR, else checkpoints/final next to this file.
    """
    if model_dir:
        return model_dir, None
    local = os.environ.get("MODEL_DIR") or DEFAULT_MODEL_DIR
    repo = os.environ.get("MODEL_REPO")
    if not repo:
        return local, None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=repo), f"Downloaded from the Hub repo `{repo}`."
    except Exception as err:  # offline, missing repo, no huggingface_hub...: serve the local copy instead
        return local, f"Could not download `{repo}` from the Hub ({type(err).__name__}); using `{local}`."


class Engine:
    """The loaded model and tokenizer (or why they could not be loaded), and the streaming generation."""

    def __init__(self, model_dir: str, note: str | None = None):
        self.model_dir = model_dir
        self.note = note
        self.model = None
        self.tokenizer = None
        self.error = None
        self.layer_choice: dict[str, int] = {}  # session hash -> MoE layer shown in the token view
        self.stopping: set[str] = set()  # sessions whose Stop button was pressed during their stream
        try:
            self.model = SmolLM2DeepSeek.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            if len(self.tokenizer) > self.model.config.vocab_size:
                raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary only "
                                 f"{self.model.config.vocab_size}: they do not belong together")
        except Exception as err:  # any load failure becomes a message on the page, never a traceback
            self.model, self.tokenizer = None, None
            self.error = f"{type(err).__name__}: {err}"
        if self.model is not None:
            cfg = self.model.config
            self.moe_layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
            self.max_new_limit = max(1, min(MAX_NEW_TOKENS, cfg.max_position_embeddings // 2))
        else:
            self.moe_layers, self.max_new_limit = [], MAX_NEW_TOKENS

    @property
    def ok(self) -> bool:
        return self.model is not None

    def error_markdown(self) -> str:
        where = os.path.abspath(self.model_dir)
        text = (f"### ⚠️ No model loaded\n\nThe checkpoint in `{where}` could not be loaded:\n\n"
                f"> {self.error}\n\nTrain one with `python train.py` (it writes `checkpoints/final/`), or point "
                "`MODEL_DIR` at a checkpoint directory (config.json, model.safetensors and tokenizer files), or set "
                "`MODEL_REPO` to a Hugging Face Hub repo id. Generation is disabled until then.")
        if self.note:
            text += f"\n\n{self.note}"
        return text

    # -- input validation ----------------------------------------------------------------------------------------
    def prepare(self, prompt, temperature, top_k, max_new_tokens):
        """Check and normalise the inputs. Returns (settings dict or None when nothing can run, notes)."""
        notes = []
        cfg = self.model.config
        prompt = "" if prompt is None else str(prompt)
        if not prompt.strip():
            return None, ["⚠️ **Empty prompt**: type some text to continue (the model continues text; it does not "
                          "answer questions)."]
        temperature = _number(temperature, 0.8, "temperature", notes)
        if temperature < 0:
            notes.append(f"⚠️ Temperature {temperature:g} is negative: using 0 (greedy).")
            temperature = 0.0
        elif temperature > MAX_TEMPERATURE:
            notes.append(f"⚠️ Temperature {temperature:g} is above {MAX_TEMPERATURE:g}: clamped to "
                         f"{MAX_TEMPERATURE:g}.")
            temperature = MAX_TEMPERATURE
        top_k = int(round(_number(top_k, 0, "top-k", notes)))
        if top_k < 0:
            notes.append(f"⚠️ Top-k {top_k} is negative: treated as no top-k filter.")
            top_k = 0
        elif top_k == 0:
            notes.append("ℹ️ Top-k 0: no top-k filter (sampling from the whole vocabulary).")
        elif top_k >= cfg.vocab_size:
            notes.append(f"⚠️ Top-k {top_k} is not below the vocabulary size ({cfg.vocab_size}): treated as no "
                         "top-k filter.")
            top_k = 0
        if temperature == 0:
            notes.append("ℹ️ Temperature 0: greedy decoding (always the most likely token; top-k has no effect).")
        max_new = int(round(_number(max_new_tokens, 64, "max new tokens", notes)))
        if max_new < 1:
            notes.append(f"⚠️ Max new tokens {max_new} is below 1: using 1.")
            max_new = 1
        elif max_new > self.max_new_limit:
            notes.append(f"⚠️ Max new tokens {max_new} is above this app's limit of {self.max_new_limit}: "
                         f"clamped to {self.max_new_limit}.")
            max_new = self.max_new_limit
        if len(prompt) > MAX_PROMPT_CHARS:
            prompt = prompt[-MAX_PROMPT_CHARS:]
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            return None, ["⚠️ **Empty prompt**: the prompt has no tokens."]
        keep = cfg.max_position_embeddings - max_new
        if len(ids) > keep:
            notes.append(f"⚠️ **Long prompt truncated**: it has {len(ids)} tokens, but prompt + {max_new} new "
                         f"tokens must fit the {cfg.max_position_embeddings}-token context, so only its last {keep} "
                         "tokens were kept.")
            ids = ids[-keep:]
        return dict(ids=ids, temperature=temperature, top_k=top_k, max_new=max_new), notes

    # -- streaming -----------------------------------------------------------------------------------------------
    def stream(self, prompt, temperature, top_k, max_new_tokens, request: gr.Request = None):
        """The `/generate` endpoint: yields (text, status markdown, token-view html, heatmap, routing json)."""
        if not self.ok:
            yield "", self.error_markdown(), empty_view("No model loaded."), None, None
            return
        settings, notes = self.prepare(prompt, temperature, top_k, max_new_tokens)
        if settings is None:
            yield "", "\n\n".join(notes), empty_view("Nothing generated yet."), None, None
            return
        session = getattr(request, "session_hash", None)
        self.stopping.discard(session)
        cfg = self.model.config
        ids, max_new = settings["ids"], settings["max_new"]
        data = {"prompt": self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                "prompt_tokens": len(ids), "moe_layers": self.moe_layers, "n_routed_experts": cfg.n_routed_experts,
                "experts_per_token": cfg.num_experts_per_tok,
                "expert_load": [[0] * cfg.n_routed_experts for _ in self.moe_layers], "tokens": []}
        summary = _settings_line(settings, len(ids))
        header = "\n\n".join(notes + [summary])
        view = TokenView(self.moe_layers)
        layer = self.layer_choice.get(session, self.moe_layers[0] if self.moe_layers else None)
        yield ("", f"{header}\n\n⏳ Generating…", view.render(data, layer), load_heatmap(data),
               _snapshot(data))
        text = TextAssembler(self.tokenizer)
        t0 = time.perf_counter()
        reason, error = "reached the max new tokens", None
        gen = self.model.generate(ids, max_new_tokens=max_new, temperature=settings["temperature"],
                                  top_k=settings["top_k"], return_routing=True)
        try:
            for step in gen:
                piece = text.add(step.token_id)
                routing = []
                for pos, (layer_idx, experts, weights) in enumerate(step.routing or []):
                    pairs = sorted(zip(experts, weights), key=lambda p: -p[1])  # highest weight first
                    routing.append({"layer": layer_idx, "experts": [int(e) for e, _ in pairs],
                                    "weights": [round(float(w), 4) for _, w in pairs]})
                    for e, _ in pairs:
                        data["expert_load"][pos][e] += 1
                data["tokens"].append({"index": len(data["tokens"]), "id": step.token_id, "text": piece,
                                       "routing": routing})
                n = len(data["tokens"])
                if session is not None and session in self.stopping:
                    reason = "stopped with the Stop button"
                    break
                if n < max_new:
                    layer = self.layer_choice.get(session, layer)
                    rate = n / max(time.perf_counter() - t0, 1e-9)
                    plot = load_heatmap(data) if n % HEATMAP_EVERY == 0 else gr.skip()
                    yield (text.text, f"{header}\n\n⏳ Generating… {n}/{max_new} tokens ({rate:.1f} tokens/s)",
                           view.render(data, layer), plot, _snapshot(data))
            else:
                if len(data["tokens"]) < max_new:
                    reason = "stopped at the end-of-text token"
        except Exception as err:  # a failure mid-stream is reported with what was generated so far
            error = f"⚠️ **Generation failed**: {type(err).__name__}: {err}"
        finally:
            gen.close()
            self.stopping.discard(session)
        n = len(data["tokens"])
        seconds = time.perf_counter() - t0
        label = "⏹ Stopped" if reason.startswith("stopped with") else "✓ Done"
        done = error or (f"{label}: {n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s); {reason}."
                         if n else "✓ Done: the model ended the text at once (end-of-text token); nothing to show.")
        layer = self.layer_choice.get(session, layer)
        data["text"] = text.final()
        yield text.final(), f"{header}\n\n{done}", view.render(data, layer), load_heatmap(data), _snapshot(data)

    def request_stop(self, request: gr.Request = None):
        """The Stop button: this session's stream ends after its current token with a final update (heatmap, JSON
        and status included), which cancelling the event would lose."""
        session = getattr(request, "session_hash", None)
        if session is not None:
            self.stopping.add(session)

    def select_layer(self, layer, data, request: gr.Request = None):
        """The layer dropdown: remember the choice for this session's stream and redraw the token view."""
        session = getattr(request, "session_hash", None)
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            layer = self.moe_layers[0] if self.moe_layers else None
        if session is not None:
            self.layer_choice[session] = layer
        if not data or not data.get("moe_layers"):
            return empty_view("Generate some text to see its routing.")
        return TokenView(data["moe_layers"]).render(data, layer)

    def forget_session(self, request: gr.Request = None):
        self.layer_choice.pop(getattr(request, "session_hash", None), None)
        self.stopping.discard(getattr(request, "session_hash", None))


def _number(value, default, name, notes) -> float:
    if value is None or value == "":
        notes.append(f"⚠️ No {name} given: using {default}.")
        return float(default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        notes.append(f"⚠️ {name.capitalize()} {value!r} is not a number: using {default}.")
        return float(default)
    if not math.isfinite(number):
        notes.append(f"⚠️ {name.capitalize()} {value!r} is not a finite number: using {default}.")
        return float(default)
    return number


def _settings_line(s: dict, prompt_tokens: int) -> str:
    sampling = ("greedy (temperature 0)" if s["temperature"] == 0 else
                f"temperature {s['temperature']:g}, " + (f"top-k {s['top_k']}" if s["top_k"] else "top-k off"))
    return f"**Settings**: {sampling}; prompt {prompt_tokens} tokens; max {s['max_new']} new tokens."


def _snapshot(data: dict) -> dict:
    """A copy for one streamed update: Gradio diffs consecutive outputs, so the mutable parts must not be shared."""
    return {**data, "expert_load": [row[:] for row in data["expert_load"]], "tokens": list(data["tokens"])}


class TextAssembler:
    """Incremental decoding: the whole generated id list is decoded at every step (so a character split over
    several byte tokens renders once complete) and each token is credited with the new text it completes.
    Special tokens are skipped; trailing U+FFFD of an unfinished character is held back until the end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        stable = self._decode().rstrip("\ufffd")
        if stable.startswith(self.text):
            piece = stable[len(self.text):]
        else:  # the decoder rewrote earlier text (rare): credit this token with what differs from the common prefix
            common = os.path.commonprefix([stable, self.text])
            piece = stable[len(common):]
        self.text = stable
        return piece

    def final(self) -> str:
        return self._decode() if self.ids else ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
                      'top-weighted routed expert, underline = its weight; hover a token for every layer '
                      f'(counts: heatmap below). {chips}</div>')
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
    shown = html.escape(text.replace("\n", "↵\n")) if text else "&#8203;"
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
        colorbar=dict(title=dict(text="tokens"), thickness=12)))
    fig.update_layout(title=dict(text=f"Expert load over {n} generated tokens (top-{data['experts_per_token']} "
                                      "per token per layer)", font=dict(size=14)),
                      height=140 + 28 * len(layers), margin=dict(l=70, r=20, t=40, b=30))
    fig.update_yaxes(autorange="reversed")
    return fig


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
            f"{values * 4 * cfg.num_hidden_layers / 1024:.1f} KiB per token over all layers in fp32) vs "
            f"{SMOLLM2_GQA_VALUES} for SmolLM2-135M's GQA (3 kv heads × 64 dims × K and V): "
            f"**{values / SMOLLM2_GQA_VALUES:.2f}×** |\n"
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
    if isinstance(tokens_seen, (int, float)) and tokens_seen > 0:
        seen = (f"{_tokens(tokens_seen)} tokens, ≈ {tokens_seen / CORPUS_TOKENS:.1f} passes over ~11 M tokens of "
                "OpenStax textbooks (CC BY 4.0)")
    else:
        seen = "~11 M tokens of OpenStax textbooks (CC BY 4.0)"
    parts.append(
        "### Honest limits\n"
        f"- **Tiny**: trained on {seen}, on a small compute "
        "budget; SmolLM2-135M saw 2 trillion tokens. Expect textbook-flavoured prose that loses the thread after a "
        "sentence or two.\n"
        "- **No instruction tuning**: it continues text; it does not answer questions, follow instructions or chat. "
        "Start a sentence and let it finish.\n"
        "- **It makes things up**: facts, numbers, names, dates and citations are often wrong or invented. Do not "
        "rely on anything it writes.\n"
        "- English only, no safety tuning, short context; the expert colours show what the router chose, not what "
        "an expert 'means'.")
    if engine.note:
        parts.append(f"\n*{engine.note}*")
    parts.append(f"\n<small>Checkpoint: `{os.path.abspath(engine.model_dir)}`</small>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# The page


def build_demo(model_dir: str | None = None, engine: Engine | None = None) -> gr.Blocks:
    """The whole page for a checkpoint directory (None: MODEL_REPO / MODEL_DIR / checkpoints/final), queued but not
    launched. A missing or corrupt checkpoint gives a page that says so, with generation disabled."""
    if engine is None:
        engine = Engine(*resolve_model_dir(model_dir))
    with gr.Blocks(title="SmolLM2-DeepSeek: MLA + MoE explorer") as demo:
        demo.engine = engine
        gr.Markdown("# SmolLM2-DeepSeek\nA tiny language model with DeepSeek-V3's Multi-head Latent Attention and "
                    "Mixture-of-Experts. Type the start of a text; watch which experts every token is routed to.",
                    elem_id="title")
        if not engine.ok:
            gr.Markdown(engine.error_markdown(), elem_id="load-error")
        elif engine.note:
            gr.Markdown(f"*{engine.note}*", elem_id="load-note")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Photosynthesis is the process by which",
                                    elem_id="prompt", autofocus=True)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate", interactive=engine.ok)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                temperature = gr.Slider(0, MAX_TEMPERATURE, value=0.8, step=0.05, label="Temperature",
                                        info="0 = greedy (deterministic)", elem_id="temperature")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k", info="0 = off", elem_id="top-k")
                max_new = gr.Slider(1, engine.max_new_limit, value=min(96, engine.max_new_limit), step=1,
                                    label="Max new tokens", elem_id="max-new-tokens")
                gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts",
                            cache_examples=False)
            with gr.Column(scale=1):
                output = gr.Textbox(label="Continuation", lines=9, interactive=False, autoscroll=True,
                                    elem_id="output")
                status = gr.Markdown("Ready." if engine.ok else "Generation is disabled: no model loaded.",
                                     elem_id="status")
        gr.Markdown("## Expert routing")
        layer = gr.Dropdown(choices=[(f"layer {i}", i) for i in engine.moe_layers],
                            value=engine.moe_layers[0] if engine.moe_layers else None, label="MoE layer to colour by",
                            elem_id="layer", interactive=bool(engine.moe_layers))
        view = gr.HTML(empty_view("Generate some text to see its routing."), elem_id="routing-view")
        heatmap = gr.Plot(label="Expert load (layers × experts)", elem_id="heatmap")
        with gr.Accordion("Routing data (JSON, also returned by the /generate API)", open=False):
            routing = gr.JSON(label="Per-token routing", elem_id="routing-json", open=False)
        with gr.Accordion("About this model", open=False, elem_id="about"):
            gr.Markdown(about_markdown(engine), elem_id="about-text")
            plot_path = _find(engine.model_dir, "training_plot.png")
            gr.Image(value=plot_path, label="Training curves", visible=plot_path is not None, interactive=False,
                     height=480, elem_id="training-plot")

        event = gr.on([generate.click, prompt.submit], engine.stream, inputs=[prompt, temperature, top_k, max_new],
                      outputs=[output, status, view, heatmap, routing], api_name="generate",
                      show_progress="minimal", preprocess=False)
        # preprocess=False: the raw values reach Engine.prepare, which clamps out-of-range numbers and says so
        # (gr.Slider's own preprocess would reject an API call's top-k above 200 or max tokens above the limit)
        stop.click(engine.request_stop, queue=False, api_visibility="private")
        clear.click(lambda: ("", "", "Ready." if engine.ok else "Generation is disabled: no model loaded.",
                             empty_view("Generate some text to see its routing."), None, None),
                    outputs=[prompt, output, status, view, heatmap, routing], cancels=[event],
                    api_visibility="private")
        layer.change(engine.select_layer, inputs=[layer, routing], outputs=[view], api_visibility="private")
        demo.unload(engine.forget_session)
    demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=QUEUE_MAX_SIZE)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Serve the page; kwargs go to gr.Blocks.launch (tests pass server_name/server_port/prevent_thread_lock)."""
    options = dict(theme=gr.themes.Soft(), show_error=True)
    options.update(kwargs)
    return demo.launch(**options)


def main():
    host = os.environ.get("GRADIO_SERVER_NAME") or "0.0.0.0"
    port_text = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or "7860"
    try:
        port = int(port_text)
    except ValueError:
        raise SystemExit(f"GRADIO_SERVER_PORT / PORT must be a port number, got {port_text!r}") from None
    launch(build_demo(), server_name=host, server_port=port)


if __name__ == "__main__":
    main()
