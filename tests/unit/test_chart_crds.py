"""One source of truth for the CRDs: the chart's copies are the generated crds/*.yaml.

The chart templates files/crds/*.yaml with .Files.Get (a symlink would not survive
`helm package`), so the copies must stay byte-identical to crds/, which a test of the API
package keeps identical to the models. Fix a failure with hack/sync-chart-crds.
"""

from __future__ import annotations

from pathlib import Path

from memoplane.api import crd

ROOT = Path(__file__).resolve().parents[2]
CHART_CRDS = ROOT / "charts" / "memoplane" / "files" / "crds"


def test_chart_crds_are_byte_identical_to_crds_dir() -> None:
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in CHART_CRDS.glob("*.yaml")}
    assert set(chart) == set(source), "run hack/sync-chart-crds"
    stale = [name for name in source if chart[name] != source[name]]
    assert not stale, f"{stale} differ from crds/: run hack/sync-chart-crds"


def test_chart_crds_match_the_models() -> None:
    assert crd.drifted(CHART_CRDS) == [], "run hack/sync-chart-crds"
    assert {p.name for p in CHART_CRDS.glob("*.yaml")} == set(crd.rendered())
