"""Intent files: Markdown, optional YAML front matter, the intent in plain words as the body.

    ---
    cluster: scenarios/hospital/cluster.yaml
    policy: scenarios/hospital/policy.yaml
    service: discharge-assistant
    model: llama-3-8b
    mode: confirm
    ---
    Keep patient data inside the EU and bring TTFT under 300 ms.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from policies.loading import InputError, parse_yaml

FRONT_KEYS = ("cluster", "policy", "service", "model", "mode")
# intent fields the front matter may set, to settle what the text leaves open or the rules and the LLM read
# differently; the parser still never lets them lower privacy
SETTLE_KEYS = {"data_class": str, "objective": str, "prefer_tier": str, "min_trust": str, "max_ttft_ms": float,
               "max_tpot_ms": float, "allowed_jurisdictions": list, "exclude_nodes": list}
MODES = ("read-only", "suggest", "confirm", "auto")


@dataclass(frozen=True)
class IntentFile:
    """A loaded intent file: front matter (only known keys), the body text, and where it came from."""
    front: dict
    body: str
    path: Path

    def resolve(self, key: str) -> Path | None:
        """A path named in the front matter (cluster, policy), relative to the intent file's folder."""
        v = self.front.get(key)
        if not v:
            return None
        p = Path(v)
        return p if p.is_absolute() or p.exists() else (self.path.parent / p)


def parse_intent_text(text: str, file: str = "<input>") -> tuple[dict, str]:
    """Split intent-file text into (front matter, body); errors name the file and line."""
    lines = text.splitlines()
    front: dict = {}
    body_start = 0
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() in ("---", "...")), None)
        if end is None:
            raise InputError("front matter opened with '---' is never closed (add a '---' line after it)",
                             file=file, line=1)
        try:
            data, node = parse_yaml("\n".join(lines[1:end]), file)
        except InputError as e:  # shift the line past the opening '---'
            raise InputError(e.detail, file=file, line=(e.line or 0) + 1) from None
        if data is not None and not isinstance(data, dict):
            raise InputError(f"front matter must be a mapping of {', '.join(FRONT_KEYS)}; got "
                             f"{type(data).__name__}", file=file, line=2)
        for k, v in (data or {}).items():
            key_line = _line_of(node, k) + 1
            if k in SETTLE_KEYS:
                want = SETTLE_KEYS[k]
                ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                   if want is float else isinstance(v, str) or
                                   (want is list and isinstance(v, list) and all(isinstance(x, str) for x in v)))
                if not ok:
                    raise InputError(f"'{k}' must be " + {"float": "a positive number of milliseconds",
                                                          "list": "a name or a list of names",
                                                          "str": "a string"}[want.__name__] + f", got {v!r}",
                                     file=file, line=key_line, field=str(k))
                continue
            if k not in FRONT_KEYS:
                raise InputError(f"unknown key '{k}' (known: {', '.join(FRONT_KEYS + tuple(SETTLE_KEYS))})",
                                 file=file, line=key_line, field=str(k))
            if v is not None and not isinstance(v, str):
                raise InputError(f"'{k}' must be a string, got {v!r}", file=file, line=key_line, field=str(k))
            if k == "mode" and v not in MODES:
                raise InputError(f"mode '{v}' is not one of {', '.join(MODES)}", file=file, line=key_line,
                                 field="mode")
        front = {k: v for k, v in (data or {}).items() if v is not None}
        body_start = end + 1
    body = "\n".join(lines[body_start:]).strip()
    if not body:
        raise InputError("the intent is empty: write what you want in plain words below the front matter",
                         file=file, line=body_start + 1)
    return front, body


def _line_of(node: yaml.Node | None, key) -> int:
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == str(key):
                return k.start_mark.line + 1
    return 1


def load_intent_file(path: str | Path) -> IntentFile:
    """Load an intent file (Markdown with optional YAML front matter); errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read intent file: {e.strerror}", file=str(path)) from None
    front, body = parse_intent_text(text, str(path))
    return IntentFile(front, body, path)
