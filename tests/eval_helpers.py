"""Test helpers for the evaluation tests: a tiny Gemma (HF + gemmakit twin + tokenizer), benchmark
samples written in the upstream file layouts, and a real OpenAI-compatible HTTP server.

- `tiny_pair(dir)`: a random Gemma 2 with a 640-piece SentencePiece tokenizer (tests/spm_helpers),
  saved with `save_pretrained` (model, generation config, HF tokenizer converted from the same
  .model file) so lm-eval's HFLM can load the directory; plus the gemmakit twin and Tokenizer.
- `write_samples(data_dir)`: small Parquet files with the upstream columns and paths of
  allenai/ai2_arc, Rowan/hellaswag, allenai/winogrande, openai/gsm8k and aps/super_glue.
- `CompletionsServer`: /v1/completions over http.server in a thread, answering from a gemmakit
  model with a plain one-sequence forward (no batching, no GemmaLM code), for the HTTP adapter test.
- Shared plumbing: `hflm` / `lmeval_evaluate` (lm-eval's side of every agreement test, run the same
  way), `intra_op_threads` (the one-thread setting of the model tests), `one_line_error`, and the
  sample writers' `random_words` / `write_parquet` (also used by eval_samples_mc/_gen).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from spm_helpers import train_gemma_spm

from gemmakit.eval.tasks import EvalError
from gemmakit.tokenizer import Tokenizer

VOCAB = 640  # the SentencePiece model's size (spm_helpers default)

# ---- shared test plumbing -------------------------------------------------------------------------


def one_line_error(call: Callable[[], object], *words: str) -> str:
    """The message of the EvalError `call()` raises, asserted to be one line holding every one of `words`."""
    with pytest.raises(EvalError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


@contextlib.contextmanager
def intra_op_threads(n: int = 1) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block. The tests' models want 1: 64-wide
    matrices gain nothing from threads, and with other processes on the 2 cores the thread hand-offs
    made GemmaLM's side of the agreement run 30x slower (measured: 1.3 s with 1 thread, 40 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hflm(hf_dir: Path, **kwargs):
    """lm-eval's HFLM on a saved model as every agreement test runs it: CPU, float32, batch size 1, eager
    attention (`kwargs`: other HFLM options, e.g. max_length)."""
    from lm_eval.models.huggingface import HFLM

    kwargs.update(device="cpu", dtype="float32", batch_size=1, attn_implementation="eager")
    return HFLM(pretrained=str(hf_dir), **kwargs)


def lmeval_evaluate(hf_dir: Path, yaml_dir: Path, tasks: list[str]) -> dict:
    """lm-eval's simple_evaluate of `tasks` (YAMLs in yaml_dir; none of its own) on `hflm(hf_dir)`, with
    per-sample logs."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=hflm(hf_dir),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(yaml_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=1,  # > 0 so mean metrics get their closed-form stderr (no bootstrap for means)
    )


# ---- the model ----------------------------------------------------------------------------------


def tiny_pair(out_dir: Path, seed: int = 0, std: float = 0.3, embed_std: float = 0.05):
    """(HF model dir, gemmakit Gemma, Tokenizer) for one random tiny Gemma 2.

    A small (tied) embedding next to larger layer weights keeps the random model from copying its
    input (std 0.15 everywhere repeats one token forever: "::::::::") and keeps log-probs moderate
    (about -6.5 per token), so float32 sums of a continuation stay far from the 1e-5 tolerance.
    """
    import transformers
    from conftest import twin_of
    from tokenizers import AddedToken

    spm_path = train_gemma_spm(out_dir / "spm", "gemma2")
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, query_pre_attn_scalar=16,
        sliding_window=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (embed_std if "embed_tokens" in name else std))
    # Gemma 2's published generation config stops on <eos> and <end_of_turn>, as GemmaLM does
    model.generation_config.eos_token_id = [1, 107]
    hf_dir = out_dir / "hf"
    model.save_pretrained(hf_dir)
    hf_tok = transformers.GemmaTokenizer.from_pretrained(str(spm_path.parent), add_bos_token=True)
    tok = Tokenizer.load(spm_path)
    # Reserved pieces (<mask>, <unusedN>, turn markers) and <unk> carry no text: mark them special so
    # HF's skip_special_tokens drops them, as GemmaLM does (the converter marks only ids 0..4).
    silent = sorted(set(tok.reserved_ids) | {tok.unk_id})
    hf_tok.backend_tokenizer.add_special_tokens(
        [AddedToken(tok.id_to_piece(i), special=True, normalized=False) for i in silent]
    )
    hf_tok.save_pretrained(hf_dir)
    return hf_dir, twin_of(model), tok


