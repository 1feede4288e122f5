"""Estimate a gauge between two revisions of a model and publish it as a Hub repo.

Makes the local repo of revisions of ``examples/training.build_revision_repo`` (``v1.0`` =
stories260K, ``v1.1-recharted`` = the same weights re-charted on disk by a random signed
permutation), **estimates** the gauge v1.0 -> v1.1 from activations on held-out text, records
both ends' fingerprints, and compares it with the planted gauge. Then:

* by default it saves the gauge locally (``Gauge.save_pretrained``: ``gauge.safetensors``,
  ``gauge_config.json``, a model card ``README.md``) and loads it back;
* with ``--endpoint URL --repo-id ID --token T`` it pushes it for real through
  ``huggingface_hub`` (``Gauge.push_to_hub``: ``create_repo`` + one ``upload_folder`` commit) to
  that Hub endpoint, pulls it back at the new commit into a fresh cache
  (``Gauge.from_pretrained(ID, revision=<commit>)``), and attaches the pulled gauge to v1.0 with
  ``GaugedModel.from_pretrained(v1.0, gauge=ID, gauge_revision=<commit>)``.

Usage::

    python examples/push_gauge_to_hub.py                       # save locally, reload, check (~10 s)
    python examples/push_gauge_to_hub.py --out ./my-gauge      # keep the gauge directory
    python examples/push_gauge_to_hub.py --endpoint https://huggingface.co \\
        --repo-id me/stories260K-v1.0-to-v1.1 --token hf_...

(``--endpoint`` points ``huggingface_hub`` at that server for this run only, like ``HF_ENDPOINT``;
the tests use a local test double of the Hub's HTTP routes, ``tests/helpers/hub_double.py``.) Exits
non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples import common as ex  # noqa: E402
from examples import training as tr  # noqa: E402
from hf_bdgauge import Gauge, GaugedModel  # noqa: E402
from hf_bdgauge.estimate import estimate_gauge  # noqa: E402
from hf_bdgauge.options import CaptureOptions  # noqa: E402
from hf_bdgauge.provenance import ModelRef  # noqa: E402


@contextlib.contextmanager
def hub_endpoint(url: str) -> Iterator[None]:
    """Point ``huggingface_hub`` at ``url`` (and online) while the context is open.

    ``HF_ENDPOINT`` is read once, when ``huggingface_hub`` is imported; this patches the module
    constants it was read into (as ``HF_ENDPOINT`` would have set them) and restores them after.
    """
    from huggingface_hub import constants

    url = url.rstrip("/")
    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE")
    saved = {n: getattr(constants, n) for n in names}
    env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "NO_PROXY")}
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_OFFLINE = False
    os.environ["HF_ENDPOINT"] = url
    os.environ.pop("HF_HUB_OFFLINE", None)
    host = urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):  # never send a local server's traffic through a proxy
        os.environ["NO_PROXY"] = ",".join(filter(None, [env["NO_PROXY"], host]))
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(constants, n, v)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(args: argparse.Namespace) -> dict[str, Any]:
    ex.setup()
    checks = ex.Checks()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bdgauge-push-") as tmp:
        work = Path(tmp)
        repo = tr.repo_from_args(args, work / "repo", with_finetune=False)
        src, tgt = repo.path(tr.RevisionRepo.BASE), repo.path(tr.RevisionRepo.RECHARTED)
        gauge = estimate_gauge(src, tgt, repo.texts, capture=CaptureOptions(progress=False))
        # name the ends as they would be published, and fingerprint them (GaugedModel checks these)
        gauge.source = ModelRef.from_checkpoint(src)
        gauge.target = ModelRef.from_checkpoint(tgt)
        gauge.source.model_id, gauge.source.revision = args.model_id, tr.RevisionRepo.BASE
        gauge.target.model_id, gauge.target.revision = args.model_id, tr.RevisionRepo.RECHARTED
        res["estimate_equals_planted"] = gauge.element == repo.planted[tr.RevisionRepo.RECHARTED]
        res["tokens"] = gauge.metrics["tokens"]
        print(f"estimated on {res['tokens']} tokens: {gauge.metrics['summary']}")
        checks("estimate equals the planted gauge", res["estimate_equals_planted"])

        out = Path(args.out) if args.out else work / "gauge"
        gauge.save_pretrained(out)
        files = sorted(p.name for p in out.iterdir())
        res["local_files"] = files
        res["local_roundtrip"] = Gauge.from_pretrained(out) == gauge
        print(f"\nsaved {out}: " + ", ".join(f"{f} ({(out / f).stat().st_size} B)" for f in files))
        checks("the saved gauge loads back equal", res["local_roundtrip"])

        if args.endpoint:
            if not args.repo_id:
                raise SystemExit("--endpoint needs --repo-id")
            from huggingface_hub import HfApi

            with hub_endpoint(args.endpoint):
                info = gauge.push_to_hub(
                    args.repo_id,
                    token=args.token,
                    commit_message=f"gauge {tr.RevisionRepo.BASE} -> {tr.RevisionRepo.RECHARTED}",
                )
                res["commit"] = info.oid
                res["commit_url"] = str(info)
                print(f"\npushed to {args.endpoint.rstrip('/')}/{args.repo_id}: commit {info.oid}")
                api = HfApi(endpoint=args.endpoint.rstrip("/"), token=args.token)
                res["hub_files"] = sorted(api.list_repo_files(args.repo_id, revision=info.oid))
                print(f"files in the repo at that commit: {', '.join(res['hub_files'])}")
                cache = work / "fresh-cache"
                pulled = Gauge.from_pretrained(
                    args.repo_id, revision=info.oid, cache_dir=cache, token=args.token
                )
                res["hub_roundtrip"] = pulled == gauge
                print(
                    f"pulled back at commit {info.oid[:7]} into an empty cache: equal to what was pushed: "
                    f"{res['hub_roundtrip']}"
                )
                checks("the pushed gauge pulls back equal (by commit)", res["hub_roundtrip"])
                checks(
                    "the Hub repo holds gauge.safetensors, gauge_config.json and README.md",
                    {"gauge.safetensors", "gauge_config.json", "README.md"} <= set(res["hub_files"]),
                )

                gm = GaugedModel.from_pretrained(
                    src, gauge=args.repo_id, gauge_revision=info.oid, cache_dir=cache, token=args.token
                )
                ids = repo.eval_ids[:2]
                with torch.no_grad():
                    h_src = gm(ids, output_hidden_states=True).hidden_states
                    h_tgt = ex.load_model(tgt)(ids, output_hidden_states=True).hidden_states
                res["max_dh_via_hub_gauge"] = max(
                    (gm.to_reference(a) - b).abs().max().item() for a, b in zip(h_src, h_tgt)
                )
                print(
                    f"GaugedModel.from_pretrained(v1.0, gauge={args.repo_id!r}): max |to_reference(h_v1.0) "
                    f"− h_v1.1| over all layers = {res['max_dh_via_hub_gauge']:.1e}"
                )
                checks(
                    "v1.0 with the Hub gauge maps its hidden states onto v1.1's",
                    res["max_dh_via_hub_gauge"] < 1e-4,
                    f"{res['max_dh_via_hub_gauge']:.1e}",
                )
        else:
            print("\n(no --endpoint: nothing pushed; pass --endpoint URL --repo-id ID --token T to publish)")
        card = (out / "README.md").read_text(encoding="utf-8")
        res["card_head"] = "\n".join(card.splitlines()[:12])
    return checks.result(**res)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ex.example_parser(
        __doc__,
        fast_help="fewer estimation samples (for the tests)",
        out_help="save the gauge directory here",
    )
    p.add_argument("--endpoint", default=None, help="Hub endpoint to push to (e.g. https://huggingface.co)")
    p.add_argument("--repo-id", default=None, help="the gauge repo to create or update, e.g. me/my-gauge")
    p.add_argument(
        "--token", default=None, help="a write token for that endpoint (default: huggingface_hub's)"
    )
    p.add_argument(
        "--model-id", default="local/stories260K", help="model id recorded for both ends of the gauge"
    )
    return ex.fast_or_full(p.parse_args(argv), eval_samples=(4, 8))


main = ex.example_main(run, parse_args, __name__)
