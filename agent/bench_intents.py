"""Intent benchmark: parse every intent of a labelled set and score every field of the spec.

A set is a YAML list of {text, expect: {field: value}, held_out: bool}. Every field of SCORED is scored
for every intent: a field the label leaves out (or gives as null) is expected unset, so a guessed value is
wrong and an unset one right. Printed per field: accuracy, precision (of the values the parser set, how
many are right) and recall (of the values the label sets, how many the parser got). Figures are given per
set and over all sets, for the embedded default and, when CONTINUO_LLM_BASE_URL is set, that endpoint too.

Two kinds of set live beside each scenario: intent-set.yaml (the development set: tune on it; misses are
printed) and intent-final.yaml (the untouched final set: `--final` scores it, printing aggregate figures
only, never its texts). With as_json the last line is one JSON object.

    python -m agent.bench_intents [--final] [--rules-only] [--json]   # every scenario that has a set
    python -m agent.bench_intents CLUSTER POLICY SET                  # one set
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

from .grounding import FIELDS
from .intent_parser import parse_intent

ROOT = Path(__file__).resolve().parent.parent
# the spec's fields every label is scored on; concurrency is scored only where a label names it (traffic
# is rarely in an intent's words, and counting it everywhere would pad the figure with easy nulls)
SCORED = tuple(f for f in FIELDS if f != "concurrency")
DEV_SET, FINAL_SET = "intent-set.yaml", "intent-final.yaml"


def load_set(path: str | Path) -> list[dict]:
    """A labelled intent set; errors name the file and entry."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, list):
        raise InputError("an intent set is a YAML list of {text, expect}", file=str(path))
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or \
                not isinstance(item.get("expect"), dict):
            raise InputError(f"entry {i}: needs 'text' (string) and 'expect' (mapping)", file=str(path))
        bad = sorted(set(item["expect"]) - set(FIELDS))
        if bad:
            raise InputError(f"entry {i}: expect names {', '.join(bad)}, not fields of an intent "
                             f"({', '.join(FIELDS)})", file=str(path))
    return data


def _unset(v: Any) -> bool:
    return v in (None, [], ())


def same(expected: Any, got: Any) -> bool:
    """Field equality for scoring: lists as sets, numbers as floats, empty == null."""
    if _unset(expected) or _unset(got):
        return _unset(expected) and _unset(got)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return sorted(map(str, expected)) == sorted(map(str, got))
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        return float(expected) == float(got)
    return str(expected) == str(got)


def score_fields(expect: dict, got: dict, fields=SCORED) -> dict[str, tuple[bool, bool, bool]]:
    """field -> (right, the parser set it, the label sets it) for every scored field."""
    out = {}
    for f in dict.fromkeys(list(fields) + list(expect)):
        e, g = expect.get(f), got.get(f)
        out[f] = (same(e, g), not _unset(g), not _unset(e))
    return out


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _figures(rows: list[dict], key: str) -> tuple[float | None, dict[str, dict], int]:
    per: dict[str, list[tuple[bool, bool, bool]]] = {}
    for r in rows:
        for f, t in r[key].items():
            per.setdefault(f, []).append(t)
    flat = [t for ts in per.values() for t in ts]
    out = {}
    for f, ts in sorted(per.items()):
        out[f] = {"accuracy": _ratio(sum(t[0] for t in ts), len(ts)),
                  "precision": _ratio(sum(t[0] and t[1] for t in ts), sum(t[1] for t in ts)),
                  "recall": _ratio(sum(t[0] and t[2] for t in ts), sum(t[2] for t in ts)),
                  "n": len(ts)}
    return _ratio(sum(t[0] for t in flat), len(flat)), out, len(flat)


def summary(rows: list[dict], use_llm: bool = True) -> dict:
    """Field accuracy overall and per field (with precision and recall), for merged/rules/LLM values."""
    acc, per, n = _figures(rows, "ok")
    held = [r for r in rows if r["held_out"]]
    return {
        "intents": len(rows), "fields_scored": n, "field_accuracy": acc,
        "per_field": {f: v["accuracy"] for f, v in per.items()},
        "precision": {f: v["precision"] for f, v in per.items()},
        "recall": {f: v["recall"] for f, v in per.items()},
        "held_out_intents": len(held), "held_out_field_accuracy": _figures(held, "ok")[0] if held else None,
        "rules_only_field_accuracy": _figures(rows, "rules_ok")[0],
        "llm_only_field_accuracy": _figures(rows, "llm_ok")[0] if use_llm else None,
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
            "ok": score_fields(exp, p.values),
            "rules_ok": score_fields(exp, p.rule_values),
            "llm_ok": score_fields(exp, p.llm_values or {}),
            "got": {f: p.values.get(f) for f in SCORED}, "expect": exp, "questions": p.questions,
        })
    return summary(rows, use_llm) | {"rows": rows}


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.1%}"


