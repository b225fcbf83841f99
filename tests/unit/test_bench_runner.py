"""The benchmark runner's table logic on fake results: ratios, orientation, targets, spreads, the
Markdown table, unreadable results, `python -m bench table`. No timing is asserted anywhere: timing
belongs in the benchmarks themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import harness, runner
from bench.runner import Figure


def test_ratio_is_oriented_and_medianed() -> None:
    up = Figure("x", "throughput", "ex/s", [10.0, 12.0, 11.0], [10.0, 10.0, 10.0], "ref", target=1.05)
    assert up.value == 11.0 and up.reference == 10.0
    assert up.ratio == pytest.approx(1.1)  # median of per-repeat ratios 1.0, 1.2, 1.1
    assert up.spread == pytest.approx((1.2 - 1.0) / 2 / 1.1)
    assert up.met is True
    down = Figure("x", "latency", "ms", [4.0], [2.0], "ref", higher_is_better=False, target=1.0)
    assert down.ratio == pytest.approx(0.5) and down.met is False  # twice as slow as the reference


def test_delta_target_and_strict_target() -> None:
    lat = Figure("serve", "p50", "ms", [3.0], [0.5], "in-process", higher_is_better=False, target=2.0,
                 target_kind="delta<=")
    assert lat.met is False and "<= +2 ms" in lat.target_text()
    ok = Figure("serve", "p50", "ms", [2.0], [0.5], "in-process", higher_is_better=False, target=2.0,
                target_kind="delta<=")
    assert ok.met is True
    tie = Figure("quality", "auc", "AUC", [0.6, 0.6], [0.6, 0.6], "ablation", target=1.0, target_kind="ratio>")
    assert tie.met is False  # "beats" means strictly better


def test_no_reference_and_missing_values() -> None:
    mem = Figure("train", "peak RSS", "MB", [3000.0, 3200.0], [], "")
    assert mem.ratio is None and mem.value == 3100.0 and mem.met is None
    nan = Figure("x", "y", "ex/s", [float("nan"), 5.0], [4.0, 4.0], "ref")
    assert nan.repeats == 1 and nan.ratio == pytest.approx(1.25)


def test_std_spread_for_seeds() -> None:
    f = Figure("quality", "auc", "AUC", [0.60, 0.62, 0.64], [0.5, 0.5, 0.5], "random", spread_kind="std")
    assert f.spread == pytest.approx(0.02) and f.spread_text() == "std 0.0200"


# ---- fake results of every benchmark -----------------------------------------------------------------------
def fake_results() -> dict[str, list[dict]]:
    mem = {"peak_rss_mb": 3000.0, "peak_pss_mb": 2000.0}
    return {
        "prepare": [{"ratio_target": 1.5, "per_row_target": 1.3, "sizes": [
            {"impressions": 200_000, "runs": [
                {"ray": {"examples_per_s": 30000.0, "cpu_seconds": 90.0, "seconds": 20.0, "driver_peak_rss_mb": 600.0,
                         "tree_peak_rss_mb": 3000.0, "object_store_peak_mb": 150.0},
                 "pandas": {"examples_per_s": 15000.0, "cpu_seconds": 40.0}} for _ in range(3)]},
            {"impressions": 3_200_000, "runs": [
                {"ray": {"examples_per_s": 25000.0, "cpu_seconds": 1500.0, "seconds": 400.0,
                         "driver_peak_rss_mb": 1100.0, "tree_peak_rss_mb": 6000.0, "object_store_peak_mb": 900.0},
                 "pandas": {"error": "not run"}}]}]}],
        "train": [{"zero_stage": 2, "ray_workers": 2, "ray_worker_torch_threads": 1, "plain_torch_threads": 2,
                   "ray": [{"examples_per_s": 30.0}, {"examples_per_s": 33.0}],
                   "plain": [{"examples_per_s": 32.0}, {"examples_per_s": 32.0}],
                   "memory": {"ray": mem, "plain": {"peak_rss_mb": 900.0, "peak_pss_mb": 900.0}}}],
        "embed": [{"actors": 2, "items": 50000, "users": 1820, "batch_size": 64,
                   "users_target": 0.9,
                   "ray": [{"items_per_s": 900.0, "items_steady_per_s": 1500.0, "users_per_s": 40.0,
                            "seconds": 30.0}],
                   "single": [{"cold_items_per_s": 1000.0, "items_per_s": 1200.0, "items_steady_per_s": 1250.0,
                               "users_per_s": 50.0, "job_seconds": 45.0}],
                   "memory": {"ray": mem, "single": {"peak_rss_mb": 800.0, "peak_pss_mb": 800.0}}}],
        "serve": [{"config": {"batch_wait_timeout_s": 0.004, "scale_out": 2},
                   "inprocess_score": {"p50_ms": 0.2, "p99_ms": 4.0, "rps": 1200.0},
                   "bare": {"1": {"p50_ms": 1.5, "p99_ms": 17.0, "rps": 320.0},
                            "16": {"p50_ms": 35.0, "p99_ms": 380.0, "rps": 290.0}},
                   "serve_wait_0.004": {"1": {"p50_ms": 27.0, "p99_ms": 350.0, "rps": 24.0},
                                        "16": {"p50_ms": 160.0, "p99_ms": 280.0, "rps": 95.0}},
                   "catalog_vs_gemm": {"users_1": {"score_gflops_per_s": 7.0, "gemm_gflops_per_s": 3.5}},
                   "machine": {"cpu_model": "AMD EPYC 7B13"},
                   "bare_distinct": {"1": {"p50_ms": 1.4, "p99_ms": 3.0, "rps": 600.0},
                                     "16": {"p50_ms": 20.0, "p99_ms": 40.0, "rps": 700.0}},
                   "serve_distinct": {"1": {"p50_ms": 2.0, "p99_ms": 5.0, "rps": 450.0},
                                      "16": {"p50_ms": 15.0, "p99_ms": 35.0, "rps": 910.0}},
                   "bare_distinct_1p": {"16": {"p50_ms": 20.0, "p99_ms": 40.0, "rps": 720.0}},
                   "bare_distinct_scaled": {"16": {"p50_ms": 12.0, "p99_ms": 30.0, "rps": 1200.0}},
                   "serve_distinct_scaled": {"16": {"p50_ms": 14.0, "p99_ms": 30.0, "rps": 900.0}},
                   "recommend_catalog": {"items": 200000, "inprocess_p50_ms": 20.0, "serve_p50_ms": 24.0,
                                         "serve_app_p50_ms": 21.0, "serve_path_p50_ms": 1.5}}],
        "quality": [{"dataset": "book-crossing", "study": {"eval_negatives": 49, "tables": {"49": {
            "random": {"auc": {"values": [0.5]}, "ndcg10": {"values": [0.1]}},
            "popularity": {"auc": {"values": [0.8]}, "ndcg10": {"values": [0.3]}},
            "EmbSum (paper-faithful)": {"auc": {"values": [0.70, 0.72, 0.71]}, "ndcg10": {"values": [0.2, 0.21, 0.2]}},
            "EmbSum lambda=0 (no summary loss)": {"auc": {"values": [0.71, 0.71, 0.71]},
                                                  "ndcg10": {"values": [0.2, 0.2, 0.2]}},
        }}}}],
    }


def test_figures_of_every_benchmark() -> None:
    figs = {name: runner.figures_for(name, runs) for name, runs in fake_results().items()}
    prep = {f.name: f for f in figs["prepare"]}
    small = prep["examples/s, Ray Data prepare job (200,000 synthetic impressions)"]
    assert small.ratio == pytest.approx(2.0) and small.met is True and small.repeats == 3
    big = prep["examples/s, Ray Data prepare job (3,200,000 synthetic impressions)"]
    assert big.ratio is None and big.target is None  # no baseline at that size; the target is at 200k
    assert prep["CPU-seconds, Ray Data job vs pandas (200,000 impressions; lower is better)"].ratio == \
        pytest.approx(40 / 90)
    per_row = next(f for n, f in prep.items() if n.startswith("per-impression cost"))
    assert per_row.ratio == pytest.approx(100 / 125) and per_row.met is True  # 125 vs 100 us: 1.25x <= 1.3x
    per_cpu = next(f for n, f in prep.items() if n.startswith("per-impression CPU cost"))
    assert per_cpu.ratio == pytest.approx(450 / 468.75) and per_cpu.target is None  # CPU-us per impression
    driver = prep["driver peak RSS, Ray Data prepare job (3,200,000 impressions)"]
    assert driver.met is False and driver.ratio == pytest.approx(1024 / 1100)  # over the 1 GB budget
    old = runner.figures_for("prepare", [{"impressions": 200000, "ray_examples_per_s": 30000.0,
                                          "pandas_examples_per_s": 15000.0, "ray_cpu_seconds": 90.0,
                                          "pandas_cpu_seconds": 40.0}])
    assert old[0].ratio == pytest.approx(2.0) and old[1].ratio == pytest.approx(40 / 90)  # earlier results
    train = figs["train"][0]
    assert train.ratio == pytest.approx((30 / 32 + 33 / 32) / 2) and train.target == 0.95
    assert figs["train"][1].unit == "MB" and figs["train"][1].ratio == pytest.approx(0.3)
    embed = figs["embed"][0]  # job vs job: the target's figure
    assert embed.ratio == pytest.approx(0.9) and embed.met is True
    assert figs["embed"][1].ratio == pytest.approx(1.2) and figs["embed"][1].target is None  # once started
    assert figs["embed"][2].ratio == pytest.approx(0.75)  # vs a process that had its imports done
    users, job = figs["embed"][3], figs["embed"][4]
    assert users.ratio == pytest.approx(0.8) and users.met is False  # 40 vs 50 users/s: short of 0.9
    assert job.ratio == pytest.approx(1.5) and job.unit == "s"  # 30 s vs 45 s: lower is better
    serve = {f.name: f for f in figs["serve"]}
    rps16 = next(f for n, f in serve.items() if "requests/s" in n and "16 clients" in n)
    assert rps16.ratio == pytest.approx(95 / 290) and rps16.met is False
    added = next(f for n, f in serve.items() if "in-process" in n)
    assert added.met is False  # 27 ms vs 0.2 ms: far more than +2 ms
    distinct = next(f for n, f in serve.items() if "distinct" in n and "16 clients" in n and "replicas" not in n)
    scaled = [f for f in figs["serve"] if "Ray Serve 2 replicas, 16 clients" in f.name]
    assert [(f.ref_name, f.ratio, f.target) for f in scaled] == [  # no target: the 1.2x is the 1-replica row's
        ("bare FastAPI app, 1 process", pytest.approx(900 / 720), None),
        ("bare FastAPI app, 2 uvicorn workers", pytest.approx(900 / 1200), None)]
    assert distinct.ratio == pytest.approx(910 / 700) and distinct.met is True and "AMD EPYC 7B13" in distinct.name
    rec, path = (f for n, f in serve.items() if "/v1/recommend" in n)
    assert rec.met is False and "200,000 items" in rec.name  # 24 vs 20 ms: more than +3 ms
    assert path.value == pytest.approx(24.0) and path.ratio == pytest.approx(21 / 24) and "own time" in path.name
    no_path = runner.figures_for("serve", [{**fake_results()["serve"][0], "recommend_catalog": {
        "items": 200000, "inprocess_p50_ms": 20.0, "serve_p50_ms": 24.0}}])  # results from before Server-Timing
    assert sum("/v1/recommend" in f.name for f in no_path) == 1
    gemm = next(f for n, f in serve.items() if "GFLOP/s" in n)
    assert gemm.ratio == pytest.approx(2.0) and gemm.met is True
    q = {(f.ref_name, f.unit): f for f in figs["quality"]}
    assert q[("random", "AUC")].met is True
    assert q[("popularity", "AUC")].ratio == pytest.approx(0.71 / 0.8) and q[("popularity", "AUC")].met is False
    lam = q[("EmbSum lambda=0 (no summary loss)", "AUC")]
    assert lam.ratio == pytest.approx(1.0) and lam.met is False  # 0.71 vs 0.71 median: not a win
    assert len(figs["quality"]) == 6  # 3 other systems x (AUC, nDCG@10)


def test_unreadable_result_becomes_a_row() -> None:
    figs = runner.figures_for("train", [{"unexpected": 1}])
    assert len(figs) == 1 and "not readable" in figs[0].name


def test_tables_render_every_figure() -> None:
    figs = [f for name, runs in fake_results().items() for f in runner.figures_for(name, runs)]
    text = runner.text_table(figs)
    md = runner.markdown_table(figs)
    assert text.splitlines()[0].split()[:3] == ["benchmark", "figure", "value"]
    assert md.count("\n") == len(figs) + 1  # header, separator, one line per figure
    assert "| NO |" in md and "| yes |" in md
    lines = runner.verdicts(figs)
    assert len(lines) == sum(f.ratio is not None for f in figs)
    assert any("trails bare FastAPI app" in ln and "NOT met" in ln for ln in lines)


def test_table_command_from_fake_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setenv("EMBSUM_BENCH_WORKDIR", str(tmp_path / "work"))
    for name, runs in fake_results().items():
        for i, r in enumerate(runs):
            (tmp_path / (f"{name}.json" if i == 0 else f"{name}.r{i + 1}.json")).write_text(json.dumps(r))
    assert runner.main(["table", "--no-mlflow"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["benchmarks"]) == set(fake_results())
    md = (tmp_path / "summary.md").read_text()
    assert "python -m bench all" in md and "Machine:" in md
    assert len(summary["figures"]) == sum(1 for ln in md.splitlines() if ln.startswith("| ")) - 1  # minus header


def test_python_dash_m_bench_table(tmp_path: Path) -> None:
    """The module entry point, as a user runs it (no benchmark is run: 'table' only reads results)."""
    import os
    import subprocess
    import sys

    r = fake_results()["train"][0]
    (tmp_path / "train.json").write_text(json.dumps(r))
    env = {**os.environ, "EMBSUM_BENCH_RESULTS": str(tmp_path), "EMBSUM_BENCH_WORKDIR": str(tmp_path / "w")}
    out = subprocess.run([sys.executable, "-m", "bench", "table", "--no-mlflow"], cwd=harness.REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "training examples/s" in out.stdout and (tmp_path / "summary.md").is_file()


def test_memory_figures_from_runner_measurements() -> None:
    figs = runner.memory_figures({"serve": {"runs": [{"peak_rss_mb": 2500.0, "peak_pss_mb": 1800.0, "wall_s": 1}]}})
    assert figs[0].value == 2500.0 and "PSS 1800" in figs[0].note


def test_tree_memory_measures_this_process() -> None:
    mem = harness.TreeMemory(interval=0.05)
    with mem:
        pass
    rep = mem.report()
    assert rep["peak_rss_mb"] > 10 and rep["max_processes"] >= 1


def test_tree_memory_reads_pss_at_new_rss_peaks_only(tmp_path: Path) -> None:
    """PSS (the expensive read) at start, at a new peak of the tree's summed RSS, not at a lower one."""
    import subprocess
    import sys
    import time

    mem = harness.TreeMemory(interval=3600, pss_interval=3600)  # sampled by hand below
    mem.sample(full=True)
    assert mem.pss_samples == 1
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time\n"
                              "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])\n"
                              f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"])
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        mem.sample()  # the child's 300 MB: a new RSS peak, so PSS is read too
        assert mem.pss_samples == 2 and mem.peak_pss / 2**20 > 300, mem.report()
    finally:
        child.kill()
        child.wait()
    mem.sample()  # 300 MB less than the peak: RSS only
    rep = mem.report()
    assert rep["pss_samples"] == 2 and rep["samples"] == 3 and rep["max_processes"] == 2
    assert any(k.startswith("python") for k in rep["breakdown_at_peak"]), rep["breakdown_at_peak"]


