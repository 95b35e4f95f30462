"""The CPU reference benchmark on SmolLM2-135M: DSpark vs DFlash, end to end, in one resumable command.

    python benchmarks/reference.py                 # everything (~2.3 h on 2 CPU cores), resumes where it stopped
    python benchmarks/reference.py --collect-only  # rebuild the JSON, plots and the BENCHMARKS.md table

Stages, each a plain command of the toolkit (printed before it runs) that resumes itself when interrupted:

1. ``data``: ``python -m data_prep`` on the three training sets of ``../shared/datasets/train`` (the same
   number of prompts from each), responses regenerated greedily by SmolLM2, with the target cache
   (``cache.enabled=true``) so training runs no target forward. The target computes in bfloat16 there where
   the machine does so natively (``data_dtype``; the recorded run used float32). Eval always verifies with
   the target in its own dtype.
2. ``train-dspark`` / ``train-dflash``: ``python -m train train=reference data=demo-offline`` for the DSpark
   draft (Markov head + confidence head) and the DFlash draft (no sequential head, no confidence head):
   same data, steps, seed, anchors and backbone.
   ``train-eagle3``: the EAGLE-3 baseline (``draft=eagle3 draft.num_layers=1``), same command, data, seed,
   rows per step and draft vocabulary, for the same TRAINING WALL CLOCK as train-dspark:
   ``benchmarks/equal_wall_train.py`` probes 12 EAGLE-3 steps and trains round(DSpark's summed step time /
   the probe's median step time) steps (the count is written beside the run; ``--eagle3-steps N`` fixes it).
3. ``eval-<draft>-t<T>`` (dspark, dflash, eagle3): ``python -m eval`` on the three sets of
   ``../shared/datasets/eval`` at T=0 and T=1 (EAGLE-3: chain drafting of gamma = 7 tokens, no tree). DSpark runs with both baselines (plain ``generate`` and prompt lookup, measured in the same run) and
   is calibrated; DFlash at T=0 runs with ``generate`` (for its greedy-identity check and its own speed-up).
   ``eval-<draft>-t0-tuned`` (dspark, dflash): the same T=0 eval with ``gamma_tuning.enabled=true``, the
   verification length chosen for this machine by an untimed pilot on other prompts of the eval sets and a
   timing of each length's round (``eval/gamma_tuning.py``), with ``generate`` timed beside it.
4. ``heldout-data`` + ``heldout-tau``: the eval prompts regenerated greedily by the target (``data_prep``) and
   ``benchmarks/heldout_tau.py`` on them: the target's probability mass inside the draft vocabulary (the
   ceiling the restriction sets) and each draft's greedy acceptance replayed on those answers.
5. ``train-dspark-fullvocab`` + ``eval-dspark-fullvocab-t0``: the ablation, DSpark over the full vocabulary
   for ``ablation_steps``; both wall times are reported. The recorded run's 334 steps give it the reduced
   draft's training time: 700 x 1.22 / 2.56 s a step, both rates from 30-step probes run side by side.
6. ``train-throughput`` (``benchmarks/train_throughput.py``: positions/s of the previous code vs this one, in
   one run; "after" is the variant the reference recipe trains with here, bf16 autocast on a native-bf16 CPU) and ``train-memory`` (``benchmarks/train_memory.py``: chunked vs naive loss peak memory).
7. ``cache-dtypes``: bytes per token and reconstruction error of every cache storage dtype on this run's
   rows, and the trained DSpark draft's expected acceptance when its features pass through each dtype.
   ``scheduler-live``: ``python -m eval ... scheduler_live.enabled=true`` with the DSpark draft: Algorithm 1
   (calibrated by that eval's own T=0 pass) vs every fixed verification length, measured
   with 1, 2, 4, 8 and 16 concurrent requests decoded together (``eval/live.py``).
8. ``collect`` (always): ``benchmarks/results/reference.json``, plots under ``benchmarks/results/reference/``
   and the table between the markers in BENCHMARKS.md (benchmarks/reference_report.py).

Completed stages and the wall time of every attempt are kept in ``<run dir>/state.json``; a finished stage is
skipped on the next call. ``--redo <stage>`` measures a stage again (the time of its earlier attempts is
kept apart as ``discarded_wall_s``). The sizes below are the recorded budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reference_report import ABLATION, DRAFT_NAMES, EAGLE3, TEMPERATURES, collect  # noqa: E402
from dspark_model.atomic import atomic_write_json  # noqa: E402

TRAIN_SOURCES = ("gsm8k-train", "livecodebench", "arena-hard-train")  # order of conf/prompts/shared-train.yaml


@dataclass
class Budget:
    """Everything that sizes the run; recorded in reference.json as train_budget / settings."""

    target: str = "smollm2-135m"  # a conf/target choice (tests use tiny)
    prompts_per_source: int = 400
    gen_tokens: int = 192
    cache_dtype: str = "bfloat16"
    # the target's dtype while it generates the training data and fills the cache: native = bfloat16 where this
    # CPU computes it natively (AMX / AVX512-BF16) or on a GPU, else the target's own (data_prep_throughput.py)
    data_dtype: str = "native"
    train_steps: int = 700
    draft_vocab_size: int = 8192  # both drafts; 0 = the full vocabulary
    draft_vocab_prior: float = 0.0  # draft.draft_vocab_prior of every training stage (dspark_model/vocab.py)
    ablation_steps: int = 334  # the full-vocabulary DSpark ablation (equal wall-clock, see above); 0 skips it
    eagle3_steps: int = 0  # EAGLE-3 baseline: 0 = DSpark's training wall clock (equal_wall_train.py); -1 skips it
    live_repeats: int = 2  # scheduler-live: timed runs per (N, policy); 2 gives the held-out best fixed length
    live_min_requests: int = 8  # scheduler-live: requests per run at least (2N otherwise; N = 1 timed only two)
    throughput_rows: int = 8  # rows per variant in the train-throughput stage; 0 skips it
    eval_prompts_per_source: int = 5
    eval_tokens: int = 96
    seed: int = 0
    threads: int = 2  # torch threads of train / eval stages; data_prep runs this many one-thread workers


def data_dtype_override(data_dtype: str) -> list[str]:
    """Budget.data_dtype -> the data stage's ``target.dtype`` override (none: the target's own dtype)."""
    if data_dtype == "native":
        import torch

        from dspark_model.target import cpu_has_native_bf16

        return ["target.dtype=bfloat16"] if torch.cuda.is_available() or cpu_has_native_bf16() else []
    return [f"target.dtype={data_dtype}"]


def stage_commands(run: Path, b: Budget) -> dict[str, list[str]]:
    """Every stage's command line, in run order (``collect`` is not a subprocess)."""
    py = sys.executable
    sources = [f"prompts.sources.{i}.num_samples={b.prompts_per_source}" for i in range(len(TRAIN_SOURCES))]
    cmds = {
        "data": [py, "-m", "data_prep", f"target={b.target}", "prompts=shared-train", *sources,
                 f"generation.max_new_tokens={b.gen_tokens}", "num_threads=1", f"workers={b.threads}", f"seed={b.seed}",
                 "cache.enabled=true", f"cache.dtype={b.cache_dtype}", *data_dtype_override(b.data_dtype),
                 f"out_dir={run / 'data'}"],
    }
    vocab = f"draft.draft_vocab_size={b.draft_vocab_size or 'null'}"
    heldout = [f"prompts.sources.{i}.num_samples={b.eval_prompts_per_source}" for i in range(3)]
    cmds["heldout-data"] = [py, "-m", "data_prep", f"target={b.target}", "prompts=shared-eval", *heldout,
                            f"generation.max_new_tokens={b.eval_tokens}", "num_threads=1", f"workers={b.threads}",
                            f"seed={b.seed}", f"out_dir={run / 'heldout'}"]

    def train(name: str, draft: str, vocab: str, steps: int) -> list[str]:
        return [py, "-m", "train", f"target={b.target}", "train=reference", f"draft={draft}", "data=demo-offline",
                vocab, f"draft.draft_vocab_prior={b.draft_vocab_prior:g}", f"data.path={run / 'data'}",
                f"train.max_steps={steps}", f"train.seed={b.seed}", f"train.output_dir={run / ('train-' + name)}",
                "logger.tensorboard=false"]

    for name in DRAFT_NAMES:
        cmds[f"train-{name}"] = train(name, name, vocab, b.train_steps)
    if b.eagle3_steps >= 0:  # after train-dspark: its step times set EAGLE-3's step count
        eagle3 = train(EAGLE3, EAGLE3, vocab, b.eagle3_steps or b.train_steps) + ["draft.num_layers=1"]
        if not b.eagle3_steps:
            eagle3 = [py, str(ROOT / "benchmarks" / "equal_wall_train.py"), "--reference",
                      str(run / "train-dspark" / "metrics.jsonl"), "--", *eagle3[1:]]
        cmds[f"train-{EAGLE3}"] = eagle3
    if b.ablation_steps:
        cmds[f"train-{ABLATION}"] = train(ABLATION, "dspark", "draft.draft_vocab_size=null", b.ablation_steps)
    baseline = [EAGLE3] if b.eagle3_steps >= 0 else []

    def evaluate(name: str, t: float, folder: str, *extra: str) -> list[str]:
        return [py, "-m", "eval", f"draft={run / ('train-' + name) / 'final'}", "prompts=shared-eval",
                f"num_prompts={b.eval_prompts_per_source}", f"max_new_tokens={b.eval_tokens}", f"temperature={t:g}",
                f"seed={b.seed}", f"cpu_threads={b.threads}", f"out_dir={run / 'eval' / folder}", *extra]

    for name in (*DRAFT_NAMES, *baseline, *([ABLATION] if b.ablation_steps else [])):
        for t in (TEMPERATURES if name in (*DRAFT_NAMES, EAGLE3) else (0.0,)):
            first = name == "dspark"
            cmds[f"eval-{name}-t{t:g}"] = evaluate(
                name, t, f"{name}-t{t:g}", f"baselines.generate={str(first or t == 0).lower()}",
                f"baselines.prompt_lookup={str(first).lower()}",
                # the T=0 calibration is the one a server would use; T=1 is reported beside it
                f"calibration.write_to_checkpoint={str(t == 0).lower()}")
    for name in DRAFT_NAMES:  # the verification length chosen for this machine (eval/gamma_tuning.py)
        cmds[f"eval-{name}-t0-tuned"] = evaluate(name, 0.0, f"{name}-t0-tuned", "gamma_tuning.enabled=true",
                                                 "baselines.generate=true", "baselines.prompt_lookup=false",
                                                 "calibration.enabled=false")
    drafts = [f"{n}={run / ('train-' + n) / 'final'}" for n in (*DRAFT_NAMES, *([ABLATION] if b.ablation_steps else []))]
    cmds["heldout-tau"] = [py, str(ROOT / "benchmarks" / "heldout_tau.py"), "--data", str(run / "heldout"),
                           "--threads", str(b.threads), "--out", str(run / "heldout_tau.json"), "--draft", *drafts]
    if b.throughput_rows:
        cmds["train-throughput"] = [py, str(ROOT / "benchmarks" / "train_throughput.py"), "--rows",
                                    str(b.throughput_rows), "--repeats", "1", "--threads", str(b.threads),
                                    "--vocab", str(b.draft_vocab_size or 8192), "--bf16",
                                    "--out", str(run / "train_throughput.json")]
    cmds["train-memory"] = [py, str(ROOT / "benchmarks" / "train_memory.py"),
                            "--out", str(run / "train_memory.json")]
    cmds["cache-dtypes"] = [py, str(ROOT / "benchmarks" / "cache_dtypes.py"), "--data", str(run / "data"),
                            "--draft", str(run / "train-dspark" / "final"), "--out", str(run / "cache_dtypes.json")]
    # Algorithm 1 live (eval/live.py): the DSpark draft, calibrated by this eval's own T=0 single-request pass
    # (the same prompts and temperature as eval-dspark-t0), which leaves the checkpoint's calibration.json alone
    cmds["scheduler-live"] = [
        py, "-m", "eval", f"draft={run / 'train-dspark' / 'final'}", "prompts=shared-eval",
        f"num_prompts={b.eval_prompts_per_source}", f"max_new_tokens={b.eval_tokens}", "temperature=0",
        f"seed={b.seed}", f"cpu_threads={b.threads}", f"out_dir={run / 'eval' / 'scheduler-live'}",
        "baselines.generate=false", "baselines.prompt_lookup=false", "calibration.write_to_checkpoint=false",
        "scheduler_live.enabled=true", f"scheduler_live.repeats={b.live_repeats}",
        f"scheduler_live.min_requests={b.live_min_requests}"]
    return cmds


