"""One command for a GPU: every path exercised, one Markdown report.

Parts (each with its own time budget; a part that fails or runs out of time says so in the
report and the others still run):

1. **environment**: GPU, driver, torch, CUDA, triton, and two measurements: device copy
   bandwidth (a tensor copied on the device, read + write bytes per second) and the bf16
   matrix product rate;
2. **CUDA test lane**: ``pytest -m cuda`` (the device-parametrized tests of tests/, see
   tests/conftest.py) in a subprocess, time-boxed, with pass/fail/skip counts;
3. **compiled vs eager gradients** per parameter, for GPT, nGPT and GeoNorm in float32 and
   bf16 autocast, and for the options that take another fused op (nGPT's slerp rule, GeoNorm's
   atan angle) (:mod:`spheretorch.train.compile_check`; inductor on CUDA);
4. **optimizer step table**: ``benchmarks/optim_step.py`` in a subprocess (spheretorch's
   optimizers against torch's fused and foreach Adam/SGD; SphereMuon and AdamH against
   torch's Muon and AdamW on GPT-2 small's hidden matrices);
5. **training throughput**: the three models eager and compiled through the trainer at the
   gpu-medium shape (12 layers, d 768, context 1024, batch 32, vocabulary 8192 of a synthetic
   text, bf16 autocast): ms/step, tokens/s and MFU of the steady steps (warm-up and compilation
   reported apart), and each compiled run's compile check;
6. **convergence**: each model trains on tinyshakespeare and its validation loss must fall.

Nothing needs the network. ``--device cpu --quick`` runs every part at toy sizes in under 3
minutes (``make test`` runs it, so the script cannot rot); on one H200 the whole check takes
at most 8 minutes. Exit status 0 when every part ran and passed, 1 otherwise (the report is
written either way).

Usage::

    python benchmarks/gpu_check.py                          # CUDA, report under benchmarks/results/
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODELS = ("gpt", "ngpt", "geonorm")
#: the parity part's runs: (label, model, config options); the options whose fused op differs
#: from the default's (spheretorch::slerp_residual, geonorm_step's atan kernels) run too
PARITY_RUNS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    *((m, m, {}) for m in MODELS),
    ("ngpt (slerp)", "ngpt", {"residual_rule": "slerp"}),
    ("geonorm (atan)", "geonorm", {"geo_angle": "atan"}),
)


@dataclass
class Plan:
    """Sizes and time budgets (seconds) of one check: the GPU's or the CPU quick one."""

    device: torch.device
    quick: bool
    copy_mib: int
    matmul_n: int
    lane_s: int
    lane_select: list[str]
    parity_shape: dict[str, int]
    parity_batch: int
    optim_args: list[str]
    optim_s: int
    shape: dict[str, int]
    batch: int
    vocab: int
    steps: int
    converge_steps: int
    converge_shape: dict[str, int]
    compiled_models: tuple[str, ...] = MODELS  # the CPU's C++ compiles take ~30 s each
    lr: dict[str, float] | None = None  # the throughput runs' LRs (None: the smoke preset's)
    #: the whole check's budget: the parts that loop (parity, throughput, convergence) leave
    #: out their remaining rows, saying so, once it is spent
    budget_s: float = 470.0
    start: float = field(default_factory=time.perf_counter)

    def out_of_time(self, reserve: float = 0.0) -> bool:
        return time.perf_counter() - self.start > self.budget_s - reserve

    @classmethod
    def make(cls, device: torch.device, quick: bool) -> Plan:
        cuda = device.type == "cuda"
        toy = dict(n_layer=2, n_head=2, d_model=64, seq_len=64)
        if cuda and not quick:
            from spheretorch.train.presets import get_preset

            p = get_preset("gpu-medium")
            medium = dict(n_layer=p.n_layer, n_head=p.n_head, d_model=p.d_model, seq_len=p.seq_len)
            return cls(
                device,
                quick,
                copy_mib=1024,
                matmul_n=8192,
                # the lane grew (SphereMuon/AdamH on device, CUDA-graph captures) and compiles
                # each Triton specialization on first use
                lane_s=180,
                lane_select=["-m", "cuda", "tests"],
                parity_shape=dict(n_layer=2, n_head=4, d_model=256, seq_len=256),
                parity_batch=8,
                # gpt124m-matrices: the Muon family (SphereMuon, AdamH vs torch's Muon, AdamW)
                optim_args=["--set", "default", "gpt124m", "gpt124m-matrices"],
                optim_s=100,
                shape=medium,
                batch=p.batch_size,
                vocab=8192,
                steps=15,
                converge_steps=60,
                converge_shape=dict(n_layer=4, n_head=4, d_model=256, seq_len=256),
                lr=dict(p.lr),  # the preset's, for its shape
            )
        return cls(
            device,
            quick,
            copy_mib=64,
            matmul_n=512 if cuda else 256,
            lane_s=120,
            # on a CPU the CUDA lane would only skip: the same tests' CPU side, one file
            lane_select=(
                ["-m", "cuda", "tests"]
                if cuda
                else ["tests/test_devices.py", "-k", "geometry or single"]
            ),
            parity_shape=dict(n_layer=1, n_head=2, d_model=32, seq_len=16),
            parity_batch=4,
            optim_args=["--set", "small"],
            optim_s=60,
            shape=toy,
            batch=8,
            vocab=256,
            steps=6,
            converge_steps=30,
            converge_shape=dict(n_layer=1, n_head=2, d_model=64, seq_len=32),
            compiled_models=MODELS if cuda else ("gpt",),
            budget_s=170.0,
        )