# ---- near-ties ----------------------------------------------------------------------------------
# GemmaLM (batched, padded) and lm-eval's HFLM (one row at a time) compute the same float32 logits up to
# summation order: bit-identical on some CPUs, a few ulps of |logit| <= 30 apart on others. A greedy
# token, an is_greedy flag or an argmax over choices can differ between them only where two candidates
# are closer than that, so the agreement tests compare those only where the gap exceeds TIE_GAP (about
# 400 ulps of the tiny model's largest logits, ~2.2); the smallest gap met on the tests' data is 2e-4.
TIE_GAP = 1e-4


def continuation_gaps(
    model, tok: Tokenizer, context: str, continuation: str, max_length: int | None = None
) -> list[float]:
    """Per continuation token of a loglikelihood request: its logit minus the best other token's
    (positive: the greedy pick), by one unpadded forward of `model` on the ids GemmaLM scores."""
    from gemmakit.eval.lm import encode_pair

    ctx, cont = encode_pair(tok, context, continuation)
    inputs = (ctx + cont)[-((max_length or model.config.max_seq_len) + 1) :][:-1]
    with torch.inference_mode():
        logits = model(torch.tensor([inputs]))[0, -len(cont) :]
    ids = torch.tensor(cont)[:, None]
    return (logits.gather(-1, ids)[:, 0] - logits.scatter(-1, ids, float("-inf")).amax(-1)).tolist()


def ll_tolerance(ll: float) -> float:
    """How far the two sides' log-likelihoods may lie apart: 1e-5, or 1e-6 of |ll| for long continuations
    (float32 sums: one ulp of a -100 total is 7.6e-6, of a -300 one 3.1e-5)."""
    return max(1e-5, 1e-6 * abs(ll))


def is_greedy_settled(gaps: list[float]) -> bool:
    """Whether rounding cannot flip is_greedy: every token the clear top pick, or one clearly not."""
    return min(gaps) > TIE_GAP or min(gaps) < -TIE_GAP


def greedy_gap(model, tok: Tokenizer, prompt: str, max_tokens: int, max_length: int | None = None) -> float:
    """The smallest top-1 minus top-2 logit gap on gemmakit's greedy path for a generate_until prompt
    (left-truncated as GemmaLM does; max_tokens steps or up to a stop id), by one unpadded forward."""
    from gemmakit.infer import Engine

    ids = tok.encode(prompt)[-((max_length or model.config.max_seq_len) - max_tokens) :]
    new = Engine(model).generate([ids], max_tokens, stop_tokens=tok.stop_ids)[0]
    with torch.inference_mode():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1 :][:max_tokens]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def unsettled_docs(task, result, model, tok: Tokenizer, data_dir: Path) -> set[int]:
    """Indices of `result`'s documents (a run_task result with GemmaLM's default max_length) whose greedy
    text, is_greedy flags or scores a near-tie could flip: there, and only there, the agreement tests
    let gemmakit and lm-eval differ."""
    from gemmakit.eval.lm import GenerateRequest

    docs, out = task.load(data_dir, task.eval_split), set()
    for s in result.samples:
        if all(isinstance(r, GenerateRequest) for r in s.requests):
            settled = all(greedy_gap(model, tok, r.prompt, r.max_tokens) > TIE_GAP for r in s.requests)
        else:  # the log-likelihoods agree within ll_tolerance: a score surviving that shift holds
            gaps = [continuation_gaps(model, tok, r.context, r.continuation) for r in s.requests]
            tol = max(ll_tolerance(ll) for ll, _ in s.responses)
            settled = all(map(is_greedy_settled, gaps)) and scores_settled(
                task, docs[s.doc_index], s.responses, tol
            )
        if not settled:
            out.add(s.doc_index)
    return out


