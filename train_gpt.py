"""Hymba for OpenAI's Parameter Golf: causal attention and a Mamba selective scan read the same input in
every block, their outputs are mixed by a learned gate and share one output projection.

    torchrun --standalone --nproc_per_node=8 train_gpt.py      # settings: environment variables below
"""
from __future__ import annotations

import collections
import copy
import glob
import hashlib
import json
import lzma
import math
import os
import random
import sys
import tempfile
import time
import uuid

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP


# --- settings


def int_list(s: str) -> list[int]:
    return [int(i) for i in s.split(",") if i]


class Hyperparameters:
    """Every setting comes from an environment variable of the upper-case name, with the default shown, read as the
    default's type."""

    def __init__(self, environ=os.environ):
        def env(name, default, cast=None):
            value, cast = environ.get(name.upper(), default), cast or type(default)
            try:
                setattr(self, name, cast(value))
            except ValueError:
                raise ValueError(f"{name.upper()}={value!r} is not a valid {cast.__name__}") from None

        env("data_path", "./data/datasets/fineweb10B_sp1024")
        env("tokenizer_path", "./data/tokenizers/fineweb_1024_bpe.model")
        env("run_id", str(uuid.uuid4()))
        env("seed", 1337)
        # model
        env("vocab_size", 1024)
        env("num_layers", 7)
        env("model_dim", 512)
        env("num_heads", 4)
        env("num_kv_heads", 2)
        env("mlp_mult", 3)
        env("logit_softcap", 30.0)
        env("rope_base", 10000.0)
        env("qk_gain_init", 1.5)
        env("tied_embed_init_std", 0.005)
        env("value_embed_dim", 128)  # a token embedding added to attention's values
        env("value_embed_layers", 2)  # ... in the last this many layers (or all)
        env("ssm_inner", self.model_dim // 2)  # the Mamba branch's width (d_inner)
        # the layers with a Mamba branch: every block by default; e.g. "0,4" or none (attention only) to ablate
        env("ssm_layers", ",".join(map(str, range(self.num_layers))), int_list)
        env("ssm_state", 4)
        # sliding-window attention: each query sees its last ATTN_WINDOW tokens (0: all before it), leaving the
        # longer range to the Mamba branch, except in the GLOBAL_LAYERS (first, middle and last by default)
        env("attn_window", 0)
        env("global_layers", f"0,{self.num_layers // 2},{self.num_layers - 1}", int_list)
        env("ssm_conv", 4)
        env("ssm_dt_rank", 32)
        env("dt_min", 1e-3)
        env("dt_max", 1e-1)
        env("scan_impl", "auto")  # auto | triton | mamba_ssm | torch
        env("conv_impl", "auto")  # auto | triton | causal_conv1d | torch
        # training
        env("train_seq_len", 2048)
        env("train_batch_tokens", 1048576)
        env("grad_accum_steps", 0)  # 0: 8 // world_size
        env("iterations", 20000)
        env("max_wallclock_seconds", 600.0)
        env("warmdown_frac", 0.35)
        env("warmup_steps", 20)
        env("train_log_every", 200)
        env("val_loss_every", 0)
        env("compile", int(torch.cuda.is_available()))
        # optimizers
        env("matrix_lr", 0.04)
        env("scalar_lr", 0.04)
        env("ssm_lr", 0.004)
        env("tied_embed_lr", 0.05)
        env("muon_momentum", 0.95)
        env("muon_momentum_warmup_start", 0.85)
        env("muon_momentum_warmup_steps", 500)
        env("muon_wd", 0.04)
        env("beta1", 0.9)
        env("beta2", 0.95)
        env("adam_eps", 1e-8)
        env("grad_clip_norm", 0.0)
        env("ema_decay", 0.997)
        # evaluation and export
        env("eval_seq_len", self.train_seq_len)
        env("eval_mode", "stateful")  # flat | sliding | stateful: how the final score is taken
        env("eval_stride", 64)  # sliding windows' stride
        env("ttt_epochs", 0)  # score-first test-time training after flat or sliding scoring; 0: none
        env("ttt_lr", 0.02)
        env("ttt_chunk_tokens", 32768)
        env("val_batch_tokens", 524288)
        env("artifact_path", "final_model.int6.ptz")
        env("gptq_calib_tokens", 524288)  # GPTQ's calibration tokens; 0: rounding
        env("mixer_bits", 6)  # attention and SSM block matrices
        env("mlp_bits", 6)

    @property
    def train_files(self):
        return os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_files(self):
        return os.path.join(self.data_path, "fineweb_val_*.bin")

    @property
    def log_path(self):
        return f"logs/{self.run_id}.txt"

    def check(self, world: int = 1, rank: int = 0):
        """Refuses, before anything runs, settings no run can finish with, naming each variable and its value;
        GRAD_ACCUM_STEPS=0 becomes 8 // world."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        for name in ("num_layers", "model_dim", "num_heads", "num_kv_heads", "train_seq_len", "train_batch_tokens",
                     "iterations", "train_log_every", "eval_seq_len"):
            need(getattr(self, name) > 0, f"{name.upper()}={getattr(self, name)} must be positive")
        if self.grad_accum_steps <= 0:
            need(8 % world == 0, f"WORLD_SIZE={world} does not divide 8; set GRAD_ACCUM_STEPS")
            self.grad_accum_steps = 8 // world
        need(self.train_batch_tokens % (world * self.grad_accum_steps * self.train_seq_len) == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must split into {world} ranks x {self.grad_accum_steps} "
             f"micro-steps of whole TRAIN_SEQ_LEN={self.train_seq_len} sequences")
        need(self.attn_window >= 0, f"ATTN_WINDOW={self.attn_window} must be 0 (full attention) or positive")
        need(self.eval_mode in ("flat", "sliding", "stateful"),
             f"EVAL_MODE={self.eval_mode}: expected flat, sliding or stateful")
        need(self.eval_mode != "sliding" or 0 < self.eval_stride < self.eval_seq_len,
             f"EVAL_STRIDE={self.eval_stride} must be between 0 and EVAL_SEQ_LEN={self.eval_seq_len} (exclusive)")
        need(self.ttt_epochs <= 0 or self.eval_mode != "stateful", f"TTT_EPOCHS={self.ttt_epochs} scores flat or "
             "sliding windows, not EVAL_MODE=stateful: set EVAL_MODE=flat or sliding, or TTT_EPOCHS=0")
        if self.ttt_epochs > 0:
            ttt_chunks(0, self.eval_seq_len, 0, self.ttt_chunk_tokens, world)  # checks the chunk size
        need(2 <= self.mixer_bits <= 8 and 2 <= self.mlp_bits <= 8,
             f"MIXER_BITS={self.mixer_bits} and MLP_BITS={self.mlp_bits} must be between 2 and 8")
        if rank == 0:  # the rank that writes the log and the artifact
            need(not os.path.exists(self.log_path), f"RUN_ID={self.run_id!r}: {self.log_path} exists and a log "
                 "holds one run; choose another RUN_ID or delete the log")
            folder = os.path.dirname(self.artifact_path) or "."
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as e:
                raise ValueError(f"ARTIFACT_PATH={self.artifact_path!r}: cannot write a file in {folder}: "
                                 f"{e.strerror}") from None


# --- data: tokenizer byte counts, shards, loader


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path} not found (TOKENIZER_PATH)")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.get_piece_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.get_piece_size()} pieces but VOCAB_SIZE={vocab_size}")
    return sp


def byte_luts(sp: spm.SentencePieceProcessor, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per token id: UTF-8 bytes of its piece without a leading '▁', whether it had one, and whether it is a
    boundary (control/unknown/unused) token after which that '▁' does not count as a space byte."""
    n = sp.get_piece_size()
    base, space, boundary = np.zeros(n, np.int64), np.zeros(n, bool), np.ones(n, bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return tuple(torch.from_numpy(a).to(device) for a in (base, space, boundary))


def target_bytes(prev: Tensor, tgt: Tensor, luts) -> Tensor:
    base, space, boundary = luts
    return base[tgt] + (space[tgt] & ~boundary[prev]).long()


SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def load_shard(path: str, vocab_size: int) -> np.ndarray:
    """Tokens of one shard as uint16, after checking the header, the size and the token range."""
    size = os.path.getsize(path)
    if size < 4 * HEADER_INTS:
        raise ValueError(f"{path}: {size} bytes, shorter than the {4 * HEADER_INTS}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    if size != 4 * HEADER_INTS + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens ({4 * HEADER_INTS + 2 * count} bytes), "
                         f"file has {size} bytes")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=4 * HEADER_INTS, shape=(count,))  # read when used
    if count and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    return tokens


def shard_paths(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern}")
    return paths


def load_validation_tokens(pattern: str, vocab_size: int, seq_len: int) -> Tensor:
    tokens = np.concatenate([load_shard(p, vocab_size) for p in shard_paths(pattern)]).astype(np.int64)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{pattern}: {len(tokens)} validation tokens, fewer than one window of "
                         f"EVAL_SEQ_LEN + 1 = {seq_len + 1}")
    return torch.from_numpy(tokens)


class TokenLoader:
    """Reads the train shards as one endless stream; each micro-batch takes world_size * (local + 1) tokens
    and every rank keeps its own slice, so any world size sees the same tokens in the same order."""

    def __init__(self, pattern: str, vocab_size: int, rank: int, world: int):
        self.paths, self.vocab_size, self.rank, self.world = shard_paths(pattern), vocab_size, rank, world
        self.file, self.pos = 0, 0
        self.tokens = load_shard(self.paths[0], vocab_size)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.file, self.pos = (self.file + 1) % len(self.paths), 0
                self.tokens = load_shard(self.paths[self.file], self.vocab_size)
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

    def next_batch(self, local_tokens: int, seq_len: int, device) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.take(span * self.world)[self.rank * span : (self.rank + 1) * span]
        chunk = torch.from_numpy(chunk.astype(np.int64)).to(device, non_blocking=True)
        return chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)


