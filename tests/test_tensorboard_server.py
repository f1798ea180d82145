"""What a user sees: the real ``tensorboard`` program serving the event files of a real fit.

One short fit writes into a temporary log directory; TensorBoard is started on 127.0.0.1 with
``--port 0`` (it picks a free port and prints its URL); the tests then read TensorBoard's own
HTTP data API, the one its web front end calls:

- ``/data/runs``: ``["run/version_0", ...]``
- ``/data/plugin/{scalars,histograms,images}/tags``: ``{run: {tag: {...}}}``
- ``/data/plugin/scalars/scalars?run=R&tag=T``: ``[[wall_time, step, value], ...]``
- ``/data/plugin/histograms/histograms?run=R&tag=T``: ``[[wall_time, step, [[left, right, count], ...]], ...]``
- ``/data/plugin/images/images?run=R&tag=T``: ``[{"wall_time", "step", "query"}, ...]``, and
  ``/data/plugin/images/individualImage?<query>`` the PNG bytes
- ``/data/plugin/custom_scalars/layout``: ``{"category": [{"title", "chart": [{"title",
  "multiline": {"tag": [regex, ...]}} or {"title", "margin": {"series": [{"value", "lower",
  "upper"}]}}], "closed"}], "version"}``, or ``{}`` without a layout; a multiline regex selects
  the scalar tags it matches from their start (``re.match``), as
  ``/data/plugin/custom_scalars/scalars?run=R&tag=REGEX`` (``{"regex_valid", "tag_to_events"}``) does
- ``/data/plugin/text/tags``: ``{run: [tag, ...]}``; ``SummaryWriter.add_text(tag, ...)`` stores
  ``tag + "/text_summary"``; ``/data/plugin/text/text?run=R&tag=T&markdown=false`` gives
  ``[{"wall_time", "step", "text"}]`` with the text HTML-escaped inside a table cell
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth

STEPS = 4
RUN = "run/version_0"
STARTUP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
# a direct connection: an http_proxy of the environment must not intercept 127.0.0.1
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SERVING = re.compile(r"TensorBoard \S+ at (http://\S+?)/? \(Press CTRL\+C to quit\)")


@dataclass
class Served:
    """A TensorBoard server over the log directory of one fit."""

    url: str
    log_dir: Path  # the run's own directory, holding the event file

    def get(self, route: str, **params: str) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with _OPENER.open(f"{self.url}{route}{query}", timeout=REQUEST_TIMEOUT_S) as response:
            return response.read()

    def json(self, route: str, **params: str) -> Any:
        return json.loads(self.get(route, **params))


def _fit(root: Path) -> Path:
    """A short real fit that logs every step, with full spectra and pictures at steps 0 and 2."""
    torch.manual_seed(0)
    logger = TensorBoardLogger(root, name="run")
    health = GradHealth(init="orthogonal", log_every_n_steps=1, full_every_n_steps=2)
    model = PLSequenceModel(build=lambda: nn.LSTM(3, 8, batch_first=True))
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=STEPS, logger=logger, log_every_n_steps=1))
    trainer.fit(model)
    return Path(logger.log_dir)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to TensorBoard's process group (it and its data server), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    stop = (lambda sig: os.killpg(process.pid, sig)) if hasattr(os, "killpg") else (lambda sig: process.send_signal(sig))
    try:
        stop(signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        stop(getattr(signal, "SIGKILL", signal.SIGTERM))
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def _wait_for_url(process: subprocess.Popen, output: Path) -> str:
    """The URL TensorBoard prints once it listens (``--port 0``: a free port of its choosing)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _SERVING.search(output.read_text(errors="replace"))
        if found:
            return found.group(1)
        if process.poll() is not None:
            pytest.fail(f"tensorboard exited with {process.returncode}:\n{output.read_text(errors='replace')}")
        time.sleep(0.1)
    pytest.fail(f"tensorboard printed no URL in {STARTUP_TIMEOUT_S:.0f} s:\n{output.read_text(errors='replace')}")


