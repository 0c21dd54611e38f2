"""Tokenizer-agnostic scoring: byte accounting and the windows that score every token exactly once."""
import functools
import json
import lzma
import math
import os

import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from helpers import SHARED, corpus, small_args, unzero_output_projections


def real_documents(n=300):
    path = os.path.join(SHARED, "data", "proxy_docs", "docs_val.jsonl.xz")
    if os.path.exists(path):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(next(f))["text"] for _ in range(n)]
    docs = corpus()
    written_here = ["Naïve café — 東京, 1,234.5 km; emoji 🙂 and tabs\tinside.", " leading space, trailing space ",
                    "line\n\n  indented\r\nwindows line", "Ünïcödé ∑ ≤ ∞ — ¿qué? « ok »"]
    return docs[:n] + [d for d in docs if any(ord(c) > 127 for c in d)][:50] + written_here


def test_byte_luts_count_the_utf8_bytes_of_the_decoded_text(dataset):
    _, tokenizer = dataset
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    luts = tg.byte_luts(sp, "cpu")
    docs = real_documents()
    assert any(ord(c) > 127 for d in docs for c in d), "want non-ASCII text in the sample"
    for doc in docs:
        ids = sp.encode(doc)
        stream = torch.tensor([1] + ids)  # each document follows BOS in the shards
        counted = tg.target_bytes(stream[:-1], stream[1:], luts).sum().item()
        assert counted == len(sp.decode(ids).encode("utf-8")), doc[:80]


@pytest.mark.parametrize("n,seq_len,stride", [(1, 8, 0), (100, 8, 0), (100, 8, 3), (64, 16, 4), (65, 16, 4),
                                               (10, 16, 4), (1000, 128, 64), (33, 32, 32)])
def test_windows_score_every_position_once(n, seq_len, stride):
    scored = torch.zeros(n, dtype=torch.long)
    for start, first in tg.eval_windows(n, seq_len, stride):
        end = min(start + seq_len, n)
        assert start <= first < end
        scored[first:end] += 1
        if start > 0 and 0 < stride < seq_len:
            assert first - start >= seq_len - stride  # every scored token has that much context
    assert (scored == 1).all()


class Uniform(torch.nn.Module):
    blocks = [None, None]

    def forward(self, x, carry=None):
        return torch.zeros(*x.shape, 1024)


def test_evaluate_is_exact_on_a_known_model(dataset):
    """Uniform logits: loss ln(1024) per token, and bpb = tokens * log2(1024) / bytes of the whole split."""
    data, tokenizer = dataset
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    luts = tg.byte_luts(sp, "cpu")
    val = tg.load_validation_tokens(os.path.join(data, "fineweb_val_*.bin"), 1024, 256)
    n_bytes = tg.target_bytes(val[:-1], val[1:], luts).sum().item()
    # each scorer binds its own stride (a lambda in the comprehension would read the last one, 64, for both)
    scorers = {f"stride {stride}": functools.partial(tg.evaluate, Uniform(), tg.ValSplit(val, luts, 256, 7), stride)
               for stride in (0, 64)}
    scorers["stateful"] = functools.partial(tg.evaluate_stateful, Uniform(), tg.ValSplit(val, luts, 256, 5))
    for name, score in scorers.items():
        loss, bpb = score()
        assert loss == pytest.approx(math.log(1024), rel=1e-7), name  # fp32 cross-entropy
        assert bpb == pytest.approx((val.numel() - 1) * 10 / n_bytes, rel=1e-7), name


@pytest.mark.parametrize("n,seq_len,streams", [(1000, 64, 7), (1000, 64, 1), (50, 64, 4), (64, 64, 3), (10_000, 256, 40)])
def test_stream_spans_score_every_position_once_after_full_context(n, seq_len, streams):
    spans = tg.stream_spans(n, seq_len, streams)
    assert len(spans) == streams
    assert sorted(p for _, s, e in spans for p in range(s, e)) == list(range(n))
    longest = max(e - r for r, _, e in spans)
    for r, s, e in spans:
        assert r == max(s - seq_len, 0) and (s == e or e - r == longest or e == n)


def test_stateful_scorer_equals_sliding_and_flat_when_one_window_covers_the_split(dataset):
    data, tokenizer = dataset
    luts = tg.byte_luts(spm.SentencePieceProcessor(model_file=tokenizer), "cpu")
    val = tg.load_validation_tokens(os.path.join(data, "fineweb_val_*.bin"), 1024, 512)[:301]
    torch.manual_seed(0)
    model = tg.GPT(small_args(mlp_mult=3))
    torch.nn.init.normal_(model.tok_emb.weight, std=0.5)  # logits far from uniform
    unzero_output_projections(model, std=0.05)
    split = tg.ValSplit(val, luts, seq_len=512, batch_seqs=1)
    flat, sliding = tg.evaluate(model, split), tg.evaluate(model, split, 64)
    stateful = tg.evaluate_stateful(model, split)
    assert abs(flat[0] - math.log(1024)) > 0.1
    for other in (sliding, stateful):
        assert other == pytest.approx(flat, rel=1e-6)


