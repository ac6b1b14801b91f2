"""Test-suite settings.

One torch thread per process: the tiny models spend their time in per-op overhead, where
threads only contend (a tiny forward goes from ~6 ms to hundreds of ms on a busy 2-core
machine). The real-model tier raises it again for its large matrix products.
"""

import torch

torch.set_num_threads(1)
