"""Offline evaluation: distributed seed-per-index sampling, Inception features, FID / sFID / IS / precision / recall.

Entry point: ``python -m evaluation.run`` (Hydra config ``configs/eval/``). Layout:
  inception.py  feature extractors (FID Inception-v3 in plain PyTorch; tiny test extractors)
  stats.py      streaming float64 statistics with all-reduce
  metrics.py    FID, sFID, IS, improved precision/recall from statistics or features
  reference.py  reference statistics from an ADM ``.npz`` or from real images (cached)
  sample.py     checkpoint loading and distributed, resumable, class-balanced sampling in chunks
  report.py     JSON / Markdown / grid PNG / ADM ``.npz`` outputs
  run.py        the Hydra entry that ties them together
"""
