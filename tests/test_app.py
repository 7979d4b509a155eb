"""app.py served for real on 127.0.0.1 with a tiny random checkpoint, driven through gradio_client's /generate API.

Needs ../shared/tokenizer (the SmolLM2 tokenizer); no network, never the Hugging Face Hub.
"""
import asyncio
import json
import os
import re
import threading
import time

import pytest

from conftest import (APP_TINY as TINY, HAVE_TOKENIZER, SMOLLM2_GQA_VALUES,
                      TOKENIZER_DIR, free_port, make_tiny_checkpoint)

torch = pytest.importorskip("torch")
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
transformers = pytest.importorskip("transformers")
if not HAVE_TOKENIZER:
    pytest.skip(f"the SmolLM2 tokenizer is missing at {os.path.abspath(TOKENIZER_DIR)}", allow_module_level=True)

import app  # noqa: E402
import serve as serving  # noqa: E402  (test_app.serve() starts a server)
from generate import generate  # noqa: E402

CONTEXT = TINY["max_position_embeddings"]
LIMIT = CONTEXT // 2  # the app's max new tokens for this context
MOE_LAYERS = list(range(TINY["first_k_dense_replace"], TINY["num_hidden_layers"]))


@pytest.fixture(autouse=True)
def every_token_shown(monkeypatch):
    """These tests follow streams token by token (Stop after the 5th, the text growing): an update per token. The
    page's own coalescing (app.UI_UPDATE_S) has its own test below."""
    monkeypatch.setattr(app, "UI_UPDATE_S", 0.0)
    monkeypatch.setattr(app, "ROUTING_EVERY_S", 0.0)


def serve(model_dir: str):
    demo = app.build_demo(model_dir)
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               ssr_mode=False, share=False)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def server(checkpoint):
    demo, url = serve(checkpoint)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[1], verbose=False)


def call(client, prompt, temperature=0.8, top_k=50, max_new_tokens=16):
    """All streamed updates of one /generate call: a list of (text, status, html, plot, routing)."""
    job = client.submit(prompt, temperature, top_k, max_new_tokens, api_name="/generate")
    job.result(timeout=120)
    return job.outputs()