# --- selective scan and causal conv
# Mamba-1 recurrence per channel d and state n, with dt = softplus(delta + delta_bias):
#     h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,    y_t = C_t . h_t + D u_t,    out_t = y_t silu(z_t)
# Every backend takes the model's layout, u/delta/z (batch, time, d_inner) and B/C (batch, time, d_state), and
# is a custom op with registered autograd, so torch.compile traces the model in one graph around it.


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 from h_{-1} = 0, exactly (no division by decays): time is cut into
    ~sqrt(T) chunks scanned side by side, then the chunk-entry states are carried across and added back."""
    T = a.size(1)
    L = 1 << (max(T, 1).bit_length() - 1) // 2  # power of two near sqrt(T): no padding for power-of-two lengths
    nc = -(-T // L)
    if nc * L != T:
        pad = [0, 0] * (a.dim() - 2) + [0, nc * L - T]
        a, b = F.pad(a, pad), F.pad(b, pad)
    a, b = a.unflatten(1, (nc, L)), b.unflatten(1, (nc, L))
    h, decay = torch.empty_like(b), torch.empty_like(a)
    h[:, :, 0], decay[:, :, 0] = b[:, :, 0], a[:, :, 0]
    for i in range(1, L):
        torch.addcmul(b[:, :, i], a[:, :, i], h[:, :, i - 1], out=h[:, :, i])
        torch.mul(a[:, :, i], decay[:, :, i - 1], out=decay[:, :, i])
    entry = torch.zeros_like(h[:, :, 0])
    for c in range(1, nc):
        torch.addcmul(h[:, c - 1, -1], decay[:, c - 1, -1], entry[:, c - 1], out=entry[:, c])
    h.addcmul_(decay, entry.unsqueeze(2))
    return h.flatten(1, 2)[:, :T]


def _f32(x: Tensor) -> Tensor:
    """At least fp32 (fp64 stays fp64, for exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _empty(*like: Tensor) -> tuple[Tensor, ...]:
    """Contiguous outputs shaped like the given tensors: every scan op returns contiguous tensors."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like)


ScanGrads = tuple[(Tensor,) * 8]


def _fake_grads(dout, u, delta, A, B, C, D, z, delta_bias, *saved):
    return _empty(u, delta, A, B, C, D, z, delta_bias)


def _scan_terms(u, delta, A, B, C, delta_bias):
    """Shared by the torch forward and backward: dt, u, B, C, the decays a and the states h, in fp32."""
    dt = F.softplus(_f32(delta) + delta_bias)
    uf, Bf, Cf = _f32(u), _f32(B), _f32(C)
    a = torch.exp(dt.unsqueeze(-1) * A)
    return dt, uf, Bf, Cf, a, linear_scan(a, (dt * uf).unsqueeze(-1) * Bf.unsqueeze(2))


def scan_from_state(u, delta, A, B, C, D, z, delta_bias, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch scan's forward, starting from state h0 (batch, d_inner, d_state) when given: (out, final state)."""
    _, uf, _, Cf, a, h = _scan_terms(u, delta, A, B, C, delta_bias)
    if h0 is not None:
        h = h + torch.cumprod(a, dim=1) * h0.unsqueeze(1)
    y = torch.einsum("btdn,btn->btd", h, Cf) + D * uf
    return (y * F.silu(_f32(z))).to(u.dtype).contiguous(), h[:, -1]


@torch.library.custom_op("hymba::scan_fwd", mutates_args=())
def torch_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor) -> Tensor:
    return scan_from_state(u, delta, A, B, C, D, z, delta_bias)[0]


@torch_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias):
    return _empty(u)[0]


@torch.library.custom_op("hymba::scan_bwd", mutates_args=())
def torch_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor) -> ScanGrads:
    dt, uf, Bf, Cf, a, h = _scan_terms(u, delta, A, B, C, delta_bias)
    zf, do = _f32(z), _f32(dout)
    y = torch.einsum("btdn,btn->btd", h, Cf) + D * uf
    sz = torch.sigmoid(zf)
    dz = do * y * sz * (1 + zf * (1 - sz))
    dy = do * zf * sz
    # dL/dh_t = a_{t+1} dL/dh_{t+1} + dy_t C_t: the same scan run backwards in time
    g = linear_scan(a.roll(-1, 1).flip(1), (dy.unsqueeze(-1) * Cf.unsqueeze(2)).flip(1)).flip(1)
    dlog_a = g * F.pad(h[:, :-1], (0, 0, 0, 0, 1, 0)) * a
    gB = torch.einsum("btdn,btn->btd", g, Bf)
    ddt = torch.einsum("btdn,dn->btd", dlog_a, A) + gB * uf
    ddelta = ddt * torch.sigmoid(_f32(delta) + delta_bias)
    grads = ((dy * D + dt * gB).to(u.dtype), ddelta.to(delta.dtype), torch.einsum("btdn,btd->dn", dlog_a, dt),
             torch.einsum("btdn,btd->btn", g, dt * uf).to(B.dtype), torch.einsum("btdn,btd->btn", h, dy).to(C.dtype),
             (dy * uf).sum((0, 1)), dz.to(z.dtype), ddelta.sum((0, 1)))
    return tuple(t.contiguous() for t in grads)


torch_scan_bwd.register_fake(_fake_grads)


def _save_for_backward(ctx, inputs, output):
    """A scan or conv op's backward takes the op's inputs, then its extra outputs (saved states), if any."""
    ctx.save_for_backward(*inputs, *(output[1:] if isinstance(output, tuple) else ()))


torch_scan_fwd.register_autograd(lambda ctx, dout: torch_scan_bwd(dout, *ctx.saved_tensors),
                                 setup_context=_save_for_backward)


@torch.library.custom_op("hymba::mamba_scan_fwd", mutates_args=())
def mamba_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mamba-ssm's CUDA kernel, in its own (batch, channels, time) layout."""
    import selective_scan_cuda

    out, states, out_z = selective_scan_cuda.fwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, True)
    return out_z, out, states


