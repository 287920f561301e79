"""``compress-edge serve``: an index and its model behind a web page and an HTTP API (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress_edge.cli import app
from compress_edge.cli.common import DEVICE_METAVAR, BackendOpt


@app.command("serve")
def serve(
    index_dir: Annotated[Path, typer.Argument(help="The index folder (made by 'compress-edge index build').")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="The model that embeds uploaded images: a .onnx "
                                              "file, a .engine or an OpenVINO .xml (default: the model the index "
                                              "was built with); "
                                              "refused at start when it does not match the index.")] = None,
    host: Annotated[str, typer.Option("--host", help="The address to listen on. Only loopback (127.0.0.1) "
                                                     "without --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="The port (0: a free one).")] = 8000,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a --host other machines can reach "
                                               "(the page has no login: anyone who reaches it can search).")] = False,
    backend: BackendOpt = "auto",
    device: Annotated[str, typer.Option("--device", metavar=DEVICE_METAVAR, help="Where the model runs: auto (the GPU "
                                                                              "when the runtime sees one), cpu, cuda "
                                                                              "or cuda:N.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for the model and FAISS.")] = None,
    root: Annotated[str | None, typer.Option("--root", help="Where the gallery images are now, if they moved since "
                                                            "the build.")] = None,
    max_bytes: Annotated[int, typer.Option("--max-bytes", min=1, help="Largest upload, in bytes.")] = 10 * 1024 * 1024,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Largest upload, in pixels (width x "
                                                                        "height).")] = 40_000_000,
    max_k: Annotated[int, typer.Option("--max-k", min=1, help="Most neighbours a request may ask for.")] = 100,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", min=1, help="Searches running at once; one "
                                                "more is answered 503.")] = 4,
    trust_model: Annotated[bool, typer.Option("--trust-model", help="Use --model even when its weights cannot be "
                                              "checked against the index.")] = False,
) -> None:
    """Serve image search over an index: a web page at / and a JSON API (POST /search, GET /info, /health).

    Example: compress-edge serve runs/index --model student.onnx   (then open http://127.0.0.1:8000/)
    """
    from compress_edge.cli.common import err_console
    from compress_edge.retrieval.safety import shown
    from compress_edge.retrieval.serve import Limits, SearchService, is_loopback, run_server

    if not is_loopback(host) and not allow_remote:
        from compress_edge.errors import CompressEdgeError

        raise CompressEdgeError(f"--host {shown(host)} is reachable from other machines and the page has no login; "
                                "pass --allow-remote to serve there anyway, or keep the default 127.0.0.1")
    limits = Limits(max_bytes=max_bytes, max_pixels=max_pixels, max_k=max_k, max_concurrent=max_concurrent)
    service = SearchService(index_dir, model, backend=backend, device=device, threads=threads, root=root,
                            trust_model=trust_model, limits=limits)

    def ready(bound_host: str, bound_port: int) -> None:
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        err_console.print(f"serving {service.index.ntotal:,} images of {shown(index_dir)} on "
                          f"http://{shown_host}:{bound_port}/ (Ctrl+C to stop)", markup=False, highlight=False,
                          soft_wrap=True)

    try:
        run_server(service, host, port, allow_remote=allow_remote, ready=ready)
    finally:
        service.close()
