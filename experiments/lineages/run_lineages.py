"""The lineage benchmark (issue 27 item 5): real-world lineages of stories260K against unrelated controls,
the library beside an AWM-style statistic and the permutation-only statistic of ``experiments/trace``.

    python experiments/lineages/run_lineages.py --part stories    # the lineages (lineages.py)
    python experiments/lineages/run_lineages.py --part controls   # the unrelated pairs
    python experiments/lineages/run_lineages.py --part minilm     # all-MiniLM-L6-v2 (+ random inits)
    python experiments/lineages/run_lineages.py --part report     # results.md from the parts
    (--fast: one seed and fewer controls, a smoke run)

Lineages (:mod:`lineages`, each re-charted by a random signed permutation): added tokens + fine-tune, the
middle block dropped, blocks repeated (depth up-scaling), width pruned to 3/4 + distillation, Q8_0 / Q4_0
round trips, folded + rotated. Unrelated controls: pairs among the independently trained
stories260K-shaped models (``experiments/calibration/independent.py``, seeds 40-80, held out from the
package's reference null; :data:`INDEPENDENT_PAIRS` of their 820 pairs, a fixed random subset),
stories260K against each of them, stories260K against random inits of its config, and random inits
against each other — for ``trace``'s test; and, for the two other tests the lineages use, stories260K
against the independents (rotation test) and against the independents pruned
to 3/4 by a random partial signed injection (width test). The AWM-style z-score of a pair is read against
every unrelated pair of the ``trace`` families (leave-one-out for the controls themselves) and called a
detection when ``z > Φ⁻¹(0.99)`` (AWM reports z without a level: this reading assumes a normal null).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parents[1]))

import lineages as LG  # noqa: E402

from experiments.common import clopper_pearson_upper, parts_main, read_parts, report_head  # noqa: E402

RESULTS = HERE / "results"
LEVEL = LG.LEVEL
Z_LEVEL = NormalDist().inv_cdf(1 - LEVEL)
INDEPENDENT_SEEDS = range(40, 81)
#: how many of the 820 pairs among the 41 independents are used (a fixed random subset; time-bound)
INDEPENDENT_PAIRS = 300


def _independent(seed: int) -> torch.nn.Module:
    from harness import load_dir
    from independent import independent_model_dir

    return load_dir(independent_model_dir(seed))


def part_stories(fast: bool) -> dict[str, Any]:
    base = LG.base_model()
    out: dict[str, Any] = {"lineages": []}
    for name in LG.LINEAGES:
        for seed in range(1 if fast else 3):
            tgt, truth = LG.make_lineage(name, base, seed)
            rec = LG.evaluate(base, tgt, truth, seed=seed, memory=True)
            rec.update(lineage=name, seed=seed)
            out["lineages"].append(rec)
            print(f"[stories] {name} {seed}: p {rec['ours_p']:.2g} awm {rec['awm']:.3f}", flush=True)
    return out


def control_pairs(fast: bool) -> dict[str, list[tuple[Any, Any]]]:
    """The unrelated pairs by family, as ``(key_a, key_b)``: ``("ind", seed)``, ``("rand", seed)`` or
    ``"base"``."""
    ind = list(INDEPENDENT_SEEDS)[: 8 if fast else None]
    n_rand = 4 if fast else 40
    every = list(itertools.combinations(ind, 2))
    pick = np.random.default_rng(0).permutation(len(every))[: 28 if fast else INDEPENDENT_PAIRS]
    return {
        "independent pairs": [(("ind", every[i][0]), ("ind", every[i][1])) for i in sorted(pick)],
        "stories260K vs independent": [("base", ("ind", s)) for s in ind],
        "stories260K vs random init": [("base", ("rand", s)) for s in range(n_rand)],
        "random init pairs": [(("rand", 100 + 2 * k), ("rand", 101 + 2 * k)) for k in range(n_rand)],
    }


def part_controls(fast: bool) -> dict[str, Any]:
    from hf_bdgauge.injection import PartialSignedInjection
    from hf_bdgauge.transport.pruned import prune_model

    base = LG.base_model()
    cache: dict[Any, torch.nn.Module] = {"base": base}

    def model(key: Any) -> torch.nn.Module:
        if key not in cache:
            kind, seed = key
            cache[key] = _independent(seed) if kind == "ind" else LG.random_init(base.config, seed)
        return cache[key]

    out: dict[str, Any] = {"families": {}, "other_tests": {}}
    for fam, pairs in control_pairs(fast).items():
        recs = []
        for k, (a, b) in enumerate(pairs):
            rec = LG.evaluate(model(a), model(b), seed=k)
            rec.update(pair=[str(a), str(b)])
            recs.append(rec)
        out["families"][fam] = recs
        print(f"[controls] {fam}: {sum(r['detected'] for r in recs)}/{len(recs)} at 0.01", flush=True)
    ind = list(INDEPENDENT_SEEDS)[: 8 if fast else None]
    d = int(base.config.hidden_size)
    rot, width = [], []
    for k, s in enumerate(ind):
        rot.append(LG.evaluate(base, model(("ind", s)), {"kind": "rotation"}, seed=k))
        pruned = prune_model(model(("ind", s)), PartialSignedInjection.random(d, 3 * d // 4, seed=k))
        width.append(LG.evaluate(base, pruned, {"kind": "width"}, seed=k))
    out["other_tests"] = {
        "rotation test (orthogonal_weights): stories260K vs independent": rot,
        "width test (estimate_pruned_width): stories260K vs independent pruned to 3/4": width,
    }
    return out


#: the MiniLM lineages (LayerNorm: no fold + rotate; an encoder: no distillation to heal a pruned width)
MINILM_LINEAGES = ("added_tokens", "drop_block", "repeat_blocks", "q8_0", "q4_0")


def part_minilm(fast: bool) -> dict[str, Any]:
    """all-MiniLM-L6-v2's lineages, re-charted by ``+P`` and by ``−P`` (the charts LayerNorm admits),
    against random inits of its config."""
    from hf_bdgauge.real_models import real_model

    base, _ = real_model("all-minilm-l6-v2")
    out: dict[str, Any] = {"lineages": [], "controls": []}
    for name in MINILM_LINEAGES[: 2 if fast else None]:
        for flips in ("none", "all"):
            tgt, truth = LG.make_lineage(name, base, 0, flips=flips)
            rec = LG.evaluate(base, tgt, truth)
            rec.update(lineage=name, flips=flips)
            out["lineages"].append(rec)
            print(f"[minilm] {name} {flips}: p {rec['ours_p']:.2g} awm {rec['awm']:.3f}", flush=True)
            del tgt
    n = 2 if fast else 4
    for k in range(n):
        rec = LG.evaluate(base, LG.random_init(base.config, k), seed=k)
        rec.update(pair=["all-MiniLM-L6-v2", f"random init {k}"])
        out["controls"].append(rec)
    for k in range(n):
        a, b = LG.random_init(base.config, 100 + 2 * k), LG.random_init(base.config, 101 + 2 * k)
        rec = LG.evaluate(a, b, seed=k)
        rec.update(pair=[f"random init {100 + 2 * k}", f"random init {101 + 2 * k}"])
        out["controls"].append(rec)
    print(f"[minilm] controls: {sum(r['detected'] for r in out['controls'])}/{2 * n}", flush=True)
    return out


def render_minilm(m: dict[str, Any]) -> list[str]:
    """The MiniLM section of the report."""
    null = [r["awm"] for r in m["controls"]]
    L = [
        "## all-MiniLM-L6-v2 lineages (one seed each)\n",
        "Re-charted by `+P` and by `−P` (the charts LayerNorm admits); the AWM-style z is against the "
        "random-init controls below only (their scores barely spread, hence the size of z).\n",
    ]
    L.append(
        "| lineage | re-charted by | ours: detected | p | identified | correct | block map found (true) | "
        "seconds | AWM-style score (z) | perm-only p |"
    )
    L.append("| --- |" + " --- |" * 9)
    for r in m["lineages"]:
        bm = f"{r['block_map']} ({r['true_block_map']})" if r["true_block_map"] is not None else "–"
        z = f"{LG.awm_z(r['awm'], null):.1f}" if len(null) > 2 else "–"
        L.append(
            f"| {r['lineage']} | {'+P' if r['flips'] == 'none' else '−P'} | "
            f"{'yes' if r['detected'] else 'no'} | "
            f"{fmt_p(r['ours_p'])} | {r['identified']:.3f} | {r['accuracy']:.3f} | {bm} | "
            f"{r['seconds']:.1f} | {r['awm']:.3f} ({z}) | {fmt_p(r['perm_p'])} |"
        )
    c = m["controls"]
    L.append(
        "\nUnrelated (all-MiniLM-L6-v2 vs random inits, random-init pairs): "
        f"ours {_fp([r['detected'] for r in c])}, "
        f"perm-only {_fp([r['perm_p'] <= LEVEL for r in c])} at 0.01.\n"
    )
    return L


def part_file(fast: bool, part: str) -> str:
    return f"{'fast-' if fast else ''}{part}.json"


# ------------------------------------------------------------------------------------ report
def fmt_p(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return "< 1e-300" if x < 1e-300 else (f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}")


def _rate(flags: list[bool]) -> str:
    k, n = int(sum(flags)), len(flags)
    return f"{k}/{n}"


def _fp(flags: list[bool]) -> str:
    k, n = int(sum(flags)), len(flags)
    return f"{k}/{n} (≤ {clopper_pearson_upper(k, n):.3f})" if n else "–"


def awm_null(controls: dict[str, Any]) -> list[float]:
    """The AWM-style scores of every unrelated pair of the ``trace`` families (AWM's negative set)."""
    return [r["awm"] for recs in controls["families"].values() for r in recs]


def render(mode: str) -> str:
    parts = read_parts(RESULTS, PARTS, part_file, mode)
    how = """: stories260K (and all-MiniLM-L6-v2, last section) made into lineages here, each
re-charted by a random signed permutation, against unrelated controls; level 0.01. *ours*: `trace`
(block map when depths differ), `estimate_pruned_width` (narrower),
`estimate_gauge(method="orthogonal_weights")` (rotated); *identified*: the fraction of coordinates the
library calls identified; *correct*: the fraction whose source coordinate and sign are the planted
ones; *AWM-style*: mean matched embedding-column |cos| over the shared tokens, z against the unrelated
`trace` controls, detected when z > 2.33; *perm-only*: `experiments/trace`'s permutation-only test
(n/a where the shapes differ). Seconds and peak memory are ours': the peak is the larger of the
resident set's growth and the peak of traced Python/numpy allocations, in a second, traced run.
"""
    L = report_head("Lineage benchmark", how, __file__, mode, parts)
    null = awm_null(parts["controls"]) if "controls" in parts else []
    if "stories" in parts:
        L.append("## stories260K lineages\n")
        L.append(
            "| lineage | n | ours: detected at 0.01 | median p | identified | correct | block map found "
            "(true) | seconds | peak MiB | AWM-style score (z) | AWM-style detected | perm-only detected |"
        )
        L.append("| --- |" + " --- |" * 11)
        groups: dict[str, list] = {}
        for r in parts["stories"]["lineages"]:
            groups.setdefault(r["lineage"], []).append(r)
        for name, rs in groups.items():
            ident = [r["identified"] for r in rs if r["identified"] is not None]
            acc = [r["accuracy"] for r in rs if r.get("accuracy") is not None]
            maps = {str(r["block_map"]) for r in rs if r["block_map"] is not None}
            bm = (
                f"{' / '.join(sorted(maps))} ({rs[0]['true_block_map']})"
                if rs[0]["true_block_map"] is not None
                else "–"
            )
            awm = float(np.median([r["awm"] for r in rs]))
            z = [LG.awm_z(r["awm"], null) for r in rs] if len(null) > 2 else []
            perm = [r["perm_p"] for r in rs]
            L.append(
                f"| {name} | {len(rs)} | {_rate([r['detected'] for r in rs])} | "
                f"{fmt_p(float(np.median([r['ours_p'] for r in rs])))} | "
                f"{f'{np.mean(ident):.3f}' if ident else 'n/a'} | "
                f"{f'{np.mean(acc):.3f}' if acc else 'n/a'} | "
                f"{bm} | {np.median([r['seconds'] for r in rs]):.2f} | "
                f"{max(r['peak_mib'] for r in rs):.1f} | "
                f"{awm:.3f} ({f'{np.median(z):.1f}' if z else '–'}) | "
                f"{_rate([v > Z_LEVEL for v in z]) if z else '–'} | "
                f"{_rate([p <= LEVEL for p in perm]) if np.all(np.isfinite(perm)) else 'n/a'} |"
            )
        L.append("")
    if "controls" in parts:
        fams = parts["controls"]["families"]
        L.append("## Unrelated controls: false positives at 0.01 (exact 95 % upper bound)\n")
        L.append("| family | n | ours (`trace`) | AWM-style (z > 2.33, leave-one-out) | perm-only |")
        L.append("| --- | --- | --- | --- | --- |")
        every: dict[str, list[bool]] = {"ours": [], "awm": [], "perm": []}
        offset = 0
        for fam, recs in fams.items():
            awm_flags = []
            for i, r in enumerate(recs):
                rest = null[: offset + i] + null[offset + i + 1 :]
                awm_flags.append(LG.awm_z(r["awm"], rest) > Z_LEVEL)
            offset += len(recs)
            flags = {
                "ours": [r["detected"] for r in recs],
                "awm": awm_flags,
                "perm": [r["perm_p"] <= LEVEL for r in recs],
            }
            for k, v in flags.items():
                every[k] += v
            L.append(
                f"| {fam} | {len(recs)} | {_fp(flags['ours'])} | {_fp(flags['awm'])} | {_fp(flags['perm'])} |"
            )
        L.append(
            f"| **all unrelated pairs** | {len(every['ours'])} | {_fp(every['ours'])} | "
            f"{_fp(every['awm'])} | {_fp(every['perm'])} |"
        )
        L.append("")
        if "stories" in parts:
            from experiments.trace.run_trace import auc

            pos = [r["awm"] for r in parts["stories"]["lineages"]]
            L.append(
                f"AWM-style scores of the unrelated pairs: median {np.median(null):.3f}, max {max(null):.3f} "
                f"(sd {np.std(null, ddof=1):.3f}); ROC AUC of the score, stories260K lineages against them: "
                f"{auc(pos, null):.3f}.\n"
            )
        L.append("The other tests the lineages use, on unrelated pairs:\n")
        L.append("| test, pairs | n | false positives (the library's decision at 0.01) | median p |")
        L.append("| --- | --- | --- | --- |")
        for what, recs in parts["controls"]["other_tests"].items():
            L.append(
                f"| {what} | {len(recs)} | {_fp([r['detected'] for r in recs])} | "
                f"{fmt_p(float(np.median([r['ours_p'] for r in recs])))} |"
            )
        L.append("")
    if "minilm" in parts:
        L += render_minilm(parts["minilm"])
    L.append(
        "Not measured here: Gemma 3 270M lineages (not run in this round), the width-pruned MiniLM (no "
        "distillation for an encoder yet), AWM's attention-weight CKA (only its embedding statistic is "
        "implemented).\n"
    )
    return "\n".join(L) + "\n"


PARTS = {"stories": part_stories, "controls": part_controls, "minilm": part_minilm}


def main(argv: list[str] | None = None) -> int:
    return parts_main(argv, __doc__, PARTS, render, HERE / "results.md", part_file)


if __name__ == "__main__":
    raise SystemExit(main())