@mamba_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias):
    b, d, t = u.shape
    return *_empty(u, u), u.new_empty(b, d, -(-t // 2048), 2 * A.size(1), dtype=torch.float32)


@torch.library.custom_op("hymba::mamba_scan_bwd", mutates_args=())
def mamba_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor, out: Tensor, states: Tensor) -> ScanGrads:
    import selective_scan_cuda

    du, ddelta, dA, dB, dC, dD, dbias, dz = selective_scan_cuda.bwd(
        u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, dout, states, out, None, True, False)
    return du, ddelta, dA, dB.squeeze(1).contiguous(), dC.squeeze(1).contiguous(), dD, dz, dbias


mamba_scan_bwd.register_fake(_fake_grads)
mamba_scan_fwd.register_autograd(lambda ctx, dout, *_: mamba_scan_bwd(dout.contiguous(), *ctx.saved_tensors),
                                 setup_context=_save_for_backward)


def mamba_scan(u, delta, A, B, C, D, z, delta_bias):
    t = lambda v: v.transpose(1, 2).contiguous()
    return mamba_scan_fwd(t(u), t(delta), A, t(B), t(C), D, t(z), delta_bias)[0].transpose(1, 2)


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SCAN_WARPS = (4, 1)  # warps per program, forward and backward; one thread per channel
SCAN_FWD_STEPS = 8  # steps the forward loads at a time
SCAN_BWD_STEP_STATES = 16  # the backward re-runs chunks of this many (steps x states) from a saved state, in registers


def scan_chunks(d_state: int) -> tuple[int, int]:
    """(steps the forward loads at a time, steps per saved state = the backward's chunk), the first a multiple of
    the second; states are padded to a power of two."""
    k = max(1, SCAN_BWD_STEP_STATES >> (d_state - 1).bit_length())
    return -(-SCAN_FWD_STEPS // k) * k, k


def _scan_launch(u: Tensor, d_state: int, warps: int) -> tuple[tuple[int, int], dict]:
    """Grid, one program per (sequence, 32 * warps channels), and constants."""
    return (u.size(0), triton.cdiv(u.size(2), 32 * warps)), dict(
        N=d_state, NP=triton.next_power_of_2(d_state), BD=32 * warps, K=scan_chunks(d_state)[1], num_warps=warps)


if triton is not None:
    # Each thread owns one channel of one sequence and walks its time steps one by one, all d_state states in
    # registers: state tiles are (state, channel) and d_inner is a run-time value, so Triton lays channels across
    # threads and states within each thread, and the scan and the sums over states need no communication. There is
    # about one warp per scheduler (batch x d_inner threads in all), so the loads' latency must hide behind each
    # thread's own arithmetic: inputs are loaded a chunk ahead, KF steps at a time in the forward. The forward saves
    # the state every K steps; the backward re-runs those K steps from it, keeping their states in registers, then
    # walks them backwards in time. Only dB and dC (sums over channels) need threads to talk: one sum across the
    # block's channels per step.

    @triton.jit
    def _program_setup(A_ptr, D_ptr, bias_ptr, DI, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr):
        """Sequence b; channels d (1, BD) and states n (NP, 1) with their masks; the (state, channel) tile's offsets
        in a (d_state, d_inner) tensor; A (given as A^T; in log2 units too), D and the dt bias of these channels."""
        b = tl.program_id(0).to(tl.int64)
        d, n = (tl.program_id(1) * BD + tl.arange(0, BD))[None, :], tl.arange(0, NP)[:, None]
        dm, nm = d < DI, n < N
        tile, tm = n * DI + d, nm & dm
        A = tl.load(A_ptr + tile, mask=tm, other=0.0)
        Dv, bias = tl.load(D_ptr + d, mask=dm, other=0.0), tl.load(bias_ptr + d, mask=dm, other=0.0)
        return b, d, n, dm, nm, tile, tm, A, A * 1.4426950408889634, Dv, bias

    @triton.jit
    def _in_time(m, cols, t, T, EVEN: tl.constexpr):
        """Mask m where time t is inside the sequence; EVEN (the length a whole number of chunks): m itself."""
        if EVEN:
            inside = m
        else:
            inside = m & (cols * 0 + t < T)
        return inside

    @triton.jit
    def _load_rows(ptr, b, c, T, sb, st, cols, m, K: tl.constexpr, EVEN: tl.constexpr):
        """The chunk's K rows (batch b, time c * K + k) of a (batch, time, columns) tensor of strides (sb, st, 1) at
        columns cols: channels (1, BD), or states (NP, 1), which every thread then holds whole. Nothing is read past
        the end."""
        rows, base = (), ptr + b * sb + cols  # 64-bit offset once; within the sequence in 32 bits
        for k in tl.static_range(K):
            rows = rows + (tl.load(base + (c * K + k) * st, mask=_in_time(m, cols, c * K + k, T, EVEN), other=0.0),)
        return rows

    @triton.jit
    def _load_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b, c, T, DI, szb, szt, d, dm, n, nm, N: tl.constexpr,
                    K: tl.constexpr, EVEN: tl.constexpr):
        """Chunk c's u, delta, B and C (contiguous) and z (strides szb, szt)."""
        return (_load_rows(u_ptr, b, c, T, T * DI, DI, d, dm, K, EVEN),
                _load_rows(delta_ptr, b, c, T, T * DI, DI, d, dm, K, EVEN),
                _load_rows(z_ptr, b, c, T, szb, szt, d, dm, K, EVEN),
                _load_rows(B_ptr, b, c, T, T * N, N, n, nm, K, EVEN),
                _load_rows(C_ptr, b, c, T, T * N, N, n, nm, K, EVEN))

    @triton.jit
    def _load_bwd_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dout_ptr, b, c, T, DI, szb, szt, d, dm, n, nm,
                        N: tl.constexpr, K: tl.constexpr, EVEN: tl.constexpr):
        """The forward's chunk c, and dL/dout's (contiguous)."""
        return _load_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b, c, T, DI, szb, szt, d, dm, n, nm, N, K, EVEN) + (
            _load_rows(dout_ptr, b, c, T, T * DI, DI, d, dm, K, EVEN),)

    @triton.jit
    def _softplus(x, m):
        """dt; 0 past the end, so that the state passes through unchanged."""
        return tl.where(m, tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x))), 0.0)

    # d_inner is not specialised on: were it known to divide by 16, Triton would vectorise the channel loads and
    # spread each channel's states over several threads.
    @triton.jit(do_not_specialize=["DI"])
    def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, ckpt_ptr,
                         T, DI, NC, szb, szt, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, K: tl.constexpr,
                         KF: tl.constexpr, EVEN: tl.constexpr):
        """Walks chunks of KF steps, saving the state every K steps (NC states, then the final one); EVEN: the
        length is a whole number of chunks."""
        b, d, n, dm, nm, tile, tm, _, A2, Dv, bias = _program_setup(A_ptr, D_ptr, bias_ptr, DI, N, NP, BD)
        h = tl.load(h0_ptr + b * N * DI + tile, mask=tm, other=0.0)
        out, ckpt = out_ptr + b * T * DI + d, ckpt_ptr + b * (NC + 1) * N * DI + tile  # 64-bit offsets once
        last = tl.cdiv(NC, KF // K) - 1
        nxt = _load_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b, 0, T, DI, szb, szt, d, dm, n, nm, N, KF, EVEN)
        for c in range(last + 1):
            us, xs, zs, Bs, Cs = nxt
            nxt = _load_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, b, tl.minimum(c + 1, last), T, DI, szb, szt, d, dm,
                              n, nm, N, KF, EVEN)
            for k in tl.static_range(KF):
                if k % K == 0:  # past the end, the state passes through unchanged: a save there is the final state
                    tl.store(ckpt + tl.minimum(c * (KF // K) + k // K, NC) * N * DI, h, mask=tm)
                t = c * KF + k
                m, u, z = _in_time(dm, d, t, T, EVEN), us[k].to(tl.float32), zs[k].to(tl.float32)
                dt = _softplus(xs[k].to(tl.float32) + bias, m)
                h = tl.exp2(dt * A2) * h + Bs[k].to(tl.float32) * (dt * u)
                y = (tl.sum(h * Cs[k].to(tl.float32), axis=0, keep_dims=True) + Dv * u) * z * tl.sigmoid(z)
                tl.store(out + t * DI, y.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(ckpt + NC * N * DI, h, mask=tm)

    @triton.jit(do_not_specialize=["DI"])
    def _scan_bwd_kernel(dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr,
                         du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, T, DI, NC, szb, szt,
                         NBLK, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, K: tl.constexpr,
                         EVEN: tl.constexpr):
        b, d, n, dm, nm, tile, tm, A, A2, Dv, bias = _program_setup(A_ptr, D_ptr, bias_ptr, DI, N, NP, BD)
        blk, rows = tl.program_id(1), b * T * DI + d  # 64-bit offsets once, then 32-bit ones within the sequence
        dz_out, du_out, ddelta_out = dz_ptr + rows, du_ptr + rows, ddelta_ptr + rows
        parts = (b * NBLK + blk) * T * NP + n  # this block's share of dB and dC, summed outside
        ckpt = ckpt_ptr + b * (NC + 1) * N * DI + tile
        after, dA = tl.zeros((NP, BD), tl.float32), tl.zeros((NP, BD), tl.float32)  # after: a_{t+1} dL/dh_{t+1}
        dD, dbias = tl.zeros((1, BD), tl.float32), tl.zeros((1, BD), tl.float32)
        nxt = _load_bwd_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dout_ptr, b, NC - 1, T, DI, szb, szt, d, dm, n, nm,
                              N, K, EVEN)
        for cc in range(NC):
            c = NC - 1 - cc
            us, xs, zs, Bs, Cs, dos = nxt
            h = tl.load(ckpt + c * N * DI, mask=tm, other=0.0)
            prev = tl.maximum(c - 1, 0)
            nxt = _load_bwd_chunk(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, dout_ptr, b, prev, T, DI, szb, szt, d, dm, n,
                                  nm, N, K, EVEN)
            before, dts, dys = (), (), ()  # per step: the state entering it, dt, dL/dy
            for k in tl.static_range(K):
                t = c * K + k
                m, u, z, dout = _in_time(dm, d, t, T, EVEN), us[k].to(tl.float32), zs[k].to(tl.float32), \
                    dos[k].to(tl.float32)
                dt, sz = _softplus(xs[k].to(tl.float32) + bias, m), tl.sigmoid(z)
                before, dts, dys = before + (h,), dts + (dt,), dys + (dout * z * sz,)
                h = tl.exp2(dt * A2) * h + Bs[k].to(tl.float32) * (dt * u)
                y = tl.sum(h * Cs[k].to(tl.float32), axis=0, keep_dims=True) + Dv * u
                dz = dout * y * sz * (1 + z * (1 - sz))
                tl.store(dz_out + t * DI, dz.to(dz_ptr.dtype.element_ty), mask=m)
                tl.store(dC_ptr + parts + t * NP, tl.sum(h * dys[k], axis=1, keep_dims=True),
                         mask=_in_time(nm, n, t, T, EVEN))
            for k in tl.static_range(K - 1, -1, -1):
                t = c * K + k
                m, u, dt, dy = _in_time(dm, d, t, T, EVEN), us[k].to(tl.float32), dts[k], dys[k]
                a = tl.exp2(dt * A2)
                g = Cs[k].to(tl.float32) * dy + after  # dL/dh_t
                dlog_a = g * a * before[k]
                gB = tl.sum(g * Bs[k].to(tl.float32), axis=0, keep_dims=True)
                ddelta = (tl.sum(dlog_a * A, axis=0, keep_dims=True) + gB * u) * tl.sigmoid(xs[k].to(tl.float32) + bias)
                ddelta = tl.where(m, ddelta, 0.0)
                tl.store(du_out + t * DI, (dy * Dv + dt * gB).to(du_ptr.dtype.element_ty), mask=m)
                tl.store(ddelta_out + t * DI, ddelta.to(ddelta_ptr.dtype.element_ty), mask=m)
                tl.store(dB_ptr + parts + t * NP, tl.sum(g * (dt * u), axis=1, keep_dims=True),
                         mask=_in_time(nm, n, t, T, EVEN))
                dA, dD, dbias, after = dA + dlog_a * dt, dD + dy * u, dbias + ddelta, a * g
        tl.store(dA_ptr + b * N * DI + tile, dA, mask=tm)
        tl.store(dD_ptr + b * DI + d, dD, mask=dm)
        tl.store(dbias_ptr + b * DI + d, dbias, mask=dm)


@torch.library.custom_op("hymba::triton_scan_fwd", mutates_args=())
def triton_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                    delta_bias: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """(out, states): the state entering each chunk, then the final state, as (batch, chunks + 1, d_state, d_inner);
    h0 is given as (batch, d_state, d_inner)."""
    grid, meta = _scan_launch(u, A.size(0), SCAN_WARPS[0])
    out, ckpt = _fake_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0)
    kf = scan_chunks(A.size(0))[0]
    _scan_fwd_kernel[grid](u, delta, A, B, C, D, z, delta_bias, h0, out, ckpt, u.size(1), u.size(2), ckpt.size(1) - 1,
                           *z.stride()[:2], KF=kf, EVEN=u.size(1) % kf == 0, **meta)
    return out, ckpt


@triton_scan_fwd.register_fake
def _fake_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0):
    nc = -(-u.size(1) // scan_chunks(A.size(0))[1])
    return _empty(u)[0], u.new_empty(u.size(0), nc + 1, A.size(0), u.size(2), dtype=torch.float32)


def _triton_scan_grads(u: Tensor, delta: Tensor, A: Tensor, z: Tensor) -> ScanGrads:
    """triton_scan_bwd's outputs, empty: for the kernel to fill, and as its fake."""
    (b, nblk), meta = _scan_launch(u, A.size(0), SCAN_WARPS[1])
    f32 = lambda *shape: u.new_empty(shape, dtype=torch.float32)
    T, n, di = u.size(1), A.size(0), u.size(2)
    return (*_empty(u, delta), f32(b, n, di), f32(b, nblk, T, meta["NP"]), f32(b, nblk, T, meta["NP"]), f32(b, di),
            _empty(z)[0], f32(b, di))


@torch.library.custom_op("hymba::triton_scan_bwd", mutates_args=())
def triton_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                    delta_bias: Tensor, ckpt: Tensor) -> ScanGrads:
    """The gradients, those of A, D and the dt bias per sequence and those of B and C per block of channels (as
    (batch, blocks, time, padded states)): _triton_scan_backward sums them, where the compiler can fuse the sums."""
    (grid, meta), T = _scan_launch(u, A.size(0), SCAN_WARPS[1]), u.size(1)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads = _triton_scan_grads(u, delta, A, z)
    _scan_bwd_kernel[grid](dout, u, delta, A, B, C, D, z, delta_bias, ckpt, du, ddelta, dz, dB, dC, dA, dD, dbias, T,
                           u.size(2), ckpt.size(1) - 1, *z.stride()[:2], grid[1],
                           EVEN=T % meta["K"] == 0, **meta)
    return grads


@triton_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, ckpt):
    return _triton_scan_grads(u, delta, A, z)


def _triton_scan_backward(ctx, dout, _):
    """Saved: the eight inputs, h0 (no gradient), the saved states."""
    u, delta, A, B, C, D, z, delta_bias, _, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = triton_scan_bwd(dout.contiguous(), u, delta, A, B, C, D, z, delta_bias,
                                                            ckpt)
    n = A.size(0)
    return (du, ddelta, dA.sum(0), dB.sum(1)[..., :n].to(B.dtype), dC.sum(1)[..., :n].to(C.dtype), dD.sum(0), dz,
            dbias.sum(0), None)


