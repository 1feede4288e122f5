"""Load a model with a gauge to a reference chart: ``GaugedModel.from_pretrained``.

Makes the local repo of revisions of ``examples/training.build_revision_repo`` and treats
``v1.0`` (stories260K) as the *reference*: the chart the community's objects (steering vectors,
SAEs, probes) were made in. ``v1.1-recharted`` is the same network in another residual chart.

1. The gauge v1.1 -> v1.0 (model chart -> reference chart) is **estimated** from activations on
   held-out text, both ends fingerprinted (``ModelRef.from_checkpoint``), compared with the
   planted one, and saved as a gauge directory (``Gauge.save_pretrained``).
2. ``GaugedModel.from_pretrained(v1.1, gauge=<dir>)`` loads the model and attaches the gauge
   (checked against the model's fingerprint); ``to_reference`` maps its hidden states into
   v1.0's chart, ``from_reference`` brings a v1.0 steering vector to it.
3. ``save_pretrained`` writes the model with the gauge in ``gauge/``; ``from_pretrained`` of that
   directory picks it up again without being told.
4. A gauge for the wrong model is refused (``FingerprintMismatchError``).
5. ``canonicalize()`` re-charts the weights in place: the model *is* v1.0 again, bit for bit.

Usage::

    python examples/load_gauged_model.py          # ~10 s on 2 CPU cores
    python examples/load_gauged_model.py --fast   # a few seconds (used by the tests)

Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples import common as ex  # noqa: E402
from examples import training as tr  # noqa: E402
from hf_bdgauge import Gauge, GaugedModel  # noqa: E402
from hf_bdgauge.errors import FingerprintMismatchError  # noqa: E402
from hf_bdgauge.estimate import estimate_gauge  # noqa: E402
from hf_bdgauge.options import CaptureOptions  # noqa: E402
from hf_bdgauge.provenance import ModelRef  # noqa: E402
from hf_bdgauge.transport.steering import SteeringVector  # noqa: E402
from hf_bdgauge.transport.steering_measure import percent_effect_preserved, steering_effect  # noqa: E402


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex.setup()
    checks = ex.Checks()
    report = ex.load_example("sae_and_steering_report")  # HAPPY / SAD contrast sets and PROMPTS
    res: dict[str, Any] = {}
    with ex.work_dir(args.out, "bdgauge-gauged-") as out:
        repo = tr.repo_from_args(args, out / "repo", with_finetune=False)
        ref_path, model_path = repo.path(tr.RevisionRepo.BASE), repo.path(tr.RevisionRepo.RECHARTED)

        # 1. estimate model chart -> reference chart, record both ends, save
        est = estimate_gauge(model_path, ref_path, repo.texts, capture=CaptureOptions(progress=False))
        est.source = ModelRef.from_checkpoint(model_path)
        est.target = ModelRef.from_checkpoint(ref_path)
        res["estimate_equals_planted"] = est.element == repo.planted[tr.RevisionRepo.RECHARTED].inverse()
        checks("estimate equals the planted gauge (inverted: v1.1 -> v1.0)", res["estimate_equals_planted"])
        gauge_dir = out / "gauge-v1.1-to-v1.0"
        est.save_pretrained(gauge_dir)
        print(f"estimated and saved {gauge_dir}:\n{est.summary()}\n")

        # 2. load with the gauge
        gm = GaugedModel.from_pretrained(model_path, gauge=str(gauge_dir))
        print(f"loaded: {gm!r}")
        ref_model = ex.load_model(ref_path)
        tok = ex.load_tokenizer(ref_path)
        ids = repo.eval_ids[:2]
        with torch.no_grad():
            h_model = gm(ids, output_hidden_states=True).hidden_states
            h_ref = ref_model(ids, output_hidden_states=True).hidden_states
            dlogit = (gm(ids).logits - ref_model(ids).logits).abs().max().item()
        res["max_dh_to_reference"] = max(
            (gm.to_reference(a) - b).abs().max().item() for a, b in zip(h_model, h_ref)
        )
        res["max_dh_untransported"] = max((a - b).abs().max().item() for a, b in zip(h_model, h_ref))
        print(f"logits of v1.1 vs v1.0: max |Δ| {dlogit:.1e} (same function)")
        print(
            f"hidden states, all {len(h_model)} layers: max |to_reference(h_v1.1) − h_v1.0| = "
            f"{res['max_dh_to_reference']:.1e}  (without the gauge: {res['max_dh_untransported']:.2f})"
        )
        checks(
            "to_reference maps v1.1 hidden states onto v1.0's",
            res["max_dh_to_reference"] < 1e-4,
            f"{res['max_dh_to_reference']:.1e}",
        )

        enc = lambda ss: [tok(s, return_tensors="pt").input_ids for s in ss]  # noqa: E731
        vec = SteeringVector.from_mean_difference(ref_model, enc(report.HAPPY), enc(report.SAD), layers=[2])
        prompts = enc(report.PROMPTS)
        d_ref = torch.cat([steering_effect(ref_model, vec, p, 4.0) for p in prompts])
        d_model = torch.cat([steering_effect(gm.model, gm.from_reference(vec), p, 4.0) for p in prompts])
        d_raw = torch.cat([steering_effect(gm.model, vec, p, 4.0) for p in prompts])
        res["steering_preserved"] = percent_effect_preserved(d_ref, d_model)
        res["steering_preserved_untransported"] = percent_effect_preserved(d_ref, d_raw)
        print(
            f"a v1.0 steering vector on v1.1 via from_reference: {res['steering_preserved']:.3f}% of its "
            f"effect (used as is: {res['steering_preserved_untransported']:.1f}%)"
        )
        checks(
            "from_reference carries a v1.0 steering vector to v1.1 (>= 99.9%)",
            res["steering_preserved"] >= 99.9,
            f"{res['steering_preserved']:.3f}%",
        )

        # 3. save with the gauge, reload without naming it
        bundled = out / "v1.1-with-gauge"
        gm.save_pretrained(bundled)
        again = GaugedModel.from_pretrained(str(bundled))
        res["bundled_gauge_reloaded"] = again.gauge.element == gm.gauge.element
        print(f"\nsaved to {bundled} (model + gauge/); reloaded with gauge=None: {again!r}")
        checks("the bundled gauge is picked up on reload", res["bundled_gauge_reloaded"])

        # 4. a gauge for another model is refused
        try:
            GaugedModel.from_pretrained(ref_path, gauge=str(gauge_dir))
            res["wrong_model_refused"] = False
        except FingerprintMismatchError as e:
            res["wrong_model_refused"] = True
            print(f"attaching it to v1.0 instead is refused: {str(e).splitlines()[0][:160]}...")
        checks("a gauge whose source fingerprint does not match is refused", res["wrong_model_refused"])

        # 5. canonicalize: the weights become v1.0's
        gm.canonicalize()
        ref_sd = ref_model.state_dict()
        res["canonical_bitwise"] = all(torch.equal(t, ref_sd[k]) for k, t in gm.model.state_dict().items())
        print(
            f"after canonicalize(): is_canonical={gm.is_canonical}, weights equal v1.0's bit for bit: "
            f"{res['canonical_bitwise']}"
        )
        checks(
            "canonicalize() turns v1.1 into v1.0 bit for bit", res["canonical_bitwise"] and gm.is_canonical
        )
        res["gauge_summary"] = Gauge.from_pretrained(gauge_dir).summary()
    return checks.result(**res)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ex.example_parser(
        __doc__, fast_help="fewer estimation samples (for the tests)", out_help="keep the files here"
    )
    return ex.fast_or_full(p.parse_args(argv), eval_samples=(4, 8))


main = ex.example_main(run, parse_args, __name__)
