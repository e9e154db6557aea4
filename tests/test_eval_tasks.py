"""Task YAMLs, the registry, the runner on local fixtures, and the bad-input errors."""

import json

import pytest
from eval_fixtures import FIXTURES, REPO, tiny_model, tiny_tokenizer

from memlm.data.errors import DataError
from memlm.evaluation import TaskError, TaskSpec, evaluate, format_table, known_tasks, resolve_task, resolve_tasks
from memlm.evaluation.runner import _cloze_rows, _context, load_rows
from memlm.evaluation.tasks import registry


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


def test_every_shipped_task_yaml_parses():
    names = known_tasks()
    for want in ("triviaqa", "nq_open", "simpleqa", "worldfacts", "worldfacts_heldout", "worldfacts_cloze",
                 "heldout_ppl"):  # fmt: skip
        assert want in names
    for name, path in registry().items():
        spec = resolve_task(name)
        assert spec.name == name == path.stem
        assert spec.primary_metric in spec.metrics
    for f in sorted((REPO / "eval" / "tasks" / "examples").glob("*.yaml")):
        spec = resolve_task(str(f))
        assert (REPO / "eval" / "tasks" / "examples" / spec.path.split("/")[-1]).is_file()


def test_unknown_task_lists_known_ones():
    with pytest.raises(TaskError) as e:
        resolve_tasks("triviaqa,not_a_task")
    assert "not_a_task" in str(e.value) and "triviaqa" in str(e.value) and "nq_open" in str(e.value)


def test_task_yaml_missing_field_and_unknown_key():
    with pytest.raises(TaskError, match=r"task_missing_field.yaml: missing required field\(s\) \['dataset'\]"):
        resolve_task(str(FIXTURES / "task_missing_field.yaml"))
    with pytest.raises(TaskError, match="max_new_token"):
        resolve_task(str(FIXTURES / "task_unknown_key.yaml"))
    with pytest.raises(TaskError, match="metrics"):
        resolve_task({"name": "x", "type": "generate", "dataset": "triviaqa", "metrics": ["acc"]})
    with pytest.raises(TaskError, match="given twice"):
        resolve_tasks(["triviaqa", "triviaqa"])


def test_relative_path_and_shorthands():
    spec = resolve_task(str(FIXTURES / "task_local.yaml"))
    assert spec.path == str(FIXTURES / "qa.jsonl")
    assert resolve_task(f"qa:{FIXTURES / 'qa.jsonl'}").type == "generate"
    assert resolve_task(str(FIXTURES / "qa.jsonl")).dataset == "qa_jsonl"
    assert resolve_task(f"mc:{FIXTURES / 'mc.jsonl'}").type == "multiple_choice"
    assert resolve_task(f"ppl:{FIXTURES / 'heldout.txt'}").dataset == "text"
    with pytest.raises(TaskError, match="not found"):
        resolve_task("qa:/nonexistent/file.jsonl")


def test_qa_rows_without_answers_raise():
    spec = resolve_task(f"qa:{FIXTURES / 'qa_no_answers.jsonl'}")
    with pytest.raises(DataError, match=r"qa_no_answers.jsonl:2: .*answers"):
        load_rows(spec, None, None, {})


def test_prompts_with_few_shot_examples():
    spec = TaskSpec(name="t", type="generate", dataset="qa_jsonl", template="Q: {question}\nA:", question_mark=True,
                    description="Answer these questions:\n\n")  # fmt: skip
    shots = [{"id": "1", "question": "who is it", "answers": ["me", "I"]}]
    row = {"id": "2", "question": "Where is it?", "answers": ["here"]}
    assert _context(spec, row, shots) == "Answer these questions:\n\nQ: who is it?\nA: me\n\nQ: Where is it?\nA:"


def test_evaluate_on_local_tasks(model, tok):
    tasks = [str(FIXTURES / "task_local.yaml"), f"mc:{FIXTURES / 'mc.jsonl'}", f"ppl:{FIXTURES / 'heldout.txt'}"]
    res = evaluate(model, tok, tasks, shots=2, batch_size=4, predictions=True, progress=False)
    qa, mc, ppl = res["tasks"]["fixture_qa"], res["tasks"]["mc"], res["tasks"]["heldout"]
    assert qa["n"] == 6 and set(qa["metrics"]) >= {"exact_match", "f1", "f1_stderr"}
    assert qa["source"].startswith("local ") and qa["primary_metric"] == "f1"
    p = qa["predictions"][0]
    assert p["prompt"].count("Question:") == 3 and p["prompt"].endswith("Answer:")  # 2 shots + the question
    assert mc["n"] == 3 and 0 <= mc["metrics"]["acc"] <= 1 and len(mc["predictions"][0]["logliks"]) == 3
    assert ppl["n"] == 3 and ppl["metrics"]["bits_per_byte"] > 0 and ppl["shots"] == 0
    assert ppl["metrics"]["byte_perplexity"] == pytest.approx(2 ** ppl["metrics"]["bits_per_byte"])
    json.dumps(res)  # JSON-able
    table = format_table(res)
    assert "| fixture_qa | f1 |" in table and "| heldout | bits_per_byte |" in table
    limited = evaluate(model, tok, [f"qa:{FIXTURES / 'qa.jsonl'}"], limit=2, progress=False)
    assert limited["tasks"]["qa"]["n"] == 2


def test_worldfacts_cloze_rows(monkeypatch):
    from memlm.data import facts

    fake = [
        facts.Fact("c/FR/capital", "France", "capital", "What is the capital of France?", ("Paris",),
                   ("Paris is the capital city of France.", "The capital of France is Paris.")),
        facts.Fact("x/none", "X", "r", "?", ("zzz",), ("No answer here.",)),
    ]  # fmt: skip
    monkeypatch.setattr(facts, "worldfacts", lambda split, **kw: fake)
    rows = _cloze_rows("pretrain", {})
    assert rows == [{"id": "c/FR/capital", "prompt": "The capital of France is",
                     "question": "What is the capital of France?", "answers": ["Paris"]}]  # fmt: skip
