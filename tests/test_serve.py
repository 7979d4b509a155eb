"""serve.py, the app's engine without the page: incremental text assembly, where the model comes from, input checks,
chat transcripts that fit the context, admission (running slots, a line with places, turning away) and streaming
with routing. A tiny random checkpoint with the SmolLM2 tokenizer; no network, never the Hub. (app.py's tests drive
the same engine through the served page.)"""
import threading
import time

import pytest

from conftest import APP_TINY, HAVE_TOKENIZER, TOKENIZER_DIR, make_tiny_checkpoint

torch = pytest.importorskip("torch")
if not HAVE_TOKENIZER:
    pytest.skip(f"the SmolLM2 tokenizer is missing at {TOKENIZER_DIR}", allow_module_level=True)

import serve  # noqa: E402
import generate as generate_module  # noqa: E402
from generate import generate  # noqa: E402

CONTEXT = APP_TINY["max_position_embeddings"]
MOE_LAYERS = list(range(APP_TINY["first_k_dense_replace"], APP_TINY["num_hidden_layers"]))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return serve.Engine(make_tiny_checkpoint(tmp_path_factory.mktemp("serve")))


def test_engine_streams_the_models_tokens_with_their_routing(engine, tokenizer):
    settings, notes = engine.prepare("The law of demand", 0, 0, 6)
    assert [n.split(":")[0] for n in notes] == ["ℹ️ Top-k 0", "ℹ️ Temperature 0"]
    assert settings["ids"] == tokenizer("The law of demand", add_special_tokens=False)["input_ids"]
    streamed = list(engine.tokens(settings["ids"], settings))
    expected = list(generate(engine.model, settings["ids"], max_new_tokens=6, temperature=0, return_routing=True))
    assert [t for t, *_ in streamed] == [t.token_id for t in expected]
    for (_, _, routing, _), step in zip(streamed, expected):
        assert [r["layer"] for r in routing] == MOE_LAYERS
        for r, (layer, experts, weights) in zip(routing, step.routing):
            assert sorted(r["experts"]) == sorted(experts) and r["weights"] == sorted(r["weights"], reverse=True)
    text = streamed[-1][3]
    assert "".join(piece for _, piece, _, _ in streamed) == text.text and text.final().startswith(text.text)


