"""Structured outputs: the grammar lives outside the engine, the token mask inside it.

    grammar = json_schema(schema) | json_object() | regex(r) | choice([...]) | lark(text)
        a grammar string (llguidance's format), plain data a SamplingParams can carry
    guide = Guidance(tokenizer, vocab_size).guide(grammar)
        one per request: compiled once, checked (GrammarError names what is wrong)
    mask_logits(logits, rows, guides)   before sampling: disallowed tokens -> -inf, per row
    guide.advance(token)                after sampling; guide.done once the grammar is complete

llguidance (a Rust wheel with no dependencies and no compiler at install, used by vLLM and
llama.cpp) computes a row's mask in well under a millisecond from the tokenizer's vocabulary.
Its own torch helper compiles a kernel with torch.compile, i.e. a C++ compiler and the host's
CPU flags at run time, so the bitmask is unpacked here with plain tensor ops instead.
Rows without a guide are never touched.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

# JSON written the way OpenAI models write it: one space after ':' and ',', no free whitespace,
# so the tool-call stream parser in the API can rely on the shape.
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class GrammarError(ValueError):
    """A grammar (JSON schema, regex, choice, lark) that cannot be compiled; the message names the part."""


def _llg():
    import llguidance
    return llguidance


def json_schema(schema: dict[str, Any] | bool) -> str:
    """A grammar for JSON that validates against `schema`, always (OpenAI's strict mode, whatever
    the request says). An object schema that does not declare additionalProperties gets none: a small
    model given the freedom invents keys without end, and what it writes still validates against
    the schema as given."""
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, not {type(schema).__name__}")
    try:
        # lenient=False: a keyword llguidance does not implement is an error, not silently dropped
        return _llg().LLMatcher.grammar_from_json_schema(closed(schema), defaults=dict(_JSON_STYLE, lenient=False))
    except (ValueError, TypeError) as e:
        raise GrammarError(f"JSON schema: {e}") from None


def closed(s: Any) -> Any:
    """The schema with additionalProperties: false on every object schema that does not declare it."""
    if isinstance(s, list):
        return [closed(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {k: closed(v) for k, v in s.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_object() -> str:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> str:
    return _llg().LLMatcher.grammar_from_regex(pattern)


def choice(options: Sequence[str]) -> str:
    """Exactly one of the given strings."""
    if not options or not all(isinstance(o, str) for o in options):
        raise GrammarError("choice needs a non-empty list of strings")
    return lark("start: " + " | ".join(json.dumps(o) for o in options))


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark rule body for JSON of `schema`, written like json_schema() writes it."""
    return "%json " + json.dumps(dict(closed(schema), **{"x-guidance": dict(_JSON_STYLE, lenient=False)}))


def lark(text: str) -> str:
    return _llg().LLMatcher.grammar_from_lark(text)


class Guide:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self.m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits of the next step into bitmask[row] (int32 words)."""
        v = bitmask[row]
        self.m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def advance(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise GrammarError(f"token {token} is not allowed by the grammar: {self.m.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the grammar allows no alternative to from here (they need no sampling)."""
        return [] if self.m.is_stopped() else list(self.m.compute_ff_tokens())

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only the end of the sequence)."""
        return self.m.is_stopped()


class Guidance:
    """The tokenizer's vocabulary in llguidance's form, built once per engine (about 0.3 s)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        import llguidance.hf
        if tokenizer is None:
            raise GrammarError("this model has no tokenizer; constrained decoding needs one")
        self.vocab_size = vocab_size
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)

    def guide(self, grammar: str) -> Guide:
        llg = _llg()
        err = llg.LLMatcher.validate_grammar(grammar, self.tok)
        if err:
            raise GrammarError(_first_line(err))
        m = llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(_first_line(m.get_error()))
        return Guide(m)

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, (self.vocab_size + 31) // 32, dtype=torch.int32)


def _first_line(msg: str) -> str:
    # llguidance's messages run over several lines (the grammar line, a caret): one line for a 400
    return " ".join(msg.split()) or "invalid grammar"


_BITS = torch.arange(32, dtype=torch.int32)


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits: [R, V] float, bitmask: [R, ceil(V/32)] int32 (bit j of word w allows token 32w+j).
    Disallowed tokens become -inf in place."""
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).bool()         # [R, W, 32]
    allowed = allowed.flatten(1)[:, :logits.shape[1]].to(logits.device)   # [R, V]
    logits.masked_fill_(~allowed, float("-inf"))
