"""`zoo bench` measures robustly (every member and runtime interleaved, each warmed up on its
own, medians) and draws a readable picture: labels that do not overlap, axes that fit the
data, and an outlier that cannot squeeze the other points."""

from __future__ import annotations

import itertools

import pytest

import zoo
from export.benchmark import MemberResult, draw_results, time_interleaved

ACCURACY = {0.25: 0.99, 0.5: 1.0, 0.75: 1.0, 1.0: 1.0}  # three members share one accuracy


def results(torch_ms: dict[float, float], ort_ms: dict[float, float]) -> list[MemberResult]:
    return [
        MemberResult(
            zoo.Member(w), 1000, 1000, "accuracy", a, {"pytorch": {1: torch_ms[w]}, "onnxruntime": {1: ort_ms[w]}}
        )
        for w, a in ACCURACY.items()
    ]


def _boxes(fig):
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    return ax, renderer, [t.get_window_extent(renderer) for t in ax.texts]


@pytest.mark.parametrize(
    "torch_ms, ort_ms",
    [
        ({0.25: 1.1, 0.5: 1.2, 0.75: 1.3, 1.0: 1.5}, {0.25: 0.5, 0.5: 0.55, 0.75: 0.6, 1.0: 0.7}),  # close together
        ({0.25: 347.0, 0.5: 1.2, 0.75: 1.3, 1.0: 1.5}, {0.25: 0.5, 0.5: 0.55, 0.75: 0.6, 1.0: 0.7}),  # one outlier
    ],
    ids=["close", "outlier"],
)
def test_labels_do_not_overlap_and_the_points_use_the_plot(torch_ms, ort_ms):
    fig = draw_results(results(torch_ms, ort_ms), "slim_resnet20")
    ax, renderer, boxes = _boxes(fig)
    assert len(boxes) == 2 * len(ACCURACY)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)
    inliers = [ms for ms in [*torch_ms.values(), *ort_ms.values()] if ms < 100]
    left, right = (ax.transData.transform((x, 1.0))[0] for x in (min(inliers), max(inliers)))
    assert right - left > 0.6 * frame.width  # the ordinary points spread over the plot
    low, high = ax.get_xlim()
    assert low <= min(inliers) and max(inliers) <= high
    texts = " ".join(t.get_text() for t in ax.texts)
    assert ("347 ms, off scale" in texts) == (max(torch_ms.values()) > 100)


def test_timing_warms_up_each_callable_then_interleaves_them():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("w0.25 torch", "w0.25 ort", "w1 torch", "w1 ort")}
    medians = time_interleaved(runs, repeats=3, warmup=2)
    warm, timed = calls[:8], calls[8:]
    assert warm == [name for name in runs for _ in range(2)]
    assert timed == list(runs) * 3 and set(medians) == set(runs)