@dataclass
class Part:
    title: str
    lines: list[str] = field(default_factory=list)
    ok: bool = True
    seconds: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -- 1. environment ---------------------------------------------------------------------------


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(plan: Plan) -> Part:
    part = Part("Environment")
    d = plan.device
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = [
        (
            "device",
            torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or "cpu",
        ),
        ("driver", _driver() if d.type == "cuda" else "-"),
        ("torch", torch.__version__),
        ("CUDA (torch build)", str(torch.version.cuda)),
        ("triton", triton_version),
        ("python", platform.python_version()),
        ("CPU cores", str(os.cpu_count())),
    ]
    n = plan.copy_mib * 2**20 // 4
    src = torch.empty(n, device=d)
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), d, 10)
    rows.append(
        (
            f"device copy bandwidth ({plan.copy_mib} MiB, read + write)",
            f"{2 * n * 4 / copy_s / 1e9:,.0f} GB/s",
        )
    )
    m = plan.matmul_n
    a = torch.randn(m, m, device=d, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=d, dtype=torch.bfloat16)
    mm_s = _timed(lambda: a @ b, d, 10)
    rows.append((f"bf16 matmul ({m} x {m} x {m})", f"{2 * m**3 / mm_s / 1e12:,.1f} TFLOP/s"))
    part.lines += ["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows]]
    return part


# -- 2. the CUDA test lane --------------------------------------------------------------------

_OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def test_lane(plan: Plan) -> Part:
    part = Part("Test lane" + (" (CUDA)" if plan.device.type == "cuda" else " (CPU side, quick)"))
    try:
        import pytest  # noqa: F401
    except ImportError:
        part.ok = False
        part.lines.append(
            "pytest is not installed here: the lane did not run (pip install -e .[dev])."
        )
        return part
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *plan.lane_select]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=plan.lane_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            timed_out = True
        log.seek(0)
        text = log.read()
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "xfailed")}
    failures = []
    for line in text.splitlines():
        m = re.match(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
        if m:
            key = {"XFAIL": "xfailed", "XPASS": "passed"}.get(m[2], m[2].lower())
            counts[key] += 1
            if m[2] in ("FAILED", "ERROR"):
                failures.append(m[1])
    part.lines.append(f"`{' '.join(['pytest', *plan.lane_select])}` (time box {plan.lane_s} s)")
    part.lines.append("")
    part.lines.append(
        ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + (
            f"; **time box reached**, the lane was stopped after {sum(counts.values())} tests"
            if timed_out
            else ""
        )
    )
    if not timed_out and proc.returncode not in (0, 5):  # 5: nothing collected
        tail = [x for x in text.splitlines() if x.strip()][-3:]
        if not failures:
            part.lines += [
                "",
                f"pytest exited with status {proc.returncode}:",
                "",
                "```",
                *tail,
                "```",
            ]
    if failures:
        part.lines += ["", "failed:", *[f"- `{f}`" for f in failures[:40]]]
    part.ok = not failures and (proc.returncode in (0, 5) or timed_out)
    return part


# -- 3. compiled vs eager gradients -----------------------------------------------------------


def parity(plan: Plan) -> Part:
    from spheretorch.models import build_model, make_config
    from spheretorch.train.compile_check import grad_parity

    part = Part("Compiled vs eager gradients")
    d = plan.device
    backend = "inductor" if d.type == "cuda" else "aot_eager"
    shape = plan.parity_shape
    part.lines += [
        f"Per-parameter relative L2 error of the compiled model's gradients against eager "
        f"ones (backend {backend}; shape {shape}, batch {plan.parity_batch}, vocabulary 2048); "
        "the compile check of every `--compile` run does the same on its first batch.",
        "",
        "| model | dtype | loss (eager) | loss diff | worst parameter | error | allowed | |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for name, kind, options in PARITY_RUNS:
        for dtype in (torch.float32, torch.bfloat16):
            if plan.out_of_time(reserve=plan.budget_s / 2):  # leave the throughput its time
                part.lines.append(
                    f"| {name} | {dtype} | not run: the check's time budget is spent |"
                )
                continue
            torch._dynamo.reset()
            torch.manual_seed(0)
            config = make_config(kind, vocab_size=2048, **shape, **options)
            model = build_model(kind, config).to(d)
            x = torch.randint(0, 2048, (plan.parity_batch, shape["seq_len"]), device=d)
            y = torch.randint(0, 2048, (plan.parity_batch, shape["seq_len"]), device=d)
            compiled = torch.compile(model, backend=backend)

            def loss_of(
                m: Any, x: torch.Tensor = x, y: torch.Tensor = y, dtype: torch.dtype = dtype
            ) -> Callable[[], torch.Tensor]:
                def run() -> torch.Tensor:
                    ctx = (
                        torch.autocast(d.type, dtype=dtype)
                        if dtype != torch.float32
                        else contextlib.nullcontext()
                    )
                    with ctx:
                        return m(x, y)[1]

                return run

            checked = grad_parity(model, loss_of(model), loss_of(compiled), dtype)
            p = checked.parity
            worst, err = p.worst
            diff = abs(float(checked.compiled_loss) - float(checked.eager_loss))
            part.ok &= p.ok
            dtype_text = str(dtype).removeprefix("torch.")
            verdict = "ok" if p.ok else "**WRONG**"
            part.lines.append(
                f"| {name} | {dtype_text} | {float(checked.eager_loss):.4f} | {diff:.1e} | "
                f"`{worst}` | {err:.2e} | {p.tolerance:g} | {verdict} |"
            )
            del model, compiled, checked
    return part


# -- 4. optimizer steps -----------------------------------------------------------------------


def optim_table(plan: Plan, out: Path) -> Part:
    part = Part("Optimizer step")
    script = ROOT / "benchmarks" / "optim_step.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    helptext = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    ).stdout
    args = [sys.executable, str(script), "--device", plan.device.type, *plan.optim_args]
    md = out.with_name(out.stem + "_optim_step.md")
    has_md, has_quick = "--md-out" in helptext, "--quick" in helptext
    if has_md:
        args += ["--md-out", str(md)]
    if plan.quick:
        args += ["--quick"] if has_quick else ["--reps", "3", "--warmup", "1"]
    part.lines.append(f"`{' '.join(['benchmarks/optim_step.py', *args[2:]])}`")
    part.lines.append("")
    if not has_md:
        part.lines.append(
            "(this optim_step.py has no `--md-out`: its printed tables follow as they are)"
        )
        part.lines.append("")
    try:
        run = subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=plan.optim_s, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        part.ok = False
        part.lines.append(f"**time box of {plan.optim_s} s reached**: no table")
        return part
    if run.returncode != 0:
        part.ok = False
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        part.lines += [f"optim_step.py failed (exit {run.returncode}):", "", "```", *tail, "```"]
        return part
    text = md.read_text() if has_md and md.exists() else run.stdout
    if has_md and md.exists():
        md.unlink()
    part.lines.append(text.strip())
    return part


# -- 5. training throughput -------------------------------------------------------------------


def _synthetic_text(vocab: int, n: int, path: Path) -> None:
    """``n`` random characters over exactly ``vocab`` distinct ones (a char vocabulary of
    that size: the lm head of a BPE model, with no tokenizer and no download)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    alphabet = [chr(0x4E00 + i) for i in range(vocab)]  # CJK ideographs: one char each
    path.write_text("".join(alphabet) + "".join(alphabet[i] for i in ids), encoding="utf-8")


def _trainer(plan: Plan, model: str, **kw: Any) -> Any:
    from spheretorch.train import TrainConfig, Trainer

    config = TrainConfig(model=model, preset="smoke", device=plan.device.type, **kw)
    return Trainer(config, None, save_checkpoints=False)


def throughput(plan: Plan, workdir: Path) -> Part:
    from spheretorch.train.trainer import UNTIMED_WARMUP_STEPS

    part = Part("Training throughput")
    text = workdir / "synthetic.txt"
    tokens_needed = 20 * plan.batch * plan.shape["seq_len"]
    _synthetic_text(plan.vocab, max(tokens_needed, 200_000), text)
    dtype = "bfloat16" if plan.device.type == "cuda" else "float32"
    part.lines += [
        f"Through `Trainer` (the `train` command's loop: clipping, the recipe's optimizer, the "
        f"non-finite decision): shape {plan.shape}, batch {plan.batch}, vocabulary "
        f"{plan.vocab} (a synthetic text), {dtype}. {UNTIMED_WARMUP_STEPS} warm-up steps, then "
        f"{plan.steps} timed steps; ms/step, tokens/s and MFU are the timed steps', warm-up "
        "(compilation and the compile check included) is reported apart."
        + (
            ""
            if plan.compiled_models == MODELS
            else f" Compiled: {', '.join(plan.compiled_models)} only (inductor's C++ compiles "
            "take tens of seconds each on a CPU; the parity part above compiles every model)."
        ),
        "",
        "| model | mode | ms/step | tokens/s | MFU | vs GPT same mode | warm-up s | compile s "
        "| compile check | host sync/step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    results: dict[tuple[str, bool], dict[str, Any]] = {}
    for compiled in (False, True):
        for model in plan.compiled_models if compiled else MODELS:
            if plan.out_of_time(reserve=20):
                results[(model, compiled)] = {"error": "not run: the check's time budget is spent"}
                continue
            torch._dynamo.reset()
            steps = UNTIMED_WARMUP_STEPS + plan.steps
            try:
                t = _trainer(
                    plan,
                    model,
                    data=str(text),
                    steps=steps,
                    eval_interval=steps,
                    eval_batches=1,
                    batch_size=plan.batch,
                    lr=plan.lr[model] if plan.lr else None,
                    dtype=dtype,
                    compile=compiled,
                    model_options=dict(plan.shape),
                )
                s = t.train()
                s["device_skip"] = t.device_skip
            except Exception as e:  # one row says why; the others still run
                s = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            finally:
                with contextlib.suppress(NameError):
                    del t
                if plan.device.type == "cuda":
                    torch.cuda.empty_cache()
            results[(model, compiled)] = s
    for (model, compiled), s in results.items():
        mode = "compiled" if compiled else "eager"
        if "error" in s:
            part.ok &= s["error"].startswith("not run")
            part.lines.append(f"| {model} | {mode} | failed: {s['error']} | | | | | | | |")
            continue
        base = results.get(("gpt", compiled), {})
        rel = s["ms_per_step"] / base["ms_per_step"] if base.get("ms_per_step") else None
        check = s.get("compile_check")
        if check is not None:
            part.ok &= bool(check["ok"])
            check_text = ("ok" if check["ok"] else "**WRONG**") + f" ({check['worst_error']:.1e})"
        else:
            check_text = "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
        rel_text = "-" if rel is None else f"{rel:.2f}x"
        compile_text = "-" if s["compile_s"] is None else f"{s['compile_s']:.1f}"
        sync = "none" if s["device_skip"] else "one"
        part.lines.append(
            f"| {model} | {mode} | {s['ms_per_step']:.1f} | {s['tokens_per_s']:,.0f} | {mfu} | "
            f"{rel_text} | {s['warmup_s']:.1f} | {compile_text} | {check_text} | {sync} |"
        )
    return part


# -- 6. convergence ---------------------------------------------------------------------------


def convergence(plan: Plan) -> Part:
    part = Part("Convergence")
    part.lines += [
        f"Each model's recipe on the built-in tinyshakespeare (char), shape {plan.converge_shape}, "
        f"{plan.converge_steps} steps, eager: the validation loss must fall by at least 0.3.",
        "",
        "| model | optimizer | val loss at step 0 | val loss at the end | |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for model in MODELS:
        t = _trainer(
            plan,
            model,
            steps=plan.converge_steps,
            eval_interval=plan.converge_steps,
            eval_batches=2,
            batch_size=16,
            model_options=dict(plan.converge_shape),
        )
        start = t.evaluate()
        end = t.train()["final_val_loss"]
        ok = end is not None and math.isfinite(end) and end < start - 0.3
        part.ok &= ok
        end_text = "non-finite" if end is None else f"{end:.3f}"
        verdict = "ok" if ok else "**did not learn**"
        part.lines.append(f"| {model} | {t.config.optim} | {start:.3f} | {end_text} | {verdict} |")
    return part


# -- the report -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if cuda else "cpu",
        help="cuda (the default where CUDA is present) or cpu",
    )
    ap.add_argument("--quick", action="store_true", help="every part at toy sizes (CPU: < 3 min)")
    ap.add_argument("--out", help="the report (default: benchmarks/results/gpu_check/<device>.md)")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("env", "tests", "parity", "optim", "throughput", "convergence"),
        help="parts to leave out",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        print("gpu_check: error: --device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    name = f"{args.device}{'-quick' if args.quick else ''}.md"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu_check" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = Plan.make(device, args.quick)
    torch.manual_seed(0)
    start = time.perf_counter()
    parts: list[Part] = []
    with tempfile.TemporaryDirectory() as tmp:
        steps: list[tuple[str, Callable[[], Part]]] = [
            ("env", lambda: environment(plan)),
            ("tests", lambda: test_lane(plan)),
            ("parity", lambda: parity(plan)),
            ("optim", lambda: optim_table(plan, out)),
            ("throughput", lambda: throughput(plan, Path(tmp))),
            ("convergence", lambda: convergence(plan)),
        ]
        for key, run in steps:
            if key in args.skip:
                continue
            t0 = time.perf_counter()
            print(f"gpu_check: {key} ...", file=sys.stderr, flush=True)
            try:
                part = run()
            except Exception as e:
                part = Part(key, ok=False)
                part.lines += ["**failed**:", "", "```", *traceback.format_exception_only(e), "```"]
            part.seconds = time.perf_counter() - t0
            print(
                f"gpu_check: {key}: {'ok' if part.ok else 'FAILED'} ({part.seconds:.0f} s)",
                file=sys.stderr,
            )
            parts.append(part)
    total = time.perf_counter() - start
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quick = " --quick" if args.quick else ""
    lines = [
        f"# GPU check: {args.device}{' (quick)' if args.quick else ''}",
        "",
        f"`python benchmarks/gpu_check.py --device {args.device}{quick}` "
        f"at {stamp}: {total:.0f} s in all; "
        + (
            "**every part passed**."
            if all(p.ok for p in parts)
            else "**some parts FAILED** (below)."
        ),
        "",
        "| part | result | seconds |",
        "| --- | --- | ---: |",
        *[f"| {p.title} | {'ok' if p.ok else '**FAILED**'} | {p.seconds:.0f} |" for p in parts],
    ]
    for p in parts:
        lines += ["", f"## {p.title}", "", *p.lines]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"gpu_check: wrote {out} ({total:.0f} s)", file=sys.stderr)
    return 0 if all(p.ok for p in parts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
