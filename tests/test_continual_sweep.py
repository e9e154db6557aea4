"""The frontier sweep end to end at tiny size (2 methods x 2 points, resumed), its math on constructed numbers, and
bad input: one clear error, nothing written."""

import json
from pathlib import Path

import pytest
import yaml
from test_continual_script import env  # noqa: F401  (the module-scoped tiny export + fact file)

from memlm.continual import frontier, sweep


def _cfg(tmp: Path, env, methods=None) -> Path:  # noqa: F811
    spec = {
        "sweep": {"seeds": 1, "frontier_seeds": 2, "forgetting": "ppl_increase", "methods": methods or {
            "sparse_memory": {"grid": {"smf.top_t": [8, 16]}, "set": {"smf.df_unit": "sequence"}},
            "full": {"grid": {"optim.lr": [1.0e-4, 1.0e-3]}},
        }},
        "stream": {"dataset": str(env["facts"]), "stages": 1, "facts_per_stage": 3, "mode": "paraphrase",
                   "paraphrases": 4},
        "smf": {"background_batches": 4, "background_batch_size": 4},
        "eval": {"heldin_limit": 6, "ppl_docs": 3, "max_new_tokens": 4},
    }  # fmt: skip
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p


def _args(env, cfg: Path, out: Path, *extra):  # noqa: F811
    return ["--ckpt", str(env["ckpt"]), "--config", str(cfg), "--out_dir", str(out), "--name", "s", "--quiet", *extra]


def test_sweep_end_to_end_and_resume(env, tmp_path, capsys):  # noqa: F811
    cfg = _cfg(tmp_path, env)
    assert sweep.main(_args(env, cfg, tmp_path / "out", "--results", str(tmp_path / "res"))) == 0
    out = tmp_path / "out" / "s"
    rep = json.loads((out / "frontier.json").read_text())
    assert [(p["method"], p["label"]) for p in rep["points"]] == [
        ("sparse_memory", "top_t=8"),
        ("sparse_memory", "top_t=16"),
        ("full", "lr=0.0001"),
        ("full", "lr=0.001"),
    ]
    for p in rep["points"]:  # seed-0 frontier points got their second seed; the final frontier uses only those
        assert p["seeds"] in ([0], [0, 1])
        assert not p["frontier"] or p["seeds"] == [0, 1]
        assert 0 <= p["agg"]["learning_f1"]["mean"] <= 1
    assert any(p["seeds"] == [0, 1] for p in rep["points"] if p["method"] == "full")
    assert rep["matched"]["origin"] is not None and rep["matched"]["methods"] == ["full", "sparse_memory"]
    smf = next(p for p in rep["points"] if p["method"] == "sparse_memory")
    assert 0 < smf["agg"]["smf/selected"]["mean"] <= 8
    for f, r in sweep.RESULT_FILES.items():
        assert (out / f).is_file() and (tmp_path / "res" / r).is_file()
    assert "SMF diagnostics" in (out / "frontier.md").read_text()
    assert "Regenerate: `python -m memlm.continual.sweep" in (out / "frontier.md").read_text()
    runs = sorted(str(p.relative_to(out)) for p in out.glob("*/*/seed*/summary.json"))
    assert len(runs) == sum(len(p["seeds"]) for p in rep["points"])
    # resume: a second invocation reuses every finished run and runs nothing
    capsys.readouterr()
    assert sweep.main(_args(env, cfg, tmp_path / "out")) == 0
    assert json.loads((out / "frontier.json").read_text())["runs_this_invocation"] == 0
    # an unfinished run (killed: no summary.json) is rerun beside the old attempt, which is left untouched
    victim = out / "full" / "lr=0.001" / "seed0"
    (victim / "summary.json").rename(victim / "summary.json.killed")
    assert sweep.main(_args(env, cfg, tmp_path / "out")) == 0
    assert json.loads((out / "frontier.json").read_text())["runs_this_invocation"] == 1
    assert (victim / "summary.json.killed").is_file() and (victim.parent / "seed0.r2" / "summary.json").is_file()


