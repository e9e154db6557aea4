"""Memory-parallel value tables (``memlm/model/memory/parallel.py``): 2 CPU processes on gloo.

Lookup parity with one process (tolerance: 1e-6 absolute, fp32), every memory kind's loss and gradients, per-rank
bytes, SMF on a shard, and training through ``train.py``: 2-process ``--model.memory.parallel=dim`` == 1 process on
the same global batch (losses within 1e-4), saved at world size 2, resumed at 1 and exported.
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlm.config import ConfigError, MemoryConfig, ModelConfig
from memlm.model import MemLM
from memlm.model.memory import parallel
from memlm.model.memory.values import row_dot, shard_of, value_lookup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import assert_same_curve, run_train  # noqa: E402

WORLD = 2
T = 1800  # seconds per train.py run: generous, the CI box may be shared
# sharded vs one-process lookup, fp32: each column's sum is the same sum; the dots are split over ranks and their
# vectorized (reassociated) sums of ~8-sized terms round differently: a few ulps
ATOL = 4e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, port: int, out: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(fn(rank, *args), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, fn, *args) -> list:
    """Run ``fn(rank, *args)`` on 2 gloo processes; returns each rank's result."""
    mp.spawn(_worker, args=(fn, _free_port(), str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _shard(full: torch.Tensor, rank: int, blocks: int = 1) -> torch.nn.Parameter:
    spec = parallel.ShardSpec(None, rank, WORLD, full.shape[1], blocks)
    p = torch.nn.Parameter(parallel.local_columns(full.detach(), spec))
    p.memory_shard = spec
    return p


# ---------------------------------------------------------------------------------------------- lookup parity
def _lookup_case(rank: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n, d, k = 40, 16, 6
    table = torch.randn(n, d, generator=g)
    sizes = [9, 5]  # uneven token counts per rank
    idx = [torch.randint(0, n, (m, k), generator=g) for m in sizes]
    w = [torch.randn(m, k, generator=g) for m in sizes]
    x = [torch.randn(m, d, generator=g) for m in sizes]
    gout = [torch.randn(m, d, generator=g) for m in sizes]
    gdot = [torch.randn(m, k, generator=g) for m in sizes]
    res = {}
    for sparse in (False, True):
        # one process: the loss is the sum of both ranks' losses; DDP-style, the shard's gradient is its mean
        ref_t = table.clone().requires_grad_()
        ref_w = [t.clone().requires_grad_() for t in w]
        ref_x = [t.clone().requires_grad_() for t in x]
        loss = sum((value_lookup(ref_t, i, ww) * go).sum() for i, ww, go in zip(idx, ref_w, gout))
        loss = loss + sum((row_dot(ref_t, i, xx) * gd).sum() for i, xx, gd in zip(idx, ref_x, gdot))
        loss.backward()
        sh = _shard(table, rank)
        my_w, my_x = w[rank].clone().requires_grad_(), x[rank].clone().requires_grad_()
        out = value_lookup(sh, idx[rank], my_w, sparse=sparse)  # dispatches on the shard
        dots = row_dot(sh, idx[rank], my_x, sparse=sparse)
        ((out * gout[rank]).sum() + (dots * gdot[rank]).sum()).backward()
        grad = sh.grad.to_dense() if sparse else sh.grad
        spec = shard_of(sh)
        res[sparse] = {
            "out": (out - value_lookup(table, idx[rank], w[rank])).abs().max(),
            "dots": (dots - row_dot(table, idx[rank], x[rank])).abs().max(),
            "grad_table": (grad * WORLD - parallel.local_columns(ref_t.grad, spec)).abs().max(),
            "grad_w": (my_w.grad - ref_w[rank].grad).abs().max(),
            "grad_x": (my_x.grad - ref_x[rank].grad).abs().max(),
            "sparse": sh.grad.is_sparse,
        }
    # UltraMem with cores: the table read as (N * cores, D / cores); blocks = cores keeps the view a column shard
    cores = 2
    ref_t = table.clone().requires_grad_()
    view_idx = [i * cores + torch.arange(cores).repeat(k // cores) for i in idx]  # rows n * cores + c
    loss = sum((value_lookup(ref_t.view(n * cores, d // cores), i, ww) * go[:, : d // cores]).sum()
               for i, ww, go in zip(view_idx, w, gout))  # fmt: skip
    loss.backward()
    sh = _shard(table, rank, blocks=cores)
    out = value_lookup(sh.view(n * cores, sh.shape[1] // cores), view_idx[rank], w[rank])
    (out * gout[rank][:, : d // cores]).sum().backward()
    spec = shard_of(sh)
    res["cores"] = {
        "out": (out - value_lookup(table.view(n * cores, d // cores), view_idx[rank], w[rank])).abs().max(),
        "grad_table": (sh.grad * WORLD - parallel.local_columns(ref_t.grad, spec)).abs().max(),
        "gather": torch.equal(parallel.gather_full(sh, spec), table),
    }
    return res


def test_sharded_lookup_matches_single_process(tmp_path):
    for rank, res in enumerate(run_ranks(tmp_path, _lookup_case)):
        for case, r in res.items():
            for key, v in r.items():
                if key == "sparse":
                    assert v == case, (rank, case)
                elif key == "gather":
                    assert v, (rank, case)
                else:
                    assert float(v.detach()) < ATOL, (rank, case, key, float(v.detach()))


# ---------------------------------------------------------------------------------------------- every memory kind
KINDS = {
    "pkm": dict(kind="pkm"),
    "memory_plus": dict(kind="memory_plus"),
    "ultramem": dict(kind="ultramem", cores=2, expansion=2),
    "ultramem_v2": dict(kind="ultramem_v2", layers=[0, 1], pre_dim=8),
    "peer": dict(kind="peer"),
}


def _cfg(mem: dict) -> ModelConfig:
    m = dict(layers=[1], n_keys=8, heads=2, knn=4, k_dim=16, parallel="dim")
    m.update(mem)
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, memory=MemoryConfig(**m))


def _kinds_case(rank: int) -> dict:
    out = {}
    for name, mem in KINDS.items():
        torch.manual_seed(0)
        ref = MemLM(_cfg(mem))
        model = MemLM(_cfg(mem))
        model.load_state_dict(ref.state_dict())
        g = torch.Generator().manual_seed(1)
        xs = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(WORLD)]
        ys = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(WORLD)]
        # one process: rank r's loss alone (dense grads, as DDP sees them before averaging) and the mean loss (tables)
        ref.zero_grad()
        ref(xs[rank], ys[rank])[1].backward()
        dense_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        ref.zero_grad()
        (sum(ref(x, y)[1] for x, y in zip(xs, ys)) / WORLD).backward()
        tables_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
        ref_loss = float(ref(xs[rank], ys[rank])[1].detach())
        n_sharded = parallel.shard_model(model)
        loss = model(xs[rank], ys[rank])[1]
        loss.backward()
        err = 0.0
        for n, p in model.named_parameters():
            spec = shard_of(p)
            want = parallel.local_columns(tables_ref[n], spec) if spec else dense_ref.get(n)
            if want is None:
                assert p.grad is None or not p.grad.any(), n
                continue
            err = max(err, float((p.grad - want).abs().max()))
        out[name] = {"loss": abs(float(loss.detach()) - ref_loss), "grad": err, "sharded": n_sharded,
                     "tables": len(model.value_tables())}  # fmt: skip
    return out


def test_every_memory_kind_shards_and_matches(tmp_path):
    for rank, res in enumerate(run_ranks(tmp_path, _kinds_case)):
        for name, r in res.items():
            assert r["sharded"] == r["tables"] >= 1, (rank, name, r)
            assert r["loss"] < 1e-5, (rank, name, r)
            assert r["grad"] < 1e-5, (rank, name, r)


# ---------------------------------------------------------------------------------------------- bytes, SMF
def _bytes_case(rank: int) -> dict:
    from memlm.model.memory.sparse_update import RowSparseAdam

    rows, dim = 64, 32
    table = torch.randn(rows, dim)
    sh = _shard(table, rank)
    opt = RowSparseAdam([sh], lr=1e-2)
    idx = torch.randint(0, rows, (5, 4))
    value_lookup(sh, idx, torch.ones(5, 4), sparse=True).sum().backward()
    opt.step()
    st = opt.state[sh]
    want = parallel.table_bytes_per_rank(rows, dim, torch.float32, WORLD)
    return {
        "params": sh.numel() * sh.element_size(), "want_params": want["params"],
        "opt": sum(t.numel() * t.element_size() for k, t in st.items() if k.startswith("exp_avg")),
        "want_opt": want["optimizer"], "shape": tuple(sh.shape),
    }  # fmt: skip


def test_each_rank_holds_only_its_shard(tmp_path):
    for r in run_ranks(tmp_path, _bytes_case):
        assert r["shape"] == (64, 32 // WORLD)
        assert r["params"] == r["want_params"] == 64 * 16 * 4
        assert r["opt"] == r["want_opt"] == 2 * 64 * 16 * 4  # fp32 moments of the shard only
    # the numbers the docs quote: a 1M x 1024 bf16 table
    per = {w: parallel.table_bytes_per_rank(2**20, 1024, "bf16", w) for w in (1, 2, 8, 64)}
    assert per[2]["params"] == 2**20 * 512 * 2 and per[64]["params"] == per[1]["params"] // 64


def _smf_case(rank: int) -> dict:
    """SMF on a sharded table: the group agrees on the top-t rows (counts summed over ranks), each rank steps its
    columns of them with the lazy Adam; every other row of the shard and of its moments stays bitwise."""
    from memlm.continual.smf import group_counts, rows_of_grad, select_top_t
    from memlm.model.memory.sparse_update import RowSparseAdam

    rows, dim, t = 64, 32, 5
    table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    sh = _shard(table, rank)
    opt = RowSparseAdam([sh], lr=1e-2)
    opt.step_rows(sh, torch.arange(rows), torch.randn(rows, dim // WORLD))  # non-zero moments everywhere
    before = sh.detach().clone()
    m_before = opt.state[sh]["exp_avg"].clone()
    g = torch.Generator().manual_seed(10 + rank)
    idx = torch.randint(0, rows, (7, 4), generator=g)
    value_lookup(sh, idx, torch.rand(7, 4, generator=g), sparse=True).sum().backward()
    counts = group_counts(torch.bincount(idx.reshape(-1), minlength=rows).float(), sh)  # every rank: the same rows
    sel = select_top_t(counts, counts, t)
    r, gr = rows_of_grad(sh.grad, sel)
    opt.step_rows(sh, r, gr)
    frozen = torch.ones(rows, dtype=torch.bool)
    frozen[sel] = False
    return {"frozen_same": torch.equal(sh.detach()[frozen], before[frozen]),
            "moments_same": torch.equal(opt.state[sh]["exp_avg"][frozen], m_before[frozen]),
            "selected_moved": bool((sh.detach()[sel] != before[sel]).any(dim=1).all()), "sel": sel}  # fmt: skip


def test_smf_on_a_sharded_table_keeps_other_rows_bitwise(tmp_path):
    a, b = run_ranks(tmp_path, _smf_case)
    assert torch.equal(a["sel"], b["sel"])
    for r in (a, b):
        assert r["frozen_same"] and r["moments_same"] and r["selected_moved"], r


def test_shardable_errors_name_the_setting():
    with pytest.raises(ConfigError, match="not divisible by 3 ranks"):
        parallel.check_shardable(_cfg({}), 3)
    with pytest.raises(ConfigError, match="memory.cores"):
        parallel.check_shardable(_cfg(dict(kind="ultramem", cores=2, expansion=2)), 3)  # v_dim 16 / (3 x 2)
    parallel.check_shardable(_cfg({}), 2)


def test_traffic_accounting():
    # dim-wise sends only the other ranks' share of each token's vector; row-wise whole vectors: crossover by reads
    dim_b = parallel.comm_bytes_per_step(4096, 128, 1024, 8, "dim")
    row_b = parallel.comm_bytes_per_step(4096, 128, 1024, 8, "row")
    assert 0 < dim_b < row_b
    assert parallel.comm_bytes_per_step(4096, 1024, 256, 8, "dim") > parallel.comm_bytes_per_step(4096, 1024, 256, 8,
                                                                                                    "row")  # fmt: skip


# ---------------------------------------------------------------------------------------------- training
def test_train_two_process_memory_parallel_matches_one_process(tmp_path):
    """20 steps with 2-process memory parallelism (row-sparse Adam) == 1 process on the same global batch; the
    2-process checkpoint resumes at world size 1 and continues exactly as the 1-process checkpoint resumed the same
    way; the export written by the 2-process run loads.

    Both runs have ``max_steps=20`` (the warmup + cosine schedule is laid out over ``max_steps``: comparing a 20-step
    run with the first 20 steps of a 24-step one compares two learning-rate schedules). Both are then resumed to 24
    steps with one process, so both see the same schedule change at the resume."""
    import memlm

    common = ["--data.shuffle=false", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=1",
              "--trainer.accelerator=cpu", "--model.memory.parallel=dim", "--optim.value_optimizer=row_sparse_adam",
              "--train.checkpoint_every=20", f"--train.run_dir={tmp_path}"]  # fmt: skip
    single = run_train(*common, "--train.name=single", "--train.batch_size=4", "--trainer.max_steps=20",
                       "--train.export=false", cache=tmp_path / "cache", timeout=T)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    mp_run = run_train(*common, "--train.name=mp", "--train.batch_size=2", "--trainer.max_steps=20",
                       "--trainer.devices=2", "--trainer.strategy=ddp", cache=tmp_path / "cache",
                       timeout=T)  # fmt: skip
    assert mp_run.returncode == 0, mp_run.stderr[-3000:]
    assert_same_curve(tmp_path / "single", tmp_path / "mp", range(1, 21))
    # the checkpoints hold full tables: both resume with one process (the same schedule change) and stay equal
    for name in ("single", "mp"):
        resumed = run_train(*common, f"--train.name={name}", "--train.batch_size=4", "--trainer.max_steps=24",
                            "--ckpt_path=last", "--train.export=false", cache=tmp_path / "cache",
                            timeout=T)  # fmt: skip
        assert resumed.returncode == 0, (name, resumed.stderr[-3000:])
    assert_same_curve(tmp_path / "single", tmp_path / "mp", range(1, 25))
    model, _ = memlm.load_pretrained(tmp_path / "mp" / "export")  # written by the 2-process run: full tables
    assert model.value_tables()[0].weight.shape == (64, 32)


def test_parallel_dim_user_errors(tmp_path):
    r = run_train("--model.memory.parallel=dim", "--trainer.devices=3", "--trainer.accelerator=cpu",
                  "--trainer.strategy=ddp", f"--train.run_dir={tmp_path}", cache=tmp_path / "cache",
                  timeout=T)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: model.memory.parallel=dim") and "3 ranks" in r.stderr
    r = run_train("--model.memory.parallel=dim", "--trainer.strategy=fsdp", f"--train.run_dir={tmp_path}",
                  cache=tmp_path / "cache", timeout=T)  # fmt: skip
    assert r.returncode == 2 and "error: model.memory.parallel=dim does not combine" in r.stderr, r.stderr[-2000:]
