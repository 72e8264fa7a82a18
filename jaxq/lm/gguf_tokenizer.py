"""Tokenizers from GGUF metadata, and back: :func:`tokenizer_from_gguf`, :func:`tokenizer_to_gguf`.

A GGUF file carries its tokenizer in ``tokenizer.ggml.*`` metadata, in llama.cpp's terms:

* ``model = "gpt2"``: byte-level BPE from ``tokens`` + ``merges``; ``pre`` names the
  pre-tokenizer (the regexes llama.cpp splits with before BPE, see :data:`PRE_TOKENIZERS`);
* ``model = "llama"``: SentencePiece from ``tokens`` + ``scores`` + ``token_type``: a BPE whose
  merges come from the scores (the higher the score of ``a + b``, the earlier ``a b`` merges,
  llama.cpp's rule), with byte fallback (``<0xNN>`` tokens), spaces as ``▁`` and an optional
  ``▁`` prefix (``add_space_prefix``). When the file also has ``merges`` they are used as they
  are (:func:`tokenizer_to_gguf` writes them, so a Hugging Face BPE round-trips exactly).

Token types (``token_type``): 1 normal, 2 unknown, 3 control (special: matched as whole pieces
in the raw text, skipped by ``decode``), 4 user-defined (matched as whole pieces, decoded as
text: Gemma's runs of spaces, tabs and newlines, some HTML tags), 5 unused, 6 byte.

The rebuilt tokenizer is a :class:`tokenizers.Tokenizer`; with ``add_bos_token`` its
post-processor adds BOS (so ``encode(text).ids`` starts with it, as llama.cpp's does).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class GGUFTokenizerError(ValueError):
    """The GGUF tokenizer metadata is missing, malformed or of an unsupported kind."""


def _tk():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("GGUF tokenizers need the `tokenizers` package: pip install 'jaxq[llm]'") from e
    return tokenizers


def _split(pattern: str):
    tk = _tk()
    return tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated", invert=False)


def _byte_level(use_regex: bool):
    return _tk().pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=use_regex)


def _pre_gpt2():
    return _byte_level(True)


def _pre_default():
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT for BPE vocabularies: four regexes in turn.
    pt = _tk().pre_tokenizers
    return pt.Sequence([
        _split(r"[\p{P}\$\+<=>\^~\|]+"),
        _split(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"),
        _split(r"\p{N}+"),
        _split(r"[0-9][0-9][0-9]"),
        _byte_level(False),
    ])


def _pre_llama3():
    return _tk().pre_tokenizers.Sequence([_split(LLAMA3_PATTERN), _byte_level(False)])


def _pre_qwen2():
    return _tk().pre_tokenizers.Sequence([_split(QWEN2_PATTERN), _byte_level(False)])


def _pre_smollm():
    # The upstream SmolLM2 tokenizer.json: Digits(individual_digits) then byte-level GPT-2 regex;
    # llama.cpp's "smollm" pre type is the same: "\p{N}" then the GPT-2 regex.
    pt = _tk().pre_tokenizers
    return pt.Sequence([pt.Digits(individual_digits=True), _byte_level(True)])


PRE_TOKENIZERS = {
    "gpt2": _pre_gpt2,
    "default": _pre_default,
    "llama-bpe": _pre_llama3,
    "llama3": _pre_llama3,
    "llama-v3": _pre_llama3,
    "qwen2": _pre_qwen2,
    "smollm": _pre_smollm,
    "starcoder": _pre_smollm,
}
"""``tokenizer.ggml.pre`` values of byte-level vocabularies this module rebuilds (llama.cpp's regexes)."""

# llama.cpp ignores merges for whole words that are already tokens with these pre-tokenizers.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


# --- reading ---------------------------------------------------------------------------------
def _fields(reader) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata of a GGUFReader as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml."):]] = field.contents()
    return out


def tokenizer_from_gguf(reader) -> Any:
    """Rebuilds the tokenizer of a GGUF file (a ``gguf.GGUFReader`` or a path).

    Returns:
      a :class:`tokenizers.Tokenizer`.

    Raises:
      GGUFTokenizerError: no tokenizer metadata, an unknown ``tokenizer.ggml.model`` or
        ``tokenizer.ggml.pre``, or inconsistent arrays.
    """
    if not hasattr(reader, "fields"):
        import gguf

        reader = gguf.GGUFReader(reader)
    meta = _fields(reader)
    if "model" not in meta:
        raise GGUFTokenizerError("the GGUF file has no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
    return build_tokenizer(meta)


def build_tokenizer(meta: Mapping[str, Any]) -> Any:
    """A :class:`tokenizers.Tokenizer` from ``tokenizer.ggml.*`` values (keys without the prefix)."""
    model = meta["model"]
    tokens = list(meta.get("tokens") or [])
    if not tokens:
        raise GGUFTokenizerError("the GGUF tokenizer has no 'tokenizer.ggml.tokens'")
    types = [int(t) for t in meta.get("token_type") or [NORMAL] * len(tokens)]
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        tok = _build_bpe(meta, tokens, types)
    elif model == "llama":
        tok = _build_spm(meta, tokens, types)
    else:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (SentencePiece)"
        )
    _add_special(tok, tokens, types, spm=model == "llama")
    _post_processor(tok, meta, tokens, byte_level=model == "gpt2")
    return tok


def _vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated string keeps its first id
    return vocab


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFTokenizerError(f"tokenizer.ggml.merges entry {m!r} is not two space-separated tokens")
        out.append((parts[0], parts[1]))
    return out


def _build_bpe(meta, tokens, types):
    tk = _tk()
    pre = meta.get("pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.pre {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    if "merges" not in meta:
        raise GGUFTokenizerError("a 'gpt2' GGUF tokenizer needs 'tokenizer.ggml.merges'")
    bpe = tk.models.BPE(vocab=_vocab(tokens), merges=_parse_merges(meta["merges"]), byte_fallback=False,
                        ignore_merges=pre in _IGNORE_MERGES)
    tok = tk.Tokenizer(bpe)
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece scores: ``a b`` ranks by the score of ``a + b``.

    Every split of a normal token into two tokens is a merge; higher scores merge first
    (llama.cpp's SPM rule), ties by the ids of the parts.
    """
    vocab = _vocab(tokens)
    found = []
    for i, t in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None:
                found.append((-float(scores[i]), ia, ib, a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def _build_spm(meta, tokens, types):
    tk = _tk()
    scores = meta.get("scores")
    if "merges" in meta:
        merges = _parse_merges(meta["merges"])
    elif scores is not None:
        if len(scores) != len(tokens):
            raise GGUFTokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        merges = spm_merges(tokens, scores, types)
    else:
        raise GGUFTokenizerError("a 'llama' GGUF tokenizer needs 'tokenizer.ggml.scores' (or merges)")
    unk_id = meta.get("unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    bpe = tk.models.BPE(vocab=_vocab(tokens), merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = tk.Tokenizer(bpe)
    prefix = bool(meta.get("add_space_prefix", True))
    norm = [tk.normalizers.Replace(" ", "▁")]
    if prefix:
        norm.insert(0, tk.normalizers.Prepend("▁"))
    tok.normalizer = tk.normalizers.Sequence(norm)
    dec = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if prefix:
        dec.append(tk.decoders.Strip(" ", 1, 0))
    tok.decoder = tk.decoders.Sequence(dec)
    return tok


def _add_special(tok, tokens, types, spm: bool) -> None:
    tk = _tk()
    added = []
    for t, ty in zip(tokens, types):
        if ty in (CONTROL, UNKNOWN):
            added.append(tk.AddedToken(t, special=True, normalized=False))
        elif ty == USER_DEFINED:
            # SentencePiece user-defined pieces are written with "▁" for spaces: match them in the
            # normalized text; byte-level ones are raw text.
            added.append(tk.AddedToken(t, special=False, normalized=spm))
    specials = [a for a in added if a.special]
    plain = [a for a in added if not a.special]
    if specials:
        tok.add_special_tokens(specials)
    if plain:
        tok.add_tokens(plain)


def _opt_id(meta, key, n) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    v = int(v)
    return v if 0 <= v < n else None


def _post_processor(tok, meta, tokens, byte_level: bool) -> None:
    tk = _tk()
    n = len(tokens)
    bos, eos = _opt_id(meta, "bos_token_id", n), _opt_id(meta, "eos_token_id", n)
    add_bos = bool(meta.get("add_bos_token", not byte_level)) and bos is not None
    add_eos = bool(meta.get("add_eos_token", False)) and eos is not None
    if not (add_bos or add_eos):
        if byte_level:
            tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
        return
    single, pair, special = [], [], []
    if add_bos:
        special.append((tokens[bos], bos))
        single.append(tokens[bos])
    single.append("$A")
    if add_eos:
        if not add_bos or eos != bos:
            special.append((tokens[eos], eos))
        single.append(tokens[eos])
    pair = single + [("$B" if p == "$A" else p) + ":1" for p in single]
    tok.post_processor = tk.processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer.encode`` puts a special token before the text (its BOS)."""
    return _template_first_special(tokenizer) is not None


def _template_first_special(tokenizer) -> str | None:
    post = json.loads(tokenizer.to_str()).get("post_processor")
    for proc in _flatten(post, "processors"):
        if proc.get("type") == "TemplateProcessing":
            first = proc["single"][0]
            if "SpecialToken" in first:
                return first["SpecialToken"]["id"]
    return None


def _flatten(node, key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for sub in node.get(key, []):
            out += _flatten(sub, key)
        return out
    return [node]


# --- writing ---------------------------------------------------------------------------------
_PROBES = (
    "Hello world! It's 2024: 12345 apples, 3.14 pies.",
    "  leading spaces,   runs of   spaces\tand\ttabs\n\nnew lines\r\n end ",
    "ünïcödé • naïve café — 東京 🙂 x²",
    "don't you'll I'M they've",
)


def tokenizer_to_gguf(writer, tokenizer, cfg=None) -> dict[str, Any]:
    """Writes ``tokenizer`` into a ``gguf.GGUFWriter``'s metadata, so that reading it gives the same ids.

    A byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2 style) is written as model ``"gpt2"``
    (tokens, merges, types, and the ``pre`` name matching its pre-tokenizer); a SentencePiece-style
    BPE (``▁`` for spaces, byte fallback; Llama 2, Gemma, TinyStories) as model ``"llama"`` with
    tokens, scores (from the merge ranks, for llama.cpp), types and the merges themselves (which
    :func:`tokenizer_from_gguf` prefers, so the ids round-trip exactly). Special ids and
    ``add_bos_token`` come from ``cfg`` (a DecoderConfig) when given, else from the tokenizer.
    The vocabulary is padded with unused ``[PADi]`` tokens up to ``cfg.vocab_size``.

    The rebuilt tokenizer is checked against ``tokenizer`` on probe texts. Text that contains
    special-token strings follows llama.cpp's rule in the rebuild (special tokens split off the
    raw text first; with a ``▁`` prefix, each fragment after one gets its own), which can differ
    from a Hugging Face tokenizer whose special tokens are matched after normalization.

    Returns:
      the ``tokenizer.ggml.*`` values written (keys without the prefix).

    Raises:
      GGUFTokenizerError: the tokenizer is of a kind GGUF cannot carry, or the rebuilt one would
        give different ids on probe texts.
    """
    meta = tokenizer_metadata(tokenizer, cfg)
    rebuilt = build_tokenizer(meta)
    for text in _PROBES:
        want = tokenizer.encode(text, add_special_tokens=False).ids
        got = rebuilt.encode(text, add_special_tokens=False).ids
        if want != got:
            raise GGUFTokenizerError(
                f"this tokenizer cannot be carried by GGUF exactly: on {text!r} it gives {want[:16]} "
                f"but the GGUF rebuild gives {got[:16]}"
            )
    _write(writer, meta)
    return meta


def _write(writer, meta: Mapping[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_type"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
    if "merges" in meta:
        writer.add_token_merges(meta["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("eot_token_id", writer.add_eot_token_id), ("eom_token_id", writer.add_eom_token_id),
                     ("unknown_token_id", writer.add_unk_token_id), ("padding_token_id", writer.add_pad_token_id)):
        if meta.get(key) is not None:
            add(int(meta[key]))
    writer.add_add_bos_token(bool(meta.get("add_bos_token", False)))
    if "add_space_prefix" in meta:
        writer.add_add_space_prefix(bool(meta["add_space_prefix"]))


def _canonical(node):
    """A pre-tokenizer's JSON without settings that do not change ids (offset trimming)."""
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def _pre_name(pre_json) -> str:
    tk = _tk()
    want = _canonical(pre_json)
    for name in ("gpt2", "smollm", "llama-bpe", "qwen2", "default"):
        probe = tk.Tokenizer(tk.models.BPE())
        probe.pre_tokenizer = PRE_TOKENIZERS[name]()
        if _canonical(json.loads(probe.to_str())["pre_tokenizer"]) == want:
            return name
    raise GGUFTokenizerError(
        f"this byte-level tokenizer's pre-tokenizer {json.dumps(pre_json)[:300]} matches none that GGUF "
        f"names ({', '.join(sorted(PRE_TOKENIZERS))})"
    )


def _types_in(node, key: str) -> list[str]:
    return [n.get("type") for n in _flatten(node, key)]


def tokenizer_metadata(tokenizer, cfg=None) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values (keys without the prefix) that describe ``tokenizer``."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFTokenizerError(
            f"GGUF carries BPE tokenizers (byte-level or SentencePiece-style); this one is {model.get('type')!r}"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise GGUFTokenizerError("BPE with continuing_subword_prefix, end_of_word_suffix or dropout has no GGUF form")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    for i, a in added.items():
        id_to_tok.setdefault(i, a["content"])
    n = max(id_to_tok) + 1
    vocab_size = max(n, cfg.vocab_size if cfg is not None else 0)
    if cfg is not None and n > cfg.vocab_size:
        raise GGUFTokenizerError(f"the tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    raw_merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    for m in merges:
        if len(m.split(" ")) != 2:
            raise GGUFTokenizerError(f"merge {m!r} contains a space inside a token; GGUF merges cannot carry it")

    pre = spec.get("pre_tokenizer")
    byte_level = "ByteLevel" in _types_in(pre, "pretokenizers") or (spec.get("decoder") or {}).get("type") == "ByteLevel"
    norm_types = _types_in(spec.get("normalizer"), "normalizers")
    meta: dict[str, Any] = {}
    if byte_level:
        if norm_types:
            raise GGUFTokenizerError(f"a byte-level GGUF tokenizer has no normalizer; this one has {norm_types}")
        meta["model"] = "gpt2"
        meta["pre"] = _pre_name(pre)
    else:
        metaspace = [p for p in _flatten(pre, "pretokenizers") if p.get("type") == "Metaspace"]
        prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "▁"
                      for n in _flatten(spec.get("normalizer"), "normalizers"))
        prepend = prepend or any(p.get("prepend_scheme", "always") != "never" for p in metaspace)
        ok_norm = set(norm_types) <= {"Prepend", "Replace"}
        ok_pre = all(t == "Metaspace" for t in _types_in(pre, "pretokenizers"))
        if not (ok_norm and ok_pre) or not (metaspace or "Replace" in norm_types):
            raise GGUFTokenizerError(
                "GGUF carries SentencePiece-style BPE (spaces as '▁', optional '▁' prefix, byte fallback) or "
                f"byte-level BPE; this tokenizer has normalizer {norm_types} and pre-tokenizer "
                f"{_types_in(pre, 'pretokenizers')}"
            )
        meta["model"] = "llama"
        meta["add_space_prefix"] = bool(prepend)
        # Scores for llama.cpp's SPM rule: a token made by an earlier merge scores higher.
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        meta["scores"] = [(-float(rank[t]) if t in rank else 0.0) for t in tokens]
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
    unk = model.get("unk_token")
    for i, a in added.items():
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    if unk is not None and unk in model["vocab"]:
        types[int(model["vocab"][unk])] = UNKNOWN  # matched as a whole piece too, like a control token
        meta["unknown_token_id"] = int(model["vocab"][unk])
    meta["tokens"] = tokens
    meta["token_type"] = types
    meta["merges"] = merges

    first = _template_first_special(tokenizer)
    tok_bos = tokenizer.token_to_id(first) if first is not None else None
    bos = cfg.bos_token_id if cfg is not None and cfg.bos_token_id is not None else tok_bos
    if bos is not None:
        meta["bos_token_id"] = int(bos)
    eos_ids = tuple(cfg.eos_token_ids) if cfg is not None else ()
    for key, eid in zip(("eos_token_id", "eot_token_id", "eom_token_id"), eos_ids):
        meta[key] = int(eid)
    if cfg is not None and cfg.pad_token_id is not None:
        meta["padding_token_id"] = int(cfg.pad_token_id)
    meta["add_bos_token"] = bool(tok_bos is not None or (cfg is not None and cfg.add_bos and bos is not None))
    return meta

