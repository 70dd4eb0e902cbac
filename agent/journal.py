"""The journal: an append-only, hash-chained log of what Continuo was asked, decided and did.

One JSON object per line. Each entry is ``{seq, ts, kind, data, prev, hash}`` where ``prev`` is
the hash of the entry before (``""`` for the first) and ``hash`` is
``sha256(prev + canonical_json(entry without "hash"))``. Editing, removing, inserting or
reordering a line breaks the chain, which ``verify()`` reports by the first bad ``seq``
(as a transparency log does: each line vouches for everything before it).

Two processes may append at once (the autopilot and a person's ``continuo apply``): an
exclusive ``fcntl`` lock is held from reading the last entry to writing the new one, so seq
numbers never repeat and the chain never forks.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# The kinds written today; other kinds are accepted (the log is data, not a schema), these are
# the ones the CLI and the chat know how to summarise.
KINDS = ("intent", "decision", "plan", "validation", "apply", "rollback", "autopilot")


class JournalError(Exception):
    """A journal file that cannot be read as a journal (names the file, line and what is wrong)."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int
    bad_seq: int | None = None
    bad_line: int | None = None
    reason: str = ""


def default_path() -> Path:
    """$CONTINUO_JOURNAL, else .continuo/journal.jsonl under the current directory."""
    return Path(os.environ.get("CONTINUO_JOURNAL") or Path(".continuo") / "journal.jsonl")


def canonical(obj: Any) -> str:
    """The one byte-exact JSON form hashes are taken over (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def _jsonable(o: Any) -> Any:
    # Plans, reports and dataclasses arrive inside decision data; store what they say.
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "__dataclass_fields__"):
        return {k: getattr(o, k) for k in o.__dataclass_fields__}
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"journal: cannot store a {type(o).__name__} ({o!r:.80})")


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256((body.get("prev", "") + canonical(body)).encode("utf-8")).hexdigest()


class Journal:
    """Append-only JSON lines, hash-chained; safe for appends from several processes."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()

    # -- writing ---------------------------------------------------------------------------
    def append(self, kind: str, data: dict) -> dict:
        """Append one entry and return it ({seq, ts, kind, data, prev, hash})."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"journal: kind must be a non-empty string, got {kind!r}")
        if not isinstance(data, dict):
            raise ValueError(f"journal: data of a {kind!r} entry must be a dict, got {type(data).__name__}")
        # Round-trip now, so an unstorable value fails here, before anything is written.
        data = json.loads(canonical(data))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                last = self._last_entry(f)
                entry = {"seq": (last["seq"] + 1) if last else 0, "ts": time.time(), "kind": kind,
                         "data": data, "prev": last["hash"] if last else ""}
                entry["hash"] = entry_hash(entry)
                f.seek(0, os.SEEK_END)
                f.write((canonical(entry) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return entry

    def _last_entry(self, f) -> dict | None:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return None
        # Read back from the end until a whole last line is in hand (entries can be large).
        chunk, data = 4096, b""
        pos = size
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
            if data.count(b"\n") >= 2 or pos == 0:
                break
            chunk *= 2
        if not data.endswith(b"\n"):
            # A writer died mid-line: appending after it would bury the damage; refuse instead.
            lineno = self._count_lines()
            raise JournalError(f"{self.path}:{lineno}: the last line is truncated (no newline at the end); "
                               f"run `continuo journal verify` and repair the file before appending")
        line = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise JournalError(f"{self.path}:{self._count_lines()}: the last line is not JSON ({e.msg})") from None

    def _count_lines(self) -> int:
        with open(self.path, "rb") as g:
            return sum(1 for _ in g)

    # -- reading ---------------------------------------------------------------------------
    def _lines(self) -> Iterator[tuple[int, str]]:
        if not self.path.exists():
            return
        with open(self.path, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                yield n, line

    def entries(self, since: float | None = None, kinds: set[str] | None = None) -> list[dict]:
        """All entries (optionally those at or after `since`, of the given kinds), oldest first."""
        out = []
        for n, line in self._lines():
            if not line.endswith("\n"):
                raise JournalError(f"{self.path}:{n}: the last line is truncated (no newline at the end)")
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise JournalError(f"{self.path}:{n}: not a JSON line ({err.msg} at column {err.colno})") from None
            if not isinstance(e, dict) or not {"seq", "ts", "kind", "data"} <= e.keys():
                raise JournalError(f"{self.path}:{n}: not a journal entry (needs seq, ts, kind, data)")
            if since is not None and e["ts"] < since:
                continue
            if kinds and e["kind"] not in kinds:
                continue
            out.append(e)
        return out

    def verify(self) -> VerifyResult:
        """Check the whole chain: seq runs 0, 1, 2, ...; each prev is the hash before; each hash is right."""
        prev, count = "", 0
        for n, line in self._lines():
            def bad(reason: str, seq: int | None) -> VerifyResult:
                return VerifyResult(False, count, seq, n, f"{self.path}:{n}: {reason}")
            if not line.endswith("\n"):
                return bad("the last line is truncated (no newline at the end: a write was cut short)", count)
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                return bad(f"not a JSON line ({err.msg} at column {err.colno})", count)
            if not isinstance(e, dict) or "hash" not in e:
                return bad("not a journal entry (no hash)", count)
            seq = e.get("seq")
            if seq != count:
                return bad(f"entry has seq {seq!r} where seq {count} was expected "
                           f"(a line was removed, inserted or reordered)", count)
            if e.get("prev") != prev:
                return bad(f"entry {seq}: prev does not match the hash of entry {count - 1} "
                           f"(a line before it was removed or replaced)", seq)
            if entry_hash(e) != e["hash"]:
                return bad(f"entry {seq}: hash does not match its content (the line was edited)", seq)
            prev, count = e["hash"], count + 1
        return VerifyResult(True, count, None, None, f"{count} entries, chain intact")


def parse_since(text: str, now: float | None = None) -> float:
    """A time bound for `continuo journal --since`: ISO time ('2026-12-02T14:02', UTC unless it
    says otherwise), or relative ('90s', '30m', '2h', '1d') back from now."""
    from datetime import datetime, timezone
    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t and t[-1] in units:
        try:
            return now - float(t[:-1]) * units[t[-1]]
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an ISO time (2026-12-02T14:02) "
                         f"or a relative time (90s, 30m, 2h, 1d)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
