"""The benchmark scripts keep working: tiny runs of each, their recorded rows and plots checked,
and the committed results data files stay readable.

torch.compile rows are left out: one compile takes tens of seconds on the 2-core CI machine.
"""
import dataclasses
import datetime
import importlib.util
import math
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    # the scripts' --threads 1 sets torch's global thread count; give the other tests theirs back.
    # One thread: on a shared 2-core machine, OpenMP threads spin-wait for each other.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def common():
    return _load("bench_common")


def test_model_shapes_match_published_parameter_counts(common):
    # GPT-2 small/medium with tied lm_head, and Llama-3.2-1B with tied embedding, as published
    assert common.numel(common.SIZES["gpt2-124m"][0]) == 124_439_808
    assert common.numel(common.SIZES["gpt2-350m"][0]) == 354_823_168
    assert common.numel(common.SIZES["llama-1b"][0]) == 1_235_814_400
    shapes = common.SIZES["many-small"][0]
    assert len(shapes) >= 1000 and all(len(s) == 1 for s in shapes)


def test_bytes_per_parameter_follow_the_state_layout(common):
    # docs/algorithm.md, "Memory traffic", for fp32 parameters, and AdamW's 28 B
    assert common.amos_bytes(4) == 12
    assert common.amos_bytes(4, closed_form=True) == 16
    assert common.amos_bytes(4, momentum_size=4) == 20
    assert common.amos_bytes(4, momentum_size=2) == 16
    assert common.amos_bytes(2) == 6
    assert common.adamw_bytes(4) == 28


def test_recorded_command_leaves_out_this_machines_paths(common):
    # --results and --cache name files here; the record keeps the command that reproduces the rows
    script = os.path.join(os.path.dirname(common.__file__), "quality.py")
    cmd = common.command_line(script, ["--tasks", "digits", "--results", "/tmp/r", "--cache=/tmp/c.jsonl",
                                       "--seeds", "3", "--cache", "/tmp/c.jsonl"])
    assert cmd == "python benchmarks/quality.py --tasks digits --seeds 3"


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


PNG = b"\x89PNG\r\n\x1a\n"


def test_step_time_tiny_records_rows_and_draws_the_plot(tmp_path, capsys, one_thread):
    step_time = _load("step_time")
    step_time.main(["--device", "cpu", "--sizes", "tiny", "--backends", "reference,default,adamw,adafactor,apex",
                    "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-progress", "--note", "test",
                    "--results", str(tmp_path)])
    table = capsys.readouterr().out
    assert "| adamw fused |" in table and "| amos/reference amos m=0 |" in table
    assert "apex" in table  # either rows or the "apex not importable" note

    data = _load("bench_common").read(tmp_path / "step_time.jsonl")
    rows = {r["row"]: r for r in data}
    assert len(rows) == len(data)
    first = data[0]
    assert first["note"] == "test" and first["machine"]["cpu"] and first["versions"]["torch"]
    assert first["command"].startswith("python benchmarks/step_time.py --device cpu")
    assert len({r["date"] for r in data}) == 1  # one run
    expected = {f"amos/reference {label}" for label, _ in step_time.FAMILIES}
    expected |= {"adamw for-loop", "adamw foreach", "adamw fused", "adafactor for-loop", "adafactor foreach"}
    assert expected <= set(rows), f"missing rows: {expected - set(rows)}"
    for r in rows.values():
        for key in ("median_ms", "gbps", "pct_roofline", "roofline_gbps", "x_adamw_fused", "x_adamw_foreach",
                    "state_bytes", "first_call_s"):
            assert _finite(r[key]) and r[key] >= 0, (r["row"], key, r[key])
        assert r["median_ms"] > 0
    assert rows["adamw fused"]["x_adamw_fused"] == 1.0
    assert rows["amos/reference amos m=0"]["bytes_per_param"] == 12
    assert rows["amos/reference amos m=0.9"]["bytes_per_param"] == 20
    # the default row: Amos(params, lr=...) as shipped, whose m is stored in bf16 (16 B/param, not 20)
    assert rows["default"]["bytes_per_param"] == rows["amos/reference amos m=0.9 bf16"]["bytes_per_param"] == 16
    assert "guard=slice" in rows["default"]["family"] and "bfloat16" in rows["default"]["family"]
    n, tensors = first["n_params"], first["n_tensors"]
    # measured state: AdamW keeps 2 fp32 tensors per parameter (8 B) plus a 4 B step per tensor
    assert rows["adamw fused"]["state_bytes"] == 8 * n + 4 * tensors
    # Amos with momentum holds m (4 B/param) on top of v, b per row: between 4 and 5 B/param here
    assert 4 < rows["amos/reference amos m=0.9"]["state_bytes_per_param"] < 5
    assert (tmp_path / "step_time.png").read_bytes()[:8] == PNG


