"""The app's serving engine (no Gradio; app.py is the page around it), built on generate.py's decode loop.

    from serve import Engine, resolve_model_dir
    engine = Engine(resolve_model_dir()[0])          # weights in the dtype the start-up probe picks, tokenizer
    settings, notes = engine.prepare("Photosynthesis is", 0.8, 50, 64)   # checked, clamped, each change explained
    for token_id, piece, routing, text in engine.tokens(settings["ids"], settings): ...

`Engine(model_dir)` loads weights and tokenizer in the dtype a start-up GEMM probe picks (`probe_dtype`), checks
visitors' input (`prepare`, `check_settings`, `chat_prompt`), admits at most N streams at once (`Admission`) and
streams tokens with their routing and the text so far (`Engine.tokens`, `TextAssembler`). Any load failure becomes
`Engine.error`, a message for the page, never a traceback.

Running streams are decoded together (`Batcher`: continuous batching, one decode-loop thread stepping every stream
in one forward, generate.BatchDecoder); `Engine(batching=False)` gives each stream its own decode loop instead.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import statistics
import threading
import time
from collections import deque

import torch

from generate import BatchDecoder, DecodeHead, Decoder, compile_step, has_cxx_compiler
from model import LatentCache, SmolLM2DeepSeek

ROOT_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL_DIR = os.path.join(ROOT_DIR, "checkpoints", "final")
CHAT_PREAMBLE = "A conversation between a curious User and a helpful Assistant who answers in plain sentences."

SERVE_MAX_NEW_TOKENS = 512  # the app's cap; also at most half the context, so a prompt keeps the other half
MAX_PROMPT_CHARS = 50_000  # longer prompts keep their end before tokenizing (the context holds far less anyway)
MAX_TEMPERATURE = 2.0
# bf16 must beat fp32 by this factor in the start-up probe to be chosen (bf16 also costs some accuracy)
BF16_MIN_SPEEDUP = 1.2
# Streams decoded together in one batch (Batcher), also the streams admitted at once. Chosen by measurement
# (bench/bench_app_load.py --batch 8 16, results/app_load.json): at 16 visitors a bound of 16 gave 52.8 tok/s in
# total and a p95 first token of 3.4 s, a bound of 8 31.3 tok/s and 14.8 s (the other 8 waited in line).
MAX_BATCH = 16
# Compiled one-stream steps (Engine(compile_decoding=True)): timed against eager steps after the warm-up, each side
# this many steps (median), and used only when faster
COMPILE_CHECK_STEPS = 8
WARM_UP_NICE = 10  # the compile warm-up thread's priority: below visitors' decoding (measured: 50 s warm, ~4 min cold)


def resolve_model_dir(model_dir: str | None = None) -> tuple[str, str | None]:
    """The checkpoint directory to load and a note about how it was found (None when nothing to say).

    An explicit model_dir wins; otherwise MODEL_REPO is downloaded from the Hub if set, at MODEL_REVISION (a commit
    hash, tag or branch: pin one so a push to the model repo cannot change a running Space under its visitors; any
    failure, offline included, falls back to the local directory), else MODEL_DIR, else checkpoints/final here.
    """
    if model_dir:
        return model_dir, None
    local = os.environ.get("MODEL_DIR") or DEFAULT_MODEL_DIR
    repo = os.environ.get("MODEL_REPO")
    if not repo:
        return local, None
    revision = os.environ.get("MODEL_REVISION") or None
    try:
        from huggingface_hub import snapshot_download

        where = f"`{repo}`" + (f" at revision `{revision}`" if revision else " (latest revision: set MODEL_REVISION "
                                                                             "to pin one)")
        return snapshot_download(repo_id=repo, revision=revision), f"Downloaded from the Hub repo {where}."
    except Exception as err:  # offline, missing repo, no huggingface_hub...: serve the local copy instead
        return local, f"Could not download `{repo}` from the Hub ({type(err).__name__}); using `{display_path(local)}`."


def display_path(path: str) -> str:
    """A checkpoint path fit to show visitors: relative to the app when inside it, else its last two parts (the
    server's absolute layout is nobody's business)."""
    full = os.path.abspath(path)
    if full.startswith(ROOT_DIR + os.sep):
        return os.path.relpath(full, ROOT_DIR)
    return os.path.join(*full.split(os.sep)[-2:]) if full.count(os.sep) >= 2 else os.path.basename(full)


def gemm_seconds(dtype: torch.dtype, rows: int, hidden: int, cols: int, repeats: int = 5) -> float:
    """Fastest of `repeats` [rows, hidden] @ [hidden, cols] matmuls in `dtype`, on one thread (the fastest run and one
    thread: other processes on a shared machine mostly add noise to both dtypes alike)."""
    a = torch.randn(rows, hidden).to(dtype)
    b = torch.randn(hidden, cols).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)  # warm-up (first-call dispatch, page faults)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


def probe_dtype(hidden: int, vocab: int) -> dict:
    """Pick the weights' dtype for this CPU by measurement (~10 ms): a bf16 and an fp32 matmul of the model's width
    against a 4096-column slice of the lm_head, for a 16-token prefill and for one decoded token, costed as the app's
    work looks: one prefill + 16 decode steps. CPUs differ: without native bf16 a GEMM can run at ~1.5 GFLOP/s
    against ~40 in fp32; with AVX-512 BF16 it is ~2.3x faster than fp32, yet its one-row GEMVs may still lose.
    bf16 is chosen only when it wins by BF16_MIN_SPEEDUP."""
    cols = min(vocab, 4096)
    timing = {}
    for dtype in (torch.float32, torch.bfloat16):
        try:
            timing[dtype] = (gemm_seconds(dtype, 16, hidden, cols), gemm_seconds(dtype, 1, hidden, cols))
        except RuntimeError:  # a build without bf16 matmul on this CPU
            timing[dtype] = (float("inf"), float("inf"))
    cost = {dtype: prefill + 16 * step for dtype, (prefill, step) in timing.items()}
    chosen = torch.bfloat16 if cost[torch.bfloat16] * BF16_MIN_SPEEDUP < cost[torch.float32] else torch.float32

    def gflops(seconds, rows):
        return 2 * rows * hidden * cols / seconds / 1e9 if 0 < seconds < float("inf") else 0.0

    return {"dtype": chosen, "shape": f"[16 or 1, {hidden}] @ [{hidden}, {cols}]",
            "fp32_gflops": gflops(timing[torch.float32][0], 16), "bf16_gflops": gflops(timing[torch.bfloat16][0], 16),
            "fp32_gemv_gflops": gflops(timing[torch.float32][1], 1),
            "bf16_gemv_gflops": gflops(timing[torch.bfloat16][1], 1),
            "speedup_bf16": cost[torch.float32] / cost[torch.bfloat16] if cost[torch.bfloat16] > 0 else 0.0}


def probe_summary(p: dict) -> str:
    return (f"GEMM {p['shape']}: fp32 {p['fp32_gflops']:.1f} / {p['fp32_gemv_gflops']:.1f} GFLOP/s (16 rows / 1 row), "
            f"bf16 {p['bf16_gflops']:.1f} / {p['bf16_gemv_gflops']:.1f}; bf16 {p['speedup_bf16']:.2f}x on prefill + "
            "16 decode steps")


def weights_sha256(model_dir: str) -> str:
    """SHA-256 over the checkpoint's weight files (sorted by name): what a report computed from it is tied to."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def clean_text(text: str) -> tuple[str, int]:
    """Lone UTF-16 surrogates (a browser can send "\\ud800") cannot be encoded, and the tokenizer rejects them with
    an internal message: each becomes U+FFFD. Returns (text, how many were replaced); valid pairs are joined."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return fixed, fixed.count("\ufffd") - text.count("\ufffd")


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


class Ticket:
    """One visitor's stream through Admission: its token budget (max new tokens), and once admitted when it started
    and how many tokens it has made (what the wait estimates are measured from)."""

    __slots__ = ("budget", "started", "tokens")

    def __init__(self, budget: int):
        self.budget, self.started, self.tokens = max(1, int(budget)), None, 0


class Admission:
    """At most `workers` streams run at once; up to `max_waiting` more wait in line (first come, first served), each
    told its place and an estimate; beyond that a request is turned away at once with a 'busy' message.

    Estimates come from the measured time per token of the streams running now (the last finished streams' when none
    has made a token yet): each running stream frees its slot after its remaining budget, then each ticket ahead in
    line takes the first free slot for its own budget. A stream that ends early (end of text, Stop) only makes the
    wait shorter, and a ticket's estimate falls as the streams ahead of it make tokens at a steady rate."""

    def __init__(self, workers: int, max_waiting: int, clock=time.monotonic):
        self.workers, self.max_waiting = workers, max_waiting
        self.clock = clock
        self.turned_away = 0
        self._running: list[Ticket] = []
        self._line: list[Ticket] = []
        self._lock = threading.Lock()
        self._per_token: deque[float] = deque(maxlen=16)  # seconds per token of recently finished streams

    def join(self, budget: int = 64) -> Ticket | None:
        """A ticket for a stream of up to `budget` tokens, already admitted when a slot is free (poll gives 0), or
        waiting in line; None when the line is full (busy)."""
        with self._lock:
            ticket = Ticket(budget)
            if len(self._running) < self.workers and not self._line:
                self._start(ticket)
                return ticket
            if len(self._line) >= self.max_waiting:
                self.turned_away += 1
                return None
            self._line.append(ticket)
            return ticket

    def _start(self, ticket: Ticket) -> None:
        ticket.started = self.clock()
        self._running.append(ticket)

    def poll(self, ticket: Ticket) -> int:
        """0 once admitted (a running slot is then held), else the ticket's 1-based place in line."""
        with self._lock:
            if ticket.started is not None:
                return 0
            if self._line and self._line[0] is ticket and len(self._running) < self.workers:
                self._line.pop(0)
                self._start(ticket)
                return 0
            return self._line.index(ticket) + 1

    def progress(self, ticket: Ticket, tokens: int) -> None:
        """A running stream has made `tokens` tokens so far."""
        ticket.tokens = tokens

    def cancel(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._line:
                self._line.remove(ticket)

    def leave(self, ticket: Ticket) -> None:
        """A running stream ended: its slot is free, and its time per token is remembered."""
        with self._lock:
            if ticket in self._running:
                self._running.remove(ticket)
                if ticket.tokens > 0:
                    self._per_token.append((self.clock() - ticket.started) / ticket.tokens)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._line)

    def seconds_per_token(self) -> float | None:
        """The measured time per token: of the running streams that have made tokens, else of the last finished."""
        now = self.clock()
        rates = [(now - t.started) / t.tokens for t in self._running if t.tokens > 0]
        if rates:
            return statistics.median(rates)
        return statistics.median(self._per_token) if self._per_token else None

    def estimate(self, ticket_or_place) -> float | None:
        """Seconds until a waiting ticket (or the ticket at a 1-based place in line) starts; None before any token
        has been measured."""
        with self._lock:
            per_token = self.seconds_per_token()
            if per_token is None:
                return None
            if isinstance(ticket_or_place, Ticket):
                if ticket_or_place not in self._line:
                    return 0.0
                place = self._line.index(ticket_or_place) + 1
            else:
                place = int(ticket_or_place)
            free = [max(0, t.budget - t.tokens) * per_token for t in self._running]
            free += [0.0] * (self.workers - len(free))  # idle slots
            free.sort()
            for ahead in self._line[: place - 1]:
                start = free.pop(0)
                free.append(start + ahead.budget * per_token)
                free.sort()
            return free[0]


