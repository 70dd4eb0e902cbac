"""Intent benchmark: parse every intent of a labelled set and score the fields it names.

A set is a YAML list of {text, expect: {field: value}, held_out: bool}; only the fields in `expect` are
scored and null means the intent does not set that field. Prints field accuracy per field and overall
(and on the held-out intents alone), seconds per intent p50, for the embedded default and, when
CONTINUO_LLM_BASE_URL is set, for that endpoint too. With as_json the last line is one JSON object.

    python -m agent.bench_intents            # all scenarios that have an intent-set.yaml
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from policies import load_cluster, load_policy
from policies.loading import InputError

from .intent_parser import parse_intent

ROOT = Path(__file__).resolve().parent.parent


def load_set(path: str | Path) -> list[dict]:
    """A labelled intent set; errors name the file and entry."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, list):
        raise InputError("an intent set is a YAML list of {text, expect}", file=str(path))
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or \
                not isinstance(item.get("expect"), dict):
            raise InputError(f"entry {i}: needs 'text' (string) and 'expect' (mapping)", file=str(path))
    return data


def same(expected: Any, got: Any) -> bool:
    """Field equality for scoring: lists as sets, numbers as floats, empty == null."""
    if expected in (None, [], ()) or got in (None, [], ()):
        return expected in (None, [], ()) and got in (None, [], ())
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return sorted(map(str, expected)) == sorted(map(str, got))
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return float(expected) == float(got)
    return str(expected) == str(got)


def _score(items: list[dict], key: str) -> tuple[float, dict[str, float], int]:
    per: dict[str, list[bool]] = {}
    for it in items:
        for f, ok in it[key].items():
            per.setdefault(f, []).append(ok)
    flat = [ok for oks in per.values() for ok in oks]
    return (sum(flat) / len(flat) if flat else 0.0), {f: sum(v) / len(v) for f, v in sorted(per.items())}, len(flat)


def summary(rows: list[dict], use_llm: bool = True) -> dict:
    """Field accuracy overall, per field, on the held-out and tuned intents, for merged/rules/LLM values."""
    acc, per, n = _score(rows, "ok")
    held = [r for r in rows if r["held_out"]]
    tuned = [r for r in rows if not r["held_out"]]
    return {
        "intents": len(rows), "fields_scored": n, "field_accuracy": round(acc, 4),
        "per_field": {k: round(v, 4) for k, v in per.items()},
        "held_out_intents": len(held), "held_out_field_accuracy": round(_score(held, "ok")[0], 4) if held else None,
        "tuned_field_accuracy": round(_score(tuned, "ok")[0], 4) if tuned else None,
        "rules_only_field_accuracy": round(_score(rows, "rules_ok")[0], 4),
        "llm_only_field_accuracy": round(_score(rows, "llm_ok")[0], 4) if use_llm else None,
        "sec_per_intent_p50": round(statistics.median(r["seconds"] for r in rows), 3) if rows else None,
    }


def evaluate(cluster, policy, intents: list[dict], llm=None, use_llm: bool = True) -> dict:
    """Parse and score every intent; per-intent detail plus figures for the merged, rules and LLM values."""
    rows = []
    for item in intents:
        p = parse_intent(item["text"], cluster, policy, llm=llm, use_llm=use_llm)
        exp = item["expect"]
        rows.append({
            "text": item["text"], "held_out": bool(item.get("held_out")), "seconds": p.seconds,
            "ok": {f: same(v, p.values.get(f)) for f, v in exp.items()},
            "rules_ok": {f: same(v, p.rule_values.get(f)) for f, v in exp.items()},
            "llm_ok": {f: same(v, (p.llm_values or {}).get(f)) for f, v in exp.items()},
            "got": {f: p.values.get(f) for f in exp}, "expect": exp, "questions": p.questions,
        })
    return summary(rows, use_llm) | {"rows": rows}