def test_record_appends_rows_with_the_runs_metadata(common, tmp_path):
    date = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    path = common.record("k", [dict(x=1.0, y=[1, 2]), dict(x=float("nan"))], device="cpu", date=date,
                         command="python benchmarks/k.py", results_dir=tmp_path)
    common.record("k", [dict(x=2.0)], device="cpu", command="python benchmarks/k.py --again", results_dir=tmp_path)
    rows = common.read(path)
    assert path == str(tmp_path / "k.jsonl") and len(rows) == 3
    assert list(rows[0])[:len(common.RECORD_KEYS)] == list(common.RECORD_KEYS)  # metadata first
    assert rows[0]["date"] == rows[1]["date"] == "2026-01-02T03:04:05+00:00" != rows[2]["date"]
    assert rows[0]["y"] == [1, 2] and rows[1]["x"] is None  # NaN is written as null
    assert rows[0]["device"] == "cpu" and rows[0]["machine"]["cpu_cores"] and rows[0]["versions"]["torch"]
    assert common.latest(rows) == rows[2:]
    with pytest.raises(ValueError, match="date"):
        common.record("k", [dict(date="mine")], device="cpu", results_dir=tmp_path)
    assert len(common.read(path)) == 3  # nothing appended


def test_results_folder_is_named_after_the_device(common):
    assert common.device_folder("cpu") == "cpu"
    assert common.device_folder(torch.device("cpu")) == "cpu"


def test_committed_results_are_data_files_with_their_metadata(common):
    """benchmarks/results: per device one <kind>.jsonl per benchmark kind, every row with the
    metadata record writes, plots only of kinds that have a data file, 30 files at most."""
    plots = _load("plots")
    files = [os.path.join(d, f) for d, _, fs in os.walk(common.RESULTS) for f in fs]
    assert len(files) <= 30, files
    for path in files:
        name = os.path.basename(path)
        if name.endswith(".jsonl"):
            rows = common.read(path)
            assert rows, path
            for r in rows:
                assert all(k in r for k in common.RECORD_KEYS), (path, sorted(r))
        elif name.endswith(".png"):
            kind = name[:-len(".png")]
            assert plots.base_kind(kind) in plots.PLOTTERS and os.path.exists(path[:-len(".png")] + ".jsonl"), path
        else:
            assert name == "README.md", f"{path}: results are <kind>.jsonl data files and their plots"


def test_host_overhead_and_interleaved_record_their_rows(tmp_path, capsys, one_thread):
    host = _load("host_overhead")
    host.main(["--steps", "2", "--repeats", "1", "--rows", "adamw fused,guard=slice m=0,default", "--results",
               str(tmp_path)])
    rows = _load("bench_common").read(tmp_path / "host_overhead.jsonl")
    assert [r["row"] for r in rows] == ["adamw fused", "guard=slice m=0", "default"]
    assert all(r["us_per_step"] > 0 and r["n_tensors"] == 148 for r in rows)
    interleaved = _load("cpu_interleaved")
    interleaved.main(["--size", "tiny", "--rounds", "2", "--threads", "1", "--results", str(tmp_path)])
    rows = {r["row"]: r for r in _load("bench_common").read(tmp_path / "interleaved.jsonl")}
    assert rows["AdamW(fused=True).step"]["x_adamw_fused"] == 1.0
    assert len(rows["a += b"]["times_ms"]) == 2 and "Amos.step amos m=0 guard=slice" in rows
    assert len(rows["default"]["times_ms"]) == 2  # Amos(params, lr=1e-3) as shipped
    assert len(rows[_load("bench_common").COMPUTE_ROW]["times_ms"]) == 2  # the CPU's speed, beside its bandwidth
    assert "| row | median ms |" in capsys.readouterr().out