class State:
    """``state.json``: per stage, done or not, attempts and wall seconds summed over attempts."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {"done": False, "attempts": 0, "wall_s": 0.0})

    def save(self, stage: str | None = None) -> None:
        """Write the state. With ``stage``, under a lock, merge only that stage's record into what is on disk,
        so that several ``--only`` runners on one run folder (one per core) keep each other's records."""
        if stage is None:
            atomic_write_json(self.path, self.data)
            return
        import fcntl

        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}
            disk.setdefault("stages", {})[stage] = self.data["stages"][stage]
            for key, value in self.data.items():
                disk.setdefault(key, value)
            self.data["stages"] = {**disk["stages"], **{stage: self.data["stages"][stage]}}
            atomic_write_json(self.path, disk)


def run_stage(name: str, cmd: list[str], state: State, log_dir: Path) -> None:
    """Run one stage; its output goes to the terminal and to ``logs/<name>.log``; wall time is recorded."""
    rec = state.stage(name)
    if rec["done"]:
        print(f"[reference] {name}: done earlier ({rec['wall_s']:.0f} s), skipped", flush=True)
        return
    print(f"\n[reference] {name}: {shlex.join(cmd)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rec["attempts"] += 1
    code = None
    try:
        with open(log_dir / f"{name}.log", "a") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk.decode(errors="replace"))
            code = proc.wait()
    finally:
        rec["wall_s"] += time.monotonic() - start
        rec["done"] = code == 0
        state.save(name)
    if code != 0:
        raise SystemExit(f"[reference] stage {name} failed with exit code {code}; see {log_dir / (name + '.log')}. "
                         f"Fix the cause and run the same command again: finished stages are skipped and this "
                         f"one resumes.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "reference"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reference.json"))
    parser.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"),
                        help="file whose reference-benchmark section is rewritten ('' to skip)")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild the JSON, plots and table")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (then collect)")
    parser.add_argument("--redo", nargs="*", default=[], help="forget that these stages finished")
    parser.add_argument("--dry-run", action="store_true", help="print the stage commands and exit")
    for f, default in asdict(Budget()).items():
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    budget = Budget(**{f: getattr(args, f) for f in asdict(Budget())})
    run = Path(args.run_dir).resolve()
    cmds = stage_commands(run, budget)
    if args.dry_run:  # prints only: records no budget, so a real run may still pick other sizes
        for name, cmd in cmds.items():
            print(f"{name}: {shlex.join(cmd)}")
        return
    run.mkdir(parents=True, exist_ok=True)
    state = State(run / "state.json")
    recorded = state.data.get("budget")
    if recorded:  # a field added since that run started (e.g. eagle3_steps) counts as its default
        recorded = {**asdict(Budget()), **recorded}
    if recorded and recorded != asdict(budget) and not args.collect_only:
        raise SystemExit(f"[reference] {run} was started with {recorded}; this call asks for {asdict(budget)}. "
                         f"Pass the same sizes to resume, or use another --run-dir for a new run.")
    state.data["budget"] = asdict(budget)
    state.data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if args.only is not None:  # a partial runner: other runners may be writing the same state
        state.data.pop("finished", None)
    for name in args.redo:  # a fresh measurement: earlier attempts' time is kept apart as discarded
        rec = state.stage(name)
        rec["discarded_wall_s"] = rec.get("discarded_wall_s", 0.0) + rec["wall_s"]
        rec.update(done=False, attempts=0, wall_s=0.0)
    state.save()
    if not args.collect_only:
        os.environ.setdefault("OMP_NUM_THREADS", str(budget.threads))
        for name, cmd in cmds.items():
            if args.only is None or name in args.only:
                run_stage(name, cmd, state, run / "logs")
        if args.only is None:
            state.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            state.save()
    collect(run, state.data, Path(args.out), Path(args.benchmarks_md) if args.benchmarks_md else None)


if __name__ == "__main__":
    main()
