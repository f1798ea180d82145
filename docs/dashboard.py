"""Screenshot GradHealth's TensorBoard dashboard into docs/dashboard.png.

Starts the real ``tensorboard`` on 127.0.0.1 (a free port of its choosing), waits until it serves
the run's ``gradhealth/`` scalars, takes a headless Chromium screenshot of each requested page,
trims the empty space below each page's content and stacks the pages into one PNG, or with
``--split`` writes one PNG per page, ``<out>_<page>.png``. ``--runs`` shows only the runs whose
path under the log directory matches a regex (TensorBoard is pointed at a directory of links to
their files), so a page of pictures or text can show two runs of many.

Usage (from the repository root):

    python docs/dashboard.py                            # trains examples/adding_problem.py --steps 300 first
    python docs/dashboard.py --logdir /tmp/dash_runs    # an existing log directory
    python docs/dashboard.py --logdir runs --pages custom_scalars images text --out /tmp/board.png
    python docs/dashboard.py --logdir runs/adding_rnn-relu_T100 --runs '^(identity|uniform)_seed1$' \\
        --pages images text --split --out docs/dashboard.png   # docs/dashboard_images.png, docs/dashboard_text.png

Pages: ``auto`` (``custom_scalars`` when the run has GradHealth's custom-scalars layout, else
``scalars`` filtered to ``--tag-filter``), or any TensorBoard page name: ``custom_scalars``,
``scalars``, ``images``, ``histograms``, ``distributions``, ``text`` (the configuration and the
end-of-fit health report).

Needs Chromium (Debian/Ubuntu: ``apt-get install -y chromium``) and Pillow (installed with
matplotlib). Not part of the package: a tool for the README picture.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FILTERED_PAGES = ("scalars",)  # elsewhere a filter shows each card twice: its match group, then its tag group
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 bypasses any proxy
_SERVING = re.compile(r"TensorBoard \S+ at (http://\S+?)/? \(Press CTRL\+C to quit\)")


def get_json(url: str) -> Any:
    with _OPENER.open(url, timeout=10) as response:
        return json.loads(response.read())


def start_tensorboard(logdir: Path, output: Path, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """``tensorboard --logdir`` on 127.0.0.1 with ``--port 0``; the process and the URL it prints."""
    command = [
        sys.executable, "-m", "tensorboard.main",
        "--logdir", str(logdir),
        "--host", "127.0.0.1",
        "--port", "0",
        "--reload_interval", "0",
    ]  # fmt: skip
    with output.open("wb") as sink:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _SERVING.search(output.read_text(errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    stop(process)
    raise SystemExit(f"tensorboard did not start:\n{output.read_text(errors='replace')}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to TensorBoard's process group (it and its data server), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_for_gradhealth(url: str, timeout_s: float) -> dict[str, Any]:
    """Scalar tags by run, once TensorBoard serves at least one ``gradhealth/`` scalar."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            tags = get_json(f"{url}/data/plugin/scalars/tags")
            if any(tag.startswith("gradhealth/") for run in tags.values() for tag in run):
                return tags
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.3)
    raise SystemExit(f"tensorboard at {url} served no gradhealth/ scalars in {timeout_s:.0f} s")


def page_url(url: str, page: str, tag_filter: str) -> str:
    fragment = page
    if page in FILTERED_PAGES and tag_filter:
        fragment += "&tagFilter=" + urllib.parse.quote(tag_filter, safe="")
    return f"{url}/#{fragment}"


def screenshot(chromium: str, url: str, path: Path, width: int, height: int, budget_ms: int, profile: Path) -> None:
    """One headless Chromium screenshot; ``--virtual-time-budget`` lets the JS app load its data."""
    command = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        "--no-first-run",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={path}",
        url,
    ]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    if not path.is_file():
        raise SystemExit(f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}")


def trim_bottom(image: Image.Image, margin: int = 16) -> Image.Image:
    """Cut the rows below the page's content (rows equal to the bottom row's background)."""
    rgb = image.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, background).point(lambda value: 255 if value > 8 else 0).getbbox()
    bottom = min(rgb.height, (box[3] if box else rgb.height) + margin)
    return rgb.crop((0, 0, rgb.width, bottom))