def check_routing(data, tokenizer):
    assert data["moe_layers"] == MOE_LAYERS
    assert data["n_routed_experts"] == TINY["n_routed_experts"]
    assert data["experts_per_token"] == TINY["num_experts_per_tok"]
    load = [[0] * TINY["n_routed_experts"] for _ in MOE_LAYERS]
    for i, token in enumerate(data["tokens"]):
        assert token["index"] == i and 0 <= token["id"] < TINY["vocab_size"]
        assert [r["layer"] for r in token["routing"]] == MOE_LAYERS  # every MoE layer, in order
        for pos, r in enumerate(token["routing"]):
            experts, weights = r["experts"], r["weights"]
            assert len(experts) == len(weights) == TINY["num_experts_per_tok"]
            assert len(set(experts)) == len(experts)
            assert all(0 <= e < TINY["n_routed_experts"] for e in experts)
            assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
            assert sum(weights) == pytest.approx(1.0, abs=1e-3)  # norm_topk_prob, routed_scaling_factor 1
            for e in experts:
                load[pos][e] += 1
    assert data["expert_load"] == load
    ids = [t["id"] for t in data["tokens"]]
    assert data["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" not in data["text"]:
        assert "".join(t["text"] for t in data["tokens"]) == data["text"]


# ----------------------------------------------------------------------------------------------------------------
# The /generate endpoint


def test_endpoints_are_named_and_labelled(client):
    """Both endpoints are public with named parameters; every output has a distinct label (no `value_17`)."""
    info = client.view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/generate", "/chat"}  # the helper events stay private
    generate = info["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in generate["parameters"]] == ["prompt", "temperature", "top_k",
                                                                     "max_new_tokens"]
    chat = info["named_endpoints"]["/chat"]
    assert [p["parameter_name"] for p in chat["parameters"]] == ["message", "history", "temperature", "top_k",
                                                                 "max_new_tokens"]
    for endpoint, n in [(generate, 5), (chat, 4)]:
        labels = [r["label"] for r in endpoint["returns"]]
        assert len(labels) == n and len(set(labels)) == n, labels
        assert all(label and not re.fullmatch(r"value_\d+", label) for label in labels), labels
    assert [r["label"] for r in generate["returns"]][:2] == ["Continuation", "Status"]


def test_streams_text_and_routing(client, tokenizer):
    outputs = call(client, "Photosynthesis is the process by which", 0.8, 50, 24)
    texts = [o[0] for o in outputs]
    streamed = [t for t in texts[:-1] if t]
    assert len(set(streamed)) >= 3, f"expected several streamed updates, got {texts}"
    for before, after in zip(streamed, streamed[1:]):
        assert after.startswith(before)  # text only grows
    text, status, view, plot, data = outputs[-1]
    assert "Done" in status and "temperature 0.8, top-k 50" in status
    assert text == data["text"] and 0 < len(data["tokens"]) <= 24
    check_routing(data, tokenizer)
    assert data["prompt"] == "Photosynthesis is the process by which"
    assert data["prompt_tokens"] == len(tokenizer("Photosynthesis is the process by which")["input_ids"])
    # the routing grew with the text: one token more per update while streaming
    counts = [len(o[4]["tokens"]) for o in outputs if isinstance(o[4], dict)]
    assert counts == sorted(counts) and len(set(counts)) >= 3
    assert view.count('class="tok"') == len(data["tokens"])
    views = [o[2] for o in outputs]
    for before, after in zip(views, views[1:]):
        assert after.startswith(before)  # append-only while streaming: Gradio then sends only the new spans
    assert plot is not None


def test_empty_prompt(client):
    for prompt in ["", "   \n "]:
        outputs = call(client, prompt)
        text, status, _, _, data = outputs[-1]
        assert text == "" and "Empty prompt" in status and not data


def test_long_prompt_keeps_its_end(client, tokenizer):
    prompt = " ".join(f"word{i}" for i in range(400)) + " THE END"
    n = len(tokenizer(prompt)["input_ids"])
    assert n > CONTEXT
    text, status, _, _, data = call(client, prompt, 0, 0, 8)[-1]
    assert "Long prompt truncated" in status and f"has {n} tokens" in status
    assert data["prompt_tokens"] == CONTEXT - 8
    assert data["prompt"].endswith("THE END") and "word0 " not in data["prompt"]
    assert len(data["tokens"]) > 0


@pytest.mark.parametrize("top_k,message", [(0, "Top-k 0: no top-k filter"),
                                           (10**6, "not below the vocabulary size (49152)"),
                                           (49152, "not below the vocabulary size (49152)")])
def test_top_k_off(client, tokenizer, top_k, message):
    text, status, _, _, data = call(client, "The law of demand", 1.0, top_k, 6)[-1]
    assert message in status and "top-k off" in status and "Done" in status
    check_routing(data, tokenizer)


def test_max_new_tokens_clamped(client):
    text, status, _, _, data = call(client, "In the early nineteenth century", 0.8, 50, 10_000)[-1]
    assert f"above this app's limit of {LIMIT}: clamped to {LIMIT}" in status
    assert f"max {LIMIT} new tokens" in status
    assert 0 < len(data["tokens"]) <= LIMIT
    text, status, _, _, data = call(client, "In the early nineteenth century", 0.8, 50, 0)[-1]
    assert "below 1: using 1" in status and len(data["tokens"]) <= 1


def test_out_of_range_and_bad_numbers(client):
    status = call(client, "Cells divide", 5.0, 50, 4)[-1][1]
    assert "clamped to 2" in status and "temperature 2" in status
    status = call(client, "Cells divide", -1, 50, 4)[-1][1]
    assert "negative: using 0 (greedy)" in status
    status = call(client, "Cells divide", 0.8, -3, 4)[-1][1]
    assert "Top-k -3 is negative" in status
    status = call(client, "Cells divide", "hot", None, 4)[-1][1]
    assert "Temperature 'hot' is not a number: using 0.8" in status and "No top-k given" in status
    assert "Done" in status


def test_greedy_is_deterministic(client, tokenizer):
    first = call(client, "A good way to prepare for an exam is", 0, 50, 12)[-1]
    second = call(client, "A good way to prepare for an exam is", 0, 50, 12)[-1]
    assert "greedy" in first[1]
    assert first[0] == second[0] and first[4]["tokens"] == second[4]["tokens"]
    check_routing(first[4], tokenizer)


def test_concurrent_clients_get_their_own_routing(server, checkpoint, tokenizer):
    """8 clients at once (queue concurrency 4) all finish, each with exactly the tokens and routing the model
    gives when run alone: concurrent streams must not see each other's routing."""
    model = server[0].engine.model
    prompts = [f"Chapter {i}: the study of" for i in range(8)]
    expected = {}
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        steps = list(generate(model, ids, max_new_tokens=10, temperature=0, return_routing=True))
        expected[p] = [(s.token_id, [(layer, sorted(e)) for layer, e, _ in s.routing]) for s in steps]
    results, errors = {}, []

    def worker(p):
        try:
            c = gradio_client.Client(server[1], verbose=False)
            results[p] = c.submit(p, 0, 0, 10, api_name="/generate").result(timeout=150)
        except Exception as err:  # reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(p,), daemon=True) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for p in prompts:
        text, status, _, _, data = results[p]
        assert "Done" in status
        got = [(t["id"], [(r["layer"], sorted(r["experts"])) for r in t["routing"]]) for t in data["tokens"]]
        assert got == expected[p], p


# ----------------------------------------------------------------------------------------------------------------
# The page, the About panel, helpers


def component(demo, elem_id):
    found = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    assert len(found) == 1, elem_id
    return found[0]["props"]


def test_page_components_and_about(server):
    demo = server[0]
    engine = demo.engine
    assert component(demo, "generate")["interactive"] is not False
    layer = component(demo, "layer")
    assert [c[1] for c in layer["choices"]] == MOE_LAYERS
    assert component(demo, "max-new-tokens")["maximum"] == LIMIT
    about = component(demo, "about-text")["value"]
    counts = engine.model.count_parameters()
    assert f"{counts['total'] / 1e6:.2f} M total" in about and f"{counts['active'] / 1e6:.2f} M active" in about
    values = TINY["kv_lora_rank"] + TINY["qk_rope_head_dim"]
    assert f"{values} values per token per layer" in about and str(SMOLLM2_GQA_VALUES) in about
    assert "validation loss 3.5678" in about and "40.4 M" in about and "1234" in about
    assert "2 logged steps" in about and "best validation loss 3.5678" in about and "0.500" in about
    assert "No instruction tuning" in about and "makes things up" in about
    assert component(demo, "training-plot")["visible"] is True


def test_about_shows_the_checkpoints_model_card_instead_of_the_generic_limits(checkpoint, tmp_path):
    """A checkpoint with a README.md (a Hub model card) describes itself in About: its body, not its front matter,
    in place of the limits written for a model trained here from scratch."""
    import shutil

    final = tmp_path / "final"
    shutil.copytree(checkpoint, final)
    (final / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/else\n---\n"
                                     "### What this model is\nConverted from someone else's model.\n")
    engine = serving.Engine(str(final))
    about = app.about_markdown(engine)
    assert "### What this model is" in about and "Converted from someone else's model." in about
    assert "license: apache-2.0" not in about and "No instruction tuning" not in about
    assert f"{engine.model.count_parameters()['total'] / 1e6:.2f} M total" in about  # the architecture stays


def test_layer_selection_recolours(server):
    streams = server[0].streams
    data = call(gradio_client.Client(server[1], verbose=False), "Energy is", 0, 0, 5)[-1][4]
    for layer in MOE_LAYERS:
        view = streams.select_layer("generate", layer, data)
        assert f'data-layer="{layer}"' in view
        pos = MOE_LAYERS.index(layer)
        tops = [t["routing"][pos]["experts"][0] for t in data["tokens"]]
        assert [int(x) for x in re.findall(r'data-expert="(\d+)"', view)] == tops
    assert "Generate some text" in streams.select_layer("generate", MOE_LAYERS[0], None)


def test_each_tab_keeps_its_own_routing_layer(server):
    """Issue 23: layer 3 picked in Complete made the next Chat reply's view show layer 3 while Chat's dropdown said
    layer 1 (one choice per session shared by both tabs). Each tab now keeps its own."""
    streams = server[0].streams
    me, first, last = Request("two-tabs"), MOE_LAYERS[0], MOE_LAYERS[-1]
    streams.select_layer("generate", last, None, me)  # Complete's dropdown -> the last layer
    chat = collect(streams.chat("Hello", [], 0, 0, 3, me))[-1]
    assert f'data-layer="{first}"' in chat[2], "Chat's view followed Complete's dropdown"
    done = collect(streams.generate("Energy is", 0, 0, 3, me))[-1]
    assert f'data-layer="{last}"' in done[2]
    streams.select_layer("chat", last, None, me)
    streams.select_layer("generate", first, None, me)
    assert f'data-layer="{last}"' in collect(streams.chat("Hello", [], 0, 0, 3, me))[-1][2]
    assert f'data-layer="{first}"' in collect(streams.generate("Energy is", 0, 0, 3, me))[-1][2]
    streams.forget_session(me)
    assert not [key for key in streams.layer_choice if key[0] == "two-tabs"]


def test_token_views_say_tap_and_mark_a_token_with_no_text_of_its_own():
    """A phone cannot hover: the legend says tap (the page's TAP_JS shows a tapped token's routing). A token that
    only carries one byte of a character has no text of its own: it gets a visible, tappable mark."""
    data = {"prompt": "", "expert_load": [[0] * 8], "tokens": [
        {"index": 0, "id": 5, "text": "", "routing": [{"layer": 1, "experts": [3, 1], "weights": [0.7, 0.3]}]}]}
    view = app.TokenView([1]).render(data, 1)
    assert "tap (or hover) a token" in view and "hover a token for" not in view
    span = re.search(r'<span class="tok".*?</span></span>', view, re.S).group(0)
    assert "◌" in span and "&#8203;" not in span
    assert "span.tok" in app.TAP_JS and "token-info" in app.TAP_JS and "title" in app.TAP_JS


@pytest.mark.parametrize("breakage,message", [
    ("missing", "no config.json"),
    ("bad-json", "not valid JSON"),
    ("truncated-weights", "truncated or corrupt"),
    ("no-tokenizer", "Error"),
])
def test_broken_checkpoint_gives_an_error_page(tmp_path, checkpoint, breakage, message):
    import shutil

    bad = tmp_path / "final"
    if breakage != "missing":
        shutil.copytree(checkpoint, bad)
    if breakage == "bad-json":
        (bad / "config.json").write_text('{"model_type": "deepseek_v3", ')
    elif breakage == "truncated-weights":
        blob = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    elif breakage == "no-tokenizer":
        for name in os.listdir(bad):
            if name.startswith(("tokenizer", "special_tokens")):
                os.remove(bad / name)
    demo = app.build_demo(str(bad))  # must not raise
    try:
        panel = component(demo, "load-error")["value"]
        assert "No model loaded" in panel and message in panel and "Traceback" not in panel
        assert component(demo, "generate")["interactive"] is False
        outputs = collect(demo.streams.generate("Hello", 0.8, 50, 8))
        assert len(outputs) == 1 and "No model loaded" in outputs[0][1] and outputs[0][0] == ""
        assert "Honest limits" in component(demo, "about-text")["value"]
    finally:
        demo.close()


class Request:
    def __init__(self, session_hash):
        self.session_hash = session_hash


def collect(stream, on_update=None) -> list:
    """All updates of one of the page's async streams, run outside Gradio; on_update(updates) after each."""
    async def run():
        updates = []
        async for update in stream:
            updates.append(update)
            if on_update:
                on_update(updates)
        return updates
    return asyncio.run(run())


def test_stop_ends_the_stream_with_a_final_update(server):
    """Stop (per session) ends the stream after the current token with a complete last update."""
    streams = server[0].streams
    mine, other = Request("stop-test"), Request("another-session")

    def press(updates):
        n = len(updates[-1][4]["tokens"]) if isinstance(updates[-1][4], dict) else 0
        if n == 3:
            streams.request_stop(other)  # someone else's Stop does not end this stream
        if n == 5:
            streams.request_stop(mine)

    updates = collect(streams.generate("The law of demand", 0.8, 50, LIMIT, mine), press)
    text, status, view, plot, data = updates[-1]
    assert "stopped with the Stop button" in status and len(data["tokens"]) == 6 < LIMIT
    assert text == data["text"] and plot is not None and view.count('class="tok"') == 6
    assert "stop-test" not in streams.engine.stopping and "stop-test" not in streams.engine.running
    assert "another-session" not in streams.engine.stopping


def test_main_listens_on_loopback_unless_asked(monkeypatch):
    """`python app.py` serves 127.0.0.1 (as the README says to open); a Space (SPACE_ID set) or GRADIO_SERVER_NAME
    chooses another host."""
    seen = {}
    monkeypatch.setattr(app, "build_demo", lambda compile_decoding: f"demo compile={compile_decoding}")
    monkeypatch.setattr(app, "launch", lambda demo, **kw: seen.update(kw, demo=demo))
    monkeypatch.setattr(app, "serve_forever", lambda demo: seen.update(forever=demo))
    for key in ["GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT", "SPACE_ID", "COMPILE_DECODING"]:
        monkeypatch.delenv(key, raising=False)
    app.main()  # compiled one-stream decoding is on unless COMPILE_DECODING=0; the decode loop gets the main thread
    assert seen == {"demo": "demo compile=True", "server_name": "127.0.0.1", "server_port": 7860,
                    "prevent_thread_lock": True, "forever": "demo compile=True"}
    monkeypatch.setenv("COMPILE_DECODING", "0")
    app.main()
    assert seen["demo"] == "demo compile=False"
    monkeypatch.setenv("SPACE_ID", "someone/smollm2-deepseek")
    app.main()
    assert seen["server_name"] == "0.0.0.0"
    monkeypatch.setenv("PORT", "8080")
    app.main()
    assert seen["server_port"] == 8080
    monkeypatch.setenv("GRADIO_SERVER_NAME", "192.0.2.7")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    app.main()
    assert (seen["server_name"], seen["server_port"]) == ("192.0.2.7", 9000)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit, match="port number"):
        app.main()