def scores_settled(task, doc, responses, tolerance: float) -> bool:
    """Whether a document's scores stay the same when any two of its log-likelihoods move `tolerance`
    apart (one up, one down: the worst case for an argmax over choices, raw or length-normalized)."""
    base = task.score(doc, responses)
    for i in range(len(responses)):
        for j in range(len(responses)):
            if i != j:
                moved = [(ll + tolerance * ((k == i) - (k == j)), g) for k, (ll, g) in enumerate(responses)]
                if task.score(doc, moved) != base:
                    return False
    return True


# ---- benchmark samples in the upstream layouts --------------------------------------------------

_WORDS_TEXT = (  # words of the tokenizer's training text (spm_helpers), so they tokenize compactly
    "the a of and to in is it that was for on with as he she they you we this be at by not are from or "
    "have an but what all were when there can more if no out so up said about which time user model "
    "system hello world token piece start end turn data text code print return class foo bar baz"
)
WORDS = _WORDS_TEXT.split()
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]


def random_words(rng: random.Random, lo: int, hi: int) -> str:
    """lo to hi words drawn from WORDS, space-separated."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_parquet(path: Path, rows: list[dict]) -> None:
    """`rows` as one Parquet file at `path` (parent folders made), as the upstream repositories hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _arc(rng: random.Random, i: int) -> dict:
    n = rng.choice([3, 4, 4, 5])
    labels = list("ABCDE"[:n]) if rng.random() < 0.8 else [str(k + 1) for k in range(n)]
    return {"id": f"Mercury_{i}", "question": random_words(rng, 4, 10).capitalize() + "?",
            "choices": {"text": [random_words(rng, 1, 4) for _ in range(n)], "label": labels},
            "answerKey": rng.choice(labels)}  # fmt: skip


def _hellaswag(rng: random.Random, i: int, split: str) -> dict:
    ctx_a = random_words(rng, 4, 9).capitalize() + "."
    ctx_b = random_words(rng, 0, 3) if rng.random() < 0.8 else ""
    endings = []
    for _ in range(4):  # WikiHow artefacts and double spaces exercise lm-eval's cleanup
        e, title, tail = random_words(rng, 2, 7), random_words(rng, 1, 3), random_words(rng, 1, 2)
        e = rng.choice([e, e + " [title] " + title, "[header] " + e, e + "  " + tail])
        endings.append(e + rng.choice([".", "", " ."]))
    source = f"wikihow~{i}" if rng.random() < 0.5 else f"activitynet~v_{i}"
    return {"ind": i, "activity_label": rng.choice(WORDS).capitalize(), "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": (ctx_a + " " + ctx_b).strip(), "endings": endings, "source_id": source, "split": split,
            "split_type": rng.choice(["indomain", "zeroshot"]),
            "label": str(rng.randrange(4)) if split != "test" else ""}  # fmt: skip


def _winogrande(rng: random.Random, split: str) -> dict:
    a, b = rng.sample(NAMES, 2)
    tail = rng.choice([" " + random_words(rng, 2, 6) + ".", ".", " " + random_words(rng, 1, 3) + "!"])
    sentence = f"{a} {random_words(rng, 2, 6)} {b} because _{tail}"
    return {"sentence": sentence, "option1": a, "option2": b,
            "answer": rng.choice(["1", "2"]) if split != "test" else ""}  # fmt: skip


def _gsm8k(rng: random.Random) -> dict:
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    lead, tail = random_words(rng, 2, 5), random_words(rng, 1, 3)
    steps = f"{lead} {x} + {y} = <<{x}+{y}={x + y}>>{x + y}.\n{tail} {x + y}."
    answer = rng.choice([str(x + y), f"{x + y},000", f"${x + y}"])
    return {"question": f"{random_words(rng, 3, 8).capitalize()} {x} {random_words(rng, 1, 3)} {y}?",
            "answer": f"{steps}\n#### {answer}"}  # fmt: skip


def _boolq(rng: random.Random, i: int, split: str) -> dict:
    return {"question": random_words(rng, 3, 7), "passage": random_words(rng, 10, 25).capitalize() + ".",
            "idx": i, "label": rng.randrange(2) if split != "test" else -1}  # fmt: skip


SAMPLE_SIZES = {"train": 12, "validation": 20, "test": 20}