def test_settings_are_clamped_and_each_change_explained(engine):
    settings, notes = engine.check_settings("hot", -3, 10 ** 9)
    assert settings == {"temperature": 0.8, "top_k": 0, "max_new": CONTEXT // 2}
    assert len(notes) == 3 and "not a number" in notes[0] and "negative" in notes[1] and "clamped" in notes[2]
    settings, notes = engine.check_settings(9.0, 2.0, 0)
    assert settings == {"temperature": serve.MAX_TEMPERATURE, "top_k": 2, "max_new": 1} and len(notes) == 2
    assert engine.prepare("   ", 0.8, 50, 8)[0] is None
    settings, notes = engine.prepare("word " * 500, 0.8, 50, 8)
    assert len(settings["ids"]) == CONTEXT - 8 and any("Long prompt truncated" in n for n in notes)


def test_admission_runs_n_streams_keeps_a_line_and_turns_away_beyond_it():
    line = serve.Admission(workers=2, max_waiting=2)
    first, second = line.join(8), line.join(8)
    assert line.poll(first) == line.poll(second) == 0 and line.active == 2
    third, fourth = line.join(8), line.join(8)
    assert line.poll(third) == 1 and line.poll(fourth) == 2 and line.waiting == 2
    assert line.join(8) is None and line.turned_away == 1  # the line is full
    assert line.estimate(third) is None  # no token measured yet: no estimate
    line.leave(first)
    assert line.poll(fourth) == 2  # first come, first served: only the head of the line may start
    assert line.poll(third) == 0 and line.active == 2 and line.poll(fourth) == 1
    line.cancel(fourth)
    assert line.waiting == 0 and line.active == 2


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_wait_estimates_come_from_the_running_streams_time_per_token():
    """Issue 23: "about 1 s before yours starts" became 3.2 s, and an estimate rose while its place stayed the same.
    The estimate is now each running stream's remaining budget at the measured time per token, then the budgets of
    the tickets ahead in line, slot by slot."""
    clock = Clock()
    line = serve.Admission(workers=2, max_waiting=8, clock=clock)
    a, b = line.join(100), line.join(40)
    waiting = [line.join(50), line.join(50), line.join(50)]
    assert [line.poll(t) for t in waiting] == [1, 2, 3]
    clock.now = 1.0
    line.progress(a, 10)  # 0.1 s per token
    line.progress(b, 10)
    assert line.seconds_per_token() == pytest.approx(0.1)
    # slots free at 9 s (a: 90 tokens left) and 3 s (b: 30 left); the 1st waiter takes b's slot at 3 s, the 2nd
    # the 1st waiter's slot when its 50 tokens end at 3 + 5 = 8 s, the 3rd a's slot at 9 s
    assert [line.estimate(t) for t in waiting] == [pytest.approx(3.0), pytest.approx(8.0), pytest.approx(9.0)]
    assert line.estimate(2) == pytest.approx(8.0)  # by place, as by ticket
    previous = [line.estimate(t) for t in waiting]
    for step in range(2, 4):  # steady progress: no estimate ever rises while its place stays the same
        clock.now = step * 1.0
        line.progress(a, 10 * step)
        line.progress(b, 10 * step)
        now = [line.estimate(t) for t in waiting]
        assert all(n <= p + 1e-9 for n, p in zip(now, previous)), (now, previous)
        previous = now
    clock.now = 4.0
    line.progress(a, 40)
    line.progress(b, 40)
    line.leave(b)  # b finished its budget: the 1st waiter starts, the others move up
    assert line.poll(waiting[0]) == 0 and line.poll(waiting[1]) == 1
    line.leave(a)  # a leaves early (Stop): the measured time per token of finished streams is kept
    assert line.seconds_per_token() == pytest.approx(0.1)
    assert line.estimate(waiting[0]) == 0.0  # running: no wait


def test_fractional_top_k_and_max_new_tokens_are_rounded_with_a_note(engine):
    settings, notes = engine.check_settings(0.8, 2.5, 3.7)
    assert settings["top_k"] == 3 and settings["max_new"] == 4
    assert "Top-k 2.5 is not a whole number: rounded to 3" in notes[0]
    assert "Max new tokens 3.7 is not a whole number: rounded to 4" in notes[1]
    settings, notes = engine.check_settings(0.8, 0.4, 5)
    assert settings["top_k"] == 0 and "rounded to 0" in notes[0] and "no top-k filter" in notes[1]
    assert engine.check_settings(0.8, 50, 5)[1] == []  # whole numbers: nothing to say


def test_long_prompt_gives_no_false_indexing_errors_warning(engine, capfd):
    """transformers warned "Token indices sequence length is longer than the specified maximum sequence length ...
    will result in indexing errors" for every long prompt: the prompt is cut to the context, so it is not true."""
    text = "word " * 10_000  # 10k tokens, beyond the tokenizer's model_max_length (8192)
    assert len(engine.tokenizer(text[:60], add_special_tokens=False)["input_ids"]) > 0
    settings, notes = engine.prepare(text, 0.8, 50, 8)
    assert len(settings["ids"]) == CONTEXT - 8
    err = capfd.readouterr().err
    assert "indexing errors" not in err and "Token indices" not in err, err


def test_incremental_decoding_hides_special_tokens_and_partial_characters(tokenizer):
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert special not in (None, tokenizer.unk_token_id)
    ids = (tokenizer("Größe: 🙂 日本語", add_special_tokens=False)["input_ids"] + [special]
           + tokenizer(" naïve café", add_special_tokens=False)["input_ids"] + [0])
    assembler = serve.TextAssembler(tokenizer)
    pieces, texts = [], []
    for i in ids:
        pieces.append(assembler.add(i))
        texts.append(assembler.text)
        assert "\ufffd" not in assembler.text and "<|" not in assembler.text
    final = assembler.final()
    assert final == "Größe: 🙂 日本語 naïve café"
    assert "".join(pieces) == final and texts[-1] == final
    assert "" in pieces  # some token only carried part of a character (shown with the next one)


def test_model_repo_download_and_offline_fallback(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("MODEL_REPO", raising=False)
    assert serve.resolve_model_dir() == (str(tmp_path / "local"), None)
    assert serve.resolve_model_dir("explicit") == ("explicit", None)
    monkeypatch.setenv("MODEL_REPO", "someone/smollm2-deepseek")
    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    path, note = serve.resolve_model_dir()
    assert calls == ["someone/smollm2-deepseek"]
    assert path == str(tmp_path / "local") and "Could not download" in note and "OSError" in note
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: calls.append(kw.get("revision")) or str(tmp_path / "snap"))
    path, note = serve.resolve_model_dir()
    assert path == str(tmp_path / "snap") and "someone/smollm2-deepseek" in note and "MODEL_REVISION" in note
    monkeypatch.setenv("MODEL_REVISION", "0123abcd")  # a pinned revision is what gets downloaded
    path, note = serve.resolve_model_dir()
    assert calls[-2:] == [None, "0123abcd"] and "revision `0123abcd`" in note


def test_chat_prompt_is_a_transcript_trimmed_from_the_oldest_turn(engine, tokenizer):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " + "word " * 8},
                    {"role": "assistant", "content": f"answer {i}"}]
    notes = []
    ids = engine.chat_prompt(history[:2], "last one", 8, notes)
    text = tokenizer.decode(ids)
    assert text == (serve.CHAT_PREAMBLE + "\n\nUser: question 0 " + "word " * 7 + "word\nAssistant: answer 0"
                    "\nUser: last one\nAssistant:")
    assert not notes
    ids = engine.chat_prompt(history, "last one", 8, notes)
    text = tokenizer.decode(ids)
    assert len(ids) <= CONTEXT - 8 and text.endswith("\nUser: last one\nAssistant:")
    assert "question 5" in text and "question 0" not in text  # the oldest turns went first
    assert any("oldest exchange" in n for n in notes)
    kept = [i for i in range(6) if f"question {i}" in text]
    assert kept == list(range(kept[0], 6))  # a contiguous run of the newest turns