# ----------------------------------------------------------------------------------------------------------------
# Hostile input, many visitors, chat, experts, loading


def raw_call(url, endpoint, data) -> list:
    """One call through the raw HTTP API (json.dumps escapes what httpx would refuse to encode, as a browser's
    JSON.stringify does): the decoded `data` of every streamed event."""
    import httpx

    r = httpx.post(f"{url}gradio_api/call/{endpoint}", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=30)
    r.raise_for_status()
    body = httpx.get(f"{url}gradio_api/call/{endpoint}/{r.json()['event_id']}", timeout=120).text
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    assert "event: error" not in body, body[-500:]
    return [e for e in events if isinstance(e, list)]


def test_lone_surrogate_is_replaced_not_a_tokenizer_error(server):
    """A lone surrogate (what a browser can send) used to answer with the tokenizer's `TextEncodeInput must be
    Union[...]`: it becomes U+FFFD with a note, and the text is generated."""
    url = server[1]
    text, status, _, _, data = raw_call(url, "generate", ["Cells \ud800 divide", 0, 0, 4])[-1]
    assert "TextEncodeInput" not in status and "invalid character" in status and "Done" in status, status
    assert data["prompt"] == "Cells \ufffd divide" and len(data["tokens"]) > 0
    history, status, _, _ = raw_call(url, "chat", ["hi \udfff", [], 0, 0, 4])[-1]
    assert "TextEncodeInput" not in status and "invalid character" in status and "Done" in status, status


