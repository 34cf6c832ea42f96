"""Limits of the app: what one request, one session and the server as a whole may hold."""

from __future__ import annotations

MAX_CLASSES = 8  # class slots in the few-shot tab
INITIAL_CLASSES = 3  # slots shown before "Add class" is pressed (more when a bundled example task has more classes)
MAX_IMAGES = 200  # support + query images in one few-shot request
MAX_FILE_SIZE = "20mb"  # per uploaded file
MAX_FIELD_LENGTH = 300  # characters in a backbone, LoRA or folder field
MAX_CARDS = 60  # queries shown with probability bars (all of them are in the table)
THUMBNAIL_SIZE = 96  # px, longest side of a query thumbnail in the probability cards
MAX_INVERT_IMAGES = 32  # classes x images per class in one inversion
MAX_INVERT_STEPS = 2000
MAX_SEED = 2**63 - 1
MAX_LORA_FILES = 4  # files in one LoRA upload
MAX_POOL_GALLERY = 48  # images shown per page of a class in the pool browser
MAX_POOL_PAGE_PIXELS = 8_000_000  # pixels decoded per pool page (unmasked and masked): large images make shorter pages
MAX_POOL_SOURCES = 200  # source LoRAs listed in the pool browser's dropdown
MAX_POOL_MANIFEST_BYTES = 8 << 20  # bytes of one run's manifest read by the pool browser
MAX_POOL_RUN_ITEMS = 5000  # images in one run's manifest read by the pool browser
MAX_POOL_RUNS = 5000  # runs of one pool read by the pool browser (the first, by folder name)
MAX_POOL_SETTINGS_CHARS = 20_000  # characters of one run's settings sent to the browser
POOL_INDEXES = 4  # pool folders whose index (the parsed manifests) the server keeps
MAX_HUB_POOL_FILES = 50_000  # pool files (manifests and images) downloaded from one Hub dataset
MAX_HUB_POOL_BYTES = 1 << 30  # bytes downloaded from one Hub dataset
DISPLAY_SIZE = 160  # px: small surrogate images are enlarged (nearest neighbour) to at least this for display
PREVIEW_INTERVAL = 0.5  # s: at most two gallery refreshes a second, however fast the backbone
SESSIONS = 16  # sessions whose loaded LoRA is kept
RESULT_SESSIONS = 4  # sessions whose latest inversion (images, masks, zip) is kept
MAX_URL_LENGTH = 8192  # bytes of path and query in one request; longer URLs get 414 URI Too Long
QUEUE_SIZE = 32  # requests waiting in the queue; more are refused with "queue full"
PREDICT_CONCURRENCY = 2  # few-shot predictions at once (inversion has its own single slot)
LOADING = dict(concurrency_id="load", concurrency_limit=2)  # model and LoRA loads at once (event keyword arguments)