def stack(images: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    top = 0
    for image in images:
        sheet.paste(image, (0, top))
        top += image.height
    return sheet


def link_runs(logdir: Path, pattern: str, into: Path) -> list[str]:
    """Mirror the runs under ``logdir`` whose relative path matches ``pattern`` (``re.search``) into
    ``into``: real folders, a symbolic link per file (TensorBoard does not descend into linked
    folders). Returns the runs linked, sorted; fails when none matches.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for run in ("identity_seed0", "identity_seed1", "uniform_seed1"):
        ...     (root / "logs" / run).mkdir(parents=True)
        ...     (root / "logs" / run / "events.out.tfevents.1").touch()
        >>> link_runs(root / "logs", "seed1$", root / "shown")
        ['identity_seed1', 'uniform_seed1']
        >>> (root / "shown" / "uniform_seed1" / "events.out.tfevents.1").is_symlink()
        True
    """
    runs = sorted(
        folder.relative_to(logdir).as_posix()
        for folder in {event_file.parent for event_file in logdir.rglob("events.out.tfevents.*")}
        if re.search(pattern, folder.relative_to(logdir).as_posix())
    )
    if not runs:
        raise SystemExit(f"no run under {logdir} matches --runs {pattern!r}")
    for run in runs:
        (into / run).mkdir(parents=True)
        for path in (logdir / run).iterdir():
            if path.is_file():
                (into / run / path.name).symlink_to(path.resolve())
    return runs


def page_path(out: Path, page: str) -> Path:
    """Where ``--split`` writes ``page``: ``docs/dashboard.png`` -> ``docs/dashboard_images.png``."""
    return out.with_name(f"{out.stem}_{page}{out.suffix}")


def train_example(logdir: Path, steps: int) -> None:
    command = [sys.executable, str(ROOT / "examples" / "adding_problem.py"), "--steps", str(steps), "--logdir", str(logdir)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="TensorBoard log directory (default: train the adding-problem example)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the example when no --logdir is given")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--split", action="store_true", help="one PNG per page, <out>_<page>.png, instead of one stacked")
    parser.add_argument("--runs", help="regex: only the runs whose path under --logdir matches it")
    parser.add_argument("--pages", nargs="+", default=["auto", "images"], help="TensorBoard pages, stacked top to bottom")
    parser.add_argument("--tag-filter", default="gradhealth", help="tag regex for the scalars page")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200, help="window height: the most of each page shown")
    parser.add_argument("--budget-ms", type=int, default=10_000, help="virtual time the page gets to load its charts")
    parser.add_argument("--chromium", default=next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for TensorBoard")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")

    with tempfile.TemporaryDirectory(prefix="gradhealth_dashboard_") as scratch:
        scratch_dir = Path(scratch)
        logdir = args.logdir
        if logdir is None:
            logdir = scratch_dir / "runs"
            train_example(logdir, args.steps)
        if args.runs is not None:
            print(f"runs: {', '.join(link_runs(logdir, args.runs, scratch_dir / 'shown'))}", flush=True)
            logdir = scratch_dir / "shown"
        process, url = start_tensorboard(logdir, scratch_dir / "tensorboard.log", args.timeout)
        try:
            wait_for_gradhealth(url, args.timeout)
            has_layout = bool(get_json(f"{url}/data/plugin/custom_scalars/layout").get("category"))
            pages = [("custom_scalars" if has_layout else "scalars") if page == "auto" else page for page in args.pages]
            shots = []
            for index, page in enumerate(pages):
                path = scratch_dir / f"{index}_{page}.png"
                address = page_url(url, page, args.tag_filter)
                print(f"screenshot {address}", flush=True)
                screenshot(args.chromium, address, path, args.width, args.height, args.budget_ms, scratch_dir / f"profile{index}")
                with Image.open(path) as image:
                    shots.append(trim_bottom(image))
        finally:
            stop(process)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pictures = [(page_path(args.out, page), [shot]) for page, shot in zip(pages, shots)] if args.split else [(args.out, shots)]
    for path, images in pictures:
        sheet = stack(images)
        sheet.save(path, optimize=True)
        print(f"wrote {path} ({sheet.width} x {sheet.height}, {path.stat().st_size // 1024} KB)")
    return [path for path, _ in pictures]


if __name__ == "__main__":
    main()
