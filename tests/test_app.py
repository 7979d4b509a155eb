"""app.py served for real on 127.0.0.1 with a tiny random checkpoint, driven through gradio_client's /generate API.

Needs ../shared/tokenizer (the SmolLM2 tokenizer); no network, never the Hugging Face Hub.
"""
import os
import re
import threading

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

CONTEXT = TINY["max_position_embeddings"]
LIMIT = CONTEXT // 2  # the app's max new tokens for this context
MOE_LAYERS = list(range(TINY["first_k_dense_replace"], TINY["num_hidden_layers"]))


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


def test_generate_endpoint_signature(client):
    info = client.view_api(return_format="dict", print_info=False)
    endpoint = info["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == ["prompt", "temperature", "top_k",
                                                                     "max_new_tokens"]
    assert len(endpoint["returns"]) == 5  # text, status, token view, heatmap, routing json
    assert set(info["named_endpoints"]) == {"/generate"}  # the helper events stay private


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
        steps = list(model.generate(ids, max_new_tokens=10, temperature=0, return_routing=True))
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


def test_layer_selection_recolours(server):
    engine = server[0].engine
    data = call(gradio_client.Client(server[1], verbose=False), "Energy is", 0, 0, 5)[-1][4]
    for layer in MOE_LAYERS:
        view = engine.select_layer(layer, data)
        assert f'data-layer="{layer}"' in view
        pos = MOE_LAYERS.index(layer)
        tops = [t["routing"][pos]["experts"][0] for t in data["tokens"]]
        assert [int(x) for x in re.findall(r'data-expert="(\d+)"', view)] == tops
    assert "Generate some text" in engine.select_layer(MOE_LAYERS[0], None)


def test_incremental_decoding_hides_special_tokens_and_partial_characters(tokenizer):
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special not in (None, tokenizer.unk_token_id)
    ids = (tokenizer("Größe: 🙂 日本語", add_special_tokens=False)["input_ids"] + [special]
           + tokenizer(" naïve café", add_special_tokens=False)["input_ids"] + [0])
    assembler = app.TextAssembler(tokenizer)
    pieces, texts = [], []
    for i in ids:
        pieces.append(assembler.add(i))
        texts.append(assembler.text)
        assert "\ufffd" not in assembler.text and "<|" not in assembler.text
    final = assembler.final()
    assert final == "Größe: 🙂 日本語 naïve café"
    assert "".join(pieces) == final and texts[-1] == final
    assert "" in pieces  # some token only carried part of a character (shown with the next one)


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
        outputs = list(demo.engine.stream("Hello", 0.8, 50, 8))
        assert len(outputs) == 1 and "No model loaded" in outputs[0][1] and outputs[0][0] == ""
        assert "Honest limits" in component(demo, "about-text")["value"]
    finally:
        demo.close()


def test_model_repo_download_and_offline_fallback(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("MODEL_REPO", raising=False)
    assert app.resolve_model_dir() == (str(tmp_path / "local"), None)
    assert app.resolve_model_dir("explicit") == ("explicit", None)
    monkeypatch.setenv("MODEL_REPO", "someone/smollm2-deepseek")
    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    path, note = app.resolve_model_dir()
    assert calls == ["someone/smollm2-deepseek"]
    assert path == str(tmp_path / "local") and "Could not download" in note and "OSError" in note
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "snap"))
    path, note = app.resolve_model_dir()
    assert path == str(tmp_path / "snap") and "someone/smollm2-deepseek" in note


def test_stop_ends_the_stream_with_a_final_update(server):
    """Stop (per session) ends the stream after the current token with a complete last update."""
    engine = server[0].engine

    class Request:
        session_hash = "stop-test"

    other = Request()
    other.session_hash = "another-session"
    updates = []
    for update in engine.stream("The law of demand", 0.8, 50, LIMIT, Request()):
        updates.append(update)
        if len(updates[-1][4]["tokens"]) == 3:
            engine.request_stop(other)  # someone else's Stop does not end this stream
        if len(updates[-1][4]["tokens"]) == 5:
            engine.request_stop(Request())
    text, status, view, plot, data = updates[-1]
    assert "stopped with the Stop button" in status and len(data["tokens"]) == 6 < LIMIT
    assert text == data["text"] and plot is not None and view.count('class="tok"') == 6
    assert "stop-test" not in engine.stopping
    engine.forget_session(other)
    assert "another-session" not in engine.stopping


def test_main_reads_host_and_port(monkeypatch):
    seen = {}
    monkeypatch.setattr(app, "build_demo", lambda: "demo")
    monkeypatch.setattr(app, "launch", lambda demo, **kw: seen.update(kw, demo=demo))
    for key in ["GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT"]:
        monkeypatch.delenv(key, raising=False)
    app.main()
    assert seen == {"demo": "demo", "server_name": "0.0.0.0", "server_port": 7860}
    monkeypatch.setenv("PORT", "8080")
    app.main()
    assert seen["server_port"] == 8080
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    app.main()
    assert (seen["server_name"], seen["server_port"]) == ("127.0.0.1", 9000)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit, match="port number"):
        app.main()