triton_scan_fwd.register_autograd(_triton_scan_backward, setup_context=_save_for_backward)


def triton_scan(u, delta, A, B, C, D, z, delta_bias, h0: Tensor | None = None):
    """out, or (out, final state) when starting from state h0 (forward only: the state gets no gradient)."""
    c = lambda v: v.contiguous()
    start = u.new_zeros(u.size(0), A.size(1), u.size(2), dtype=torch.float32) if h0 is None else c(h0.mT)
    z = z if z.stride(2) == 1 else c(z)  # read in place, a slice of in_proj's output
    out, states = triton_scan_fwd(c(u), c(delta), c(A.t()), c(B), c(C), c(D), z, c(delta_bias), start)
    return out if h0 is None else (out, states[:, -1].mT)


def causal_conv_torch(x: Tensor, weight: Tensor, bias: Tensor, tail: Tensor | None = None) -> Tensor:
    """silu(depthwise causal conv) of x (batch, time, channels) as a sum of shifted copies (fuses under compile);
    tail: the k - 1 inputs before x (zeros when not given)."""
    k, T = weight.size(1), x.size(1)
    xp = F.pad(x, (0, 0, k - 1, 0)) if tail is None else torch.cat((tail, x), dim=1)
    weight = weight.to(x.dtype)
    y = bias.to(x.dtype) + sum(xp[:, i : i + T] * weight[:, i] for i in range(k))
    return F.silu(y)


def causal_conv_cuda(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(x.transpose(1, 2), weight.to(x.dtype), bias.to(x.dtype), activation="silu").transpose(1, 2)


CONV_TILE = (32, 64, 2048)  # time steps and channels per block, time steps per program (a multiple of the block)


if triton is not None:
    # A program walks CONV_TILE[2] steps of one sequence in blocks; each shifted input a tap needs is its own load,
    # served from the cache. The backward recomputes the pre-activation at the K shifts that reach its block's
    # inputs, and writes the weight and bias gradients as per-program partial sums (deterministic, no atomics).
    @triton.jit
    def _conv_taps(x_ptr, b, t, d, dm, T, sxb, sxt, K: tl.constexpr, S: tl.constexpr):
        """x at times t - K + 1 ... t - K + S, (BT, BD) fp32 each; 0 outside the sequence."""
        taps = ()
        for s in tl.static_range(S):
            ts = t + s - (K - 1)
            taps = taps + (tl.load(x_ptr + b * sxb + ts * sxt + d, mask=dm & (ts >= 0) & (ts < T),
                                   other=0.0).to(tl.float32),)
        return taps

    @triton.jit
    def _conv_pre(taps, j: tl.constexpr, w_ptr, bias, d, dm, K: tl.constexpr):
        """The pre-activation at t + j."""
        for i in tl.static_range(K):
            bias = bias + taps[j + i] * tl.load(w_ptr + d * K + i, mask=dm, other=0.0)
        return bias

    @triton.jit
    def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, T, DI, sxb, sxt, K: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr, TP: tl.constexpr):
        b, d = tl.program_id(0).to(tl.int64), tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
        dm = d < DI
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0)
        for t0 in tl.range(tl.program_id(1) * TP, tl.minimum(T, tl.program_id(1) * TP + TP), BT):
            t = t0 + tl.arange(0, BT)[:, None]
            pre = _conv_pre(_conv_taps(x_ptr, b, t, d, dm, T, sxb, sxt, K, K), 0, w_ptr, bias, d, dm, K)
            tl.store(out_ptr + (b * T + t) * DI + d, (pre * tl.sigmoid(pre)).to(out_ptr.dtype.element_ty),
                     mask=dm & (t < T))

    @triton.jit
    def _conv_bwd_kernel(dout_ptr, x_ptr, w_ptr, bias_ptr, dx_ptr, dw_ptr, dbias_ptr, T, DI, sxb, sxt,
                         K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, TP: tl.constexpr):
        b, d = tl.program_id(0).to(tl.int64), tl.program_id(2) * BD + tl.arange(0, BD)[None, :]
        dm, part = d < DI, tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0)
        dbias, dws = tl.zeros((BT, BD), tl.float32), ()  # summed over time at the end
        for i in tl.static_range(K):
            dws = dws + (tl.zeros((BT, BD), tl.float32),)
        for t0 in tl.range(tl.program_id(1) * TP, tl.minimum(T, tl.program_id(1) * TP + TP), BT):
            t = t0 + tl.arange(0, BT)[:, None]
            taps, dx = _conv_taps(x_ptr, b, t, d, dm, T, sxb, sxt, K, 2 * K - 1), tl.zeros((BT, BD), tl.float32)
            for j in tl.static_range(K):  # dL/d(pre-activation) at t + j, which reads x[t] through tap K - 1 - j
                pre, tj = _conv_pre(taps, j, w_ptr, bias, d, dm, K), t + j
                sig = tl.sigmoid(pre)
                g = tl.load(dout_ptr + (b * T + tj) * DI + d, mask=dm & (tj < T), other=0.0).to(tl.float32)
                g = g * sig * (1 + pre * (1 - sig))
                dx += g * tl.load(w_ptr + d * K + K - 1 - j, mask=dm, other=0.0)
                if j == 0:
                    dbias, grown = dbias + g, ()
                    for i in tl.static_range(K):
                        grown = grown + (dws[i] + g * taps[i],)
                    dws = grown
            tl.store(dx_ptr + (b * T + t) * DI + d, dx.to(dx_ptr.dtype.element_ty), mask=dm & (t < T))
        tl.store(dbias_ptr + part * DI + d, tl.sum(dbias, axis=0, keep_dims=True), mask=dm)
        for i in tl.static_range(K):
            tl.store(dw_ptr + (part * DI + d) * K + i, tl.sum(dws[i], axis=0, keep_dims=True), mask=dm)


def _conv_launch(x: Tensor) -> tuple[tuple[int, int, int], tuple[int, int], dict]:
    """Grid, x's batch and time strides (any layout with contiguous channels), constants."""
    bt, bd, tp = CONV_TILE
    return ((x.size(0), triton.cdiv(x.size(1), tp), triton.cdiv(x.size(2), bd)), x.stride()[:2],
            dict(BT=bt, BD=bd, TP=tp))


