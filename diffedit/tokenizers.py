"""Tokenizers built in code from a word list, so tiny and toy models need no download.

CLIP's tokenizer is byte-pair based: we learn merges on the word list until each listed word is
one token (the toy model relies on whole-word tokens for
attention control). T5-style tokenizers are unigram models over the same words.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learnt on the word list until every word is one symbol.

    Merges learnt this way never shadow each other (hand-made per-word merge chains do), and
    ties are broken by the pair itself, so the same words always give the same vocabulary.
    """
    segmented = [[*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        counts = Counter(pair for seg in segmented for pair in zip(seg, seg[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, seg in enumerate(segmented):
            merged, j = [], 0
            while j < len(seg):
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    merged.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    merged.append(seg[j])
                    j += 1
            segmented[i] = merged


def clip_word_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary holds every letter and every given word as one token."""
    words = sorted({w.lower() for w in words})
    merges = learn_merges(words)
    vocab: dict[str, int] = {}
    for piece in [*LETTERS, *(c + "</w>" for c in LETTERS), *(a + b for a, b in merges), *CLIP_SPECIAL]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    broken = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if broken:
        raise ValueError(f"words not single tokens: {broken[:5]}")
    return tokenizer


def t5_word_tokenizer(words: list[str], model_max_length: int = 77) -> T5Tokenizer:
    """A unigram (T5-style) tokenizer over the given words plus single letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w.lower(), -1.0) for w in sorted(set(words))]
    pieces += [(c, -10.0) for c in LETTERS] + [("\u2581", -5.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


CLOSED_VOCABULARY = 5000  # tokens: fewer means a word list's tokenizer (toy and tiny models), not CLIP's 49408


def prompt_warnings(tokenizer, prompt: str) -> list[str]:
    """What the text encoder will not read as written: words outside a closed word vocabulary (such a
    tokenizer spells an unknown word letter by letter, which the model never saw), and tokens past the
    encoder's length (CLIP drops them)."""
    warnings = []
    if tokenizer is None or not prompt:
        return warnings
    if len(tokenizer) < CLOSED_VOCABULARY:
        unknown = [w for w in dict.fromkeys(prompt.lower().replace(",", " ").split())
                   if len(tokenizer.tokenize(w)) > 1]
        if unknown:
            warnings.append(f"prompt {prompt!r}: this model knows no {', '.join(repr(w) for w in unknown)} "
                            "(its vocabulary is closed); expect formless output")
    length = len(tokenizer(prompt).input_ids)
    if length > tokenizer.model_max_length:
        warnings.append(f"prompt {prompt[:40]!r}...: {length} tokens; the text encoder reads the first "
                        f"{tokenizer.model_max_length}, the rest is ignored")
    return warnings