def test_huge_numbers_are_reported_short(client):
    """max_new_tokens=1e308 used to print a 309-digit number in the note."""
    status = call(client, "Cells divide", 0.8, 1e308, 1e308)[-1][1]
    assert f"Max new tokens 1e+308 is above this app's limit of {LIMIT}" in status, status
    assert "Top-k 1e+308 is not below the vocabulary size" in status
    assert not re.search(r"\d{16}", status), status


def test_no_server_paths_in_the_page(server, checkpoint):
    """Neither the About text nor the page config (nor the page) shows the server's absolute checkpoint path."""
    import httpx

    demo, url = server
    secret = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))  # .../app0: where the server keeps it
    for path in ["", "config", "gradio_api/info"]:
        body = httpx.get(url + path, timeout=30).text
        assert secret not in body, path
    assert secret not in json.dumps(demo.config)
    about = component(demo, "about-text")["value"]
    assert "Checkpoint: `checkpoints/final`" in about


def test_two_calls_from_one_session_start_one_stream(server):
    """Two Generate clicks in the same tick started two streams: a session runs one stream at a time."""
    engine = server[0].engine
    c = gradio_client.Client(server[1], verbose=False)  # one client = one session
    before = engine.streams_started
    first = c.submit("Two clicks", 0, 0, 12, api_name="/generate")
    second = c.submit("Two clicks", 0, 0, 12, api_name="/generate")
    first.result(timeout=120), second.result(timeout=120)
    assert engine.streams_started - before == 1
    statuses = [o[1] for job in (first, second) for o in job.outputs() if o and isinstance(o[1], str)]
    assert sum("Done" in s for s in statuses) == 1, statuses


