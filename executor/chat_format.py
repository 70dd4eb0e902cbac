"""What OpenAI's chat API means in grammars and text: response formats, tools, tool-call replies.

    grammar_for(response_format, tools, tool_choice)  -> an llguidance grammar (or None: free text)
    render(messages, tools, tool_choice)              -> plain {role, content} turns for the chat template
    ToolCallReader                                    -> the model's text as content or one tool call,
                                                         incrementally (for streamed deltas) and at the end

A tool call is written by the model as one JSON object, `{"name": "<tool>", "arguments": {...}}`,
and only such an object: the grammar makes `name` one of the tools and `arguments` valid for that
tool's parameter schema. With tool_choice "auto" the grammar allows either that object or words
that do not start with "{" (so the first token tells which), "required" only a call, a named
function only a call of it, "none" no call. Models whose chat template knows no tools (SmolLM2)
learn the tools from a system message (prompts/tools_system.md).

Every argument here has been checked by the API's request models; a problem found here is a
ValueError whose first word names the parameter.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from . import structured

PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


class ParamError(ValueError):
    """A request parameter that cannot be served as given; .param names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def chosen_tools(tools: list[dict] | None, tool_choice: Any) -> tuple[list[dict], str]:
    """(the tools the model may call, mode) with mode one of 'none', 'auto', 'required'."""
    if not tools or tool_choice == "none":
        return [], "none"
    if tool_choice in (None, "auto"):
        return tools, "auto"
    if tool_choice == "required":
        return tools, "required"
    name = tool_choice["function"]["name"]
    picked = [t for t in tools if t["function"]["name"] == name]
    if not picked:
        raise ParamError("tool_choice", f"names function '{name}', which is not among the tools "
                                        f"({', '.join(tool_names(tools))})")
    return picked, "required"


def _call_schema(tools: list[dict]) -> dict:
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _format_grammar(response_format: dict | None) -> tuple[str | None, dict | None]:
    """(grammar, schema) of a response_format; (None, None) for free text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return structured.json_object(), {"type": "object"}
    spec = response_format["json_schema"]
    schema = spec.get("schema") or {"type": "object"}
    try:
        return structured.json_schema(schema), schema
    except structured.GrammarError as e:
        raise ParamError("response_format.json_schema.schema", str(e)) from None


def grammar_for(response_format: dict | None, tools: list[dict] | None, tool_choice: Any,
                structured_outputs: dict | None = None) -> str | None:
    """The grammar a chat request's reply must follow, or None when it is free text."""
    if structured_outputs:
        return _structured_grammar(structured_outputs)
    fmt, fmt_schema = _format_grammar(response_format)
    callable_, mode = chosen_tools(tools, tool_choice)
    if mode == "none":
        return fmt
    calls = _call_schema(callable_)
    if mode == "required":
        try:
            return structured.json_schema(calls)
        except structured.GrammarError as e:
            raise ParamError("tools", str(e)) from None
    # auto: a call, or the reply the response format asks for (words that do not open with '{')
    answer = structured.lark_json(fmt_schema) if fmt_schema is not None else "TEXT"
    return structured.lark(f"start: call | answer\ncall: {structured.lark_json(calls)}\nanswer: {answer}\n"
                           r"TEXT: /[^{\s][\s\S]*/" "\n")


def _structured_grammar(so: dict) -> str:
    """vLLM's `structured_outputs` extension: exactly one of json, regex, choice, grammar (lark)."""
    given = [k for k in ("json", "regex", "choice", "grammar") if so.get(k) is not None]
    if len(given) != 1:
        raise ParamError("structured_outputs", "give exactly one of json, regex, choice, grammar")
    k = given[0]
    try:
        if k == "json":
            return structured.json_schema(so["json"]) if isinstance(so["json"], (dict, bool)) \
                else structured.json_schema(json.loads(so["json"]))
        if k == "regex":
            return structured.regex(so["regex"])
        if k == "choice":
            return structured.choice(so["choice"])
        return structured.lark(so["grammar"])
    except (structured.GrammarError, json.JSONDecodeError) as e:
        raise ParamError(f"structured_outputs.{k}", str(e)) from None