def test_fleet_figures_count_lost_requests_per_policy() -> None:
    def run(policy: str, failed: int, window_failed: int) -> dict:
        def t(requests: int, f: int) -> dict:
            return {"requests": requests, "ok": requests - f, "failed": f}

        return {"retry_on": policy, "total": t(20000, failed), "kill_windows": t(10000, window_failed),
                "scale_up_s": 12.0, "scale_down_s": 6.0, "rollout": {"seconds": 4.0},
                "rollout_window": t(3000, 0), "replica_peak_rss_mb": 1200.0}

    result = {"clients": 8, "settle_s": 3, "policies": ["conn-failure", "conn-failure empty-response"],
              "autoscaling": {"upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                              "metrics_interval_s": 0.5},
              "results": [run("conn-failure", 8, 8), run("conn-failure empty-response", 2, 1)]}
    figs = runner.figures_for("fleet", [result])
    total = figs[0]
    assert total.value == pytest.approx(1.0) and total.reference == pytest.approx(4.0)  # per 10k
    assert total.ratio == pytest.approx(4.0) and total.met is True and total.target_text() == "<= 10 per 10k"
    assert figs[1].value == pytest.approx(1.0) and figs[1].reference == pytest.approx(8.0)
    assert [f.value for f in figs[2:]] == [12.0, 6.0, 4.0, 1200.0]
    assert "0 requests failed in 2 rollouts" in figs[4].name
    over = runner.figures_for("fleet", [{**result, "results": [run("conn-failure empty-response", 30, 30),
                                                                run("conn-failure", 30, 30)]}])[0]
    assert over.met is False  # 15 per 10k: more than 0.1% lost
    assert "from load stop to 1 replica" in figs[3].name  # results from before the light-load scale-down
    light = [{**run(p, 0, 0), "scale_down_window": {"requests": 500, "ok": 500 - f, "failed": f}}
             for p, f in (("conn-failure", 1), ("conn-failure empty-response", 0))]
    lfigs = runner.figures_for("fleet", [{**result, "results": light}])
    assert "from the load dropping to one client to 1 replica" in lfigs[3].name
    down = next(f for f in lfigs if "while scaling 2 -> 1 under a light load" in f.name)
    assert down.value == 0.0 and down.reference == pytest.approx(20.0)  # per 10k


def test_a_summary_from_another_checkout_keeps_every_benchmarks_rows(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A summary records where its results were; written in another checkout, those paths are not
    here, and the benchmark's rows must come from this checkout's file of the same name (they were
    silently dropped: the README's table lost its embed rows that way)."""
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    r = fake_results()["train"][0]
    (tmp_path / "train.json").write_text(json.dumps(r))
    runner_info = {"train": {"results": ["/elsewhere/checkout/bench/results/train.json"], "reused": True}}
    figs, results = runner.collect(["train"], False, runner_info)
    assert any(f.name.startswith("training examples/s") for f in figs)
    assert results["train"] == [str(tmp_path / "train.json")]  # outside the checkout: kept absolute
    assert runner.recorded_results("train", False, []) == [tmp_path / "train.json"]
    inside = harness.REPO / "bench" / "results" / "x.json"
    assert runner._repo_relative(inside) == "bench/results/x.json"
