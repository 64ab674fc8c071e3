"""sdnq-caption-worker: caption images in S3 with SDNQ-quantized Qwen3-VL on Celery workers.

Importing this package imports neither torch nor Celery; the engine loads them when a
worker starts.
"""

__version__ = "0.1.0"
