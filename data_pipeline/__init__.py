"""Latent data pipeline: images -> preprocessing -> VAE moments -> shards + manifest -> bucketed resumable loader.

Modules import lazily (diffusers, streaming are heavy): import the submodule you need, e.g.
``from data_pipeline.vae import LatentVAE`` or ``from data_pipeline.loader import LoaderConfig, build_loader``.
"""