@torch.library.custom_op("hymba::triton_conv_fwd", mutates_args=())
def triton_conv_fwd(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    (grid, strides, meta), out = _conv_launch(x), _empty(x)[0]
    _conv_fwd_kernel[grid](x, weight, bias, out, x.size(1), x.size(2), *strides, K=weight.size(1), **meta)
    return out


@triton_conv_fwd.register_fake
def _(x, weight, bias):
    return _empty(x)[0]


@torch.library.custom_op("hymba::triton_conv_bwd", mutates_args=())
def triton_conv_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    (grid, strides, meta), dx = _conv_launch(x), _empty(x)[0]
    dw, dbias = weight.new_empty(grid[0] * grid[1], *weight.shape), bias.new_empty(grid[0] * grid[1], *bias.shape)
    _conv_bwd_kernel[grid](dout, x, weight, bias, dx, dw, dbias, x.size(1), x.size(2), *strides, K=weight.size(1),
                           **meta)
    return dx, dw.sum(0), dbias.sum(0)


@triton_conv_bwd.register_fake
def _(dout, x, weight, bias):
    return _empty(x, weight, bias)


triton_conv_fwd.register_autograd(lambda ctx, dout: triton_conv_bwd(dout.contiguous(), *ctx.saved_tensors),
                                  setup_context=_save_for_backward)


def triton_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """silu(depthwise causal conv) of x (batch, time, channels), channels contiguous; weight and bias in fp32."""
    return triton_conv_fwd(x if x.stride(2) == 1 else x.contiguous(), weight.float().contiguous(), bias.float())


SCAN_BACKENDS = {"triton": (triton_scan, "triton"), "mamba_ssm": (mamba_scan, "selective_scan_cuda"),
                 "torch": (torch_scan_fwd, None)}
CONV_BACKENDS = {"triton": (triton_conv, "triton"), "causal_conv1d": (causal_conv_cuda, "causal_conv1d"),
                 "torch": (causal_conv_torch, None)}


def _unavailable(module: str | None, device: torch.device) -> str | None:
    """None when a backend can run here, else why not (mamba-ssm raises at import without its extension)."""
    if module is None:
        return None
    if device.type != "cuda":
        return "not a CUDA device"
    try:
        __import__(module)
        return None
    except Exception as e:  # ImportError, or OSError from a build that does not match this torch/CUDA
        return f"{type(e).__name__}: {e}"


def resolve_backends(scan_impl: str, conv_impl: str, device: torch.device):
    """(scan_fn, conv_fn, description); 'auto' takes the first backend in table order that can run here."""
    picked, notes = [], []
    for kind, want, backends in (("scan", scan_impl, SCAN_BACKENDS), ("conv", conv_impl, CONV_BACKENDS)):
        if want != "auto" and want not in backends:
            raise ValueError(f"{kind.upper()}_IMPL={want}: expected auto, {', '.join(backends)}")
        skipped = []
        for name in backends if want == "auto" else [want]:
            fn, module = backends[name]
            why = _unavailable(module, device)
            if why is None:
                break
            if want != "auto":
                raise RuntimeError(f"{kind.upper()}_IMPL={name} but it cannot run here: {why}")
            skipped.append(f"{name} unavailable: {why}")
        picked.append(fn)
        notes.append(f"{kind}:{name}" + (f" ({'; '.join(skipped)})" if skipped else ""))
    return picked[0], picked[1], " ".join(notes)


def selective_scan(scan_fn, u, delta, A, B, C, D, z, delta_bias, *state):
    cast = lambda v: v.to(u.dtype)
    return scan_fn(u, cast(delta), A.float(), cast(B), cast(C), D.float(), cast(z), delta_bias.float(), *state)


# --- model: Hymba mixer, MLP, block, GPT
# The SSM's A/dt path, conv and D skip: Adam at a low LR in training (Muon's orthogonalised, rescaled updates
# blow up the low-rank dt projection), kept at fp16 in the export.
SSM_SENSITIVE = ("A_log", "dt_proj", "dt_bias", "conv_", "D_skip")


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 master weight, used in the activations' dtype."""

    def __init__(self, fan_in: int, fan_out: int, zero_init: bool = False):
        super().__init__(fan_in, fan_out, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rotary(x: Tensor, inv_freq: Tensor, offset: int = 0) -> Tensor:
    angles = torch.outer(torch.arange(offset, offset + x.size(-2), device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


flex_attention_compiled = torch.compile(flex_attention, dynamic=False)  # eager, it would build every score


def in_band(i, j, span):
    """Whether query position i sees key position j: the last `span` positions up to its own."""
    return (j <= i) & (j > i - span)


def band_mask(queries: int, keys: int, span: int, device) -> Tensor:
    """in_band as an attention mask, the queries being the last positions of the keys'."""
    return in_band(torch.arange(keys - queries, keys, device=device)[:, None], torch.arange(keys, device=device), span)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int = 0) -> Tensor:
    """Each query of q (B, heads, T, head_dim) attends to the last `window` positions of k and v (B, kv_heads, T,
    head_dim), its own included; window 0: to all before it. A window runs FlexAttention's block-sparse kernel on
    CUDA (blocks outside the band are skipped) and the same mask through SDPA elsewhere."""
    T, gqa = q.size(-2), k.size(1) != q.size(1)
    if not 0 < window < T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q.is_cuda:
        band = create_block_mask(lambda b, h, i, j: in_band(i, j, window), None, None, T, T, device=q.device)
        return flex_attention_compiled(q, k, v, block_mask=band, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, T, window, q.device), enable_gqa=gqa)


class HymbaMixer(nn.Module):
    """Attention and a Mamba branch on the same normalised input, merged as w*attn + (1-w)*mamba with
    w = sigmoid(merge_alpha), then one shared (zero-initialised) output projection; ssm=False: attention alone;
    window: attention's span (0: all positions before)."""

    def __init__(self, args: Hyperparameters, scan_fn, conv_fn, ssm: bool, window: int = 0):
        super().__init__()
        dim, self.heads, self.kv_heads = args.model_dim, args.num_heads, args.num_kv_heads
        if dim % self.heads or self.heads % self.kv_heads:
            raise ValueError("MODEL_DIM must divide by NUM_HEADS and NUM_HEADS by NUM_KV_HEADS")
        self.head_dim, self.window = dim // self.heads, window
        self.d_inner, self.d_state, self.dt_rank = args.ssm_inner if ssm else 0, args.ssm_state, args.ssm_dt_rank
        self.scan_fn, self.conv_fn = scan_fn, conv_fn
        kv_dim = self.kv_heads * self.head_dim
        self.splits = (kv_dim, kv_dim) + ((self.d_inner, self.d_inner) if self.d_inner else ())
        self.q_proj = CastedLinear(dim, dim)
        self.in_proj = CastedLinear(dim, sum(self.splits))  # [K | V | x_ssm | z]
        self.q_gain = nn.Parameter(torch.full((self.heads,), args.qk_gain_init))
        inv_freq = args.rope_base ** (-torch.arange(0, self.head_dim, 2) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.d_inner:
            bound = args.ssm_conv**-0.5
            self.conv_weight = nn.Parameter(torch.empty(self.d_inner, args.ssm_conv).uniform_(-bound, bound))
            self.conv_bias = nn.Parameter(torch.zeros(self.d_inner))
            self.x_proj = CastedLinear(self.d_inner, self.dt_rank + 2 * self.d_state)
            self.dt_proj = CastedLinear(self.dt_rank, self.d_inner)
            nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
            # Mamba's dt init: dt log-uniform in [dt_min, dt_max], bias = softplus^-1(dt)
            lo, hi = math.log(args.dt_min), math.log(args.dt_max)
            dt = torch.exp(torch.rand(self.d_inner) * (hi - lo) + lo)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32)
            self.A_log = nn.Parameter(torch.log(A).repeat(self.d_inner, 1))
            self.D_skip = nn.Parameter(torch.ones(self.d_inner))
            self.ssm_out = CastedLinear(self.d_inner, dim)
            self.merge_alpha = nn.Parameter(torch.zeros(()))
        self.out_proj = CastedLinear(dim, dim, zero_init=True)

    def forward(self, x: Tensor, value_embed: Tensor | None = None, carry: dict | None = None) -> Tensor:
        """value_embed: added to the values (B, T, kv_dim). carry (stateful evaluation, forward only): this layer's
        state after the previous window of the same sequences ({} before the first), replaced by the state after
        this one; queries also attend to that window's keys, up to its length back, and the conv and the scan
        continue where it ended."""
        B, T, _ = x.shape
        k, v, *ssm_in = self.in_proj(x).split(self.splits, dim=-1)
        if value_embed is not None:
            v = v + value_embed
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q = norm(q) * self.q_gain.to(q.dtype)[:, None, None]
        k = norm(k.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2))
        v = v.reshape(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.kv_heads != self.heads
        if carry and "kv" in carry:
            (k_prev, v_prev), P = carry["kv"], carry["kv"][0].size(-2)
            attn = F.scaled_dot_product_attention(
                rotary(q, self.inv_freq, P), rotary(torch.cat((k_prev, k), 2), self.inv_freq),
                torch.cat((v_prev, v), 2), attn_mask=band_mask(T, P + T, min(self.window or P, P), x.device),
                enable_gqa=gqa)
        else:
            attn = causal_attention(rotary(q, self.inv_freq), rotary(k, self.inv_freq), v, self.window)
        # XSA: drop the component of each head's output along its own token's value (that token already reaches
        # the output through the residual), so that the heads spend themselves on the other tokens.
        v_self = F.normalize(v.repeat_interleave(self.heads // self.kv_heads, dim=1), dim=-1)
        attn = attn - (attn * v_self).sum(-1, keepdim=True) * v_self
        attn = attn.transpose(1, 2).reshape(B, T, -1)
        if not self.d_inner:
            if carry is not None:
                carry["kv"] = (k, v)
            return self.out_proj(attn)
        xs, z = ssm_in
        if carry is None:
            u = self.conv_fn(xs, self.conv_weight, self.conv_bias)
        else:
            tail = carry.get("conv_tail", xs.new_zeros(B, self.conv_weight.size(1) - 1, xs.size(-1)))
            u = causal_conv_torch(xs, self.conv_weight, self.conv_bias, tail)
            carry.update(kv=(k, v), conv_tail=torch.cat((tail, xs), 1)[:, T:])
        dt_low, Bm, Cm = self.x_proj(u).split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        scan_args = (u, self.dt_proj(dt_low), -torch.exp(self.A_log.float()), Bm, Cm, self.D_skip, z, self.dt_bias)
        if carry is None:
            y = selective_scan(self.scan_fn, *scan_args)
        else:
            h0 = carry.get("ssm", u.new_zeros(B, self.d_inner, self.d_state, dtype=torch.float32))
            y, carry["ssm"] = selective_scan(triton_scan if u.is_cuda and triton else scan_from_state, *scan_args, h0)
        w = torch.sigmoid(self.merge_alpha).to(attn.dtype)
        return self.out_proj(w * attn + (1 - w) * self.ssm_out(y))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), 0.5).square())


class Block(nn.Module):
    """Pre-norm residual block; layer i's normalised inputs are scaled by 1/sqrt(i + 1), so that deeper layers
    start with smaller updates to the residual stream."""

    def __init__(self, args: Hyperparameters, scan_fn, conv_fn, layer: int):
        super().__init__()
        self.mixer = HymbaMixer(args, scan_fn, conv_fn, ssm=layer in args.ssm_layers,
                                window=0 if layer in args.global_layers else args.attn_window)
        self.mlp = MLP(args.model_dim, args.mlp_mult)
        self.mixer_scale = nn.Parameter(torch.ones(args.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(args.model_dim))
        self.input_scale = (layer + 1) ** -0.5

    def forward(self, x: Tensor, value_embed: Tensor | None = None, carry: dict | None = None) -> Tensor:
        x = x + self.mixer_scale.to(x.dtype) * self.mixer(norm(x) * self.input_scale, value_embed, carry)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(norm(x) * self.input_scale)


class GPT(nn.Module):
    def __init__(self, args: Hyperparameters, scan_fn=torch_scan_fwd, conv_fn=causal_conv_torch):
        super().__init__()
        self.softcap = args.logit_softcap
        if args.ssm_inner < 1 or not all(0 <= i < args.num_layers for i in args.ssm_layers):
            raise ValueError(f"SSM_LAYERS={','.join(map(str, args.ssm_layers))} must name layers of "
                             f"0..{args.num_layers - 1} and SSM_INNER={args.ssm_inner} be positive (attention only: "
                             "SSM_LAYERS empty)")
        if not all(0 <= i < args.num_layers for i in args.global_layers):
            raise ValueError(f"GLOBAL_LAYERS={','.join(map(str, args.global_layers))} must name layers of "
                             f"0..{args.num_layers - 1}")
        self.tok_emb = nn.Embedding(args.vocab_size, args.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=args.tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(args, scan_fn, conv_fn, i) for i in range(args.num_layers))
        # Value embeddings: one table and projection (from zero) shared by the last VALUE_EMBED_LAYERS layers,
        # each with its own gain, so that those layers' values carry the token's identity at little compute.
        self.value_embed = nn.Embedding(args.vocab_size, args.value_embed_dim)
        nn.init.normal_(self.value_embed.weight, std=0.02)
        kv_dim = self.blocks[0].mixer.splits[1]
        self.value_proj = CastedLinear(args.value_embed_dim, kv_dim, zero_init=True)
        if args.value_embed_layers < 1:
            raise ValueError(f"VALUE_EMBED_LAYERS={args.value_embed_layers} must be at least 1")
        self.value_gains = nn.Parameter(torch.ones(min(args.value_embed_layers, args.num_layers)))

    def forward(self, idx: Tensor, targets: Tensor | None = None, carry: list[dict] | None = None) -> Tensor:
        """Logits (softcapped), or the mean cross-entropy when targets are given. carry: one state per block,
        for reading a stream window by window (see HymbaMixer.forward)."""
        x = norm(self.tok_emb(idx))
        ve = self.value_proj(self.value_embed(idx))
        first_ve = len(self.blocks) - len(self.value_gains)
        for i, block in enumerate(self.blocks):
            block_ve = self.value_gains[i - first_ve].to(ve.dtype) * ve if i >= first_ve else None
            x = block(x, block_ve, carry[i] if carry is not None else None)
        logits = F.linear(norm(x), self.tok_emb.weight.to(x.dtype))
        logits = self.softcap * torch.tanh(logits.float() / self.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def autocast(device: torch.device):
    """bf16 on CUDA, full precision elsewhere."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


# --- optimizers: Muon, Adam, LR schedule


def newton_schulz(g: Tensor, steps: int = 5) -> Tensor:
    """Approximate the orthogonal factor U V^T of each matrix in g (..., rows, cols) with a quintic Newton-Schulz
    iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose 2-D updates are orthogonalised; decoupled weight decay.
    Each rank orthogonalises every world_size-th matrix, those of one shape in one batch, and one all-reduce
    shares the results."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params, momentum = group["params"], group["momentum"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            chunks = flat.split([p.numel() for p in params])
            by_shape = collections.defaultdict(list)
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    by_shape[p.shape].append(i)
            for shape, idx in by_shape.items():
                grads = [params[i].grad for i in idx]
                bufs = [self.state[params[i]].setdefault("momentum_buffer", torch.zeros_like(g))
                        for i, g in zip(idx, grads)]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                update = newton_schulz(torch.stack(torch._foreach_add(grads, bufs, alpha=momentum)))
                update *= max(1.0, shape[0] / shape[1]) ** 0.5
                for i, u in zip(idx, update):
                    chunks[i].copy_(u.flatten())
            if distributed:
                dist.all_reduce(flat)
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [c.view_as(p).to(p.dtype) for c, p in zip(chunks, params)], alpha=-group["lr"])


def build_optimizers(args: Hyperparameters, model: GPT, fused: bool):
    """Muon for the projection matrices; Adam for the embeddings (token, value), for the SSM's sensitive tensors
    (at SSM_LR) and for every other parameter (gains, scales, merge_alpha)."""
    named = dict(model.named_parameters())
    ssm = [p for n, p in named.items() if any(s in n for s in SSM_SENSITIVE)]
    ssm_ids = {id(p) for p in ssm}
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and id(m.weight) not in ssm_ids]
    embeddings = [model.tok_emb.weight, model.value_embed.weight]
    seen = ssm_ids | {id(p) for p in matrices + embeddings}
    others = [p for p in named.values() if id(p) not in seen]
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused)
    optimizers = [
        torch.optim.Adam([{"params": embeddings, "lr": args.tied_embed_lr},
                          {"params": ssm, "lr": args.ssm_lr}, {"params": others, "lr": args.scalar_lr}], **adam),
        Muon(matrices, lr=args.matrix_lr, momentum=args.muon_momentum, weight_decay=args.muon_wd),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_scale(progress: float, warmdown_frac: float) -> float:
    """1 until the last warmdown_frac of the run, then a cosine down to 0."""
    start = 1.0 - warmdown_frac
    if progress <= start or warmdown_frac <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - start) / warmdown_frac)))