def test_prefetch_off_rows_set_the_switch_only_during_their_step(monkeypatch):
    """The cuda rows' prefetch A/B: the kernels read AMOS_FUSED_CUDA_PREFETCH at every step, so
    the "prefetch=off" row must set it to "0" while its step runs and restore it after."""
    step_time = _load("step_time")
    seen = []
    make = step_time._without_prefetch(lambda params: (lambda: seen.append(os.environ.get("AMOS_FUSED_CUDA_PREFETCH")), None))
    for before in (None, "1"):
        if before is None:
            monkeypatch.delenv("AMOS_FUSED_CUDA_PREFETCH", raising=False)
        else:
            monkeypatch.setenv("AMOS_FUSED_CUDA_PREFETCH", before)
        step, _ = make([])
        step()
        assert seen[-1] == "0" and os.environ.get("AMOS_FUSED_CUDA_PREFETCH") == before


def test_verdicts_compare_each_backends_one_pass_row_with_fused_adamw():
    step_time = _load("step_time")

    def row(name, ms, backend=None, group="amos"):
        return dict(size="s", row=name, median_ms=ms, backend=backend, group=group)
    results = [row("adamw fused", 10.0, "fused", "adamw"), row("amos/cuda amos m=0 guard=slice", 4.0, "cuda"),
               row("amos/triton amos m=0 guard=slice", 5.0, "triton"), row("amos/cuda amos m=0", 8.0, "cuda"),
               row("amos/cuda amos m=0 guard=slice prefetch=off", 2.0, "cuda")]
    assert step_time.verdicts(results) == [
        "s amos m=0 guard=slice, x fused AdamW speed: cuda 2.50, triton 2.00; fastest cuda"]
    assert step_time.verdicts(results[1:]) == []  # no AdamW row: nothing to compare with


def test_max_colb_rows_set_the_heuristic_only_during_their_step():
    step_time = _load("step_time")
    from amos_fused import triton_backend
    before = triton_backend.HEURISTIC
    seen = []
    make = step_time._with_max_colb(lambda params: (lambda: seen.append(triton_backend.HEURISTIC.max_colb), None), 4096)
    step, _ = make([])
    step()
    assert seen == [4096] and triton_backend.HEURISTIC is before


def test_row_sweep_tiny_reports_every_width_and_family(tmp_path, capsys, one_thread):
    row_sweep = _load("row_sweep")
    row_sweep.main(["--device", "cpu", "--numel", "5000", "--widths", "7,300,70000", "--repeats", "2",
                    "--warmup", "1", "--results", str(tmp_path)])
    data = _load("bench_common").read(tmp_path / "row_sweep.jsonl")
    got = {(r["C"], r["family"]) for r in data}
    assert got == {(c, f) for c in (7, 300, 70000) for f in row_sweep.FAMILIES}
    assert all(r["ms"] > 0 and r["gb_s"] > 0 and r["prefetch"] == "-" for r in data)
    assert {r["R"] for r in data if r["C"] == 70000} == {1}  # numel < C: one row
    assert len({r["date"] for r in data}) == 1  # recorded width by width, one run
    assert "% a+=b" in capsys.readouterr().out
    assert (tmp_path / "row_sweep.png").read_bytes()[:8] == PNG


def test_step_time_rejects_unknown_backend():
    step_time = _load("step_time")
    with pytest.raises(SystemExit):
        step_time.parse_args(["--backends", "nope"])