def write_samples(data_dir: Path, seed: int = 0) -> None:
    """Write every split of the six benchmarks under data_dir/<owner>/<repo>/..., upstream paths."""
    rng = random.Random(seed)
    for split, n in SAMPLE_SIZES.items():
        name = f"{split}-00000-of-00001.parquet"
        for config in ("ARC-Easy", "ARC-Challenge"):
            write_parquet(data_dir / "allenai/ai2_arc" / config / name, [_arc(rng, i) for i in range(n)])
        write_parquet(data_dir / "Rowan/hellaswag/data" / name, [_hellaswag(rng, i, split) for i in range(n)])
        write_parquet(
            data_dir / "allenai/winogrande/winogrande_xl" / name, [_winogrande(rng, split) for _ in range(n)]
        )
        boolq = [_boolq(rng, i, split) for i in range(n)]
        if split == "train":  # an evaluated document in the few-shot pool: lm-eval's sampler drops it
            boolq[3] = _boolq(random.Random(seed), 0, "validation")
        write_parquet(data_dir / "aps/super_glue/boolq" / name, boolq)
        if split != "validation":
            write_parquet(data_dir / "openai/gsm8k/main" / name, [_gsm8k(rng) for _ in range(n)])


# ---- an OpenAI-compatible /v1/completions server --------------------------------------------------


class CompletionsServer:
    """`with CompletionsServer(model, tok, hf_dir) as url:` serves /v1/completions on 127.0.0.1 until exit.

    Prompts are text (encoded with <bos>) or token ids, one or a list. echo=True returns every prompt
    token's log-prob (None first), the top-1 alternative and character offsets, then `max_tokens`
    greedy tokens; without echo, greedy text stopped at <eos>/<end_of_turn> or a `stop` string.
    `fail_with` makes every request answer that HTTP status (error tests).
    """

    def __init__(
        self, model, tok: Tokenizer, hf_dir: Path | None = None, fail_with: int | None = None
    ) -> None:
        self.model, self.tok, self.fail_with = model, tok, fail_with
        self.requests: list[dict] = []
        self.hf_tok = None
        if hf_dir is not None:  # decode generated text with the HF tokenizer, as vLLM does
            import transformers

            self.hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))

    def __enter__(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.fail_with or self.path != "/v1/completions":
                    self.send_response(server.fail_with or 404)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "nope\\nsecond line"}}')
                    return
                data = json.dumps(server.complete(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def complete(self, body: dict) -> dict:
        prompts = body["prompt"]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        choices = []
        for index, prompt in enumerate(prompts):
            ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
            choices.append({"index": index, **self._one(ids, body)})
        return {"object": "text_completion", "model": body.get("model"), "choices": choices}

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        return F.log_softmax(self.model(torch.tensor([ids])).float()[0], dim=-1)  # (T, V)

    def _text(self, ids: list[int]) -> str:
        """Decoded text without control and reserved pieces (servers' skip_special_tokens=True)."""
        if self.hf_tok is not None:
            return self.hf_tok.decode(ids, skip_special_tokens=True)
        silent = self.tok.reserved_ids | {self.tok.unk_id}
        return self.tok.decode(t for t in ids if t not in silent)

    def _one(self, ids: list[int], body: dict) -> dict:
        new: list[int] = []
        stop_ids = set(self.tok.stop_ids)
        for _ in range(body.get("max_tokens", 16)):
            token = int(self._logprobs(ids + new)[-1].argmax())
            if token in stop_ids:
                break
            new.append(token)
            if any(s in self._text(new) for s in body.get("stop") or ()):
                break
        text = self._text(new)
        for s in body.get("stop") or ():
            text = text.split(s)[0]
        if not body.get("echo"):
            return {"text": text, "finish_reason": "stop"}
        everything = ids + new
        lp = self._logprobs(everything)
        pieces = [self.tok.decode([t]) for t in everything]
        offsets = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]
        token_lps: list[float | None] = [None]
        tops: list[dict | None] = [None]
        for k in range(1, len(everything)):
            best = int(lp[k - 1].argmax())
            token_lps.append(float(lp[k - 1, everything[k]]))
            tops.append({self.tok.id_to_piece(best): float(lp[k - 1, best])})
        logprobs = {
            "tokens": pieces,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return {"text": "".join(pieces), "logprobs": logprobs, "finish_reason": "length"}