def _print(name: str, res: dict, verbose: bool = True) -> None:
    print(f"== {name}: {res['intents']} intents, {res['fields_scored']} fields scored")
    for f, v in res["per_field"].items():
        print(f"   {f:<24} {v:6.1%}")
    print(f"   field accuracy           {res['field_accuracy']:6.1%}   (held-out: "
          + (f"{res['held_out_field_accuracy']:.1%} on {res['held_out_intents']} intents)"
             if res["held_out_field_accuracy"] is not None else "none)"))
    print(f"   rules alone {res['rules_only_field_accuracy']:.1%}"
          + (f", LLM alone {res['llm_only_field_accuracy']:.1%}" if res["llm_only_field_accuracy"] is not None else ""))
    print(f"   seconds per intent p50   {res['sec_per_intent_p50']:.3f}")
    if verbose:
        for r in res["rows"]:
            bad = {f: (r["expect"][f], r["got"][f]) for f, ok in r["ok"].items() if not ok}
            if bad:
                tag = " [held-out]" if r["held_out"] else ""
                print(f"   miss{tag}: {r['text'][:70]!r}: " +
                      "; ".join(f"{f} expected {e!r} got {g!r}" for f, (e, g) in bad.items()))


def _backends(llm) -> list[tuple[str, Any]]:
    from .llm import EmbeddedChatModel, describe, get_llm
    if llm is not None:
        return [(describe(llm), llm)]
    out = [(describe(m := EmbeddedChatModel()), m)]
    if os.environ.get("CONTINUO_LLM_BASE_URL"):
        ep = get_llm()
        out.append((describe(ep), ep))
    return out


def run(cluster_path, policy_path, intents_path, as_json: bool = False, llm=None, use_llm: bool = True) -> dict:
    """Benchmark one labelled set; prints the figures and returns them (the first backend's at top level)."""
    cluster, policy = load_cluster(cluster_path), load_policy(policy_path)
    intents = load_set(intents_path)
    results = []
    for name, model in (_backends(llm) if use_llm else [("rules only", None)]):
        res = evaluate(cluster, policy, intents, llm=model, use_llm=use_llm)
        res["backend"] = name
        results.append(res)
        if not as_json:
            _print(f"{Path(intents_path)} with {name}", res)
    top = {k: v for k, v in results[0].items() if k != "rows"}
    top["others"] = [{k: v for k, v in r.items() if k != "rows"} for r in results[1:]]
    if as_json:
        print(json.dumps(top))
    return top | {"rows": results[0]["rows"]}


def run_all(as_json: bool = False, llm=None, use_llm: bool = True) -> dict:
    """Every scenario with an intent-set.yaml, then the figures over all of them together."""
    rows, per_scenario = [], {}
    for d in sorted((ROOT / "scenarios").iterdir()):
        if (d / "intent-set.yaml").exists():
            res = run(d / "cluster.yaml", d / "policy.yaml", d / "intent-set.yaml", as_json=False, llm=llm,
                      use_llm=use_llm) if not as_json else _quiet(d, llm, use_llm)
            per_scenario[d.name] = {k: v for k, v in res.items() if k not in ("rows", "others")}
            rows += res["rows"]
    total = summary(rows, use_llm) | {"scenarios": per_scenario}
    if as_json:
        print(json.dumps(total))
    else:
        _print("all scenarios", total | {"rows": rows}, verbose=False)
    return total


def _quiet(d: Path, llm, use_llm):
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return run(d / "cluster.yaml", d / "policy.yaml", d / "intent-set.yaml", as_json=True, llm=llm,
                   use_llm=use_llm)


if __name__ == "__main__":
    args = sys.argv[1:]
    flags = {a for a in args if a.startswith("--")}
    paths = [a for a in args if not a.startswith("--")]
    kw = dict(as_json="--json" in flags, use_llm="--rules-only" not in flags)
    if len(paths) == 3:
        run(*paths, **kw)
    else:
        run_all(**kw)
