"""Intent files: Markdown with optional YAML front matter; errors name file and line."""
import pytest

from agent.intent_file import load_intent_file, parse_intent_text
from policies import InputError


def write(tmp_path, text):
    p = tmp_path / "intent.md"
    p.write_text(text)
    return p


def test_front_matter_and_body(tmp_path):
    f = load_intent_file(write(tmp_path, "---\ncluster: c.yaml\npolicy: p.yaml\nservice: triage\nmode: suggest\n"
                                         "---\n\nKeep patient data in the EU.\n\nTTFT under 300 ms.\n"))
    assert f.front == {"cluster": "c.yaml", "policy": "p.yaml", "service": "triage", "mode": "suggest"}
    assert f.body == "Keep patient data in the EU.\n\nTTFT under 300 ms."
    assert f.resolve("cluster") == tmp_path / "c.yaml" and f.resolve("model") is None


def test_no_front_matter(tmp_path):
    f = load_intent_file(write(tmp_path, "# Triage\nPatient data, EU only.\n"))
    assert f.front == {} and f.body.startswith("# Triage")


@pytest.mark.parametrize("text,line,words", [
    ("---\ncluster: a.yaml\nPatient data.\n", 1, "never closed"),
    ("---\ncluster: a.yaml\npolicy: [unclosed\n---\nPatient data.\n", 3, "not valid YAML"),
    ("---\ncluster: a.yaml\nfoo: 1\n---\nPatient data.\n", 3, "unknown key 'foo'"),
    ("---\nmode: yolo\n---\nPatient data.\n", 2, "mode 'yolo'"),
    ("---\n- a\n- b\n---\nPatient data.\n", 2, "must be a mapping"),
    ("---\nservice: triage\n---\n\n", 4, "intent is empty"),
    ("---\nservice: [a, b]\n---\nx\n", 2, "must be a string"),
])
def test_errors_name_file_and_line(tmp_path, text, line, words):
    p = write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_intent_file(p)
    assert e.value.line == line and e.value.file == str(p) and words in str(e.value)
    assert str(e.value).startswith(f"{p}:{line}")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_intent_file(tmp_path / "nope.md")


def test_parse_text_directly():
    assert parse_intent_text("---\n---\nhello") == ({}, "hello")
