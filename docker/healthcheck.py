"""Container health check: exit 0 when the server's /health answers 200 (model loaded).

Run by the image's HEALTHCHECK with the image's own Python, so the image needs no curl. The
port comes from CATS_PORT (the same variable the server reads), default 8000.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("CATS_PORT", "8000")
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
