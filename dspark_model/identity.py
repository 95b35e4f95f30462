"""Which target a draft belongs to: its name (id, revision) and a fingerprint of its weights.

A draft only fits the target it was trained against, and two models of the same size have the same shapes,
so shape checks alone let a draft run (and be calibrated) against the wrong model. Training records the
target's id, revision and ``weights_fingerprint`` in the draft's config.json; eval compares them with the
target it loaded before running (``identity_problems``), and calibration.json records the same identity.

The fingerprint: the shapes of the embedding and LM head plus 256 values of each, read at evenly spaced
positions of the flattened matrix (a tied head is not sampled twice). Two fingerprints match when the shapes
are equal and the sampled values have a cosine similarity of at least 0.9. Measured: the same weights in
float32 / bfloat16 / float16 give 0.99999, SmolLM2's Q4_1 weights quantized once more 0.996 (so a quantized
copy of the right model passes), while a different model gives about 0 (0.002 for SmolLM2 vs random values of
its scale, -0.06 between two tiny random targets: the spread of 256 samples is ~0.06). Reading 512 values
costs microseconds, and an exact hash would fail on every dtype change.
"""

from __future__ import annotations

import torch

SAMPLES = 256
MIN_COSINE = 0.9


def _samples(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    idx = torch.arange(SAMPLES, device=flat.device) * (flat.numel() - 1) // (SAMPLES - 1)  # integer: exact
    return [float(f"{v:.5g}") for v in flat[idx].float().cpu().tolist()]


def weights_fingerprint(target) -> dict:
    """The fingerprint of a loaded ``dspark_model.target.Target`` (see the module docstring)."""
    embed, head = target.embed.weight, target.lm_head.weight
    tied = head.data_ptr() == embed.data_ptr()
    return {"method": f"strided-{SAMPLES}", "embedding_shape": list(embed.shape), "lm_head_shape": list(head.shape),
            "embedding_samples": _samples(embed), "lm_head_samples": None if tied else _samples(head)}


def _cosine(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    norm = x.norm() * y.norm()
    return float(x @ y / norm) if norm > 0 else float(torch.equal(x, y))


def fingerprint_problem(recorded: dict, current: dict) -> str | None:
    """Why two fingerprints differ (a short phrase), or None when they match."""
    for key in ("embedding_shape", "lm_head_shape"):
        if list(recorded.get(key) or []) != current[key]:
            return f"{key.replace('_', ' ')} {recorded.get(key)} recorded, {current[key]} loaded"
    for key in ("embedding_samples", "lm_head_samples"):
        a, b = recorded.get(key), current[key]
        if a is None or b is None or len(a) != len(b):
            continue
        cosine = _cosine(a, b)
        if cosine < MIN_COSINE:
            return f"{key.split('_')[0]} weights differ (sample cosine {cosine:.3f} < {MIN_COSINE})"
    return None


def identity_problems(named: dict, target_id: str, revision: str | None, target) -> list[str]:
    """How the target a draft names (config.json's ``target``: id, revision, fingerprint) differs from the
    one loaded (``target_id`` / ``revision`` as the user configured it, and the loaded ``target``)."""
    problems = []
    if named.get("id") and named["id"] != target_id:
        problems.append(f"id {named['id']!r} recorded, {target_id!r} loaded")
    if named.get("revision") and revision and named["revision"] != revision:
        problems.append(f"revision {named['revision']} recorded, {revision} loaded")
    if isinstance(named.get("fingerprint"), dict):
        problem = fingerprint_problem(named["fingerprint"], weights_fingerprint(target))
        if problem:
            problems.append(problem)
    return problems


def identity_record(target_id: str, revision: str | None, target) -> dict:
    """What calibration.json says about the target it was fitted with."""
    return {"id": target_id, "revision": revision, "fingerprint": weights_fingerprint(target)}


def refuse_mismatch(what: str, problems: list[str], allow: bool, flag: str, fix: str, error: type[Exception],
                    logger) -> None:
    """One rule for "made for another target": nothing to say when ``problems`` is empty; else a warning when
    the user set ``flag`` (``allow``), or ``error`` naming the problems, the fix and the flag."""
    if not problems:
        return
    message = f"{what} for another target: {'; '.join(problems)}"
    if allow:
        logger.warning("%s (continuing: %s=true)", message, flag)
        return
    raise error(f"{message}. Fix: {fix}, or set {flag}=true if you know better")