def test_busy_and_waiting_visitors_are_told(server, monkeypatch):
    """One running slot and one place in line: the second caller is told its place, the third that the Space is
    busy (instead of gradio_client's bare `QueueError: Queue is full!`); both still end cleanly."""
    demo, url = server
    engine = demo.engine
    saved, tokens = engine.admission, engine.tokens
    engine.admission = serving.Admission(workers=1, max_waiting=1)

    def slow_tokens(ids, settings):  # the tiny model is too quick to queue behind
        for step in tokens(ids, settings):
            time.sleep(0.03)
            yield step

    monkeypatch.setattr(engine, "tokens", slow_tokens)
    try:
        clients = [gradio_client.Client(url, verbose=False) for _ in range(3)]
        jobs = [clients[0].submit("Slot one", 0, 0, LIMIT, api_name="/generate")]
        deadline = time.time() + 60
        while engine.admission.active == 0 and time.time() < deadline:
            time.sleep(0.02)
        jobs.append(clients[1].submit("Slot two", 0, 0, 4, api_name="/generate"))
        while engine.admission.waiting == 0 and time.time() < deadline:
            time.sleep(0.02)
        busy = clients[2].submit("Slot three", 0, 0, 4, api_name="/generate").result(timeout=60)
        for job in jobs:
            job.result(timeout=120)
        assert "The Space is busy" in busy[1] and "try again" in busy[1] and busy[0] == ""
        waited = [o[1] for o in jobs[1].outputs()]
        assert any("In line**: number 1" in s for s in waited), waited
        assert "Done" in waited[-1]
        assert engine.admission.turned_away == 1 and engine.admission.active == 0 and engine.admission.waiting == 0
    finally:
        engine.admission = saved


