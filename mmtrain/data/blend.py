"""The blend sampler: rows drawn from weighted Megatron prefixes and length buckets, memory-mapped.

Legend: T ``data.seq_len``, G rows of a step (the batch schedule's), d DP ranks, m micro-batch
rows, g a global row index (0, 1, 2, ... over the whole run), n documents of one prefix.

**Which rows.** Row g's component is drawn from three uniforms that are a hash of
``(seed, g)``: the QA component with the QA share at the row's progress p = g / (rows of the
stage), else a length bucket by the mixture weights at p (:mod:`mmtrain.data.mixture`), then a
prefix by the blend weights among the prefixes that hold documents of that bucket. Weights are
therefore shares of rows, i.e. of tokens, as in Megatron's blends.

**Which tokens.** Every (component, prefix, bucket) is a *substream*: the prefix's documents of
that bucket in a pseudo-random order per epoch (a keyed Feistel permutation of 0..n-1, so no
index of size n is ever built), concatenated. A row takes the next T tokens of its substream,
plus the token after them as the last label (so, like the packed corpus, consecutive rows of one
substream overlap by one token and nothing is lost); documents longer than a row are cut at its
edge and continue in the next row of that substream. ``cu_seqlens`` cut at every document start;
the label that is a document's first token is masked.

**State and layouts.** The state is the number of rows consumed plus, per substream, a cursor
(epoch, position in the permutation, token offset): a few integers, JSON in the checkpoint, so a
resumed run produces the identical next batch. Every rank plans the whole step's G rows (index
arithmetic only) and reads the tokens of its own contiguous slice [r·G/d, (r+1)·G/d), split into
micro-batches of m rows: d ranks together see exactly the single-process batch, disjointly.

Memory is O(1) in the corpus: the token and index files are memory-mapped, the per-prefix bucket
counts are three integers, the permutation is computed per index.
"""

from __future__ import annotations

import numpy as np
import torch

from mmtrain.config import ConfigError
from mmtrain.data.batch import Batch
from mmtrain.data.indexed import IndexedReader
from mmtrain.data.mixture import bucket_of, parse_blend, row_weights
from mmtrain.data.packing import Row, collate

STATE_VERSION = 1
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOOKAHEAD = 512  # permutation positions examined at once when looking for a bucket's next doc


