"""The journal: hash chain, tamper detection, concurrent appends, truncated lines, --since."""
import json
import multiprocessing as mp

import pytest

from agent.journal import Journal, JournalError, entry_hash, parse_since


def _filled(tmp_path, n=5):
    j = Journal(tmp_path / "j.jsonl")
    for i in range(n):
        j.append("decision", {"i": i, "reason": f"step {i}"})
    return j


def test_append_chains_entries(tmp_path):
    j = _filled(tmp_path, 3)
    es = j.entries()
    assert [e["seq"] for e in es] == [0, 1, 2]
    assert es[0]["prev"] == "" and es[1]["prev"] == es[0]["hash"] and es[2]["prev"] == es[1]["hash"]
    assert all(entry_hash(e) == e["hash"] for e in es)
    r = j.verify()
    assert r.ok and r.entries == 3 and r.bad_seq is None


def test_default_path_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUO_JOURNAL", str(tmp_path / "x.jsonl"))
    Journal().append("intent", {"text": "hi"})
    assert (tmp_path / "x.jsonl").exists()


def _rewrite(path, fn):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(fn(lines)))


def test_verify_finds_an_edited_line(tmp_path):
    j = _filled(tmp_path)
    def edit(lines):
        e = json.loads(lines[2])
        e["data"]["reason"] = "nothing to see here"
        lines[2] = json.dumps(e) + "\n"
        return lines
    _rewrite(j.path, edit)
    r = j.verify()
    assert not r.ok and r.bad_seq == 2 and r.bad_line == 3 and "edited" in r.reason


def test_verify_finds_an_edit_that_also_fixed_its_own_hash(tmp_path):
    j = _filled(tmp_path)
    def edit(lines):
        e = json.loads(lines[1])
        e["data"]["i"] = 99
        e["hash"] = entry_hash(e)        # a careful forger recomputes this line's hash ...
        lines[1] = json.dumps(e) + "\n"
        return lines
    _rewrite(j.path, edit)
    r = j.verify()                       # ... but the next line's prev still names the old one
    assert not r.ok and r.bad_seq == 2


def test_verify_finds_removed_and_reordered_lines(tmp_path):
    j = _filled(tmp_path)
    _rewrite(j.path, lambda ls: ls[:2] + ls[3:])
    r = j.verify()
    assert not r.ok and r.bad_line == 3 and "seq 2 was expected" in r.reason
    j2 = _filled(tmp_path / "b")
    _rewrite(j2.path, lambda ls: [ls[0], ls[2], ls[1]] + ls[3:])
    r2 = j2.verify()
    assert not r2.ok and r2.bad_line == 2


def test_truncated_last_line_is_reported_and_blocks_appends(tmp_path):
    j = _filled(tmp_path, 3)
    text = j.path.read_text()
    j.path.write_text(text[:-20])        # a writer killed mid-line
    r = j.verify()
    assert not r.ok and r.bad_line == 3 and "truncated" in r.reason
    with pytest.raises(JournalError, match=r"j.jsonl:3: the last line is truncated"):
        j.append("decision", {})
    with pytest.raises(JournalError, match="truncated"):
        j.entries()
    assert j.path.read_text() == text[:-20]   # nothing written after the damage


def test_garbage_line_names_file_and_line(tmp_path):
    j = _filled(tmp_path, 2)
    with open(j.path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(JournalError, match=r"j.jsonl:3: not a JSON line"):
        j.entries()
    assert not j.verify().ok


def test_bad_input_is_refused_before_writing(tmp_path):
    j = _filled(tmp_path, 1)
    with pytest.raises(TypeError, match="cannot store"):
        j.append("decision", {"x": object()})
    with pytest.raises(ValueError, match="kind"):
        j.append("", {})
    assert len(j.entries()) == 1 and j.verify().ok


def _writer(path, who, n):
    j = Journal(path)
    for i in range(n):
        j.append("decision", {"who": who, "i": i})


def test_concurrent_appends_from_two_processes_keep_the_chain(tmp_path):
    path = tmp_path / "j.jsonl"
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_writer, args=(path, w, 40)) for w in ("a", "b")]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
    assert all(p.exitcode == 0 for p in ps)
    j = Journal(path)
    r = j.verify()
    assert r.ok and r.entries == 80, r.reason
    assert sorted(e["data"]["i"] for e in j.entries() if e["data"]["who"] == "a") == list(range(40))