def test_chat_endpoint_streams_a_reply_with_routing(client, tokenizer):
    job = client.submit("What do plants need to grow?", [], 0.8, 50, 20, api_name="/chat")
    job.result(timeout=120)
    outputs = job.outputs()
    history, status, view, data = outputs[-1]
    assert "Done" in status
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"][0]["text"] == "What do plants need to grow?"
    reply = history[1]["content"][0]["text"]
    assert "User:" not in reply and reply.strip() == reply and reply
    assert data["text"] in (reply, "") and view.count('class="tok"') == len(data["tokens"])
    check_routing({**data, "text": tokenizer.decode([t["id"] for t in data["tokens"]], skip_special_tokens=True)},
                  tokenizer)
    assert len({len(o[3]["tokens"]) for o in outputs if isinstance(o[3], dict)}) >= 3  # it streamed
    # the next turn carries the conversation: the prompt holds both turns as a transcript
    history2, status2, _, data2 = client.predict("And why?", history, 0, 0, 4, api_name="/chat")
    assert [m["role"] for m in history2] == ["user", "assistant", "user", "assistant"] and "Done" in status2
    assert data2["prompt_tokens"] > data["prompt_tokens"]


def test_malformed_chat_history_gets_a_clear_answer(server):
    """Issue 23: `/chat` with [{"role": "wizard", ...}] left a traceback in the server log and the client got
    nothing: it is answered with what is wrong."""
    url = server[1]
    history, status, _, _ = raw_call(url, "chat", ["hi", [{"role": "wizard", "content": "abracadabra"}], 0, 0, 4])[-1]
    assert "chat history was not understood" in status and "'wizard'" in status and history == [], status
    for bad, said in [("not a list", "expected a list of messages, got str"), ([42], "message 1 is a int")]:
        status = raw_call(url, "chat", ["hi", bad, 0, 0, 4])[-1][1]
        assert said in status, status
    assert app.normalise_history([["hi", "hello"], {"role": "user", "content": "x"}]) == (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "x"}], None)


def test_chat_shows_replies_as_plain_text_like_the_routing_view(server):
    """Issue 23: Chat rendered Markdown ("- " and "1." became lists) while the routing view showed the raw text."""
    props = component(server[0], "chatbot")
    assert props["render_markdown"] is False
    assert props["show_label"] is False  # its label floated over the messages on a phone


def test_fractional_settings_are_rounded_with_a_note(client):
    """Issue 23: top_k 2.5 and max_new_tokens 3.7 were rounded silently."""
    updates = call(client, "Cells divide", 0.8, 2.5, 3.7)
    status, data = updates[-1][1], updates[-1][4]
    assert "Top-k 2.5 is not a whole number: rounded to 3" in status, status
    assert "Max new tokens 3.7 is not a whole number: rounded to 4" in status and "max 4 new tokens" in status
    assert len(data["tokens"]) <= 4


