"""serve.py, the app's engine without the page: incremental text assembly, where the model comes from, input checks,
chat transcripts that fit the context, admission (running slots, a line with places, turning away) and streaming
with routing. A tiny random checkpoint with the SmolLM2 tokenizer; no network, never the Hub. (app.py's tests drive
the same engine through the served page.)"""
import pytest

from conftest import APP_TINY, HAVE_TOKENIZER, TOKENIZER_DIR, make_tiny_checkpoint

torch = pytest.importorskip("torch")
if not HAVE_TOKENIZER:
    pytest.skip(f"the SmolLM2 tokenizer is missing at {TOKENIZER_DIR}", allow_module_level=True)

import serve  # noqa: E402
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
