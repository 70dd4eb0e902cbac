"""`continuo plan` / `validate`: tables, JSON, and exit codes 0 / 1 / 2."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
H = ROOT / "scenarios" / "hospital"


def run(*args):
    p = subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_plan_json_then_validate_it(tmp_path):
    out = tmp_path / "plan.yaml"
    code, stdout, _ = run("plan", "-c", H / "cluster.yaml", "-p", H / "policy.yaml",
                          "-i", H / "intents/phi-70b-split.yaml", "--json", "--out", out)
    assert code == 0
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert doc["ok"] and doc["report"]["violations"] == [] and doc["plan"]["stages"]
    code, stdout, _ = run("validate", out, "-c", H / "cluster.yaml", "-p", H / "policy.yaml")
    assert code == 0 and "0 violation" in stdout
    # Break it: put the LM head on an attested cloud node.
    plan = yaml.safe_load(out.read_text())
    plan["stages"][-1]["node"] = "fra-a100-1"
    out.write_text(yaml.safe_dump(plan))
    code, stdout, _ = run("validate", out, "-c", H / "cluster.yaml", "-p", H / "policy.yaml", "--json")
    assert code == 1
    rules = {v["rule"] for v in json.loads(stdout)["report"]["violations"]}
    assert "trusted-ends" in rules


def test_plan_table_and_infeasible_exit_1():
    code, stdout, _ = run("plan", "-c", H / "cluster.yaml", "-p", H / "policy.yaml", "-i", H / "intents/phi-latency.yaml")
    assert code == 0 and "Placement plan" in stdout and "0 violation" in stdout
    s = ROOT / "scenarios" / "serverless"
    code, stdout, _ = run("plan", "-c", s / "cluster.yaml", "-p", s / "policy.yaml", "-i", s / "intents/pii-70b-infeasible.yaml")
    assert code == 1 and "No valid plan" in stdout and "GB" in stdout


def test_bad_input_exit_2_names_file_line_field(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text((H / "cluster.yaml").read_text().replace("gpu: RTX4090", "gpu: RTX9090"))
    code, _, stderr = run("plan", "-c", bad, "-p", H / "policy.yaml", "-i", H / "intents/phi-latency.yaml")
    assert code == 2
    assert f"{bad}:7" in stderr and "nodes[2].gpu" in stderr and "RTX9090" in stderr
    code, _, stderr = run("validate", tmp_path / "missing.yaml", "-c", H / "cluster.yaml", "-p", H / "policy.yaml")
    assert code == 2 and "cannot read" in stderr
    code, _, stderr = run("plan", "--bogus")
    assert code == 2