def test_chat_reply_stops_at_the_next_user_turn(server, monkeypatch):
    """The reply ends where the model starts the visitor's next turn; its routing keeps only the reply's tokens."""
    streams = server[0].streams
    engine = streams.engine
    pieces = ["Plants", " need", " light", ".", "\n", "User", ":", " more"]

    def fake_tokens(ids, settings):
        assembler = serving.TextAssembler(engine.tokenizer)
        for piece in pieces:
            token_id = engine.tokenizer(piece, add_special_tokens=False)["input_ids"][0]
            assembler.ids.append(token_id)
            assembler.text += piece
            yield token_id, piece, [{"layer": layer, "experts": [0, 1], "weights": [0.6, 0.4]}
                                    for layer in MOE_LAYERS], assembler
        assembler.final = lambda: "".join(pieces)

    monkeypatch.setattr(engine, "tokens", fake_tokens)
    updates = collect(streams.chat("Hi", [], 0.8, 50, 16, Request("chat-stop")))
    history, status, view, data = updates[-1]
    assert history[-1] == {"role": "assistant", "content": "Plants need light."}
    assert "stopped at the next “User:”" in status
    assert [t["text"] for t in data["tokens"]] == ["Plants", " need", " light", "."]
    assert data["expert_load"][0][:2] == [4, 4]
    assert all("User" not in u[0][-1]["content"] for u in updates if u[0] and u[0][-1]["role"] == "assistant")
    assert app.shown_reply("Yes.\nUse") == "Yes." and app.shown_reply("Yes.\n") == "Yes."


def test_dtype_follows_the_probe(monkeypatch, checkpoint):
    """bf16 weights only where the start-up probe measured bf16 faster; the About tab says which and why."""
    for fast, slow, expected in [(torch.bfloat16, torch.float32, torch.bfloat16),
                                 (torch.float32, torch.bfloat16, torch.float32)]:
        monkeypatch.setattr(serving, "gemm_seconds",
                            lambda dtype, rows, hidden, cols, f=fast: 1e-4 * rows if dtype == f else 1e-2 * rows)
        engine = serving.Engine(checkpoint)
        assert engine.dtype_probe["dtype"] == expected and engine.model.lm_head.weight.dtype == expected
        assert engine.model.moe_layers[0].gate.e_score_correction_bias.dtype == torch.float32
        about = app.about_markdown(engine)
        assert f"Weights in **{str(expected).replace('torch.', '')}**" in about and "start-up probe" in about
        ids = engine.tokenizer("Cells", add_special_tokens=False)["input_ids"]
        assert len(list(engine.tokens(ids, dict(max_new=3, temperature=0.8, top_k=50)))) <= 3
    # a tie (or a small bf16 edge) keeps fp32
    monkeypatch.setattr(serving, "gemm_seconds", lambda dtype, rows, hidden, cols: 1e-3 if dtype == torch.float32
                        else 0.9e-3)
    assert serving.probe_dtype(64, 49152)["dtype"] == torch.float32


def test_experts_report_shown_only_for_its_weights(checkpoint, tmp_path):
    import shutil

    import experts_report

    ckpt = tmp_path / "final"
    shutil.copytree(checkpoint, ckpt)
    out = experts_report.write_report(str(ckpt), top=5)
    report = json.load(open(out))
    assert report["weights_sha256"] == serving.weights_sha256(str(ckpt))
    assert [entry["layer"] for entry in report["layers"]] == MOE_LAYERS
    for entry in report["layers"]:
        experts = entry["experts"]
        assert [e["expert"] for e in experts] == list(range(TINY["n_routed_experts"]))
        assert sum(e["load"] for e in experts) == report["sample"]["tokens"] * TINY["num_experts_per_tok"]
        for e in experts:
            assert len(e["top"]) <= 5 and [t["count"] for t in e["top"]] == sorted(
                [t["count"] for t in e["top"]], reverse=True)
            assert all(0 < t["share"] <= 1 and 0 < t["of_token"] <= 1 for t in e["top"])
    demo = app.build_demo(str(ckpt))
    try:
        view = component(demo, "experts-view")["value"]
        assert view.count('class="expert-card"') == TINY["n_routed_experts"]
        assert f'data-layer="{MOE_LAYERS[0]}"' in view
        assert f'data-layer="{MOE_LAYERS[-1]}"' in app.experts_table(demo.experts_report, MOE_LAYERS[-1])
        note = component(demo, "experts-note")["value"]
        assert "fixed sample" in note and "experts_report.SAMPLE" not in note and "12 short paragraphs" in note
    finally:
        demo.close()
    report["weights_sha256"] = "0" * 64  # as if the checkpoint had been replaced since
    json.dump(report, open(out, "w"))
    demo = app.build_demo(str(ckpt))
    try:
        assert "stale" in component(demo, "experts-note")["value"]
        assert "expert-card" not in component(demo, "experts-view")["value"]
    finally:
        demo.close()


