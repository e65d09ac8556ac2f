"""`fgvr serve`: the dual system behind an HTTP JSON API and a page that shows why it answered as it did.

    POST /v1/classify        one image (multipart field `image`, or JSON {"image": "<base64>"})
    POST /v1/classify/batch  several (multipart fields `images`, or JSON {"images": [...]}), one result each
    GET  /v1/classes         the base's classes with their support images (by index)
    GET  /v1/support/{i}     support image i of the base's own list, re-encoded as a small JPEG
    POST /v1/corrections     a person's correction (image + right class) into the review queue beside the base
    GET  /v1/corrections, POST /v1/corrections/{id}/accept|reject|undo   the operator's review (--admin-token)
    GET  /v1/runs...         with --runs: evaluation runs, their confusion matrix, the images of one cell
    GET  /healthz            200 once the models are loaded (503 while loading)
    GET  /metrics            Prometheus text: requests, latency histogram, paths taken, model memory
    GET  /openapi.json       the API's schema (request and response models: fgvr.serve.models)
    GET  /, /runs and /docs  the pages (plain HTML + JS from fgvr/static, nothing fetched from elsewhere)

How a request flows: the body is read under a size limit and a deadline (a slow client gets 408, a large one
413, before anything is decoded); the image header is checked for its pixel count before a pixel is decoded
(a decompression bomb costs a few bytes of header, never its decoded size); decoding runs in worker threads,
bounded. The encoder sees *micro-batches*: requests queue, and one worker thread takes up to `encode_batch` of
them at a time (waiting at most `encode_wait_ms` for more, and only while other requests are still decoding,
so a lone client pays no wait). System 1, the trigger and the decision run on that batch too. Images the
trigger sends slow go to a second queue whose worker runs System 2 on up to `slow_batch` images at a time,
one batch in flight: System 2 calls are bounded however many clients there are. Both queues are bounded;
a full queue answers 503 with Retry-After rather than letting memory grow.

The trigger's threshold is fixed at start: `--threshold`, or a slow-path budget calibrated on the base's
support set (leave-one-out), as `fgvr classify` does; a single request has no run to take a quantile over.

Safe by default: binds to 127.0.0.1 and then answers loopback Host names only (--allowed-host for more); with `--token` (or FGVR_TOKEN) every /v1 route and /metrics need
`Authorization: Bearer <token>`; binding beyond loopback without a token warns loudly. Files are served only
from lists the server holds (the base's support list, a run's own results), addressed by index, and always
decoded and re-encoded: a path never comes from the request.
"""

from fgvr.serve.batcher import MicroBatcher
from fgvr.serve.guard import Guard
from fgvr.serve.metrics import LATENCY_BUCKETS, Metrics, model_memory_lines, resident_bytes
from fgvr.serve.routes import STATIC, create_app
from fgvr.serve.runs import RunBrowser
from fgvr.serve.server import header_deadline_protocol, serve
from fgvr.serve.service import Service, why
from fgvr.serve.settings import ADMIN_TOKEN_ENV, TOKEN_ENV, ServeSettings, UploadError, is_loopback, loud_warning
from fgvr.serve.upload import b64decode, check_header, decode_upload, read_images, thumbnail_jpeg

__all__ = ["ADMIN_TOKEN_ENV", "LATENCY_BUCKETS", "STATIC", "TOKEN_ENV", "Guard", "Metrics", "MicroBatcher", "RunBrowser", "Service",
           "ServeSettings", "UploadError", "b64decode", "check_header", "create_app", "decode_upload",
           "header_deadline_protocol", "is_loopback", "loud_warning", "model_memory_lines", "read_images",
           "resident_bytes", "serve", "thumbnail_jpeg", "why"]
