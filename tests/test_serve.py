"""The registered model behind MLflow's own REST server, started as a user starts it:
``mlflow models serve -m models:/NAME@champion --env-manager local --host 127.0.0.1 -p PORT``.

The test registers a tiny checkpoint in a temporary SQLite store, starts the real server, waits
for /ping with a bounded timeout, POSTs photos, and always stops the server.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from agecascade import tracking
from agecascade.registry import register
from agecascade.demo.writers import png_bomb as demo_png_bomb
from agecascade.serving import log_age_estimator
from conftest import AGES, shared_dataset, write_checkpoint

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def photos(*images: bytes, **params) -> dict:
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(b).decode()] for b in images]}}
    return body | ({"params": params} if params else {})


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        checkpoint = write_checkpoint(root / "model.pt", seed=0,
                                      crop={"margin": 0.4, "box_policy": "auto", "size": 32})
        with mlflow.start_run(experiment_id=tracking.experiment_id("test")):
            model_uri = log_age_estimator(checkpoint).model_uri
        register(model_uri, "t-rest")
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH, as an active venv has
    env = os.environ | {"MLFLOW_TRACKING_URI": uri,
                        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m",
         "models:/t-rest@champion", "--env-manager", "local", "--host", "127.0.0.1",
         "-p", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer /ping within {START_TIMEOUT_S} s"
                                     f":\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield port
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen) -> None:
    """The server and its uvicorn workers (one process group), however far they got."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_a_posted_crop_gets_its_age_and_distribution(server):
    crop = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    status, answer = post(server, photos(png(crop), detector="none", probs=True))
    assert status == 200, answer
    (row,) = answer["predictions"]
    assert (row["index"], row["face"], row["detector"], row["error"]) == (0, 0, "none", None)
    assert row["box"] == [0.0, 0.0, 32.0, 32.0]
    assert min(AGES) <= row["age_low"] <= row["age_high"] <= max(AGES)
    assert min(AGES) <= row["age"] <= max(AGES)
    assert len(row["probs"]) == len(AGES)


def test_a_posted_photo_gets_its_faces(server):
    pytest.importorskip("dlib")
    photo = sorted((shared_dataset("fgnet-dev") / "images").glob("*.JPG"))[0]
    status, answer = post(server, photos(photo.read_bytes()))
    assert status == 200, answer
    rows = answer["predictions"]
    assert rows[0]["face"] == 0 and rows[0]["error"] is None and rows[0]["age"] is not None
    width, height = Image.open(photo).size
    x0, y0, x1, y1 = rows[0]["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_bad_payloads_get_clear_errors_and_the_server_keeps_serving(server):
    status, answer = post(server, photos(b"these are not pixels"))
    assert status == 200 and answer["predictions"][0]["error"] == "not_an_image"
    assert answer["predictions"][0]["age"] is None
    status, answer = post(server, {"dataframe_split": {"columns": ["image"],
                                                       "data": [["%%% not base64 %%%"]]}})
    assert status == 400 and "message" in answer
    status, answer = post(server, photos(demo_png_bomb()))  # 30000 x 30000 pixels declared
    assert status == 200 and answer["predictions"][0]["error"] == "decompression_bomb"
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/ping", timeout=5) as ping:
        assert ping.status == 200
    crop = np.zeros((32, 32, 3), np.uint8)
    status, answer = post(server, photos(png(crop), detector="none"))
    assert status == 200 and answer["predictions"][0]["error"] is None
