"""forward()/__call__ of the proxy: logits from the agent's POST /v1/forward,
in the shape and kind transformers returns, a loss when labels are given, and
a stand-in for past_key_values so that hand-written decoding loops work.

Standard library only; numpy (or torch) is used when the caller's inputs are
numpy arrays (or torch tensors), plain lists of floats otherwise.
"""
from __future__ import annotations

import array
import base64
import math
import sys

# Rows of logits one request may ask for (the agent's limit, see
# agent/README.md); longer inputs are split over several requests.
MAX_ROWS = 512
MAX_SEQUENCES = 64


class RemoteCache:
    """Stands in for past_key_values: the tokens each row has consumed.

    The agent keeps no state between requests, so a call that passes this
    back is answered by running history + new tokens and returning the new
    positions' logits: the same logits a real KV cache would give.
    """

    def __init__(self, rows):
        self.rows = [list(r) for r in rows]

    def get_seq_length(self, layer_idx=0):
        return len(self.rows[0]) if self.rows else 0

    def __len__(self):  # transformers' caches report their layer count; scripts only test truthiness
        return 1 if self.rows else 0

    def __repr__(self):
        return "RemoteCache(%d rows, %d tokens)" % (len(self.rows), self.get_seq_length())


class CausalLMOutput(dict):
    """transformers' ModelOutput for causal LMs, without torch: attribute and
    key access, and index/tuple access over the fields that are set."""

    _fields = ("loss", "logits", "past_key_values")

    def __init__(self, **kw):
        super().__init__((k, kw[k]) for k in self._fields if kw.get(k) is not None)

    def __getattr__(self, name):
        if name in self._fields:
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, k):
        if isinstance(k, (int, slice)):
            return self.to_tuple()[k]
        return super().__getitem__(k)

    def to_tuple(self):
        return tuple(self[k] for k in self._fields if k in self)


def output(kind, loss, logits, past):
    """CausalLMOutputWithPast when torch (and so transformers' outputs) is
    there, our stand-in otherwise."""
    if kind == "torch":
        try:
            from transformers.modeling_outputs import CausalLMOutputWithPast
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past)
        except Exception:  # noqa: BLE001 - any transformers without it: the stand-in
            pass
    return CausalLMOutput(loss=loss, logits=logits, past_key_values=past)


class GenerateOutput(CausalLMOutput):
    """transformers' GenerateDecoderOnlyOutput without torch."""

    _fields = ("sequences", "scores", "logits", "attentions", "hidden_states", "past_key_values")


def generate_output(kind, sequences):
    """generate(..., return_dict_in_generate=True): `.sequences` (scores
    and the rest are None: the agent returns tokens only)."""
    if kind == "torch":
        try:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=sequences)
        except Exception:  # noqa: BLE001 - any transformers without it: the stand-in
            pass
    return GenerateOutput(sequences=sequences)


# -- planning the requests ---------------------------------------------------------

def plan(sequences, keeps, max_rows=None, max_sequences=None):
    """Splits the work into requests of at most `max_rows` kept rows.

    sequences[i] is run, and its last keeps[i] positions kept. A sequence
    keeping more rows than fit is cut into windows: the logits of positions
    a..b come from running ids[:b] and keeping b - a. The agent applies one
    logits_to_keep to a whole request, so pieces are grouped by it. Returns
    [(logits_to_keep, [(sequence index, ids), ...]), ...].
    """
    max_rows = max_rows or MAX_ROWS
    max_sequences = max_sequences or MAX_SEQUENCES
    groups = {}
    for i, (ids, keep) in enumerate(zip(sequences, keeps)):
        start = len(ids) - keep
        while start < len(ids):
            end = min(start + max_rows, len(ids))
            groups.setdefault(end - start, []).append((i, ids[:end]))
            start = end
    requests = []
    for keep, pieces in groups.items():
        per_request = max(1, min(max_sequences, max_rows // keep))
        for k in range(0, len(pieces), per_request):
            requests.append((keep, pieces[k:k + per_request]))
    return requests


def decode_rows(b64, vocab):
    """base64 little-endian float32 -> list of rows (array('f') each)."""
    a = array.array("f")
    a.frombytes(base64.b64decode(b64))
    if sys.byteorder != "little":
        a.byteswap()
    return [a[i * vocab:(i + 1) * vocab] for i in range(len(a) // vocab)] if vocab else []


# -- building the answer -------------------------------------------------------------

def assemble(kind, batch, width, vocab, placed):
    """A (batch, width, vocab) float32 array of the caller's kind; `placed`
    maps (row, column) to a logits row; unplaced positions (padding) are 0."""
    if kind in ("numpy", "torch"):
        try:
            import numpy
        except ImportError:
            numpy = None
        if numpy is not None:
            out = numpy.zeros((batch, width, vocab), dtype=numpy.float32)
            for (r, c), row in placed.items():
                out[r, c] = numpy.frombuffer(row, dtype=numpy.float32)
            if kind == "torch":
                import torch
                return torch.from_numpy(out)
            return out
    zero = [0.0] * vocab
    rows = [[list(placed[(r, c)]) if (r, c) in placed else list(zero) for c in range(width)]
            for r in range(batch)]
    if kind == "torch":
        import torch
        return torch.tensor(rows, dtype=torch.float32)
    return rows


def causal_lm_loss(kind, placed, labels, vocab):
    """transformers' causal LM loss: mean cross-entropy of position t's logits
    against labels[t + 1], skipping labels of -100 (and padding, which has no
    logits)."""
    pairs = []
    for (r, c), row in sorted(placed.items()):
        if c + 1 >= len(labels[r]):
            continue
        target = int(labels[r][c + 1])
        if target == -100:
            continue
        if not 0 <= target < vocab:
            raise ValueError("label %d is outside the vocabulary (size %d)" % (target, vocab))
        pairs.append((row, target))
    loss = _mean_nll(pairs) if pairs else float("nan")
    if kind == "torch":
        import torch
        return torch.tensor(loss, dtype=torch.float32)
    if kind == "numpy":
        import numpy
        return numpy.float32(loss)
    return loss


def _mean_nll(pairs):
    """Mean of logsumexp(row) - row[target], in float64."""
    try:
        import numpy
    except ImportError:
        total = 0.0
        for row, target in pairs:
            m = max(row)
            total += m + math.log(math.fsum(math.exp(x - m) for x in row)) - row[target]
        return total / len(pairs)
    x = numpy.stack([numpy.frombuffer(row, dtype=numpy.float32) for row, _ in pairs]).astype(numpy.float64)
    m = x.max(axis=1)
    lse = m + numpy.log(numpy.exp(x - m[:, None]).sum(axis=1))
    picked = x[numpy.arange(len(pairs)), [t for _, t in pairs]]
    return float((lse - picked).mean())
