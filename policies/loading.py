"""Reading the YAML files users write, with errors that name the file, line and field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class InputError(ValueError):
    """Bad input from a user file or argument; the message names file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = file or "<input>"
        if line is not None:
            where += f":{line}"
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {message}")


def _locate(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the YAML node at pydantic location `loc` (deepest match)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
            if nxt is None:  # an extra key: point at the key itself
                nxt = next((k for k, _ in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def field_name(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_yaml(text: str, file: str = "<input>") -> tuple[Any, yaml.Node | None]:
    """Parse YAML text; returns (data, node tree). Syntax errors become InputError with a line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"not valid YAML: {getattr(e, 'problem', e)}", file=file,
                         line=mark.line + 1 if mark else None) from None
    return data, node


def validate_into(model: type[M], data: Any, node: yaml.Node | None, file: str,
                  context: dict | None = None) -> M:
    """Build `model` from parsed data; the first pydantic error becomes an InputError with its line."""
    if data is None:
        raise InputError(f"file is empty; expected a {model.__name__}", file=file)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'"
        elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
            msg += f" (got {first['input']!r})"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        raise InputError(msg, file=file, line=_locate(node, loc), field=field_name(loc) or None) from None


def load_file(model: type[M], path: str | Path,
              post: Callable[[M, Callable[[tuple], int | None]], None] | None = None,
              context: dict | None = None) -> M:
    """Load a YAML (or JSON) file into `model`. `post` may run cross-field checks with a line locator."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", file=str(path)) from None
    data, node = parse_yaml(text, str(path))
    obj = validate_into(model, data, node, str(path), context)
    if post is not None:
        try:
            post(obj, lambda loc: _locate(node, loc))
        except InputError as e:
            if e.file is None:
                raise InputError(e.detail, file=str(path), line=e.line, field=e.field) from None
            raise
    return obj