def test_memory_tiny_reports_state_for_every_row(tmp_path, capsys, one_thread):
    memory = _load("memory")
    memory.main(["--device", "cpu", "--sizes", "tiny", "--threads", "1", "--no-progress", "--results", str(tmp_path)])
    assert "| amos row m=0 |" in capsys.readouterr().out
    data = _load("bench_common").read(tmp_path / "memory.jsonl")
    rows = {r["row"]: r for r in data}
    assert len(rows) == 13  # 3 granularities x 3 momenta, the default row, 3 baselines
    for r in rows.values():
        for key in ("state_bytes", "first_step_transient_bytes", "steady_step_transient_bytes", "peak_total_bytes"):
            assert _finite(r[key]), (r["row"], key)
    n = data[0]["n_params"]
    # element granularity: v and b per element (8 B) plus m; row granularity: m only, plus small v, b
    assert rows["amos element m=0.9 fp32"]["state_bytes"] > 12 * n
    assert rows["amos row m=0.9 bf16"]["state_bytes"] < rows["amos row m=0.9 fp32"]["state_bytes"]
    assert rows["amos tensor m=0"]["state_bytes"] < 0.05 * rows["adamw fused"]["state_bytes"]
    # the default row, Amos(params, lr=...): row slices, momentum stored in bf16
    assert rows["default"]["state_bytes"] == rows["amos row m=0.9 bf16"]["state_bytes"]


def test_sharded_step_tiny_records_every_row(tmp_path, one_thread):
    # one rank, in this process: FSDP2 at world size 1 beside the same rows on plain tensors
    # (the 2- and 4-rank paths are tests/test_sharded.py's)
    sharded = _load("sharded_step")
    sharded.main(["--world", "1", "--layers", "2", "--width", "32", "--rounds", "2", "--threads", "1",
                  "--results", str(tmp_path)])
    rows = {r["row"]: r for r in _load("bench_common").read(tmp_path / "sharded_step.jsonl")}
    names = ["default", "Amos m=0 guard=slice", "Amos m=0.9 bf16 guard=slice",
             "Amos inverse_time m=0 guard=slice", "AdamW fused", "AdamW foreach"]
    compute = _load("bench_common").COMPUTE_ROW  # on CPU ranks: how fast the cores ran
    assert set(rows) == set(names) | {f"{n} (unsharded)" for n in names} | {compute}
    assert rows["AdamW fused"]["adamw_ratio"] == 1.0 and rows["AdamW fused (unsharded)"]["adamw_ratio"] == 1.0
    assert all(len(r["times_ms"]) == 2 and r["numel"] == 2 * (32 * 32 + 32) for r in rows.values())
    # one rank: from the last rank's entry is from its own entry
    assert all(r["own_times_ms"] == pytest.approx(r["times_ms"], abs=1e-3) for r in rows.values())