def test_chat_model_gets_its_chat_template_trimmed_from_the_oldest_turn_and_stops_at_end_of_turn(
        engine, tokenizer, tmp_path):
    """A tokenizer with a chat template (SmolLM2's): the prompt is the template's rendering of the conversation with
    the assistant's turn opened, oldest exchanges dropped to fit, and a reply ends at <|im_end|>. A base model's
    checkpoint (no template) keeps the plain transcript."""
    assert engine.end_of_turn is None
    engine = serve.Engine(make_tiny_checkpoint(tmp_path, chat_template=True))
    assert engine.end_of_turn == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    history = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    notes = []
    ids = engine.chat_prompt(history, "  What is rain? ", 8, notes)
    expected = tokenizer.apply_chat_template(history + [{"role": "user", "content": "What is rain?"}],
                                             tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == expected and not notes
    assert expected.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in expected
    long_history = []
    for i in range(6):
        long_history += [{"role": "user", "content": f"question {i} " + "word " * 8},
                         {"role": "assistant", "content": f"answer {i}"}]
    ids = engine.chat_prompt(long_history, "last one", 8, notes)
    text = tokenizer.decode(ids)
    assert len(ids) <= CONTEXT - 8 and text.startswith("<|im_start|>system")
    assert text.endswith("<|im_start|>user\nlast one<|im_end|>\n<|im_start|>assistant\n")
    kept = [i for i in range(6) if f"question {i}" in text]
    assert kept and kept == list(range(kept[0], 6)) and 0 not in kept
    assert any("oldest exchange" in n for n in notes)
    # a reply ends before any of the stop ids (the app passes eos and end_of_turn): make the first token one
    settings, _ = engine.check_settings(0, 0, 5)
    first = next(engine.tokens(ids, settings))[0]
    assert list(engine.tokens(ids, {**settings, "stop": (first, engine.end_of_turn)})) == []
    assert len(list(engine.tokens(ids, {**settings, "stop": None}))) == 5


# -- continuous batching (serve.Batcher) ----------------------------------------------------------------------------


def solo(engine, ids, settings):
    """A stream's solo run: generate() with the same settings and seed, routing as Engine.tokens formats it."""
    seed = settings.get("seed")
    g = None if seed is None else torch.Generator().manual_seed(seed)
    out = []
    for t in generate(engine.model, ids, max_new_tokens=settings["max_new"], temperature=settings["temperature"],
                      top_k=settings["top_k"], return_routing=True, eos_token_id=settings.get("stop", -1),
                      generator=g):
        out.append((t.token_id, [(layer, sorted(experts), sorted(weights, reverse=True))
                                 for layer, experts, weights in t.routing]))
    return out


def assert_matches_solo(streamed, want):
    assert [t for t, *_ in streamed] == [t for t, _ in want]
    for (_, _, routing, _), (_, layers) in zip(streamed, want):
        assert [(r["layer"], sorted(r["experts"])) for r in routing] == [(l, e) for l, e, _ in layers]
        for r, (_, _, weights) in zip(routing, layers):
            assert r["weights"] == pytest.approx(weights, abs=2e-4)  # Engine.tokens rounds to 4 digits


class Gate:
    """Holds the Batcher's decode loop before each batched step until the test lets it go, and logs the streams
    (their first prompt id) each step ran."""

    def __init__(self, monkeypatch):
        self.permits = threading.Semaphore(0)
        self.log = []
        self.parked = threading.Event()  # the loop waits here, the streams that join before this step collected
        step = serve.Batcher._step

        def gated(batcher, decoder):
            self.parked.set()
            assert self.permits.acquire(timeout=120), "the test never let this step go"
            self.parked.clear()
            self.log.append(sorted(s.owner.ids[0] for s in decoder.streams))
            step(batcher, decoder)

        monkeypatch.setattr(serve.Batcher, "_step", gated)

    def steps(self, n):
        for _ in range(n):
            self.permits.release()

    def step(self):
        """Let exactly one batched step run and wait until the loop is parked before the next one."""
        done = len(self.log) + 1
        self.permits.release()
        wait_for(lambda: len(self.log) >= done and self.parked.is_set(), "a step")


def run_in_thread(engine, ids, settings, results, key):
    def run():
        try:
            results[key] = list(engine.tokens(ids, settings))
        except Exception as err:  # noqa: BLE001 - the test reads what each stream raised
            results[key] = err
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(condition, what):
    import time

    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_batched_streams_that_join_and_leave_give_their_solo_tokens_and_routing(engine, monkeypatch):
    """Three streams of different prompt lengths, greedy and seeded-sampled, join the decode loop at different steps
    (before steps 1, 5 and 8) and leave at different steps (budgets 10, 6, 7: after steps 9, 9 and 13); each streams
    exactly its solo run's tokens and routing."""
    gate = Gate(monkeypatch)
    texts = ["The law of demand", "Photosynthesis is the process by which plants", "In 1850"]
    requests = []
    for text, (temperature, top_k, n, seed) in zip(texts, [(0, 0, 10, None), (0.9, 20, 6, 7), (1.2, 0, 7, 8)]):
        settings, _ = engine.prepare(text, temperature, top_k, n)
        if seed is not None:
            settings["seed"] = seed
        requests.append((settings["ids"], settings))
    assert len({len(ids) for ids, _ in requests}) == 3
    results, threads = {}, []
    for i, (ids, settings) in enumerate(requests):
        threads.append(run_in_thread(engine, ids, settings, results, i))
        if i == 0:
            wait_for(gate.parked.is_set, "the first stream to join")
        else:  # submitted while the loop is parked before a step: it joins right after that step
            wait_for(lambda: engine.batcher._joining, "the stream to be submitted")
        for _ in range(3 if i < 2 else 0):
            gate.step()
    gate.steps(100)
    for thread in threads:
        thread.join(timeout=300)
    for i, (ids, settings) in enumerate(requests):
        assert not isinstance(results[i], Exception), results[i]
        assert_matches_solo(results[i], solo(engine, ids, settings))
    first = [ids[0] for ids, _ in requests]
    assert gate.log == [[first[0]]] * 4 + [sorted(first[:2])] * 3 + [sorted(first)] * 2 + [[first[2]]] * 4
    assert engine.batcher.running == 0


def test_a_cancelled_stream_gives_its_row_to_a_waiting_one(engine, monkeypatch):
    gate = Gate(monkeypatch)
    monkeypatch.setattr(engine, "batcher", serve.Batcher(engine.model, max_batch=1))
    first, _ = engine.prepare("The law of demand", 0, 0, 40)
    second, _ = engine.prepare("In 1850", 0.7, 0, 6)
    second["seed"] = 3
    stream = engine.tokens(first["ids"], first)
    got = [next(stream)]  # the first token comes with the prefill
    results = {}
    thread = run_in_thread(engine, second["ids"], second, results, "second")
    gate.steps(2)
    got += [next(stream), next(stream)]
    stream.close()  # the visitor went away: its row goes to the waiting stream
    gate.steps(100)
    thread.join(timeout=300)
    assert_matches_solo(got, solo(engine, first["ids"], first)[:3])
    assert_matches_solo(results["second"], solo(engine, second["ids"], second))
    first_id = first["ids"][0]
    assert sum(streams == [first_id] for streams in gate.log) <= 3  # it stopped soon after, not after 40 tokens
    assert len(gate.log) < 40
    # a later busy spell (the loop ended when its streams did) gets a new decoder but the same laid-out lm_head
    head = engine.batcher.head
    assert head is not None
    gate.steps(10)
    assert_matches_solo(list(engine.tokens(second["ids"], second)), solo(engine, second["ids"], second))
    assert engine.batcher.head is head


def test_bad_input_or_a_failure_in_one_stream_never_disturbs_another(engine, monkeypatch):
    """While a stream runs: out-of-vocabulary ids, a NaN temperature, a malformed stop id, a bad seed and a prefill
    that fails inside the model each end only their own stream; the running one still gives its solo run. A failing
    batched step ends the streams in it, and the next stream runs normally."""
    gate = Gate(monkeypatch)
    good, _ = engine.prepare("The law of demand", 0.8, 30, 12)
    good["seed"] = 5
    results = {}
    threads = [run_in_thread(engine, good["ids"], good, results, "good")]
    wait_for(lambda: engine.batcher._thread is not None and not engine.batcher._joining, "the good stream to join")
    gate.steps(3)
    model = engine.model
    hidden_states = model.hidden_states

    def failing(ids, *args, **kwargs):  # a prefill that fails inside the model: prompts of exactly 7 tokens
        if ids.shape[1] == 7:
            raise RuntimeError("prefill failed")
        return hidden_states(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing)
    settings, _ = engine.check_settings(0, 0, 5)
    bad = {"ids": ([5, engine.model.config.vocab_size + 3], settings),
           "nan": ([5, 6], {**settings, "temperature": float("nan")}),
           "stop": ([5, 6], {**settings, "stop": ("x",)}),
           "seed": ([5, 6], {**settings, "seed": "not a seed"}),
           "prefill": ([5] * 7, settings)}
    for key, (ids, s) in bad.items():
        threads.append(run_in_thread(engine, ids, s, results, key))
    gate.steps(100)
    for thread in threads:
        thread.join(timeout=300)
    for key in bad:
        assert isinstance(results[key], Exception), key
    assert "outside the vocabulary" in str(results["ids"]) and "temperature" in str(results["nan"])
    assert "prefill failed" in str(results["prefill"])
    monkeypatch.setattr(model, "hidden_states", hidden_states)
    assert_matches_solo(results["good"], solo(engine, good["ids"], good))

    def failing_step(ids, cache, start_pos, *args, **kwargs):
        if torch.is_tensor(start_pos) or start_pos > 0:  # a decode step (the prefill starts at 0)
            raise RuntimeError("step failed")
        return hidden_states(ids, cache, start_pos, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", failing_step)
    with pytest.raises(RuntimeError, match="step failed"):
        list(engine.tokens(good["ids"], good))
    monkeypatch.setattr(model, "hidden_states", hidden_states)
    assert_matches_solo(list(engine.tokens(good["ids"], good)), solo(engine, good["ids"], good))


def test_per_stream_engine_keeps_its_own_loops_and_seeds(engine, monkeypatch):
    """Engine(batching=False) (what the benchmark compares against): each stream its own decode loop, a seeded
    stream gives its solo run."""
    monkeypatch.setattr(engine, "batcher", None)
    settings, _ = engine.prepare("The law of demand", 1.0, 0, 6)
    settings["seed"] = 21
    made = []  # DecodeHeads laid out while the stream runs: none, it uses the engine's
    real_init = generate_module.DecodeHead.__init__
    monkeypatch.setattr(generate_module.DecodeHead, "__init__",
                        lambda head, *args, **kwargs: made.append(1) or real_init(head, *args, **kwargs))
    streamed = list(engine.tokens(settings["ids"], settings))
    assert made == [] and engine.head is not None
    assert_matches_solo(streamed, solo(engine, settings["ids"], settings))


@pytest.mark.skipif(not generate_module.has_cxx_compiler(), reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_one_stream_steps_match_eager_ones(engine, tmp_path):
    """Engine(compile_decoding=True): the one-stream step is compiled in a background thread after load, timed
    against eager steps, and decodes a stream running alone with the same greedy tokens and routing as the eager
    engine; streams running together still step eagerly in one forward."""
    compiled = serve.Engine(make_tiny_checkpoint(tmp_path), compile_decoding=True)
    assert compiled.compiled["state"] in ("compiling", "on", "slower")  # the page is served meanwhile
    deadline = time.monotonic() + 600
    while compiled.compiled["state"] == "compiling":
        assert time.monotonic() < deadline, "the compile warm-up never finished"
        time.sleep(0.2)
    state = compiled.compiled
    assert state["state"] in ("on", "slower"), state
    assert state["eager_step_ms"] > 0 and state["compiled_step_ms"] > 0
    assert (compiled.batcher.compiled_step is not None) == (state["state"] == "on")
    compiled.batcher.compiled_step = compiled.compiled_step  # the path under test, whichever won the timing here
    settings, _ = engine.prepare("The law of demand", 0, 0, 12)
    want = list(engine.tokens(settings["ids"], settings))
    got = list(compiled.tokens(settings["ids"], settings))
    assert compiled.batcher.compiled_steps == 11  # every step after the prefill's token
    assert [t for t, *_ in got] == [t for t, *_ in want]
    for (_, _, r_got, _), (_, _, r_want, _) in zip(got, want):
        assert [(r["layer"], r["experts"]) for r in r_got] == [(r["layer"], r["experts"]) for r in r_want]
        for a, b in zip(r_got, r_want):
            assert a["weights"] == pytest.approx(b["weights"], abs=2e-4)
    results = {}

    def run(name, prompt):
        s, _ = compiled.prepare(prompt, 0, 0, 12)
        results[name] = [t for t, *_ in compiled.tokens(s["ids"], s)]

    threads = [threading.Thread(target=run, args=(n, p)) for n, p in [("a", "The law of demand"), ("b", "Cells")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["a"] == [t for t, *_ in want] and len(results["b"]) == 12


def test_a_hosted_decode_loop_serves_streams_in_its_own_thread(tmp_path):
    """Batcher.serve_forever (what `python app.py` runs in its main thread): streams are decoded in the hosting
    thread, one after another and together, with the tokens of the on-demand loop thread, which is never started."""
    hosted = serve.Engine(make_tiny_checkpoint(tmp_path))
    host = threading.Thread(target=hosted.batcher.serve_forever, name="host", daemon=True)
    host.start()
    seen_threads = set()
    real_step = hosted.batcher._step

    def step(decoder):
        seen_threads.add(threading.current_thread().name)
        return real_step(decoder)

    hosted.batcher._step = step
    settings, _ = hosted.prepare("The law of demand", 0, 0, 10)
    solo = [t for t, *_ in hosted.tokens(settings["ids"], settings)]
    assert solo == [t.token_id for t in generate(hosted.model, settings["ids"], 10, temperature=0)]
    results = {}

    def run(name):
        results[name] = [t for t, *_ in hosted.tokens(settings["ids"], settings)]

    threads = [threading.Thread(target=run, args=(n,)) for n in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {"a": solo, "b": solo, "c": solo}
    assert seen_threads == {"host"} and host.is_alive()