def _wait_for_data(served: Served) -> None:
    """Until TensorBoard has read the run (its loader works in the background after startup)."""
    deadline, last = time.monotonic() + STARTUP_TIMEOUT_S, None
    while time.monotonic() < deadline:
        try:
            last = served.json("/data/plugin/scalars/tags")
            if any(tag.startswith("gradhealth/") for tag in last.get(RUN, {})):
                return
        except (urllib.error.URLError, OSError, ValueError) as error:
            last = error
        time.sleep(0.2)
    pytest.fail(f"tensorboard served no gradhealth scalars in {STARTUP_TIMEOUT_S:.0f} s; last answer: {last!r}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One fit, then ``tensorboard --logdir`` over it on 127.0.0.1; always stopped afterwards."""
    root = tmp_path_factory.mktemp("tensorboard_server")
    log_dir = _fit(root / "logs")
    output = root / "tensorboard.log"
    command = [
        sys.executable, "-m", "tensorboard.main",
        "--logdir", str(root / "logs"),
        "--host", "127.0.0.1",
        "--port", "0",
        "--reload_interval", "0",  # the files are complete: load them once
    ]  # fmt: skip
    with output.open("wb") as sink:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        served = Served(_wait_for_url(process, output), log_dir)
        _wait_for_data(served)
        yield served
    finally:
        _stop(process)


def test_tensorboard_serves_our_scalars_histograms_and_images(served: Served) -> None:
    """The real TensorBoard program lists the run and every kind of GradHealth summary under
    ``gradhealth/`` (per-timestep and spectral scalars, spectra histograms, the three pictures),
    and the scalar, histogram and image data it serves are those of the event file."""
    assert RUN in served.json("/data/runs")

    scalar_tags = served.json("/data/plugin/scalars/tags")[RUN]
    for tag in (
        "gradhealth/rnn.l0/1_transmission",
        "gradhealth/rnn.l0/2_horizon",
        "gradhealth/rnn.l0/rate_per_step",
        "gradhealth/rnn.l0.cell/1_transmission",
        "gradhealth/rnn.l0/weight_grad_norm",
        "gradhealth/grad_norm/total",
        *(f"gradhealth/rnn.l0/{name}/{gate}" for gate in "ifgo" for name in ("5_sigma_max", "4_spectral_radius", "orth_error")),
    ):
        assert tag in scalar_tags, tag
    histogram_tags = served.json("/data/plugin/histograms/tags")[RUN]
    for gate in "ifgo":
        assert f"gradhealth/rnn.l0/singular_values/{gate}" in histogram_tags
        assert f"gradhealth/rnn.l0/eigenvalue_moduli/{gate}" in histogram_tags
    image_tags = served.json("/data/plugin/images/tags")[RUN]
    pictures = ("eigenvalues", "timestep_grad_norms", "timestep_heatmap")
    assert {f"gradhealth/rnn.l0/{name}" for name in pictures} <= set(image_tags)

    events = tensorboard_events(served.log_dir)
    for tag in ("gradhealth/rnn.l0/1_transmission", "gradhealth/rnn.l0/5_sigma_max/i"):
        series = served.json("/data/plugin/scalars/scalars", run=RUN, tag=tag)
        assert [(step, value) for _, step, value in series] == [(e.step, e.value) for e in events.Scalars(tag)]
        # every step; the spectra also at the end of fit
        assert [step for _, step, _ in series] == list(range(STEPS)) + ([STEPS] if "sigma" in tag else [])

    histogram = served.json("/data/plugin/histograms/histograms", run=RUN, tag="gradhealth/rnn.l0/singular_values/i")
    assert [step for _, step, _ in histogram] == [0, 2, STEPS]  # full passes and the end of fit
    for _, _, buckets in histogram:
        assert sum(count for _, _, count in buckets) == 8  # every singular value of an 8 x 8 gate block
    # step 0 is right after orthogonal init: all singular values 1
    assert all(left <= 1 + 1e-5 and right >= 1 - 1e-5 for left, right, count in histogram[0][2] if count)

    for name in pictures:
        images = served.json("/data/plugin/images/images", run=RUN, tag=f"gradhealth/rnn.l0/{name}")
        assert [image["step"] for image in images] == [2, STEPS]  # step 0 is numbers only
        png = served.get("/data/plugin/images/individualImage?" + images[-1]["query"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_tensorboard_serves_the_dashboard_layout_config_and_report(served: Served) -> None:
    """The Custom Scalars page has a GradHealth layout whose every chart shows data (each
    multiline regex matches scalar tags of the run, each margin series names logged tags), and
    the Text page holds the configuration (written once) and the end-of-fit health report."""
    scalar_tags = set(served.json("/data/plugin/scalars/tags")[RUN])
    layout = served.json("/data/plugin/custom_scalars/layout")
    assert layout.get("category"), f"no custom-scalars layout: {layout!r}"
    referenced: list[str] = []
    for category in layout["category"]:
        assert category.get("chart"), f"category {category.get('title')!r} has no chart"
        for chart in category["chart"]:
            if "multiline" in chart:
                for regex in chart["multiline"]["tag"]:
                    referenced.append(regex)
                    assert any(re.match(regex, tag) for tag in scalar_tags), f"{chart['title']!r}: {regex!r} matches no scalar"
                    answer = served.json("/data/plugin/custom_scalars/scalars", run=RUN, tag=regex)
                    assert answer["regex_valid"] and answer["tag_to_events"], (chart["title"], regex)
            else:
                for series in chart["margin"]["series"]:
                    for key in ("value", "lower", "upper"):
                        referenced.append(series[key])
                        assert series[key] in scalar_tags, f"{chart['title']!r}: {series[key]!r} is not a logged scalar"
    assert any("gradhealth" in reference for reference in referenced)

    text_tags = served.json("/data/plugin/text/tags")[RUN]

    def text_of(name: str) -> list[dict[str, Any]]:
        # SummaryWriter.add_text(name, ...) stores the tag name + "/text_summary"
        tag = next((t for t in text_tags if t in (name, f"{name}/text_summary")), None)
        assert tag is not None, f"no text summary {name!r} among {text_tags}"
        return served.json("/data/plugin/text/text", run=RUN, tag=tag, markdown="false")

    config = text_of("gradhealth/config")
    assert len(config) == 1 and "orthogonal" in html.unescape(config[0]["text"])
    report = text_of("gradhealth/report")
    assert len(report) >= 1 and "GradHealth health report" in html.unescape(report[-1]["text"])