def test_host_overhead_group_rows_split_every_tensor_once_and_print_the_ratio(capsys, one_thread, tmp_path):
    host = _load("host_overhead")
    shapes = host.TINY_SIZES["gpt2-124m"]
    opt = host.make_optimizer(shapes, host.ROWS["guard=slice m=0.9 16 groups"])
    assert len(opt.param_groups) == 16
    assert sum(len(g["params"]) for g in opt.param_groups) == len(shapes)
    assert len({g["lr"] for g in opt.param_groups}) == 16  # layer-wise: a learning rate each
    host.main(["--rows", "guard=slice m=0.9,guard=slice m=0.9 16 groups", "--steps", "2", "--repeats", "2",
               "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "guard=slice m=0.9 16 groups / guard=slice m=0.9:" in out and "target <= 1.2" in out


def test_quality_quick_records_runs_table_verdicts_and_png(tmp_path, capsys, one_thread):
    quality = _load("quality")
    cache = tmp_path / "runs.jsonl"
    argv = ["--quick", "--tasks", "digits,gru_lm", "--no-progress", "--cache", str(cache), "--results", str(tmp_path)]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "| default" in out and "(best AdamW)" in out and "digits: Amos at defaults" in out
    data = _load("bench_common").read(tmp_path / "quality.jsonl")
    assert [t for t in dict.fromkeys(r["task"] for r in data)] == ["digits", "gru_lm"]
    assert data[0]["command"].startswith("python benchmarks/quality.py --quick") and len({r["date"] for r in data}) == 1
    for task in ("digits", "gru_lm"):
        rows = {r["row"]: r for r in data if r["task"] == task}
        # the default row, total_steps, a closed form, and the momentum storage the default does not use
        assert {"default", "amos total_steps", "inverse_time", "amos fp32-m"} <= set(rows)
        assert {r["family"] for r in rows.values()} >= {"adamw", "amos"}
        assert all(_finite(r["final_val"]) and r["task_setup"]["name"] == task for r in rows.values())
        # the default row is Amos with nothing given: its lr is the rule's for the model; total_steps: its peak
        model = dataclasses.replace(quality.TASKS[task], **quality.QUICK_TASKS[task]).make_model()
        matrices = sum(p.ndim >= 2 for p in model.parameters())
        assert rows["default"]["lr"] == quality.defaults.lr("amos", None, matrices) == min(0.275 / matrices, 0.15)
        assert rows["amos total_steps"]["lr"] == quality.defaults.lr("amos", rows["default"]["task_setup"]["steps"],
                                                                     matrices)
    assert (tmp_path / "quality.png").read_bytes()[:8] == PNG
    # a second run takes every run from the cache: same numbers, nothing trained
    n_cached = len(cache.read_text().splitlines())
    assert n_cached == len(data)
    quality.main(argv)
    again = _load("bench_common").read(tmp_path / "quality.jsonl")[len(data):]  # the second run's rows
    assert [r["final_val"] for r in again] == [r["final_val"] for r in data]
    assert len(cache.read_text().splitlines()) == n_cached


def test_quality_at_another_run_length_is_recorded_apart(tmp_path, one_thread):
    # a file and its plot hold one run length per task: runs at 2x the steps must not mix into quality.jsonl
    quality = _load("quality")
    argv = ["--quick", "--tasks", "digits", "--rows", "adamw-sweep,default", "--steps-factor", "2", "--no-progress",
            "--results", str(tmp_path)]
    assert quality.main(argv) == 0
    assert not (tmp_path / "quality.jsonl").exists()
    data = _load("bench_common").read(tmp_path / "quality_x2.jsonl")
    steps = dataclasses.replace(quality.TASKS["digits"], **quality.QUICK_TASKS["digits"]).steps
    assert {r["task_setup"]["steps"] for r in data} == {2 * steps}
    assert {r["row"] for r in data} == {"adamw@0.003", "default"}
    assert (tmp_path / "quality_x2.png").read_bytes()[:8] == PNG
    plots = _load("plots")
    assert plots.base_kind("quality_x2") == "quality" and plots.base_kind("defaults_study_layers") == \
        "defaults_study_layers"
    (tmp_path / "quality_x2.png").unlink()
    plots.main([str(tmp_path)])  # redrawing a folder draws the suffixed kind too
    assert (tmp_path / "quality_x2.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit):
        plots.main([str(tmp_path / "missing")])


def test_quality_plot_draws_whole_curves_of_rows_with_trimmed_seeds(tmp_path, monkeypatch, one_thread):
    # a many-seed row may keep only the final point of its extra seeds: the curves average the whole ones
    quality, plots = _load("quality"), _load("plots")
    assert quality.main(["--quick", "--tasks", "digits", "--rows", "adamw-sweep,default", "--no-progress",
                         "--results", str(tmp_path)]) == 0
    rows = _load("bench_common").read(tmp_path / "quality.jsonl")
    trimmed = [dict(r, seed=r["seed"] + 1, **{k: r[k][-1:] for k in ("eval_steps", "val_loss", "val_extra",
                                                                       "train_loss")}) for r in rows]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, *args, **kwargs: figures.append(fig))
    plots.quality(rows + trimmed, str(tmp_path / "q.png"))
    (ax,) = [ax for ax in figures[0].axes if ax.lines]
    assert "(curves: 1 seeds)" in ax.get_title()
    whole = len(rows[0]["eval_steps"])
    assert whole > 1 and {len(line.get_xdata()) for line in ax.lines} == {whole}


def test_quality_rejects_unknown_rows_and_tasks():
    quality = _load("quality")
    for argv in (["--rows", "nope@0.1"], ["--tasks", "imagenet"], ["--rows", "amos@x"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)


def test_defaults_study_registers_its_variants_as_suite_rows():
    study = _load("defaults_study")
    build = study.build_variant("eta=fanin2 mdt=fp32 warm=0.1 decay=lin")
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4))
    opt, factor = build(model, 0.05, 100)
    assert opt.param_groups[0]["lr"] == 0.05 and factor(0) == pytest.approx(0.1) and factor(99) < 0.02
    # eta=fanin2 is the default rule, written with eta_fn: the same eta as Amos at its defaults
    plain = _load("quality").VARIANTS["default"](model, None, 100)[0]
    assert [opt.state[p]["eta"] for p in model.parameters()] == pytest.approx(
        [plain.state[p]["eta"] for p in model.parameters()], rel=1e-12)
    assert opt.defaults["momentum_dtype"] == torch.float32
    with pytest.raises(ValueError, match="unknown token"):
        study.build_variant("eta=fit nope=1")
    opt, _ = study.build_variant("eta=fit l2=0.001")(model, None, 100)
    assert opt.defaults["extra_l2"] == 0.001
    opt, _ = study.build_variant("eta=fit elem=0./1.bias")(model, None, 100)  # "/": rows split on ","
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]
    assert opt.param_groups[1]["granularity"] == "element"
    _, factor = study.build_variant("eta=fanin2 rsqrt=200")(model, None, 1000)
    _, longer = study.build_variant("eta=fanin2 rsqrt=200")(model, None, 3000)
    assert factor(0) == pytest.approx(1 / 200) and factor(199) == 1.0 and factor(799) == pytest.approx(0.5)
    assert [factor(i) for i in range(0, 1000, 37)] == [longer(i) for i in range(0, 1000, 37)]  # no run length