# --- the conversation as the chat template sees it ------------------------------------------------

def _tool_call_text(call: dict) -> str:
    fn = call["function"]
    args = fn.get("arguments") or "{}"
    try:
        args_json = json.dumps(json.loads(args), ensure_ascii=False)
    except json.JSONDecodeError:
        args_json = args                       # the history is the client's; render what it holds
    return f'{{"name": {json.dumps(fn["name"])}, "arguments": {args_json}}}'


def tools_prompt(tools: list[dict], mode: str) -> str:
    listing = "\n".join(json.dumps({"name": t["function"]["name"],
                                    "description": t["function"].get("description", ""),
                                    "parameters": t["function"].get("parameters") or {}}, ensure_ascii=False)
                        for t in tools)
    rule = ("You must call one of them." if mode == "required"
            else "Call one only when it helps; otherwise answer in plain words.")
    return (PROMPTS / "tools_system.md").read_text().replace("{tools}", listing).replace("{rule}", rule)


def render(messages: list[dict], tools: list[dict] | None, tool_choice: Any) -> list[dict]:
    """OpenAI messages (content parts, tool calls, tool results) -> {role, content} turns."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content")
        if isinstance(content, list):           # content parts: text only
            content = "".join(p["text"] for p in content)
        content = content or ""
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            content = "\n".join(([content] if content else []) + [_tool_call_text(c) for c in m["tool_calls"]])
        out.append({"role": role, "content": content})
    callable_, mode = chosen_tools(tools, tool_choice)
    if callable_:
        prompt = tools_prompt(callable_, mode)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# --- the reply: words or a call --------------------------------------------------------------------

class ToolCallReader:
    """Reads a reply that may be a tool call, as its text grows.

    feed(text) -> deltas: ("content", str) or ("call", {"index", "id"?, "name"?, "arguments"}).
    A call is recognised by its head, `{"name": "<a tool>", "arguments": `; the arguments' text is
    then streamed as it comes, holding back the last character (it may be the brace that closes
    the call object)."""

    def __init__(self, names: list[str]):
        self.heads = {f'{{"name": {json.dumps(n, ensure_ascii=False)}, "arguments": ': n for n in names}
        self.kind: str | None = None            # None (undecided), "content" or "call"
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.name: str | None = None
        self.start = 0                          # where the arguments begin in the reply
        self.sent = 0                           # characters already sent (of the reply, or of the arguments)

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        out = []
        if self.kind is None:
            body = text.lstrip()
            head = next((h for h in self.heads if body.startswith(h)), None)
            if head is not None:
                self.kind, self.name = "call", self.heads[head]
                self.start = len(text) - len(body) + len(head)
                out.append(("call", {"index": 0, "id": self.id, "type": "function",
                                     "function": {"name": self.name, "arguments": ""}}))
            elif final or not any(h.startswith(body) for h in self.heads):
                self.kind = "content"
            else:
                return []                       # still a possible call
        if self.kind == "content":
            delta, self.sent = text[self.sent:], len(text)
            return [("content", delta)] if delta else []
        args = self.arguments(text) if final else text[self.start:-1]
        delta, self.sent = args[self.sent:], max(self.sent, len(args))
        if delta:
            out.append(("call", {"index": 0, "function": {"arguments": delta}}))
        return out

    def arguments(self, text: str) -> str:
        body = text.rstrip()[self.start:]
        return body[:-1] if body.endswith("}") else body


def read_reply(text: str, names: list[str]) -> tuple[str | None, list[dict]]:
    """A whole reply -> (content, tool_calls in OpenAI's shape)."""
    r = ToolCallReader(names)
    r.feed(text, final=True)
    if r.kind != "call":
        return text, []
    return None, [{"id": r.id, "type": "function", "function": {"name": r.name, "arguments": r.arguments(text)}}]
