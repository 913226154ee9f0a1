"""Dashboard speed, server side: a threshold change on the test split, and page switches after the first load.

    python benchmarks/bench_dashboard.py [--repeats 15]

Times are medians of ``--repeats`` runs, in Streamlit's AppTest (the script run the server does, without the
browser). "threshold recompute" is what a threshold change costs in Python: core.metrics for the confusion matrix
and rates, the outcome of every test image, and the operating-point table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

from core import metrics
from core.data import PROJECT_ROOT
from core.runs import DEFAULT_RUN, read_metrics, read_predictions

APP = str(PROJECT_ROOT / "dashboard" / "app.py")
PAGES = ["predict", "threshold", "browse", "audit", "training", "data"]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(args: argparse.Namespace) -> None:
    frame = read_predictions(DEFAULT_RUN, "test")
    labels, probs = frame["label"].to_numpy(), frame["probability"].to_numpy()
    thresholds = read_metrics(DEFAULT_RUN).thresholds
    rng = np.random.default_rng(0)

    def recompute() -> None:
        t = float(rng.random())
        metrics.binary_metrics(labels, probs, t)
        metrics.outcomes(labels, probs, t)
        for value in [*thresholds.values(), t]:
            metrics.binary_metrics(labels, probs, value)

    print(f"threshold recompute (core.metrics, {len(frame)} test images): {median_ms(recompute, args.repeats):.1f} ms")

    start = time.perf_counter()
    at = AppTest.from_file(APP, default_timeout=300).run()
    print(f"first load (model + tables, predict page): {time.perf_counter() - start:.2f} s")
    for page in PAGES:  # warm every page's caches once, as a first visit does
        at.switch_page(str(PROJECT_ROOT / "pages" / f"{page}.py")).run()

    at.switch_page(str(PROJECT_ROOT / "pages" / "threshold.py")).run()

    def move_threshold() -> None:
        at.sidebar.slider[0].set_value(round(float(rng.uniform(0.05, 0.95)), 3)).run()
        assert not at.exception

    def drag_threshold() -> None:  # what the chart's slider does: the threshold moves, the chart spec stays
        at.session_state["threshold"] = round(float(rng.uniform(0.05, 0.95)), 3)
        at.run()
        assert not at.exception

    print(f"threshold page rerun, threshold dragged in the chart: {median_ms(drag_threshold, args.repeats):.0f} ms")
    print(f"threshold page rerun, threshold set in the sidebar (chart rebuilt): "
          f"{median_ms(move_threshold, args.repeats):.0f} ms")
    for page in PAGES:
        def switch(page: str = page) -> None:
            at.switch_page(str(PROJECT_ROOT / "pages" / f"{page}.py")).run()
            assert not at.exception
        print(f"page switch to {page}: {median_ms(switch, args.repeats):.0f} ms")
    print(f"({platform.processor() or platform.machine()}, torch threads default, {Path(APP).name})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    main(parser.parse_args())