def test_experts_cards_draw_whitespace_tokens_and_fit_a_grid():
    """Issue 23: whitespace tokens showed as blank cells, and tables were wider than their cards."""
    assert [app.shown_token(t) for t in [" ", " the", "\n\n", "\t", "", "a\x00"]] == [
        "␣", "␣the", "↵↵", "⇥", "◌", "a\\x00"]
    top = [{"token": t, "share": 0.1, "of_token": 0.5, "count": 1} for t in [" ", "\n", " of"]]
    report = {"layers": [{"layer": 1, "experts": [{"expert": e, "load": 10, "top": top} for e in range(8)]}]}
    view = app.experts_table(report, 1)
    cells = re.findall(r'<td class="tokcell"[^>]*><code>(.*?)</code>', view)
    assert cells[:3] == ["␣", "↵", "␣of"] and all(cells)
    assert "<colgroup>" in view and "table-layout: fixed" in app.CSS and "display: grid" in app.CSS


def test_missing_experts_report_names_the_command_for_the_served_directory(checkpoint, tmp_path, monkeypatch):
    """Issue 23: "no experts.json" said to run `experts_report.py` without naming the served model's directory, and
    run as written it wrote into checkpoints/final instead."""
    import experts_report

    inside = os.path.join(app.APP_DIR, "runs", "x", "final")
    assert "`python experts_report.py runs/x/final`" in app.report_command(inside)
    assert "MODEL_DIR" in app.report_command(str(tmp_path / "elsewhere" / "final"))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "served"))
    assert experts_report.parse_args([]).model_dir == str(tmp_path / "served")  # the app's MODEL_DIR
    monkeypatch.delenv("MODEL_DIR")
    assert experts_report.parse_args([]).model_dir == serving.DEFAULT_MODEL_DIR
    engine = serving.Engine(checkpoint)  # no experts.json beside it
    report, note = app.load_experts_report(engine)
    assert report is None and "MODEL_DIR" in note and "python experts_report.py" in note


def test_shipped_experts_report_matches_the_shipped_weights():
    """checkpoints/final/experts.json must be regenerated (python experts_report.py) whenever the weights change."""
    final = os.path.join(app.APP_DIR, "checkpoints", "final")
    if not any(name.endswith(".safetensors") for name in os.listdir(final)):
        pytest.fail("checkpoints/final holds no weights")
    report = json.load(open(os.path.join(final, app.EXPERTS_JSON)))
    assert report["weights_sha256"] == serving.weights_sha256(final), "stale: run python experts_report.py"


def test_without_chromium_every_browser_test_is_skipped_loudly(tmp_path):
    """Issue 23: the README's test command printed "146 passed, 2 skipped" without chromium: a new user believed the
    page had been tested in a browser. Now the run ends with a banner naming the reason and what to install."""
    import subprocess
    import sys

    env = {**os.environ, "CHROMIUM": str(tmp_path / "no-chromium-here"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join("tests", "test_browser.py")], cwd=app.APP_DIR, env=env,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode in (0, 5), out[-2000:]  # 5: pytest's "no tests ran" (a module skipped as a whole)
    assert "BROWSER TESTS DID NOT RUN" in out and f"no chromium at {tmp_path / 'no-chromium-here'}" in out, out[-2000:]
    assert "apt-get install chromium" in out


def test_updates_are_coalesced_not_sent_per_token(server, monkeypatch):
    """A stream's page updates come at most every UI_UPDATE_S (rendering every token cost the decode loop most of
    its speed): with a long interval, /generate and /chat send the start, the first token and the final update,
    and the final one still holds every token."""
    monkeypatch.setattr(app, "UI_UPDATE_S", 3600.0)
    monkeypatch.setattr(app, "ROUTING_EVERY_S", 3600.0)
    streams = server[0].streams
    updates = collect(streams.generate("The law of demand", 0, 0, 24, Request("coalesce-generate")))
    assert len(updates) == 3, [u[1] for u in updates]
    assert "Generating… 1/24" in updates[1][1] and updates[1][4] == gr.skip()  # the routing JSON waits
    text, status, view, plot, data = updates[-1]
    assert "Done" in status and len(data["tokens"]) == 24 and view.count('class="tok"') == 24
    updates = collect(streams.chat("Hi", [], 0, 0, 24, Request("coalesce-chat")))
    assert len(updates) <= 3 and "Done" in updates[-1][1], [u[1] for u in updates]
    monkeypatch.setattr(app, "UI_UPDATE_S", 0.0)  # the same stream with every token sent: one update per token,
    per_token = collect(streams.generate("The law of demand", 0, 0, 24, Request("coalesce-every")))
    assert len(per_token) == 1 + 23 + 1 and per_token[-1][0] == text
    assert all(u[4] == gr.skip() for u in per_token[1:-1])  # the routing JSON still only at the start and the end