# ------------------------------------------------------------------------------------- hashing
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_key(*parts: int) -> int:
    h = np.array([0x6D6D747261696E], dtype=np.uint64)  # "mmtrain"
    for p in parts:
        h = _mix(h ^ np.array([int(p) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(h[0])


def uniforms(seed: int, rows: np.ndarray, k: int) -> np.ndarray:
    """[len(rows), k] uniforms in [0, 1), a pure function of (seed, row, j)."""
    base = np.uint64(hash_key(seed, 0x726F77))
    r = np.asarray(rows, dtype=np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(_mix(r ^ base) + base)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def feistel_permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """A bijection of 0..n-1 keyed by ``key`` (4-round Feistel network with cycle walking)."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return idx.copy()
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(hash_key(key, r)) for r in range(4)]

    def once(x):
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    out = once(idx)
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = once(out[bad])
        bad = out >= np.uint64(n)
    return out


# ------------------------------------------------------------------------------------- sources
class Source:
    """One prefix of a blend: the reader and its per-bucket document counts."""

    def __init__(self, weight: float, prefix: str, what: str, bounds, bucketed: bool):
        self.weight = weight
        self.reader = IndexedReader(prefix, what)
        self.prefix = self.reader.prefix
        self.n = len(self.reader)
        L = self.reader.lengths
        counts = np.zeros(3, dtype=np.int64)
        nonempty = 0
        for a in range(0, self.n, 1 << 22):  # bounded transient memory
            l = np.asarray(L[a:a + (1 << 22)])
            ok = l > 0
            nonempty += int(ok.sum())
            if bucketed:
                counts += np.bincount(bucket_of(l[ok], bounds), minlength=3)
        self.bucket_counts = counts if bucketed else None
        self.count = nonempty

    def has(self, bucket: int) -> bool:
        return self.count > 0 if bucket < 0 else bool(self.bucket_counts[bucket] > 0)


class BlendLoader:
    """This rank's micro-batches of the blend, one optimizer step at a time (module docstring).

    Interface as :class:`mmtrain.data.loader.DataLoader`: ``next_step()``, ``state_dict()``,
    ``load_state_dict()``; the global batch of each step follows ``schedule`` (a
    :class:`mmtrain.train.schedules.BatchSchedule`)."""

    def __init__(self, data_cfg, schedule, total_steps: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, vocab_size: int | None = None, corpus_prefix: str | None = None):
        self.cfg = data_cfg
        self.T = int(data_cfg.seq_len)
        self.seed = int(data_cfg.seed)
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.micro_batch = int(micro_batch)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.vocab_size = vocab_size
        for G in schedule.row_sizes:
            if G % (self.micro_batch * self.dp_size):
                raise ConfigError(
                    f"train.global_batch: a step of {G} rows is not a multiple of "
                    f"train.micro_batch × dp = {self.micro_batch} × {self.dp_size}; make every "
                    f"global batch (train.global_batch, train.batch_schedule) a multiple of "
                    f"{self.micro_batch * self.dp_size}")
        bucketed = data_cfg.mixture is not None
        bounds = list(data_cfg.length_bounds)
        if data_cfg.blend:
            main = parse_blend(data_cfg.blend, "data.blend")
        else:
            main = [(1.0, corpus_prefix)]
        self.sources = [Source(w, p, "data.blend" if data_cfg.blend else "data.corpus", bounds,
                               bucketed) for w, p in main]
        self.qa_sources = []
        if data_cfg.qa_fraction > 0:
            if not data_cfg.qa_blend:
                raise ConfigError(
                    "data.qa_blend: the recipe mixes QA data into the end of the stage "
                    f"(data.qa_fraction={data_cfg.qa_fraction}) but names none; set "
                    "data.qa_blend=[1.0,/data/qa_text_document] or data.qa_fraction=0")
            self.qa_sources = [Source(w, p, "data.qa_blend", bounds, False)
                               for w, p in parse_blend(data_cfg.qa_blend, "data.qa_blend")]
        for s in self.sources + self.qa_sources:
            if s.count == 0:
                raise ConfigError(f"data.blend: {s.prefix} holds no non-empty document; "
                                  f"preprocess some text into it or drop it from the blend")
        if bucketed:
            for b, (name, w) in enumerate(zip(("short", "medium", "long"), self._bucket_need())):
                if w > 0 and not any(s.has(b) for s in self.sources if s.weight > 0):
                    raise ConfigError(
                        f"data.mixture: the {name} bucket has weight {w:g} but no document of the "
                        f"blend falls in it (bounds data.length_bounds={bounds} tokens); give it "
                        f"weight 0, change data.length_bounds or add such documents")
        self.total_rows = schedule.rows_before(self.total_steps)
        self.consumed_rows = 0
        self.step = 0
        self.cursors: dict[str, list[int]] = {}
        self._buf: dict = {}

    def _bucket_need(self):
        c = self.cfg
        w = [0.0, 0.0, 0.0]
        for m in (c.mixture, c.mixture_from):
            if m is not None:
                w = [max(a, float(b)) for a, b in zip(w, m)]
        return w

    # -------------------------------------------------------------------------------- planning
    def _choose(self, g: int, u: np.ndarray):
        """(component key, Source, bucket) of global row g, from its three uniforms u."""
        p = g / max(self.total_rows, 1)
        qa, mix = row_weights(self.cfg, p)
        if qa > 0 and u[0] < qa:
            srcs, bucket, comp = self.qa_sources, -1, "q"
            ws = np.array([s.weight for s in srcs])
        else:
            comp = "m"
            if mix is None:
                bucket = -1
            else:
                bucket = int(np.searchsorted(np.cumsum(mix), u[1] * np.sum(mix), side="right"))
                bucket = min(bucket, 2)
                while mix[bucket] == 0:  # float edge: never pick a zero-weight bucket
                    bucket = (bucket + 1) % 3
            srcs = self.sources
            ws = np.array([s.weight if s.has(bucket) else 0.0 for s in srcs])
        cw = np.cumsum(ws)
        i = min(int(np.searchsorted(cw, u[2] * cw[-1], side="right")), len(srcs) - 1)
        while ws[i] == 0:
            i = (i + 1) % len(srcs)
        return f"{comp}{i}b{bucket}", srcs[i], bucket, comp

    def _perm_key(self, comp: str, src_i: int, epoch: int) -> int:
        return hash_key(self.seed, ord(comp), src_i, epoch)

    def _next_valid(self, key: str, src: Source, bucket: int, epoch: int, k: int, comp: str,
                    src_i: int):
        """The first (epoch, k, doc) at or after permutation position k whose document is
        non-empty and in ``bucket``."""
        while True:
            if k >= src.n:
                epoch, k = epoch + 1, 0
            buf = self._buf.get(key)
            if buf is None or buf[0] != epoch or not buf[1] <= k < buf[2]:
                hi = min(k + _LOOKAHEAD, src.n)
                ks = np.arange(k, hi, dtype=np.uint64)
                docs = feistel_permute(ks, src.n, self._perm_key(comp, src_i, epoch))
                lens = np.asarray(src.reader.lengths[docs.astype(np.int64)])
                ok = lens > 0
                if bucket >= 0:
                    ok &= bucket_of(lens, self.cfg.length_bounds) == bucket
                buf = (epoch, k, hi, ks[ok].astype(np.int64), docs[ok].astype(np.int64),
                       lens[ok].astype(np.int64))
                self._buf[key] = buf
            ks_ok = buf[3]
            j = int(np.searchsorted(ks_ok, k))
            if j < len(ks_ok):
                return epoch, int(ks_ok[j]), int(buf[4][j]), int(buf[5][j])
            k = buf[2]

    def _take(self, key, src, bucket, comp, src_i, need):
        """Consume ``need`` tokens of the substream; pieces [(doc, start, length)] and whether the
        token after them starts a document, plus that token's (doc, offset)."""
        epoch, k, off = self.cursors.get(key, [0, 0, 0])
        pieces = []
        while True:
            epoch, k, doc, length = self._next_valid(key, src, bucket, epoch, k, comp, src_i)
            if need == 0:
                nxt = (doc, off)
                break
            t = min(length - off, need)
            pieces.append((doc, off, t))
            need -= t
            if off + t == length:
                k, off = k + 1, 0
            else:
                off += t
        self.cursors[key] = [epoch, k, off]
        return pieces, nxt

    def plan_step(self, step: int):
        """[(Source, pieces, next_token), ...] for the G rows of ``step`` (advances the cursors)."""
        G = self.schedule.rows(step)
        g0 = self.schedule.rows_before(step)
        u = uniforms(self.seed, np.arange(g0, g0 + G), 3)
        plan = []
        for j in range(G):
            key, src, bucket, comp = self._choose(g0 + j, u[j])
            src_i = (self.qa_sources if comp == "q" else self.sources).index(src)
            pieces, nxt = self._take(key, src, bucket, comp, src_i, self.T)
            plan.append((src, pieces, nxt))
        return plan

    def _row(self, src: Source, pieces, nxt) -> Row:
        r = src.reader
        parts = [np.asarray(r.get(doc, a, n)) for doc, a, n in pieces]
        nd, noff = nxt
        parts.append(np.asarray(r.get(nd, noff, 1)))
        seg = np.concatenate(parts).astype(np.int64)
        if self.vocab_size is not None:
            r.check_tokens(seg, self.vocab_size)
        seg_t = torch.from_numpy(seg)
        lens = [n for _, _, n in pieces]
        mask = torch.ones(self.T, dtype=torch.float32)
        pos = 0
        for i, (doc, a, n) in enumerate(pieces):
            if i > 0:  # every later piece starts a document: its first token is a masked label
                mask[pos - 1] = 0.0
            pos += n
        if noff == 0:
            mask[self.T - 1] = 0.0
        return Row(seg_t[:-1], seg_t[1:], mask, lens)

    # -------------------------------------------------------------------------------- stepping
    def next_step(self) -> list[Batch]:
        step = self.step
        plan = self.plan_step(step)
        G = len(plan)
        per = G // self.dp_size
        mine = plan[self.dp_rank * per:(self.dp_rank + 1) * per]
        rows = [self._row(*p) for p in mine]
        m = self.micro_batch
        self.consumed_rows += G
        self.step += 1
        return [collate(rows[i:i + m]) for i in range(0, len(rows), m)]

    def components_of_step(self, step_plan) -> list[str]:
        return [src.prefix for src, _, _ in step_plan]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "blend", "step": self.step,
                "consumed_rows": self.consumed_rows, "seed": self.seed,
                "cursors": {k: list(v) for k, v in sorted(self.cursors.items())},
                "sources": [[s.prefix, s.n] for s in self.sources + self.qa_sources]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "blend" or state.get("version") != STATE_VERSION:
            raise ConfigError("data.blend: the checkpoint's data loader state is not a blend "
                              "sampler's (it was saved with another data.blend/data.corpus "
                              "setting); resume with the recipe that saved it")
        now = [[s.prefix, s.n] for s in self.sources + self.qa_sources]
        if state["sources"] != now:
            raise ConfigError(f"data.blend: the checkpoint was saved reading {state['sources']}, "
                              f"this recipe reads {now}; resume with the same data")
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"data.seed: the checkpoint used seed {state['seed']}, the recipe "
                              f"{self.seed}; resume with data.seed={state['seed']}")
        self.step = int(state["step"])
        self.consumed_rows = int(state["consumed_rows"])
        self.cursors = {k: [int(x) for x in v] for k, v in state["cursors"].items()}
        self._buf.clear()

    def __repr__(self) -> str:
        return (f"BlendLoader(sources={[s.prefix for s in self.sources]}, T={self.T}, "
                f"dp_rank={self.dp_rank}/{self.dp_size}, step={self.step})")
