"""Exit 1 when a certificate that the build machine's CA bundle adds to Debian's own (a
TLS-intercepting proxy's, say) is found in the image's certificate stores or its Python
packages: the bundle is a build secret and must never reach a layer.

    python docker/no_host_certificates.py HOST_BUNDLE   (run inside the image)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
SEARCHED = ("/etc", "/usr/local", "/usr/share/ca-certificates", "/opt", "/home", "/workspace")


def bodies(data: bytes) -> set[bytes]:
    return {b"".join(body.split()) for body in PEM.findall(data)}


def main() -> int:
    host = bodies(Path(sys.argv[1]).read_bytes())
    own = bodies(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    extra = host - own
    found = []
    for root in SEARCHED:
        for path in Path(root).rglob("*"):
            if path.suffix in {".pem", ".crt", ".cer"} and path.is_file() and not path.is_symlink():
                if bodies(path.read_bytes()) & extra:
                    found.append(str(path))
    print(f"{len(extra)} certificate(s) of the host's bundle are not Debian's; found in: "
          f"{found or 'nothing'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
