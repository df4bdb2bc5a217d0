"""POST a JPEG to a served age estimator and check the rows it answers (stdlib only: it runs on
the host of `make image-test`).

    python3 docker/post_photo.py PORT DEMO_IMAGES_DIR [REAL_PHOTO]

The demo faces are drawn, not photographed, so the first is sent whole (detector "none"); a real
photo, when given, must come back with a detected face and its age.
"""
from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 300


def wait_for_ping(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as ping:
                if ping.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"no answer on /ping within {START_TIMEOUT_S} s")


def post(port: int, jpeg: bytes, **params) -> list[dict]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}}
    if params:
        body["params"] = params
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())["predictions"]


def check(rows: list[dict], what: str) -> None:
    ages = [row["age"] for row in rows if row.get("error") is None and row.get("age") is not None]
    if not ages:
        raise SystemExit(f"{what}: no face with an age in the answer: {rows}")
    print(f"{what}: {len(rows)} row(s), ages {[round(a, 1) for a in ages]}")


def main() -> None:
    port, demo = int(sys.argv[1]), Path(sys.argv[2])
    wait_for_ping(port)
    jpeg = sorted(demo.glob("*.JPG"))[0]
    check(post(port, jpeg.read_bytes(), detector="none"), f"{jpeg.name} (whole image)")
    if len(sys.argv) > 3:
        photo = Path(sys.argv[3])
        check(post(port, photo.read_bytes()), f"{photo.name} (detected faces)")


if __name__ == "__main__":
    main()