@pytest.mark.parametrize("methods,needle", [
    ({}, "sweep.methods is empty"),
    ({"sparse_memory": {"grid": {}}}, "grid is empty"),
    ({"sparse_memory": {"grid": {"optim.lr": []}}}, "non-empty list"),
    ({"dense_ft": {"grid": {"optim.lr": [1.0]}}}, "unknown method 'dense_ft'"),
    ({"sparse_memory": {"grid": {"smf.top_t": [100000]}}}, "top_t"),
    ({"sparse_memory": {"grid": {"stream.paraphrases": [0]}}}, "stream.paraphrases"),
    ({"sparse_memory": {"grid": {"optim.lrr": [1.0]}}}, "lrr"),
])  # fmt: skip
def test_sweep_bad_input_writes_nothing(env, tmp_path, capsys, methods, needle):  # noqa: F811
    cfg = _cfg(tmp_path, env, methods=methods or None)
    if not methods:
        raw = yaml.safe_load(cfg.read_text())
        raw["sweep"]["methods"] = {}
        cfg.write_text(yaml.safe_dump(raw))
    assert sweep.main(_args(env, cfg, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_sweep_dense_base_refused_for_smf(env, tmp_path, capsys):  # noqa: F811
    from test_continual_script import _export

    dense = _export(tmp_path, "dense", memory=False)
    cfg = _cfg(tmp_path, env, methods={"sparse_memory": {"grid": {"smf.top_t": [8]}}})
    args = _args(env, cfg, tmp_path / "out")
    args[1] = str(dense)
    assert sweep.main(args) == 2
    assert "memory" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _pt(method, label, learn, forget, se=None):
    return {
        "method": method,
        "label": label,
        "agg": {"learning_f1": {"mean": learn, "se": None}, "forgetting_f1": {"mean": forget, "se": se}},
    }


def test_frontier_math_on_constructed_points():
    pts = [_pt("a", "1", 0.1, 0.05), _pt("a", "2", 0.3, 0.2, 0.02), _pt("a", "3", 0.2, 0.3), _pt("a", "4", 0.5, 0.4)]
    front = frontier.pareto(pts)
    assert [p["label"] for p in front] == ["1", "2", "4"]  # "3" learns less and forgets more than "2"
    assert frontier.forgetting_at(front, 0.2)[0] == pytest.approx(0.125)  # halfway between 1 and 2
    assert frontier.forgetting_at(front, 0.05)[0] == pytest.approx(0.05)
    assert frontier.forgetting_at(front, 0.6) == (None, None)
    # below the first frontier point the line starts at the base model (learning 0.02, forgetting 0 by definition)
    assert frontier.forgetting_at(front, 0.06, origin=0.02)[0] == pytest.approx(0.025)
    # the base model is a virtual competitor: a point that learns no more than it but forgets is never on the front
    assert [p["label"] for p in frontier.pareto(pts, origin=0.1)] == ["2", "4"]
    other = frontier.pareto([_pt("b", "x", 0.4, 0.1)])
    assert frontier.matched_level({"a": front, "b": other}) == pytest.approx(0.4)
    m, se, n = frontier.mean_se([0.1, 0.2, 0.3, None])
    assert n == 3 and m == pytest.approx(0.2) and se == pytest.approx(0.1 / 3**0.5)
    assert frontier.mean_se([0.5]) == (0.5, None, 1)


def test_seed_blocks_are_disjoint_after_the_answer_filter(env, tmp_path):  # noqa: F811
    from memlm.config import load_finetune_config
    from memlm.continual import stream

    base = {"stream": {"dataset": str(env["facts"]), "stages": 1, "facts_per_stage": 3, "max_answer_words": 1}}
    blocks = []
    for s in range(3):
        cfg = load_finetune_config(overrides=base)
        over = sweep.seed_overrides(cfg, s)
        cfg = load_finetune_config(overrides={**base, "stream": {**base["stream"], **over["stream"]}})
        facts = stream.load_facts(cfg.stream)
        assert all(len(f["answers"][0].split()) <= 1 for f in facts)
        blocks.append({f["id"] for f in facts})
    assert all(len(b) == 3 for b in blocks) and not (
        blocks[0] & blocks[1] or blocks[1] & blocks[2] or blocks[0] & blocks[2]
    )


def test_finished_run_with_other_settings_is_not_reused(env, tmp_path):  # noqa: F811
    from memlm.config import load_finetune_config, to_dict

    cfg = load_finetune_config(
        overrides={"method": "full", "optim": {"lr": 1e-4}, "out_dir": str(tmp_path), "name": "seed0"}
    )
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump({**to_dict(cfg), "ckpt": "x"}))
    assert sweep.finished(tmp_path, 0, cfg) == run / "summary.json"
    other = load_finetune_config(overrides={"method": "full", "optim": {"lr": 3e-4}})
    assert sweep.finished(tmp_path, 0, other) is None