# --- evaluation: windows, scoring, stateful, test-time training
# The validation split as one rank of world scores it, batch_seqs windows (stateful: streams) per batch.
ValSplit = collections.namedtuple("ValSplit", "tokens luts seq_len batch_seqs rank world", defaults=(0, 1))


def eval_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of windows over n input positions: every position is scored exactly once,
    each after at least seq_len - stride positions of context (all before it in the first window)."""
    if stride <= 0 or stride >= seq_len:
        return [(s, s) for s in range(0, n, seq_len)]
    windows = [(0, 0)]
    while windows[-1][0] + seq_len < n:
        start = windows[-1][0] + stride
        windows.append((start, start + seq_len - stride))
    return windows


@torch.no_grad()
def score_rows(model, val: ValSplit, batches, **kwargs) -> Tensor:
    """(summed loss, tokens, bytes) over batches of rows (read_from, score_from, end), padded to val.batch_seqs:
    a row reads the tokens from read_from up to end and scores its targets from score_from."""
    device = val.luts[0].device
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    model.eval()
    for rows in batches:
        x = torch.zeros(val.batch_seqs, val.seq_len, dtype=torch.long)
        y, scored = torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
        for j, (lo, first, hi) in enumerate(rows):
            if hi > lo:
                x[j, : hi - lo], y[j, : hi - lo] = val.tokens[lo:hi], val.tokens[lo + 1 : hi + 1]
                scored[j, max(first - lo, 0) : hi - lo] = True
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        with autocast(device):
            logits = model(x, **kwargs)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        sums += torch.stack([nll[scored].double().sum(), scored.sum(), target_bytes(x, y, val.luts)[scored].sum()])
    model.train()
    return sums


def _reduce_scores(sums: Tensor, world: int) -> tuple[float, float]:
    if world > 1:
        dist.all_reduce(sums)
    loss, tokens, nbytes = sums.tolist()
    return loss / tokens, loss / math.log(2) / nbytes


def score_windows(model, val: ValSplit, windows) -> Tensor:
    """(summed loss, tokens, bytes) over this rank's share of the windows (eval_windows' (start, first scored))."""
    n, per_rank, b = val.tokens.numel() - 1, -(-len(windows) // val.world), val.batch_seqs
    mine = [(s, first, min(s + val.seq_len, n))
            for s, first in windows[val.rank * per_rank : (val.rank + 1) * per_rank]]
    return score_rows(model, val, (mine[i : i + b] for i in range(0, max(len(mine), 1), b)))


def evaluate(model, val: ValSplit, stride: int = 0):
    """Exact (val_loss in nats per token, val_bpb) of the split in windows (flat at stride 0) split across ranks."""
    windows = eval_windows(val.tokens.numel() - 1, val.seq_len, stride)
    return _reduce_scores(score_windows(model, val, windows), val.world)


def stream_spans(n: int, seq_len: int, streams: int) -> list[tuple[int, int, int]]:
    """(read_from, score_from, end) of `streams` contiguous streams over n positions, each position scored in
    exactly one. Each but the first reads the seq_len positions before its part as unscored context; all read
    seq_len + span positions, up to the split's end."""
    span = max(-(-(n - seq_len) // streams), 1)
    spans = [(0, 0, min(n, seq_len + span))]
    for i in range(1, streams):
        start = min(n, seq_len + i * span)
        spans.append((max(start - seq_len, 0), start, min(n, start + span)))
    return spans


def evaluate_stateful(model, val: ValSplit):
    """Exact (val_loss, val_bpb) over world * batch_seqs streams (stream_spans), each read in consecutive windows
    that carry the SSM state, the conv tail and the previous window's keys and values: every token is scored once,
    after at least seq_len tokens of attention context (but in the first window) and with its stream's whole
    history in the SSM. Eager: the scan starts from a state, which the Triton (CUDA) and torch scans can do."""
    seq_len, lanes = val.seq_len, val.batch_seqs
    spans = stream_spans(val.tokens.numel() - 1, seq_len, val.world * lanes)[val.rank * lanes : (val.rank + 1) * lanes]
    batches = ([(r + offset, first, min(r + offset + seq_len, e)) for r, first, e in spans]
               for offset in range(0, max(e - r for r, _, e in spans), seq_len))
    return _reduce_scores(score_rows(model, val, batches, carry=[{} for _ in model.blocks]), val.world)


def ttt_chunks(n: int, seq_len: int, stride: int, chunk: int, world: int) -> list[list[tuple[int, int]]]:
    """eval_windows over n positions grouped by the chunk of chunk positions that holds their first scored one."""
    if chunk <= 0 or chunk % (seq_len * world):
        raise ValueError(f"TTT_CHUNK_TOKENS={chunk} must be a positive multiple of EVAL_SEQ_LEN x WORLD_SIZE = "
                         f"{seq_len * world}")
    chunks = [[] for _ in range(-(-n // chunk))]
    for start, first in eval_windows(n, seq_len, stride):
        chunks[first // chunk].append((start, first))
    return chunks


def evaluate_ttt(model, val: ValSplit, stride: int, args: Hyperparameters):
    """Score-first test-time training (the rules allow training on validation tokens once they are scored): per
    chunk of TTT_CHUNK_TOKENS, its windows (flat, or sliding with stride) are scored with the weights trained on the
    chunks before, then its tokens train every weight for TTT_EPOCHS steps of SGD with momentum (sequences split
    across ranks), the LR falling over the chunks as a cosine. Returns the exact (val_loss, val_bpb) and leaves
    the model trained."""
    device, chunk, seq_len, world = val.luts[0].device, args.ttt_chunk_tokens, val.seq_len, val.world
    chunks = ttt_chunks(val.tokens.numel() - 1, seq_len, stride, chunk, world)
    scoring = val._replace(batch_seqs=min(val.batch_seqs, -(-max(map(len, chunks)) // world)))
    seqs = chunk // (seq_len * world)  # this rank's training sequences per chunk
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=0.9)
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    for c, windows in enumerate(chunks):
        sums += score_windows(model, scoring, windows)
        if c == len(chunks) - 1:
            break
        lo = c * chunk + val.rank * seqs * seq_len
        tokens = val.tokens[lo : lo + seqs * seq_len + 1].to(device, torch.long)
        x, y = tokens[:-1].view(seqs, seq_len), tokens[1:].view(seqs, seq_len)
        opt.param_groups[0]["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(len(chunks) - 1, 1)))
        for _ in range(args.ttt_epochs):
            with autocast(device):
                loss = model(x, y)
            loss.backward()
            if world > 1:  # one all-reduce for all gradients
                flat = torch.cat([p.grad.flatten() for p in params])
                dist.all_reduce(flat, op=dist.ReduceOp.AVG)
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return _reduce_scores(sums, world)


# --- export: quantization, GPTQ, serialization
# Large block matrices ("mixer", "mlp"): MIXER_BITS / MLP_BITS per row, each row's clip the ratio of its max with
# the least squared error, rounded by GPTQ on Hessians of training data read inside the training window (a rule of
# the challenge). fp16: the SSM's A/dt path, conv and D, the embedding tables (rounding them costs more score than
# their bytes buy) and every small tensor. An artifact over the cap is fitted by zeroing the cheapest +-1 entries
# of the block matrices.

QUANT_MIN_NUMEL = 65536
CLIP_RATIOS = (1.0, 0.98, 0.95, 0.92, 0.88, 0.84, 0.8)
SIZE_CAP_BYTES = 16_000_000
EMBED_TABLES = ("tok_emb.weight", "value_embed.weight")


def export_kind(name: str, t: Tensor) -> str:
    if (t.dim() == 2 and t.numel() >= QUANT_MIN_NUMEL and name not in EMBED_TABLES
            and not any(s in name for s in SSM_SENSITIVE)):
        return "mlp" if ".mlp." in name else "mixer"
    return "fp16"


def quantize_rows(w: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization to [-qmax, qmax] with an fp16 scale per row, clip searched per row. w: one
    matrix or a stack of them."""
    w = w.float()
    amax = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
    best_q, best_s, best_err = None, None, None
    for ratio in CLIP_RATIOS:
        s = (amax * ratio / qmax).half().float()
        q = torch.clamp(torch.round(w / s), -qmax, qmax)
        err = (q * s - w).square().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            better = err < best_err
            best_q, best_s = torch.where(better, q, best_q), torch.where(better, s, best_s)
            best_err = torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_s.squeeze(-1).half()


def gptq_quantize(w: Tensor, H: Tensor, qmax: int, block: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al., 2022) with quantize_rows' scales: columns are rounded one at a time, by decreasing
    input energy (H's diagonal), each rounding error spread over the columns not yet rounded through the inverse of
    H = sum of x x^T over the calibration inputs, so that x.w stays close. w (rows, cols) and H (cols, cols), or
    stacks of them (n, ...)."""
    _, scale = quantize_rows(w, qmax)
    # float64 copies: no TF32 in the updates, a stable Cholesky, and the caller's tensors stay untouched
    s, w, H = scale.double().unsqueeze(-1), w.to(torch.float64, copy=True), H.to(torch.float64, copy=True)
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1
    w.masked_fill_(dead.unsqueeze(-2), 0)
    diag.add_(0.01 * diag.mean(-1, keepdim=True))  # dampening, as in the paper
    perm = diag.argsort(-1, descending=True)
    w = w.gather(-1, perm.unsqueeze(-2).expand_as(w))
    H = H.gather(-1, perm.unsqueeze(-2).expand_as(H)).gather(-2, perm.unsqueeze(-1).expand_as(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.empty_like(w)
    for a in range(0, w.size(-1), block):
        b = min(a + block, w.size(-1))
        err = w.new_empty(*w.shape[:-1], b - a)
        for i in range(a, b):
            q[..., i] = torch.clamp(torch.round(w[..., i] / s[..., 0]), -qmax, qmax)
            err[..., i - a] = (w[..., i] - q[..., i] * s[..., 0]) / U[..., i, i, None]
            w[..., i:b] -= err[..., i - a, None] * U[..., None, i, i:b]
        w[..., b:] -= err @ U[..., a:b, b:]
    return torch.empty_like(q).scatter_(-1, perm.unsqueeze(-2).expand_as(q), q).to(torch.int8), scale


def _add_outer(H: Tensor, x: Tensor):
    x = x.flatten(0, -2).float()
    H.addmm_(x.T, x)


def gptq_layers(model: nn.Module) -> dict[str, CastedLinear]:
    """The linear layers whose weights are exported as block matrices, by the names of those weights."""
    return {name + ".weight": m for name, m in model.named_modules()
            if isinstance(m, CastedLinear) and export_kind(name + ".weight", m.weight) != "fp16"}


@torch.no_grad()
def collect_hessians(model: nn.Module, batches) -> dict[str, Tensor]:
    """GPTQ's H (sum of x x^T, fp32) of the input of every layer exported as a block matrix, over the batches."""
    hessians, hooks = {}, []
    for name, m in gptq_layers(model).items():
        H = hessians[name] = torch.zeros(m.in_features, m.in_features, device=m.weight.device)
        hooks.append(m.register_forward_pre_hook(lambda _, inp, H=H: _add_outer(H, inp[0])))
    for x in batches:
        model(x)
    for hook in hooks:
        hook.remove()
    return hessians


def compress(payload: bytes) -> bytes:
    return lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)


def serialize(state: dict[str, Tensor], bits: dict[str, int], max_bytes: int | None = None,
              hessians: dict[str, Tensor] | None = None) -> tuple[bytes, int]:
    """Tensors quantized to bits[export kind] (by GPTQ where hessians has the tensor's H, else by rounding) as a
    JSON index and raw little-endian bytes, compressed: (artifact, entries zeroed). Over max_bytes, block-matrix
    +-1 entries are set to 0, least added squared error first, in rounds sized by the bytes the last round saved,
    until the artifact fits or none is left."""
    qmax = {kind: 2 ** (b - 1) - 1 for kind, b in bits.items()}
    index, parts, ones = [], [], []  # ones: (added squared error, part, flat position) of each block-matrix +-1
    by_gptq, same_shape = {}, collections.defaultdict(list)  # GPTQ runs on each group of same-shape matrices at once
    for name in hessians or {}:
        same_shape[state[name].shape, export_kind(name, state[name])].append(name)
    for (_, kind), names in same_shape.items():
        q, scale = gptq_quantize(torch.stack([state[n].detach() for n in names]),
                                 torch.stack([hessians[n] for n in names]), qmax[kind])
        by_gptq.update(zip(names, zip(q, scale)))
    for name, t in state.items():
        kind = export_kind(name, t)
        if kind == "fp16":
            parts.append(t.detach().cpu().half().numpy())
        else:
            w = t.detach().reshape(t.size(0), -1).float()
            q, scale = by_gptq[name] if name in by_gptq else quantize_rows(w, qmax[kind])
            w, q, scale = w.cpu(), q.cpu(), scale.cpu()
            unit = q.abs() == 1
            cost = w.square() - (w - q * scale.float()[:, None]).square()
            ones.append((cost[unit], torch.full((int(unit.sum()),), len(parts)), unit.flatten().nonzero().squeeze(1)))
            parts += [q.numpy(), scale.numpy()]
        index.append([name, kind, list(t.shape)])
    header = json.dumps(index).encode()
    pack = lambda: compress(len(header).to_bytes(4, "little") + header + b"".join(p.tobytes() for p in parts))
    blob, zeroed = pack(), 0
    if max_bytes is None or len(blob) <= max_bytes or not ones:
        return blob, 0
    cost, part, position = (torch.cat(c) for c in zip(*ones))
    order, unpruned, saved_per_entry = cost.argsort(), len(blob), 1 / 8  # first guess: one bit per entry
    while len(blob) > max_bytes and zeroed < len(order):
        k = min(len(order), zeroed + math.ceil(1.1 * (len(blob) - max_bytes) / saved_per_entry))
        chosen = order[zeroed:k]
        for i in part[chosen].unique().tolist():
            parts[i].reshape(-1)[position[chosen[part[chosen] == i]].numpy()] = 0
        blob, zeroed = pack(), k
        saved_per_entry = max((unpruned - len(blob)) / zeroed, 1e-3)
    return blob, zeroed


def artifact_entries(payload: bytes):
    """(name, kind, shape, values as stored, per-row scales or None) of each tensor of a decompressed artifact."""
    n = int.from_bytes(payload[:4], "little")
    offset = 4 + n
    for name, kind, shape in json.loads(payload[4:offset]):
        values = np.frombuffer(payload, np.float16 if kind == "fp16" else np.int8, math.prod(shape), offset)
        scales = None if kind == "fp16" else np.frombuffer(payload, np.float16, shape[0], offset + values.nbytes)
        offset += values.nbytes + (0 if scales is None else scales.nbytes)
        yield name, kind, shape, values, scales
    if offset != len(payload):
        raise ValueError(f"artifact has {len(payload) - offset} trailing bytes")


def deserialize(blob: bytes) -> dict[str, Tensor]:
    state = {}
    for name, kind, shape, values, scales in artifact_entries(lzma.decompress(blob)):
        w = torch.from_numpy(values.astype(np.float32))
        if scales is not None:
            w = w.view(shape[0], -1) * torch.from_numpy(scales.astype(np.float32))[:, None]
        state[name] = w.view(shape)
    return state


# --- training


class Run:
    """What the stages of a run share: settings, rank, device, model (plain, compiled, DDP), optimizers, log."""

    def __init__(self, args: Hyperparameters):
        """Joins the ranks, loads the data, builds the model: all checked before the log opens."""
        rank, world, self.local_rank = (int(os.environ.get(k, d)) for k, d in
                                        (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        args.check(world, rank)
        self.args, self.rank, self.world, self.distributed = args, rank, world, "RANK" in os.environ
        self.cuda = cuda = torch.cuda.is_available()
        self.device = device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.distributed:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        self.local_tokens = args.train_batch_tokens // (world * args.grad_accum_steps)
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        luts = byte_luts(load_tokenizer(args.tokenizer_path, args.vocab_size), device)
        seq_len = args.eval_seq_len
        tokens = load_validation_tokens(args.val_files, args.vocab_size, seq_len)
        self.val = ValSplit(tokens, luts, seq_len, max(1, args.val_batch_tokens // (world * seq_len)), rank, world)
        for path in shard_paths(args.train_files)[rank::world]:  # every train shard now, not when first read
            load_shard(path, args.vocab_size)
        scan_fn, conv_fn, self.backends = resolve_backends(args.scan_impl, args.conv_impl, device)
        self.model = GPT(args, scan_fn, conv_fn).to(device)

    def log(self, msg: str):
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.args.log_path, "a") as f:
                f.write(msg + "\n")

    def fail(self, msg: str, artifact: bool = False):
        """Ends the run with the reason as the log's last line; no score, no artifact."""
        if self.rank == 0 and artifact:
            os.remove(self.args.artifact_path)
        self.log(f"ERROR: {msg}; " + ("the artifact is removed" if artifact else "no artifact written"))
        sys.exit(1)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def loader(self) -> TokenLoader:
        return TokenLoader(self.args.train_files, self.args.vocab_size, self.rank, self.world)

    def batch(self, loader: TokenLoader) -> tuple[Tensor, Tensor]:
        return loader.next_batch(self.local_tokens, self.args.train_seq_len, self.device)

    def start(self):
        """Opens the log, then compiles the model and builds the optimizers."""
        args, model, log, code = self.args, self.model, self.log, open(__file__, "rb").read()
        os.makedirs("logs", exist_ok=True)
        self.code_bytes = len(code)
        log(f"code: {os.path.basename(__file__)} {len(code)} bytes sha256:{hashlib.sha256(code).hexdigest()}")
        log(f"env: python {sys.version.split()[0]} torch {torch.__version__} device:"
            f"{torch.cuda.get_device_name(self.device) if self.cuda else 'cpu'} world_size:{self.world} "
            f"grad_accum_steps:{args.grad_accum_steps}")
        log("hyperparameters: " + json.dumps(vars(args), sort_keys=True))
        log(f"val: {len(shard_paths(args.val_files))} shards, {self.val.tokens.numel()} tokens; "
            f"train: {len(shard_paths(args.train_files))} shards ({args.train_files})")
        log(f"backends: {self.backends}")
        log(f"model: {sum(p.numel() for p in model.parameters())} parameters")
        self.compiled = torch.compile(model, dynamic=False, fullgraph=True) if args.compile else model
        self.train_model = DDP(self.compiled, device_ids=[self.local_rank] if self.cuda else None,
                               broadcast_buffers=False) if self.distributed else self.compiled
        self.optimizers = build_optimizers(args, model, fused=self.cuda)

    def train_step(self, loader: TokenLoader, step: int, scale: float) -> Tensor:
        args, accum = self.args, self.args.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.batch(loader)
            if self.distributed:
                self.train_model.require_backward_grad_sync = micro == accum - 1
            with autocast(self.device):
                loss = self.train_model(x, y)
            (loss / accum).backward()
            total += loss.detach() / accum
        frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
                if isinstance(opt, Muon):
                    group["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        return total

    def warm_up(self):
        """Compiles on real batches, then restores the weights and optimizer state: warm-up is not training."""
        steps, model, optimizers = self.args.warmup_steps, self.model, self.optimizers
        if steps <= 0:
            return
        initial = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
        loader = self.loader()
        for step in range(steps):
            self.train_step(loader, step, 1.0)
        model.load_state_dict(initial[0])
        for opt, state in zip(optimizers, initial[1]):
            opt.load_state_dict(state)
        self.log(f"warmup: {steps} steps compiled and run, then weights and optimizer state restored")

    def hessians(self, batches) -> dict[str, Tensor]:
        with autocast(self.device):
            hessians = collect_hessians(self.model, batches)
        if self.distributed:
            for H in hessians.values():
                dist.all_reduce(H)
        return hessians

    def reserve_calibration(self) -> tuple[int, float]:
        """GPTQ's calibration reads training data, allowed only inside the training window: its batches, and the
        ms to stop training early by, from one batch timed now (after a first, loading call)."""
        tokens = self.args.gptq_calib_tokens
        batches = math.ceil(tokens / (self.world * self.local_tokens)) if tokens > 0 and gptq_layers(self.model) else 0
        if not batches:
            return 0, 0.0
        probe = [self.batch(self.loader())[0]]
        self.hessians(probe)
        self.sync()
        t = time.perf_counter()
        self.hessians(probe)
        self.sync()
        ms = torch.tensor(1.25 * batches * 1000 * (time.perf_counter() - t), device=self.device, dtype=torch.float64)
        if self.distributed:  # the slowest rank's estimate, so that all ranks stop at the same step
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        self.log(f"gptq: {batches} calibration batches after training, {ms.item():.0f}ms of the training time reserved")
        return batches, ms.item()

    def train(self, reserve_ms: float) -> tuple[TokenLoader, float]:
        """Until ITERATIONS, or until one more step and the calibration would pass MAX_WALLCLOCK_SECONDS; the LR
        follows the further of the two. Leaves the EMA weights in the model, to export."""
        args, model = self.args, self.model
        cap_ms = 1000 * args.max_wallclock_seconds
        loader = self.loader()
        ema = [p.detach().float().clone() for p in model.parameters()]
        train_ms, step, stop = 0.0, 0, False
        self.sync()
        t0 = time.perf_counter()
        while not stop:
            progress = max(step / args.iterations, train_ms / cap_ms) if cap_ms > 0 else step / args.iterations
            loss = self.train_step(loader, step, lr_scale(progress, args.warmdown_frac))
            step += 1
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach().float() for p in model.parameters()], 1 - decay)
            self.sync()
            # The loss's finiteness rides on the step's one read from the device, the clock's (and its all-reduce).
            clock = torch.tensor([train_ms + 1000 * (time.perf_counter() - t0), 0], device=self.device,
                                 dtype=torch.float64)
            clock[1] = loss.isfinite().logical_not()
            if self.distributed:  # all ranks agree on the clock, hence on the LR schedule and on when to stop
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            train_ms, diverged = clock.tolist()
            if diverged:
                self.fail(f"train_loss at step {step} is not finite: training diverged, most likely from learning "
                          f"rates too high (MATRIX_LR={args.matrix_lr} SCALAR_LR={args.scalar_lr} "
                          f"TIED_EMBED_LR={args.tied_embed_lr} SSM_LR={args.ssm_lr})")
            step_avg = train_ms / step
            stop = step >= args.iterations or (cap_ms > 0 and train_ms + step_avg + reserve_ms > cap_ms)
            if step % args.train_log_every == 0 or step <= 10 or stop:
                if self.distributed:
                    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                self.log(f"step:{step}/{args.iterations} train_loss:{loss.item():.4f} train_time:{train_ms:.0f}ms "
                         f"step_avg:{step_avg:.2f}ms")
            if args.val_loss_every > 0 and step % args.val_loss_every == 0 and not stop:
                vl, vb = evaluate(self.compiled, self.val)
                self.log(f"step:{step}/{args.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} (live weights)")
            t0 = time.perf_counter()  # logging and validation are not training time
        memory = f" peak_memory:{torch.cuda.max_memory_allocated() / 2**30:.2f}GiB" if self.cuda else ""
        self.log(f"training: {step} steps in {train_ms:.0f}ms, step_avg:{train_ms / step:.2f}ms" + memory)
        with torch.no_grad():
            for p, e in zip(model.parameters(), ema):
                p.copy_(e)
        return loader, train_ms

    def calibrate(self, loader: TokenLoader, batches: int, train_ms: float) -> dict[str, Tensor] | None:
        """GPTQ's Hessians from the next training batches, timed as training."""
        if not batches:
            return None
        t = time.perf_counter()
        hessians = self.hessians(self.batch(loader)[0] for _ in range(batches))
        self.sync()
        calib_ms = 1000 * (time.perf_counter() - t)
        train_ms += calib_ms
        self.log(f"gptq: Hessians of {len(hessians)} matrices from {batches * self.world * self.local_tokens} "
                 f"training tokens in {calib_ms:.0f}ms; training + calibration {train_ms:.0f}ms")
        cap_ms = 1000 * self.args.max_wallclock_seconds
        if cap_ms > 0 and train_ms > cap_ms:
            self.log(f"WARNING: training + calibration exceeded MAX_WALLCLOCK_SECONDS by {train_ms - cap_ms:.0f}ms")
        return hessians

    def timed(self, score, what: str, artifact: bool = True, hint: str = "") -> tuple[float, float, float]:
        """(val_loss, val_bpb, seconds) of score(); a loss that is not finite ends the run."""
        t = time.perf_counter()
        vl, vb = score()
        if not math.isfinite(vl):
            self.fail(f"{what} is {vl}, not finite{hint}", artifact)
        return vl, vb, time.perf_counter() - t

    def score_pre_export(self):
        vl, vb, s = self.timed(lambda: evaluate(self.compiled, self.val), "the EMA weights' pre-export val_loss",
                               artifact=False)
        self.log(f"pre_export val_loss:{vl:.4f} val_bpb:{vb:.4f} (EMA weights, flat windows) eval_time:{s:.1f}s")

    def export_artifact(self, hessians: dict[str, Tensor] | None) -> tuple[bytes, int]:
        """Rank 0 writes the artifact; every rank scores it as read back from disk, the same bytes on all. Exit
        code 3 when code and model pass the cap; the run still scores."""
        args, code, cap, t = self.args, self.code_bytes, SIZE_CAP_BYTES, time.perf_counter()
        if self.rank == 0:
            bits = {"mixer": args.mixer_bits, "mlp": args.mlp_bits}
            blob, zeroed = serialize(self.model.state_dict(), bits, cap - code, hessians)
            if zeroed:
                self.log(f"export: {zeroed} block-matrix entries of +-1 set to 0 to fit the cap")
            with open(args.artifact_path, "wb") as f:
                f.write(blob)
        if self.distributed:
            dist.barrier()
        with open(args.artifact_path, "rb") as f:
            blob = f.read()
        digests = [hashlib.sha256(blob).hexdigest()] * self.world
        if self.distributed:
            dist.all_gather_object(digests, digests[0])
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks read different artifacts from {args.artifact_path}: {digests}")
        self.log(f"artifact sha256:{digests[0]} (the same bytes on all {self.world} ranks)")
        total = len(blob) + code
        label = "/".join(dict.fromkeys(f"int{b}" for b in (args.mixer_bits, args.mlp_bits)))  # int6, or int6/int5
        self.log(f"Serialized model {label}+lzma: {len(blob)} bytes in {time.perf_counter() - t:.1f}s")
        self.log(f"Total submission size {label}: {total} bytes (code {code} + model {len(blob)}; cap {cap})")
        if total <= cap:
            return blob, 0
        self.log(f"ERROR: submission is {total - cap} bytes over the {cap}-byte cap")
        return blob, 3

    def score(self, blob: bytes):
        """Flat windows, EVAL_MODE, then test-time training: the last is the final score."""
        args, val, compiled = self.args, self.val, self.compiled
        self.model.load_state_dict(deserialize(blob))
        strides = {"flat": 0, "sliding": args.eval_stride}
        for mode in dict.fromkeys(("flat", args.eval_mode)):
            score = (lambda: evaluate_stateful(self.model, val)) if mode == "stateful" else \
                (lambda: evaluate(compiled, val, strides[mode]))
            vl, vb, s = self.timed(score, f"the reloaded artifact's {mode} val_loss")
            self.log(f"final_roundtrip_{mode} val_loss:{vl:.8f} val_bpb:{vb:.8f} eval_time:{s:.1f}s")
        if args.ttt_epochs > 0:
            vl, vb, s = self.timed(lambda: evaluate_ttt(compiled, val, strides[args.eval_mode], args),
                                   "the val_loss after test-time training", hint=f" (TTT_LR={args.ttt_lr})")
            self.log(f"final_roundtrip_{args.eval_mode}_ttt val_loss:{vl:.8f} val_bpb:{vb:.8f} eval_time:{s:.1f}s")
        self.log(f"final_int8_zlib_roundtrip_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")

    def end(self, exit_code: int):
        if self.distributed:
            dist.destroy_process_group()
            # gloo: after DDP's all-reduces, the interpreter's teardown can abort ("terminate called without an
            # active exception") once all is written, so the process ends here.
            if not self.cuda:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(exit_code)
        if exit_code:
            sys.exit(exit_code)


def main():
    run = Run(Hyperparameters())
    run.start()
    run.warm_up()
    calib_batches, reserve_ms = run.reserve_calibration()
    loader, train_ms = run.train(reserve_ms)
    hessians = run.calibrate(loader, calib_batches, train_ms)
    run.score_pre_export()
    blob, exit_code = run.export_artifact(hessians)
    run.score(blob)
    run.end(exit_code)


if __name__ == "__main__":
    main()