def test_defaults_study_records_its_own_kind(tmp_path, capsys, one_thread):
    study = _load("defaults_study")
    assert study.main(["--quick", "--tasks", "digits", "--variants", "eta=cap2 warm=0.1", "--lrs", "0.05",
                       "--no-progress", "--results", str(tmp_path)]) == 0
    data = _load("bench_common").read(tmp_path / "defaults_study.jsonl")
    assert {r["row"] for r in data} >= {"default", "amos eta=cap2 warm=0.1@0.05"}
    assert data[0]["command"].startswith("python benchmarks/defaults_study.py --quick")
    assert not (tmp_path / "quality.jsonl").exists()  # the suite's own file keeps the suite's rows only
    assert (tmp_path / "defaults_study.png").read_bytes()[:8] == PNG


def test_defaults_study_layers_trains_deeper_transformers_recorded_apart(tmp_path, monkeypatch, one_thread):
    study = _load("defaults_study")
    quality = study.quality
    monkeypatch.setattr(quality, "TASKS", dict(quality.TASKS))  # deeper() adds tasks: undone after the test
    assert study.deeper(4) == ["lm_gpt2_L4", "lm_torch_L4"]
    task = quality.TASKS["lm_gpt2_L4"]
    assert task.model == ("transformer", 4, 128, 4, 32, "gpt2") and task.title.startswith("byte transformer 4x128")
    assert quality.TASKS["lm_gpt2"].model[1] == 2  # the suite's own tasks are left as they are
    with pytest.raises(SystemExit):
        study.main(["--layers", "0"])
    argv = ["--layers", "1", "--tasks", "lm_gpt2", "--steps-factor", "0.01", "--variants", "eta=fit", "--lrs", "0.05",
            "--seeds", "1", "--jobs", "1", "--no-progress", "--results", str(tmp_path)]  # jobs 1: no fork after autograd
    assert study.main(argv) == 0
    # apart from the suite's tasks, and (steps x 0.01) from the layers' runs at the suite's length
    data = _load("bench_common").read(tmp_path / "defaults_study_layers_x0.01.jsonl")
    assert {r["task"] for r in data} == {"lm_gpt2_L1"} and data[0]["task_setup"]["model"][1] == 1
    assert sorted(os.listdir(tmp_path)) == ["defaults_study_layers_x0.01.jsonl", "defaults_study_layers_x0.01.png"]
    assert (tmp_path / "defaults_study_layers_x0.01.png").read_bytes()[:8] == PNG