def test_entries_filters_by_time_and_kind(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    a = j.append("intent", {"t": 1})
    j.append("decision", {"t": 2})
    c = j.append("apply", {"t": 3})
    assert [e["seq"] for e in j.entries(kinds={"apply", "intent"})] == [a["seq"], c["seq"]]
    assert [e["seq"] for e in j.entries(since=c["ts"])] == [c["seq"]]


def test_parse_since():
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("90s", now=100.0) == 10.0
    assert parse_since("2026-12-02T14:02:00Z") == parse_since("2026-12-02T14:02")
    with pytest.raises(ValueError, match="--since 'yesterday'"):
        parse_since("yesterday")


# -- the CLI and human applies --------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from tiny_service import run_cli  # noqa: E402

S = Path(__file__).resolve().parent.parent / "scenarios" / "local"


def test_cli_reads_and_verifies_and_names_the_edited_entry(capsys, monkeypatch, tmp_path):
    j = _filled(tmp_path)
    monkeypatch.setenv("CONTINUO_JOURNAL", str(j.path))
    rc, out, _ = run_cli(capsys, monkeypatch, "journal", "--json")
    assert rc == 0 and [json.loads(x)["seq"] for x in out.splitlines()] == [0, 1, 2, 3, 4]
    rc, out, _ = run_cli(capsys, monkeypatch, "journal", "--since", "1h")
    assert rc == 0 and "step 4" in out
    rc, out, _ = run_cli(capsys, monkeypatch, "journal", "--since", "2099-01-01T00:00")
    assert rc == 0 and "no entries" in out
    rc, out, _ = run_cli(capsys, monkeypatch, "journal", "verify")
    assert rc == 0 and "5 entries" in out
    _rewrite(j.path, lambda ls: ls[:3] + [ls[3].replace("step 3", "step 33")] + ls[4:])
    rc, out, _ = run_cli(capsys, monkeypatch, "journal", "verify", "--json")
    body = json.loads(out)
    assert rc == 1 and body["bad_seq"] == 3 and body["bad_line"] == 4 and not body["ok"]
    rc, _, err = run_cli(capsys, monkeypatch, "journal", "--since", "last tuesday")
    assert rc == 2 and "--since" in err


def test_human_applies_and_rollback_go_into_the_journal(tmp_path):
    from agent import Agent
    from policies import approve, load_cluster, load_model_spec, load_plan, load_policy
    from tests.test_agent import PHI, RecordingExecutor

    cluster, policy = load_cluster(S / "cluster.yaml"), load_policy(S / "policy.yaml")
    ex = RecordingExecutor(approve(load_plan(S / "plan-2stage.yaml"), cluster, policy, None,
                                   load_model_spec("smollm2-135m")))
    j = Journal(tmp_path / "j.jsonl")
    a = Agent(cluster, policy, executor=ex, use_llm=False, mode="auto", journal=j)
    out = a.apply(PHI)
    assert out.applied
    a.rollback()
    kinds = [e["kind"] for e in j.entries()]
    assert kinds == ["intent", "plan", "validation", "apply", "rollback", "plan", "validation", "apply"]
    es = j.entries()
    assert es[0]["data"]["text"] == PHI and es[0]["data"]["spec"]["data_class"] == "phi"
    assert "edge-b" not in es[1]["data"]["nodes"] and es[1]["data"]["from"] == out.current.summary()
    assert es[2]["data"]["ok"] is True
    assert es[3]["data"]["status"] == "applied" and es[3]["data"]["reconfig"]["pause_ms"] == 1.5
    assert es[7]["data"]["status"] == "applied" and "edge-b" in es[5]["data"]["nodes"]
    assert j.verify().ok
    # a rejected plan is journalled too, with the validator's verdict
    bad = ex.plan.plan.model_copy(update={"stages": (ex.plan.plan.stages[0].model_copy(
        update={"node": "cloud-1", "last_layer": 29}),)})
    a.gate(bad, None)
    last = j.entries()[-2:]
    assert last[0]["kind"] == "validation" and last[0]["data"]["ok"] is False
    assert last[1]["data"]["status"] == "rejected" and "trusted-ends" in last[1]["data"]["message"]