class _Request:
    """One stream in the Batcher: its prompt and settings, where its tokens go (a queue the visitor's thread reads:
    GeneratedToken, an exception, or _END) and whether its reader has gone (cancelled)."""

    def __init__(self, ids, settings: dict):
        self.ids, self.settings = ids, settings
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False


_END = object()


class Batcher:
    """Continuous batching: one decode-loop thread steps every running stream in one forward (a step costs about
    what one stream's does on a memory-bound CPU). A new stream is prefilled alone into a free row and joins at the
    next step; a finished or cancelled one leaves without stalling the others; beyond max_batch streams a new one
    waits for a free row (first come, first served). Each stream keeps its own temperature, top-k, budget, stop ids
    and generator (settings["seed"]). A failing prefill ends only its stream, a failing step only the streams in it.
    The thread and its BatchDecoder (and cache) exist only while there are streams; the laid-out lm_head
    (generate.DecodeHead, `head`: the Engine's, else one of its own) is kept, so a visitor arriving at an idle
    Space does not wait for it."""

    def __init__(self, model, max_batch: int = MAX_BATCH, head: DecodeHead | None = None):
        self.model, self.max_batch = model, max_batch
        self.head = head if head is not None else DecodeHead(model.lm_head.weight)
        self.compiled_step = None  # set by Engine's warm-up once a compiled one-stream step has proved faster
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # a hosting thread (serve_forever) waits here for streams
        self._hosted = False
        self._joining: deque[_Request] = deque()
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched forwards so far (tests, the bench)
        self.compiled_steps = 0  # of which through the compiled one-stream step
        self.running = 0  # streams in the batch after the last step

    def stream(self, ids, settings: dict):
        """The stream's GeneratedTokens (with routing) as they come; closing the iterator cancels the stream."""
        request = _Request(ids, settings)
        with self._lock:
            self._joining.append(request)
            if self._hosted:
                self._wake.notify()
            elif self._thread is None:
                self._start_loop_thread()
        try:
            while (item := request.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True  # the loop gives its row back before its next step

    def serve_forever(self, until=None) -> None:
        """Run the decode loop in the calling thread (`python app.py` gives it the main thread, idle once the server
        is up) instead of a thread of its own: measured on the shipped model through the page, 4 and 8 visitors got
        ~10-25% more tokens/s with the loop in the main thread (MKL's small-batch GEMMs under OpenMP ran slower in
        a second thread). Returns once `until()` is true (checked every 0.1 s; None: never) and no stream runs;
        streams that come later get a loop thread again."""
        with self._lock:
            self._hosted = True
        try:
            while until is None or not until():
                with self._wake:
                    if not self._joining or self._thread is not None:
                        self._wake.wait(timeout=None if until is None else 0.1)
                        continue
                    self._thread = threading.current_thread()
                try:
                    self._loop()
                except Exception:  # its streams were told (_loop's handler); the next ones get a fresh loop
                    pass
        finally:
            with self._lock:
                self._hosted = False
                if self._joining and self._thread is None:
                    self._start_loop_thread()

    def _start_loop_thread(self) -> None:
        """(with the lock held) The decode loop in a thread of its own, until no stream is left."""
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def _loop(self):
        decoder = None
        try:
            decoder = BatchDecoder(self.model, self.max_batch, head=self.head)
            while True:
                for stream in [s for s in decoder.streams if s.owner.cancelled]:
                    decoder.leave(stream)
                with self._lock:
                    joins = []
                    while self._joining and len(decoder.streams) + len(joins) < self.max_batch:
                        joins.append(self._joining.popleft())
                    if not joins and not decoder.streams:
                        self._thread = None  # idle: the next stream starts a fresh loop
                        return
                for request in joins:
                    self._join(decoder, request)
                decoder.compiled_step = self.compiled_step  # from the next step on, once the warm-up is done
                if decoder.streams:
                    self._step(decoder)
        except BaseException as err:  # never leave a reader waiting on a dead loop
            with self._lock:
                self._thread = None
                pending = list(self._joining)
                self._joining.clear()
            for request in pending + [s.owner for s in (decoder.streams if decoder else [])]:
                request.out.put(err)
            raise

    def _join(self, decoder: BatchDecoder, request: _Request) -> None:
        if request.cancelled:
            return
        s = request.settings
        try:
            seed = s.get("seed")
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            stream, first = decoder.join(request.ids, s["max_new"], s["temperature"], s["top_k"],
                                         eos_token_id=s.get("stop", -1), return_routing=True, generator=generator,
                                         owner=request)
        except Exception as err:  # bad input or a failed prefill: this stream ends, the batch goes on
            request.out.put(err)
            return
        if first is not None:
            request.out.put(first)
        if stream.done:
            request.out.put(_END)

    def _step(self, decoder: BatchDecoder) -> None:
        try:
            before = decoder.compiled_steps
            results = decoder.step()
            self.compiled_steps += decoder.compiled_steps - before
        except Exception as err:  # the streams of this step end with the error; waiting ones start a new batch
            for stream in list(decoder.streams):
                decoder.leave(stream)
                stream.owner.out.put(err)
            self.running = 0
            return
        self.steps += 1
        self.running = len(decoder.streams)
        for stream, token in results:
            if token is not None:
                stream.owner.out.put(token)
            if stream.done:
                stream.owner.out.put(_END)


def number_arg(value, default, name, notes) -> float:
    if value is None or value == "":
        notes.append(f"⚠️ No {name} given: using {default}.")
        return float(default)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        notes.append(f"⚠️ {name.capitalize()} {str(value)[:40]!r} is not a number: using {default}.")
        return float(default)
    if not math.isfinite(number):
        notes.append(f"⚠️ {name.capitalize()} {str(value)[:40]!r} is not a finite number: using {default}.")
        return float(default)
    return number


def whole(x: float) -> int:
    """Round half up (2.5 -> 3), as a visitor reads a number; Python's round() would give 2."""
    return int(math.floor(x + 0.5))


class Engine:
    """The loaded model and tokenizer (or why they could not be loaded), input checks and the streaming
    generation with routing capture. Per-session state (Stop presses, running streams) is keyed by session id."""

    def __init__(self, model_dir: str, note: str | None = None, workers: int | None = None, max_waiting: int = 16,
                 batching: bool = True, max_batch: int = MAX_BATCH, compile_decoding: bool = False):
        """workers: streams admitted at once (default: max_batch when batching, else 2 per-stream decode loops).
        compile_decoding: compile the one-stream decode step in a background thread after loading (see
        `warm_up_compiled`); streams decode eagerly until it is ready, and after only if it proved faster."""
        self.model_dir = model_dir
        self.note = note
        self.model = None
        self.tokenizer = None
        self.error = None
        self.dtype_probe = None
        self.weights_hash = None
        if workers is None:
            workers = max_batch if batching else 2
        self.admission = Admission(workers, max_waiting)
        self.batcher = None  # set once the model is loaded (batching=True)
        self.streams_started = 0  # counted for tests and the bench
        self.head = None  # the DecodeHead every decode loop shares (set once the model is loaded)
        self.stopping: set[str] = set()  # sessions whose Stop button was pressed during their stream
        self.running: dict[str, str] = {}  # session -> the kind of its stream ("generate" / "chat")
        self.end_of_turn = None  # a chat model's end-of-turn token id (set below when its tokenizer has a template)
        self.compiled = {"state": "off"}  # the compiled one-stream step: off, compiling, on, slower or failed
        self.compiled_step = None
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                hf = json.load(f)
            self.dtype_probe = probe_dtype(int(hf.get("hidden_size", 576)), int(hf.get("vocab_size", 49152)))
        except (OSError, ValueError, TypeError):
            pass  # the load below names the problem
        dtype = self.dtype_probe["dtype"] if self.dtype_probe else torch.float32
        try:
            self.model = SmolLM2DeepSeek.from_pretrained(model_dir, dtype=dtype, device="cpu")
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            if len(self.tokenizer) > self.model.config.vocab_size:
                raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary only "
                                 f"{self.model.config.vocab_size}: they do not belong together")
            self.weights_hash = weights_sha256(model_dir)
        except Exception as err:  # any load failure becomes a message on the page, never a traceback
            self.model, self.tokenizer = None, None
            self.error = f"{type(err).__name__}: {err}".replace(os.path.abspath(model_dir), display_path(model_dir))
        if self.model is not None:
            cfg = self.model.config
            self.moe_layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
            self.max_new_limit = max(1, min(SERVE_MAX_NEW_TOKENS, cfg.max_position_embeddings // 2))
            # a chat model (its tokenizer has a chat template) gets its own turn format and ends a reply at its
            # end-of-turn token; a base model continues the plain transcript
            end = self.tokenizer.convert_tokens_to_ids("<|im_end|>") if self.tokenizer.chat_template else None
            self.end_of_turn = end if isinstance(end, int) and end != self.tokenizer.unk_token_id else None
            # the laid-out lm_head every decode loop of this engine shares (~0.1 s to make for the shipped model;
            # a served model's weights never change, so one copy serves every stream and busy spell)
            self.head = DecodeHead(self.model.lm_head.weight)
            self.batcher = Batcher(self.model, max_batch, head=self.head) if batching else None
            if compile_decoding and batching:
                if has_cxx_compiler():
                    self.compiled = {"state": "compiling"}
                    threading.Thread(target=self.warm_up_compiled, name="compile-warm-up", daemon=True).start()
                else:
                    self.compiled = {"state": "failed", "why": "no C++ compiler (g++) for torch.compile"}
        else:
            self.moe_layers, self.max_new_limit = [], SERVE_MAX_NEW_TOKENS
        if self.dtype_probe:
            p = self.dtype_probe
            print(f"[app] dtype probe: {probe_summary(p)} -> weights in {str(p['dtype']).replace('torch.', '')}",
                  flush=True)

    @property
    def ok(self) -> bool:
        return self.model is not None

    @property
    def dtype_name(self) -> str:
        return str(self.model.lm_head.weight.dtype).replace("torch.", "") if self.ok else "n/a"

    def warm_up_compiled(self) -> None:
        """Compile the one-stream decode step, then time it against the eager step on the same cache and hand it to
        the Batcher only if it is faster: a measurement, since inductor's gain differs between CPUs. Two graphs are
        compiled here, before any visitor needs them: a stream alone in a one-row cache, and one row of a cache that
        has held several (its strides differ). Outcome in `self.compiled`; a failure leaves decoding eager."""
        start = time.perf_counter()
        try:
            if threading.current_thread() is not threading.main_thread():
                # a background warm-up yields the cores to visitors' streams (Linux: a thread's own nice value,
                # inherited by the compiler processes it starts)
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_UP_NICE)
                except (AttributeError, OSError):
                    pass
            model, cfg = self.model, self.model.config
            weight = model.lm_head.weight
            step = compile_step(model)
            n = max(2, min(16, cfg.max_position_embeddings // 4))  # positions 0 and 1 would be specialised on
            eager_s, compiled_s = [], []
            with torch.inference_mode():  # as the Batcher's steps run: its inputs are inference tensors
                ids = torch.arange(1, n + 1).view(1, -1) % cfg.vocab_size
                token = ids[:, -1:]
                for rows in (1, 2):
                    cache = LatentCache(cfg, rows, 2 * n + COMPILE_CHECK_STEPS + 1, weight.device, weight.dtype)
                    row = cache.rows(0, 1)
                    model.hidden_states(ids, row, 0, attn_impl="naive", expert_impl="sorted")
                    step(token, row, n)  # compiles
                for i in range(COMPILE_CHECK_STEPS):  # the same positions on both sides, interleaved
                    t = time.perf_counter()
                    model.hidden_states(token, row, n + 1 + i, [], attn_impl="absorb", expert_impl="sorted")
                    eager_s.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    step(token, row, n + 1 + i)
                    compiled_s.append(time.perf_counter() - t)
            eager, compiled = statistics.median(eager_s), statistics.median(compiled_s)
            faster = compiled < eager
            self.compiled = {"state": "on" if faster else "slower", "warm_up_s": round(time.perf_counter() - start, 1),
                             "eager_step_ms": round(1e3 * eager, 2), "compiled_step_ms": round(1e3 * compiled, 2)}
            self.compiled_step = step  # kept either way (tests drive it); the Batcher gets it only if faster
            if faster and self.batcher is not None:
                self.batcher.compiled_step = step
        except Exception as err:  # a broken compiler or backend: decoding stays eager, the page says why
            self.compiled = {"state": "failed", "why": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"[app] compiled decoding: {self.compiled}", flush=True)

    # -- input validation ----------------------------------------------------------------------------------------
    def check_settings(self, temperature, top_k, max_new_tokens) -> tuple[dict, list[str]]:
        """Clamp and normalise the sampling settings; every change is explained in the returned notes."""
        notes = []
        vocab = self.model.config.vocab_size
        temperature = number_arg(temperature, 0.8, "temperature", notes)
        if temperature < 0:
            notes.append(f"⚠️ Temperature {temperature:g} is negative: using 0 (greedy).")
            temperature = 0.0
        elif temperature > MAX_TEMPERATURE:
            notes.append(f"⚠️ Temperature {temperature:g} is above {MAX_TEMPERATURE:g}: clamped to "
                         f"{MAX_TEMPERATURE:g}.")
            temperature = MAX_TEMPERATURE
        k = number_arg(top_k, 0, "top-k", notes)
        if k < 0:
            notes.append(f"⚠️ Top-k {k:g} is negative: treated as no top-k filter.")
            k = 0
        elif k >= vocab:
            notes.append(f"⚠️ Top-k {k:g} is not below the vocabulary size ({vocab}): treated as no top-k filter.")
            k = 0
        else:
            if k != int(k):
                notes.append(f"⚠️ Top-k {k:g} is not a whole number: rounded to {whole(k)}.")
            if whole(k) == 0:
                notes.append("ℹ️ Top-k 0: no top-k filter (sampling from the whole vocabulary).")
        if temperature == 0:
            notes.append("ℹ️ Temperature 0: greedy decoding (always the most likely token; top-k has no effect).")
        n = number_arg(max_new_tokens, 64, "max new tokens", notes)
        if n < 1:
            notes.append(f"⚠️ Max new tokens {n:g} is below 1: using 1.")
            n = 1
        elif n > self.max_new_limit:
            notes.append(f"⚠️ Max new tokens {n:g} is above this app's limit of {self.max_new_limit}: "
                         f"clamped to {self.max_new_limit}.")
            n = self.max_new_limit
        elif n != int(n):
            notes.append(f"⚠️ Max new tokens {n:g} is not a whole number: rounded to {whole(n)}.")
        return dict(temperature=temperature, top_k=whole(k), max_new=max(1, whole(n))), notes

    def encode(self, text: str, notes: list[str]) -> list[int] | None:
        """Token ids of a visitor's text (None when it cannot be tokenized; the reason goes to notes)."""
        text, replaced = clean_text(text)
        if replaced:
            notes.append(f"⚠️ The text had {replaced} invalid character{'s' if replaced > 1 else ''} (a lone UTF-16 "
                         "surrogate, which is not text): replaced with �.")
        try:
            # verbose=False: a prompt longer than the tokenizer's model_max_length is fine here (it is cut to the
            # context below), so transformers' "will result in indexing errors" warning would only mislead
            return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        except Exception as err:  # never show the tokenizer's internals
            notes.append(f"⚠️ **The text could not be tokenized** ({type(err).__name__}); try plain text.")
            return None

    def prepare(self, prompt, temperature, top_k, max_new_tokens):
        """Check and normalise a completion request. Returns (settings dict or None when nothing can run, notes)."""
        prompt = "" if prompt is None else str(prompt)
        if not prompt.strip():
            return None, ["⚠️ **Empty prompt**: type some text to continue (the model continues text; it does not "
                          "answer questions)."]
        settings, notes = self.check_settings(temperature, top_k, max_new_tokens)
        if len(prompt) > MAX_PROMPT_CHARS:
            prompt = prompt[-MAX_PROMPT_CHARS:]
        ids = self.encode(prompt, notes)
        if ids is None:
            return None, notes
        if not ids:
            return None, notes + ["⚠️ **Empty prompt**: the prompt has no tokens."]
        context = self.model.config.max_position_embeddings
        keep = context - settings["max_new"]
        if len(ids) > keep:
            notes.append(f"⚠️ **Long prompt truncated**: it has {len(ids)} tokens, but prompt + {settings['max_new']} "
                         f"new tokens must fit the {context}-token context, so only its last {keep} tokens were kept.")
            ids = ids[-keep:]
        settings["ids"] = ids
        return settings, notes

    def chat_prompt(self, history: list[dict], message: str, max_new: int, notes: list[str]) -> list[int] | None:
        """The conversation as token ids. A chat model's (end_of_turn set): its tokenizer's chat template, ending
        with the assistant's turn opened. Otherwise plain text a base model can continue:

            <CHAT_PREAMBLE>\\n\\nUser: ...\\nAssistant: ...\\nUser: <message>\\nAssistant:

        Oldest exchanges are dropped until it fits the context with room for max_new tokens (the newest message is
        cut from its start if it alone is too long)."""
        exchanges = []  # (user, assistant) pairs, oldest first
        pending = None
        for m in history:
            if m["role"] == "user":
                pending = m["content"].strip()
            elif m["role"] == "assistant" and pending is not None:
                exchanges.append((pending, m["content"].strip()))
                pending = None
        if self.end_of_turn is not None:
            def render(pairs, last: str) -> str:
                messages = [{"role": r, "content": c} for user, reply in pairs
                            for r, c in (("user", user), ("assistant", reply))]
                return self.tokenizer.apply_chat_template(messages + [{"role": "user", "content": last}],
                                                          tokenize=False, add_generation_prompt=True)
        else:
            def render(pairs, last: str) -> str:
                return CHAT_PREAMBLE + "\n" + "".join(f"\nUser: {u}\nAssistant: {a}" for u, a in pairs) + \
                    f"\nUser: {last}\nAssistant:"
        limit = self.model.config.max_position_embeddings - max_new
        message = message.strip()
        for kept in range(len(exchanges), -1, -1):  # the newest exchanges that fit
            said = []  # what encoding noted (invalid characters), once, from the prompt that is used
            ids = self.encode(render(exchanges[len(exchanges) - kept:], message), said)
            if ids is None or len(ids) <= limit:
                break
        notes += said
        if ids is None:
            return None
        if kept < len(exchanges):
            dropped = len(exchanges) - kept
            notes.append(f"ℹ️ The {dropped} oldest exchange{'s' if dropped > 1 else ''} no longer fit the "
                         f"{self.model.config.max_position_embeddings}-token context and "
                         f"{'were' if dropped > 1 else 'was'} left out of the prompt.")
        if len(ids) > limit:  # the new message alone is too long: keep its end, and the turn's frame around it
            notes.append("⚠️ **Long message truncated**: only its end fits the context.")
            frame = self.encode(render([], ""), [])
            body = self.encode(message, [])
            keep = max(0, limit - len(frame))
            cut = self.tokenizer.decode(body[len(body) - keep:]) if keep else ""
            ids = self.encode(render([], cut), [])[-limit:]
        return ids

    # -- streaming -----------------------------------------------------------------------------------------------
    def tokens(self, ids: list[int], settings: dict):
        """Stream (token id, text piece, routing, assembler) per new token; routing has one dict per MoE layer {"layer",
        "experts", "weights"}, highest weight first; the assembler holds the text so far (its .text, .final()).
        settings: max_new, temperature, top_k, optional stop (ids) and seed (this stream's own random generator).
        With batching the stream runs in the Batcher's shared decode loop; closing this iterator cancels it."""
        if self.batcher is not None:
            gen = self.batcher.stream(ids, settings)
        else:
            seed = settings.get("seed")
            gen = Decoder(self.model, head=self.head).stream(
                ids, max_new_tokens=settings["max_new"], temperature=settings["temperature"], top_k=settings["top_k"],
                return_routing=True, eos_token_id=settings.get("stop", -1),
                generator=None if seed is None else torch.Generator().manual_seed(seed))
        text = TextAssembler(self.tokenizer)
        try:
            for step in gen:
                piece = text.add(step.token_id)
                routing = []
                for layer_idx, experts, weights in step.routing or []:
                    pairs = sorted(zip(experts, weights), key=lambda p: -p[1])
                    routing.append({"layer": layer_idx, "experts": [int(e) for e, _ in pairs],
                                    "weights": [round(float(w), 4) for _, w in pairs]})
                yield step.token_id, piece, routing, text
        finally:
            gen.close()
