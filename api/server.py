"""``dmsae serve``: the REST service under uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from api.security import TOKEN_ENV, is_loopback, load_token


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    ray_address: str | None = None,
    runs_root: str | Path = "runs/api",
    token_file: str | Path | None = None,
    max_active_runs: int = 4,
    max_active_sweeps: int = 2,
    log_level: str = "info",
    model_roots: list[str] | None = None,
    data_roots: list[str] | None = None,
    cache_roots: list[str] | None = None,
    serve_tokens: bool = False,
    allowed_hosts: list[str] | None = None,
) -> int:
    """Run the service until interrupted; returns the exit status (2: refused to start)."""
    try:
        token = load_token(token_file)
    except (OSError, ValueError) as err:
        print(f"error: cannot read the API token: {err}", file=sys.stderr)
        return 2
    if token is None and not is_loopback(host):
        print(
            f"error: refusing to listen on {host} without a token: set ${TOKEN_ENV} or "
            "--token-file, or bind a loopback address (127.0.0.1)",
            file=sys.stderr,
        )
        return 2
    if ray_address:
        # JobSubmissionClient lets $RAY_ADDRESS override its address argument, but not
        # $RAY_API_SERVER_ADDRESS: make an explicit --ray-address win.
        os.environ["RAY_API_SERVER_ADDRESS"] = ray_address
    import uvicorn

    from api.app import Settings, create_app

    app = create_app(
        Settings(
            runs_root=Path(runs_root),
            ray_address=ray_address,
            token=token,
            max_active_runs=max_active_runs,
            max_active_sweeps=max_active_sweeps,
            model_roots=list(model_roots or []),
            data_roots=list(data_roots or []),
            cache_roots=list(cache_roots or []),
            serve_tokens=serve_tokens,
            allowed_hosts=list(allowed_hosts or []),
        )
    )
    # Open event streams must not hold a shutdown (or a restart) for long.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return 0