def _print(name: str, res: dict, verbose: bool = True) -> None:
    print(f"== {name}: {res['intents']} intents, {res['fields_scored']} fields scored")
    print(f"   {'field':<24} {'acc':>6} {'prec':>6} {'recall':>6}")
    for f, v in res["per_field"].items():
        print(f"   {f:<24} {_pct(v)} {_pct(res['precision'][f])} {_pct(res['recall'][f])}")
    print(f"   field accuracy           {_pct(res['field_accuracy'])}" +
          (f"   (held-out: {res['held_out_field_accuracy']:.1%} on {res['held_out_intents']} intents)"
           if res["held_out_field_accuracy"] is not None else ""))
    print(f"   rules alone {_pct(res['rules_only_field_accuracy']).strip()}"
          + (f", LLM alone {_pct(res['llm_only_field_accuracy']).strip()}"
             if res["llm_only_field_accuracy"] is not None else ""))
    print(f"   seconds per intent p50   {res['sec_per_intent_p50']:.3f}")
    if verbose:
        for r in res["rows"]:
            bad = {f: (r["expect"].get(f), r["got"].get(f)) for f, t in r["ok"].items() if not t[0]}
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


def run(cluster_path, policy_path, intents_path, as_json: bool = False, llm=None, use_llm: bool = True,
        verbose: bool = True) -> dict:
    """Benchmark one labelled set; prints the figures and returns them (the first backend's at top level).

    verbose=False prints no per-intent line (the final sets: their texts are never shown)."""
    cluster, policy = load_cluster(cluster_path), load_policy(policy_path)
    intents = load_set(intents_path)
    results = []
    for name, model in (_backends(llm) if use_llm else [("rules only", None)]):
        res = evaluate(cluster, policy, intents, llm=model, use_llm=use_llm)
        res["backend"] = name
        results.append(res)
        if not as_json:
            _print(f"{Path(intents_path)} with {name}", res, verbose=verbose)
    top = {k: v for k, v in results[0].items() if k != "rows"}
    top["others"] = [{k: v for k, v in r.items() if k != "rows"} for r in results[1:]]
    if as_json:
        print(json.dumps(top))
    return top | {"rows": results[0]["rows"]}


def scenario_sets(final: bool = False) -> list[Path]:
    """The scenario folders that have a development (or, with final, a final) set."""
    name = FINAL_SET if final else DEV_SET
    return [d for d in sorted((ROOT / "scenarios").iterdir()) if (d / name).exists()]


def run_all(as_json: bool = False, llm=None, use_llm: bool = True, final: bool = False) -> dict:
    """Every scenario with a set (dev or final), the figures per set, then over all of them together."""
    import contextlib
    import io
    name = FINAL_SET if final else DEV_SET
    rows, per_scenario = [], {}
    for d in scenario_sets(final):
        args = (d / "cluster.yaml", d / "policy.yaml", d / name)
        if as_json:
            with contextlib.redirect_stdout(io.StringIO()):
                res = run(*args, as_json=True, llm=llm, use_llm=use_llm)
        else:
            res = run(*args, llm=llm, use_llm=use_llm, verbose=not final)
        per_scenario[d.name] = {k: v for k, v in res.items() if k not in ("rows", "others")}
        rows += res["rows"]
    total = summary(rows, use_llm) | {"scenarios": per_scenario, "set": name}
    if as_json:
        print(json.dumps(total))
    else:
        _print(f"all scenarios ({name})", total | {"rows": rows}, verbose=False)
        print("   per set: " + ", ".join(f"{k} {_pct(v['field_accuracy']).strip()}"
                                          for k, v in per_scenario.items()))
    return total


if __name__ == "__main__":
    args = sys.argv[1:]
    flags = {a for a in args if a.startswith("--")}
    paths = [a for a in args if not a.startswith("--")]
    kw = dict(as_json="--json" in flags, use_llm="--rules-only" not in flags)
    if len(paths) == 3:
        run(*paths, **kw)
    else:
        run_all(final="--final" in flags, **kw)