def test_stateful_score_does_not_depend_on_the_world_size(dataset, monkeypatch):
    """The default scorer: two ranks with 3 streams each read the same 6 streams as one process with 6, so the sums
    they all-reduce equal its sums (here each rank's sums are caught before the all-reduce and added)."""
    data, tokenizer = dataset
    luts = tg.byte_luts(spm.SentencePieceProcessor(model_file=tokenizer), "cpu")
    val = tg.load_validation_tokens(os.path.join(data, "fineweb_val_*.bin"), 1024, 64)[:1500]
    torch.manual_seed(0)
    model = tg.GPT(small_args())
    unzero_output_projections(model, std=0.05)
    caught = []
    monkeypatch.setattr(tg, "_reduce_scores", lambda sums, world: caught.append(sums) or (0.0, 0.0))
    tg.evaluate_stateful(model, tg.ValSplit(val, luts, seq_len=64, batch_seqs=6))
    for rank in (0, 1):
        tg.evaluate_stateful(model, tg.ValSplit(val, luts, seq_len=64, batch_seqs=3, rank=rank, world=2))
    one, *two = caught
    assert one[1] == val.numel() - 1 and one[1:].tolist() == (two[0] + two[1])[1:].tolist()
    assert (two[0] + two[1])[0].item() == pytest.approx(one[0].item(), rel=1e-5)
    assert two[0][1] > 0 and two[1][1] > 0


class Recorder(torch.nn.Module):
    """A model that logs each call: ("score" | "train", the window starts of its rows, read off unique tokens)."""

    def __init__(self, model, position):
        super().__init__()
        self.model, self.position, self.calls = model, position, []

    def forward(self, x, targets=None):
        starts = [self.position[t] for t in x[:, 0].tolist() if t in self.position]
        self.calls.append(("score" if targets is None else "train", starts))
        return self.model(x, targets)


def ttt_args(**kw):
    """The small model's settings with test-time training on, in chunks of two 64-token sequences."""
    return small_args(**{"mlp_mult": 3, "ttt_epochs": 2, "ttt_lr": 0.05, "ttt_chunk_tokens": 128, **kw})


def test_ttt_trains_on_each_chunk_only_after_scoring_it(dataset):
    """Unique tokens tell where each row starts: every position trained on was scored before, each position is
    scored once, the last chunk is never trained on, and the training changes the score."""
    _, tokenizer = dataset
    luts = tg.byte_luts(spm.SentencePieceProcessor(model_file=tokenizer), "cpu")
    torch.manual_seed(0)
    val = torch.randperm(1023) + 1  # 1,022 positions: 8 chunks of 128, the last one 126 long
    args = ttt_args()
    model = tg.GPT(args)
    unzero_output_projections(model, std=0.05)
    flat = tg.evaluate(model, tg.ValSplit(val, luts, seq_len=64, batch_seqs=4))
    spy = Recorder(model, {t: i for i, t in enumerate(val.tolist())})
    loss, bpb = tg.evaluate_ttt(spy, tg.ValSplit(val, luts, seq_len=64, batch_seqs=8), 0, args)
    scored, trained = set(), []
    for kind, starts in spy.calls:
        positions = {p for s in starts for p in range(s, min(s + 64, 1022))}
        if kind == "score":
            assert not positions & scored
            scored |= positions
        else:
            assert positions <= scored and len(starts) == 2  # one chunk: 2 rows of 64
            trained.append(min(starts))
    assert scored == set(range(1022))
    assert trained == [c * 128 for c in range(7) for _ in range(args.ttt_epochs)]
    assert loss != pytest.approx(flat[0], abs=1e-4) and bpb / loss == pytest.approx(flat[1] / flat[0], rel=1e-9)


@pytest.mark.parametrize("stride", [0, 16])
def test_ttt_without_learning_scores_like_the_plain_evaluation(dataset, stride):
    data, tokenizer = dataset
    luts = tg.byte_luts(spm.SentencePieceProcessor(model_file=tokenizer), "cpu")
    val = tg.load_validation_tokens(os.path.join(data, "fineweb_val_*.bin"), 1024, 64)[:1001]
    args = ttt_args(ttt_lr=0.0)
    torch.manual_seed(0)
    model = tg.GPT(args)
    unzero_output_projections(model, std=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    split = tg.ValSplit(val, luts, seq_len=64, batch_seqs=5)
    plain, ttt = tg.evaluate(model, split, stride), tg.evaluate_ttt(model, split, stride, args)
    assert ttt == pytest.approx(plain, rel=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("chunk,world", [(100, 1), (0, 1), (192, 2)])
def test_ttt_chunks_must_hold_whole_sequences_for_every_rank(chunk, world):
    with pytest.raises(ValueError, match=f"TTT_CHUNK_TOKENS={chunk} must be a positive multiple"):
        tg.ttt_chunks(1000, 64, 0, chunk, world)
